//! Client callbacks: a job's end reaches the URL its client gave, signed, once per message,
//! retried over days, logged, and never sent where the egress rules forbid.
use std::time::Duration;

use gateway::app::callbacks::Delivery;
use gateway::domain::callback::{AttemptResult, CallbackEvent, MessageState, SigningSecret};
use gateway::domain::job::{Job, JobState};
use gateway::ports::SigningKeys;
use serde_json::Value;
use testkit::Kit;

const HOOK: &str = "https://client.example/hooks/gateway";

/// A job of alice's with a callback to [`HOOK`], cancelled: ended, so its end is due. The
/// notice the cancel queued is taken, so that each test notifies as it needs.
async fn ended_job(kit: &Kit) -> Job {
    let job = kit
        .api()
        .cancel("alice", &callback_job(kit).id)
        .await
        .unwrap();
    assert_eq!(
        kit.callback_queue.take_notices(),
        [(job.id.clone(), CallbackEvent::Ended)]
    );
    job
}

/// A queued job of alice's with a callback to [`HOOK`].
fn callback_job(kit: &Kit) -> Job {
    kit.resolver.set("client.example", &["93.184.216.34"]);
    let mut job = kit.queued_job("alice");
    job.callback_url = Some(HOOK.into());
    kit.store.put(job.clone());
    job
}

fn body(posted: &testkit::fakes::Posted) -> Value {
    serde_json::from_str(&posted.body).unwrap()
}

#[tokio::test]
async fn an_ended_jobs_callback_is_signed_with_its_owners_secret_and_delivered() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;

    let id = kit
        .callbacks()
        .notify(&job, CallbackEvent::Ended)
        .await
        .unwrap()
        .unwrap();
    let outcomes = kit.deliver_waiting().await;

    assert_eq!(
        outcomes,
        [Delivery::Attempted(AttemptResult::Delivered(200))]
    );
    let posted = kit.receiver.posted();
    assert_eq!(posted.len(), 1);
    let sent = &posted[0];
    assert_eq!(sent.address, "93.184.216.34:443".parse().unwrap());
    assert_eq!(sent.header("webhook-id"), Some(id.as_str()));
    let timestamp: i64 = sent.header("webhook-timestamp").unwrap().parse().unwrap();
    assert_eq!(timestamp, kit.now() / 1000);
    let secret = kit.signing_keys.secrets("alice").await.unwrap().remove(0);
    assert_eq!(
        sent.header("webhook-signature"),
        Some(secret.sign(&id, timestamp, sent.body.as_bytes()).as_str())
    );
    let payload = body(sent);
    assert_eq!(payload["type"], "job.cancelled");
    assert_eq!(payload["data"]["job_id"], job.id.as_str());
    assert_eq!(payload["data"]["error"]["code"], "cancelled_by_client");
    let log = kit.delivery_logs.log(&job.id).unwrap();
    assert_eq!(log.message(&id).unwrap().state, MessageState::Delivered);
}

#[tokio::test]
async fn the_same_event_notified_twice_is_one_message_sent_once() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;
    let callbacks = kit.callbacks();

    let first = callbacks.notify(&job, CallbackEvent::Ended).await.unwrap();
    let second = callbacks.notify(&job, CallbackEvent::Ended).await.unwrap();
    let outcomes = kit.deliver_waiting().await;

    assert_eq!(first, second);
    assert_eq!(kit.receiver.posted().len(), 1);
    assert_eq!(
        outcomes[1],
        Delivery::Settled,
        "the second request finds it delivered"
    );
}

#[tokio::test]
async fn a_job_without_a_callback_url_sends_nothing() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    let job = kit.api().cancel("alice", &job.id).await.unwrap();

    assert_eq!(
        kit.callbacks()
            .notify(&job, CallbackEvent::Ended)
            .await
            .unwrap(),
        None
    );
    assert!(kit.callback_queue.take().is_empty());
}

