//! A real job store (usually DynamoDB on moto) seen through: every call goes to it, and is
//! counted; the sweeper index can be made to lag. Wrapping the real store, not a fake, keeps
//! moto's answers in the loop of the test or figure that needs the counts.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use gateway::domain::job::{Job, Millis};
use gateway::ports::{CreateOutcome, DueJobs, JobPage, JobStore, StoreError};

pub struct ObservedStore {
    inner: Arc<dyn JobStore>,
    gets: AtomicU64,
    saves: AtomicU64,
    index_calls: AtomicU64,
    index_items: AtomicU64,
    /// When set, `due_for_check` answers with these copies, read earlier, as an eventually
    /// consistent index can.
    lagging_index: Mutex<Option<Vec<Job>>>,
}

impl ObservedStore {
    pub fn new(inner: Arc<dyn JobStore>) -> Self {
        Self {
            inner,
            gets: AtomicU64::new(0),
            saves: AtomicU64::new(0),
            index_calls: AtomicU64::new(0),
            index_items: AtomicU64::new(0),
            lagging_index: Mutex::new(None),
        }
    }

    /// The sweeper index answers with `stale` from now on.
    pub fn lag_index(self, stale: Vec<Job>) -> Self {
        *self.lagging_index.lock().unwrap() = Some(stale);
        self
    }

    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::Relaxed)
    }
    pub fn saves(&self) -> u64 {
        self.saves.load(Ordering::Relaxed)
    }
    pub fn index_calls(&self) -> u64 {
        self.index_calls.load(Ordering::Relaxed)
    }
    /// Items the index read to answer (DynamoDB's `ScannedCount`), summed over calls.
    pub fn index_items(&self) -> u64 {
        self.index_items.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl JobStore for ObservedStore {
    async fn create(&self, job: &Job) -> Result<CreateOutcome, StoreError> {
        self.inner.create(job).await
    }
    async fn find_by_idempotency_key(
        &self,
        owner: &str,
        key: &str,
        now: Millis,
    ) -> Result<Option<Job>, StoreError> {
        self.inner.find_by_idempotency_key(owner, key, now).await
    }
    async fn forget_idempotency_key(&self, job: &Job) -> Result<(), StoreError> {
        self.inner.forget_idempotency_key(job).await
    }
    async fn get(&self, job_id: &str) -> Result<Option<Job>, StoreError> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get(job_id).await
    }
    async fn save(&self, job: &Job, expected_version: u64) -> Result<(), StoreError> {
        self.saves.fetch_add(1, Ordering::Relaxed);
        self.inner.save(job, expected_version).await
    }
    async fn usage(
        &self,
        owner: &str,
        days: &[String],
    ) -> Result<Vec<gateway::domain::usage::DailyUsage>, StoreError> {
        self.inner.usage(owner, days).await
    }
    async fn list_by_owner(
        &self,
        owner: &str,
        status: Option<gateway::domain::job::JobState>,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<JobPage, StoreError> {
        self.inner.list_by_owner(owner, status, limit, cursor).await
    }
    async fn due_for_check(&self, now: Millis, limit: u32) -> Result<DueJobs, StoreError> {
        self.index_calls.fetch_add(1, Ordering::Relaxed);
        let stale = self.lagging_index.lock().unwrap().clone();
        let due = match stale {
            Some(jobs) => DueJobs {
                items_read: jobs.len() as u64,
                jobs,
                ..DueJobs::default()
            },
            None => self.inner.due_for_check(now, limit).await?,
        };
        self.index_items
            .fetch_add(due.items_read, Ordering::Relaxed);
        Ok(due)
    }
}
