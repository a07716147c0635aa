//! `/_emulator/…`: the HTTP mirror of the in-process test controls.

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn faults_can_be_read_and_replaced_over_http() {
    let h = start().await;
    let url = format!("{}/_emulator/faults", h.emu.api_url);
    let current: Value = h.http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(current["webhooks_enabled"], true);

    let response = h
        .http
        .put(&url)
        .json(&json!({"run_status": 503, "webhooks_enabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let faults = h.emu.faults();
    assert_eq!(faults.run_status, Some(503));
    assert!(!faults.webhooks_enabled);
    assert!(faults.webhook_on_timed_out, "omitted fields take defaults");
    let (status, _) = h.post("run", json!({"input": {}})).await;
    assert_eq!(status.as_u16(), 503);

    let bad = h.http.put(&url).body("{nope").send().await.unwrap();
    assert_eq!(bad.status().as_u16(), 400);
}

#[tokio::test]
async fn jobs_and_webhooks_are_visible_over_http() {
    let h = start().await;
    let hook = Receiver::start(200).await;
    let mut job = trivial_job(&h.dir);
    job["webhook"] = json!(hook.url);
    let id = h.run(job).await;
    h.wait_status(&id, "COMPLETED").await;
    hook.wait_hits(1).await;

    let snapshot: Value = h
        .http
        .get(format!("{}/_emulator/jobs/{id}", h.emu.api_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(snapshot["status"], "COMPLETED");
    assert_eq!(snapshot["webhook"], hook.url);
    assert_eq!(snapshot["attempt"], 1);

    let log: Value = h
        .http
        .get(format!("{}/_emulator/webhooks?job_id={id}", h.emu.api_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log.as_array().unwrap().len(), 1);
    assert_eq!(log[0]["status"], 200);

    let redelivered = h
        .http
        .post(format!(
            "{}/_emulator/webhooks/{id}/redeliver",
            h.emu.api_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(redelivered.status().as_u16(), 200);
    hook.wait_hits(2).await;

    let missing = h
        .http
        .get(format!("{}/_emulator/jobs/unknown", h.emu.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
}
