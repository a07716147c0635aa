//! The adapters against real protocol servers (moto): what the use cases rely on them for.
use std::collections::BTreeMap;

use gateway::app::transfer;
use gateway::domain::job::{ErrorCode, InputRef, Job, JobError, JobTiming, NewJob};
use gateway::domain::workflow::ValidatedParams;
use gateway::ports::{JobStore, ObjectStore, StoreError};
use gateway_aws::adapters::dynamodb::{create_table, DynamoJobStore};
use gateway_aws::adapters::s3::S3ObjectStore;
use gateway_tests::aws_sdk_config;

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

async fn store() -> DynamoJobStore {
    let sdk = aws_sdk_config().await;
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    let table = unique("jobs");
    create_table(&client, &table).await.unwrap();
    DynamoJobStore::new(client, table)
}

fn job(owner: &str, now: i64, first_check_ms: i64) -> Job {
    Job::new(
        NewJob {
            id: uuid::Uuid::now_v7().to_string(),
            owner: owner.into(),
            workflow: "restore".into(),
            workflow_version: "1".into(),
            params: ValidatedParams(BTreeMap::new()),
            input: InputRef {
                key: "inputs/x/input.jpg".into(),
                content_type: "image/jpeg".into(),
                size: 1,
                extension: "jpg".into(),
                source_url: None,
            },
            idempotency_key: None,
            request_digest: None,
            callback_url: None,
            callback_events: Vec::new(),
            backend: Default::default(),
            priority: Default::default(),
        },
        JobTiming {
            deadline_ms: 3_600_000,
            first_check_ms,
            retention_secs: 3_600,
            tombstone_secs: 7 * 86_400,
            idempotency_window_secs: 86_400,
            cleanup_delay_ms: 120_000,
        },
        now,
    )
}

