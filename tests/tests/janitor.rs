//! The volume's janitor against the emulator's volume, through the real S3 adapter: what it
//! removes, what it leaves, and listings that repeat their pages.
use std::sync::Arc;
use std::time::Duration;

use gateway::app::janitor::Janitor;
use gateway::config::VolumeConfig;
use gateway::domain::job::{mint_job_id, Millis};
use gateway::domain::keys::VolumeRoot;
use gateway::ports::{Clock, SystemClock};
use gateway_aws::adapters::s3::{volume_client, S3ObjectStore};
use gateway_tests::{Stack, StackOptions, ALICE};
use testkit::fakes::ManualClock;
use testkit::stack_env::LOCAL_VOLUME_ROOT;

const TIMEOUT: Duration = Duration::from_secs(30);
const DAY: Duration = Duration::from_secs(86_400);

fn root() -> VolumeRoot {
    VolumeRoot::new(LOCAL_VOLUME_ROOT).unwrap()
}

/// The stack's janitor, its clock `ahead` of now, listing `page` entries at a time.
fn janitor(stack: &Stack, ahead: Duration, page: Option<i32>) -> Janitor {
    let mut janitor = stack.wiring().janitor().unwrap();
    let now = SystemClock.now_ms();
    janitor.clock = Arc::new(ManualClock::at(now + ahead.as_millis() as Millis));
    if let Some(page) = page {
        let config = VolumeConfig::from_env(&stack.env).unwrap();
        let store = Arc::new(
            S3ObjectStore::new(volume_client(&config), config.volume_id).listing_pages_of(page),
        );
        janitor.volume = store.clone();
        janitor.staged = store;
    }
    janitor
}

/// Writes `key` on the volume as a worker writes its files: straight to the disk.
fn put(stack: &Stack, key: &str) {
    let path = stack.emulator.volume_dir.join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"file").unwrap();
}

fn exists(stack: &Stack, key: &str) -> bool {
    stack.emulator.volume_dir.join(key).exists()
}

/// Begins a multipart upload to `key` with one part, and leaves it unfinished.
async fn abandoned_upload(stack: &Stack, key: &str) {
    let config = VolumeConfig::from_env(&stack.env).unwrap();
    let client = volume_client(&config);
    let upload = client
        .create_multipart_upload()
        .bucket(&config.volume_id)
        .key(key)
        .send()
        .await
        .unwrap();
    client
        .upload_part()
        .bucket(&config.volume_id)
        .key(key)
        .upload_id(upload.upload_id().unwrap())
        .part_number(1)
        .body(vec![7u8; 64 * 1024].into())
        .send()
        .await
        .unwrap();
}

/// The job folders left under the stack's root.
fn job_folders(stack: &Stack) -> Vec<String> {
    let mut left = Vec::new();
    for parent in root().job_folders() {
        let dir = stack.emulator.volume_dir.join(&parent);
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            left.push(format!("{parent}{}", entry.file_name().to_string_lossy()));
        }
    }
    left
}