#[tokio::test]
async fn running_and_progress_are_sent_only_when_asked_for() {
    let kit = Kit::new();
    let mut job = ended_job(&kit).await;
    let callbacks = kit.callbacks();
    assert_eq!(
        callbacks
            .notify(&job, CallbackEvent::Running)
            .await
            .unwrap(),
        None
    );

    job.callback_events = vec!["job.running".into()];
    assert!(callbacks
        .notify(&job, CallbackEvent::Running)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        callbacks
            .notify(&job, CallbackEvent::Progress)
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn a_failing_endpoint_is_retried_on_the_schedule_each_attempt_signed_anew() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;
    kit.receiver.answer(&[
        AttemptResult::Refused {
            status: 500,
            retry_after_secs: None,
        },
        AttemptResult::NoAnswer("timed out".into()),
    ]);
    let callbacks = kit.callbacks();
    let id = callbacks
        .notify(&job, CallbackEvent::Ended)
        .await
        .unwrap()
        .unwrap();

    kit.deliver_waiting().await;
    let retry = kit.callback_queue.take();
    assert_eq!(retry.len(), 1);
    assert!(retry[0].2 >= Duration::from_secs(5), "{:?}", retry[0].2);
    assert_eq!(
        callbacks.deliver(&job.id, &id).await.unwrap(),
        Delivery::NotDue(kit.delivery_logs.log(&job.id).unwrap().next_due().unwrap()),
        "too early: asked again for later"
    );
    kit.callback_queue.take();
    kit.clock.advance(Duration::from_secs(6));
    callbacks.deliver(&job.id, &id).await.unwrap();
    let wait = kit.callback_queue.take().remove(0).2;
    assert!(
        wait >= Duration::from_secs(300),
        "the second wait is 5 minutes: {wait:?}"
    );
    kit.clock.advance(Duration::from_secs(400));
    assert_eq!(
        callbacks.deliver(&job.id, &id).await.unwrap(),
        Delivery::Attempted(AttemptResult::Delivered(200))
    );
    let posted = kit.receiver.posted();
    assert_eq!(posted.len(), 3);
    assert!(posted
        .iter()
        .all(|p| p.header("webhook-id") == Some(id.as_str())));
    assert_ne!(
        posted[0].header("webhook-timestamp"),
        posted[2].header("webhook-timestamp")
    );
    assert_eq!(
        kit.delivery_logs
            .log(&job.id)
            .unwrap()
            .message(&id)
            .unwrap()
            .attempts
            .len(),
        3
    );
}

#[tokio::test]
async fn a_wait_longer_than_the_queue_allows_is_a_chain_of_requests() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;
    kit.receiver.answer(&[AttemptResult::Refused {
        status: 503,
        retry_after_secs: Some(7_200),
    }]);
    let callbacks = kit.callbacks();
    let id = callbacks
        .notify(&job, CallbackEvent::Ended)
        .await
        .unwrap()
        .unwrap();
    kit.deliver_waiting().await;

    let (_, _, delay) = kit.callback_queue.take().remove(0);
    assert_eq!(delay, Duration::from_secs(900), "the queue's longest delay");
    kit.clock.advance(delay);
    assert!(matches!(
        callbacks.deliver(&job.id, &id).await.unwrap(),
        Delivery::NotDue(_)
    ));
    assert_eq!(
        kit.receiver.posted().len(),
        1,
        "Retry-After honoured: nothing sent early"
    );
}

#[tokio::test]
async fn an_endpoint_that_answers_410_gets_nothing_more_for_the_job() {
    let kit = Kit::new();
    let mut job = ended_job(&kit).await;
    kit.receiver.answer(&[AttemptResult::Gone]);
    let callbacks = kit.callbacks();
    callbacks.notify(&job, CallbackEvent::Ended).await.unwrap();
    kit.deliver_waiting().await;

    job.callback_events = vec!["job.running".into()];
    assert_eq!(
        callbacks
            .notify(&job, CallbackEvent::Running)
            .await
            .unwrap(),
        None
    );
    assert!(kit.callback_queue.take().is_empty());
    assert_eq!(kit.receiver.posted().len(), 1);
}

