//! In-memory ports, so thousands of hostile requests run in seconds: a job store with the same
//! conditional-write rule as DynamoDB, object stores that record every key touched, a queue, a
//! RunPod that always answers the same status.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use gateway::app::finalize::Finalizer;
use gateway::app::webhook::WebhookHandler;
use gateway::config::Settings;
use gateway::domain::job::{Job, Millis};
use gateway::domain::paths::VolumeLayout;
use gateway::domain::token::WebhookSigner;
use gateway::domain::workflow::WorkflowCatalog;
use gateway::ports::{
    ByteChunks, Clock, CreateOutcome, DueJobs, FetchError, Fetched, JobPage, JobQueue, JobStore,
    ObjectError, ObjectMeta, ObjectStore, PresignedRequest, QueueError, RunPod, RunPodError,
    RunPodStatus, RunRequest, StoreError, UrlFetcher,
};
use gateway_http::api::identity::IdentitySource;
use gateway_http::api::ApiState;

pub const SECRET: &str = "hostile-tests-secret-0123456789";
pub const TOKEN: &str = "alice-token";
pub const NOW: Millis = 1_800_000_000_000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
pub struct MemStore {
    pub jobs: Mutex<HashMap<String, Job>>,
    idempotency: Mutex<HashMap<String, String>>,
    pub writes: Mutex<usize>,
}

#[async_trait]
impl JobStore for MemStore {
    async fn create(&self, job: &Job) -> Result<CreateOutcome, StoreError> {
        if let Some(key) = &job.idempotency_key {
            let idem = format!("{}#{key}", job.owner);
            if let Some(existing) = lock(&self.idempotency).get(&idem) {
                let job = lock(&self.jobs)[existing].clone();
                return Ok(CreateOutcome::Existing(Box::new(job)));
            }
            lock(&self.idempotency).insert(idem, job.id.clone());
        }
        *lock(&self.writes) += 1;
        lock(&self.jobs).insert(job.id.clone(), job.clone());
        Ok(CreateOutcome::Created)
    }

    async fn get(&self, job_id: &str) -> Result<Option<Job>, StoreError> {
        Ok(lock(&self.jobs).get(job_id).cloned())
    }

    async fn save(&self, job: &Job, expected_version: u64) -> Result<(), StoreError> {
        let mut jobs = lock(&self.jobs);
        match jobs.get(&job.id) {
            Some(stored) if stored.version == expected_version => {
                jobs.insert(job.id.clone(), job.clone());
                *lock(&self.writes) += 1;
                Ok(())
            }
            _ => Err(StoreError::Conflict),
        }
    }

    async fn list_by_owner(
        &self,
        owner: &str,
        _limit: u32,
        _cursor: Option<&str>,
    ) -> Result<JobPage, StoreError> {
        let jobs = lock(&self.jobs)
            .values()
            .filter(|j| j.owner == owner)
            .cloned()
            .collect();
        Ok(JobPage { jobs, cursor: None })
    }

    async fn due_for_check(&self, now: Millis, _limit: u32) -> Result<DueJobs, StoreError> {
        let jobs: Vec<Job> = lock(&self.jobs)
            .values()
            .filter(|j| j.next_check_at.is_some_and(|at| at <= now))
            .cloned()
            .collect();
        Ok(DueJobs {
            items_read: jobs.len() as u64,
            jobs,
        })
    }
}

/// Objects by key, and every key anyone asked for.
#[derive(Default)]
pub struct MemObjects {
    pub objects: Mutex<BTreeMap<String, Bytes>>,
    pub touched: Mutex<Vec<String>>,
}

impl MemObjects {
    pub fn with(objects: &[(&str, &[u8])]) -> Self {
        let store = Self::default();
        for (key, body) in objects {
            lock(&store.objects).insert(key.to_string(), Bytes::copy_from_slice(body));
        }
        store
    }

    fn touch(&self, key: &str) {
        lock(&self.touched).push(key.to_string());
    }

    pub fn keys(&self) -> Vec<String> {
        lock(&self.objects).keys().cloned().collect()
    }

    pub fn touched(&self) -> Vec<String> {
        lock(&self.touched).clone()
    }

    pub fn get(&self, key: &str) -> Option<Bytes> {
        lock(&self.objects).get(key).cloned()
    }
}

#[async_trait]
impl ObjectStore for MemObjects {
    async fn put_bytes(&self, key: &str, body: Bytes, _: &str) -> Result<(), ObjectError> {
        self.touch(key);
        lock(&self.objects).insert(key.to_string(), body);
        Ok(())
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError> {
        self.touch(key);
        Ok(lock(&self.objects).get(key).map(|b| ObjectMeta {
            size: b.len() as u64,
            content_type: None,
        }))
    }

    async fn read_prefix(&self, key: &str, len: u64) -> Result<Bytes, ObjectError> {
        self.touch(key);
        let body = lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| ObjectError::NotFound(key.into()))?;
        Ok(body.slice(..(len as usize).min(body.len())))
    }

