//! Figure 2: peak memory while finalizing. For each output size a job is put in the table as
//! RunPod would have it, its output file of that size is put on the emulator's volume, and a
//! child process (`bench-finalize`, wired like the webhook and finalize functions) hands it off
//! and finalizes it: copies the file from the volume's S3 API to the results bucket and marks the
//! job succeeded. The child's peak RSS (`VmHWM`) must not grow with the file. A second series
//! does the same for `worker_comfyui` outputs, one base64 image in RunPod's report, up to the
//! per-image cap: there the report itself is held, so memory follows its size up to the cap.
use std::process::Stdio;

use aws_config::SdkConfig;
use gateway::ports::JobStore;
use serde_json::{json, Value};
use testkit::stack_env::LOCAL_VOLUME_ROOT;

use crate::common::{
    bin_dir, die_with_parent, now_ms, submitted_job, write_file, BoxError, Summary, OWNER,
};

#[derive(Clone, Debug, Default)]
pub struct Figure {
    pub size_mb: u64,
    pub peak_rss_mb: Summary,
    pub rss_before_mb: Summary,
    pub copy_ms: Summary,
    pub errors: Vec<String>,
}

/// Which kind of output a series measures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Output {
    /// A file on the volume (`volume_files`).
    VolumeFile,
    /// One base64 image in the report (`worker_comfyui`).
    InlineImage,
}

pub async fn measure(
    sdk: &SdkConfig,
    emulator: &runpod_emulator::Emulator,
    env: &[(String, String)],
    wiring: &gateway_aws::wiring::Wiring,
    sizes_mb: &[u64],
    runs: usize,
    kind: Output,
) -> Result<Vec<Figure>, BoxError> {
    let store = wiring.job_store()?;
    let results_bucket = gateway::config::results_bucket(&wiring.env)?;
    let s3 = gateway_aws::adapters::s3::aws_client(sdk, true);
    let mut figures = Vec::new();
    for &size_mb in sizes_mb {
        let mut peak = Vec::new();
        let mut before = Vec::new();
        let mut copy = Vec::new();
        let mut errors = Vec::new();
        for run in 0..runs {
            let now = now_ms();
            let runpod_id = format!("bench-mem-{}", uuid::Uuid::new_v4().simple());
            let mut job = submitted_job(OWNER, &runpod_id, now, now + 60_000);
            if kind == Output::InlineImage {
                job.workflow = "restore-comfyui".into();
            }
            store.create(&job).await?;
            let key = format!("{LOCAL_VOLUME_ROOT}/outputs/{}/restore_00001_.png", job.id);
            let path = emulator.volume_dir.join(&key);
            let output = match kind {
                Output::VolumeFile => {
                    write_file(&path, size_mb * 1_048_576)?;
                    json!({
                        "prompt_id": "bench",
                        "files": [format!("{}/{key}", emulator.mount_prefix)],
                        "file_count": 1,
                    })
                }
                Output::InlineImage => {
                    json!({"images": [{
                        "filename": "restored.png",
                        "type": "base64",
                        "data": random_base64(size_mb * 1_048_576),
                    }]})
                }
            };
            let status = json!({
                "id": runpod_id,
                "status": "COMPLETED",
                "delayTime": 1200,
                "executionTime": 20_000,
                "output": output,
            });
            let report = std::env::temp_dir().join(format!("bench-report-{runpod_id}.json"));
            std::fs::write(&report, status.to_string())?;
            drop(status);
            let mut command = std::process::Command::new(bin_dir().join("bench-finalize"));
            command
                .arg(&job.id)
                .arg(format!("@{}", report.display()))
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stderr(Stdio::inherit());
            die_with_parent(&mut command);
            let output = tokio::task::spawn_blocking(move || command.output()).await??;
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&report);
            let line = String::from_utf8_lossy(&output.stdout);
            let report: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
            let stored = store.get(&job.id).await?;
            let succeeded = stored
                .as_ref()
                .map(|j| j.state.as_str() == "succeeded" && j.outputs.len() == 1)
                .unwrap_or(false);
            if !output.status.success() || !succeeded {
                errors.push(format!(
                    "{size_mb} MB run {run}: exit {:?}, job {:?}, report {line}",
                    output.status.code(),
                    stored.map(|j| j.state)
                ));
                continue;
            }
            let (size, key) = stored
                .map(|j| (j.outputs[0].size, j.outputs[0].key.clone()))
                .unwrap_or_default();
            if size != size_mb * 1_048_576 {
                errors.push(format!("{size_mb} MB run {run}: copied {size} bytes"));
            }
            let kb = |field: &str| report[field].as_f64().unwrap_or(0.0) / 1024.0;
            peak.push(kb("hwm_after_kb"));
            before.push(kb("rss_before_kb"));
            copy.push(report["elapsed_ms"].as_f64().unwrap_or(0.0));
            // moto keeps objects in memory: drop the copy so later sizes do not pay for it.
            let _ = s3
                .delete_object()
                .bucket(&results_bucket)
                .key(key)
                .send()
                .await;
        }
        crate::progress!(
            "peak RSS finalizing {size_mb} MB ({kind:?}): {} MB",
            Summary::of(&peak).show(1)
        );
        figures.push(Figure {
            size_mb,
            peak_rss_mb: Summary::of(&peak),
            rss_before_mb: Summary::of(&before),
            copy_ms: Summary::of(&copy),
            errors,
        });
    }
    Ok(figures)
}

/// `bytes` random bytes, base64-encoded: an image that does not compress.
fn random_base64(bytes: u64) -> String {
    use base64::Engine as _;
    use rand::RngCore;
    let mut raw = vec![0u8; bytes as usize];
    rand::rng().fill_bytes(&mut raw);
    base64::engine::general_purpose::STANDARD.encode(raw)
}
