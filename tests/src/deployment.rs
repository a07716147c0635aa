//! Reading the deployment's three descriptions for the contract test
//! (`tests/deployment_contract.rs`): `template.yaml` (through cfn-lint's decoder), the contract
//! in `deploy/contract.json`, and what the code publishes as data (the variables a function
//! reads when it starts, the routes, the adapters' AWS operations, the table's shape).
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::OnceLock;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::Credentials;
use gateway::config::{ConfigError, Env};
use gateway_aws::wiring::{BootError, Wiring};
use gateway_http::api::identity::IdentitySource;
use gateway_http::api::ApiState;
use serde_json::Value;
use testkit::local_aws::repo_root;

pub fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_root().join(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// cfn-lint's decoder turns the short tags into their long form (`!Ref X` → `{"Ref": "X"}`).
const DECODE_TEMPLATE: &str = "\
import json, sys
from cfnlint.decode import decode
template, errors = decode(sys.argv[1])
if errors:
    sys.exit('\\n'.join(str(e) for e in errors))
json.dump(template, sys.stdout)
";

pub fn template() -> &'static Value {
    static TEMPLATE: OnceLock<Value> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let python = repo_root().join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run scripts/bootstrap (it installs cfn-lint, whose YAML decoder reads the template)",
            python.display()
        );
        let out = Command::new(python)
            .arg("-c")
            .arg(DECODE_TEMPLATE)
            .arg(repo_root().join("template.yaml"))
            .output()
            .expect("run the template decoder");
        assert!(
            out.status.success(),
            "template.yaml does not parse: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("the decoder prints JSON")
    })
}

pub fn contract() -> &'static Value {
    static CONTRACT: OnceLock<Value> = OnceLock::new();
    CONTRACT.get_or_init(|| {
        serde_json::from_str(&read("deploy/contract.json")).expect("deploy/contract.json is JSON")
    })
}

pub fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().expect("a list of strings").to_string())
            .collect(),
        other => panic!("expected a string or a list of strings, got {other}"),
    }
}

pub fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .map(|m| m.keys().filter(|k| !k.starts_with('_')).cloned().collect())
        .unwrap_or_default()
}

#[derive(Debug)]
pub struct Function {
    pub name: String,
    pub resource: String,
    pub role: String,
    pub log_group: String,
    pub router: Option<String>,
    pub public_routes: BTreeSet<String>,
    pub required: BTreeSet<String>,
    pub optional: BTreeSet<String>,
    pub secret_required: BTreeSet<String>,
    pub secret_optional: BTreeSet<String>,
    /// (IAM action, resource) pairs.
    pub calls: BTreeSet<(String, String)>,
}

impl Function {
    pub fn reads(&self) -> BTreeSet<String> {
        let mut all = self.required.clone();
        all.extend(self.optional.iter().cloned());
        all.extend(self.secret_keys());
        all
    }

    pub fn secret_keys(&self) -> BTreeSet<String> {
        self.secret_required
            .union(&self.secret_optional)
            .cloned()
            .collect()
    }
}

pub fn functions() -> Vec<Function> {
    let contract = contract();
    let groups = &contract["env_groups"];
    let mut out = Vec::new();
    for (name, spec) in contract["functions"].as_object().expect("functions") {
        let mut f = Function {
            name: name.clone(),
            resource: spec["resource"].as_str().expect("resource").into(),
            role: spec["role"].as_str().expect("role").into(),
            log_group: spec["log_group"].as_str().expect("log_group").into(),
            router: spec["router"].as_str().map(String::from),
            public_routes: strings(&spec["public_routes"]).into_iter().collect(),
            required: BTreeSet::new(),
            optional: BTreeSet::new(),
            secret_required: BTreeSet::new(),
            secret_optional: BTreeSet::new(),
            calls: BTreeSet::new(),
        };
        for group in strings(&spec["env_groups"]) {
            let g = &groups[&group];
            assert!(g.is_object(), "{name}: unknown env group {group}");
            f.required.extend(strings(&g["required"]));
            f.optional.extend(strings(&g["optional"]));
            f.secret_required.extend(strings(&g["secret"]));
            f.secret_optional.extend(strings(&g["secret_optional"]));
        }
        f.optional = &f.optional - &f.required;
        for call in spec["calls"].as_array().expect("calls") {
            for action in strings(&call["actions"]) {
                for resource in strings(&call["resources"]) {
                    f.calls.insert((action.clone(), resource));
                }
            }
        }
        out.push(f);
    }
    out
}

/// One Secrets Manager secret of the template, as the contract describes it.
#[derive(Debug, Clone)]
pub struct Secret {
    /// Its logical id in template.yaml.
    pub resource: String,
    /// The variable that tells a function its ARN.
    pub env: String,
    pub keys: BTreeSet<String>,
    pub generated_key: Option<String>,
}

