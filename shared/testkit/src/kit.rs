//! A world of fakes, and the use cases built over it as the wiring builds them over AWS.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use gateway::app::api::Api;
use gateway::app::callbacks::Callbacks;
use gateway::app::dispatch::Dispatcher;
use gateway::app::finalize::{FinalizeError, Finalizer};
use gateway::app::janitor::Janitor;
use gateway::app::observe::{Observer, Outcome};
use gateway::app::stop::Stopper;
use gateway::app::sweeper::Sweeper;
use gateway::app::webhook::WebhookHandler;
use gateway::config::{JanitorSettings, Settings};
use gateway::domain::job::{Job, Millis};
use gateway::domain::keys::VolumeRoot;
use gateway::domain::paths::VolumeLayout;
use gateway::domain::token::WebhookSigner;
use gateway::domain::workflow::WorkflowCatalog;
use gateway::ports::RunPodStatus;

use crate::fakes::{
    MagicBytes, ManualClock, MemBatches, MemCallbackQueue, MemComfy, MemDeliveryLogs, MemFinalize,
    MemObjects, MemPolls, MemQueue, MemSigningKeys, MemSlots, MemStops, MemStore, MemTenants,
    NoDownloads, ScriptedReceiver, ScriptedRunPod, ServedUrls, TableResolver,
};
use gateway::app::backends::{Backends, Pod, Serverless};
use gateway::domain::job::BackendKind;

/// How often the kit's pod backend is polled.
pub const POD_POLL: std::time::Duration = std::time::Duration::from_secs(10);
/// Where ComfyUI's folders are on the kit's volume.
pub const POD_VOLUME_ROOT: &str = "ComfyUI";
use crate::images::jpeg;
use crate::jobs::restore_job;

/// The webhook secret of every kit (a test value, never a real one).
pub const SECRET: &str = "testkit-webhook-secret-0123456789";
/// The kit's folder on the volume; everything its use cases write there lies under it.
pub const VOLUME_ROOT: &str = "gateway/kit/";

/// Where the kit's clock starts: 2027-01-15, a fixed moment so tests read the same every run.
pub const START: Millis = 1_800_000_000_000;

/// Every port in memory, shared by the use cases it builds: what one use case writes, the next
/// one reads, as in AWS.
pub struct Kit {
    pub store: Arc<MemStore>,
    pub queue: Arc<MemQueue>,
    pub stops: Arc<MemStops>,
    pub finalize: Arc<MemFinalize>,
    pub uploads: Arc<MemObjects>,
    pub results: Arc<MemObjects>,
    pub volume: Arc<MemObjects>,
    pub runpod: Arc<ScriptedRunPod>,
    /// The pod backend's ComfyUI server, and the queue of its jobs' checks.
    pub comfy: Arc<MemComfy>,
    pub polls: Arc<MemPolls>,
    /// Batches, and the hold-back slots of their jobs.
    pub batches: Arc<MemBatches>,
    pub slots: Arc<MemSlots>,
    /// Owners' limit overrides and submit buckets.
    pub tenants: Arc<MemTenants>,
    pub images: Arc<MagicBytes>,
    /// DNS and the web, for inputs given by URL.
    pub resolver: Arc<TableResolver>,
    pub urls: Arc<ServedUrls>,
    /// Client callbacks: the delivery logs, the delivery queue, the receivers, the owners'
    /// secrets.
    pub delivery_logs: Arc<MemDeliveryLogs>,
    pub callback_queue: Arc<MemCallbackQueue>,
    pub receiver: Arc<ScriptedReceiver>,
    pub signing_keys: Arc<MemSigningKeys>,
    pub clock: Arc<ManualClock>,
    pub catalog: Arc<WorkflowCatalog>,
    pub signer: WebhookSigner,
    pub settings: Settings,
    pub janitor_settings: JanitorSettings,
    next_job: AtomicU64,
}

impl Default for Kit {
    fn default() -> Self {
        Self::new()
    }
}

