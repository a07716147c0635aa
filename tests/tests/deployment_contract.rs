//! The deployment contract: `template.yaml` against `deploy/contract.json` against the code.
//!
//! `deploy/contract.json` lists, per Lambda function, the environment variables it reads (by the
//! groups of `shared/core/src/config.rs` that its `Wiring` constructor uses) and the AWS calls it makes
//! on which resource. These tests hold three things together:
//!
//! - the template sets every variable a function needs and none it does not read, and grants each
//!   function's role exactly the calls in the contract (no more);
//! - the contract matches the code: the env var names in the Rust sources, the AWS SDK operations
//!   in the adapters, what each function needs to start, the routes of the axum routers, the
//!   table the store queries and the log line the alarms count;
//! - the values fit together (timeouts, leases, the queue's visibility timeout).
//!
//! The template is read with cfn-lint's own YAML decoder (it understands `!Ref`, `!Sub`, …) from
//! the repo's `.venv`, which `scripts/bootstrap` creates.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::Credentials;
use gateway::config::{ConfigError, Env};
use gateway_aws::wiring::{BootError, Wiring};
use gateway_http::api::identity::IdentitySource;
use gateway_http::api::ApiState;
use serde_json::Value;

// ------------------------------------------------------------------ loading

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(relative: &str) -> String {
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

fn template() -> &'static Value {
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

fn contract() -> &'static Value {
    static CONTRACT: OnceLock<Value> = OnceLock::new();
    CONTRACT.get_or_init(|| {
        serde_json::from_str(&read("deploy/contract.json")).expect("deploy/contract.json is JSON")
    })
}

fn strings(value: &Value) -> Vec<String> {
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

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .map(|m| m.keys().filter(|k| !k.starts_with('_')).cloned().collect())
        .unwrap_or_default()
}

// ------------------------------------------------------------------ the contract

#[derive(Debug)]
struct Function {
    name: String,
    resource: String,
    role: String,
    log_group: String,
    router: Option<String>,
    public_routes: BTreeSet<String>,
    required: BTreeSet<String>,
    optional: BTreeSet<String>,
    secret_required: BTreeSet<String>,
    secret_optional: BTreeSet<String>,
    /// (IAM action, resource) pairs.
    calls: BTreeSet<(String, String)>,
}

impl Function {
    fn reads(&self) -> BTreeSet<String> {
        let mut all = self.required.clone();
        all.extend(self.optional.iter().cloned());
        all.extend(self.secret_keys());
        all
    }

    fn secret_keys(&self) -> BTreeSet<String> {
        self.secret_required
            .union(&self.secret_optional)
            .cloned()
            .collect()
    }
}

fn functions() -> Vec<Function> {
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

fn secret_env() -> String {
    contract()["secret"]["env"].as_str().unwrap().to_string()
}

fn secret_env_read_by_code() -> bool {
    contract()["secret"]["env_read_by_code"]
        .as_bool()
        .expect("secret.env_read_by_code is a boolean")
}

fn secret_keys() -> BTreeSet<String> {
    keys(&contract()["secret"]["keys"])
}

fn local_only_env() -> BTreeSet<String> {
    keys(&contract()["local_only_env"])
}

fn implicit_env() -> BTreeSet<String> {
    keys(&contract()["implicit_env"])
}

/// Variables every value of which parses, so the boot test cannot show they are read.
fn free_form_env() -> BTreeSet<String> {
    keys(&contract()["free_form_env"])
}

// ------------------------------------------------------------------ the template

fn resources() -> &'static serde_json::Map<String, Value> {
    template()["Resources"].as_object().expect("Resources")
}

fn resource(id: &str) -> &'static Value {
    resources()
        .get(id)
        .unwrap_or_else(|| panic!("template.yaml has no resource {id}"))
}

/// A function property, falling back to `Globals.Function` as the SAM transform does.
fn function_property(function: &str, key: &str) -> Option<&'static Value> {
    resource(function)["Properties"]
        .get(key)
        .or_else(|| template()["Globals"]["Function"].get(key))
}

