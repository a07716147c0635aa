//! Probabilistic faults (`Faults::chaos`): each kind takes effect, is recorded, and a replay
//! under the same seed injects the same faults into the same jobs.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use runpod_emulator::{ChaosConfig, FaultKind, Faults, Removal};
use serde_json::{json, Value};

use crate::common::*;

fn chaos(config: ChaosConfig) -> Faults {
    Faults {
        chaos: Some(config),
        ..Faults::default()
    }
}

/// A trivial job keyed for chaos by `key` (the KSampler seed).
fn keyed_job(dir: &TestDir, key: u64, webhook: Option<&str>) -> Value {
    let mut job = trivial_job(dir);
    job["input"]["workflow_api"]["3"]["inputs"]["seed"] = json!(key);
    if let Some(url) = webhook {
        job["webhook"] = json!(url);
    }
    job
}

const KEY: &str = "/workflow_api/3/inputs/seed";

fn count(emu: &runpod_emulator::Emulator, kind: FaultKind) -> u64 {
    emu.fault_counts().get(&kind).copied().unwrap_or(0)
}

#[tokio::test]
async fn run_refusals_are_drawn_per_job_key_and_replay_under_the_same_seed() {
    let config = ChaosConfig {
        seed: 11,
        job_key_pointer: Some(KEY.into()),
        p_run_429: 0.3,
        p_run_5xx: 0.2,
        ..ChaosConfig::default()
    };
    let h = start_with(|c| {
        c.faults = chaos(config.clone());
        c.builtin_worker = false;
    })
    .await;
    let mut first = Vec::new();
    for key in 0..40 {
        let (status, _) = h.post("run", keyed_job(&h.dir, key, None)).await;
        first.push(status.as_u16());
    }
    assert!(first.contains(&429), "{first:?}");
    assert!(first.iter().any(|s| (500..=503).contains(s)), "{first:?}");
    assert!(first.contains(&200), "{first:?}");
    let refused = first.iter().filter(|s| **s != 200).count() as u64;
    assert_eq!(
        count(&h.emu, FaultKind::Run429) + count(&h.emu, FaultKind::Run5xx),
        refused
    );

    // Setting the faults again restarts the counters: the same calls, in reverse order, are
    // refused exactly as before.
    h.emu.set_faults(chaos(config));
    let mut again = vec![0; 40];
    for key in (0..40).rev() {
        let (status, _) = h.post("run", keyed_job(&h.dir, key, None)).await;
        again[key as usize] = status.as_u16();
    }
    assert_eq!(first, again);
}

#[tokio::test]
async fn worker_faults_end_jobs_failed_or_timed_out() {
    let h = start_with(|c| {
        c.faults = chaos(ChaosConfig {
            seed: 3,
            job_key_pointer: Some(KEY.into()),
            p_worker_failed: 0.4,
            p_worker_timed_out: 0.3,
            ..ChaosConfig::default()
        });
    })
    .await;
    let mut ids = Vec::new();
    for key in 0..12 {
        let mut job = keyed_job(&h.dir, key, None);
        job["policy"] = json!({"executionTimeout": 300});
        ids.push(h.run(job).await);
    }
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        let (_, body) = h
            .wait_for(id, Duration::from_secs(10), |_, body| {
                matches!(
                    body["status"].as_str(),
                    Some("COMPLETED" | "FAILED" | "TIMED_OUT")
                )
            })
            .await;
        let status = body["status"].as_str().unwrap().to_owned();
        if status == "FAILED" {
            assert!(body["error"].as_str().unwrap().contains("injected"));
        }
        assert_eq!(h.emu.ended_job(id).unwrap().status.as_str(), status);
        *outcomes.entry(status).or_default() += 1;
    }
    assert_eq!(
        outcomes.get("FAILED").copied().unwrap_or(0) as u64,
        count(&h.emu, FaultKind::WorkerFailed)
    );
    assert_eq!(
        outcomes.get("TIMED_OUT").copied().unwrap_or(0) as u64,
        count(&h.emu, FaultKind::WorkerTimedOut)
    );
    assert!(outcomes.len() == 3, "{outcomes:?}");
}

#[tokio::test]
async fn ttl_deletion_and_result_expiry_turn_status_into_404() {
    let h = start_with(|c| {
        c.faults = chaos(ChaosConfig {
            seed: 1,
            p_ttl_delete: 1.0,
            ttl_delete_min_ms: 100,
            ttl_delete_max_ms: 100,
            worker_delay_min_ms: 2_000,
            worker_delay_max_ms: 2_000,
            ..ChaosConfig::default()
        });
    })
    .await;
    let id = h.run(trivial_job(&h.dir)).await;
    h.wait_for(&id, Duration::from_secs(5), |code, _| code == 404)
        .await;
    assert_eq!(h.emu.removal(&id), Some(Removal::Ttl));
    assert_eq!(count(&h.emu, FaultKind::TtlDelete), 1);

    h.emu.set_faults(chaos(ChaosConfig {
        seed: 1,
        p_result_expiry: 1.0,
        result_expiry_ms: 150,
        ..ChaosConfig::default()
    }));
    let id = h.run(trivial_job(&h.dir)).await;
    h.wait_status(&id, "COMPLETED").await;
    h.wait_for(&id, Duration::from_secs(5), |code, _| code == 404)
        .await;
    assert_eq!(h.emu.removal(&id), Some(Removal::Retention));
    assert_eq!(h.emu.ended_job(&id).unwrap().status.as_str(), "COMPLETED");
    assert_eq!(count(&h.emu, FaultKind::ResultExpiry), 1);
}

