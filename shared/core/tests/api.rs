//! The public API: every request is checked before anything is written, a job is created once
//! per idempotency key, only its owner sees it, and a cancel stops the GPU before it says so.
use gateway::app::api::{JobInput, JobRequest, Refusal, Submitted};
use gateway::domain::job::{Actor, ErrorCode, JobState};
use gateway::domain::keys;
use gateway::ports::{StopReason, StopRun};
use serde_json::{json, Map, Value};
use testkit::images::{jpeg, png};
use testkit::Kit;

use testkit::jobs::inline_request as inline;

fn uploaded(upload_id: &str) -> JobRequest {
    JobRequest {
        workflow: "restore".into(),
        params: None,
        input: JobInput {
            image_base64: None,
            upload_id: Some(upload_id.into()),
            url: None,
        },
        retention_secs: None,
        callback_url: None,
        callback_events: None,
        backend: None,
        priority: None,
    }
}

fn with_params(mut request: JobRequest, params: Value) -> JobRequest {
    request.params = Some(serde_json::from_value::<Map<String, Value>>(params).unwrap());
    request
}

async fn accepted(kit: &Kit, owner: &str) -> gateway::domain::job::Job {
    match kit.api().submit(owner, inline(&jpeg(64, 48)), None).await {
        Ok(Submitted::Accepted(job)) => job,
        other => panic!("not accepted: {other:?}"),
    }
}

/// Nothing was written anywhere: no job, no object, nothing queued.
fn assert_no_trace(kit: &Kit) {
    assert!(kit.store.jobs().is_empty(), "a job was stored");
    assert!(kit.uploads.keys().is_empty(), "an object was stored");
    assert!(kit.queue.sent().is_empty(), "something was queued");
}

fn code<T: std::fmt::Debug>(result: Result<T, Refusal>) -> &'static str {
    result.expect_err("refused").code()
}

// ------------------------------------------------------------------ submitting

#[tokio::test]
async fn an_inline_photo_is_stored_under_its_owner_and_the_job_queued() {
    let kit = Kit::new();
    let photo = jpeg(64, 48);

    let job = match kit.api().submit("alice", inline(&photo), None).await {
        Ok(Submitted::Accepted(job)) => job,
        other => panic!("{other:?}"),
    };

    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.owner, "alice");
    assert_eq!(job.input.key, keys::inline_input("alice", &job.id, "jpg"));
    assert_eq!(job.input.content_type, "image/jpeg");
    assert_eq!(kit.uploads.get(&job.input.key).unwrap(), photo);
    assert_eq!(kit.stored(&job.id), job);
    assert_eq!(kit.queue.sent(), vec![job.id.clone()]);
    assert_eq!(job.history[0].by, Actor::Client);
}

#[tokio::test]
async fn a_data_url_prefix_is_accepted() {
    let kit = Kit::new();
    let mut request = inline(&png(8, 8));
    let encoded = request.input.image_base64.take().unwrap();
    request.input.image_base64 = Some(format!("data:image/png;base64,{encoded}"));

    let job = match kit.api().submit("alice", request, None).await.unwrap() {
        Submitted::Accepted(job) => job,
        other => panic!("{other:?}"),
    };

    assert_eq!(job.input.extension, "png");
}

