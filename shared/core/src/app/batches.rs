//! Batches: `POST /batches` creates one job per input under a batch id, with one workflow and
//! its params, after checking the whole request (every input included) before anything is
//! written; the jobs share a hold-back key, so at most `max_in_flight` of them are dispatched
//! at once (`app::holds`), in the order of the inputs. `GET /batches/{id}` counts them by state;
//! cancelling a batch cancels each of its jobs.
use futures::StreamExt;
use serde_json::{Map, Value};

use crate::app::api::{timing, Api, JobInput, Refusal, PROBE_BYTES};
use crate::domain::batch::{Batch, MAX_BATCH_INPUTS};
use crate::domain::hold::Hold;
use crate::domain::job::{mint_job_id, Actor, ErrorCode, InputRef, Job, JobError, NewJob};
use crate::domain::keys;
use crate::ports::{CreateOutcome, ImageKind};

/// Most jobs of a batch dispatched at once that a request may ask for.
pub const MAX_IN_FLIGHT: u32 = 64;

/// The body of `POST /batches`.
#[derive(Debug, Default)]
pub struct BatchRequest {
    pub workflow: String,
    pub params: Option<Map<String, Value>>,
    /// One job per input, in this order; each exactly one of the three, as for `POST /jobs`.
    pub inputs: Vec<JobInput>,
    pub retention_secs: Option<u64>,
    pub callback_url: Option<String>,
    pub callback_events: Option<Vec<String>>,
    pub backend: Option<String>,
    /// Most of its jobs dispatched at once; `BATCH_MAX_IN_FLIGHT` when left out.
    pub max_in_flight: Option<u32>,
    /// `normal` or `low`, for every job of the batch.
    pub priority: Option<String>,
}

/// An input checked, and not stored yet.
enum Checked {
    Inline(Vec<u8>, ImageKind),
    Upload(String),
    Url(String),
}

/// A refusal about one input names it.
fn at_input(index: usize, refusal: Refusal) -> Refusal {
    match refusal {
        Refusal::Invalid { code, message } => Refusal::Invalid {
            code,
            message: format!("inputs[{index}]: {message}"),
        },
        Refusal::TooLarge { message } => Refusal::TooLarge {
            message: format!("inputs[{index}]: {message}"),
        },
        other => other,
    }
}

fn invalid_params(err: impl std::fmt::Display) -> Refusal {
    Refusal::Invalid {
        code: "invalid_params",
        message: err.to_string(),
    }
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal::Invalid {
        code: "invalid_batch",
        message: message.into(),
    }
}

impl Api {
    /// Checks the whole batch, then stores its inputs, the batch and its jobs, and puts the
    /// jobs in line for their slots. A refusal stores nothing; a store failing midway removes
    /// what this request stored and ends the jobs it created.
    pub async fn submit_batch(
        &self,
        owner: &str,
        request: BatchRequest,
    ) -> Result<(Batch, Vec<Job>), Refusal> {
        self.submit_batch_traced(owner, request, None).await
    }

