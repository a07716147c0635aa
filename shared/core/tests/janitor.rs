//! The janitor: what it removes from the volume on its rounds, and everything it leaves alone.
use std::time::Duration;

use gateway::domain::job::{mint_job_id, Job, JobState};
use gateway::ports::ObjectStore;
use testkit::Kit;

/// A job the client cancelled after dispatch put its input on the volume, with a file its run
/// wrote anyway: what a job that ended leaves there.
async fn ended_job(kit: &Kit) -> Job {
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.volume
        .insert(&kit.volume_output(&job.id, "a1/restore_00001_.png"), b"png");
    let job = kit.api().cancel("alice", &job.id).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    job
}

/// The keys on the volume that belong to `job_id`.
fn on_volume(kit: &Kit, job_id: &str) -> Vec<String> {
    kit.volume
        .keys()
        .into_iter()
        .filter(|key| key.contains(job_id))
        .collect()
}

fn past_min_age(kit: &Kit) {
    kit.clock
        .advance(kit.janitor_settings.min_age + Duration::from_secs(1));
}

#[tokio::test]
async fn the_folders_of_a_job_that_ended_long_enough_ago_are_removed() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;
    assert_eq!(on_volume(&kit, &job.id).len(), 2, "its input and an output");
    past_min_age(&kit);

    let report = kit.janitor().run_before(None).await;

    assert!(on_volume(&kit, &job.id).is_empty());
    assert_eq!((report.folders_removed, report.files_removed), (2, 2));
    assert_eq!((report.orphans_removed, report.errors), (0, 0));
}

#[tokio::test]
async fn the_folders_of_a_job_that_ended_recently_stay() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;
    kit.clock
        .advance(kit.janitor_settings.min_age - Duration::from_secs(60));

    let report = kit.janitor().run_before(None).await;

    assert_eq!(on_volume(&kit, &job.id).len(), 2);
    assert_eq!(report.folders_removed, 0);
}

#[tokio::test]
async fn a_job_that_ended_recently_keeps_its_folders_however_old_the_job_is() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    past_min_age(&kit);
    kit.api().cancel("alice", &job.id).await.unwrap();

    let report = kit.janitor().run_before(None).await;

    assert_eq!(on_volume(&kit, &job.id).len(), 1);
    assert_eq!((report.kept, report.folders_removed), (1, 0));
}

#[tokio::test]
async fn the_folders_of_a_job_in_flight_stay_however_old() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    past_min_age(&kit);

    let report = kit.janitor().run_before(None).await;

    assert_eq!(on_volume(&kit, &job.id).len(), 1);
    assert_eq!(report.kept, 1);
}

#[tokio::test]
async fn an_ended_job_whose_finalize_lease_ran_until_lately_keeps_its_folders() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;
    past_min_age(&kit);
    let mut leased = kit.stored(&job.id);
    leased.lease = Some(gateway::domain::job::Lease {
        kind: gateway::domain::job::LeaseKind::Finalize,
        until: kit.now() - 60_000,
    });
    kit.store.put(leased);

    kit.janitor().run_before(None).await;

    assert_eq!(on_volume(&kit, &job.id).len(), 2);
}

#[tokio::test]
async fn a_folder_whose_job_is_gone_is_removed_once_its_id_is_old_enough() {
    let kit = Kit::new();
    let orphan = mint_job_id(kit.now());
    let file = kit.volume_output(&orphan, "a1/x.png");
    kit.volume.insert(&file, b"png");

    let early = kit.janitor().run_before(None).await;
    assert_eq!(early.kept, 1, "too young to be judged an orphan");
    assert!(kit.volume.get(&file).is_some());

    past_min_age(&kit);
    let report = kit.janitor().run_before(None).await;

    assert!(kit.volume.get(&file).is_none());
    assert_eq!((report.folders_removed, report.orphans_removed), (1, 1));
}

#[tokio::test]
async fn a_run_that_wrote_after_its_job_was_cleaned_up_is_removed_too() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;
    past_min_age(&kit);
    kit.janitor().run_before(None).await;
    let late = kit.volume_output(&job.id, "a1/restore_00002_.png");
    kit.volume.insert(&late, b"late png");

    kit.janitor().run_before(None).await;

    assert!(kit.volume.get(&late).is_none());
}