#[tokio::test]
async fn a_failed_enqueue_still_accepts_the_job_for_the_sweeper_to_requeue() {
    let kit = Kit::new();
    kit.queue.fail_next(1);

    let job = accepted(&kit, "alice").await;

    assert_eq!(kit.stored(&job.id).state, JobState::Queued);
    assert!(kit.queue.sent().is_empty());
    assert!(
        kit.stored(&job.id).next_check_at.is_some(),
        "the sweeper will look"
    );
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_first_job_and_creates_nothing() {
    let kit = Kit::new();
    let api = kit.api();
    let first = api
        .submit("alice", inline(&jpeg(64, 48)), Some(b"order-7"))
        .await
        .unwrap();
    let Submitted::Accepted(first) = first else {
        panic!("{first:?}")
    };

    let again = api
        .submit("alice", inline(&jpeg(64, 48)), Some(b" order-7 "))
        .await
        .unwrap();

    let Submitted::Existing(existing) = again else {
        panic!("{again:?}")
    };
    assert_eq!(existing.id, first.id);
    assert_eq!(kit.store.jobs().len(), 1);
    assert_eq!(kit.queue.sent().len(), 1);
    assert_eq!(kit.uploads.keys().len(), 1, "the replay stored no input");
}

#[tokio::test]
async fn the_same_idempotency_key_for_another_request_is_unprocessable_and_stores_nothing() {
    let kit = Kit::new();
    let api = kit.api();
    api.submit("alice", inline(&jpeg(64, 48)), Some(b"k"))
        .await
        .unwrap();
    let other = with_params(inline(&jpeg(64, 48)), json!({"megapixels": 0.5}));

    let refusal = api.submit("alice", other, Some(b"k")).await.unwrap_err();

    assert!(
        matches!(refusal, Refusal::Unprocessable { .. }),
        "{refusal:?}"
    );
    assert_eq!(refusal.code(), "idempotency_key_reused");
    assert_eq!(kit.store.jobs().len(), 1);
    assert_eq!(kit.uploads.keys().len(), 1);
}

#[tokio::test]
async fn the_same_request_in_another_key_order_is_a_replay() {
    let kit = Kit::new();
    let api = kit.api();
    let params = json!({"megapixels": 0.5, "denoise": 0.4});
    let reordered = json!({"denoise": 0.4, "megapixels": 0.5});
    api.submit(
        "alice",
        with_params(inline(&jpeg(64, 48)), params),
        Some(b"k"),
    )
    .await
    .unwrap();

    let again = api
        .submit(
            "alice",
            with_params(inline(&jpeg(64, 48)), reordered),
            Some(b"k"),
        )
        .await
        .unwrap();

    assert!(matches!(again, Submitted::Existing(_)), "{again:?}");
}

#[tokio::test]
async fn a_key_past_its_window_creates_a_new_job() {
    let kit = Kit::new();
    let api = kit.api();
    api.submit("alice", inline(&jpeg(64, 48)), Some(b"k"))
        .await
        .unwrap();
    kit.clock
        .advance(kit.settings.idempotency_window + std::time::Duration::from_secs(1));

    let later = api
        .submit("alice", inline(&jpeg(64, 48)), Some(b"k"))
        .await
        .unwrap();

    assert!(matches!(later, Submitted::Accepted(_)), "{later:?}");
    assert_eq!(kit.store.jobs().len(), 2);
}

#[tokio::test]
async fn two_requests_racing_with_one_key_make_one_job_and_leave_no_orphan_input() {
    let kit = Kit::new();
    let (a, b) = (kit.api(), kit.api());

    let (first, second) = tokio::join!(
        a.submit("alice", inline(&jpeg(64, 48)), Some(b"k")),
        b.submit("alice", inline(&jpeg(64, 48)), Some(b"k")),
    );

    let id = |s: Submitted| match s {
        Submitted::Accepted(job) | Submitted::Existing(job) => job.id,
    };
    assert_eq!(id(first.unwrap()), id(second.unwrap()));
    assert_eq!(kit.store.jobs().len(), 1);
    assert_eq!(kit.uploads.keys().len(), 1, "{:?}", kit.uploads.keys());
}

#[tokio::test]
async fn another_owner_may_use_the_same_idempotency_key() {
    let kit = Kit::new();
    let api = kit.api();
    api.submit("alice", inline(&jpeg(64, 48)), Some(b"k"))
        .await
        .unwrap();

    let bob = api
        .submit("bob", inline(&jpeg(64, 48)), Some(b"k"))
        .await
        .unwrap();

    assert!(matches!(bob, Submitted::Accepted(_)), "{bob:?}");
    assert_eq!(kit.store.jobs().len(), 2);
}

#[tokio::test]
async fn a_bad_idempotency_key_is_refused_before_anything_is_written() {
    let kit = Kit::new();
    let long = vec![b'k'; 129];
    for key in [&b""[..], b"   ", b"a#b", &long, b"caf\xc3\xa9", b"\xff"] {
        let result = kit
            .api()
            .submit("alice", inline(&jpeg(64, 48)), Some(key))
            .await;
        assert_eq!(code(result), "invalid_idempotency_key", "{key:?}");
    }
    assert_no_trace(&kit);
}

#[tokio::test]
async fn an_unknown_workflow_is_refused_and_the_known_ones_named() {
    let kit = Kit::new();
    let mut request = inline(&jpeg(64, 48));
    request.workflow = "nope".into();

    let refusal = kit.api().submit("alice", request, None).await.unwrap_err();

    assert_eq!(refusal.code(), "unknown_workflow");
    assert!(
        refusal.message().contains("restore"),
        "{}",
        refusal.message()
    );
    assert_no_trace(&kit);
}

#[tokio::test]
async fn out_of_range_params_are_refused_with_nothing_written() {
    let kit = Kit::new();
    let request = with_params(inline(&jpeg(64, 48)), json!({ "no_such_param": 1 }));

    let result = kit.api().submit("alice", request, None).await;

    assert_eq!(code(result), "invalid_params");
    assert_no_trace(&kit);
}

#[tokio::test]
async fn an_input_needs_exactly_one_source() {
    let kit = Kit::new();
    let mut both = inline(&jpeg(64, 48));
    both.input.upload_id = Some(uuid_of(1));
    let mut neither = inline(&jpeg(64, 48));
    neither.input.image_base64 = None;

    for request in [both, neither] {
        assert_eq!(
            code(kit.api().submit("alice", request, None).await),
            "invalid_input"
        );
    }
    assert_no_trace(&kit);
}

#[tokio::test]
async fn an_inline_image_over_the_limit_is_refused_before_decoding() {
    let kit = Kit::new().with_settings(|s| s.max_inline_bytes = 1_000);
    let mut request = inline(&jpeg(64, 48));
    request.input.image_base64 = Some("A".repeat(4_000));

    let refusal = kit.api().submit("alice", request, None).await.unwrap_err();

    assert!(matches!(refusal, Refusal::TooLarge { .. }), "{refusal:?}");
    assert_no_trace(&kit);
}

#[tokio::test]
async fn invalid_base64_is_refused() {
    let kit = Kit::new();
    let mut request = inline(&jpeg(64, 48));
    request.input.image_base64 = Some("not base64 at all!".into());

    assert_eq!(
        code(kit.api().submit("alice", request, None).await),
        "invalid_input_image"
    );
    assert_no_trace(&kit);
}

#[tokio::test]
async fn bytes_that_are_no_accepted_image_are_refused() {
    let kit = Kit::new();
    for bytes in [&b"hello world"[..], b"GIF89a\x01\x00\x01\x00"] {
        assert_eq!(
            code(kit.api().submit("alice", inline(bytes), None).await),
            "invalid_input_image"
        );
    }
    assert_no_trace(&kit);
}

#[tokio::test]
async fn an_image_of_too_many_pixels_is_refused() {
    let kit = Kit::new();
    kit.images.set_size(20_000, 10_000);

    let refusal = kit
        .api()
        .submit("alice", inline(&jpeg(64, 48)), None)
        .await
        .unwrap_err();

    assert_eq!(refusal.code(), "input_too_large");
    assert!(refusal.message().contains("20000x10000"));
    assert_no_trace(&kit);
}

#[tokio::test]
async fn an_image_without_dimensions_is_refused() {
    let kit = Kit::new();
    kit.images.set_size(0, 48);

    assert_eq!(
        code(kit.api().submit("alice", inline(&jpeg(64, 48)), None).await),
        "invalid_input_image"
    );
}

#[tokio::test]
async fn a_store_outage_is_unavailable_and_leaves_no_job() {
    let kit = Kit::new();
    kit.store.fail_next(1);

    let refusal = kit
        .api()
        .submit("alice", inline(&jpeg(64, 48)), None)
        .await
        .unwrap_err();

    assert!(
        matches!(refusal, Refusal::Unavailable { .. }),
        "{refusal:?}"
    );
    assert!(kit.store.jobs().is_empty());
    assert!(kit.queue.sent().is_empty());
}

#[tokio::test]
async fn an_input_stays_while_the_store_cannot_say_whether_its_job_was_created() {
    // An outage answer may hide a write that committed: the client's retry with its
    // Idempotency-Key then gets that job, which needs its input.
    let kit = Kit::new();
    kit.store.fail_next(1);

    kit.api()
        .submit("alice", inline(&jpeg(64, 48)), None)
        .await
        .unwrap_err();

    assert_eq!(kit.uploads.keys().len(), 1, "{:?}", kit.uploads.keys());
}

// ------------------------------------------------------------------ uploads

fn uuid_of(n: u64) -> String {
    format!("0190a1b2-0000-7000-8000-{n:012x}")
}

#[tokio::test]
async fn an_upload_ticket_names_a_key_under_its_owner() {
    let kit = Kit::new();

    let ticket = kit.api().create_upload("alice", None).await.unwrap();

    let field = |name: &str| {
        ticket
            .request
            .fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("key"), Some(keys::upload("alice", &ticket.upload_id)));
    assert_eq!(field("Content-Type").as_deref(), Some("image/jpeg"));
    assert_eq!(
        field("max_bytes"),
        Some(kit.settings.max_upload_bytes.to_string()),
        "the store is told the limit to enforce"
    );
    assert_eq!(ticket.max_bytes, kit.settings.max_upload_bytes);
}

#[tokio::test]
async fn an_upload_of_another_content_type_is_refused() {
    let kit = Kit::new();

    assert_eq!(
        code(kit.api().create_upload("alice", Some("image/gif")).await),
        "unsupported_content_type"
    );
}

#[tokio::test]
async fn a_completed_upload_becomes_the_jobs_input() {
    let kit = Kit::new();
    let photo = png(32, 24);
    kit.uploads
        .insert(&keys::upload("alice", &uuid_of(9)), &photo);

    let job = match kit.api().submit("alice", uploaded(&uuid_of(9)), None).await {
        Ok(Submitted::Accepted(job)) => job,
        other => panic!("{other:?}"),
    };

    assert_eq!(job.input.key, keys::pinned_upload("alice", &job.id));
    assert_eq!(kit.uploads.get(&job.input.key).unwrap(), photo);
    assert_eq!(job.input.content_type, "image/png");
    assert_eq!(job.input.size, photo.len() as u64);
}

#[tokio::test]
async fn another_owners_upload_is_unknown() {
    let kit = Kit::new();
    kit.uploads
        .insert(&keys::upload("bob", &uuid_of(9)), &png(32, 24));

    assert_eq!(
        code(kit.api().submit("alice", uploaded(&uuid_of(9)), None).await),
        "unknown_upload"
    );
    assert!(kit.store.jobs().is_empty());
}

#[tokio::test]
async fn an_upload_id_that_is_not_ours_never_reaches_a_key() {
    let kit = Kit::new();

    for id in ["../bob/x", "", "0190a1b2"] {
        assert_eq!(
            code(kit.api().submit("alice", uploaded(id), None).await),
            "unknown_upload",
            "{id:?}"
        );
    }
    assert!(
        kit.uploads.touched().is_empty(),
        "{:?}",
        kit.uploads.touched()
    );
}

#[tokio::test]
async fn an_upload_over_the_limit_is_refused() {
    let kit = Kit::new().with_settings(|s| s.max_upload_bytes = 10);
    kit.uploads
        .insert(&keys::upload("alice", &uuid_of(9)), &png(32, 24));

    let refusal = kit
        .api()
        .submit("alice", uploaded(&uuid_of(9)), None)
        .await
        .unwrap_err();

    assert!(matches!(refusal, Refusal::TooLarge { .. }), "{refusal:?}");
    assert!(kit.store.jobs().is_empty());
}

#[tokio::test]
async fn an_upload_that_is_no_image_is_refused() {
    let kit = Kit::new();
    kit.uploads.insert(
        &keys::upload("alice", &uuid_of(9)),
        b"<html>not a photo</html>",
    );

    assert_eq!(
        code(kit.api().submit("alice", uploaded(&uuid_of(9)), None).await),
        "invalid_input_image"
    );
}

// ------------------------------------------------------------------ reading and listing

#[tokio::test]
async fn another_owners_job_is_not_found_as_a_missing_one_is() {
    let kit = Kit::new();
    let job = accepted(&kit, "alice").await;

    assert_eq!(
        kit.api().job("bob", &job.id).await.unwrap_err(),
        Refusal::NotFound
    );
    assert_eq!(
        kit.api().job("alice", &uuid_of(99)).await.unwrap_err(),
        Refusal::NotFound
    );
    assert_eq!(
        kit.api().job("alice", "not-a-uuid").await.unwrap_err(),
        Refusal::NotFound
    );
}

#[tokio::test]
async fn outputs_get_download_urls_only_once_the_job_succeeded() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    let output = format!("{}restored_00001_.png", kit.volume_root().outputs(&job.id));
    assert!(kit
        .api()
        .job("alice", &job.id)
        .await
        .unwrap()
        .outputs
        .is_empty());

    let report = kit.completed_run("rp-1", &[output]);
    kit.observe_then_finalize(kit.stored(&job.id), &report, Actor::Gateway)
        .await
        .unwrap();

    let detail = kit.api().job("alice", &job.id).await.unwrap();
    assert_eq!(detail.job.state, JobState::Succeeded);
    assert_eq!(detail.outputs.len(), 1);
    let (file, url) = &detail.outputs[0];
    assert!(url.contains(&file.key), "{url}");
}

