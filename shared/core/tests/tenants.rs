//! Per-tenant limits: an owner's jobs past its in-flight limit wait queued, holding nothing at
//! the backend, and go in order (normal before low) as its jobs end; an owner submitting too
//! fast is refused with when to retry. One owner's backlog never delays another's jobs.
use std::time::Duration;

use gateway::app::api::{Refusal, Submitted};
use gateway::app::batches::BatchRequest;
use gateway::domain::job::{Job, JobState};
use gateway::domain::tenant::{LimitOverrides, TenantLimits};
use gateway::ports::TenantStore;
use testkit::images::jpeg;
use testkit::jobs::inline_request;
use testkit::Kit;

fn kit(max_in_flight: u32, submits_per_minute: u32, submit_burst: u32) -> Kit {
    Kit::new().with_settings(|s| {
        s.tenant_limits = TenantLimits {
            max_in_flight,
            submits_per_minute,
            submit_burst,
        }
    })
}

async fn submit(kit: &Kit, owner: &str, priority: Option<&str>) -> Result<Job, Refusal> {
    let mut request = inline_request(&jpeg(64, 48));
    request.priority = priority.map(str::to_string);
    match kit.api().submit(owner, request, None).await? {
        Submitted::Accepted(job) | Submitted::Existing(job) => Ok(job),
    }
}

async fn submit_many(kit: &Kit, owner: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        ids.push(submit(kit, owner, None).await.unwrap().id);
    }
    ids
}

/// The client cancels `job_id`; the end's notice gives its slots back and wakes the next.
async fn end(kit: &Kit, owner: &str, job_id: &str) {
    kit.api().cancel(owner, job_id).await.unwrap();
    kit.deliver_waiting().await;
}

mod in_flight {
    use super::*;

    #[tokio::test]
    async fn jobs_past_the_limit_wait_queued_holding_nothing_at_runpod() {
        let kit = kit(2, 0, 0);
        let jobs = submit_many(&kit, "alice", 3).await;

        let dispatched = kit.dispatch_waiting().await;

        assert_eq!(dispatched, jobs[..2]);
        assert_eq!(kit.runpod.accepted().len(), 2);
        assert_eq!(kit.stored(&jobs[2]).state, JobState::Queued);
    }

    #[tokio::test]
    async fn an_ended_job_lets_the_owners_next_job_go_in_order() {
        let kit = kit(1, 0, 0);
        let jobs = submit_many(&kit, "alice", 3).await;
        kit.dispatch_waiting().await;

        end(&kit, "alice", &jobs[0]).await;

        assert_eq!(kit.dispatch_waiting().await, vec![jobs[1].clone()]);
        assert_eq!(kit.stored(&jobs[2]).state, JobState::Queued);
    }

    #[tokio::test]
    async fn a_job_that_ends_while_waiting_gives_up_its_place() {
        let kit = kit(1, 0, 0);
        let jobs = submit_many(&kit, "alice", 3).await;
        kit.dispatch_waiting().await;

        end(&kit, "alice", &jobs[1]).await;
        end(&kit, "alice", &jobs[0]).await;

        assert_eq!(kit.dispatch_waiting().await, vec![jobs[2].clone()]);
    }

    #[tokio::test]
    async fn a_small_owner_is_not_starved_by_a_big_owners_backlog() {
        // Room for all of the small owner's jobs at once: a limit below that would hold the
        // small owner back by its own jobs, not the big one's.
        const LIMIT: usize = 8;
        let kit = kit(LIMIT as u32, 0, 0);
        // The worst case for the small owner: the big one's 500 jobs are all ahead of its 5.
        let big = submit_many(&kit, "big", 500).await;
        let small = submit_many(&kit, "small", 5).await;

        let mut order = kit.dispatch_waiting().await;
        end(&kit, "big", &big[0]).await;
        order.extend(kit.dispatch_waiting().await);

        let next_big = order
            .iter()
            .position(|id| *id == big[LIMIT])
            .expect("the big owner's next job goes once one of its jobs ended");
        for id in &small {
            let at = order.iter().position(|o| o == id).expect("dispatched");
            assert!(
                at < next_big,
                "a small owner's job went after the big owner's {}th",
                LIMIT + 1
            );
        }
        assert_eq!(
            order.iter().filter(|id| big.contains(id)).count(),
            LIMIT + 1
        );
    }