pub fn secrets() -> Vec<Secret> {
    contract()["secrets"]
        .as_object()
        .expect("secrets")
        .iter()
        .filter(|(id, _)| !id.starts_with('_'))
        .map(|(id, spec)| Secret {
            resource: id.clone(),
            env: spec["env"].as_str().expect("env").to_string(),
            keys: keys(&spec["keys"]),
            generated_key: spec["generated_key"].as_str().map(String::from),
        })
        .collect()
}

/// Every secret key of every secret.
pub fn secret_keys() -> BTreeSet<String> {
    secrets().into_iter().flat_map(|s| s.keys).collect()
}

/// The variables naming the secrets' ARNs.
pub fn secret_envs() -> BTreeSet<String> {
    secrets().into_iter().map(|s| s.env).collect()
}

impl Function {
    /// The secrets holding any key the function reads.
    pub fn secrets_needed(&self) -> Vec<Secret> {
        let reads = self.secret_keys();
        secrets()
            .into_iter()
            .filter(|s| !s.keys.is_disjoint(&reads))
            .collect()
    }
}

pub fn local_only_env() -> BTreeSet<String> {
    keys(&contract()["local_only_env"])
}

pub fn resources() -> &'static serde_json::Map<String, Value> {
    template()["Resources"].as_object().expect("Resources")
}

pub fn resource(id: &str) -> &'static Value {
    resources()
        .get(id)
        .unwrap_or_else(|| panic!("template.yaml has no resource {id}"))
}

/// A function property, falling back to `Globals.Function` as the SAM transform does.
pub fn function_property(function: &str, key: &str) -> Option<&'static Value> {
    resource(function)["Properties"]
        .get(key)
        .or_else(|| template()["Globals"]["Function"].get(key))
}