#[tokio::test]
async fn nothing_outside_the_deployments_root_is_touched() {
    let kit = Kit::new();
    let old = mint_job_id(kit.now());
    let theirs = [
        format!("gateway/other-stack/outputs/{old}/a.png"),
        format!("outputs/{old}/a.png"),
        format!("{old}/a.png"),
        "models/checkpoints/v1.safetensors".to_string(),
    ];
    for key in &theirs {
        kit.volume.insert(key, b"not ours");
    }
    kit.volume.stage_upload(
        &format!("gateway/other-stack/inputs/{old}/input.jpg"),
        "u-theirs",
        Some(kit.now()),
    );
    past_min_age(&kit);
    kit.clock.advance(kit.janitor_settings.abort_uploads_after);

    let report = kit.janitor().run_before(None).await;

    for key in &theirs {
        assert!(kit.volume.get(key).is_some(), "{key}");
    }
    assert_eq!(kit.volume.staged().len(), 1);
    assert_eq!((report.folders_seen, report.uploads_aborted), (0, 0));
}

#[tokio::test]
async fn names_under_the_root_that_are_no_job_of_ours_are_left_alone() {
    let kit = Kit::new();
    let root = kit.volume_root();
    let strangers = [
        format!("{}outputs/notes/readme.txt", root.as_str()),
        format!("{}outputs/stray.png", root.as_str()),
        format!(
            "{}inputs/{}/x.jpg",
            root.as_str(),
            uuid::Uuid::new_v4() // not an id this gateway mints
        ),
    ];
    for key in &strangers {
        kit.volume.insert(key, b"?");
    }
    past_min_age(&kit);

    let report = kit.janitor().run_before(None).await;

    for key in &strangers {
        assert!(kit.volume.get(key).is_some(), "{key}");
    }
    assert_eq!((report.foreign, report.folders_removed), (3, 0));
}

#[tokio::test]
async fn a_run_reads_no_further_than_the_first_folder_too_young_to_go() {
    let kit = Kit::new();
    let old = ended_job(&kit).await;
    past_min_age(&kit);
    let young: Vec<Job> = (0..5).map(|_| kit.queued_job("alice")).collect();
    for job in &young {
        kit.dispatcher().dispatch(&job.id).await.unwrap();
        kit.volume
            .insert(&kit.volume_output(&job.id, "a1/restore_00001_.png"), b"png");
    }

    let report = kit.janitor().run_before(None).await;

    assert!(on_volume(&kit, &old.id).is_empty());
    // The old job's two folders, and the first young one of each listing.
    assert_eq!(report.folders_seen, 4);
    assert_eq!(report.kept, 2);
}

#[tokio::test]
async fn each_run_looks_at_no_more_than_its_budget_and_the_next_goes_on() {
    let mut kit = Kit::new();
    kit.janitor_settings.max_folders = 3;
    let orphans: Vec<String> = (0..4)
        .map(|n| mint_job_id(kit.now() + n))
        .inspect(|id| kit.volume.insert(&kit.volume_output(id, "a.png"), b"png"))
        .collect();
    past_min_age(&kit);

    let first = kit.janitor().run_before(None).await;
    assert_eq!((first.folders_removed, first.stopped_early), (3, true));
    let second = kit.janitor().run_before(None).await;

    assert_eq!((second.folders_removed, second.stopped_early), (1, false));
    for id in &orphans {
        assert!(on_volume(&kit, id).is_empty());
    }
}

#[tokio::test]
async fn a_listing_that_repeats_its_pages_ends_the_run_and_the_next_run_goes_on() {
    let kit = Kit::new();
    kit.volume.page_listings_by(2);
    kit.volume.repeat_pages_after(4);
    let orphans: Vec<String> = (0..10)
        .map(|n| mint_job_id(kit.now() + n))
        .inspect(|id| kit.volume.insert(&kit.volume_output(id, "a.png"), b"png"))
        .collect();
    past_min_age(&kit);

    let first = kit.janitor().run_before(None).await;
    assert_eq!(first.repeated_pages, 1);
    assert!(first.folders_removed < 10);
    let mut runs = 1;
    while kit.volume.keys().iter().any(|k| k.contains("/outputs/")) {
        kit.janitor().run_before(None).await;
        runs += 1;
        assert!(runs < 10, "each run makes progress");
    }

    for id in &orphans {
        assert!(on_volume(&kit, id).is_empty());
    }
}

#[tokio::test]
async fn a_run_near_its_deadline_stops_before_the_next_folder() {
    let kit = Kit::new();
    kit.volume
        .insert(&kit.volume_output(&mint_job_id(kit.now()), "a.png"), b"png");
    past_min_age(&kit);

    let report = kit.janitor().run_before(Some(kit.now() + 5_000)).await;

    assert!(report.stopped_early);
    assert_eq!(report.folders_removed, 0);
}

