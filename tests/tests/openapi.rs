//! The published contract: `/openapi.json` is an OpenAPI 3.1 document, the committed copy at
//! `docs/openapi.json` is the one the code generates, it names exactly the routes served, and
//! the running API keeps to it when schemathesis (a client nobody here wrote) throws requests
//! at it.
use std::collections::BTreeSet;
use std::process::Stdio;

use gateway_http::api::openapi::document_json;
use gateway_tests::{venv_python, Stack, StatusCode, ALICE};
use serde_json::Value;
use testkit::local_aws::repo_root;

fn committed_path() -> std::path::PathBuf {
    repo_root().join("docs/openapi.json")
}

/// Every operation of the document, as `METHOD /path`.
fn documented_routes() -> BTreeSet<String> {
    let doc: Value = serde_json::from_str(&document_json()).unwrap();
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| format!("{} {path}", method.to_uppercase()))
        })
        .collect()
}

#[test]
fn the_committed_document_is_the_one_the_code_generates() {
    let generated = document_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(committed_path(), &generated).unwrap();
    }
    let committed = std::fs::read_to_string(committed_path()).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is not what the code generates; run \
         UPDATE_OPENAPI=1 cargo test -p gateway-tests --test openapi, and review the diff"
    );
}

#[test]
fn the_document_names_exactly_the_routes_the_routers_serve() {
    let documented = documented_routes();
    let served: BTreeSet<String> = gateway_http::api::ROUTES
        .iter()
        .chain(std::iter::once(&gateway_http::webhook::ROUTE))
        .map(|(method, path)| format!("{method} {path}"))
        .collect();
    assert_eq!(documented, served);
}

#[test]
fn the_readmes_api_table_names_the_documents_routes() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let table = readme
        .split("\n## API\n")
        .nth(1)
        .and_then(|api| api.split("\n## ").next())
        .expect("the README's API section");
    let listed: BTreeSet<String> = table
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|cell| cell.split('`').next())
        .map(|route| route.split('?').next().unwrap_or(route).to_string())
        .collect();
    let documented = documented_routes();
    assert_eq!(listed, documented);
}

#[test]
fn the_document_is_valid_openapi_3_1() {
    let doc: Value = serde_json::from_str(&document_json()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let output = std::process::Command::new(venv_python())
        .args(["-m", "openapi_spec_validator", "--schema", "3.1.0"])
        .arg(committed_path())
        .stdin(Stdio::null())
        .output()
        .expect("run openapi-spec-validator");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn the_api_serves_the_document() {
    let stack = Stack::start().await;
    let response = stack
        .http
        .get(stack.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), document_json());
    stack.stop().await;
}

/// Examples per operation and phase: enough to reach every documented status and shape, and a
/// bounded run on two cores. `SCHEMATHESIS_EXAMPLES` raises it for a long run.
fn examples() -> String {
    std::env::var("SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "25".into())
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_answer_off_the_document() {
    let stack = Stack::start().await;
    let st = venv_python().with_file_name("st");
    // Its caches go to a directory of its own, never into the repository.
    let workdir = std::env::temp_dir().join("gateway-schemathesis");
    std::fs::create_dir_all(&workdir).unwrap();
    let output = tokio::process::Command::new(&st)
        .current_dir(&workdir)
        .arg("run")
        .arg(stack.url("/openapi.json"))
        .args(["--url", &stack.url("")])
        .args(["--header", &format!("Authorization: Bearer {ALICE}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,ignored_auth",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", &examples()])
        .args(["--seed", "7", "--workers", "1", "--no-color"])
        // Per request, never the run: a slow machine takes longer, not a different verdict.
        .args(["--request-timeout", "60"])
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run schemathesis");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{report}");
    // What was tried, in the test's output (`--nocapture`): a run that tested nothing passes too.
    eprintln!("{report}");
    assert!(
        report.contains("test cases") || report.contains("Test cases"),
        "{report}"
    );
    stack.stop().await;
}