/// Environment variables of a function with SAM's Globals merged in (the function's win).
pub fn function_env(function: &str) -> BTreeMap<String, Value> {
    let mut env = BTreeMap::new();
    for source in [
        &template()["Globals"]["Function"]["Environment"]["Variables"],
        &resource(function)["Properties"]["Environment"]["Variables"],
    ] {
        if let Some(vars) = source.as_object() {
            env.extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    env
}

/// The resource an IAM `Resource` entry names, in the contract's notation:
/// `!GetAtt JobsTable.Arn` → `JobsTable`, `!Sub "${JobsTable.Arn}/index/x"` → `JobsTable/index/x`.
pub fn symbol(value: &Value) -> String {
    if let Some(s) = value.as_str() {
        return s.to_string();
    }
    if let Some(name) = value.get("Ref").and_then(Value::as_str) {
        return name.to_string();
    }
    if let Some(parts) = value.get("Fn::GetAtt").and_then(Value::as_array) {
        let (res, attr) = (parts[0].as_str().unwrap(), parts[1].as_str().unwrap());
        return if attr == "Arn" {
            res.to_string()
        } else {
            format!("{res}.{attr}")
        };
    }
    if let Some(text) = value.get("Fn::Sub").and_then(Value::as_str) {
        return substitute(text, |name| {
            name.strip_suffix(".Arn").unwrap_or(name).to_string()
        });
    }
    panic!("cannot name the resource of {value}")
}

pub fn substitute(text: &str, mut lookup: impl FnMut(&str) -> String) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closing brace in Fn::Sub") + start;
        out.push_str(&lookup(&rest[start + 2..end]));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// An environment value as the function would see it: parameters take their defaults (or a
/// placeholder), resources a made-up name.
pub fn resolve(value: &Value) -> String {
    let lookup = |name: &str| -> String {
        if let Some(param) = template()["Parameters"].get(name) {
            return match &param["Default"] {
                Value::Null => format!("param{}", name.to_ascii_lowercase()),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
        }
        if name.starts_with("AWS::") {
            return match name {
                "AWS::Region" => "us-east-1".into(),
                "AWS::URLSuffix" => "amazonaws.com".into(),
                "AWS::AccountId" => "123456789012".into(),
                _ => "aws".into(),
            };
        }
        format!("{}-resolved", name.replace('.', "-"))
    };
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => {
            if let Some(name) = value.get("Ref").and_then(Value::as_str) {
                lookup(name)
            } else if let Some(text) = value.get("Fn::Sub").and_then(Value::as_str) {
                substitute(text, lookup)
            } else if let Some(parts) = value.get("Fn::GetAtt").and_then(Value::as_array) {
                lookup(&format!(
                    "{}.{}",
                    parts[0].as_str().unwrap(),
                    parts[1].as_str().unwrap()
                ))
            } else {
                panic!("cannot resolve {value}")
            }
        }
    }
}

pub fn number(value: &Value) -> u64 {
    resolve(value)
        .parse()
        .unwrap_or_else(|_| panic!("{value} is not a number"))
}

pub fn function_timeout(function: &str) -> u64 {
    number(function_property(function, "Timeout").expect("a Timeout"))
}

/// Every (action, resource) a role's inline policies allow.
pub fn role_grants(role: &str) -> BTreeSet<(String, String)> {
    let role = resource(role);
    assert_eq!(role["Type"], "AWS::IAM::Role");
    let props = &role["Properties"];
    assert!(
        props.get("ManagedPolicyArns").is_none(),
        "managed policies grant more than the contract"
    );
    let mut grants = BTreeSet::new();
    for policy in props["Policies"].as_array().expect("inline Policies") {
        let statements = &policy["PolicyDocument"]["Statement"];
        let statements = match statements {
            Value::Array(items) => items.clone(),
            single => vec![single.clone()],
        };
        for statement in statements {
            assert_eq!(statement["Effect"], "Allow", "only Allow statements");
            assert!(
                statement.get("NotAction").is_none() && statement.get("NotResource").is_none(),
                "NotAction/NotResource grant everything else"
            );
            let resources: Vec<String> = match &statement["Resource"] {
                Value::Array(items) => items.iter().map(symbol).collect(),
                single => vec![symbol(single)],
            };
            for action in strings(&statement["Action"]) {
                for res in &resources {
                    grants.insert((action.clone(), res.clone()));
                }
            }
        }
    }
    grants
}

pub fn function_role(f: &Function) -> String {
    let role = &resource(&f.resource)["Properties"]["Role"];
    let parts = role["Fn::GetAtt"]
        .as_array()
        .unwrap_or_else(|| panic!("{} must use its own role (Role: !GetAtt X.Arn)", f.name));
    parts[0].as_str().unwrap().to_string()
}

pub async fn offline_sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url("http://127.0.0.1:9")
        .credentials_provider(Credentials::new(
            "AKIDNOTREAL",
            "not-a-real-secret",
            None,
            None,
            "contract",
        ))
        .load()
        .await
}

/// Builds what the function's `main` builds, from `vars` only (no process environment, no
/// Secrets Manager: leave the secret's ARN out), and returns the names of every variable it
/// read, set or not.
pub async fn boot(
    function: &str,
    vars: &BTreeMap<String, String>,
    sdk: &SdkConfig,
) -> Result<BTreeSet<String>, BootError> {
    let env = Env::from_pairs(vars.clone());
    let wiring = Wiring::with_secrets(env.clone(), sdk.clone()).await?;
    match function {
        "submit" => {
            ApiState::new(
                wiring.api()?,
                wiring.callbacks()?,
                IdentitySource::JwtClaims,
            );
        }
        "callbacks" => wiring.callbacks().map(|_| ())?,
        "dispatch" => wiring.dispatcher().map(|_| ())?,
        "webhook" => wiring.webhook().map(|_| ())?,
        "finalize" => wiring.finalizer().map(|_| ())?,
        "sweeper" => wiring.sweeper().map(|_| ())?,
        "janitor" => wiring.janitor().map(|_| ())?,
        other => panic!("no boot path for function {other}: add it to boot()"),
    }
    Ok(env.names_read())
}

/// A value the code accepts for a required variable or a secret key.
pub fn stand_in(var: &str) -> String {
    match var {
        "WEBHOOK_SECRET" | "WEBHOOK_SECRET_PREVIOUS" => "contract-test-webhook-secret-0001".into(),
        "WEBHOOK_BASE_URL" => "https://gateway.example.com".into(),
        "VOLUME_DATACENTER" => "EU-RO-1".into(),
        other => format!("contract-{}", other.to_ascii_lowercase().replace('_', "-")),
    }
}

pub fn missing<T>(result: &Result<T, BootError>) -> Option<&str> {
    match result {
        Err(BootError::Config(ConfigError::Missing(name))) => Some(name),
        _ => None,
    }
}

pub fn invalid<T>(result: &Result<T, BootError>) -> Option<&str> {
    match result {
        Err(BootError::Config(ConfigError::Invalid { name, .. })) => Some(name),
        _ => None,
    }
}

/// The crates a package links (normal dependencies, every depth), by `cargo tree`.
pub fn linked_crates(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .current_dir(repo_root())
        .args([
            "tree",
            "--locked",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(["-p", package])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Whether a CloudWatch Logs JSON filter pattern of the shape the template uses
/// (`{ $.a = "text" && $.b > 0 }`: `=` on strings, `>` on numbers, joined by `&&`) matches the
/// JSON log line `event`.
pub fn metric_filter_matches(pattern: &str, event: &Value) -> bool {
    let inner = pattern
        .trim()
        .strip_prefix('{')
        .and_then(|p| p.strip_suffix('}'))
        .unwrap_or_else(|| panic!("not a JSON filter pattern: {pattern}"));
    inner.split("&&").all(|clause| {
        let clause = clause.trim();
        let (field, op, value) = ["=", ">"]
            .iter()
            .find_map(|op| {
                clause
                    .split_once(op)
                    .map(|(f, v)| (f.trim(), *op, v.trim()))
            })
            .unwrap_or_else(|| panic!("cannot read the clause {clause}"));
        let field = field
            .strip_prefix("$.")
            .unwrap_or_else(|| panic!("not a field selector: {field}"));
        let actual = &event[field];
        match op {
            "=" => actual.as_str() == Some(value.trim_matches('"')),
            _ => actual
                .as_f64()
                .is_some_and(|a| a > value.parse::<f64>().unwrap()),
        }
    })
}