    async fn open(&self, key: &str) -> Result<(ObjectMeta, ByteChunks), ObjectError> {
        self.touch(key);
        let body = lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| ObjectError::NotFound(key.into()))?;
        let meta = ObjectMeta {
            size: body.len() as u64,
            content_type: None,
        };
        Ok((meta, futures::stream::iter([Ok(body)]).boxed()))
    }

    async fn put_stream(
        &self,
        key: &str,
        _meta: &ObjectMeta,
        mut body: ByteChunks,
    ) -> Result<(), ObjectError> {
        self.touch(key);
        let mut all = Vec::new();
        while let Some(chunk) = body.next().await {
            all.extend_from_slice(&chunk?);
        }
        lock(&self.objects).insert(key.to_string(), all.into());
        Ok(())
    }

    async fn presign_get(
        &self,
        key: &str,
        _: Duration,
        _: Option<&str>,
    ) -> Result<PresignedRequest, ObjectError> {
        Ok(PresignedRequest {
            method: "GET".into(),
            url: format!("https://results.example/{key}"),
            headers: vec![],
        })
    }

    async fn presign_put(
        &self,
        key: &str,
        _: &str,
        _: Duration,
    ) -> Result<PresignedRequest, ObjectError> {
        Ok(PresignedRequest {
            method: "PUT".into(),
            url: format!("https://uploads.example/{key}"),
            headers: vec![],
        })
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        self.touch(key);
        lock(&self.objects).remove(key);
        Ok(())
    }
}

#[derive(Default)]
pub struct MemQueue {
    pub sent: Mutex<Vec<String>>,
}

#[async_trait]
impl JobQueue for MemQueue {
    async fn enqueue(&self, job_id: &str) -> Result<(), QueueError> {
        lock(&self.sent).push(job_id.to_string());
        Ok(())
    }
}

/// RunPod answering every `/status` with the same report; `/run` and `/cancel` never called
/// by the tests that use it, and counted if they are.
pub struct FixedRunPod {
    pub status: RunPodStatus,
    pub calls: Mutex<Vec<String>>,
}

#[async_trait]
impl RunPod for FixedRunPod {
    async fn run(&self, _: &RunRequest) -> Result<String, RunPodError> {
        lock(&self.calls).push("run".into());
        Err(RunPodError::Transient("not in these tests".into()))
    }

    async fn status(&self, id: &str) -> Result<RunPodStatus, RunPodError> {
        lock(&self.calls).push(format!("status {id}"));
        Ok(self.status.clone())
    }

    async fn cancel(&self, id: &str) -> Result<(), RunPodError> {
        lock(&self.calls).push(format!("cancel {id}"));
        Ok(())
    }
}

pub struct NoDownloads;

#[async_trait]
impl UrlFetcher for NoDownloads {
    async fn open(&self, _: &reqwest::Url) -> Result<Fetched, FetchError> {
        Err(FetchError::Status(403))
    }
}

pub struct FixedClock;

impl Clock for FixedClock {
    fn now_ms(&self) -> Millis {
        NOW
    }
}

/// Everything the API and webhook routers need, in memory.
pub struct World {
    pub store: Arc<MemStore>,
    pub queue: Arc<MemQueue>,
    pub uploads: Arc<MemObjects>,
    pub results: Arc<MemObjects>,
    pub volume: Arc<MemObjects>,
    pub runpod: Arc<FixedRunPod>,
    pub signer: WebhookSigner,
}

impl World {
    pub fn new(volume: MemObjects, uploads: MemObjects, runpod_status: RunPodStatus) -> Self {
        Self {
            store: Arc::default(),
            queue: Arc::default(),
            uploads: Arc::new(uploads),
            results: Arc::default(),
            volume: Arc::new(volume),
            runpod: Arc::new(FixedRunPod {
                status: runpod_status,
                calls: Mutex::default(),
            }),
            signer: WebhookSigner::new(SECRET.as_bytes(), None),
        }
    }

    fn catalog() -> Arc<WorkflowCatalog> {
        Arc::new(WorkflowCatalog::builtin().unwrap())
    }

    pub fn api(&self) -> axum::Router {
        gateway_http::api::router(Arc::new(ApiState {
            store: self.store.clone(),
            queue: self.queue.clone(),
            uploads: self.uploads.clone(),
            results: self.results.clone(),
            runpod: self.runpod.clone(),
            catalog: Self::catalog(),
            identity: IdentitySource::parse_dev_tokens(&format!("{TOKEN}=alice")).unwrap(),
            settings: Settings::default(),
            clock: Arc::new(FixedClock),
        }))
    }

    pub fn webhook(&self) -> axum::Router {
        let finalizer = Finalizer {
            store: self.store.clone(),
            volume: self.volume.clone(),
            results: self.results.clone(),
            layout: VolumeLayout::new(vec!["/runpod-volume".into(), "/workspace".into()]),
            catalog: Self::catalog(),
            fetcher: Arc::new(NoDownloads),
            settings: Settings::default(),
            clock: Arc::new(FixedClock),
        };
        gateway_http::webhook::router(Arc::new(WebhookHandler {
            store: self.store.clone(),
            runpod: self.runpod.clone(),
            finalizer: Arc::new(finalizer),
            signer: self.signer.clone(),
        }))
    }
}