impl Kit {
    pub fn new() -> Self {
        Self {
            store: Arc::default(),
            queue: Arc::default(),
            stops: Arc::default(),
            finalize: Arc::default(),
            uploads: Arc::default(),
            results: Arc::default(),
            volume: Arc::default(),
            runpod: Arc::default(),
            comfy: Arc::default(),
            polls: Arc::default(),
            batches: Arc::default(),
            slots: Arc::default(),
            tenants: Arc::default(),
            images: Arc::default(),
            resolver: Arc::default(),
            urls: Arc::default(),
            delivery_logs: Arc::default(),
            callback_queue: Arc::default(),
            receiver: Arc::default(),
            signing_keys: Arc::default(),
            clock: Arc::new(ManualClock::at(START)),
            catalog: Arc::new(WorkflowCatalog::builtin().expect("the built-in workflows")),
            signer: WebhookSigner::new(SECRET.as_bytes(), None),
            // Both backends, so that a test may ask for either.
            settings: Settings {
                backends: vec![BackendKind::Serverless, BackendKind::Pod],
                batch_backend: Some(BackendKind::Pod),
                // Off, so that a test's jobs are held by nothing it did not ask for; the
                // tests of the limits set them.
                tenant_limits: gateway::domain::tenant::TenantLimits {
                    max_in_flight: 0,
                    submits_per_minute: 0,
                    submit_burst: 0,
                },
                ..Settings::default()
            },
            janitor_settings: JanitorSettings::default(),
            next_job: AtomicU64::new(0),
        }
    }

    pub fn with_settings(mut self, change: impl FnOnce(&mut Settings)) -> Self {
        change(&mut self.settings);
        self
    }

    /// The kit's folder on the volume.
    pub fn volume_root(&self) -> VolumeRoot {
        VolumeRoot::new(VOLUME_ROOT).expect("a valid root")
    }

    /// A file a run of `job_id` wrote on the volume: `name` in the job's outputs folder.
    pub fn volume_output(&self, job_id: &str, name: &str) -> String {
        format!("{}{name}", self.volume_root().outputs(job_id))
    }

    pub fn now(&self) -> Millis {
        use gateway::ports::Clock;
        self.clock.now_ms()
    }

    /// Both backends over the kit's fakes, as the wiring builds them over HTTP.
    pub fn backends(&self) -> Backends {
        Backends::new()
            .with(
                BackendKind::Serverless,
                Arc::new(Serverless {
                    runpod: self.runpod.clone(),
                    uploads: self.uploads.clone(),
                    volume: self.volume.clone(),
                    volume_root: self.volume_root(),
                    execution_timeout: self.settings.execution_timeout,
                    ttl: self.settings.runpod_ttl,
                }),
            )
            .with(
                BackendKind::Pod,
                Arc::new(Pod {
                    comfy: self.comfy.clone(),
                    uploads: self.uploads.clone(),
                    max_input_bytes: self.settings.max_upload_bytes,
                    poll_every: POD_POLL,
                    volume_comfyui_root: Some(POD_VOLUME_ROOT.into()),
                }),
            )
    }

    pub fn api(&self) -> Api {
        Api {
            store: self.store.clone(),
            callbacks: self.callback_queue.clone(),
            queue: self.queue.clone(),
            uploads: self.uploads.clone(),
            results: self.results.clone(),
            stops: self.stops.clone(),
            images: self.images.clone(),
            resolver: self.resolver.clone(),
            catalog: self.catalog.clone(),
            batches: self.batches.clone(),
            turns: self.turns(),
            tenants: Arc::new(gateway::app::tenants::Tenants::new(
                self.tenants.clone(),
                self.settings.tenant_limits,
                self.clock.clone(),
            )),
            settings: self.settings.clone(),
            clock: self.clock.clone(),
        }
    }

    /// The hold-back slots, and the dispatch queue a woken job is sent to.
    pub fn turns(&self) -> Arc<gateway::app::holds::Turns> {
        Arc::new(gateway::app::holds::Turns {
            slots: self.slots.clone(),
            queue: self.queue.clone(),
        })
    }

    pub fn dispatcher(&self) -> Dispatcher {
        Dispatcher {
            store: self.store.clone(),
            callbacks: self.callback_queue.clone(),
            uploads: self.uploads.clone(),
            volume: self.volume.clone(),
            resolver: self.resolver.clone(),
            fetcher: self.urls.clone(),
            images: self.images.clone(),
            volume_root: self.volume_root(),
            backends: self.backends(),
            polls: self.polls.clone(),
            turns: self.turns(),
            stops: self.stops.clone(),
            catalog: self.catalog.clone(),
            signer: self.signer.clone(),
            webhook_base: "https://gateway.test".into(),
            settings: self.settings.clone(),
            clock: self.clock.clone(),
        }
    }