#[tokio::test]
async fn a_list_shows_only_the_owners_jobs_newest_first_in_pages() {
    let kit = Kit::new();
    let jobs: Vec<_> = (0..3).map(|_| kit.queued_job("alice")).collect();
    kit.queued_job("bob");
    let api = kit.api();

    let first = api.list("alice", None, Some(2), None).await.unwrap();
    let second = api
        .list("alice", None, Some(2), first.cursor.as_deref())
        .await
        .unwrap();

    let ids = |page: &gateway::ports::JobPage| -> Vec<String> {
        page.jobs.iter().map(|j| j.id.clone()).collect()
    };
    assert_eq!(ids(&first), vec![jobs[2].id.clone(), jobs[1].id.clone()]);
    assert_eq!(ids(&second), vec![jobs[0].id.clone()]);
    assert_eq!(second.cursor, None);
}

#[tokio::test]
async fn a_list_limit_outside_1_to_100_is_refused() {
    let kit = Kit::new();
    for limit in [0, 101] {
        assert_eq!(
            code(kit.api().list("alice", None, Some(limit), None).await),
            "invalid_limit"
        );
    }
}

#[tokio::test]
async fn a_status_filter_lists_only_the_owners_jobs_in_that_state() {
    let kit = Kit::new();
    let cancelled = kit.queued_job("alice");
    kit.api().cancel("alice", &cancelled.id).await.unwrap();
    kit.queued_job("alice");
    let bobs = kit.queued_job("bob");
    kit.api().cancel("bob", &bobs.id).await.unwrap();

    let page = kit
        .api()
        .list("alice", Some("cancelled"), None, None)
        .await
        .unwrap();

    let ids: Vec<&str> = page.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [cancelled.id.as_str()]);
}

