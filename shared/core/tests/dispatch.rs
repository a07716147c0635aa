//! Dispatch: a queued job's input goes onto the RunPod volume and the job to RunPod, once.
use gateway::app::dispatch::{DispatchOutcome, RetryLater};
use gateway::domain::job::{Actor, ErrorCode, JobState, LeaseKind};
use gateway::ports::{JobStore, ObjectStore};
use testkit::fakes::{Answer, BrokenKey};
use testkit::Kit;

#[tokio::test]
async fn a_queued_job_is_copied_to_the_volume_and_submitted_with_its_signed_webhook() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");

    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert_eq!(outcome, DispatchOutcome::Submitted("rp-1".into()));
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Submitted);
    assert_eq!(stored.runpod_job_id.as_deref(), Some("rp-1"));
    assert_eq!(stored.attempts, 1);
    assert!(stored.lease.is_none(), "the dispatch lease is released");
    let input = kit.volume_root().input(&job.id, "input.jpg");
    assert_eq!(kit.volume.get(&input), kit.uploads.get(&job.input.key));
    let accepted = kit.runpod.accepted();
    assert_eq!(accepted.len(), 1);
    let webhook = accepted[0].webhook.clone().unwrap();
    let token = webhook.split("token=").nth(1).unwrap();
    assert!(webhook.contains(&format!("/webhooks/runpod/{}?", job.id)));
    assert!(kit.signer.verify(&job.id, token));
    assert_eq!(stored.history.last().unwrap().by, Actor::Dispatch);
}

#[tokio::test]
async fn runpod_unavailable_asks_for_the_message_again_and_the_retry_submits() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.runpod.answer_runs(&[Answer::Transient]);

    let first = kit.dispatcher().dispatch(&job.id).await;

    assert!(matches!(first, Err(RetryLater(_))), "{first:?}");
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Queued);
    assert!(stored.lease.is_none(), "released for the redelivery");
    let second = kit.dispatcher().dispatch(&job.id).await.unwrap();
    assert_eq!(second, DispatchOutcome::Submitted("rp-1".into()));
    assert_eq!(kit.stored(&job.id).attempts, 2);
}

#[tokio::test]
async fn a_permanent_refusal_fails_the_job_with_a_code_and_no_retry() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.runpod.answer_runs(&[Answer::Permanent(400)]);

    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert_eq!(outcome, DispatchOutcome::Failed(ErrorCode::RunpodRejected));
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Failed);
    assert_eq!(stored.error.unwrap().code, ErrorCode::RunpodRejected);
    assert!(
        stored.cleanup_pending,
        "only its clean-up is left to the sweeper"
    );
}

#[tokio::test]
async fn a_missing_input_fails_the_job_without_calling_runpod() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.uploads.delete(&job.input.key).await.unwrap();

    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert_eq!(outcome, DispatchOutcome::Failed(ErrorCode::InputMissing));
    assert_eq!(kit.stored(&job.id).state, JobState::Failed);
    assert!(kit.runpod.calls().is_empty());
}

#[tokio::test]
async fn a_refused_copy_is_retried_rather_than_failing_the_job() {
    // The volume's S3 API has answered 403 for a moment (docs/runpod-platform.md §3); a
    // refusal is retried, and the attempt budget ends it if it persists.
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.uploads.break_key(&job.input.key, BrokenKey::Permanent);

    let outcome = kit.dispatcher().dispatch(&job.id).await;

    assert!(matches!(outcome, Err(RetryLater(_))), "{outcome:?}");
    assert_eq!(kit.stored(&job.id).state, JobState::Queued);
}

#[tokio::test]
async fn a_volume_outage_asks_for_the_message_again() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.volume.break_key(
        &kit.volume_root().input(&job.id, "input.jpg"),
        BrokenKey::Transient,
    );

    let outcome = kit.dispatcher().dispatch(&job.id).await;

    assert!(matches!(outcome, Err(RetryLater(_))), "{outcome:?}");
    assert_eq!(kit.stored(&job.id).state, JobState::Queued);
    assert!(kit.runpod.calls().is_empty());
}

#[tokio::test]
async fn a_duplicate_message_for_a_submitted_job_changes_nothing() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    let writes = kit.store.writes();

    let again = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert_eq!(
        again,
        DispatchOutcome::Skipped("already dispatched or finished")
    );
    assert_eq!(kit.store.writes(), writes);
    assert_eq!(kit.runpod.accepted().len(), 1);
}

