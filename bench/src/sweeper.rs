//! Figure 3: what one sweep reads. The table holds N finished jobs (loaded with BatchWriteItem)
//! and 100 in-flight jobs whose check is due (real RunPod jobs at the emulator, still queued
//! there). The sweeper runs as the function would, with the job store wrapped to count what it
//! reads: the sweep index's items (DynamoDB's `ScannedCount`, via `due_for_check`) and the
//! per-job GetItem calls.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use futures::StreamExt;
use gateway::app::sweeper::Sweeper;
use gateway::domain::job::{Job, JobState, Millis, OutputFile};
use gateway::ports::{Clock, JobStore, RunPod, RunPolicy, RunRequest};
use gateway_aws::wiring::Wiring;
use testkit::observed::ObservedStore;

use crate::common::{ms, new_job, now_ms, submitted_job, BoxError, Summary, OWNER};

/// The system clock moved forward, so every repetition finds the same jobs due again.
struct Later(Millis);

impl Clock for Later {
    fn now_ms(&self) -> Millis {
        now_ms() + self.0
    }
}

#[derive(Clone, Debug, Default)]
pub struct Figure {
    pub finished: u64,
    pub due: u64,
    pub load_secs: f64,
    /// Items the sweep index returned as read (ScannedCount), per sweep.
    pub index_items: Summary,
    pub due_found: Summary,
    pub per_due: Summary,
    /// Index items plus the per-job GetItem re-reads.
    pub all_reads: Summary,
    pub writes: Summary,
    pub sweep_ms: Summary,
    pub errors: Vec<String>,
}

/// A finished job's item, as the store writes it once the job is terminal (no sweep-index
/// attributes, so the sparse index does not hold it).
fn finished_item(template: &Job, owner: &str) -> HashMap<String, AttributeValue> {
    let mut job = template.clone();
    job.id = uuid::Uuid::now_v7().to_string();
    job.owner = owner.to_string();
    let s = |v: &str| AttributeValue::S(v.to_string());
    let n = |v: i64| AttributeValue::N(v.to_string());
    HashMap::from([
        ("pk".to_string(), s(&job.id)),
        ("job_id".to_string(), s(&job.id)),
        ("owner".to_string(), s(&job.owner)),
        ("state".to_string(), s(job.state.as_str())),
        ("workflow".to_string(), s(&job.workflow)),
        ("created_at".to_string(), n(job.timestamps.created_at)),
        ("version".to_string(), n(job.version as i64)),
        ("expires_at".to_string(), n(job.expires_at)),
        ("runpod_job_id".to_string(), s("finished-e1")),
        (
            "doc".to_string(),
            s(&serde_json::to_string(&job).expect("serialize a job")),
        ),
    ])
}

fn finished_template(now: Millis) -> Job {
    let mut job = submitted_job(OWNER, "finished-e1", now - 600_000, now - 540_000);
    job.mark_running(now - 590_000).expect("running");
    job.record_runpod_times(Some(1_200), Some(20_000));
    job.succeed(
        vec![OutputFile {
            key: format!("results/{OWNER}/{}/restore_00001_.png", job.id),
            file_name: "restore_00001_.png".into(),
            size: 3_145_728,
            content_type: "image/png".into(),
        }],
        now - 570_000,
    )
    .expect("succeed");
    assert_eq!(job.state, JobState::Succeeded);
    job
}