/// Environment variables of a function with SAM's Globals merged in (the function's win).
fn function_env(function: &str) -> BTreeMap<String, Value> {
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
fn symbol(value: &Value) -> String {
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

fn substitute(text: &str, mut lookup: impl FnMut(&str) -> String) -> String {
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
fn resolve(value: &Value) -> String {
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

fn number(value: &Value) -> u64 {
    resolve(value)
        .parse()
        .unwrap_or_else(|_| panic!("{value} is not a number"))
}

fn function_timeout(function: &str) -> u64 {
    number(function_property(function, "Timeout").expect("a Timeout"))
}

/// Every (action, resource) a role's inline policies allow.
fn role_grants(role: &str) -> BTreeSet<(String, String)> {
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

fn function_role(f: &Function) -> String {
    let role = &resource(&f.resource)["Properties"]["Role"];
    let parts = role["Fn::GetAtt"]
        .as_array()
        .unwrap_or_else(|| panic!("{} must use its own role (Role: !GetAtt X.Arn)", f.name));
    parts[0].as_str().unwrap().to_string()
}

// ------------------------------------------------------------------ reading the code

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn without_whitespace(source: &str) -> String {
    source.chars().filter(|c| !c.is_whitespace()).collect()
}

fn single_spaced(source: &str) -> String {
    source.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn is_env_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Upper-case names passed to `env.get`, `env.required`, `std::env::var`, `parsed(env, …)`,
/// `seconds(env, …)` or `flag(env, …)`, however the call is wrapped over lines.
fn env_names_in(source: &str) -> BTreeSet<String> {
    const CALLS: [&str; 7] = [
        "env.get(\"",
        "env.required(\"",
        "env::var(\"",
        "env::var_os(\"",
        "parsed(env,\"",
        "seconds(env,\"",
        "flag(env,\"",
    ];
    let compact = without_whitespace(source);
    let mut names = BTreeSet::new();
    for call in CALLS {
        for (at, _) in compact.match_indices(call) {
            let rest = &compact[at + call.len()..];
            let name = &rest[..rest.find('"').unwrap_or(0)];
            if is_env_name(name) {
                names.insert(name.to_string());
            }
        }
    }
    names
}

fn env_names_in_code() -> BTreeSet<String> {
    let mut files = Vec::new();
    for dir in ["shared", "functions", "local/runner/src"] {
        rust_sources(&repo_root().join(dir), &mut files);
    }
    files
        .iter()
        .flat_map(|f| env_names_in(&std::fs::read_to_string(f).unwrap()))
        .collect()
}

/// `client.<operation>()` calls: the AWS SDK operations an adapter makes.
fn sdk_operations_in(source: &str) -> BTreeSet<String> {
    let compact = without_whitespace(source);
    let mut ops = BTreeSet::new();
    for (at, _) in compact.match_indices("client.") {
        let rest = &compact[at + "client.".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if !name.is_empty() && rest[name.len()..].starts_with("()") {
            ops.insert(name);
        }
    }
    ops
}

/// `(METHOD, path)` of every `.route("path", get(…).post(…))` in an axum router.
fn routes_in(source: &str) -> BTreeSet<(String, String)> {
    let compact = without_whitespace(source);
    let mut routes = BTreeSet::new();
    for (at, _) in compact.match_indices(".route(\"") {
        let rest = &compact[at + ".route(\"".len()..];
        let path_end = rest.find('"').expect("route path");
        let path = &rest[..path_end];
        // The method router: from after the path to the `)` closing `.route(`.
        let args = &rest[path_end + 1..];
        let mut depth = 0i32;
        let mut methods = Vec::new();
        let mut token = String::new();
        for c in args.chars() {
            match c {
                '(' => {
                    if depth == 0
                        && ["get", "post", "put", "patch", "delete"].contains(&token.as_str())
                    {
                        methods.push(token.to_ascii_uppercase());
                    }
                    depth += 1;
                    token.clear();
                }
                ')' => {
                    if depth == 0 {
                        break;
                    }
                    depth -= 1;
                    token.clear();
                }
                c if c.is_ascii_alphanumeric() || c == '_' => token.push(c),
                _ => token.clear(),
            }
        }
        assert!(!methods.is_empty(), "no method for route {path}");
        for method in methods {
            routes.insert((method, path.to_string()));
        }
    }
    routes
}

// ------------------------------------------------------------------ booting the functions

async fn offline_sdk_config() -> SdkConfig {
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

/// Builds what the function's `main` builds, from `vars` only (no process environment).
fn boot(function: &str, vars: &BTreeMap<String, String>, sdk: &SdkConfig) -> Result<(), BootError> {
    let wiring = Wiring::new(Env::from_pairs(vars.clone()), sdk.clone())?;
    match function {
        "submit" => wiring
            .api()
            .map(|api| ApiState::new(api, IdentitySource::JwtClaims))
            .map(|_| ()),
        "dispatch" => wiring.dispatcher().map(|_| ()),
        "webhook" => wiring.webhook().map(|_| ()),
        "sweeper" => wiring.sweeper().map(|_| ()),
        other => panic!("no boot path for function {other}: add it to this test"),
    }
}

/// A value the code accepts for a required variable or a secret key.
fn stand_in(var: &str) -> String {
    match var {
        "WEBHOOK_SECRET" | "WEBHOOK_SECRET_PREVIOUS" => "contract-test-webhook-secret-0001".into(),
        "WEBHOOK_BASE_URL" => "https://gateway.example.com".into(),
        "VOLUME_DATACENTER" => "EU-RO-1".into(),
        other => format!("contract-{}", other.to_ascii_lowercase().replace('_', "-")),
    }
}

fn missing(result: &Result<(), BootError>) -> Option<&str> {
    match result {
        Err(BootError::Config(ConfigError::Missing(name))) => Some(name),
        _ => None,
    }
}

fn invalid(result: &Result<(), BootError>) -> Option<&str> {
    match result {
        Err(BootError::Config(ConfigError::Invalid { name, .. })) => Some(name),
        _ => None,
    }
}

// ------------------------------------------------------------------ (a) environment

#[test]
fn the_contract_and_the_template_describe_the_same_functions() {
    let from_contract: BTreeSet<String> = functions().into_iter().map(|f| f.resource).collect();
    let from_template: BTreeSet<String> = resources()
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::Serverless::Function")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(from_contract, from_template);
}

#[test]
fn the_template_sets_every_variable_each_function_requires() {
    let mut problems = Vec::new();
    for f in functions() {
        let env = function_env(&f.resource);
        for var in &f.required {
            if !env.contains_key(var) {
                problems.push(format!("{}: {var} is required but not set", f.name));
            }
        }
        if !f.secret_required.is_empty() && !env.contains_key(&secret_env()) {
            problems.push(format!(
                "{}: needs {:?} from the secret but {} is not set",
                f.name,
                f.secret_required,
                secret_env()
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_template_sets_no_variable_a_function_does_not_read() {
    let mut problems = Vec::new();
    for f in functions() {
        let mut allowed = f.reads();
        if !f.secret_keys().is_empty() {
            allowed.insert(secret_env());
        }
        for var in function_env(&f.resource).keys() {
            if local_only_env().contains(var) {
                problems.push(format!("{}: {var} is for the local runner only", f.name));
            } else if secret_keys().contains(var) {
                problems.push(format!(
                    "{}: {var} is a secret; it belongs in {}, not in a plain variable",
                    f.name,
                    contract()["secret"]["resource"]
                ));
            } else if !allowed.contains(var) {
                problems.push(format!("{}: sets {var}, which it does not read", f.name));
            }
        }
        if let Some(value) = function_env(&f.resource).get("S3_FORCE_PATH_STYLE") {
            problems.push(format!(
                "{}: S3_FORCE_PATH_STYLE={value} is for local S3 servers only",
                f.name
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test]
async fn every_variable_the_template_sets_is_read_when_the_function_starts() {
    // With the template's values each function starts; without each variable it fails
    // (`Missing`), or with a garbage value it fails (`Invalid`): either way the code reads it.
    let sdk = offline_sdk_config().await;
    let mut problems = Vec::new();
    for f in functions() {
        let mut vars: BTreeMap<String, String> = function_env(&f.resource)
            .iter()
            .map(|(k, v)| (k.clone(), resolve(v)))
            .collect();
        for key in f.secret_keys() {
            vars.insert(key.clone(), stand_in(&key));
        }
        if let Err(err) = boot(&f.name, &vars, &sdk) {
            problems.push(format!(
                "{}: does not start with the template's values: {err}",
                f.name
            ));
            continue;
        }
        for var in function_env(&f.resource).keys() {
            // RUST_LOG is read by tracing-subscriber, and the secret's ARN by `Wiring::from_env`
            // before the wiring is built (a Secrets Manager call): the code scan covers both.
            if implicit_env().contains(var) || *var == secret_env() {
                continue;
            }
            if free_form_env().contains(var) {
                // Still checked: without it the function must start, and the code reads it.
                assert!(f.reads().contains(var), "{}: {var} is not read", f.name);
                continue;
            }
            let mut without = vars.clone();
            without.remove(var);
            if missing(&boot(&f.name, &without, &sdk)) == Some(var.as_str()) {
                continue;
            }
            let mut garbage = vars.clone();
            garbage.insert(var.clone(), "not-a-valid-value".into());
            if invalid(&boot(&f.name, &garbage, &sdk)) == Some(var.as_str()) {
                continue;
            }
            problems.push(format!(
                "{}: the template sets {var}, but the function neither requires nor parses it",
                f.name
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test]
async fn each_function_starts_with_exactly_the_variables_the_contract_requires() {
    let sdk = offline_sdk_config().await;
    let mut problems = Vec::new();
    for f in functions() {
        let needed: BTreeSet<String> = f.required.union(&f.secret_required).cloned().collect();
        let vars: BTreeMap<String, String> =
            needed.iter().map(|v| (v.clone(), stand_in(v))).collect();
        if let Err(err) = boot(&f.name, &vars, &sdk) {
            problems.push(format!(
                "{}: does not start with its contract's required variables: {err}",
                f.name
            ));
            continue;
        }
        for var in &needed {
            let mut without = vars.clone();
            without.remove(var);
            let result = boot(&f.name, &without, &sdk);
            if missing(&result) != Some(var.as_str()) {
                problems.push(format!(
                    "{}: the contract requires {var}, but without it the function {}",
                    f.name,
                    match result {
                        Ok(()) => "still starts".to_string(),
                        Err(err) => format!("fails otherwise: {err}"),
                    }
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_contract_names_every_environment_variable_the_code_reads() {
    let in_code = env_names_in_code();
    let mut in_contract = BTreeSet::new();
    for f in functions() {
        in_contract.extend(f.reads());
    }
    let implicit = implicit_env();
    let local = local_only_env();
    let mut problems = Vec::new();
    for var in &in_code {
        if !in_contract.contains(var) && !local.contains(var) && *var != secret_env() {
            problems.push(format!(
                "the code reads {var}: add it to deploy/contract.json (a group, or local_only_env) and, if AWS needs it, to template.yaml"
            ));
        }
    }
    for var in in_contract.difference(&in_code) {
        if !implicit.contains(var) {
            problems.push(format!(
                "deploy/contract.json lists {var}, which no code reads"
            ));
        }
    }
    for var in local.difference(&in_code) {
        problems.push(format!("local_only_env lists {var}, which no code reads"));
    }
    for var in local.intersection(&in_contract) {
        problems.push(format!(
            "{var} is both local-only and read by a Lambda function"
        ));
    }
    for (var, spec) in contract()["implicit_env"].as_object().unwrap() {
        let file = spec["file"].as_str().unwrap();
        let marker = spec["marker"].as_str().unwrap();
        if !read(file).contains(marker) {
            problems.push(format!(
                "{var}: {file} no longer contains {marker}; is {var} still read?"
            ));
        }
    }
    match (secret_env_read_by_code(), in_code.contains(&secret_env())) {
        (false, true) => problems.push(format!(
            "the code now reads {}: set secret.env_read_by_code to true in deploy/contract.json",
            secret_env()
        )),
        (true, false) => problems.push(format!(
            "secret.env_read_by_code is true but no code reads {}",
            secret_env()
        )),
        _ => {}
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

// ------------------------------------------------------------------ secrets

#[test]
fn secrets_reach_the_functions_only_through_the_secret_arn() {
    let secret = contract()["secret"]["resource"].as_str().unwrap();
    let mut problems = Vec::new();
    for f in functions() {
        let env = function_env(&f.resource);
        for (var, value) in &env {
            if value.to_string().contains("{{resolve:secretsmanager") {
                problems.push(format!(
                    "{}: {var} resolves a secret into the function's configuration",
                    f.name
                ));
            }
        }
        let grants = role_grants(&f.role);
        let can_read = grants.contains(&("secretsmanager:GetSecretValue".into(), secret.into()));
        let has_arn = env.get(&secret_env()).is_some_and(|v| symbol(v) == secret);
        let needs = !f.secret_keys().is_empty();
        if needs != can_read || needs != has_arn {
            problems.push(format!(
                "{}: needs the secret: {needs}, may read it: {can_read}, is told its ARN: {has_arn}",
                f.name
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_secret_holds_every_key_the_functions_need() {
    let id = contract()["secret"]["resource"].as_str().unwrap();
    let secret = resource(id);
    assert_eq!(secret["Type"], "AWS::SecretsManager::Secret");
    let generate = &secret["Properties"]["GenerateSecretString"];
    let placeholder: serde_json::Map<String, Value> = serde_json::from_str(
        generate["SecretStringTemplate"]
            .as_str()
            .expect("SecretStringTemplate"),
    )
    .expect("SecretStringTemplate is JSON");
    for (key, value) in &placeholder {
        assert!(
            value == "REPLACE_ME" || value == "",
            "{key} must be a placeholder in the template, never a real value"
        );
    }
    let generated = generate["GenerateStringKey"]
        .as_str()
        .expect("a generated key");
    assert_eq!(generated, contract()["secret"]["generated_key"]);
    assert!(
        generate["PasswordLength"].as_u64().unwrap_or(32) >= 32,
        "webhook secrets should be long"
    );
    let mut in_secret: BTreeSet<String> = placeholder.keys().cloned().collect();
    in_secret.insert(generated.to_string());
    assert_eq!(
        in_secret,
        secret_keys(),
        "keys in the secret vs the contract"
    );
    let used: BTreeSet<String> = functions().iter().flat_map(Function::secret_keys).collect();
    assert_eq!(
        used,
        secret_keys(),
        "keys some function reads vs the contract"
    );

    // The code refuses a secret holding any other key, so the lists must agree exactly.
    let in_code = &contract()["secret"]["keys_in_code"];
    let source = without_whitespace(&read(in_code["file"].as_str().unwrap()));
    let list = format!("{}:&[&str]=&[", in_code["list"].as_str().unwrap());
    let start = source.find(&list).expect("the list of secret keys") + list.len();
    let allowed: BTreeSet<String> = source[start..start + source[start..].find("];").unwrap()]
        .split(',')
        .map(|k| k.trim_matches('"').to_string())
        .filter(|k| !k.is_empty())
        .collect();
    assert_eq!(
        allowed,
        secret_keys(),
        "keys the code accepts vs the contract"
    );
}

// ------------------------------------------------------------------ (b) permissions

#[test]
fn each_role_allows_every_call_its_function_makes() {
    let mut problems = Vec::new();
    for f in functions() {
        assert_eq!(function_role(&f), f.role, "{}'s role", f.name);
        assert!(
            resource(&f.resource)["Properties"]
                .get("Policies")
                .is_none(),
            "{}: permissions belong in its role, not in SAM Policies",
            f.name
        );
        let grants = role_grants(&f.role);
        for (action, res) in &f.calls {
            if !grants.contains(&(action.clone(), res.clone())) {
                problems.push(format!("{}: {action} on {res} is not allowed", f.name));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn each_role_allows_nothing_beyond_its_functions_calls() {
    let mut problems = Vec::new();
    for f in functions() {
        for (action, res) in role_grants(&f.role) {
            if action.contains('*') || res == "*" {
                problems.push(format!("{}: wildcard grant {action} on {res}", f.name));
            } else if !f.calls.contains(&(action.clone(), res.clone())) {
                problems.push(format!(
                    "{}: {action} on {res} is allowed but the contract lists no such call",
                    f.name
                ));
            }
        }
        assert!(
            f.calls
                .contains(&("logs:PutLogEvents".into(), f.log_group.clone())),
            "{}: may write to its own log group",
            f.name
        );
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_contract_authorises_every_aws_call_in_the_adapters() {
    let ops = &contract()["aws_sdk_operations"];
    let local = &contract()["local_only_sdk_operations"];
    let granted: BTreeSet<String> = functions()
        .iter()
        .flat_map(|f| f.calls.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>())
        .collect();
    let mut files = Vec::new();
    rust_sources(&repo_root().join("shared/aws/src/adapters"), &mut files);
    let mut problems = Vec::new();
    for file in files {
        let service = file.file_stem().unwrap().to_str().unwrap().to_string();
        let found = sdk_operations_in(&std::fs::read_to_string(&file).unwrap());
        let listed = keys(&ops[&service]);
        let local_only = keys(&local[&service]);
        for op in found.difference(&listed) {
            if !local_only.contains(op) {
                problems.push(format!(
                    "{}: calls {service} {op}; add it and its IAM actions to aws_sdk_operations",
                    file.display()
                ));
            }
        }
        for op in listed.difference(&found) {
            problems.push(format!(
                "aws_sdk_operations lists {service} {op}, which the adapter no longer calls"
            ));
        }
        for op in &listed {
            for action in strings(&ops[&service][op]) {
                if !granted.contains(&action) {
                    problems.push(format!(
                        "{service} {op} needs {action}, which no function is granted"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

// ------------------------------------------------------------------ (c) the rest of the code

#[test]
fn the_api_routes_are_the_routers_routes_and_only_the_public_ones_skip_the_jwt() {
    let api = &resource("GatewayApi")["Properties"];
    let default = api["Auth"]["DefaultAuthorizer"]
        .as_str()
        .expect("a default authorizer");
    let jwt = &api["Auth"]["Authorizers"][default]["JwtConfiguration"];
    assert_eq!(jwt["issuer"], serde_json::json!({"Ref": "JwtIssuer"}));
    assert_eq!(jwt["audience"], serde_json::json!({"Ref": "JwtAudience"}));

    let mut problems = Vec::new();
    for f in functions() {
        let events = resource(&f.resource)["Properties"]["Events"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let mut routes = BTreeSet::new();
        let mut public = BTreeSet::new();
        for (name, event) in events {
            if event["Type"] != "HttpApi" {
                continue;
            }
            let props = &event["Properties"];
            assert_eq!(
                props["ApiId"],
                serde_json::json!({"Ref": "GatewayApi"}),
                "{name}"
            );
            let route = format!(
                "{} {}",
                props["Method"].as_str().unwrap().to_ascii_uppercase(),
                props["Path"].as_str().unwrap()
            );
            match props["Auth"]["Authorizer"].as_str() {
                Some("NONE") => {
                    public.insert(route.clone());
                }
                None => {}
                Some(other) => problems.push(format!("{route}: unexpected authorizer {other}")),
            }
            routes.insert(route);
        }
        let in_code: BTreeSet<String> = match &f.router {
            Some(file) => routes_in(&read(file))
                .into_iter()
                .map(|(m, p)| format!("{m} {p}"))
                .collect(),
            None => BTreeSet::new(),
        };
        if routes != in_code {
            problems.push(format!(
                "{}: template routes {routes:?} vs router routes {in_code:?}",
                f.name
            ));
        }
        if public != f.public_routes {
            problems.push(format!(
                "{}: routes without the JWT authorizer {public:?}, contract says {:?}",
                f.name, f.public_routes
            ));
        }
    }
    // The webhook URL dispatch hands RunPod is this API's own URL (no stage: `$default`).
    let base = &function_env("DispatchFunction")["WEBHOOK_BASE_URL"];
    assert_eq!(
        base["Fn::Sub"],
        "https://${GatewayApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}"
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_table_has_the_keys_and_indexes_the_store_uses() {
    use gateway_aws::adapters::dynamodb::{OWNER_INDEX, SWEEP_INDEX};

    // The local equivalent, `create_table` in the DynamoDB adapter, is the reference.
    let source = read("shared/aws/src/adapters/dynamodb.rs");
    let body = &source[source
        .find("pub async fn create_table")
        .expect("create_table")..];
    let body = without_whitespace(&body[..body.find("#[cfg(test)]").unwrap_or(body.len())]);
    let quoted_then = |text: &str, call: &str| -> Vec<(String, String)> {
        text.match_indices(call)
            .map(|(at, _)| {
                let rest = &text[at + call.len()..];
                let name_end = rest.find('"').unwrap();
                let kind: String = rest[name_end..]
                    .split("::")
                    .nth(1)
                    .unwrap()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect();
                (rest[..name_end].to_string(), kind.to_ascii_uppercase())
            })
            .collect()
    };
    let mut sections = body.split(".index_name(");
    let table_keys = quoted_then(sections.next().unwrap(), "key(\"");
    let mut indexes = BTreeMap::new();
    for section in sections {
        let name = match &section[..section.find(')').unwrap()] {
            "OWNER_INDEX" => OWNER_INDEX,
            "SWEEP_INDEX" => SWEEP_INDEX,
            other => panic!("create_table names an index by {other}; teach this test"),
        };
        indexes.insert(name.to_string(), quoted_then(section, "key(\""));
    }
    let attributes: BTreeSet<(String, String)> =
        quoted_then(&body, "attr(\"").into_iter().collect();
    let ttl = {
        let at = body.find("TimeToLiveSpecification::builder()").unwrap();
        let rest = &body[at..];
        let start = rest.find(".attribute_name(\"").unwrap() + ".attribute_name(\"".len();
        rest[start..start + rest[start..].find('"').unwrap()].to_string()
    };

    let table = &resource("JobsTable")["Properties"];
    let key_schema = |value: &Value| -> Vec<(String, String)> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["AttributeName"].as_str().unwrap().to_string(),
                    k["KeyType"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(key_schema(&table["KeySchema"]), table_keys);
    let template_indexes: BTreeMap<String, Vec<(String, String)>> = table["GlobalSecondaryIndexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|gsi| {
            assert_eq!(gsi["Projection"]["ProjectionType"], "ALL");
            (
                gsi["IndexName"].as_str().unwrap().to_string(),
                key_schema(&gsi["KeySchema"]),
            )
        })
        .collect();
    assert_eq!(template_indexes, indexes);
    let template_attributes: BTreeSet<(String, String)> = table["AttributeDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["AttributeName"].as_str().unwrap().to_string(),
                a["AttributeType"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(template_attributes, attributes);
    assert_eq!(table["TimeToLiveSpecification"]["AttributeName"], ttl);
    assert_eq!(table["TimeToLiveSpecification"]["Enabled"], true);
    assert_eq!(table["BillingMode"], "PAY_PER_REQUEST");
    assert_eq!(
        table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"],
        true
    );
    assert_eq!(table["SSESpecification"]["SSEEnabled"], true);
}

#[test]
fn the_stuck_jobs_alarms_count_what_the_sweeper_logs() {
    let spec = &contract()["stuck_jobs_log"];
    let source = single_spaced(&read(spec["file"].as_str().unwrap()));
    let log_call = spec["log_call"].as_str().unwrap();
    assert!(
        source.contains(log_call),
        "the sweeper no longer logs `{log_call}`; update the metric filters in template.yaml"
    );
    let sweeper = functions()
        .into_iter()
        .find(|f| f.name == "sweeper")
        .unwrap();
    for field in strings(&spec["report_fields"]) {
        assert!(
            source.contains(&format!("{field} = report.{field},")),
            "the sweep log line has no {field} field"
        );
        let filter = resources()
            .values()
            .find(|r| {
                r["Type"] == "AWS::Logs::MetricFilter"
                    && symbol(&r["Properties"]["LogGroupName"]) == sweeper.log_group
                    && r["Properties"]["FilterPattern"].as_str().is_some_and(|p| {
                        p.contains("\"sweep done\"") && p.contains(&format!("$.{field} > 0"))
                    })
            })
            .unwrap_or_else(|| panic!("no metric filter counts sweeps with {field} > 0"));
        let metric = &filter["Properties"]["MetricTransformations"][0];
        let alarmed = resources().values().any(|r| {
            r["Type"] == "AWS::CloudWatch::Alarm"
                && r["Properties"]["MetricName"] == metric["MetricName"]
                && r["Properties"]["Namespace"] == metric["MetricNamespace"]
        });
        assert!(alarmed, "no alarm on {}", metric["MetricName"]);
    }
}

// ------------------------------------------------------------------ values that must fit

#[test]
fn timeouts_leases_and_the_queue_fit_together() {
    let settings = |function: &str, var: &str, default: u64| -> u64 {
        function_env(function)
            .get(var)
            .map(number)
            .unwrap_or(default)
    };
    let submit = function_timeout("SubmitFunction");
    let webhook = function_timeout("WebhookFunction");
    let dispatch = function_timeout("DispatchFunction");
    let sweeper = function_timeout("SweeperFunction");
    // API Gateway's HTTP API gives up after 30 s, whatever the function does.
    assert!(submit <= 29 && webhook <= 29, "HTTP API functions ≤ 29 s");
    // Lambda's SQS guidance: visibility timeout at least 6x the function timeout.
    let queue = &resource("JobsQueue")["Properties"];
    assert!(number(&queue["VisibilityTimeout"]) >= 6 * dispatch);
    assert_eq!(number(&queue["RedrivePolicy"]["maxReceiveCount"]), 5);
    assert_eq!(
        symbol(&queue["RedrivePolicy"]["deadLetterTargetArn"]),
        "JobsDeadLetterQueue"
    );
    // A lease must outlive the invocation holding it, or a second one could take the job.
    for f in [
        "SubmitFunction",
        "WebhookFunction",
        "DispatchFunction",
        "SweeperFunction",
    ] {
        let lease = settings(f, "DISPATCH_LEASE_SECS", 60);
        assert!(
            lease > dispatch,
            "{f}: dispatch lease {lease} ≤ {dispatch} s"
        );
        let lease = settings(f, "FINALIZE_LEASE_SECS", 120);
        assert!(
            lease > webhook.max(sweeper),
            "{f}: finalize lease {lease} s"
        );
        let runpod = settings(f, "RUNPOD_REQUEST_TIMEOUT_SECS", 10);
        assert!(
            runpod < submit.min(webhook),
            "{f}: RunPod timeout {runpod} s"
        );
        // A RunPod call with its retries ends within the budget: under the functions' timeouts.
        let budget = settings(f, "RUNPOD_RETRY_BUDGET_SECS", 15);
        assert!(
            budget >= runpod && budget < submit.min(webhook),
            "{f}: RunPod retry budget {budget} s"
        );
    }
    // The sweeper finishes before the next tick.
    let events = &resource("SweeperFunction")["Properties"]["Events"];
    let schedule = events
        .as_object()
        .unwrap()
        .values()
        .find(|e| e["Type"] == "ScheduleV2")
        .expect("a ScheduleV2 event");
    assert_eq!(
        schedule["Properties"]["ScheduleExpression"],
        "rate(1 minute)"
    );
    assert!(sweeper < 60);
    // Dispatch reports partial batch failures (the handler returns SqsBatchResponse).
    let sqs = resource("DispatchFunction")["Properties"]["Events"]
        .as_object()
        .unwrap()
        .values()
        .find(|e| e["Type"] == "SQS")
        .expect("an SQS event");
    assert_eq!(symbol(&sqs["Properties"]["Queue"]), "JobsQueue");
    assert_eq!(
        sqs["Properties"]["FunctionResponseTypes"],
        serde_json::json!(["ReportBatchItemFailures"])
    );
    assert!(sqs["Properties"]["ScalingConfig"]["MaximumConcurrency"].is_object());
}

#[test]
fn each_function_builds_its_own_binary_for_arm64_al2023() {
    for f in functions() {
        let res = resource(&f.resource);
        assert_eq!(res["Metadata"]["BuildMethod"], "rust-cargolambda");
        assert_eq!(
            res["Metadata"]["BuildProperties"]["Binary"],
            f.name.as_str()
        );
        let manifest = read(&format!("functions/{}/Cargo.toml", f.name));
        assert!(
            manifest.contains(&format!("name = \"{}\"", f.name)),
            "functions/{0} builds a binary named {0}",
            f.name
        );
        let prop = |key: &str| function_property(&f.resource, key).cloned();
        assert_eq!(prop("Runtime"), Some("provided.al2023".into()));
        assert_eq!(prop("Architectures"), Some(serde_json::json!(["arm64"])));
        assert_eq!(prop("Handler"), Some("bootstrap".into()));
        assert_eq!(prop("CodeUri"), Some(".".into()));
        let memory = number(&prop("MemorySize").expect("MemorySize"));
        assert!((256..=512).contains(&memory), "{}: {memory} MB", f.name);
        let logging = prop("LoggingConfig").expect("LoggingConfig");
        assert_eq!(logging["LogFormat"], "JSON");
        assert_eq!(symbol(&logging["LogGroup"]), f.log_group);
    }
}

#[test]
fn the_code_scanners_see_calls_however_they_are_wrapped() {
    // What the scanners above rely on, so a formatting change cannot make them go quiet.
    let source = r#"
        let a = env.required("ALPHA_VAR")?;
        let b = env
            .get("BETA_VAR")
            .unwrap_or_default();
        let c = seconds(
            env,
            "GAMMA_SECS",
            10,
        )?;
        let d = std::env::var("DELTA").ok();
        let e = ConfigError::Missing("NOT_A_READ");
        self.client
            .put_object()
            .bucket(b);
        Router::new()
            .route("/things/{id}", get(|| async { Json(json!({})) }).post(create))
            .route(
                "/other",
                delete(remove),
            )
    "#;
    let names: Vec<String> = env_names_in(source).into_iter().collect();
    assert_eq!(names, ["ALPHA_VAR", "BETA_VAR", "DELTA", "GAMMA_SECS"]);
    assert_eq!(
        sdk_operations_in(source).into_iter().collect::<Vec<_>>(),
        ["put_object"]
    );
    let routes: Vec<(String, String)> = routes_in(source).into_iter().collect();
    assert_eq!(
        routes,
        [
            ("DELETE".to_string(), "/other".to_string()),
            ("GET".to_string(), "/things/{id}".to_string()),
            ("POST".to_string(), "/things/{id}".to_string()),
        ]
    );
}

#[test]
fn the_local_runner_consumes_the_queue_as_the_templates_event_source_does() {
    let sqs = resource("DispatchFunction")["Properties"]["Events"]
        .as_object()
        .unwrap()
        .values()
        .find(|e| e["Type"] == "SQS")
        .expect("an SQS event")["Properties"]
        .clone();
    // `number` reads a parameter reference as the parameter's default.
    let default_of = number;
    let runner = local_runner::RunnerOptions::default();
    assert_eq!(
        default_of(&sqs["ScalingConfig"]["MaximumConcurrency"]),
        runner.dispatch_concurrency as u64,
        "batches in flight: the template's MaximumConcurrency default vs the local runner's"
    );
    assert_eq!(
        default_of(&sqs["BatchSize"]),
        u64::from(runner.dispatch_batch_size),
        "messages per batch: the template's BatchSize default vs the local runner's"
    );
}

/// The crates a package links (normal dependencies, every depth), by `cargo tree`.
fn linked_crates(package: &str) -> BTreeSet<String> {
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

#[test]
fn the_core_links_no_aws_lambda_or_http_crate() {
    let linked = linked_crates("gateway-core");
    let forbidden: Vec<&String> = linked
        .iter()
        .filter(|c| {
            c.starts_with("aws-")
                || c.starts_with("lambda_")
                || ["aws_lambda_events", "axum", "reqwest", "hyper", "tokio"].contains(&c.as_str())
        })
        .collect();
    assert!(forbidden.is_empty(), "gateway-core links {forbidden:?}");
}

#[test]
fn each_function_links_only_the_clients_and_frameworks_it_uses() {
    // What each function does not use, and must therefore not link.
    let not_used: [(&str, &[&str]); 4] = [
        ("submit", &[]),
        ("webhook", &["aws-sdk-sqs", "image", "humantime"]),
        ("dispatch", &["aws-sdk-sqs", "axum", "lambda_http", "image"]),
        (
            "sweeper",
            &["aws_lambda_events", "axum", "lambda_http", "image"],
        ),
    ];
    let mut wrong = Vec::new();
    for (function, unused) in not_used {
        let linked = linked_crates(function);
        for name in unused {
            if linked.contains(*name) {
                wrong.push(format!("{function} links {name}, which it does not use"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