#[tokio::test]
async fn a_callback_host_that_now_resolves_inside_is_never_contacted() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;
    kit.resolver.set("client.example", &["169.254.169.254"]);
    let callbacks = kit.callbacks();
    let id = callbacks
        .notify(&job, CallbackEvent::Ended)
        .await
        .unwrap()
        .unwrap();

    let outcome = kit.deliver_waiting().await.remove(0);

    assert!(
        matches!(outcome, Delivery::Attempted(AttemptResult::NoAnswer(ref why)) if why.contains("refused"))
    );
    assert!(kit.receiver.posted().is_empty());
    let log = kit.delivery_logs.log(&job.id).unwrap();
    let attempt = &log.message(&id).unwrap().attempts[0];
    assert!(attempt
        .error
        .as_deref()
        .unwrap()
        .contains("169.254.169.254"));
}

#[tokio::test]
async fn during_a_rotation_both_secrets_sign_and_the_new_one_comes_first() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;
    let old = kit.signing_keys.secrets("alice").await.unwrap().remove(0);
    kit.signing_keys.rotate("alice", 99);
    let new = kit.signing_keys.secrets("alice").await.unwrap().remove(0);
    let id = kit
        .callbacks()
        .notify(&job, CallbackEvent::Ended)
        .await
        .unwrap()
        .unwrap();

    kit.deliver_waiting().await;

    let sent = &kit.receiver.posted()[0];
    let timestamp: i64 = sent.header("webhook-timestamp").unwrap().parse().unwrap();
    let signatures = sent.header("webhook-signature").unwrap();
    let sign = |s: &SigningSecret| s.sign(&id, timestamp, sent.body.as_bytes());
    assert_eq!(signatures, format!("{} {}", sign(&new), sign(&old)));
}

#[tokio::test]
async fn the_owner_may_read_the_log_and_redeliver_and_no_one_else_may() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;
    let callbacks = kit.callbacks();
    let id = callbacks
        .notify(&job, CallbackEvent::Ended)
        .await
        .unwrap()
        .unwrap();
    kit.deliver_waiting().await;

    assert!(callbacks.log("bob", &job.id).await.unwrap().is_none());
    assert!(!callbacks.redeliver("bob", &job.id, &id).await.unwrap());
    assert!(callbacks.redeliver("alice", &job.id, &id).await.unwrap());
    kit.deliver_waiting().await;

    let log = callbacks.log("alice", &job.id).await.unwrap().unwrap();
    let attempts = &log.message(&id).unwrap().attempts;
    assert_eq!(attempts.len(), 2);
    assert!(attempts[1].manual);
    assert_eq!(kit.receiver.posted().len(), 2);
}

#[tokio::test]
async fn a_succeeded_jobs_callback_carries_its_output_links_and_stays_small() {
    let kit = Kit::new();
    kit.resolver.set("client.example", &["93.184.216.34"]);
    let mut job = kit.queued_job("alice");
    job.callback_url = Some(HOOK.into());
    kit.store.put(job.clone());
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    let status = kit.completed_run("rp-1", &[kit.volume_output(&job.id, "restore_00001_.png")]);
    kit.observe_then_finalize(
        kit.stored(&job.id),
        &status,
        gateway::domain::job::Actor::Webhook,
    )
    .await
    .unwrap();
    let done = kit.stored(&job.id);
    assert_eq!(done.state, JobState::Succeeded);

    kit.callbacks()
        .notify(&done, CallbackEvent::Ended)
        .await
        .unwrap();
    kit.deliver_waiting().await;

    let sent = &kit.receiver.posted()[0];
    assert!(sent.body.len() < 20 * 1024);
    let payload = body(sent);
    assert_eq!(payload["type"], "job.succeeded");
    let output = &payload["data"]["outputs"][0];
    assert_eq!(output["file_name"], "restore_00001_.png");
    assert!(output["url"].as_str().unwrap().starts_with("https://"));
}