#[tokio::test]
async fn a_redelivery_while_another_dispatch_holds_the_job_backs_off_without_a_write() {
    let kit = Kit::new();
    let mut job = kit.queued_job("alice");
    // Another dispatch took the job a moment ago and is still copying its input.
    let read = job.version;
    job.acquire_lease(LeaseKind::Dispatch, kit.now(), 60_000)
        .unwrap();
    job.version += 1;
    kit.store.save(&job, read).await.unwrap();
    let writes = kit.store.writes();

    let outcome = kit.dispatcher().dispatch(&job.id).await;

    assert!(matches!(outcome, Err(RetryLater(_))), "{outcome:?}");
    assert_eq!(kit.store.writes(), writes);
    assert!(kit.runpod.calls().is_empty(), "RunPod is never asked twice");
}

#[tokio::test]
async fn a_job_out_of_attempts_fails_as_exhausted() {
    let kit = Kit::new().with_settings(|s| s.max_dispatch_attempts = 2);
    let job = kit.queued_job("alice");
    kit.runpod
        .answer_runs(&[Answer::Transient, Answer::Transient]);
    assert!(kit.dispatcher().dispatch(&job.id).await.is_err());

    // The last allowed attempt fails too: the job ends rather than waiting for another.
    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert_eq!(
        outcome,
        DispatchOutcome::Failed(ErrorCode::DispatchAttemptsExhausted)
    );
    assert_eq!(kit.stored(&job.id).state, JobState::Failed);
}

#[tokio::test]
async fn a_message_for_a_job_that_does_not_exist_is_consumed() {
    let kit = Kit::new();
    let outcome = kit.dispatcher().dispatch("no-such-job").await.unwrap();
    assert_eq!(outcome, DispatchOutcome::Skipped("no such job"));
}

// ------------------------------------------------------------------ runs nobody recorded

#[tokio::test]
async fn a_lost_run_answer_waits_for_the_run_to_announce_itself_before_dispatching_again() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.runpod.answer_runs(&[Answer::Lost]);

    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert!(
        matches!(outcome, DispatchOutcome::Unconfirmed(_)),
        "{outcome:?}"
    );
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Queued);
    assert!(stored.lease.is_none());
    assert_eq!(stored.unconfirmed_run_at, Some(kit.now()));
    let grace = kit.settings.run_outcome_grace.as_millis() as i64;
    assert_eq!(stored.next_check_at, Some(kit.now() + grace));
    // A redelivery inside the grace starts no second run.
    let again = kit.dispatcher().dispatch(&job.id).await.unwrap();
    assert!(matches!(again, DispatchOutcome::Skipped(_)), "{again:?}");
    assert_eq!(kit.runpod.accepted().len(), 1);
}

#[tokio::test]
async fn after_the_grace_a_job_whose_run_never_announced_itself_is_dispatched_again() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.runpod.answer_runs(&[Answer::Lost]);
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.clock.advance(kit.settings.run_outcome_grace);

    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert_eq!(outcome, DispatchOutcome::Submitted("rp-2".into()));
    let stored = kit.stored(&job.id);
    assert_eq!(stored.unconfirmed_run_at, None);
    assert_eq!(stored.attempts, 2);
}

#[tokio::test]
async fn no_run_starts_with_too_little_of_the_invocation_left_to_record_it() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    let reserve = kit.settings.run_reserve.as_millis() as i64;

    let outcome = kit
        .dispatcher()
        .dispatch_before(&job.id, Some(kit.now() + reserve - 1))
        .await;

    assert!(matches!(outcome, Err(RetryLater(_))), "{outcome:?}");
    assert!(kit.runpod.accepted().is_empty());
    let stored = kit.stored(&job.id);
    assert!(stored.lease.is_none(), "released for the redelivery");
    // With time enough, it goes.
    let outcome = kit
        .dispatcher()
        .dispatch_before(&job.id, Some(kit.now() + reserve))
        .await
        .unwrap();
    assert_eq!(outcome, DispatchOutcome::Submitted("rp-1".into()));
}

#[tokio::test]
async fn a_failed_save_after_run_is_retried_with_the_id_in_hand() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.store
        .fail_saves(2, |job| job.state == JobState::Submitted);

    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert_eq!(outcome, DispatchOutcome::Submitted("rp-1".into()));
    assert_eq!(kit.stored(&job.id).runpod_job_id.as_deref(), Some("rp-1"));
    assert_eq!(kit.runpod.accepted().len(), 1, "never a second run");
}

#[tokio::test]
async fn a_save_that_keeps_failing_after_run_consumes_the_message_without_a_second_run() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.store
        .fail_saves(10, |job| job.state == JobState::Submitted);

    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert!(
        matches!(outcome, DispatchOutcome::Unconfirmed(_)),
        "{outcome:?}"
    );
    assert_eq!(kit.runpod.accepted().len(), 1);
}

