//! One job followed through the local runner's logs by its trace id: from the API request
//! (its `X-Amzn-Trace-Id`), over the dispatch queue (X-Ray's `AWSTraceHeader` on the message),
//! into RunPod's run (its input), and back through the webhook and finalize. The logs are the
//! process's, so this file holds one test.
use std::time::Duration;

use gateway_tests::{jpeg, restore_request, LogLines, Stack, StackOptions, StatusCode, ALICE};
use serde_json::{json, Value};

/// Generous: the suite runs on slow, shared machines; each wait ends as soon as it can.
const TIMEOUT: Duration = Duration::from_secs(120);
const TRACE: &str = "1-6745a1b2-0123456789abcdef01234567";

/// Where a line says which job and trace it is about: its own fields, or its spans'.
fn field<'a>(line: &'a Value, name: &str) -> Option<&'a str> {
    line[name].as_str().or_else(|| {
        line["spans"]
            .as_array()?
            .iter()
            .rev()
            .find_map(|span| span[name].as_str().filter(|v| !v.is_empty()))
    })
}

#[tokio::test]
async fn one_jobs_trace_id_runs_through_every_function_that_touches_it() {
    let lines = LogLines::default();
    tracing::subscriber::set_global_default(lines.subscriber()).expect("the test's log subscriber");
    let stack = Stack::start_with(StackOptions::default()).await;

    let response = reqwest::Client::new()
        .post(stack.url("/jobs"))
        .bearer_auth(ALICE)
        .header(
            "x-amzn-trace-id",
            format!("Root={TRACE};Parent=53995c3f42cd8ad8;Sampled=1"),
        )
        .json(&restore_request(&jpeg(200, 150), json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job_id = response.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // RunPod's run carries it in its input.
    let run = stack.runpod_job(&job_id).await;
    assert_eq!(run.input["gateway"]["trace_id"], TRACE, "{}", run.input);
    assert_eq!(run.input["gateway"]["job_id"], job_id.as_str());

    // Every line about the job carries the trace, and the trace is on no other job's line.
    let about_the_job: Vec<Value> = lines
        .parsed()
        .into_iter()
        .filter(|line| field(line, "job_id") == Some(&job_id))
        .collect();
    let untraced: Vec<&Value> = about_the_job
        .iter()
        .filter(|line| field(line, "trace_id") != Some(TRACE))
        .collect();
    assert!(
        untraced.is_empty(),
        "lines without the trace: {untraced:#?}"
    );
    for line in lines.parsed() {
        if field(&line, "trace_id") == Some(TRACE) {
            assert_eq!(field(&line, "job_id"), Some(job_id.as_str()), "{line}");
        }
    }
    // And it runs through each step: the API, the dispatch queue's consumer, the webhook and
    // finalize.
    let messages: Vec<&str> = about_the_job
        .iter()
        .filter_map(|line| line["message"].as_str())
        .collect();
    for step in ["job accepted", "dispatched", "webhook handled"] {
        assert!(
            messages.iter().any(|m| m.contains(step)),
            "no {step:?} line for the job: {messages:#?}"
        );
    }
    assert!(
        about_the_job
            .iter()
            .any(|line| line["spans"].as_array().is_some_and(|spans| spans
                .iter()
                .any(|s| s["name"] == "message" && s["trace_id"] == TRACE))),
        "the dispatch queue's message did not carry the trace: {messages:#?}"
    );
    stack.stop().await;
}
