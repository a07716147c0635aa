//! Which job events reach a client's callback, and how: every use case that ends a job or
//! starts it running asks the delivery queue for the callback its client wants, and the sweeper
//! asks again for an ended job's, so that a request lost on the way is sent late, never not at
//! all.
use std::time::Duration;

use gateway::app::api::Refusal;
use gateway::domain::callback::{CallbackEvent, PROGRESS_EVERY_MS};
use gateway::domain::job::{Actor, Job, JobState};
use gateway::ports::RunPodStatus;
use serde_json::{json, Value};
use testkit::images::jpeg;
use testkit::jobs::inline_request;
use testkit::Kit;

const HOOK: &str = "https://client.example/hooks/gateway";

/// A job of alice's with a callback to [`HOOK`] for `events` beyond its end, dispatched to
/// RunPod as `rp-1`.
async fn submitted(kit: &Kit, events: &[&str]) -> Job {
    kit.resolver.set("client.example", &["93.184.216.34"]);
    let mut job = kit.queued_job("alice");
    job.callback_url = Some(HOOK.into());
    job.callback_events = events.iter().map(|e| e.to_string()).collect();
    kit.store.put(job.clone());
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.stored(&job.id)
}

fn status(status: &str, output: Option<Value>) -> RunPodStatus {
    RunPodStatus {
        id: Some("rp-1".into()),
        status: Some(status.into()),
        output,
        ..RunPodStatus::default()
    }
}

async fn observe(kit: &Kit, job_id: &str, report: &RunPodStatus) {
    kit.observer()
        .observe_as(kit.stored(job_id), report, Actor::Webhook)
        .await
        .unwrap();
}

fn notices(kit: &Kit) -> Vec<CallbackEvent> {
    kit.callback_queue
        .take_notices()
        .into_iter()
        .map(|(_, event)| event)
        .collect()
}

#[tokio::test]
async fn a_job_runpod_ends_is_told_to_its_client_signed_with_its_end() {
    let kit = Kit::new();
    let job = submitted(&kit, &[]).await;

    observe(&kit, &job.id, &status("FAILED", None)).await;
    kit.deliver_waiting().await;

    let posted = kit.receiver.posted();
    assert_eq!(posted.len(), 1);
    let body: Value = serde_json::from_str(&posted[0].body).unwrap();
    assert_eq!(body["type"], "job.failed");
    assert_eq!(body["data"]["job_id"], job.id.as_str());
    assert!(posted[0].header("webhook-signature").is_some());
}

