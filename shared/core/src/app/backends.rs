//! The two implementations of the [`Backend`] port, and the set a deployment runs with.
//!
//! - [`Serverless`]: RunPod serverless. The input is copied to the network volume, the run is
//!   started with `/run` and reports itself through the webhook.
//! - [`Pod`]: a ComfyUI server, on a RunPod pod or anywhere, through ComfyUI's own HTTP API. The
//!   input is uploaded with `/upload/image`, the graph queued with `/prompt` under our own
//!   prompt id, and the run polled (ComfyUI calls nobody back).
//!
//! Both are written over narrower ports (`RunPod`, `ComfyServer`, `ObjectStore`), whose adapters
//! speak HTTP; the use cases hold a [`Backends`] and never ask which one a job runs on.
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;

use crate::app::transfer;
use crate::domain::comfy::{self, ComfyFile, PromptState};
use crate::domain::job::{BackendKind, ErrorCode, Job, JobError};
use crate::domain::keys::VolumeRoot;
use crate::domain::workflow::{OutputContract, Workflow};
use crate::ports::{
    Backend, BackendError, Classified, ComfyError, ComfyServer, Failure, Fetched, ObjectStore,
    RunPod, RunPodError, RunPodStatus, RunPolicy, RunRequest,
};

/// The backends a deployment runs, by kind. A kind left out is refused at submission
/// (`backend_unavailable`), so only a job from before a redeploy can ask for a missing one.
#[derive(Clone, Default)]
pub struct Backends {
    serverless: Option<Arc<dyn Backend>>,
    pod: Option<Arc<dyn Backend>>,
}