    /// [`Api::submit_batch`] under the request's trace id, which its jobs share (a new one
    /// when it has none).
    pub async fn submit_batch_traced(
        &self,
        owner: &str,
        request: BatchRequest,
        trace_id: Option<String>,
    ) -> Result<(Batch, Vec<Job>), Refusal> {
        let workflow = self
            .catalog
            .get(&request.workflow)
            .ok_or_else(|| Refusal::Invalid {
                code: "unknown_workflow",
                message: format!(
                    "unknown workflow {:?}; available: {}",
                    request.workflow,
                    self.catalog.names().join(", ")
                ),
            })?;
        let params = request.params.unwrap_or_default();
        workflow
            .validate(&params, &mut rand::rng())
            .map_err(invalid_params)?;
        let retention = self.retention(request.retention_secs)?;
        // A batch that does not ask goes to the batch backend, if its workflow runs there.
        let batch_default = self
            .settings
            .batch_backend
            .filter(|kind| workflow.backends().contains(kind))
            .map(|kind| kind.as_str());
        let asked = request.backend.as_deref().or(batch_default);
        let backend = self.backend_for(workflow, asked)?;
        let priority = crate::app::api::priority_of(request.priority.as_deref())?;
        let (callback_url, callback_events) = self
            .callback(
                request.callback_url.as_deref(),
                request.callback_events.as_deref(),
            )
            .await?;
        let max_in_flight = request
            .max_in_flight
            .unwrap_or(self.settings.batch_max_in_flight);
        if !(1..=MAX_IN_FLIGHT).contains(&max_in_flight) {
            return Err(invalid(format!(
                "max_in_flight must be between 1 and {MAX_IN_FLIGHT}"
            )));
        }
        if request.inputs.is_empty() || request.inputs.len() > MAX_BATCH_INPUTS {
            return Err(invalid(format!(
                "a batch takes 1 to {MAX_BATCH_INPUTS} inputs"
            )));
        }
        let mut checked = Vec::with_capacity(request.inputs.len());
        for (index, input) in request.inputs.into_iter().enumerate() {
            let input = self
                .check_input(owner, input)
                .await
                .map_err(|r| at_input(index, r))?;
            checked.push(input);
        }

        // A batch is one request against the owner's submit rate, spent once it is checked;
        // its jobs are kept to the owner's in-flight limit like any others.
        let limits = self.tenants.admit(owner).await?;
        // Everything is checked: from here on, what is written is undone on a failure.
        let now = self.clock.now_ms();
        let batch_id = uuid::Uuid::now_v7().to_string();
        let trace = trace_id.unwrap_or_else(|| crate::domain::job::new_trace(now));
        let hold = Hold::batch(&batch_id, max_in_flight);
        let job_timing = timing(&self.settings, retention);
        let mut jobs: Vec<Job> = Vec::with_capacity(checked.len());
        for (index, input) in checked.into_iter().enumerate() {
            let job_id = mint_job_id(now);
            let stored = match input {
                Checked::Inline(bytes, kind) => self.put_inline(owner, &job_id, bytes, kind).await,
                Checked::Upload(upload_id) => self.uploaded_image(owner, &job_id, &upload_id).await,
                Checked::Url(url) => self.url_input(owner, &job_id, &url).await,
            };
            let input: InputRef = match stored {
                Ok(input) => input,
                Err(refusal) => {
                    self.undo_inputs(&jobs).await;
                    return Err(at_input(index, refusal));
                }
            };
            let params =
                workflow
                    .validate(&params, &mut rand::rng())
                    .map_err(|e| Refusal::Invalid {
                        code: "invalid_params",
                        message: e.to_string(),
                    })?;
            let mut job = Job::new(
                NewJob {
                    id: job_id,
                    owner: owner.to_string(),
                    workflow: workflow.name().to_string(),
                    workflow_version: workflow.version().to_string(),
                    params,
                    input,
                    idempotency_key: None,
                    request_digest: None,
                    callback_url: callback_url.clone(),
                    callback_events: callback_events.clone(),
                    backend,
                    priority,
                },
                job_timing,
                now,
            );
            job.gpu_price_nano_usd = self.settings.gpu_price_nano_usd;
            job.batch_id = Some(batch_id.clone());
            job.trace_id = Some(trace.clone());
            // The batch's slot first, then the owner's (see `domain::hold` on the order).
            job.holds = std::iter::once(hold.clone())
                .chain(limits.hold(owner))
                .collect();
            jobs.push(job);
        }
        let batch = Batch {
            id: batch_id,
            owner: owner.to_string(),
            workflow: workflow.name().to_string(),
            backend,
            max_in_flight,
            job_ids: jobs.iter().map(|j| j.id.clone()).collect(),
            created_at: now,
            expires_at: jobs.iter().map(|j| j.expires_at).max().unwrap_or_default(),
        };
        if let Err(err) = self.batches.create_batch(&batch).await {
            self.undo_inputs(&jobs).await;
            return Err(err.into());
        }
        for (created, job) in jobs.iter().enumerate() {
            match self.store.create(job).await {
                Ok(CreateOutcome::Created) => {}
                Ok(CreateOutcome::Existing(_)) | Err(_) => {
                    self.undo_jobs(&jobs[..created]).await;
                    self.undo_inputs(&jobs[created..]).await;
                    return Err(Refusal::Unavailable {
                        message: "the batch could not be stored whole; try again".into(),
                    });
                }
            }
        }
        // If this fails the jobs are still safe: the sweeper sends every queued job to
        // dispatch again, and each then joins the line by itself.
        if let Err(err) = self.turns.line_up(&hold, &batch.job_ids, priority).await {
            tracing::warn!(batch_id = %batch.id, error = %err, "could not line the batch up; the sweeper will");
        }
        tracing::info!(batch_id = %batch.id, owner, jobs = jobs.len(), max_in_flight, backend = backend.as_str(), "batch accepted");
        for _ in &jobs {
            crate::metrics::job_accepted();
        }
        Ok((batch, jobs))
    }