#[tokio::test]
async fn webhook_faults_lose_duplicate_empty_delay_and_reorder() {
    let h = start_with(|c| {
        c.faults = chaos(ChaosConfig {
            seed: 1,
            p_webhook_duplicate: 1.0,
            p_webhook_empty: 0.0,
            p_webhook_out_of_order: 1.0,
            p_webhook_delayed: 1.0,
            webhook_delay_ms: 300,
            ..ChaosConfig::default()
        });
    })
    .await;
    let hook = Receiver::start(200).await;
    let mut job = trivial_job(&h.dir);
    job["webhook"] = json!(hook.url);
    let id = h.run(job.clone()).await;
    let done = h.wait_status(&id, "COMPLETED").await;
    let finished = tokio::time::Instant::now();
    let hits = hook.wait_hits(3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let hits_after = hook.hits();
    assert_eq!(hits_after.len(), 3, "two copies and one stale report");
    let bodies: Vec<Value> = hits
        .iter()
        .map(|hit| serde_json::from_slice(&hit.body).unwrap())
        .collect();
    assert_eq!(
        bodies.iter().filter(|b| b["status"] == "COMPLETED").count(),
        2
    );
    let stale = bodies
        .iter()
        .find(|b| b["status"] == "IN_PROGRESS")
        .unwrap();
    assert!(stale.get("output").is_none());
    assert_eq!(stale["id"], done["id"]);
    assert!(
        hits[0].at >= finished + Duration::from_millis(250),
        "delayed"
    );
    for kind in [
        FaultKind::WebhookDuplicate,
        FaultKind::WebhookOutOfOrder,
        FaultKind::WebhookDelayed,
    ] {
        assert_eq!(count(&h.emu, kind), 1, "{kind:?}");
    }

    h.emu.set_faults(chaos(ChaosConfig {
        seed: 1,
        p_webhook_empty: 1.0,
        ..ChaosConfig::default()
    }));
    let id = h.run(job.clone()).await;
    h.wait_status(&id, "COMPLETED").await;
    let hits = hook.wait_hits(4).await;
    assert!(hits[3].body.is_empty());

    h.emu.set_faults(chaos(ChaosConfig {
        seed: 1,
        p_webhook_lost: 1.0,
        ..ChaosConfig::default()
    }));
    let id = h.run(job).await;
    h.wait_status(&id, "COMPLETED").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.hits().len(), 4, "the lost webhook never came");
    assert_eq!(count(&h.emu, FaultKind::WebhookLost), 1);
    // Still there to redeliver late.
    let late = h.emu.redeliver_webhook(&id).await.unwrap();
    assert_eq!(late.status, Some(200));
}

fn s3_without_retries(emu: &runpod_emulator::Emulator) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("eu-ro-1"))
        .endpoint_url(&emu.s3_url)
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            &emu.volume_access_key,
            &emu.volume_secret_key,
            None,
            None,
            "test",
        ))
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

#[tokio::test]
async fn the_volume_answers_502_and_cuts_reads_short() {
    let h = start().await;
    let client = s3_without_retries(&h.emu);
    let bucket = &h.emu.volume_id;
    let data = vec![7u8; 64 * 1024];
    client
        .put_object()
        .bucket(bucket)
        .key("outputs/x/a.bin")
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap();

    h.emu.set_faults(chaos(ChaosConfig {
        seed: 9,
        p_s3_502: 1.0,
        ..ChaosConfig::default()
    }));
    let err = client
        .get_object()
        .bucket(bucket)
        .key("outputs/x/a.bin")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 502);
    assert_eq!(count(&h.emu, FaultKind::S3Error502), 1);

    h.emu.set_faults(chaos(ChaosConfig {
        seed: 9,
        p_s3_truncated: 1.0,
        p_s3_slow: 1.0,
        s3_slow_ms: 200,
        ..ChaosConfig::default()
    }));
    let started = std::time::Instant::now();
    let sent = client
        .get_object()
        .bucket(bucket)
        .key("outputs/x/a.bin")
        .send()
        .await;
    assert!(started.elapsed() >= Duration::from_millis(190), "slow");
    // Usually the headers (announcing the whole length) and half the body arrive before the
    // connection drops; when the drop wins the race to the socket, not even the headers do.
    match sent {
        Ok(out) => {
            assert_eq!(out.content_length(), Some(data.len() as i64));
            assert!(out.body.collect().await.is_err(), "the body is cut short");
        }
        Err(err) => assert!(
            matches!(err, aws_sdk_s3::error::SdkError::DispatchFailure(_)),
            "{err:?}"
        ),
    }
    assert_eq!(count(&h.emu, FaultKind::S3Truncated), 1);
    assert_eq!(count(&h.emu, FaultKind::S3Slow), 1);

    // No chaos: the object is intact.
    h.emu.set_faults(Faults::default());
    let out = client
        .get_object()
        .bucket(bucket)
        .key("outputs/x/a.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(
        out.body.collect().await.unwrap().into_bytes().to_vec(),
        data
    );
}

#[tokio::test]
async fn status_and_cancel_can_answer_5xx() {
    let h = start_with(|c| c.builtin_worker = false).await;
    let id = h.run(trivial_job(&h.dir)).await;
    h.emu.set_faults(chaos(ChaosConfig {
        seed: 2,
        p_api_5xx: 1.0,
        ..ChaosConfig::default()
    }));
    let (code, _) = h.status(&id).await;
    assert!(code.is_server_error(), "{code}");
    let (code, _) = h.post(&format!("cancel/{id}"), json!({})).await;
    assert!(code.is_server_error(), "{code}");
    assert_eq!(count(&h.emu, FaultKind::Api5xx), 2);
    let (_, body) = decode(
        h.http
            .get(format!("{}/_emulator/chaos", h.emu.api_url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["counts"]["api_5xx"], 2);
    assert_eq!(body["injected"].as_array().unwrap().len(), 2);
}
