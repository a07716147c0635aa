//! Per-tenant limits end to end, with the limits set in the table as an operator would: an
//! owner over its submit rate gets 429 with `Retry-After`; an owner's jobs past its in-flight
//! limit wait queued while another owner's go straight to RunPod.
use std::time::{Duration, Instant};

use gateway::domain::job::JobState;
use gateway::domain::tenant::LimitOverrides;
use gateway_tests::{jpeg, restore_request, Stack, StackOptions, StatusCode, ALICE, BOB};
use serde_json::json;

/// Generous: the suite runs on slow, shared machines; each wait ends as soon as it can.
const TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_submit_over_the_owners_rate_is_refused_429_with_retry_after() {
    let stack = Stack::start().await;
    stack
        .set_limits(
            "alice",
            LimitOverrides {
                submits_per_minute: Some(1),
                submit_burst: Some(1),
                ..LimitOverrides::default()
            },
        )
        .await;
    let request = restore_request(&jpeg(64, 48), json!({}));
    let post = || {
        reqwest::Client::new()
            .post(stack.url("/jobs"))
            .bearer_auth(ALICE)
            .json(&request)
            .send()
    };
    assert_eq!(post().await.unwrap().status(), StatusCode::ACCEPTED);

    let refused = post().await.unwrap();

    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // Another owner is not touched by alice's rate.
    let (status, _) = stack.post_json(BOB, "/jobs", &request).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn an_owners_jobs_past_its_limit_wait_while_another_owners_go() {
    // No worker takes the jobs: each dispatched one stays in RunPod's queue, in flight.
    let stack = Stack::start_with(StackOptions {
        configure_emulator: |c| c.builtin_worker = false,
        ..StackOptions::default()
    })
    .await;
    stack
        .set_limits(
            "alice",
            LimitOverrides {
                max_in_flight: Some(2),
                ..LimitOverrides::default()
            },
        )
        .await;
    let mut alices = Vec::new();
    for _ in 0..12 {
        alices.push(stack.submit_restore(ALICE, &jpeg(64, 48), json!({})).await);
    }
    let mut bobs = Vec::new();
    for _ in 0..3 {
        bobs.push(stack.submit_restore(BOB, &jpeg(64, 48), json!({})).await);
    }

    // Bob's jobs all reach RunPod, however far behind alice's backlog they were submitted.
    let deadline = Instant::now() + TIMEOUT;
    for id in &bobs {
        while stack.stored_job(id).await.state == JobState::Queued {
            assert!(Instant::now() < deadline, "bob's job {id} never dispatched");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut dispatched = Vec::new();
    for id in &alices {
        if stack.stored_job(id).await.state != JobState::Queued {
            dispatched.push(id.clone());
        }
    }
    assert_eq!(
        dispatched.len(),
        2,
        "alice's jobs in flight: {dispatched:?}"
    );

    // One of alice's ends: one more of hers goes, and no more than that.
    let (status, body) = stack
        .post_json(
            ALICE,
            &format!("/jobs/{}/cancel", dispatched[0]),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    loop {
        let mut ever = 0;
        let mut in_flight = 0;
        for id in &alices {
            let job = stack.stored_job(id).await;
            if job.state != JobState::Queued {
                ever += 1;
                in_flight += usize::from(!job.is_terminal());
            }
        }
        if ever >= 3 {
            assert_eq!(in_flight, 2, "alice's jobs in flight");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice's next job never dispatched"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