    /// One input checked as `POST /jobs` checks it, without storing anything: an upload's
    /// first bytes are read where the client put them (they are checked again once pinned).
    async fn check_input(&self, owner: &str, input: JobInput) -> Result<Checked, Refusal> {
        match (input.image_base64, input.upload_id, input.url) {
            (Some(encoded), None, None) => {
                let (bytes, kind) = self.decode_inline(&encoded)?;
                Ok(Checked::Inline(bytes, kind))
            }
            (None, Some(upload_id), None) => {
                let unknown = || Refusal::Invalid {
                    code: "unknown_upload",
                    message: "no completed upload with that id".into(),
                };
                let id = uuid::Uuid::parse_str(&upload_id)
                    .map_err(|_| unknown())?
                    .to_string();
                let source = keys::upload(owner, &id);
                let meta = self.uploads.head(&source).await?.ok_or_else(unknown)?;
                let limit = self.settings.max_upload_bytes;
                if meta.size > limit {
                    return Err(Refusal::TooLarge {
                        message: format!("uploads are limited to {limit} bytes"),
                    });
                }
                let head = self.uploads.read_prefix(&source, PROBE_BYTES).await?;
                self.check_image(&head)?;
                Ok(Checked::Upload(id))
            }
            (None, None, Some(url)) => {
                crate::app::inputs::checked_url(self.settings.egress, self.resolver.as_ref(), &url)
                    .await
                    .map_err(|message| Refusal::Invalid {
                        code: "input_url_refused",
                        message,
                    })?;
                Ok(Checked::Url(url))
            }
            _ => Err(Refusal::Invalid {
                code: "invalid_input",
                message: "each input needs exactly one of image_base64, upload_id or url".into(),
            }),
        }
    }

    async fn undo_inputs(&self, jobs: &[Job]) {
        for job in jobs {
            self.remove_input(job).await;
        }
    }

    /// Jobs of a batch that could not be stored whole: ended before anything ran them.
    async fn undo_jobs(&self, jobs: &[Job]) {
        let now = self.clock.now_ms();
        let error = JobError::new(
            ErrorCode::CancelledByClient,
            "its batch could not be stored whole",
        );
        for job in jobs {
            let ended = crate::app::commit_told(
                self.store.as_ref(),
                self.callbacks.as_ref(),
                job.clone(),
                Actor::Client,
                |job| job.cancel(error.clone(), now),
            )
            .await;
            if let Err(err) = ended {
                tracing::warn!(job_id = %job.id, error = %err, "could not end a job of a batch not stored whole");
            }
        }
    }

    /// The owner's batch and its jobs as they stand, in the order of the inputs.
    pub async fn batch(&self, owner: &str, id: &str) -> Result<(Batch, Vec<Job>), Refusal> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(Refusal::NotFound);
        }
        let batch = match self.batches.batch(id).await? {
            Some(batch) if batch.owner == owner => batch,
            _ => return Err(Refusal::NotFound),
        };
        let read: Vec<_> = futures::stream::iter(batch.job_ids.clone())
            .map(|job_id| {
                let store = self.store.clone();
                async move { store.get(&job_id).await }
            })
            .buffered(16)
            .collect()
            .await;
        let mut jobs = Vec::with_capacity(read.len());
        for job in read {
            if let Some(job) = job? {
                jobs.push(job);
            }
        }
        Ok((batch, jobs))
    }

    /// Cancels every job of the batch that has not ended; then the batch as it stands.
    pub async fn cancel_batch(&self, owner: &str, id: &str) -> Result<(Batch, Vec<Job>), Refusal> {
        let (batch, jobs) = self.batch(owner, id).await?;
        for job in jobs.iter().filter(|job| !job.is_terminal()) {
            match self.cancel(owner, &job.id).await {
                // Ended or deleted meanwhile: nothing left to cancel.
                Ok(_) | Err(Refusal::Conflict { .. } | Refusal::Gone { .. }) => {}
                Err(other) => return Err(other),
            }
        }
        self.batch(owner, &batch.id).await
    }
}