#[tokio::test]
async fn a_succeeded_jobs_callback_carries_links_to_its_outputs_never_their_bytes() {
    let kit = Kit::new();
    let job = submitted(&kit, &[]).await;
    let completed = kit.completed_run("rp-1", &[kit.volume_output(&job.id, "out_00001_.png")]);
    kit.runpod.set_status("rp-1", completed.clone());

    kit.observe_then_finalize(kit.stored(&job.id), &completed, Actor::Webhook)
        .await
        .unwrap();
    kit.deliver_waiting().await;

    let posted = kit.receiver.posted();
    assert_eq!(posted.len(), 1, "told once, by finalize");
    let body: Value = serde_json::from_str(&posted[0].body).unwrap();
    assert_eq!(body["type"], "job.succeeded");
    let outputs = body["data"]["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    assert!(outputs[0]["url"].as_str().unwrap().starts_with("https://"));
    assert!(posted[0].body.len() < 20 * 1024);
}

#[tokio::test]
async fn a_worker_taking_the_job_is_told_only_to_a_client_that_asked() {
    let quiet = Kit::new();
    let job = submitted(&quiet, &[]).await;
    observe(&quiet, &job.id, &status("IN_PROGRESS", None)).await;
    assert_eq!(notices(&quiet), []);

    let asked = Kit::new();
    let job = submitted(&asked, &["job.running"]).await;
    observe(&asked, &job.id, &status("IN_PROGRESS", None)).await;
    assert_eq!(
        asked.callback_queue.notices(),
        [(job.id.clone(), CallbackEvent::Running)]
    );
    asked.deliver_waiting().await;
    let body: Value = serde_json::from_str(&asked.receiver.posted()[0].body).unwrap();
    assert_eq!(body["type"], "job.running");
}

#[tokio::test]
async fn progress_is_told_at_most_once_every_ten_seconds() {
    let kit = Kit::new();
    let job = submitted(&kit, &["job.progress"]).await;
    let progress = |fraction: f64| status("IN_PROGRESS", Some(json!({"progress": fraction})));

    observe(&kit, &job.id, &progress(0.1)).await;
    kit.clock
        .advance(Duration::from_millis(PROGRESS_EVERY_MS as u64 - 1));
    observe(&kit, &job.id, &progress(0.2)).await;
    assert_eq!(
        notices(&kit),
        [CallbackEvent::Progress],
        "the second is too soon"
    );

    kit.clock.advance(Duration::from_millis(1));
    observe(&kit, &job.id, &progress(0.3)).await;
    assert_eq!(
        kit.callback_queue.notices(),
        [(job.id.clone(), CallbackEvent::Progress)]
    );
    kit.deliver_waiting().await;
    let body: Value = serde_json::from_str(&kit.receiver.posted()[0].body).unwrap();
    assert_eq!(body["type"], "job.progress");
    assert_eq!(body["data"]["progress"]["fraction"], 0.3, "the latest");
}

#[tokio::test]
async fn an_end_whose_request_was_lost_is_asked_for_again_by_the_sweeper() {
    let kit = Kit::new();
    let job = submitted(&kit, &[]).await;
    kit.callback_queue.set_down(true);
    kit.api().cancel("alice", &job.id).await.unwrap();
    assert!(kit.stored(&job.id).callback_pending);
    kit.callback_queue.set_down(false);
    assert_eq!(notices(&kit), [], "the cancel's request was lost");

    kit.clock
        .advance(kit.settings.finalize_lease + Duration::from_secs(1));
    kit.sweeper().sweep().await.unwrap();

    assert_eq!(notices(&kit), [CallbackEvent::Ended]);
    assert!(!kit.stored(&job.id).callback_pending, "asked for: cleared");
}

#[tokio::test]
async fn the_sweeper_keeps_asking_while_the_delivery_queue_is_down() {
    let kit = Kit::new();
    let job = submitted(&kit, &[]).await;
    kit.api().cancel("alice", &job.id).await.unwrap();
    notices(&kit);
    kit.callback_queue.set_down(true);

    kit.clock
        .advance(kit.settings.finalize_lease + Duration::from_secs(1));
    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!(report.errors, 1);
    let stored = kit.stored(&job.id);
    assert!(stored.callback_pending);
    assert!(stored.cleanup_pending, "the clean-up waits for the request");
}

#[tokio::test]
async fn a_deleted_job_is_told_nothing_more_and_its_delivery_log_is_purged() {
    let kit = Kit::new();
    let job = submitted(&kit, &[]).await;
    kit.api().cancel("alice", &job.id).await.unwrap();
    kit.deliver_waiting().await;
    assert!(kit.delivery_logs.log(&job.id).is_some());

    kit.api().delete("alice", &job.id).await.unwrap();
    assert_eq!(
        kit.callbacks()
            .on_notice(&job.id, CallbackEvent::Ended)
            .await
            .unwrap(),
        None
    );
    kit.clock
        .advance(kit.settings.finalize_lease + Duration::from_secs(1));
    kit.sweeper().sweep().await.unwrap();

    assert_eq!(kit.stored(&job.id).state, JobState::Cancelled);
    assert!(kit.delivery_logs.log(&job.id).is_none());
}

// ------------------------------------------------------------------ registration

fn with_callback(url: &str, events: Option<Vec<&str>>) -> gateway::app::api::JobRequest {
    let mut request = inline_request(&jpeg(64, 48));
    request.callback_url = Some(url.into());
    request.callback_events = events.map(|e| e.into_iter().map(String::from).collect());
    request
}

async fn refusal(kit: &Kit, request: gateway::app::api::JobRequest) -> (String, String) {
    match kit.api().submit("alice", request, None).await {
        Err(Refusal::Invalid { code, message }) => (code.to_string(), message),
        other => panic!("accepted: {other:?}"),
    }
}

#[tokio::test]
async fn a_callback_to_a_private_address_is_refused_at_submit_and_nothing_is_stored() {
    let kit = Kit::new();
    kit.resolver.set("intranet.example", &["10.0.0.7"]);

    let (code, message) = refusal(&kit, with_callback("https://intranet.example/hook", None)).await;

    assert_eq!(code, "callback_url_refused");
    assert!(message.contains("10.0.0.7"), "{message}");
    assert!(kit.store.jobs().is_empty());
    assert!(kit.uploads.keys().is_empty());
}

#[tokio::test]
async fn a_callback_over_plain_http_or_to_the_metadata_address_is_refused() {
    let kit = Kit::new();
    kit.resolver.set("client.example", &["93.184.216.34"]);
    for url in [
        "http://client.example/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/hook",
        "not a url",
    ] {
        let (code, _) = refusal(&kit, with_callback(url, None)).await;
        assert_eq!(code, "callback_url_refused", "{url}");
    }
}

#[tokio::test]
async fn the_events_asked_for_are_checked_and_kept_once_each() {
    let kit = Kit::new();
    kit.resolver.set("client.example", &["93.184.216.34"]);
    let (code, _) = refusal(&kit, with_callback(HOOK, Some(vec!["job.finished"]))).await;
    assert_eq!(code, "invalid_callback");
    let mut no_url = inline_request(&jpeg(64, 48));
    no_url.callback_events = Some(vec!["job.running".into()]);
    assert_eq!(refusal(&kit, no_url).await.0, "invalid_callback");

    let accepted = kit
        .api()
        .submit(
            "alice",
            with_callback(
                HOOK,
                Some(vec!["job.running", "job.running", "job.progress"]),
            ),
            None,
        )
        .await
        .unwrap();
    let gateway::app::api::Submitted::Accepted(job) = accepted else {
        panic!("a new job")
    };
    assert_eq!(job.callback_url.as_deref(), Some(HOOK));
    assert_eq!(job.callback_events, ["job.running", "job.progress"]);
}

#[tokio::test]
async fn a_test_event_is_signed_with_the_owners_secret_and_reports_the_answer() {
    use gateway::domain::callback::AttemptResult;
    use gateway::ports::SigningKeys;
    let kit = Kit::new();
    kit.resolver.set("client.example", &["93.184.216.34"]);
    kit.receiver.answer(&[AttemptResult::Refused {
        status: 401,
        retry_after_secs: None,
    }]);

    let result = kit.callbacks().test_event("alice", HOOK).await.unwrap();

    assert_eq!(
        result,
        Ok(AttemptResult::Refused {
            status: 401,
            retry_after_secs: None
        })
    );
    let sent = &kit.receiver.posted()[0];
    let id = sent.header("webhook-id").unwrap();
    let at: i64 = sent.header("webhook-timestamp").unwrap().parse().unwrap();
    let secret = kit.signing_keys.secrets("alice").await.unwrap().remove(0);
    assert_eq!(
        sent.header("webhook-signature"),
        Some(secret.sign(id, at, sent.body.as_bytes()).as_str())
    );
    let body: Value = serde_json::from_str(&sent.body).unwrap();
    assert_eq!(body["type"], "test");
    kit.resolver.set("intranet.example", &["192.168.1.2"]);
    assert!(kit
        .callbacks()
        .test_event("alice", "https://intranet.example/")
        .await
        .unwrap()
        .is_err());
    assert_eq!(
        kit.receiver.posted().len(),
        1,
        "nothing sent to a refused host"
    );
}

// ------------------------------------------------------------------ what each attempt carries

/// The link of the first output in a callback's body.
fn first_link(body: &str) -> String {
    let body: Value = serde_json::from_str(body).unwrap();
    body["data"]["outputs"][0]["url"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_retried_success_carries_links_signed_when_it_is_sent() {
    use gateway::domain::callback::AttemptResult;
    let kit = Kit::new();
    let job = submitted(&kit, &[]).await;
    let completed = kit.completed_run("rp-1", &[kit.volume_output(&job.id, "out_00001_.png")]);
    kit.runpod.set_status("rp-1", completed.clone());
    kit.receiver.answer(&[AttemptResult::Refused {
        status: 503,
        retry_after_secs: None,
    }]);
    kit.observe_then_finalize(kit.stored(&job.id), &completed, Actor::Webhook)
        .await
        .unwrap();
    kit.deliver_waiting().await;

    // The retry comes ten minutes before the job's data expires: its link may not outlive that.
    let done = kit.stored(&job.id);
    let now = kit.now();
    kit.clock.advance(Duration::from_millis(
        (done.retained_until() - 600_000 - now) as u64,
    ));
    kit.deliver_waiting().await;

    let posted = kit.receiver.posted();
    assert_eq!(posted.len(), 2);
    assert!(first_link(&posted[0].body).ends_with("expires=3600"));
    assert!(
        first_link(&posted[1].body).ends_with("expires=600"),
        "signed anew"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&posted[0].body).unwrap()["timestamp"],
        serde_json::from_str::<Value>(&posted[1].body).unwrap()["timestamp"],
        "the event's time, not the attempt's"
    );
}

#[tokio::test]
async fn a_pending_callback_of_a_deleted_job_is_not_sent() {
    use gateway::app::callbacks::Delivery;
    use gateway::domain::callback::AttemptResult;
    let kit = Kit::new();
    let job = submitted(&kit, &[]).await;
    kit.receiver
        .answer(&[AttemptResult::NoAnswer("timed out".into())]);
    kit.api().cancel("alice", &job.id).await.unwrap();
    kit.deliver_waiting().await;
    assert_eq!(kit.receiver.posted().len(), 1);

    kit.api().delete("alice", &job.id).await.unwrap();
    kit.clock.advance(Duration::from_secs(10));
    let outcomes = kit.deliver_waiting().await;

    assert_eq!(outcomes, [Delivery::Unknown]);
    assert_eq!(kit.receiver.posted().len(), 1, "nothing more sent");
}