#[tokio::test]
async fn a_status_that_is_no_status_is_refused() {
    let kit = Kit::new();
    for status in ["done", "Running", ""] {
        assert_eq!(
            code(kit.api().list("alice", Some(status), None, None).await),
            "invalid_status"
        );
    }
}

#[tokio::test]
async fn a_cursor_goes_on_only_the_listing_it_came_from() {
    let kit = Kit::new();
    for _ in 0..3 {
        kit.queued_job("alice");
    }
    let all = kit.api().list("alice", None, Some(1), None).await.unwrap();

    let result = kit
        .api()
        .list("alice", Some("queued"), Some(1), all.cursor.as_deref())
        .await;

    assert_eq!(code(result), "invalid_cursor");
}

#[tokio::test]
async fn another_owners_cursor_is_invalid() {
    let kit = Kit::new();
    for _ in 0..3 {
        kit.queued_job("bob");
    }
    let bobs = kit.api().list("bob", None, Some(1), None).await.unwrap();

    let result = kit
        .api()
        .list("alice", None, Some(1), bobs.cursor.as_deref())
        .await;

    assert_eq!(code(result), "invalid_cursor");
}

// ------------------------------------------------------------------ cancelling

#[tokio::test]
async fn a_queued_job_is_cancelled_with_nothing_to_stop() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");

    let cancelled = kit.api().cancel("alice", &job.id).await.unwrap();

    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.error.unwrap().code, ErrorCode::CancelledByClient);
    assert!(kit.stops.requested().is_empty());
}