    #[tokio::test]
    async fn an_operators_override_applies_to_that_owner_only() {
        let kit = kit(1, 0, 0);
        kit.tenants
            .set_overrides(
                "big",
                &LimitOverrides {
                    max_in_flight: Some(3),
                    ..LimitOverrides::default()
                },
            )
            .await
            .unwrap();
        let big = submit_many(&kit, "big", 4).await;
        let small = submit_many(&kit, "small", 2).await;

        let dispatched = kit.dispatch_waiting().await;

        assert_eq!(dispatched.iter().filter(|id| big.contains(id)).count(), 3);
        assert_eq!(dispatched.iter().filter(|id| small.contains(id)).count(), 1);
    }

    #[tokio::test]
    async fn time_held_back_counts_against_the_deadline_and_the_error_says_so() {
        let kit = kit(1, 0, 0);
        let jobs = submit_many(&kit, "alice", 2).await;
        kit.dispatch_waiting().await;

        kit.clock
            .advance(kit.settings.job_deadline + Duration::from_secs(1));
        kit.sweeper().sweep().await.unwrap();

        let held = kit.stored(&jobs[1]);
        assert_eq!(held.state, JobState::TimedOut);
        let error = held.error.unwrap();
        assert_eq!(error.code.as_str(), "deadline_exceeded");
        assert!(error.message.contains("still queued"), "{}", error.message);
    }

    #[tokio::test]
    async fn no_limit_holds_nothing_and_asks_for_no_end_notice() {
        let kit = kit(0, 0, 0);

        let job = submit(&kit, "alice", None).await.unwrap();

        assert!(job.holds.is_empty());
        assert!(!job.callback_pending);
    }
}

mod priority {
    use super::*;

    #[tokio::test]
    async fn within_an_owner_normal_jobs_go_before_low_ones() {
        let kit = kit(1, 0, 0);
        let first = submit(&kit, "alice", None).await.unwrap();
        kit.dispatch_waiting().await;
        let low = submit(&kit, "alice", Some("low")).await.unwrap();
        let normal = submit(&kit, "alice", None).await.unwrap();
        kit.dispatch_waiting().await;

        end(&kit, "alice", &first.id).await;

        assert_eq!(kit.dispatch_waiting().await, vec![normal.id.clone()]);
        end(&kit, "alice", &normal.id).await;
        assert_eq!(kit.dispatch_waiting().await, vec![low.id]);
    }

    #[tokio::test]
    async fn a_low_job_goes_at_once_while_the_owner_has_a_slot_free() {
        let kit = kit(2, 0, 0);

        let low = submit(&kit, "alice", Some("low")).await.unwrap();

        assert_eq!(kit.dispatch_waiting().await, vec![low.id]);
    }
}

mod batches {
    use super::*;

    pub(super) fn batch(inputs: usize, max_in_flight: u32) -> BatchRequest {
        use base64::Engine as _;
        BatchRequest {
            workflow: "restore".into(),
            inputs: (0..inputs)
                .map(|_| gateway::app::api::JobInput {
                    image_base64: Some(
                        base64::engine::general_purpose::STANDARD.encode(jpeg(64, 48)),
                    ),
                    upload_id: None,
                    url: None,
                })
                .collect(),
            max_in_flight: Some(max_in_flight),
            ..BatchRequest::default()
        }
    }

    #[tokio::test]
    async fn a_batch_is_kept_to_the_lower_of_its_own_and_its_owners_limit() {
        let kit = kit(2, 0, 0);
        kit.api().submit_batch("alice", batch(5, 3)).await.unwrap();

        assert_eq!(kit.dispatch_waiting().await.len(), 2);
    }