#[tokio::test]
async fn a_folder_that_cannot_be_removed_is_counted_and_the_run_goes_on() {
    let kit = Kit::new();
    let stuck = mint_job_id(kit.now());
    let free = mint_job_id(kit.now() + 1);
    let stuck_file = kit.volume_output(&stuck, "a.png");
    kit.volume.insert(&stuck_file, b"png");
    kit.volume
        .insert(&kit.volume_output(&free, "a.png"), b"png");
    kit.volume
        .break_key(&stuck_file, testkit::fakes::BrokenKey::Transient);
    past_min_age(&kit);

    let report = kit.janitor().run_before(None).await;

    assert_eq!((report.errors, report.folders_removed), (1, 1));
    assert!(on_volume(&kit, &free).is_empty());
    kit.volume.mend_key(&stuck_file);
    kit.janitor().run_before(None).await;
    assert!(on_volume(&kit, &stuck).is_empty());
}

#[tokio::test]
async fn unfinished_uploads_under_the_root_are_aborted_once_old_enough() {
    let kit = Kit::new();
    let root = kit.volume_root();
    let id = mint_job_id(kit.now());
    kit.volume
        .stage_upload(&root.input(&id, "input.jpg"), "u-old", Some(kit.now()));
    kit.clock.advance(kit.janitor_settings.abort_uploads_after);
    kit.volume
        .stage_upload(&root.input(&id, "input.png"), "u-new", Some(kit.now()));
    kit.volume
        .stage_upload(&root.input(&id, "input.gif"), "u-undated", None);
    kit.clock.advance(Duration::from_secs(1));

    let report = kit.janitor().run_before(None).await;

    assert_eq!((report.uploads_aborted, report.uploads_kept), (1, 2));
    let left: std::collections::BTreeSet<String> =
        kit.volume.staged().into_iter().map(|(_, id)| id).collect();
    assert_eq!(left, ["u-new".to_string(), "u-undated".into()].into());
}

#[tokio::test]
async fn with_the_abort_switch_off_no_upload_is_touched() {
    let mut kit = Kit::new();
    kit.janitor_settings.abort_uploads = false;
    let key = kit
        .volume_root()
        .input(&mint_job_id(kit.now()), "input.jpg");
    kit.volume.stage_upload(&key, "u-old", Some(kit.now()));
    kit.clock
        .advance(kit.janitor_settings.abort_uploads_after * 2);

    let report = kit.janitor().run_before(None).await;

    assert_eq!(report.uploads_aborted, 0);
    assert_eq!(kit.volume.staged().len(), 1);
}

#[tokio::test]
async fn a_job_the_sweeper_cleans_up_leaves_nothing_for_the_janitor() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;
    kit.clock.advance(kit.settings.finalize_lease * 2);
    kit.sweeper().sweep().await.unwrap();
    assert!(on_volume(&kit, &job.id).is_empty());
    past_min_age(&kit);

    let report = kit.janitor().run_before(None).await;

    assert_eq!((report.folders_seen, report.folders_removed), (0, 0));
    assert!(kit.volume.list("", 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_pod_jobs_comfyui_folders_left_after_its_clean_up_are_removed_in_time() {
    let kit = Kit::new();
    let job = ended_job(&kit).await;
    // A prompt nobody tracked any more wrote there after the job's own clean-up.
    let late = format!("ComfyUI/output/gateway/{}/a2/restore_00001_.png", job.id);
    kit.volume.insert(&late, b"png");
    past_min_age(&kit);

    kit.janitor().run_before(None).await;

    assert!(
        on_volume(&kit, &job.id).is_empty(),
        "{:?}",
        kit.volume.keys()
    );
}

#[tokio::test]
async fn what_is_in_comfyuis_folders_outside_the_gateways_own_stays() {
    let kit = Kit::new();
    let theirs = "ComfyUI/output/ComfyUI_00001_.png";
    let old_id = mint_job_id(kit.now());
    let not_a_job = "ComfyUI/input/gateway/someones-folder/photo.png";
    kit.volume.insert(theirs, b"png");
    kit.volume.insert(not_a_job, b"png");
    // A job id's folder, but not in the gateway's own folder of ComfyUI's.
    let beside = format!("ComfyUI/input/{old_id}/photo.png");
    kit.volume.insert(&beside, b"png");
    past_min_age(&kit);

    let report = kit.janitor().run_before(None).await;

    let left = kit.volume.keys();
    for key in [theirs, not_a_job, beside.as_str()] {
        assert!(left.contains(&key.to_string()), "{key} was removed");
    }
    assert_eq!(report.foreign, 1);
}
