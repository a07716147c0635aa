//! The functions' metrics, read as CloudWatch would read them: the embedded-metric-format lines
//! the local runner's functions flush. One stack per process (the recorder is the process's),
//! so this file holds one test, and the counts are exactly this stack's.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gateway::domain::tenant::LimitOverrides;
use gateway::metrics as m;
use gateway_tests::{jpeg, restore_request, Stack, StackOptions, StatusCode, ALICE, BOB};
use runpod_emulator::Faults;
use serde_json::{json, Value};

/// Generous: the suite runs on slow, shared machines; each wait ends as soon as it can.
const TIMEOUT: Duration = Duration::from_secs(120);

/// What the captured EMF lines add up to: counters summed, histograms' values gathered, by
/// metric name plus its dimensions other than `Service` (`JobsFailedByCode{code=worker_failed}`).
#[derive(Default, Debug)]
struct Read {
    counts: BTreeMap<String, f64>,
    samples: BTreeMap<String, Vec<f64>>,
    units: BTreeMap<String, String>,
}

fn read(lines: &[String]) -> Read {
    let mut read = Read::default();
    for line in lines {
        let doc: Value = serde_json::from_str(line).expect("each metric line is JSON");
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "RunPodGateway", "{line}");
        assert!(doc["_aws"]["Timestamp"].is_u64(), "{line}");
        let dimensions: Vec<&str> = directive["Dimensions"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        assert!(dimensions.contains(&"Service"), "{line}");
        let labels: String = dimensions
            .iter()
            .filter(|d| **d != "Service")
            .map(|d| format!("{d}={}", doc[*d].as_str().unwrap()))
            .collect::<Vec<_>>()
            .join(",");
        for metric in directive["Metrics"].as_array().unwrap() {
            let name = metric["Name"].as_str().unwrap();
            let key = if labels.is_empty() {
                name.to_string()
            } else {
                format!("{name}{{{labels}}}")
            };
            if let Some(unit) = metric["Unit"].as_str() {
                read.units.insert(name.to_string(), unit.to_string());
            }
            match &doc[name] {
                Value::Array(values) => read
                    .samples
                    .entry(key)
                    .or_default()
                    .extend(values.iter().map(|v| v.as_f64().unwrap())),
                value => *read.counts.entry(key).or_default() += value.as_f64().unwrap(),
            }
        }
    }
    read
}

fn count(read: &Read, key: &str) -> f64 {
    read.counts.get(key).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn the_functions_emit_what_happened_to_jobs_as_embedded_metrics() {
    let stack = Stack::start_with(StackOptions {
        sweep_every: Duration::from_millis(300),
        // Clean-up soon after each end, so that its bytes are counted within the test.
        extra_env: vec![("FINALIZE_LEASE_SECS", "1".into())],
        ..StackOptions::default()
    })
    .await;
    stack
        .set_limits(
            "bob",
            LimitOverrides {
                submits_per_minute: Some(1),
                submit_burst: Some(1),
                ..LimitOverrides::default()
            },
        )
        .await;

    // One success, one failure, one cancel (alice); one accepted and one refused submit (bob).
    let (_, succeeded) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(succeeded["status"], "succeeded", "{succeeded}");
    stack.emulator.set_faults(Faults {
        worker_fail_message: Some("CUDA out of memory".into()),
        ..Faults::default()
    });
    let (_, failed) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(failed["error"]["code"], "worker_failed", "{failed}");
    stack.emulator.set_faults(Faults::default());
    let cancelled = stack.submit_restore(ALICE, &jpeg(64, 48), json!({})).await;
    let (status, body) = stack
        .post_json(ALICE, &format!("/jobs/{cancelled}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let request = restore_request(&jpeg(64, 48), json!({}));
    let (status, accepted) = stack.post_json(BOB, "/jobs", &request).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _) = stack.post_json(BOB, "/jobs", &request).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let bobs = accepted["job_id"].as_str().unwrap();
    let bobs = stack.wait_terminal(BOB, bobs, TIMEOUT).await;
    assert_eq!(bobs["status"], "succeeded", "{bobs}");

    // The lines come with the runner's next flush; the clean-ups with the next sweeps.
    let deadline = Instant::now() + TIMEOUT;
    let read = loop {
        let read = read(&gateway_aws::metrics::captured());
        if count(&read, m::JOBS_ENDED) >= 4.0 && count(&read, m::CLEANUP_BYTES) > 0.0 {
            break read;
        }
        assert!(Instant::now() < deadline, "metrics so far: {read:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(count(&read, m::JOBS_ACCEPTED), 4.0, "{read:#?}");
    assert_eq!(count(&read, m::JOBS_ENDED), 4.0, "{read:#?}");
    assert_eq!(count(&read, m::JOBS_SUCCEEDED), 2.0, "{read:#?}");
    assert_eq!(count(&read, m::JOBS_FAILED), 1.0, "{read:#?}");
    assert_eq!(
        count(
            &read,
            &format!("{}{{code=worker_failed}}", m::JOBS_FAILED_BY_CODE)
        ),
        1.0,
        "{read:#?}"
    );
    assert_eq!(count(&read, m::JOBS_CANCELLED), 1.0, "{read:#?}");
    assert_eq!(count(&read, m::RATE_LIMITED), 1.0, "{read:#?}");
    // RunPod called back for the two successes and the failure, at least.
    assert!(count(&read, m::WEBHOOKS_RECEIVED) >= 3.0, "{read:#?}");
    assert_eq!(read.samples[m::TIME_TO_END].len(), 4, "{read:#?}");
    assert!(read.samples[m::GPU_TIME].len() >= 2, "{read:#?}");
    assert!(!read.samples[m::QUEUE_TIME].is_empty(), "{read:#?}");
    assert_eq!(read.units[m::TIME_TO_END], "Milliseconds");
    assert_eq!(read.units[m::JOBS_ENDED], "Count");
    assert_eq!(read.units[m::CLEANUP_BYTES], "Bytes");
    stack.stop().await;
}