#[tokio::test]
async fn a_write_based_on_a_stale_version_is_refused() {
    let store = store().await;
    let original = job("alice", 1_000, 60_000);
    store.create(&original).await.unwrap();

    let mut first = original.clone();
    first.mark_running(2_000).unwrap();
    store.save(&first, original.version).await.unwrap();

    let mut second = original.clone();
    second
        .fail(JobError::new(ErrorCode::WorkerFailed, "late"), 3_000)
        .unwrap();
    assert!(matches!(
        store.save(&second, original.version).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.get(&original.id).await.unwrap().unwrap(), first);
}

/// `job` ended as `commit_as` ends it: the next version, carrying its usage.
fn ended(job: &Job, gpu_ms: u64, at: i64) -> Job {
    let mut ended = job.clone();
    ended.execution_time_ms = Some(gpu_ms);
    ended
        .fail(JobError::new(ErrorCode::WorkerFailed, "boom"), at)
        .unwrap();
    ended.version = job.version + 1;
    ended.count_usage(ended.version);
    ended
}

#[tokio::test]
async fn the_write_that_ends_a_job_adds_it_to_its_owners_usage_once() {
    let store = store().await;
    let original = job("alice", 1_800_000_000_000, 60_000);
    store.create(&original).await.unwrap();
    let day = gateway::domain::job::utc_day(1_800_000_000_000);

    let end = ended(&original, 1_500, 1_800_000_001_000);
    store.save(&end, original.version).await.unwrap();
    // A later write of the ended job (its clean-up) adds nothing.
    let mut later = end.clone();
    later.cleanup_pending = false;
    later.version += 1;
    store.save(&later, end.version).await.unwrap();

    let usage = store
        .usage("alice", std::slice::from_ref(&day))
        .await
        .unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!((usage[0].failed, usage[0].gpu_ms), (1, 1_500));
    assert!(store.usage("bob", &[day]).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_ending_write_that_loses_its_race_adds_nothing() {
    let store = store().await;
    let original = job("alice", 1_800_000_000_000, 60_000);
    store.create(&original).await.unwrap();
    let mut first = original.clone();
    first.mark_running(1_800_000_000_500).unwrap();
    first.version += 1;
    store.save(&first, original.version).await.unwrap();

    let stale = ended(&original, 900, 1_800_000_001_000);
    let refused = store.save(&stale, original.version).await;

    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    let day = gateway::domain::job::utc_day(1_800_000_000_000);
    assert!(store.usage("alice", &[day]).await.unwrap().is_empty());
}

#[tokio::test]
async fn usage_is_read_for_many_days_at_once_and_only_days_with_jobs_come_back() {
    let store = store().await;
    let days: Vec<String> = (0..150)
        .map(|d| gateway::domain::job::utc_day(1_800_000_000_000 + d * 86_400_000))
        .collect();
    for at in [1_800_000_000_000, 1_800_000_000_000 + 120 * 86_400_000] {
        let original = job("alice", at, 60_000);
        store.create(&original).await.unwrap();
        store
            .save(&ended(&original, 10, at + 1_000), original.version)
            .await
            .unwrap();
    }

    let usage = store.usage("alice", &days).await.unwrap();

    let found: Vec<&str> = usage.iter().map(|u| u.day.as_str()).collect();
    assert_eq!(found, [days[0].as_str(), days[120].as_str()]);
}

#[tokio::test]
async fn creating_a_job_whose_id_another_job_holds_is_refused() {
    let store = store().await;
    let job = job("alice", 1_000, 60_000);
    store.create(&job).await.unwrap();
    let mut other = job.clone();
    other.owner = "bob".into();
    assert!(store.create(&other).await.is_err());
    assert_eq!(store.get(&job.id).await.unwrap().unwrap(), job);
}

#[tokio::test]
async fn a_create_that_meets_its_own_committed_write_is_created() {
    // What the SDK's retry of a create whose answer was lost sees: its own job, already there.
    let store = store().await;
    let job = job("alice", 1_000, 60_000);
    store.create(&job).await.unwrap();
    assert!(matches!(
        store.create(&job).await,
        Ok(gateway::ports::CreateOutcome::Created)
    ));
}

#[tokio::test]
async fn the_sweeper_query_reads_only_jobs_that_are_due() {
    let store = store().await;
    let now = 10_000_000;
    for _ in 0..30 {
        let mut finished = job("alice", now - 50_000, 1_000);
        finished.succeed(vec![], now - 40_000).unwrap();
        store.create(&finished).await.unwrap();
    }
    let mut due = Vec::new();
    for _ in 0..5 {
        let j = job("alice", now - 50_000, 1_000);
        store.create(&j).await.unwrap();
        due.push(j.id);
    }
    for _ in 0..5 {
        store.create(&job("alice", now, 60_000)).await.unwrap();
    }

    let found = store.due_for_check(now, 100).await.unwrap();
    let mut ids: Vec<_> = found.jobs.iter().map(|j| j.id.clone()).collect();
    ids.sort();
    due.sort();
    assert_eq!(ids, due);
    assert_eq!(
        found.items_read, 5,
        "the sweep read items that were not due"
    );
}

#[tokio::test]
async fn listing_pages_stay_within_one_owner() {
    let store = store().await;
    for owner in ["alice", "bob", "alice", "alice"] {
        store.create(&job(owner, 1_000, 60_000)).await.unwrap();
    }
    let page = store.list_by_owner("alice", None, 2, None).await.unwrap();
    assert_eq!(page.jobs.len(), 2);
    let rest = store
        .list_by_owner("alice", None, 2, page.cursor.as_deref())
        .await
        .unwrap();
    assert_eq!(rest.jobs.len(), 1);
    assert!(rest
        .jobs
        .iter()
        .chain(&page.jobs)
        .all(|j| j.owner == "alice"));
    assert!(matches!(
        store
            .list_by_owner("bob", None, 2, page.cursor.as_deref())
            .await,
        Err(StoreError::Corrupt(_))
    ));
}

#[tokio::test]
async fn a_status_listing_reads_only_that_status_and_its_cursor_only_goes_on_it() {
    let store = store().await;
    let mut running = Vec::new();
    for n in 0..5 {
        let queued = job("alice", 1_000 + n, 60_000);
        store.create(&queued).await.unwrap();
        if n % 2 == 0 {
            let mut moved = queued.clone();
            moved.mark_running(2_000).unwrap();
            moved.version += 1;
            store.save(&moved, queued.version).await.unwrap();
            running.push(moved.id);
        }
    }
    store.create(&job("bob", 1_000, 60_000)).await.unwrap();
    let running_state = Some(gateway::domain::job::JobState::Running);

    let first = store
        .list_by_owner("alice", running_state, 2, None)
        .await
        .unwrap();
    let rest = store
        .list_by_owner("alice", running_state, 2, first.cursor.as_deref())
        .await
        .unwrap();

    let mut listed: Vec<String> = first
        .jobs
        .iter()
        .chain(&rest.jobs)
        .map(|j| j.id.clone())
        .collect();
    listed.sort();
    running.sort();
    assert_eq!(listed, running);
    assert!(rest.cursor.is_none() || rest.jobs.len() == 1);
    assert!(matches!(
        store
            .list_by_owner("alice", None, 2, first.cursor.as_deref())
            .await,
        Err(StoreError::Corrupt(_))
    ));
}

#[tokio::test]
async fn a_large_object_is_copied_in_parts_and_arrives_intact() {
    let sdk = aws_sdk_config().await;
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    );
    let (from_bucket, to_bucket) = (unique("from"), unique("to"));
    for bucket in [&from_bucket, &to_bucket] {
        client.create_bucket().bucket(bucket).send().await.unwrap();
    }
    let part = 5 * 1024 * 1024;
    let from = S3ObjectStore::new(client.clone(), &from_bucket);
    let to = S3ObjectStore::new(client.clone(), &to_bucket).with_part_size(part);
    let data: Vec<u8> = (0..(12 * 1024 * 1024 + 123))
        .map(|i: u32| (i * 31 % 251) as u8)
        .collect();
    from.put_bytes("big.bin", data.clone().into(), "application/octet-stream")
        .await
        .unwrap();

    let meta = transfer::copy(&from, "big.bin", &to, "copied.bin", Some("image/png"))
        .await
        .unwrap();
    assert_eq!(meta.size, data.len() as u64);

    let out = client
        .get_object()
        .bucket(&to_bucket)
        .key("copied.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(out.content_type(), Some("image/png"));
    let etag = out.e_tag().unwrap_or_default().to_string();
    assert!(etag.contains("-3"), "expected a 3-part upload, etag {etag}");
    let copied = out.body.collect().await.unwrap().into_bytes();
    assert!(copied == data, "copied bytes differ");
}

/// An object store over a new, empty bucket in moto.
async fn fresh_bucket() -> S3ObjectStore {
    let sdk = aws_sdk_config().await;
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    );
    let bucket = unique("b");
    client.create_bucket().bucket(&bucket).send().await.unwrap();
    S3ObjectStore::new(client, &bucket)
}

#[tokio::test]
async fn a_missing_object_is_reported_as_not_found() {
    let store = fresh_bucket().await;
    assert!(store.head("nope").await.unwrap().is_none());
    assert!(matches!(
        store.open("nope").await.map(|_| ()),
        Err(gateway::ports::ObjectError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_listing_finds_every_key_under_a_folder_at_any_depth_and_nothing_beside_it() {
    let store = fresh_bucket().await;
    let inside = [
        "outputs/j1/a.png",
        "outputs/j1/a1/b.png",
        "outputs/j1/a1/x/c.png",
    ];
    let beside = [
        "outputs/j10/a.png",
        "outputs/j2/a.png",
        "inputs/j1/input.jpg",
    ];
    for key in inside.iter().chain(beside.iter()) {
        store
            .put_bytes(key, bytes::Bytes::from_static(b"x"), "image/png")
            .await
            .unwrap();
    }

    let listed = store.list("outputs/j1/", 100).await.unwrap();

    assert_eq!(listed, inside.map(String::from).to_vec());
    assert_eq!(
        store.list("outputs/j1/", 2).await.unwrap().len(),
        2,
        "bounded"
    );
    assert!(store.list("outputs/none/", 100).await.unwrap().is_empty());
}

#[tokio::test]
async fn unreadable_records_in_the_sweep_index_are_reported_and_do_not_crowd_out_due_jobs() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let store = store().await;
    let client = aws_sdk_dynamodb::Client::new(&aws_sdk_config().await);
    let now = 10_000_000;
    let readable = job("alice", now - 50_000, 1_000);
    store.create(&readable).await.unwrap();
    // Older than the readable job, so the index returns them first, in every shard.
    for i in 0..12 {
        let key = format!("broken-{i}");
        client
            .put_item()
            .table_name(store.table())
            .item("pk", AttributeValue::S(key.clone()))
            .item(
                "sweep_shard",
                AttributeValue::S(gateway::domain::keys::sweep_shard_of(&key)),
            )
            .item(
                "next_check_at",
                AttributeValue::N((now - 60_000).to_string()),
            )
            .item("doc", AttributeValue::S("{not a job".into()))
            .send()
            .await
            .unwrap();
    }

    // One job per shard at most: the broken records must not use up the limit.
    let found = store.due_for_check(now, 4).await.unwrap();

    assert_eq!(found.jobs.len(), 1);
    assert_eq!(found.jobs[0].id, readable.id);
    assert_eq!(found.unreadable.len(), 12, "{:?}", found.unreadable);
    assert!(found.unreadable.iter().all(|k| k.starts_with("broken-")));
    assert!(found.failed_parts.is_empty());
}

#[tokio::test]
async fn an_idempotency_key_stands_for_its_job_until_its_window_ends() {
    let store = store().await;
    let now = 1_800_000_000_000;
    let mut first = job("alice", now, 60_000);
    first.idempotency_key = Some("order-1".into());
    first.idempotency_expires_at = Some(now / 1000 + 3_600);
    store.create(&first).await.unwrap();

    let found = store
        .find_by_idempotency_key("alice", "order-1", now + 1_000)
        .await
        .unwrap();
    assert_eq!(found.map(|j| j.id), Some(first.id.clone()));
    assert!(store
        .find_by_idempotency_key("bob", "order-1", now)
        .await
        .unwrap()
        .is_none());

    // Past the window (TTL has not deleted the item yet): the key is free for a new job.
    let later = now + 3_601_000;
    assert!(store
        .find_by_idempotency_key("alice", "order-1", later)
        .await
        .unwrap()
        .is_none());
    let mut second = job("alice", later, 60_000);
    second.idempotency_key = Some("order-1".into());
    second.idempotency_expires_at = Some(later / 1000 + 3_600);
    assert!(matches!(
        store.create(&second).await.unwrap(),
        gateway::ports::CreateOutcome::Created
    ));
}

#[tokio::test]
async fn a_stream_that_dies_mid_copy_leaves_no_multipart_upload_behind() {
    use futures::StreamExt;
    use gateway::ports::{ObjectError, ObjectMeta};
    let sdk = aws_sdk_config().await;
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    );
    let bucket = unique("cut");
    client.create_bucket().bucket(&bucket).send().await.unwrap();
    let part = 5 * 1024 * 1024;
    let store = S3ObjectStore::new(client.clone(), &bucket).with_part_size(part);
    // Two parts' worth arrive, then the source breaks off.
    let chunks: Vec<Result<bytes::Bytes, ObjectError>> = vec![
        Ok(vec![1u8; part].into()),
        Ok(vec![2u8; part].into()),
        Err(ObjectError::Transient("connection reset (test)".into())),
    ];
    let meta = ObjectMeta {
        size: 3 * part as u64,
        content_type: Some("image/png".into()),
    };

    let result = store
        .put_stream("cut.png", &meta, futures::stream::iter(chunks).boxed())
        .await;

    assert!(result.is_err());
    let uploads = client
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert!(
        uploads.uploads().is_empty(),
        "left behind: {:?}",
        uploads.uploads()
    );
    let listed = client
        .list_objects_v2()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert!(listed.contents().is_empty(), "no object either");
}

#[tokio::test]
async fn a_delivery_log_is_written_on_the_version_read_and_reads_back() {
    use gateway::domain::callback::{AttemptResult, DeliveryLog};
    use gateway::ports::DeliveryLogs;
    let store = store().await;
    assert!(store.delivery_log("job-1").await.unwrap().is_none());
    let mut log = DeliveryLog::new("job-1", "alice");
    log.add(
        "msg_1",
        "job.succeeded",
        "https://c.example/",
        "{}".into(),
        1_000,
    )
    .unwrap();

    store.save_delivery_log(&log, 0).await.unwrap();
    assert!(matches!(
        store.save_delivery_log(&log, 0).await,
        Err(StoreError::Conflict)
    ));
    let (mut read, version) = store.delivery_log("job-1").await.unwrap().unwrap();
    assert_eq!((read.clone(), version), (log, 1));
    read.record("msg_1", &AttemptResult::Delivered(200), 2_000, 0.0)
        .unwrap();
    store.save_delivery_log(&read, 1).await.unwrap();
    assert!(matches!(
        store.save_delivery_log(&read, 1).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store.delivery_log("job-1").await.unwrap().unwrap(),
        (read, 2)
    );
}

#[tokio::test]
async fn an_owners_signing_secrets_are_kept_sealed_by_kms_and_rotate_keeping_the_previous_one() {
    use gateway::ports::SigningKeys;
    use gateway_aws::adapters::signing_keys::{kms_client, KmsSigningKeys};
    let sdk = aws_sdk_config().await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let table = unique("jobs");
    create_table(&dynamodb, &table).await.unwrap();
    let kms = kms_client(&sdk);
    let key = aws_sdk_kms::Client::new(&sdk)
        .create_key()
        .send()
        .await
        .unwrap()
        .key_metadata()
        .unwrap()
        .key_id()
        .to_string();
    let keys = KmsSigningKeys::new(dynamodb.clone(), &table, kms, &key);

    let first = keys.secrets("alice").await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        keys.secrets("alice").await.unwrap(),
        first,
        "the same on every read"
    );
    assert_ne!(keys.secrets("bob").await.unwrap(), first);
    // What the table holds is not the secret.
    let item = dynamodb
        .get_item()
        .table_name(&table)
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S("signing#alice".into()),
        )
        .send()
        .await
        .unwrap();
    let stored = format!("{:?}", item.item().unwrap());
    assert!(!stored.contains(first[0].expose().trim_start_matches("whsec_")));

    let rotated = keys.rotate("alice").await.unwrap();
    assert_eq!(rotated.len(), 2);
    assert_eq!(rotated[1], first[0]);
    let again = keys.rotate("alice").await.unwrap();
    assert_eq!(
        (again.len(), &again[1]),
        (2, &rotated[0]),
        "only one previous secret is kept"
    );
    assert_eq!(keys.secrets("alice").await.unwrap(), again);
}

mod tenants {
    use super::store;
    use gateway::domain::tenant::{LimitOverrides, TenantLimits};
    use gateway::ports::TenantStore;

    fn limits(per_minute: u32, burst: u32) -> TenantLimits {
        TenantLimits {
            max_in_flight: 0,
            submits_per_minute: per_minute,
            submit_burst: burst,
        }
    }

    #[tokio::test]
    async fn concurrent_submits_of_one_owner_spend_each_token_once() {
        let store = store().await;
        let rate = limits(60, 5).rate().unwrap();
        let now = 1_800_000_000_000;

        let spends =
            futures::future::join_all((0..20).map(|_| store.spend_submit("alice", &rate, now)))
                .await;

        let allowed = spends
            .iter()
            .filter(|spent| matches!(spent, Ok(Ok(()))))
            .count();
        assert_eq!(allowed, 5, "{spends:?}");
        assert!(spends.iter().all(|spent| spent.is_ok()), "{spends:?}");
    }

    #[tokio::test]
    async fn a_spent_bucket_refuses_with_the_wait_and_refills_at_the_rate() {
        let store = store().await;
        let rate = limits(60, 2).rate().unwrap();
        let now = 1_800_000_000_000;
        for _ in 0..2 {
            assert_eq!(store.spend_submit("bob", &rate, now).await.unwrap(), Ok(()));
        }

        assert_eq!(
            store.spend_submit("bob", &rate, now).await.unwrap(),
            Err(1_000)
        );
        assert_eq!(
            store.spend_submit("bob", &rate, now + 1_000).await.unwrap(),
            Ok(())
        );
    }

    #[tokio::test]
    async fn an_operators_overrides_read_back_with_absent_fields_absent() {
        let store = store().await;
        let overrides = LimitOverrides {
            max_in_flight: Some(50),
            ..LimitOverrides::default()
        };

        store.set_overrides("acme", &overrides).await.unwrap();

        assert_eq!(store.overrides("acme").await.unwrap(), Some(overrides));
        assert_eq!(store.overrides("nobody").await.unwrap(), None);
    }
}