impl Backends {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, kind: BackendKind, backend: Arc<dyn Backend>) -> Self {
        match kind {
            BackendKind::Serverless => self.serverless = Some(backend),
            BackendKind::Pod => self.pod = Some(backend),
        }
        self
    }

    /// The job's backend.
    pub fn of(&self, job: &Job) -> Result<&dyn Backend, BackendError> {
        self.get(job.backend)
    }

    pub fn get(&self, kind: BackendKind) -> Result<&dyn Backend, BackendError> {
        let backend = match kind {
            BackendKind::Serverless => self.serverless.as_deref(),
            BackendKind::Pod => self.pod.as_deref(),
        };
        // A deployment without it: its configuration, not the job, is at fault, and a fixed
        // configuration saves the job within its deadline.
        backend.ok_or_else(|| {
            BackendError::Transient(format!(
                "this deployment has no {} backend configured",
                kind.as_str()
            ))
        })
    }

    /// How often the job's runs are checked when its backend sends no webhooks.
    pub fn polled_every(&self, job: &Job) -> Option<Duration> {
        self.of(job).ok().and_then(|backend| backend.polled_every())
    }

    /// The job's folders on the volume that its backend's runs leave.
    pub fn volume_leftovers(&self, job: &Job) -> Vec<String> {
        self.of(job)
            .map(|backend| backend.volume_leftovers(job))
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// RunPod serverless
// ---------------------------------------------------------------------------------------------

pub struct Serverless {
    pub runpod: Arc<dyn RunPod>,
    /// The client's input is read from the uploads bucket and put on the volume, where the
    /// worker's LoadImage reads it.
    pub uploads: Arc<dyn ObjectStore>,
    pub volume: Arc<dyn ObjectStore>,
    pub volume_root: VolumeRoot,
    /// `policy.executionTimeout` and `policy.ttl` of every run, in milliseconds.
    pub execution_timeout: Duration,
    pub ttl: Duration,
}

fn from_runpod(err: RunPodError) -> BackendError {
    match err {
        RunPodError::Transient(message) => BackendError::Transient(message),
        RunPodError::NotFound => BackendError::NotFound,
        RunPodError::Unknown(message) => BackendError::Unknown(message),
        RunPodError::TooLarge { limit } => BackendError::TooLarge { limit },
        refused @ RunPodError::Permanent { .. } => BackendError::Refused(JobError::new(
            ErrorCode::RunpodRejected,
            format!("RunPod refused the job: {refused}"),
        )),
    }
}

#[async_trait]
impl Backend for Serverless {
    async fn start(
        &self,
        job: &Job,
        workflow: &Workflow,
        webhook: &str,
    ) -> Result<String, BackendError> {
        let input_key = self
            .volume_root
            .input(&job.id, &format!("input.{}", job.input.extension));
        transfer::copy(
            self.uploads.as_ref(),
            &job.input.key,
            self.volume.as_ref(),
            &input_key,
            Some(&job.input.content_type),
        )
        .await
        .map_err(|err| match err.failure() {
            Failure::Missing => BackendError::Refused(JobError::new(
                ErrorCode::InputMissing,
                "the input image is no longer in the uploads bucket",
            )),
            // A bucket or the volume refusing us is the gateway's configuration, not the job's
            // fault: retried within the attempt budget, so a fixed key saves the job.
            Failure::Transient | Failure::Permanent | Failure::Unknown => {
                BackendError::Transient(err.to_string())
            }
        })?;
        // Each attempt writes into its own folder, so two runs of one job (a lost first run
        // and its successor) never overwrite each other's files.
        let output_prefix = format!(
            "{}{}",
            self.volume_root.run_outputs(&job.id, job.attempts),
            workflow.name()
        );
        let graph = workflow.render(&job.params, &input_key, &output_prefix);
        // The graph under the key the workflow's worker reads; the input image stays on the
        // volume (LoadImage names its key), so RunPod's echoed input stays small.
        let mut input = serde_json::Map::new();
        input.insert(workflow.output_contract().input_key().to_string(), graph);
        // Which job and trace the run belongs to, for the worker's logs and RunPod's console;
        // worker-comfyui reads only its own keys and leaves others alone.
        input.insert(
            "gateway".into(),
            serde_json::json!({"job_id": job.id, "trace_id": job.trace()}),
        );
        let request = RunRequest {
            input: serde_json::Value::Object(input),
            webhook: Some(webhook.to_string()),
            policy: RunPolicy {
                execution_timeout: self.execution_timeout.as_millis() as u64,
                ttl: self.ttl.as_millis() as u64,
                low_priority: job.priority == crate::domain::job::Priority::Low,
            },
        };
        self.runpod.run(&request).await.map_err(|err| match err {
            RunPodError::NotFound => BackendError::Refused(JobError::new(
                ErrorCode::RunpodRejected,
                "RunPod does not know the configured endpoint",
            )),
            other => from_runpod(other),
        })
    }

    async fn status(&self, _job: &Job, run: &str) -> Result<RunPodStatus, BackendError> {
        self.runpod.status(run).await.map_err(from_runpod)
    }

    async fn cancel(&self, run: &str) -> Result<(), BackendError> {
        self.runpod.cancel(run).await.map_err(from_runpod)
    }

    fn output_contract(&self, workflow: Option<&Workflow>) -> Option<OutputContract> {
        workflow.map(Workflow::output_contract)
    }

    async fn open_output(&self, _file: &ComfyFile) -> Result<Fetched, BackendError> {
        // Serverless outputs come back in the report or on the volume, never from RunPod.
        Err(BackendError::NotFound)
    }

    fn polled_every(&self) -> Option<Duration> {
        None
    }

    fn volume_leftovers(&self, _job: &Job) -> Vec<String> {
        // The job's input and outputs are in the gateway's own folders, which the clean-up
        // removes for every job.
        Vec::new()
    }
}

// ---------------------------------------------------------------------------------------------
// A ComfyUI server (the pod backend)
// ---------------------------------------------------------------------------------------------

/// The key a pod run's report lists its files under (`OutputContract::ComfyView`).
pub const COMFY_FILES: &str = "comfy_files";

pub struct Pod {
    pub comfy: Arc<dyn ComfyServer>,
    /// The client's input is read from here and uploaded to the server.
    pub uploads: Arc<dyn ObjectStore>,
    /// The largest input read (the uploads' own cap).
    pub max_input_bytes: u64,
    /// How often its runs are checked.
    pub poll_every: Duration,
    /// Where ComfyUI's folders are on the RunPod volume (`ComfyUI` when ComfyUI is installed
    /// at `/workspace/ComfyUI` on a pod that mounts the volume at `/workspace`): its input and
    /// output folders are cleaned through the volume's S3 API, as ComfyUI deletes nothing.
    /// `None`: they are not on the volume, and nothing is cleaned there.
    pub volume_comfyui_root: Option<String>,
}

/// The folder (under ComfyUI's input and output folders) that holds one job's files: the
/// gateway's own, so the clean-up removes exactly what the job put there.
fn job_folder(job_id: &str) -> String {
    format!("{JOB_FOLDERS}/{job_id}")
}

/// Where, under ComfyUI's input and output folders, the jobs' folders are.
const JOB_FOLDERS: &str = "gateway";

/// The volume folders that hold the pod's job folders, for ComfyUI at `root` on the volume
/// (`POD_VOLUME_COMFYUI_ROOT`): `{root}/input/gateway/` and `{root}/output/gateway/`. None when
/// ComfyUI's folders are not on the volume.
pub fn comfy_job_parents(root: Option<&str>) -> Vec<String> {
    let Some(root) = root.map(|r| r.trim_matches('/')) else {
        return Vec::new();
    };
    ["input", "output"]
        .iter()
        .map(|kind| match root {
            "" => format!("{kind}/{JOB_FOLDERS}/"),
            root => format!("{root}/{kind}/{JOB_FOLDERS}/"),
        })
        .collect()
}

fn from_comfy(err: ComfyError) -> BackendError {
    match err {
        ComfyError::NotFound => BackendError::NotFound,
        ComfyError::Refused(message) => {
            BackendError::Refused(JobError::new(ErrorCode::InvalidWorkflow, message))
        }
        // A server that answers nonsense may be mid-restart or behind a confused proxy: the
        // deadline bounds how long it is given.
        ComfyError::Unavailable(message) | ComfyError::BadAnswer(message) => {
            BackendError::Transient(message)
        }
    }
}

impl Pod {
    /// Whether the server has `prompt_id` in its queue or history; `None` when it cannot be
    /// asked.
    async fn holds(&self, prompt_id: &str) -> Option<bool> {
        match self.comfy.prompt_state(prompt_id).await {
            Ok(state) => Some(state != PromptState::Unseen),
            Err(_) => None,
        }
    }

    async fn read_input(&self, job: &Job) -> Result<Bytes, BackendError> {
        let (meta, mut body) = self
            .uploads
            .open(&job.input.key)
            .await
            .map_err(|err| match err.failure() {
                Failure::Missing => BackendError::Refused(JobError::new(
                    ErrorCode::InputMissing,
                    "the input image is no longer in the uploads bucket",
                )),
                _ => BackendError::Transient(err.to_string()),
            })?;
        let cap = self.max_input_bytes;
        let mut bytes = Vec::with_capacity(meta.size.min(cap) as usize);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| BackendError::Transient(e.to_string()))?;
            if (bytes.len() + chunk.len()) as u64 > cap {
                return Err(BackendError::Refused(JobError::new(
                    ErrorCode::InputRejected,
                    format!("the input is larger than {cap} bytes"),
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes.into())
    }
}

#[async_trait]
impl Backend for Pod {
    async fn start(
        &self,
        job: &Job,
        workflow: &Workflow,
        _webhook: &str,
    ) -> Result<String, BackendError> {
        // An earlier attempt whose `/prompt` answer was lost, or whose record of the run was,
        // may have queued its prompt: its id is known (derived from the job and the attempt),
        // so look before queueing another.
        if job.attempts > 1 {
            let earlier = comfy::prompt_id(&job.id, job.attempts - 1);
            if self.holds(&earlier).await == Some(true) {
                tracing::info!(job_id = %job.id, prompt_id = %earlier, "adopted a prompt queued by an earlier attempt");
                return Ok(earlier);
            }
        }
        let prompt_id = comfy::prompt_id(&job.id, job.attempts);
        let input = self.read_input(job).await?;
        let stored = self
            .comfy
            .upload_image(
                &job_folder(&job.id),
                &format!("a{}.{}", job.attempts, job.input.extension),
                &job.input.content_type,
                input,
            )
            .await
            .map_err(from_comfy)?;
        let output_prefix = format!(
            "{}/a{}/{}",
            job_folder(&job.id),
            job.attempts,
            workflow.name()
        );
        let graph = workflow.render(&job.params, &stored, &output_prefix);
        match self.comfy.queue_prompt(&prompt_id, &graph).await {
            Ok(answered) if answered == prompt_id => Ok(prompt_id),
            Ok(answered) => {
                // An older server that ignores `prompt_id`: its own id is the run's. A lost
                // answer from such a server cannot be looked up later (see the README).
                tracing::warn!(job_id = %job.id, sent = %prompt_id, answered = %answered, "the ComfyUI server ignores prompt_id");
                Ok(answered)
            }
            Err(ComfyError::Refused(message)) => Err(BackendError::Refused(JobError::new(
                ErrorCode::InvalidWorkflow,
                message,
            ))),
            // The answer is lost, not necessarily the prompt: ComfyUI queues before it
            // answers, so one look settles it if the server can be asked.
            Err(err) => match self.holds(&prompt_id).await {
                Some(true) => Ok(prompt_id),
                _ => Err(BackendError::Unknown(err.to_string())),
            },
        }
    }

    async fn status(&self, _job: &Job, run: &str) -> Result<RunPodStatus, BackendError> {
        let state = self.comfy.prompt_state(run).await.map_err(from_comfy)?;
        let (status, output, error) = match state {
            PromptState::Queued => ("IN_QUEUE", None, None),
            PromptState::Running => ("IN_PROGRESS", None, None),
            PromptState::Succeeded(files) => {
                let files: Vec<_> = files
                    .iter()
                    .map(|f| json!({"filename": f.filename, "subfolder": f.subfolder, "type": f.kind}))
                    .collect();
                ("COMPLETED", Some(json!({ COMFY_FILES: files })), None)
            }
            PromptState::Failed(message) => ("FAILED", None, Some(json!(message))),
            PromptState::Interrupted => ("CANCELLED", None, None),
            PromptState::Unseen => return Err(BackendError::Unseen),
        };
        Ok(RunPodStatus {
            id: Some(run.to_string()),
            status: Some(status.to_string()),
            output,
            error,
            delay_time: None,
            execution_time: None,
        })
    }

    async fn cancel(&self, run: &str) -> Result<(), BackendError> {
        self.comfy.cancel(run).await.map_err(from_comfy)
    }

    fn output_contract(&self, _workflow: Option<&Workflow>) -> Option<OutputContract> {
        Some(OutputContract::ComfyView)
    }

    async fn open_output(&self, file: &ComfyFile) -> Result<Fetched, BackendError> {
        self.comfy.view(file).await.map_err(from_comfy)
    }

    fn polled_every(&self) -> Option<Duration> {
        Some(self.poll_every)
    }

    fn volume_leftovers(&self, job: &Job) -> Vec<String> {
        comfy_job_parents(self.volume_comfyui_root.as_deref())
            .into_iter()
            .map(|parent| format!("{parent}{}/", job.id))
            .collect()
    }
}

/// The files a pod run's report lists, checked: each one in the job's own output folder
/// (another job's files are never fetched, whatever a server's history says), at most `max`.
pub fn comfy_files(
    output: Option<&serde_json::Value>,
    job_id: &str,
    max: usize,
) -> Result<Vec<ComfyFile>, JobError> {
    let listed = output
        .and_then(|o| o.get(COMFY_FILES))
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| JobError::new(ErrorCode::EmptyOutput, "the run saved no images"))?;
    if listed.is_empty() {
        return Err(JobError::new(
            ErrorCode::EmptyOutput,
            "the run saved no images",
        ));
    }
    if listed.len() > max {
        return Err(JobError::new(
            ErrorCode::InvalidOutput,
            format!(
                "the run saved {} images; at most {max} are kept",
                listed.len()
            ),
        ));
    }
    let own = job_folder(job_id);
    listed
        .iter()
        .map(|entry| {
            let field = |name: &str| entry[name].as_str().unwrap_or_default().to_string();
            let file = ComfyFile {
                filename: field("filename"),
                subfolder: field("subfolder"),
                kind: field("type"),
            };
            let inside = file.kind == "output"
                && (file.subfolder == own || file.subfolder.starts_with(&format!("{own}/")))
                && !file.subfolder.split('/').any(|part| part == "..")
                && !file.filename.is_empty()
                && !file.filename.contains(['/', '\\']);
            if inside {
                Ok(file)
            } else {
                Err(JobError::new(
                    ErrorCode::InvalidOutputPath,
                    format!(
                        "the server listed {}/{} ({}), outside the job's output folder",
                        file.subfolder, file.filename, file.kind
                    ),
                ))
            }
        })
        .collect()
}
