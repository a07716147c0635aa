//! The deployment contract: `template.yaml` against `deploy/contract.json` against what the code
//! publishes as data. Nothing here reads source text, so a rename cannot quietly change what is
//! checked:
//!
//! - the variables each function reads are recorded while it starts (`Env::names_read`), with
//!   the template's values;
//! - each adapter declares its AWS operations (`AWS_OPERATIONS`), and the wiring's clients
//!   refuse any other, so the declarations are what the code can call;
//! - the routers are built from route tables, the store's table from a schema, and the
//!   sweeper's log line is captured from a real sweep, in the JSON format the functions log.
//!
//! The template is read with cfn-lint's own YAML decoder (it understands `!Ref`, `!Sub`, …) from
//! the repo's `.venv`, which `scripts/bootstrap` creates. The machinery lives in
//! `gateway_tests::deployment`.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use gateway::config::{dev_tokens, Env, LocalRunnerConfig};
use gateway_aws::adapters::{dynamodb, s3, secrets, signing_keys, sqs};
use gateway_tests::deployment::*;
use serde_json::Value;

// ------------------------------------------------------------------ environment

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
        for secret in f.secrets_needed() {
            if !env.contains_key(&secret.env) {
                problems.push(format!(
                    "{}: needs {:?} from {} but {} is not set",
                    f.name, secret.keys, secret.resource, secret.env
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_template_sets_no_variable_a_function_does_not_read() {
    let mut problems = Vec::new();
    for f in functions() {
        let mut allowed = f.reads();
        allowed.extend(f.secrets_needed().into_iter().map(|s| s.env));
        for var in function_env(&f.resource).keys() {
            if local_only_env().contains(var) {
                problems.push(format!("{}: {var} is for the local runner only", f.name));
            } else if secret_keys().contains(var) {
                problems.push(format!(
                    "{}: {var} is a secret; it belongs in a Secrets Manager secret, not in a plain variable",
                    f.name
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
async fn each_function_reads_exactly_the_variables_the_contract_lists() {
    // With the template's values (and the secret's keys), every read happens: nothing is
    // missing, so no start-up stops early.
    let sdk = offline_sdk_config().await;
    let mut problems = Vec::new();
    for f in functions() {
        let mut vars: BTreeMap<String, String> = function_env(&f.resource)
            .iter()
            .filter(|(k, _)| !secret_envs().contains(*k))
            .map(|(k, v)| (k.clone(), resolve(v)))
            .collect();
        for key in f.secret_keys() {
            vars.insert(key.clone(), stand_in(&key));
        }
        let read = match boot(&f.name, &vars, &sdk).await {
            Ok(read) => read,
            Err(err) => {
                problems.push(format!(
                    "{}: does not start with the template's values: {err}",
                    f.name
                ));
                continue;
            }
        };
        let mut listed = f.reads();
        // Every function looks for each secret's ARN, to fetch the ones it is told about.
        listed.extend(secret_envs());
        for var in read.difference(&listed) {
            problems.push(format!(
                "{}: reads {var}; add it to deploy/contract.json (a group of the function) and, if AWS must set it, to template.yaml",
                f.name
            ));
        }
        for var in listed.difference(&read) {
            problems.push(format!(
                "{}: deploy/contract.json lists {var}, which the function does not read",
                f.name
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_local_runner_reads_exactly_its_local_only_variables() {
    let env = Env::from_pairs(std::iter::empty::<(String, String)>());
    LocalRunnerConfig::from_env(&env).unwrap();
    dev_tokens(&env);
    assert_eq!(env.names_read(), local_only_env());
    let lambda: BTreeSet<String> = functions().iter().flat_map(|f| f.reads()).collect();
    let local = local_only_env();
    let both: Vec<&String> = local.intersection(&lambda).collect();
    assert!(
        both.is_empty(),
        "local-only and read by a function: {both:?}"
    );
}

#[tokio::test]
async fn each_function_starts_with_exactly_the_variables_the_contract_requires() {
    let sdk = offline_sdk_config().await;
    let mut problems = Vec::new();
    for f in functions() {
        let needed: BTreeSet<String> = f.required.union(&f.secret_required).cloned().collect();
        let vars: BTreeMap<String, String> =
            needed.iter().map(|v| (v.clone(), stand_in(v))).collect();
        if let Err(err) = boot(&f.name, &vars, &sdk).await {
            problems.push(format!(
                "{}: does not start with its contract's required variables: {err}",
                f.name
            ));
            continue;
        }
        for var in &needed {
            let mut without = vars.clone();
            without.remove(var);
            let result = boot(&f.name, &without, &sdk).await;
            if missing(&result) != Some(var.as_str()) {
                problems.push(format!(
                    "{}: the contract requires {var}, but without it the function {}",
                    f.name,
                    match result {
                        Ok(_) => "still starts".to_string(),
                        Err(err) => format!("fails otherwise: {err}"),
                    }
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

// ------------------------------------------------------------------ secrets

#[test]
fn each_function_may_read_exactly_the_secrets_whose_keys_it_uses() {
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
        let needed: BTreeSet<String> = f.secrets_needed().into_iter().map(|s| s.resource).collect();
        for secret in secrets() {
            let needs = needed.contains(&secret.resource);
            let can_read = grants.contains(&(
                "secretsmanager:GetSecretValue".into(),
                secret.resource.clone(),
            ));
            let has_arn = env
                .get(&secret.env)
                .is_some_and(|v| symbol(v) == secret.resource);
            if needs != can_read || needs != has_arn {
                problems.push(format!(
                    "{}: needs {}: {needs}, may read it: {can_read}, is told its ARN: {has_arn}",
                    f.name, secret.resource
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_public_api_function_can_read_no_secret() {
    let submit = functions()
        .into_iter()
        .find(|f| f.name == "submit")
        .unwrap();
    assert!(
        submit.secret_keys().is_empty(),
        "{:?}",
        submit.secret_keys()
    );
    let secret_calls: Vec<_> = role_grants(&submit.role)
        .into_iter()
        .filter(|(action, _)| action.starts_with("secretsmanager:"))
        .collect();
    assert!(secret_calls.is_empty(), "{secret_calls:?}");
    let env = function_env(&submit.resource);
    let told: Vec<String> = secret_envs()
        .into_iter()
        .filter(|var| env.contains_key(var))
        .collect();
    assert!(told.is_empty(), "submit is told of {told:?}");
}

#[test]
fn each_secret_holds_exactly_the_keys_the_contract_and_the_code_give_it() {
    let mut used = BTreeSet::new();
    for f in functions() {
        used.extend(f.secret_keys());
    }
    assert_eq!(
        used,
        secret_keys(),
        "keys some function reads vs the contract"
    );
    for secret in secrets() {
        let resource = resource(&secret.resource);
        assert_eq!(resource["Type"], "AWS::SecretsManager::Secret");
        let props = &resource["Properties"];
        let generate = &props["GenerateSecretString"];
        let text = props["SecretString"]
            .as_str()
            .or_else(|| generate["SecretStringTemplate"].as_str())
            .unwrap_or_else(|| panic!("{}: SecretString or a template", secret.resource));
        let placeholder: serde_json::Map<String, Value> =
            serde_json::from_str(text).expect("the secret's initial value is JSON");
        for (key, value) in &placeholder {
            assert!(
                value == "REPLACE_ME" || value == "",
                "{}: {key} must be a placeholder in the template, never a real value",
                secret.resource
            );
        }
        let generated = generate["GenerateStringKey"].as_str().map(String::from);
        assert_eq!(generated, secret.generated_key, "{}", secret.resource);
        if generated.is_some() {
            assert!(
                generate["PasswordLength"].as_u64().unwrap_or(32) >= 32,
                "generated secrets should be long"
            );
        }
        let mut in_secret: BTreeSet<String> = placeholder.keys().cloned().collect();
        in_secret.extend(generated);
        assert_eq!(
            in_secret, secret.keys,
            "{}: template vs contract",
            secret.resource
        );

        // The code refuses a secret holding any other key, so the lists must agree exactly.
        let source = gateway::config::SECRET_SOURCES
            .iter()
            .find(|s| s.arn_var == secret.env)
            .unwrap_or_else(|| panic!("the code reads no secret from {}", secret.env));
        let allowed: BTreeSet<String> = source.keys.iter().map(|k| k.to_string()).collect();
        assert_eq!(
            allowed, secret.keys,
            "{}: code vs contract",
            secret.resource
        );
    }
    assert_eq!(
        gateway::config::SECRET_SOURCES.len(),
        secrets().len(),
        "secrets the code knows vs the contract"
    );
}

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
            let unscoped = contract()["unscoped_actions"].get(&action).is_some();
            if action.contains('*') || (res == "*" && !unscoped) {
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
fn every_aws_operation_an_adapter_declares_is_in_the_contract_and_granted() {
    let ops = &contract()["aws_sdk_operations"];
    let granted: BTreeSet<String> = functions()
        .iter()
        .flat_map(|f| f.calls.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>())
        .collect();
    let declared: [(&str, &[&str]); 5] = [
        ("dynamodb", dynamodb::AWS_OPERATIONS),
        ("s3", s3::AWS_OPERATIONS),
        ("sqs", sqs::AWS_OPERATIONS),
        ("secrets", secrets::AWS_OPERATIONS),
        ("signing_keys", signing_keys::AWS_OPERATIONS),
    ];
    let mut problems = Vec::new();
    for (adapter, operations) in declared {
        let in_code: BTreeSet<String> = operations.iter().map(|o| o.to_string()).collect();
        let listed = keys(&ops[adapter]);
        for op in in_code.difference(&listed) {
            problems.push(format!(
                "the {adapter} adapter declares {op}; add it and its IAM actions to aws_sdk_operations"
            ));
        }
        for op in listed.difference(&in_code) {
            problems.push(format!(
                "aws_sdk_operations lists {adapter} {op}, which the adapter does not declare"
            ));
        }
        for op in &listed {
            for action in strings(&ops[adapter][op]) {
                if !granted.contains(&action) {
                    problems.push(format!(
                        "{adapter} {op} needs {action}, which no function is granted"
                    ));
                }
            }
        }
    }
    let local = keys(&contract()["local_only_sdk_operations"]["dynamodb"]);
    let in_code: BTreeSet<String> = dynamodb::LOCAL_OPERATIONS
        .iter()
        .map(|o| o.to_string())
        .collect();
    if local != in_code {
        problems.push(format!(
            "local-only DynamoDB operations: contract {local:?}, code {in_code:?}"
        ));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

// ------------------------------------------------------------------ routes, table, logs

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
        let table: Vec<(&str, &str)> = match f.router.as_deref() {
            Some("api") => gateway_http::api::ROUTES.to_vec(),
            Some("webhook") => vec![gateway_http::webhook::ROUTE],
            Some(other) => panic!("{}: no router named {other}", f.name),
            None => Vec::new(),
        };
        let in_code: BTreeSet<String> = table
            .iter()
            .map(|(method, path)| format!("{method} {path}"))
            .collect();
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
fn the_webhook_route_has_a_throttle_of_its_own() {
    let api = &resource("GatewayApi")["Properties"];
    let (method, path) = gateway_http::webhook::ROUTE;
    let route = &api["RouteSettings"][format!("{method} {path}")];
    let limit = |settings: &Value, key: &str| -> u64 {
        settings
            .get(key)
            .map(number)
            .unwrap_or_else(|| panic!("no {key} in {settings}"))
    };
    // Its own limits, so forged floods and client bursts never share a bucket.
    assert!(limit(route, "ThrottlingRateLimit") > 0);
    assert!(limit(route, "ThrottlingBurstLimit") >= limit(route, "ThrottlingRateLimit"));
    let default = &api["DefaultRouteSettings"];
    assert!(
        limit(default, "ThrottlingRateLimit") > 0,
        "client routes are throttled too"
    );
    // No client route has settings of its own that could bypass the default.
    let routes = api["RouteSettings"].as_object().unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
}

#[test]
fn the_table_has_the_keys_and_indexes_the_store_uses() {
    let schema = &dynamodb::TABLE;
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
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(key_schema(&table["KeySchema"]), [pair(schema.key, "HASH")]);
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
    let indexes: BTreeMap<String, Vec<(String, String)>> = schema
        .indexes
        .iter()
        .map(|(name, partition, sort)| {
            (
                name.to_string(),
                vec![pair(partition, "HASH"), pair(sort, "RANGE")],
            )
        })
        .collect();
    assert_eq!(template_indexes, indexes);
    let template_attributes: BTreeSet<(String, String)> = table["AttributeDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            pair(
                a["AttributeName"].as_str().unwrap(),
                a["AttributeType"].as_str().unwrap(),
            )
        })
        .collect();
    let attributes: BTreeSet<(String, String)> =
        schema.attributes.iter().map(|(n, t)| pair(n, t)).collect();
    assert_eq!(template_attributes, attributes);
    assert_eq!(
        table["TimeToLiveSpecification"]["AttributeName"],
        schema.ttl
    );
    assert_eq!(table["TimeToLiveSpecification"]["Enabled"], true);
    assert_eq!(table["BillingMode"], "PAY_PER_REQUEST");
    assert_eq!(
        table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"],
        true
    );
    assert_eq!(table["SSESpecification"]["SSEEnabled"], true);
}

/// The sweeper's log lines from one sweep over the test kit, formatted as the functions log
/// them (JSON, fields at the top level).
fn sweep_log(kit: &testkit::Kit) -> Vec<Value> {
    let lines = gateway_tests::LogLines::default();
    let subscriber = lines.subscriber();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(kit.sweeper().sweep()).unwrap();
    });
    lines.parsed()
}

/// A kit with one job past its deadline at RunPod; `stop_fails`: its run's stop cannot be
/// queued, so the sweep counts an error instead of a timeout.
fn overdue(stop_fails: bool) -> testkit::Kit {
    let kit = testkit::Kit::new();
    let job = kit.queued_job("alice");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime
        .block_on(kit.dispatcher().dispatch(&job.id))
        .unwrap();
    if stop_fails {
        kit.stops.fail_next(1);
    }
    kit.clock
        .advance(kit.settings.job_deadline + Duration::from_secs(1));
    kit
}

#[test]
fn the_stuck_jobs_alarms_count_what_the_sweeper_logs() {
    let spec = &contract()["stuck_jobs_log"];
    let message = spec["message"].as_str().unwrap();
    let sweeper = functions()
        .into_iter()
        .find(|f| f.name == "sweeper")
        .unwrap();
    let sweep_line = |kit: &testkit::Kit| -> Value {
        sweep_log(kit)
            .into_iter()
            .find(|line| line["message"] == message)
            .unwrap_or_else(|| panic!("a sweep logs no {message:?} line"))
    };
    let timed_out = sweep_line(&overdue(false));
    let errored = sweep_line(&overdue(true));
    for (field, counted, quiet) in [
        ("timed_out", &timed_out, &errored),
        ("errors", &errored, &timed_out),
    ] {
        assert!(
            strings(&spec["report_fields"]).contains(&field.to_string()),
            "the contract's report_fields lack {field}"
        );
        let filter = resources()
            .values()
            .find(|r| {
                r["Type"] == "AWS::Logs::MetricFilter"
                    && symbol(&r["Properties"]["LogGroupName"]) == sweeper.log_group
                    && r["Properties"]["FilterPattern"]
                        .as_str()
                        .is_some_and(|p| p.contains(&format!("$.{field} ")))
            })
            .unwrap_or_else(|| panic!("no metric filter on the sweeper's {field}"));
        let pattern = filter["Properties"]["FilterPattern"].as_str().unwrap();
        assert!(
            metric_filter_matches(pattern, counted),
            "{pattern} does not count the sweep line {counted}"
        );
        assert!(
            !metric_filter_matches(pattern, quiet),
            "{pattern} counts a sweep without {field}: {quiet}"
        );
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
    for (queue, dlq) in [
        ("JobsQueue", "JobsDeadLetterQueue"),
        ("StopQueue", "StopDeadLetterQueue"),
    ] {
        let props = &resource(queue)["Properties"];
        assert!(
            number(&props["VisibilityTimeout"]) >= 6 * dispatch,
            "{queue}"
        );
        assert_eq!(number(&props["RedrivePolicy"]["maxReceiveCount"]), 5);
        assert_eq!(symbol(&props["RedrivePolicy"]["deadLetterTargetArn"]), dlq);
    }
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
        // Dispatch must be able to start /run at all: its reserve fits in its timeout.
        let reserve = settings(f, "DISPATCH_RUN_RESERVE_SECS", 20);
        assert!(
            reserve < dispatch,
            "{f}: /run reserve {reserve} ≥ {dispatch} s"
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
    // Dispatch reports partial batch failures on both queues (the handler returns
    // SqsBatchResponse).
    for (event, queue) in [("Jobs", "JobsQueue"), ("Stops", "StopQueue")] {
        let sqs = &resource("DispatchFunction")["Properties"]["Events"][event];
        assert_eq!(sqs["Type"], "SQS", "{event}");
        assert_eq!(symbol(&sqs["Properties"]["Queue"]), queue);
        assert_eq!(
            sqs["Properties"]["FunctionResponseTypes"],
            serde_json::json!(["ReportBatchItemFailures"])
        );
    }
    let jobs = &resource("DispatchFunction")["Properties"]["Events"]["Jobs"];
    assert!(jobs["Properties"]["ScalingConfig"]["MaximumConcurrency"].is_object());
    // The callbacks function: the same SQS guidance, and partial batch failures.
    let callbacks = function_timeout("CallbacksFunction");
    let queue = &resource("CallbackQueue")["Properties"];
    assert!(number(&queue["VisibilityTimeout"]) >= 6 * callbacks);
    assert_eq!(
        symbol(&queue["RedrivePolicy"]["deadLetterTargetArn"]),
        "CallbackDeadLetterQueue"
    );
    let source = &resource("CallbacksFunction")["Properties"]["Events"]["Callbacks"];
    assert_eq!(symbol(&source["Properties"]["Queue"]), "CallbackQueue");
    assert_eq!(
        source["Properties"]["FunctionResponseTypes"],
        serde_json::json!(["ReportBatchItemFailures"])
    );
}

#[test]
fn cancels_stay_under_runpods_limit_of_100_per_10_seconds() {
    // Every stop goes through the stop queue to its one consumer (`Wiring::stopper`, only in
    // the dispatch function's consumer), which paces its own cancels.
    let consumers: Vec<&String> = resources()
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::Serverless::Function")
        .filter(|(_, r)| {
            r["Properties"]["Events"].as_object().is_some_and(|events| {
                events
                    .values()
                    .any(|e| e["Type"] == "SQS" && symbol(&e["Properties"]["Queue"]) == "StopQueue")
            })
        })
        .map(|(id, _)| id)
        .collect();
    assert_eq!(consumers, vec!["DispatchFunction"]);
    let stops = &resource("DispatchFunction")["Properties"]["Events"]["Stops"]["Properties"];
    let in_flight = number(&stops["ScalingConfig"]["MaximumConcurrency"]);
    let per_sec = function_env("DispatchFunction")
        .get("RUNPOD_CANCELS_PER_SEC")
        .map(number)
        .unwrap_or(gateway::config::RunPodConfig::DEFAULT_CANCELS_PER_SEC as u64);
    assert!(
        in_flight * per_sec <= 10,
        "{in_flight} consumers x {per_sec}/s exceeds RunPod's 10 cancels/s"
    );
}

#[test]
fn each_function_builds_its_own_binary_for_arm64_al2023() {
    // scripts/build-lambdas builds what `sam build` would, every function of the template.
    let build = read("scripts/build-lambdas");
    for f in functions() {
        assert!(
            build.contains(&format!("-p {} ", f.name))
                || build.contains(&format!("-p {}\n", f.name)),
            "scripts/build-lambdas does not build {}",
            f.name
        );
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
        // Lambda's range; the sizes themselves are chosen from scripts/bench, figure 7.
        assert!((128..=10_240).contains(&memory), "{}: {memory} MB", f.name);
        let logging = prop("LoggingConfig").expect("LoggingConfig");
        assert_eq!(logging["LogFormat"], "JSON");
        assert_eq!(symbol(&logging["LogGroup"]), f.log_group);
    }
}

#[test]
fn the_local_runner_consumes_the_queue_as_the_templates_event_source_does() {
    let sqs = resource("DispatchFunction")["Properties"]["Events"]["Jobs"]["Properties"].clone();
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

// ------------------------------------------------------------------ what each binary links

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
    let not_used: [(&str, &[&str]); 7] = [
        // The public function holds no secret: it cannot even ask for one.
        ("submit", &["aws-sdk-secretsmanager"]),
        ("webhook", &["image", "humantime", "aws-sdk-kms"]),
        // Dispatch reads the headers of photos it fetches from a client's URL.
        ("dispatch", &["axum", "lambda_http", "aws-sdk-kms"]),
        ("finalize", &["axum", "lambda_http", "image", "aws-sdk-kms"]),
        // The sweeper consumes the poll queue's batches besides its schedule.
        ("sweeper", &["axum", "lambda_http", "image", "aws-sdk-kms"]),
        (
            "janitor",
            &[
                "aws_lambda_events",
                "axum",
                "lambda_http",
                "image",
                "aws-sdk-kms",
            ],
        ),
        // The owners' secrets are sealed by KMS; the gateway's own credentials are not its.
        (
            "callbacks",
            &["axum", "lambda_http", "image", "aws-sdk-secretsmanager"],
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
