//! Webhooks: RunPod's #409 payload, retry policy, and the UNCONFIRMED switches.

use std::time::Duration;

use runpod_emulator::Faults;
use serde_json::{json, Value};

use crate::common::*;

fn with_webhook(mut job: Value, url: &str) -> Value {
    job["webhook"] = json!(url);
    job
}

#[tokio::test]
async fn webhook_is_delivered_in_runpods_shape() {
    let h = start().await;
    let hook = Receiver::start(200).await;
    let job = with_webhook(trivial_job(&h.dir), &hook.url);
    let id = h.run(job.clone()).await;
    let hits = hook.wait_hits(1).await;

    assert_eq!(hits[0].content_type.as_deref(), Some("application/json"));
    let payload: Value = serde_json::from_slice(&hits[0].body).unwrap();
    let mut keys: Vec<&str> = payload
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "delayTime",
            "executionTime",
            "id",
            "input",
            "output",
            "status",
            "webhook"
        ]
    );
    assert_eq!(payload["id"], id);
    assert_eq!(payload["status"], "COMPLETED");
    assert_eq!(
        payload["input"], job["input"],
        "the full original input is echoed"
    );
    assert_eq!(payload["webhook"], hook.url);
    assert_eq!(payload["output"]["file_count"], 1);
    assert!(payload["delayTime"].is_u64() && payload["executionTime"].is_u64());

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.hits().len(), 1, "delivered once, no retries");
    let log = h.emu.webhook_log();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].attempt, log[0].status, log[0].delivered),
        (1, Some(200), true)
    );
    assert_eq!(log[0].job_id, id);
}

#[tokio::test]
async fn failed_job_webhook_carries_the_error() {
    let h = start().await;
    h.emu.set_faults(Faults {
        worker_fail_message: Some("out of memory".into()),
        ..Default::default()
    });
    let hook = Receiver::start(200).await;
    h.run(with_webhook(json!({"input": {"a": 1}}), &hook.url))
        .await;
    let hits = hook.wait_hits(1).await;
    let payload: Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert_eq!(payload["status"], "FAILED");
    assert_eq!(payload["error"], "out of memory");
    assert_eq!(payload["input"], json!({"a": 1}));
}