async fn load_finished(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    count: u64,
) -> Result<(), BoxError> {
    let template = finished_template(now_ms());
    let batches = count.div_ceil(25);
    let mut done = 0u64;
    let started = Instant::now();
    let mut requests = futures::stream::iter(0..batches)
        .map(|batch| {
            let items: Vec<WriteRequest> = (0..25.min(count - batch * 25))
                .map(|i| {
                    let owner = format!("owner-{}", (batch * 25 + i) % 100);
                    WriteRequest::builder()
                        .put_request(
                            PutRequest::builder()
                                .set_item(Some(finished_item(&template, &owner)))
                                .build()
                                .expect("put request"),
                        )
                        .build()
                })
                .collect();
            let client = client.clone();
            let table = table.to_string();
            async move {
                let mut pending = HashMap::from([(table, items)]);
                for _ in 0..10 {
                    let out = client
                        .batch_write_item()
                        .set_request_items(Some(pending))
                        .send()
                        .await?;
                    match out.unprocessed_items {
                        Some(left) if left.values().any(|v| !v.is_empty()) => pending = left,
                        _ => return Ok::<_, BoxError>(()),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err("BatchWriteItem kept leaving items unprocessed".into())
            }
        })
        .buffer_unordered(8);
    while let Some(result) = requests.next().await {
        result?;
        done += 1;
        if done.is_multiple_of(400) {
            crate::progress!(
                "sweeper: loaded {} of {count} finished jobs ({:.0} s)",
                (done * 25).min(count),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

pub async fn measure(
    wiring: &Wiring,
    finished: u64,
    due: u64,
    runs: usize,
) -> Result<Figure, BoxError> {
    let table = gateway::config::jobs_table(&wiring.env)?;
    let client = aws_sdk_dynamodb::Client::new(&wiring.sdk);
    let started = Instant::now();
    load_finished(&client, &table, finished).await?;
    let load_secs = started.elapsed().as_secs_f64();
    crate::progress!("sweeper: {finished} finished jobs loaded in {load_secs:.0} s");

    // The in-flight jobs: real RunPod jobs (the emulator's worker is off, so they stay queued),
    // each due for a status check now.
    let runpod = wiring.runpod()?;
    let store = wiring.job_store()?;
    let now = now_ms();
    for _ in 0..due {
        let runpod_id = runpod
            .run(&RunRequest {
                input: serde_json::json!({ "workflow_api": {} }),
                webhook: None,
                policy: RunPolicy {
                    execution_timeout: 600_000,
                    ttl: 86_400_000,
                    low_priority: false,
                },
            })
            .await?;
        store
            .create(&submitted_job(OWNER, &runpod_id, now, now - 1_000))
            .await?;
    }
    // Also one job that is still queued but not due: the index holds it, the sweep must not read it.
    let mut later = new_job(OWNER, now);
    later.next_check_at = Some(now + 36_000_000);
    store.create(&later).await?;

    let base = wiring.sweeper()?;
    let step = (base.settings.poll_interval.as_millis() as Millis) + 1_000;
    let mut figure = Figure {
        finished,
        due,
        load_secs,
        ..Figure::default()
    };
    let (mut index, mut found, mut per_due, mut all, mut writes, mut times) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let counting = Arc::new(ObservedStore::new(base.store.clone()));
        let sweeper = Sweeper {
            store: counting.clone(),
            callbacks: base.callbacks.clone(),
            queue: base.queue.clone(),
            backends: base.backends.clone(),
            polls: base.polls.clone(),
            stops: base.stops.clone(),
            observer: base.observer.clone(),
            finalize: base.finalize.clone(),
            delivery_logs: base.delivery_logs.clone(),
            results: base.results.clone(),
            uploads: base.uploads.clone(),
            volume: base.volume.clone(),
            volume_root: base.volume_root.clone(),
            settings: base.settings.clone(),
            clock: Arc::new(Later(step * run as Millis)),
        };
        let started = Instant::now();
        let report = sweeper.sweep().await?;
        times.push(ms(started.elapsed()));
        let items = counting.index_items();
        let gets = counting.gets();
        if report.due as u64 != due || report.errors > 0 {
            figure.errors.push(format!(
                "sweep {run}: {} due (expected {due}), {} errors",
                report.due, report.errors
            ));
        }
        index.push(items as f64);
        found.push(report.due as f64);
        per_due.push(items as f64 / report.due.max(1) as f64);
        all.push((items + gets) as f64);
        writes.push(counting.saves() as f64);
        crate::progress!(
            "sweep {}/{runs}: {} due, {items} index items read, {gets} GetItem, {:.0} ms",
            run + 1,
            report.due,
            times.last().copied().unwrap_or_default()
        );
    }
    figure.index_items = Summary::of(&index);
    figure.due_found = Summary::of(&found);
    figure.per_due = Summary::of(&per_due);
    figure.all_reads = Summary::of(&all);
    figure.writes = Summary::of(&writes);
    figure.sweep_ms = Summary::of(&times);
    Ok(figure)
}