#[tokio::test]
async fn a_run_started_after_another_was_adopted_is_cancelled() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    let now = kit.now();
    // While this dispatch's /run is out, a lost earlier run (rp-9) announces itself and is
    // adopted.
    kit.store.interleave(Some(JobState::Submitted), move |job| {
        job.mark_submitted("rp-9".into(), now, now + 60_000)
            .unwrap();
    });

    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert!(
        matches!(outcome, DispatchOutcome::Skipped(_)),
        "{outcome:?}"
    );
    assert_eq!(kit.stored(&job.id).runpod_job_id.as_deref(), Some("rp-9"));
    assert_eq!(kit.stops.runs(), vec!["rp-1".to_string()]);
}

#[tokio::test]
async fn a_recorded_run_whose_save_answer_was_lost_is_the_jobs_run_not_an_extra_one() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    // The lease is taken; the save recording RunPod's id lands, but its answer is lost.
    kit.store.before_save(|store, about_to_write| {
        if about_to_write.runpod_job_id.is_some() {
            store.lose_answers(1);
            return true;
        }
        false
    });

    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert_eq!(outcome, DispatchOutcome::Submitted("rp-1".into()));
    assert_eq!(kit.stored(&job.id).runpod_job_id.as_deref(), Some("rp-1"));
    assert!(
        kit.stops.requested().is_empty(),
        "{:?}",
        kit.stops.requested()
    );
}

// ------------------------------------------------------------------ inputs given by URL

mod url_inputs {
    use gateway::app::api::{JobInput, JobRequest, Refusal, Submitted};
    use gateway::app::dispatch::DispatchOutcome;
    use gateway::domain::job::{ErrorCode, Job, JobState};
    use testkit::images::jpeg;
    use testkit::Kit;

    const URL: &str = "https://photos.example/grandma.jpg";

    fn by_url(url: &str) -> JobRequest {
        JobRequest {
            workflow: "restore".into(),
            params: None,
            input: JobInput {
                image_base64: None,
                upload_id: None,
                url: Some(url.into()),
            },
            retention_secs: None,
            callback_url: None,
            callback_events: None,
            backend: None,
            priority: None,
        }
    }

    async fn submit(kit: &Kit, url: &str) -> Result<Job, Refusal> {
        match kit.api().submit("alice", by_url(url), None).await? {
            Submitted::Accepted(job) => Ok(job),
            Submitted::Existing(job) => Ok(job),
        }
    }

    fn public_host(kit: &Kit) {
        kit.resolver.set("photos.example", &["93.184.216.34"]);
    }

    #[tokio::test]
    async fn a_photo_given_by_url_is_fetched_at_dispatch_checked_and_sent_to_runpod() {
        let kit = Kit::new();
        public_host(&kit);
        kit.urls.serve(URL, &jpeg(64, 48));
        let job = submit(&kit, URL).await.unwrap();
        assert!(kit.urls.opened().is_empty(), "nothing is fetched at submit");

        let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

        assert!(
            matches!(outcome, DispatchOutcome::Submitted(_)),
            "{outcome:?}"
        );
        let stored = kit.stored(&job.id);
        assert_eq!(stored.input.content_type, "image/jpeg");
        assert_eq!(stored.input.size, jpeg(64, 48).len() as u64);
        assert_eq!(kit.uploads.get(&stored.input.key).unwrap(), jpeg(64, 48));
        let on_volume = kit.volume_root().input(&job.id, "input.jpg");
        assert!(kit.volume.get(&on_volume).is_some());
        assert_eq!(
            kit.urls.opened(),
            [(URL.to_string(), "93.184.216.34:443".parse().unwrap())],
            "connected to the address checked"
        );
    }

    #[tokio::test]
    async fn a_url_whose_host_resolves_inside_is_refused_at_submit_and_nothing_is_stored() {
        let kit = Kit::new();
        for (host, ip) in [
            ("metadata.example", "169.254.169.254"),
            ("intranet.example", "10.0.0.8"),
            ("self.example", "127.0.0.1"),
        ] {
            kit.resolver.set(host, &[ip]);
            let refused = submit(&kit, &format!("https://{host}/a.jpg")).await;
            assert!(
                matches!(
                    refused,
                    Err(Refusal::Invalid {
                        code: "input_url_refused",
                        ..
                    })
                ),
                "{host}: {refused:?}"
            );
        }
        for url in [
            "http://photos.example/a.jpg",
            "https://10.1.2.3/a.jpg",
            "https://u:p@photos.example/",
        ] {
            assert!(submit(&kit, url).await.is_err(), "{url}");
        }
        assert!(kit.store.jobs().is_empty());
        assert!(kit.urls.opened().is_empty(), "no traffic for a refused URL");
    }

