//! The built-in worker: `workers_max` slots that take jobs from the queue and run them through
//! [`crate::comfy`], honouring the worker faults and the stop signal of each lease. Which slots
//! are up (RunPod's min/max workers, idle timeout) is decided by the store; a slot asks it for
//! its next step.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::chaos::{FaultKind, WorkerPlan};
use crate::faults::FaultState;
use crate::jobs::{Lease, Outcome, Store, Turn};

#[derive(Debug, Clone)]
pub(crate) struct WorkerContext {
    pub store: Arc<Store>,
    pub faults: Arc<FaultState>,
    pub volume_dir: PathBuf,
    pub mount_prefix: String,
}

pub(crate) fn spawn(ctx: WorkerContext, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    (0..ctx.store.builtin_slots())
        .map(|slot| {
            let ctx = ctx.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { slot_loop(ctx, slot, shutdown).await })
        })
        .collect()
}

async fn slot_loop(ctx: WorkerContext, slot: usize, mut shutdown: watch::Receiver<bool>) {
    let mut changes = ctx.store.subscribe();
    loop {
        changes.borrow_and_update();
        if *shutdown.borrow() {
            return;
        }
        match ctx.store.builtin_turn(slot) {
            Turn::Run(lease) => {
                tracing::info!(
                    job_id = lease.job_id,
                    worker_id = %format_args!("builtin-{slot}"),
                    attempt = lease.attempt,
                    "job started"
                );
                tokio::select! {
                    () = run(&ctx, lease) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                ctx.store.builtin_done(slot);
            }
            Turn::Wait(idle_deadline) => {
                let idle_out = async {
                    match idle_deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    _ = shutdown.changed() => {}
                    () = idle_out => {}
                }
            }
        }
    }
}

async fn run(ctx: &WorkerContext, lease: Lease) {
    let mut stop = lease.stop.clone();
    let work = execute(ctx, &lease);
    let outcome = tokio::select! {
        outcome = work => outcome,
        // A closed channel means the job is gone too (expired), so stop either way.
        _ = stop.wait_for(|stop| *stop) => {
            tracing::info!(job_id = lease.job_id, "job stopped by the platform; result dropped");
            return;
        }
    };
    let accepted = ctx.store.finish(&lease.job_id, lease.attempt, outcome);
    if !accepted {
        tracing::info!(job_id = lease.job_id, "late result ignored");
    }
}

async fn execute(ctx: &WorkerContext, lease: &Lease) -> Outcome {
    // What a ComfyUI worker reports as it goes (runpod's progress_update): `/status` shows it
    // while the job is IN_PROGRESS.
    let progress = |fraction: f64, message: &str| {
        ctx.store.progress(
            &lease.job_id,
            lease.attempt,
            serde_json::json!({"fraction": fraction, "message": message}),
        )
    };
    progress(0.1, "loading workflow");
    let faults = ctx.faults.get();
    if faults.worker_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.worker_delay_ms)).await;
    }
    if !lease.plan.worker_delay.is_zero() {
        tokio::time::sleep(lease.plan.worker_delay).await;
    }
    match lease.plan.worker {
        WorkerPlan::Normal => {}
        WorkerPlan::Fail => {
            ctx.faults
                .chaos
                .record(FaultKind::WorkerFailed, &lease.job_id);
            return Outcome::Failed {
                error: "CUDA error: an illegal memory access was encountered (injected)".into(),
                output: None,
            };
        }
        // Never answers: the platform's executionTimeout ends the job TIMED_OUT (and `run`
        // stops waiting on the lease's stop signal).
        WorkerPlan::Hang => std::future::pending::<()>().await,
    }
    if let Some(error) = faults.worker_fail_message {
        return Outcome::Failed {
            error,
            output: None,
        };
    }
    if let Some(output) = faults.worker_output_override {
        return Outcome::Completed(Some(output));
    }
    progress(0.5, "running the workflow");
    let input = lease.input.clone();
    let volume_dir = ctx.volume_dir.clone();
    let mount_prefix = ctx.mount_prefix.clone();
    // If the job is stopped meanwhile, the blocking task still finishes (like a GPU kernel
    // would) but its result is discarded by the caller.
    let result = tokio::task::spawn_blocking(move || {
        let output = crate::comfy::execute(&input, &volume_dir, &mount_prefix)?;
        // Kept aside: the gateway removes the files from the volume once the job has ended.
        let files = output["files"].as_array().cloned().unwrap_or_default();
        let written: Vec<(String, Vec<u8>)> = files
            .iter()
            .filter_map(|f| f.as_str())
            .filter_map(|path| {
                let key = path.strip_prefix(&mount_prefix)?.trim_start_matches('/');
                let bytes = std::fs::read(volume_dir.join(key)).ok()?;
                Some((key.to_string(), bytes))
            })
            .collect();
        Ok((output, written))
    })
    .await;
    match result {
        Ok(Ok((output, written))) => {
            for (key, bytes) in written {
                ctx.store.record_written(key, bytes);
            }
            Outcome::Completed(Some(output))
        }
        Ok(Err(error)) => Outcome::Failed {
            error,
            output: None,
        },
        Err(join_error) => Outcome::Failed {
            error: format!("handler crashed: {join_error}"),
            output: None,
        },
    }
}