#[tokio::test]
async fn a_submitted_job_is_cancelled_at_once_with_its_run_queued_to_stop() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    let calls_before = kit.runpod.calls().len();

    let cancelled = kit.api().cancel("alice", &job.id).await.unwrap();

    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(
        kit.stops.requested(),
        vec![StopRun {
            job_id: job.id.clone(),
            runpod_id: "rp-1".into(),
            reason: StopReason::ClientCancel,
            backend: Default::default(),
        }]
    );
    // The API itself never talks to RunPod: it holds no RunPod key.
    assert_eq!(kit.runpod.calls().len(), calls_before);
    assert_eq!(
        kit.stored(&job.id).history.last().unwrap().by,
        Actor::Client
    );
}

#[tokio::test]
async fn when_the_stop_cannot_be_queued_the_job_is_not_called_cancelled() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.stops.fail_next(1);
    let before = kit.stored(&job.id);

    let refusal = kit.api().cancel("alice", &job.id).await.unwrap_err();

    assert!(
        matches!(refusal, Refusal::Unavailable { .. }),
        "{refusal:?}"
    );
    assert_eq!(kit.stored(&job.id), before);
}

#[tokio::test]
async fn a_finished_job_cannot_be_cancelled() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.api().cancel("alice", &job.id).await.unwrap();

    assert_eq!(
        code(kit.api().cancel("alice", &job.id).await),
        "already_finished"
    );
}