    #[tokio::test]
    async fn every_job_of_a_batch_under_both_limits_runs_in_the_end() {
        let kit = kit(2, 0, 0);
        let (_, jobs) = kit.api().submit_batch("alice", batch(7, 3)).await.unwrap();
        // The owner's other jobs compete for its slots with the batch's.
        let single = submit_many(&kit, "alice", 2).await;
        let mut ran = kit.dispatch_waiting().await;

        // Each round ends what runs; a deadlock would leave jobs queued with nothing running.
        for _ in 0..20 {
            let running: Vec<String> = ran
                .iter()
                .filter(|id| !kit.stored(id).is_terminal())
                .cloned()
                .collect();
            if running.is_empty() {
                break;
            }
            assert!(running.len() <= 2, "over the owner's limit: {running:?}");
            for id in &running {
                end(&kit, "alice", id).await;
            }
            ran.extend(kit.dispatch_waiting().await);
        }

        for id in jobs.iter().map(|j| &j.id).chain(&single) {
            assert!(ran.contains(id), "{id} never ran");
        }
    }
}

mod rate {
    use super::*;

    #[tokio::test]
    async fn a_submit_over_the_rate_is_refused_with_when_to_retry_and_stores_nothing() {
        let kit = kit(0, 60, 2);
        submit_many(&kit, "alice", 2).await;

        let refusal = submit(&kit, "alice", None).await.unwrap_err();

        assert_eq!(
            refusal,
            Refusal::RateLimited {
                retry_after_secs: 1
            }
        );
        assert_eq!(refusal.code(), "rate_limited");
        assert_eq!(kit.store.jobs().len(), 2);
        assert!(
            kit.uploads.keys().len() == 2,
            "no input stored for the refused one"
        );
    }

    #[tokio::test]
    async fn a_token_comes_back_after_the_wait_it_named() {
        let kit = kit(0, 60, 1);
        submit(&kit, "alice", None).await.unwrap();
        let Refusal::RateLimited { retry_after_secs } =
            submit(&kit, "alice", None).await.unwrap_err()
        else {
            panic!("not rate limited");
        };

        kit.clock.advance(Duration::from_secs(retry_after_secs));

        submit(&kit, "alice", None).await.unwrap();
    }

    #[tokio::test]
    async fn one_owners_rate_does_not_touch_anothers() {
        let kit = kit(0, 60, 1);
        submit(&kit, "alice", None).await.unwrap();

        submit(&kit, "bob", None).await.unwrap();
    }

    #[tokio::test]
    async fn a_replayed_submit_costs_no_token() {
        let kit = kit(0, 60, 1);
        let request = || inline_request(&jpeg(64, 48));
        kit.api()
            .submit("alice", request(), Some(b"key-1"))
            .await
            .unwrap();

        let replay = kit
            .api()
            .submit("alice", request(), Some(b"key-1"))
            .await
            .unwrap();

        assert!(matches!(replay, Submitted::Existing(_)));
    }

    #[tokio::test]
    async fn a_batch_is_one_request() {
        let kit = kit(0, 60, 1);

        let (_, jobs) = kit
            .api()
            .submit_batch("alice", batches::batch(3, 1))
            .await
            .unwrap();

        assert_eq!(jobs.len(), 3);
    }

    #[tokio::test]
    async fn an_owners_limits_are_read_from_the_table_at_most_once_a_minute() {
        let kit = kit(0, 600, 100);
        let api = kit.api();
        for _ in 0..3 {
            api.submit("alice", inline_request(&jpeg(64, 48)), None)
                .await
                .unwrap();
        }
        kit.clock.advance(Duration::from_secs(61));
        api.submit("alice", inline_request(&jpeg(64, 48)), None)
            .await
            .unwrap();

        assert_eq!(
            kit.tenants.reads.load(std::sync::atomic::Ordering::SeqCst),
            2
        );
    }
}