    pub fn observer(&self) -> Observer {
        Observer {
            store: self.store.clone(),
            callbacks: self.callback_queue.clone(),
            reports: self.results.clone(),
            finalize: self.finalize.clone(),
            settings: self.settings.clone(),
            clock: self.clock.clone(),
        }
    }

    pub fn finalizer(&self) -> Finalizer {
        Finalizer {
            store: self.store.clone(),
            callbacks: self.callback_queue.clone(),
            volume: self.volume.clone(),
            results: self.results.clone(),
            layout: VolumeLayout::new(
                vec!["/runpod-volume".into(), "/workspace".into()],
                self.volume_root(),
            ),
            catalog: self.catalog.clone(),
            fetcher: Arc::new(NoDownloads),
            backends: self.backends(),
            queue: self.finalize.clone(),
            settings: self.settings.clone(),
            clock: self.clock.clone(),
        }
    }

    /// Runs the finalize function once for each request waiting on the finalize queue, as
    /// it would receive them; returns each outcome with its job id.
    pub async fn run_finalize(&self) -> Vec<(String, Result<Outcome, FinalizeError>)> {
        let finalizer = self.finalizer();
        let mut outcomes = Vec::new();
        for request in self.finalize.take() {
            let outcome = finalizer.finalize(&request.job_id, None).await;
            outcomes.push((request.job_id, outcome));
        }
        outcomes
    }

    /// What a RunPod report comes to once the finalize function has run on what it handed
    /// over: the observer's outcome, or, when finalize was asked, finalize's.
    pub async fn observe_then_finalize(
        &self,
        job: Job,
        status: &RunPodStatus,
        by: gateway::domain::job::Actor,
    ) -> Result<Outcome, FinalizeError> {
        let job_id = job.id.clone();
        let observed = self.observer().observe_as(job, status, by).await?;
        // A hand-off, or a request made again for a job handed off earlier.
        if self.finalize.waiting() > 0 {
            return self.finalize_job(&job_id).await;
        }
        Ok(observed)
    }

    /// Runs the finalize function on every waiting request and returns the last outcome for
    /// `job_id` (unchanged, if none was waiting).
    pub async fn finalize_job(&self, job_id: &str) -> Result<Outcome, FinalizeError> {
        let mut last = Ok(Outcome::Unchanged);
        for (id, outcome) in self.run_finalize().await {
            if id == job_id {
                last = outcome;
            }
        }
        last
    }

    pub fn sweeper(&self) -> Sweeper {
        Sweeper {
            store: self.store.clone(),
            callbacks: self.callback_queue.clone(),
            queue: self.queue.clone(),
            backends: self.backends(),
            polls: self.polls.clone(),
            stops: self.stops.clone(),
            observer: Arc::new(self.observer()),
            finalize: self.finalize.clone(),
            delivery_logs: self.delivery_logs.clone(),
            results: self.results.clone(),
            uploads: self.uploads.clone(),
            volume: self.volume.clone(),
            volume_root: self.volume_root(),
            settings: self.settings.clone(),
            clock: self.clock.clone(),
        }
    }

    pub fn callbacks(&self) -> Callbacks {
        Callbacks {
            store: self.store.clone(),
            logs: self.delivery_logs.clone(),
            queue: self.callback_queue.clone(),
            sender: self.receiver.clone(),
            keys: self.signing_keys.clone(),
            resolver: self.resolver.clone(),
            results: self.results.clone(),
            turns: self.turns(),
            settings: self.settings.clone(),
            clock: self.clock.clone(),
        }
    }

    /// Runs dispatch on every message waiting on the dispatch queue, as the queue hands them
    /// over, until none is left; returns the jobs submitted to their backend, in order.
    pub async fn dispatch_waiting(&self) -> Vec<String> {
        let mut submitted = Vec::new();
        loop {
            let waiting = self.queue.take();
            if waiting.is_empty() {
                return submitted;
            }
            for job_id in waiting {
                let outcome = self.dispatcher().dispatch(&job_id).await.unwrap();
                if let gateway::app::dispatch::DispatchOutcome::Submitted(_) = outcome {
                    submitted.push(job_id);
                }
            }
        }
    }