#[tokio::test]
async fn another_owner_cannot_cancel_a_job() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");

    assert_eq!(
        kit.api().cancel("bob", &job.id).await.unwrap_err(),
        Refusal::NotFound
    );
    assert_eq!(kit.stored(&job.id).state, JobState::Queued);
}

#[tokio::test]
async fn a_cancel_racing_another_write_is_applied_to_the_job_as_stored() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    let requeued_at = kit.now() + 5_000;
    // The sweeper reschedules the job between the cancel's read and its write.
    kit.store.interleave(None, move |job| {
        job.next_check_at = Some(requeued_at);
    });

    let cancelled = kit.api().cancel("alice", &job.id).await.unwrap();

    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(kit.stored(&cancelled.id).state, JobState::Cancelled);
}

#[tokio::test]
async fn a_run_dispatch_records_while_a_cancel_is_under_way_is_stopped_too() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    let now = kit.now();
    // The cancel read the job queued, with no run; dispatch records RunPod's id before the
    // cancel writes.
    kit.store.interleave(Some(JobState::Cancelled), move |job| {
        job.mark_submitted("rp-7".into(), now, now + 60_000)
            .unwrap();
    });

    let cancelled = kit.api().cancel("alice", &job.id).await.unwrap();

    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.runpod_job_id.as_deref(), Some("rp-7"));
    assert!(
        kit.stops.runs().contains(&"rp-7".to_string()),
        "the run that appeared is to be stopped: {:?}",
        kit.stops.runs()
    );
}

#[tokio::test]
async fn an_upload_replaced_after_the_job_was_accepted_does_not_change_its_input() {
    let kit = Kit::new();
    let photo = png(32, 24);
    let upload = keys::upload("alice", &uuid_of(9));
    kit.uploads.insert(&upload, &photo);
    let Submitted::Accepted(job) = kit
        .api()
        .submit("alice", uploaded(&uuid_of(9)), None)
        .await
        .unwrap()
    else {
        panic!("not accepted")
    };

    // The presigned PUT is still valid: the client (or anyone holding it) writes again.
    kit.uploads.insert(&upload, b"something else entirely");

    assert_eq!(kit.uploads.get(&job.input.key).unwrap(), photo);
}

#[tokio::test]
async fn an_upload_of_too_many_pixels_is_refused_and_its_copy_removed() {
    let kit = Kit::new();
    kit.uploads
        .insert(&keys::upload("alice", &uuid_of(9)), &png(32, 24));
    kit.images.set_size(20_000, 10_000);

    let refusal = kit
        .api()
        .submit("alice", uploaded(&uuid_of(9)), None)
        .await
        .unwrap_err();

    assert_eq!(refusal.code(), "input_too_large");
    assert_eq!(
        kit.uploads.keys(),
        vec![keys::upload("alice", &uuid_of(9))],
        "only the client's upload is left"
    );
    assert!(kit.store.jobs().is_empty());
}