    #[tokio::test]
    async fn a_host_that_turns_to_an_internal_address_after_submit_is_refused_at_dispatch() {
        let kit = Kit::new();
        public_host(&kit);
        let job = submit(&kit, URL).await.unwrap();
        kit.resolver
            .set("photos.example", &["93.184.216.34", "10.0.0.5"]);

        let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

        assert!(matches!(
            outcome,
            DispatchOutcome::Failed(ErrorCode::InputUnavailable)
        ));
        assert!(kit.urls.opened().is_empty(), "never connected");
        assert_eq!(kit.stored(&job.id).state, JobState::Failed);
    }

    #[tokio::test]
    async fn what_is_not_an_accepted_image_fails_the_job_as_input_rejected() {
        let kit = Kit::new();
        public_host(&kit);
        kit.urls.serve(URL, b"<html>not a photo</html>");
        let job = submit(&kit, URL).await.unwrap();

        let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

        assert!(matches!(
            outcome,
            DispatchOutcome::Failed(ErrorCode::InputRejected)
        ));
        let stored = kit.stored(&job.id);
        assert!(
            kit.uploads.get(&stored.input.key).is_none(),
            "nothing stored"
        );
        assert!(kit.runpod.accepted().is_empty());
    }

    #[tokio::test]
    async fn a_photo_over_the_upload_cap_fails_as_input_rejected() {
        let kit = Kit::new().with_settings(|s| s.max_upload_bytes = 100);
        public_host(&kit);
        kit.urls.serve(URL, &jpeg(64, 48));
        let job = submit(&kit, URL).await.unwrap();

        let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

        assert!(matches!(
            outcome,
            DispatchOutcome::Failed(ErrorCode::InputRejected)
        ));
    }

    #[tokio::test]
    async fn a_missing_photo_fails_as_input_unavailable_and_an_outage_is_retried() {
        let kit = Kit::new();
        public_host(&kit);
        let gone = "https://photos.example/gone.jpg";
        kit.urls.answer(gone, 404);
        let job = submit(&kit, gone).await.unwrap();
        let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();
        assert!(matches!(
            outcome,
            DispatchOutcome::Failed(ErrorCode::InputUnavailable)
        ));

        let down = "https://photos.example/later.jpg";
        kit.urls.answer(down, 503);
        let job = submit(&kit, down).await.unwrap();
        assert!(
            kit.dispatcher().dispatch(&job.id).await.is_err(),
            "retried later"
        );
        assert_eq!(kit.stored(&job.id).state, JobState::Queued);
    }
}

mod priority {
    use gateway::app::api::Submitted;
    use gateway::domain::job::Priority;
    use testkit::images::jpeg;
    use testkit::jobs::inline_request;
    use testkit::Kit;

    async fn submitted(kit: &Kit, priority: Option<&str>) -> gateway::domain::job::Job {
        let mut request = inline_request(&jpeg(64, 48));
        request.priority = priority.map(str::to_string);
        match kit.api().submit("alice", request, None).await.unwrap() {
            Submitted::Accepted(job) => job,
            Submitted::Existing(job) => job,
        }
    }

    #[tokio::test]
    async fn a_low_priority_job_asks_runpod_not_to_scale_up_for_it() {
        let kit = Kit::new();
        let job = submitted(&kit, Some("low")).await;
        assert_eq!(job.priority, Priority::Low);

        kit.dispatcher().dispatch(&job.id).await.unwrap();

        assert!(kit.runpod.accepted()[0].policy.low_priority);
    }

    #[tokio::test]
    async fn a_job_that_does_not_say_is_normal_and_may_scale_runpod_up() {
        let kit = Kit::new();
        let job = submitted(&kit, None).await;

        kit.dispatcher().dispatch(&job.id).await.unwrap();

        assert_eq!(job.priority, Priority::Normal);
        assert!(!kit.runpod.accepted()[0].policy.low_priority);
    }

    #[tokio::test]
    async fn an_unknown_priority_is_refused() {
        let kit = Kit::new();
        let mut request = inline_request(&jpeg(64, 48));
        request.priority = Some("urgent".into());

        let refusal = kit.api().submit("alice", request, None).await.unwrap_err();

        assert_eq!(refusal.code(), "invalid_priority");
        assert!(kit.store.jobs().is_empty());
    }
}