    /// Runs the delivery function on every notice and request waiting, as the queue would
    /// hand them over (delays ignored: the clock is the test's), until none is left that is
    /// due now; returns the delivery outcomes.
    pub async fn deliver_waiting(&self) -> Vec<gateway::app::callbacks::Delivery> {
        let callbacks = self.callbacks();
        let mut outcomes = Vec::new();
        for (job_id, event) in self.callback_queue.take_notices() {
            callbacks
                .on_notice(&job_id, event)
                .await
                .expect("a notice handled");
        }
        for (job_id, message_id, _) in self.callback_queue.take() {
            outcomes.push(
                callbacks
                    .deliver(&job_id, &message_id)
                    .await
                    .expect("a delivery"),
            );
        }
        outcomes
    }

    pub fn janitor(&self) -> Janitor {
        Janitor {
            store: self.store.clone(),
            volume: self.volume.clone(),
            staged: self.volume.clone(),
            root: self.volume_root(),
            backend_folders: gateway::app::backends::comfy_job_parents(Some(POD_VOLUME_ROOT)),
            settings: self.janitor_settings.clone(),
            clock: self.clock.clone(),
        }
    }

    pub fn webhook(&self) -> WebhookHandler {
        WebhookHandler {
            store: self.store.clone(),
            runpod: self.runpod.clone(),
            stops: self.stops.clone(),
            observer: Arc::new(self.observer()),
            signer: self.signer.clone(),
        }
    }

    pub fn stopper(&self) -> Stopper {
        Stopper {
            backends: self.backends(),
        }
    }

    /// A `restore` job as the API stores it: its input photo in the uploads bucket, the job
    /// `queued`, first due for the sweeper after `requeue_after`.
    pub fn queued_job(&self, owner: &str) -> Job {
        // Minted at the kit's time, as the API mints them, with a millisecond of its own per
        // job so that jobs sort in the order they were made.
        let n = self.next_job.fetch_add(1, Ordering::SeqCst) as Millis;
        let id = gateway::domain::job::mint_job_id(self.now() + n);
        let key = gateway::domain::keys::inline_input(owner, &id, "jpg");
        let photo = jpeg(120, 90);
        self.uploads.insert(&key, &photo);
        let job = restore_job(
            &self.catalog,
            &id,
            owner,
            &key,
            photo.len() as u64,
            gateway::app::api::timing(&self.settings, None),
            self.now(),
        );
        self.store.put(job.clone());
        job
    }

    /// [`Kit::queued_job`], on the pod backend.
    pub fn queued_pod_job(&self, owner: &str) -> Job {
        let mut job = self.queued_job(owner);
        job.backend = BackendKind::Pod;
        self.store.put(job.clone());
        job
    }

    /// The job as stored now.
    pub fn stored(&self, id: &str) -> Job {
        self.store.job(id).expect("the job is stored")
    }

    /// RunPod reports `runpod_id` running from now on.
    pub fn running_run(&self, runpod_id: &str) {
        self.runpod.set_status(
            runpod_id,
            RunPodStatus {
                id: Some(runpod_id.into()),
                status: Some("IN_PROGRESS".into()),
                ..RunPodStatus::default()
            },
        );
    }

    /// RunPod's report of a completed run whose worker wrote `files` (volume keys such as
    /// `gateway/kit/outputs/<job>/restored_00001_.png`), after putting a PNG at each on the volume.
    pub fn completed_run(&self, runpod_id: &str, files: &[String]) -> RunPodStatus {
        for key in files {
            self.volume.insert(key, &crate::images::png(32, 24));
        }
        let paths: Vec<String> = files
            .iter()
            .map(|k| format!("/runpod-volume/{k}"))
            .collect();
        let status = RunPodStatus {
            id: Some(runpod_id.into()),
            status: Some("COMPLETED".into()),
            output: Some(serde_json::json!({
                "prompt_id": "p-1",
                "files": paths,
                "file_count": files.len(),
            })),
            error: None,
            delay_time: Some(10),
            execution_time: Some(1_000),
        };
        self.runpod.set_status(runpod_id, status.clone());
        status
    }
}