#[tokio::test]
async fn webhook_is_retried_three_times_on_500_then_given_up() {
    let h = start().await;
    let hook = Receiver::start(500).await;
    let id = h.run(with_webhook(trivial_job(&h.dir), &hook.url)).await;
    let hits = hook.wait_hits(3).await;
    for pair in hits.windows(2) {
        assert!(
            pair[1].at - pair[0].at >= Duration::from_millis(100),
            "retry delay respected"
        );
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(hook.hits().len(), 3, "no fourth attempt");
    let log = h.emu.webhook_log();
    let attempts: Vec<(u32, Option<u16>, bool)> = log
        .iter()
        .filter(|a| a.job_id == id)
        .map(|a| (a.attempt, a.status, a.delivered))
        .collect();
    assert_eq!(
        attempts,
        [
            (1, Some(500), false),
            (2, Some(500), false),
            (3, Some(500), false)
        ]
    );
}

#[tokio::test]
async fn retries_stop_after_a_200() {
    let h = start().await;
    let hook = Receiver::start(503).await;
    h.run(with_webhook(trivial_job(&h.dir), &hook.url)).await;
    hook.wait_hits(1).await;
    hook.set_status(200);
    hook.wait_hits(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.hits().len(), 2);
}

#[tokio::test]
async fn non_200_success_is_a_failure_unless_switched() {
    let h = start().await;
    let hook = Receiver::start(204).await;
    h.run(with_webhook(trivial_job(&h.dir), &hook.url)).await;
    hook.wait_hits(3).await;

    let h = start().await;
    h.emu.set_faults(Faults {
        webhook_success_only_200: false,
        ..Default::default()
    });
    let hook = Receiver::start(204).await;
    h.run(with_webhook(trivial_job(&h.dir), &hook.url)).await;
    hook.wait_hits(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.hits().len(), 1);
}

#[tokio::test]
async fn unreachable_receiver_counts_as_failed_attempts() {
    let h = start().await;
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    drop(listener);
    let id = h.run(with_webhook(trivial_job(&h.dir), &url)).await;
    h.wait_status(&id, "COMPLETED").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = h.emu.webhook_log();
    assert_eq!(log.len(), 3);
    assert!(log.iter().all(|a| a.status.is_none() && a.error.is_some()));
}

#[tokio::test]
async fn disabled_webhooks_send_nothing() {
    let h = start().await;
    h.emu.set_faults(Faults {
        webhooks_enabled: false,
        ..Default::default()
    });
    let hook = Receiver::start(200).await;
    let id = h.run(with_webhook(trivial_job(&h.dir), &hook.url)).await;
    h.wait_status(&id, "COMPLETED").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(hook.hits().is_empty());
    assert!(h.emu.webhook_log().is_empty());
}

#[tokio::test]
async fn empty_body_fault_sends_an_empty_body() {
    let h = start().await;
    h.emu.set_faults(Faults {
        webhook_empty_body: true,
        ..Default::default()
    });
    let hook = Receiver::start(200).await;
    h.run(with_webhook(trivial_job(&h.dir), &hook.url)).await;
    let hits = hook.wait_hits(1).await;
    assert!(hits[0].body.is_empty());
}

#[tokio::test]
async fn redelivery_sends_the_same_webhook_again() {
    let h = start().await;
    let hook = Receiver::start(200).await;
    let id = h.run(with_webhook(trivial_job(&h.dir), &hook.url)).await;
    hook.wait_hits(1).await;
    let attempt = h
        .emu
        .redeliver_webhook(&id)
        .await
        .expect("a webhook was sent");
    assert!(attempt.redelivery && attempt.delivered);
    assert_eq!(attempt.attempt, 2);
    let hits = hook.wait_hits(2).await;
    assert_eq!(hits[0].body, hits[1].body);
    assert!(h.emu.redeliver_webhook("no-such-job").await.is_none());
}

#[tokio::test]
async fn suppressed_webhook_can_arrive_late_by_redelivery() {
    let h = start().await;
    h.emu.set_faults(Faults {
        webhooks_enabled: false,
        ..Default::default()
    });
    let hook = Receiver::start(200).await;
    let id = h.run(with_webhook(trivial_job(&h.dir), &hook.url)).await;
    h.wait_status(&id, "COMPLETED").await;
    h.emu.redeliver_webhook(&id).await.expect("redelivered");
    let hits = hook.wait_hits(1).await;
    let payload: Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert_eq!(payload["status"], "COMPLETED");
}

#[tokio::test]
async fn timed_out_job_sends_a_webhook_by_default() {
    let h = start().await;
    h.emu.set_faults(Faults {
        worker_delay_ms: 600,
        ..Default::default()
    });
    let hook = Receiver::start(200).await;
    h.run(json!({"input": {}, "webhook": hook.url, "policy": {"executionTimeout": 100}}))
        .await;
    let hits = hook.wait_hits(1).await;
    let payload: Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert_eq!(payload["status"], "TIMED_OUT");
}

#[tokio::test]
async fn cancelled_job_sends_no_webhook_by_default_but_can_be_switched_on() {
    let h = start_with(|c| c.builtin_worker = false).await;
    let hook = Receiver::start(200).await;
    let id = h.run(json!({"input": {}, "webhook": hook.url})).await;
    h.post(&format!("cancel/{id}"), Value::Null).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(hook.hits().is_empty());

    h.emu.set_faults(Faults {
        webhook_on_cancelled: true,
        ..Default::default()
    });
    let id = h.run(json!({"input": {}, "webhook": hook.url})).await;
    h.post(&format!("cancel/{id}"), Value::Null).await;
    let hits = hook.wait_hits(1).await;
    let payload: Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert_eq!(payload["status"], "CANCELLED");
}