#[tokio::test]
async fn the_janitor_removes_what_ended_and_forgotten_jobs_left_and_nothing_else() {
    let stack = Stack::start_with(StackOptions::default()).await;
    let (job_id, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(
        !stack.on_the_volume(&job_id).is_empty(),
        "the run's input and output, before any clean-up"
    );
    // A run that wrote after its job ended, a job this stack no longer knows, and what is not
    // this stack's: another stack's folder and a model at the volume's root.
    let late = format!("{}a2/restore_00001_.png", root().outputs(&job_id));
    put(&stack, &late);
    let forgotten = mint_job_id(SystemClock.now_ms() - 1_000);
    put(&stack, &root().input(&forgotten, "input.jpg"));
    put(&stack, &format!("{}a1/x.png", root().outputs(&forgotten)));
    let theirs = [
        format!("gateway/other-stack/outputs/{forgotten}/x.png"),
        "models/checkpoints/v1.safetensors".to_string(),
    ];
    for key in &theirs {
        put(&stack, key);
    }
    abandoned_upload(&stack, &root().input(&forgotten, "big.jpg")).await;
    abandoned_upload(
        &stack,
        &format!("gateway/other-stack/inputs/{forgotten}/big.jpg"),
    )
    .await;

    let report = janitor(&stack, DAY + Duration::from_secs(60), None)
        .run_before(None)
        .await;

    assert_eq!(report.errors, 0, "{report:?}");
    assert_eq!(stack.on_the_volume(&job_id), Vec::<String>::new());
    assert_eq!(stack.on_the_volume(&forgotten), Vec::<String>::new());
    assert_eq!(job_folders(&stack), Vec::<String>::new());
    assert_eq!((report.orphans_removed, report.folders_removed), (2, 4));
    for key in &theirs {
        assert!(exists(&stack, key), "{key}");
    }
    let staged: Vec<String> = stack
        .emulator
        .staged_uploads()
        .into_iter()
        .map(|u| u.key)
        .collect();
    assert_eq!(
        staged,
        [format!("gateway/other-stack/inputs/{forgotten}/big.jpg")]
    );
    assert_eq!(report.uploads_aborted, 1);
    // The ended job's record and outputs are untouched: only the volume's copies went.
    assert_eq!(stack.result_files("alice", &job_id).await.len(), 1);
    stack.stop().await;
}

#[tokio::test]
async fn the_janitor_leaves_folders_of_jobs_too_recent_to_go() {
    let stack = Stack::start_with(StackOptions::default()).await;
    let (job_id, _) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    let forgotten = mint_job_id(SystemClock.now_ms());
    put(&stack, &root().input(&forgotten, "input.jpg"));
    abandoned_upload(&stack, &root().input(&forgotten, "big.jpg")).await;

    let report = janitor(&stack, Duration::from_secs(3_600), None)
        .run_before(None)
        .await;

    assert_eq!(report.folders_removed, 0, "{report:?}");
    assert!(!stack.on_the_volume(&job_id).is_empty());
    assert!(!stack.on_the_volume(&forgotten).is_empty());
    assert_eq!(stack.emulator.staged_uploads().len(), 1);
    stack.stop().await;
}

/// Twelve folders of forgotten jobs, listed two at a time.
fn forgotten_folders(stack: &Stack) -> Vec<String> {
    let now = SystemClock.now_ms();
    let mut ids = Vec::new();
    for n in 0..12 {
        let id = mint_job_id(now - 60_000 + n);
        put(stack, &format!("{}a1/x.png", root().outputs(&id)));
        ids.push(id);
    }
    ids
}

#[tokio::test]
async fn a_level_listing_that_repeats_its_pages_only_spreads_the_work_over_runs() {
    let stack = Stack::start_with(StackOptions {
        configure_emulator: |config| {
            config.s3_repeat_token_above = Some(3);
            config.s3_repeat_token_delimited = true;
        },
        ..StackOptions::default()
    })
    .await;
    let ids = forgotten_folders(&stack);

    let first = janitor(&stack, DAY, Some(2)).run_before(None).await;
    assert_eq!(first.repeated_pages, 1, "{first:?}");
    assert!(first.folders_removed < ids.len());
    let mut runs = 1;
    while !job_folders(&stack).is_empty() {
        janitor(&stack, DAY, Some(2)).run_before(None).await;
        runs += 1;
        assert!(runs <= ids.len(), "every run removes something");
    }
    for id in &ids {
        assert_eq!(stack.on_the_volume(id), Vec::<String>::new());
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_level_listing_that_never_repeats_is_cleared_in_one_run() {
    let stack = Stack::start_with(StackOptions {
        configure_emulator: |config| {
            config.s3_repeat_token_above = Some(3);
            config.s3_repeat_token_delimited = false;
        },
        ..StackOptions::default()
    })
    .await;
    let ids = forgotten_folders(&stack);

    let report = janitor(&stack, DAY, Some(2)).run_before(None).await;

    assert_eq!(report.repeated_pages, 0, "{report:?}");
    assert_eq!(report.folders_removed, ids.len());
    assert_eq!(job_folders(&stack), Vec::<String>::new());
    stack.stop().await;
}
