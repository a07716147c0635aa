//! In-memory fakes of every port.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use gateway::domain::callback::{AttemptResult, CallbackEvent, DeliveryLog, SigningSecret};
use gateway::domain::egress::Destination;
use gateway::domain::job::{Job, JobState, Millis};
use gateway::domain::keys;
use gateway::domain::usage::DailyUsage;
use gateway::ports::{
    ByteChunks, CallbackQueue, CallbackSender, Clock, CreateOutcome, DeliveryLogs, DueJobs,
    FetchError, Fetched, FinalizeQueue, FolderPage, ImageKind, ImageProbe, JobPage, JobQueue,
    JobStore, ObjectError, ObjectMeta, ObjectStore, PresignedPost, PresignedRequest, QueueError,
    Resolver, RunPod, RunPodError, RunPodStatus, RunRequest, SigningKeys, StagedPage, StagedUpload,
    StagedUploads, StopQueue, StopRun, StoreError, UrlFetcher, JPEG, PNG, WEBP,
};

/// Gives way once to whatever else runs on the task: the fakes answer at once, and without
/// this, two use cases joined in one test would run one after the other instead of
/// interleaving at every call, as they do against a real store.
pub async fn yield_once() {
    struct YieldOnce(bool);
    impl std::future::Future for YieldOnce {
        type Output = ();
        fn poll(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<()> {
            if self.0 {
                return std::task::Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }
    YieldOnce(false).await
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The job store: every write conditional on the version read, as DynamoDB's is; idempotency
/// keys per owner; the due jobs are those with a next check at or before now (the sparse index).
#[derive(Default)]
pub struct MemStore {
    jobs: Mutex<HashMap<String, Job>>,
    /// Idempotency item → (job id, epoch seconds until which the key stands for it).
    idempotency: Mutex<HashMap<String, (String, i64)>>,
    writes: AtomicU64,
    reads: AtomicU64,
    /// Answer the next this many calls with `Unavailable`.
    outage: AtomicU64,
    /// Runs before each save until it returns true: another writer's change landing just
    /// before a use case's write.
    before_save: Mutex<Option<SaveHook>>,
    /// Records the sweep index holds that are not readable jobs: key → next check.
    unreadable: Mutex<BTreeMap<String, Millis>>,
    failing_saves: Mutex<Option<(u64, SavePredicate)>>,
    /// Saves that land but answer `Conflict`, as DynamoDB's retried conditional write does
    /// after the first attempt committed and its answer was lost.
    lost_answers: AtomicU64,
    /// Usage totals by (owner, day), added to by the writes that end jobs.
    usage: Mutex<BTreeMap<(String, String), DailyUsage>>,
}

type SavePredicate = Box<dyn Fn(&Job) -> bool + Send>;

type SaveHook = Box<dyn FnMut(&MemStore, &Job) -> bool + Send>;

impl MemStore {
    /// Whether `owner`'s idempotency key `key` is still reserved (by any job).
    pub fn idempotency_key_taken(&self, owner: &str, key: &str) -> bool {
        lock(&self.idempotency).contains_key(&keys::idempotency_item(owner, key))
    }

    pub fn job(&self, id: &str) -> Option<Job> {
        lock(&self.jobs).get(id).cloned()
    }
    pub fn jobs(&self) -> Vec<Job> {
        lock(&self.jobs).values().cloned().collect()
    }
    /// Successful creates and saves so far.
    /// Jobs read with `get` so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
    /// Stores `job` as is, outside the use cases (a test's setup).
    pub fn put(&self, job: Job) {
        lock(&self.jobs).insert(job.id.clone(), job);
    }
    /// A record under `key`, due at `next_check_at`, that does not decode as a job (written by
    /// hand, or by a release that wrote another format).
    pub fn put_unreadable(&self, key: &str, next_check_at: Millis) {
        lock(&self.unreadable).insert(key.to_string(), next_check_at);
    }
    /// The next `saves` saves of a job `matching` fail as unavailable (other calls go through).
    pub fn fail_saves(&self, saves: u64, matching: impl Fn(&Job) -> bool + Send + 'static) {
        *lock(&self.failing_saves) = Some((saves, Box::new(matching)));
    }
    /// The next `saves` saves are written, but answer `Conflict`: the write committed, its
    /// answer was lost, and the retry met its own version.
    pub fn lose_answers(&self, saves: u64) {
        self.lost_answers.store(saves, Ordering::SeqCst);
    }
    /// Another writer's change lands first, once: just before the next save of a job in
    /// `state` (of any job, for `None`), `change` is applied to the stored copy, which takes
    /// the next version, as a real concurrent write would.
    pub fn interleave(
        &self,
        state: Option<gateway::domain::job::JobState>,
        change: impl FnOnce(&mut Job) + Send + 'static,
    ) {
        let mut change = Some(change);
        self.before_save(move |store, about_to_write| {
            if state.is_some_and(|state| about_to_write.state != state) {
                return false;
            }
            let Some(change) = change.take() else {
                return true;
            };
            let mut stored = store.job(&about_to_write.id).expect("the job is stored");
            let version = stored.version;
            change(&mut stored);
            stored.version = version + 1;
            store.put(stored);
            true
        });
    }
    /// Runs `hook` before every save, with the job about to be written, until it returns true.
    pub fn before_save(&self, hook: impl FnMut(&MemStore, &Job) -> bool + Send + 'static) {
        *lock(&self.before_save) = Some(Box::new(hook));
    }
    /// The next `calls` calls fail with `Unavailable`, as a throttled table would.
    pub fn fail_next(&self, calls: u64) {
        self.outage.store(calls, Ordering::SeqCst);
    }
    fn available(&self) -> Result<(), StoreError> {
        let left = self.outage.load(Ordering::SeqCst);
        if left > 0 {
            self.outage.store(left - 1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("throttled (test)".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl JobStore for MemStore {
    async fn create(&self, job: &Job) -> Result<CreateOutcome, StoreError> {
        yield_once().await;
        self.available()?;
        if let Some(key) = &job.idempotency_key {
            let idem = keys::idempotency_item(&job.owner, key);
            let existing = lock(&self.idempotency).get(&idem).cloned();
            // An expired key is free again, as the DynamoDB store's condition lets it be.
            if let Some((existing, _)) =
                existing.filter(|(_, until)| *until >= job.timestamps.created_at / 1000)
            {
                let job = lock(&self.jobs)[&existing].clone();
                return Ok(CreateOutcome::Existing(Box::new(job)));
            }
            let until = job.idempotency_expires_at.unwrap_or(job.expires_at);
            lock(&self.idempotency).insert(idem, (job.id.clone(), until));
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        lock(&self.jobs).insert(job.id.clone(), job.clone());
        Ok(CreateOutcome::Created)
    }

    async fn find_by_idempotency_key(
        &self,
        owner: &str,
        key: &str,
        now: Millis,
    ) -> Result<Option<Job>, StoreError> {
        yield_once().await;
        self.available()?;
        let taken = lock(&self.idempotency)
            .get(&keys::idempotency_item(owner, key))
            .cloned();
        Ok(taken
            .filter(|(_, until)| *until >= now / 1000)
            .and_then(|(id, _)| lock(&self.jobs).get(&id).cloned()))
    }

    async fn forget_idempotency_key(&self, job: &Job) -> Result<(), StoreError> {
        yield_once().await;
        self.available()?;
        if let Some(key) = &job.idempotency_key {
            let item = keys::idempotency_item(&job.owner, key);
            let mut taken = lock(&self.idempotency);
            if taken.get(&item).is_some_and(|(id, _)| *id == job.id) {
                taken.remove(&item);
            }
        }
        Ok(())
    }

    async fn get(&self, job_id: &str) -> Result<Option<Job>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        yield_once().await;
        self.available()?;
        Ok(self.job(job_id))
    }

    async fn save(&self, job: &Job, expected_version: u64) -> Result<(), StoreError> {
        yield_once().await;
        self.available()?;
        {
            let mut failing = lock(&self.failing_saves);
            if let Some((left, matching)) = failing.as_mut() {
                if *left > 0 && matching(job) {
                    *left -= 1;
                    return Err(StoreError::Unavailable("throttled (test)".into()));
                }
            }
        }
        let hook = lock(&self.before_save).take();
        if let Some(mut hook) = hook {
            if !hook(self, job) {
                lock(&self.before_save).get_or_insert(hook);
            }
        }
        let mut jobs = lock(&self.jobs);
        match jobs.get(&job.id) {
            Some(stored) if stored.version == expected_version => {
                jobs.insert(job.id.clone(), job.clone());
                // In the same critical section as the job: one transaction.
                if let Some(entry) = job.usage_to_count() {
                    lock(&self.usage)
                        .entry((job.owner.clone(), entry.day.clone()))
                        .or_insert_with(|| DailyUsage::new(&entry.day))
                        .add(entry);
                }
                self.writes.fetch_add(1, Ordering::SeqCst);
                let lost = self.lost_answers.load(Ordering::SeqCst);
                if lost > 0 {
                    self.lost_answers.store(lost - 1, Ordering::SeqCst);
                    return Err(StoreError::Conflict);
                }
                Ok(())
            }
            _ => Err(StoreError::Conflict),
        }
    }

    async fn usage(&self, owner: &str, days: &[String]) -> Result<Vec<DailyUsage>, StoreError> {
        yield_once().await;
        self.available()?;
        let usage = lock(&self.usage);
        Ok(days
            .iter()
            .filter_map(|day| usage.get(&(owner.to_string(), day.clone())).cloned())
            .collect())
    }

    async fn list_by_owner(
        &self,
        owner: &str,
        status: Option<JobState>,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<JobPage, StoreError> {
        self.available()?;
        // Like the DynamoDB store's, a cursor is bound to its listing:
        // `{owner}#{status}/{last job id}`.
        let listing = format!("{owner}#{}", status.map_or("", JobState::as_str));
        let after = match cursor {
            None => None,
            Some(cursor) => Some(
                cursor
                    .strip_prefix(&listing)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .ok_or_else(|| StoreError::Corrupt("not this listing's cursor".into()))?
                    .to_string(),
            ),
        };
        let mut jobs: Vec<Job> = lock(&self.jobs)
            .values()
            .filter(|j| j.owner == owner)
            .filter(|j| status.is_none_or(|s| j.state == s))
            .filter(|j| after.as_ref().is_none_or(|last| j.id < *last))
            .cloned()
            .collect();
        // Newest first, as the owner index (ids are UUIDv7) returns them.
        jobs.sort_by(|a, b| b.id.cmp(&a.id));
        let more = jobs.len() > limit as usize;
        jobs.truncate(limit as usize);
        let cursor = more
            .then(|| jobs.last().map(|last| format!("{listing}/{}", last.id)))
            .flatten();
        Ok(JobPage { jobs, cursor })
    }

    async fn due_for_check(&self, now: Millis, limit: u32) -> Result<DueJobs, StoreError> {
        self.available()?;
        // Oldest due first, as the index's sort key gives them; only what is returned is copied
        // (a simulation holds 100,000 jobs).
        let all = lock(&self.jobs);
        let mut due: Vec<&Job> = all
            .values()
            .filter(|j| j.next_check_at.is_some_and(|at| at <= now))
            .collect();
        due.sort_by_key(|j| j.next_check_at);
        let jobs: Vec<Job> = due.into_iter().take(limit as usize).cloned().collect();
        drop(all);
        let unreadable: Vec<String> = lock(&self.unreadable)
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(key, _)| key.clone())
            .collect();
        Ok(DueJobs {
            items_read: (jobs.len() + unreadable.len()) as u64,
            jobs,
            unreadable,
            failed_parts: Vec::new(),
        })
    }
}

/// An object store (a bucket, or the RunPod volume): objects by key, and every key touched.
#[derive(Default)]
pub struct MemObjects {
    objects: Mutex<BTreeMap<String, Bytes>>,
    touched: Mutex<Vec<String>>,
    /// Keys whose reads and writes fail, and how.
    broken: Mutex<HashMap<String, BrokenKey>>,
    listing: Mutex<Listing>,
    /// Multipart uploads in progress: (key, upload id) and when each began.
    staged: Mutex<BTreeMap<(String, String), Option<Millis>>>,
}

/// How [`MemObjects::list_folder`] pages.
struct Listing {
    page_size: usize,
    /// Once this many entries were handed out, every next page repeats the one before it,
    /// token and all, as RunPod's volume is reported to.
    repeat_after: Option<usize>,
}

impl Default for Listing {
    fn default() -> Self {
        Self {
            page_size: 1_000,
            repeat_after: None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum BrokenKey {
    /// Unavailable: a 5xx or timeout, worth retrying.
    Transient,
    /// Refused for good.
    Permanent,
}

impl MemObjects {
    pub fn with(objects: &[(&str, &[u8])]) -> Self {
        let store = Self::default();
        for (key, body) in objects {
            store.insert(key, body);
        }
        store
    }
    pub fn insert(&self, key: &str, body: &[u8]) {
        lock(&self.objects).insert(key.to_string(), Bytes::copy_from_slice(body));
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
    /// Every read or write of `key` fails from now on.
    pub fn break_key(&self, key: &str, how: BrokenKey) {
        lock(&self.broken).insert(key.to_string(), how);
    }
    /// `key` works again.
    pub fn mend_key(&self, key: &str) {
        lock(&self.broken).remove(key);
    }
    /// Folder listings hand out at most `entries` per page.
    pub fn page_listings_by(&self, entries: usize) {
        lock(&self.listing).page_size = entries.max(1);
    }
    /// Once `entries` were handed out in one listing, each next page repeats the previous one.
    pub fn repeat_pages_after(&self, entries: usize) {
        lock(&self.listing).repeat_after = Some(entries);
    }
    /// A multipart upload to `key` begun at `initiated` and never finished.
    pub fn stage_upload(&self, key: &str, upload_id: &str, initiated: Option<Millis>) {
        lock(&self.staged).insert((key.into(), upload_id.into()), initiated);
    }
    /// The unfinished uploads, as (key, upload id).
    pub fn staged(&self) -> Vec<(String, String)> {
        lock(&self.staged).keys().cloned().collect()
    }
    fn touch(&self, key: &str) -> Result<(), ObjectError> {
        lock(&self.touched).push(key.to_string());
        match lock(&self.broken).get(key) {
            Some(BrokenKey::Transient) => Err(ObjectError::Transient(format!("{key}: 503 (test)"))),
            Some(BrokenKey::Permanent) => Err(ObjectError::Permanent(format!("{key}: 403 (test)"))),
            None => Ok(()),
        }
    }
    async fn read(&self, key: &str) -> Result<Bytes, ObjectError> {
        yield_once().await;
        self.touch(key)?;
        self.get(key)
            .ok_or_else(|| ObjectError::NotFound(key.to_string()))
    }
}

#[async_trait]
impl ObjectStore for MemObjects {
    async fn put_bytes(&self, key: &str, body: Bytes, _: &str) -> Result<(), ObjectError> {
        self.touch(key)?;
        lock(&self.objects).insert(key.to_string(), body);
        Ok(())
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError> {
        self.touch(key)?;
        Ok(self.get(key).map(|b| ObjectMeta {
            size: b.len() as u64,
            content_type: None,
        }))
    }

    async fn read_prefix(&self, key: &str, len: u64) -> Result<Bytes, ObjectError> {
        let body = self.read(key).await?;
        Ok(body.slice(..(len as usize).min(body.len())))
    }

    async fn open(&self, key: &str) -> Result<(ObjectMeta, ByteChunks), ObjectError> {
        let body = self.read(key).await?;
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
        yield_once().await;
        self.touch(key)?;
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
        expires_in: Duration,
        _: Option<&str>,
    ) -> Result<PresignedRequest, ObjectError> {
        Ok(PresignedRequest {
            method: "GET".into(),
            // The validity shows in the URL, as X-Amz-Expires does in S3's.
            url: format!(
                "https://objects.test/{key}?expires={}",
                expires_in.as_secs()
            ),
            headers: vec![],
        })
    }

    async fn presign_post(
        &self,
        key: &str,
        content_type: &str,
        max_bytes: u64,
        _: Duration,
    ) -> Result<PresignedPost, ObjectError> {
        Ok(PresignedPost {
            url: "https://objects.test/".into(),
            fields: vec![
                ("key".into(), key.into()),
                ("Content-Type".into(), content_type.into()),
                ("max_bytes".into(), max_bytes.to_string()),
            ],
        })
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        self.touch(key)?;
        lock(&self.objects).remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str, max: usize) -> Result<Vec<String>, ObjectError> {
        self.touch(prefix)?;
        let mut keys: Vec<String> = lock(&self.objects)
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort();
        keys.truncate(max);
        Ok(keys)
    }

    async fn list_folder(
        &self,
        folder: &str,
        token: Option<&str>,
    ) -> Result<FolderPage, ObjectError> {
        yield_once().await;
        self.touch(folder)?;
        // Entries one level down: a file, or the folder (`…/`) its key passes through.
        let entries: std::collections::BTreeSet<String> = lock(&self.objects)
            .keys()
            .filter_map(|key| key.strip_prefix(folder))
            .map(|rest| match rest.find('/') {
                Some(at) => format!("{folder}{}", &rest[..=at]),
                None => format!("{folder}{rest}"),
            })
            .collect();
        // The token: entries handed out so far, where the previous page began, where this one
        // begins.
        let (handed, previous, after) = match token {
            None => (0, String::new(), String::new()),
            Some(token) => {
                let mut parts = token.splitn(3, '\n');
                let handed = parts.next().and_then(|n| n.parse().ok());
                match (handed, parts.next(), parts.next()) {
                    (Some(handed), Some(previous), Some(after)) => {
                        (handed, previous.to_string(), after.to_string())
                    }
                    _ => return Err(ObjectError::Permanent("bad continuation token".into())),
                }
            }
        };
        let listing = lock(&self.listing);
        let repeat = listing.repeat_after.is_some_and(|limit| handed >= limit);
        let start = if repeat { &previous } else { &after };
        let page: Vec<&String> = entries
            .iter()
            .filter(|entry| start.is_empty() || entry.as_str() > start.as_str())
            .take(listing.page_size)
            .collect();
        let more = entries
            .iter()
            .filter(|entry| start.is_empty() || entry.as_str() > start.as_str())
            .nth(listing.page_size)
            .is_some();
        let next = if repeat {
            token.map(str::to_string)
        } else if more {
            page.last()
                .map(|last| format!("{}\n{start}\n{last}", handed + page.len()))
        } else {
            None
        };
        let (folders, files) = page
            .into_iter()
            .cloned()
            .partition(|entry| entry.ends_with('/'));
        Ok(FolderPage {
            folders,
            files,
            next,
            ..FolderPage::default()
        })
    }
}

#[async_trait]
impl StagedUploads for MemObjects {
    async fn staged_uploads(
        &self,
        prefix: &str,
        after: Option<&(String, String)>,
    ) -> Result<StagedPage, ObjectError> {
        yield_once().await;
        let page_size = lock(&self.listing).page_size;
        let matching: Vec<StagedUpload> = lock(&self.staged)
            .iter()
            .filter(|((key, _), _)| key.starts_with(prefix))
            .filter(|(upload, _)| after.is_none_or(|after| *upload > after))
            .map(|((key, upload_id), initiated)| StagedUpload {
                key: key.clone(),
                upload_id: upload_id.clone(),
                initiated: *initiated,
            })
            .collect();
        let more = matching.len() > page_size;
        let uploads: Vec<StagedUpload> = matching.into_iter().take(page_size).collect();
        let next = uploads
            .last()
            .filter(|_| more)
            .map(|last| (last.key.clone(), last.upload_id.clone()));
        Ok(StagedPage { uploads, next })
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), ObjectError> {
        self.touch(key)?;
        lock(&self.staged).remove(&(key.to_string(), upload_id.to_string()));
        Ok(())
    }
}

/// The dispatch queue: every job id sent, in order.
/// A queue that refuses the next so many sends, as a throttled SQS would.
#[derive(Default)]
struct Outage(AtomicU64);

impl Outage {
    fn set(&self, calls: u64) {
        self.0.store(calls, Ordering::SeqCst);
    }

    /// Fails this call if the outage is not over, counting it down.
    fn check(&self) -> Result<(), QueueError> {
        let left = self.0.load(Ordering::SeqCst);
        if left > 0 {
            self.0.store(left - 1, Ordering::SeqCst);
            return Err(QueueError("throttled (test)".into()));
        }
        Ok(())
    }
}

#[derive(Default)]
pub struct MemQueue {
    sent: Mutex<Vec<String>>,
    /// How many of `sent` [`MemQueue::take`] has handed out.
    taken: Mutex<usize>,
    outage: Outage,
}

impl MemQueue {
    pub fn sent(&self) -> Vec<String> {
        lock(&self.sent).clone()
    }
    /// The messages sent since the last take, in order, as a consumer would receive them.
    pub fn take(&self) -> Vec<String> {
        let sent = lock(&self.sent);
        let mut taken = lock(&self.taken);
        let new = sent[*taken..].to_vec();
        *taken = sent.len();
        new
    }
    /// The next `sends` enqueues fail.
    pub fn fail_next(&self, sends: u64) {
        self.outage.set(sends);
    }
}

#[async_trait]
impl JobQueue for MemQueue {
    async fn enqueue(&self, job_id: &str, _trace_id: Option<&str>) -> Result<(), QueueError> {
        self.outage.check()?;
        lock(&self.sent).push(job_id.to_string());
        Ok(())
    }
}

/// The stop queue in memory: what was asked to be stopped, in order.
#[derive(Default)]
pub struct MemStops {
    requested: Mutex<Vec<StopRun>>,
    outage: Outage,
}

impl MemStops {
    pub fn requested(&self) -> Vec<StopRun> {
        lock(&self.requested).clone()
    }
    /// The runs asked to be stopped, in order.
    pub fn runs(&self) -> Vec<String> {
        self.requested().into_iter().map(|s| s.runpod_id).collect()
    }
    /// The next `requests` fail.
    pub fn fail_next(&self, requests: u64) {
        self.outage.set(requests);
    }
}

#[async_trait]
impl StopQueue for MemStops {
    async fn request_stop(&self, stop: &StopRun) -> Result<(), QueueError> {
        self.outage.check()?;
        lock(&self.requested).push(stop.clone());
        Ok(())
    }
}

/// A request to the finalize queue, as it was sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinalizeRequest {
    pub job_id: String,
    pub delay: Duration,
}

/// The finalize queue in memory: requests wait until a test takes them ([`MemFinalize::take`]),
/// as messages wait in SQS until the finalize function receives them.
#[derive(Default)]
pub struct MemFinalize {
    waiting: Mutex<VecDeque<FinalizeRequest>>,
    sent: Mutex<Vec<FinalizeRequest>>,
    outage: Outage,
}

impl MemFinalize {
    /// Every request ever sent, in order.
    pub fn sent(&self) -> Vec<FinalizeRequest> {
        lock(&self.sent).clone()
    }
    /// How many requests wait to be taken.
    pub fn waiting(&self) -> usize {
        lock(&self.waiting).len()
    }
    /// The requests not taken yet, oldest first, and takes them.
    pub fn take(&self) -> Vec<FinalizeRequest> {
        lock(&self.waiting).drain(..).collect()
    }
    /// The next `sends` fail.
    pub fn fail_next(&self, sends: u64) {
        self.outage.set(sends);
    }
}

#[async_trait]
impl FinalizeQueue for MemFinalize {
    async fn request_finalize(&self, job_id: &str, delay: Duration) -> Result<(), QueueError> {
        self.outage.check()?;
        let request = FinalizeRequest {
            job_id: job_id.to_string(),
            delay,
        };
        lock(&self.sent).push(request.clone());
        lock(&self.waiting).push_back(request);
        Ok(())
    }
}

/// What a scripted RunPod answers.
#[derive(Clone, Debug)]
pub enum Answer {
    Ok,
    Transient,
    NotFound,
    Permanent(u16),
    /// `/run` only: RunPod takes the job (the next id), but the answer is lost.
    Lost,
    /// The answer is longer than the gateway reads (a completed run with a huge output).
    TooLarge,
}

impl Answer {
    fn error(&self) -> Option<RunPodError> {
        match self {
            Answer::Ok => None,
            Answer::Lost => Some(RunPodError::Unknown("504 after accepting (test)".into())),
            Answer::Transient => Some(RunPodError::Transient("503 (test)".into())),
            Answer::NotFound => Some(RunPodError::NotFound),
            Answer::Permanent(status) => Some(RunPodError::Permanent {
                status: *status,
                message: "refused (test)".into(),
            }),
            Answer::TooLarge => Some(RunPodError::TooLarge {
                limit: gateway::config::DEFAULT_MAX_STATUS_BYTES,
            }),
        }
    }
}

/// RunPod's endpoint API, scripted: `/run` accepts (ids `rp-1`, `rp-2`, …) unless told to
/// answer otherwise; `/status` answers what was set for the id (404 if nothing was); `/cancel`
/// succeeds unless told otherwise. Every call is recorded.
#[derive(Default)]
pub struct ScriptedRunPod {
    run_answers: Mutex<VecDeque<Answer>>,
    statuses: Mutex<HashMap<String, Result<RunPodStatus, Answer>>>,
    runs: Mutex<Vec<RunRequest>>,
    cancel_answer: Mutex<Option<Answer>>,
    calls: Mutex<Vec<String>>,
    next_id: AtomicU64,
}

impl ScriptedRunPod {
    /// The next `/run` calls answer these, in order; then `/run` accepts again.
    pub fn answer_runs(&self, answers: &[Answer]) {
        lock(&self.run_answers).extend(answers.iter().cloned());
    }
    /// `/status/{id}` answers `status` from now on.
    pub fn set_status(&self, id: &str, status: RunPodStatus) {
        lock(&self.statuses).insert(id.to_string(), Ok(status));
    }
    /// `/status/{id}` fails from now on.
    pub fn fail_status(&self, id: &str, answer: Answer) {
        lock(&self.statuses).insert(id.to_string(), Err(answer));
    }
    /// `/cancel` answers `answer` from now on.
    pub fn answer_cancels(&self, answer: Answer) {
        *lock(&self.cancel_answer) = Some(answer);
    }
    /// The jobs `/run` accepted, in order.
    pub fn accepted(&self) -> Vec<RunRequest> {
        lock(&self.runs).clone()
    }
    /// Every call: `run`, `status {id}`, `cancel {id}`.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }
}

#[async_trait]
impl RunPod for ScriptedRunPod {
    async fn run(&self, request: &RunRequest) -> Result<String, RunPodError> {
        lock(&self.calls).push("run".into());
        let answer = lock(&self.run_answers).pop_front().unwrap_or(Answer::Ok);
        if !matches!(answer, Answer::Ok | Answer::Lost) {
            return Err(answer.error().expect("a failing answer"));
        }
        lock(&self.runs).push(request.clone());
        let id = format!("rp-{}", self.next_id.fetch_add(1, Ordering::SeqCst) + 1);
        match answer.error() {
            Some(lost) => Err(lost),
            None => Ok(id),
        }
    }

    async fn status(&self, id: &str) -> Result<RunPodStatus, RunPodError> {
        lock(&self.calls).push(format!("status {id}"));
        match lock(&self.statuses).get(id) {
            Some(Ok(status)) => Ok(status.clone()),
            Some(Err(answer)) => Err(answer.error().unwrap_or(RunPodError::NotFound)),
            None => Err(RunPodError::NotFound),
        }
    }

    async fn cancel(&self, id: &str) -> Result<(), RunPodError> {
        lock(&self.calls).push(format!("cancel {id}"));
        match lock(&self.cancel_answer).as_ref().and_then(Answer::error) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// A downloader for worker-comfyui's `s3_url` images that every server refuses.
pub struct NoDownloads;

#[async_trait]
impl UrlFetcher for NoDownloads {
    async fn open(&self, _: &url::Url) -> Result<Fetched, FetchError> {
        Err(FetchError::Status(403))
    }
    async fn open_at(&self, _: &url::Url, _: &Destination) -> Result<Fetched, FetchError> {
        Err(FetchError::Status(403))
    }
}

/// Names resolved from a table, as a test sets it: nothing here ever reaches a network, and a
/// name not in the table resolves to no address.
#[derive(Default)]
pub struct TableResolver {
    hosts: Mutex<HashMap<String, Vec<std::net::IpAddr>>>,
}

impl TableResolver {
    /// `host` resolves to `addresses` from now on.
    pub fn set(&self, host: &str, addresses: &[&str]) {
        let parsed = addresses
            .iter()
            .map(|a| a.parse().expect("an IP address"))
            .collect();
        lock(&self.hosts).insert(host.to_string(), parsed);
    }
}

#[async_trait]
impl Resolver for TableResolver {
    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<std::net::SocketAddr>, String> {
        yield_once().await;
        // An IP literal resolves to itself, as a real resolver's does.
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(vec![std::net::SocketAddr::new(ip, port)]);
        }
        Ok(lock(&self.hosts)
            .get(host)
            .map(|ips| {
                ips.iter()
                    .map(|ip| std::net::SocketAddr::new(*ip, port))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// Web servers by URL, for inputs given by URL: what each answers, and every address the
/// gateway connected to for them.
#[derive(Default)]
pub struct ServedUrls {
    answers: Mutex<HashMap<String, Result<Bytes, u16>>>,
    opened: Mutex<Vec<(String, std::net::SocketAddr)>>,
}

impl ServedUrls {
    /// `url` answers 200 with `body`.
    pub fn serve(&self, url: &str, body: &[u8]) {
        lock(&self.answers).insert(url.to_string(), Ok(Bytes::copy_from_slice(body)));
    }
    /// `url` answers `status`.
    pub fn answer(&self, url: &str, status: u16) {
        lock(&self.answers).insert(url.to_string(), Err(status));
    }
    /// Every (URL, address) fetched, in order.
    pub fn opened(&self) -> Vec<(String, std::net::SocketAddr)> {
        lock(&self.opened).clone()
    }
}

#[async_trait]
impl UrlFetcher for ServedUrls {
    async fn open(&self, _: &url::Url) -> Result<Fetched, FetchError> {
        panic!("an input URL is fetched only from the address checked (open_at)")
    }
    async fn open_at(&self, url: &url::Url, to: &Destination) -> Result<Fetched, FetchError> {
        yield_once().await;
        lock(&self.opened).push((url.to_string(), to.address));
        match lock(&self.answers).get(url.as_str()).cloned() {
            Some(Ok(body)) => Ok(Fetched {
                size: Some(body.len() as u64),
                body: futures::stream::iter([Ok(body)]).boxed(),
            }),
            Some(Err(503)) => Err(FetchError::Transient("HTTP 503".into())),
            Some(Err(status)) => Err(FetchError::Status(status)),
            None => Err(FetchError::Status(404)),
        }
    }
}

/// Input images recognised by their magic bytes alone; every image has the size last set
/// (640x480 unless told otherwise), whatever its bytes say.
pub struct MagicBytes {
    size: Mutex<(u32, u32)>,
}

impl Default for MagicBytes {
    fn default() -> Self {
        Self {
            size: Mutex::new((640, 480)),
        }
    }
}

impl MagicBytes {
    pub fn set_size(&self, width: u32, height: u32) {
        *lock(&self.size) = (width, height);
    }
}

impl ImageProbe for MagicBytes {
    fn sniff(&self, prefix: &[u8]) -> Option<ImageKind> {
        match prefix {
            [0xFF, 0xD8, 0xFF, ..] => Some(JPEG),
            [0x89, b'P', b'N', b'G', ..] => Some(PNG),
            [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some(WEBP),
            _ => None,
        }
    }

    fn dimensions(&self, bytes: &[u8]) -> Option<(ImageKind, u32, u32)> {
        let (width, height) = *lock(&self.size);
        self.sniff(bytes).map(|kind| (kind, width, height))
    }
}

/// A clock that moves only when told.
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn at(now: Millis) -> Self {
        Self(AtomicI64::new(now))
    }
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// Client callbacks
// ---------------------------------------------------------------------------------------------

/// Delivery logs by job, each with its version, written conditionally as DynamoDB would.
#[derive(Default)]
pub struct MemDeliveryLogs {
    logs: Mutex<HashMap<String, (DeliveryLog, u64)>>,
}

impl MemDeliveryLogs {
    pub fn log(&self, job_id: &str) -> Option<DeliveryLog> {
        lock(&self.logs).get(job_id).map(|(log, _)| log.clone())
    }
}

#[async_trait]
impl DeliveryLogs for MemDeliveryLogs {
    async fn delivery_log(&self, job_id: &str) -> Result<Option<(DeliveryLog, u64)>, StoreError> {
        yield_once().await;
        Ok(lock(&self.logs).get(job_id).cloned())
    }
    async fn save_delivery_log(&self, log: &DeliveryLog, expected: u64) -> Result<(), StoreError> {
        yield_once().await;
        let mut logs = lock(&self.logs);
        let stored = logs.get(&log.job_id).map_or(0, |(_, version)| *version);
        if stored != expected {
            return Err(StoreError::Conflict);
        }
        logs.insert(log.job_id.clone(), (log.clone(), expected + 1));
        Ok(())
    }
    async fn forget_delivery_log(&self, job_id: &str) -> Result<(), StoreError> {
        yield_once().await;
        lock(&self.logs).remove(job_id);
        Ok(())
    }
}

/// The delivery queue: every notice, and every delivery request with its delay.
#[derive(Default)]
pub struct MemCallbackQueue {
    notices: Mutex<Vec<(String, CallbackEvent)>>,
    requests: Mutex<Vec<(String, String, Duration)>>,
    /// Sends that fail from now on, as a queue that is down.
    down: AtomicBool,
}

impl MemCallbackQueue {
    /// Takes the delivery requests waiting, oldest first.
    pub fn take(&self) -> Vec<(String, String, Duration)> {
        std::mem::take(&mut *lock(&self.requests))
    }

    /// Takes the notices waiting (events to tell), oldest first.
    pub fn take_notices(&self) -> Vec<(String, CallbackEvent)> {
        std::mem::take(&mut *lock(&self.notices))
    }

    /// The notices waiting, left in place.
    pub fn notices(&self) -> Vec<(String, CallbackEvent)> {
        lock(&self.notices).clone()
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn up(&self) -> Result<(), QueueError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(QueueError("the callback queue is down".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl CallbackQueue for MemCallbackQueue {
    async fn request_notice(&self, job_id: &str, event: CallbackEvent) -> Result<(), QueueError> {
        self.up()?;
        lock(&self.notices).push((job_id.into(), event));
        Ok(())
    }

    async fn request_delivery(
        &self,
        job_id: &str,
        message_id: &str,
        delay: Duration,
    ) -> Result<(), QueueError> {
        self.up()?;
        lock(&self.requests).push((job_id.into(), message_id.into(), delay));
        Ok(())
    }
}

/// One callback as the receiver got it.
#[derive(Clone, Debug)]
pub struct Posted {
    pub url: String,
    pub address: std::net::SocketAddr,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Posted {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A receiver that answers from a script (a 2xx once it runs out), and keeps every callback.
#[derive(Default)]
pub struct ScriptedReceiver {
    answers: Mutex<VecDeque<AttemptResult>>,
    posted: Mutex<Vec<Posted>>,
}

impl ScriptedReceiver {
    /// The next attempts get these answers, in order.
    pub fn answer(&self, answers: &[AttemptResult]) {
        lock(&self.answers).extend(answers.iter().cloned());
    }
    pub fn posted(&self) -> Vec<Posted> {
        lock(&self.posted).clone()
    }
}

#[async_trait]
impl CallbackSender for ScriptedReceiver {
    async fn post(
        &self,
        url: &url::Url,
        to: &Destination,
        headers: &[(&'static str, String)],
        body: &[u8],
    ) -> AttemptResult {
        yield_once().await;
        lock(&self.posted).push(Posted {
            url: url.to_string(),
            address: to.address,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect(),
            body: String::from_utf8_lossy(body).into_owned(),
        });
        lock(&self.answers)
            .pop_front()
            .unwrap_or(AttemptResult::Delivered(200))
    }
}

/// Each owner's secrets: one made on first use from the owner's name (so tests can verify),
/// and a rotation on demand.
#[derive(Default)]
pub struct MemSigningKeys {
    secrets: Mutex<HashMap<String, Vec<SigningSecret>>>,
}

impl MemSigningKeys {
    /// Puts a new secret before the owner's current one.
    pub fn rotate(&self, owner: &str, seed: u64) {
        use rand::SeedableRng;
        let new = SigningSecret::generate(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let mut secrets = lock(&self.secrets);
        let list = secrets.entry(owner.to_string()).or_default();
        list.insert(0, new);
        list.truncate(2);
    }
}

#[async_trait]
impl SigningKeys for MemSigningKeys {
    async fn secrets(&self, owner: &str) -> Result<Vec<SigningSecret>, StoreError> {
        use rand::SeedableRng;
        let mut secrets = lock(&self.secrets);
        let list = secrets.entry(owner.to_string()).or_insert_with(|| {
            let seed = owner
                .bytes()
                .fold(7u64, |a, b| a.wrapping_mul(31) + u64::from(b));
            vec![SigningSecret::generate(
                &mut rand::rngs::StdRng::seed_from_u64(seed),
            )]
        });
        Ok(list.clone())
    }
    async fn rotate(&self, owner: &str) -> Result<Vec<SigningSecret>, StoreError> {
        let seed = lock(&self.secrets).get(owner).map_or(0, |s| s.len() as u64) + 1_000;
        MemSigningKeys::rotate(self, owner, seed);
        self.secrets(owner).await
    }
}

/// The poll queue: every check asked for, with its due time and delay, in order.
#[derive(Default)]
pub struct MemPolls {
    waiting: Mutex<VecDeque<(String, Millis, Duration)>>,
    outage: Outage,
}

impl MemPolls {
    /// The checks not taken yet, oldest first, and takes them.
    pub fn take(&self) -> Vec<(String, Millis, Duration)> {
        lock(&self.waiting).drain(..).collect()
    }
    pub fn waiting(&self) -> usize {
        lock(&self.waiting).len()
    }
    /// The next `sends` fail.
    pub fn fail_next(&self, sends: u64) {
        self.outage.set(sends);
    }
}

#[async_trait]
impl gateway::ports::PollQueue for MemPolls {
    async fn request_check(
        &self,
        job_id: &str,
        due: Millis,
        delay: Duration,
    ) -> Result<(), QueueError> {
        self.outage.check()?;
        lock(&self.waiting).push_back((job_id.to_string(), due, delay));
        Ok(())
    }
}

/// A ComfyUI server in memory: the uploads it took, the prompts it queued (each in the state
/// the test sets), the files it serves back. A restart forgets the queue and the history, as
/// ComfyUI's does.
#[derive(Default)]
pub struct MemComfy {
    uploads: Mutex<Vec<(String, String)>>,
    prompts: Mutex<BTreeMap<String, gateway::domain::comfy::PromptState>>,
    graphs: Mutex<Vec<(String, serde_json::Value)>>,
    files: Mutex<HashMap<(String, String), Bytes>>,
    cancelled: Mutex<Vec<String>>,
    /// The next `/prompt` answers this refusal.
    refuse: Mutex<Option<String>>,
    /// The next `/prompt` queues the prompt but its answer is lost.
    lose_answer: AtomicBool,
    /// `/prompt` answers ids of its own (a server that ignores `prompt_id`).
    ignores_prompt_id: AtomicBool,
    down: AtomicBool,
    next_id: AtomicU64,
}

impl MemComfy {
    /// The `(subfolder, name)` of every upload, in order.
    pub fn uploads(&self) -> Vec<(String, String)> {
        lock(&self.uploads).clone()
    }
    /// Every graph queued, with its prompt id, in order.
    pub fn graphs(&self) -> Vec<(String, serde_json::Value)> {
        lock(&self.graphs).clone()
    }
    pub fn state(&self, prompt_id: &str) -> Option<gateway::domain::comfy::PromptState> {
        lock(&self.prompts).get(prompt_id).cloned()
    }
    pub fn set_state(&self, prompt_id: &str, state: gateway::domain::comfy::PromptState) {
        lock(&self.prompts).insert(prompt_id.to_string(), state);
    }
    /// The prompt ran and saved `files` (`(subfolder, filename, bytes)`) in ComfyUI's output.
    pub fn succeed(&self, prompt_id: &str, files: &[(&str, &str, &[u8])]) {
        let mut listed = Vec::new();
        for (subfolder, name, bytes) in files {
            lock(&self.files).insert(
                (subfolder.to_string(), name.to_string()),
                Bytes::copy_from_slice(bytes),
            );
            listed.push(gateway::domain::comfy::ComfyFile {
                filename: name.to_string(),
                subfolder: subfolder.to_string(),
                kind: "output".into(),
            });
        }
        self.set_state(
            prompt_id,
            gateway::domain::comfy::PromptState::Succeeded(listed),
        );
    }
    /// ComfyUI restarted: queue and history are gone (its files stay on disk).
    pub fn restart(&self) {
        lock(&self.prompts).clear();
    }
    pub fn cancelled(&self) -> Vec<String> {
        lock(&self.cancelled).clone()
    }
    pub fn refuse_next(&self, message: &str) {
        *lock(&self.refuse) = Some(message.to_string());
    }
    pub fn lose_next_answer(&self) {
        self.lose_answer.store(true, Ordering::SeqCst);
    }
    pub fn ignore_prompt_ids(&self) {
        self.ignores_prompt_id.store(true, Ordering::SeqCst);
    }
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    fn up(&self) -> Result<(), gateway::ports::ComfyError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(gateway::ports::ComfyError::Unavailable(
                "connection refused (test)".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl gateway::ports::ComfyServer for MemComfy {
    async fn upload_image(
        &self,
        subfolder: &str,
        name: &str,
        _content_type: &str,
        _body: Bytes,
    ) -> Result<String, gateway::ports::ComfyError> {
        self.up()?;
        lock(&self.uploads).push((subfolder.to_string(), name.to_string()));
        Ok(format!("{subfolder}/{name}"))
    }

    async fn queue_prompt(
        &self,
        prompt_id: &str,
        graph: &serde_json::Value,
    ) -> Result<String, gateway::ports::ComfyError> {
        self.up()?;
        if let Some(message) = lock(&self.refuse).take() {
            return Err(gateway::ports::ComfyError::Refused(message));
        }
        let id = if self.ignores_prompt_id.load(Ordering::SeqCst) {
            format!("server-{}", self.next_id.fetch_add(1, Ordering::SeqCst))
        } else {
            prompt_id.to_string()
        };
        lock(&self.graphs).push((id.clone(), graph.clone()));
        self.set_state(&id, gateway::domain::comfy::PromptState::Queued);
        if self.lose_answer.swap(false, Ordering::SeqCst) {
            return Err(gateway::ports::ComfyError::Unavailable(
                "the answer was lost (test)".into(),
            ));
        }
        Ok(id)
    }

    async fn prompt_state(
        &self,
        prompt_id: &str,
    ) -> Result<gateway::domain::comfy::PromptState, gateway::ports::ComfyError> {
        self.up()?;
        Ok(self
            .state(prompt_id)
            .unwrap_or(gateway::domain::comfy::PromptState::Unseen))
    }

    async fn view(
        &self,
        file: &gateway::domain::comfy::ComfyFile,
    ) -> Result<Fetched, gateway::ports::ComfyError> {
        self.up()?;
        let bytes = lock(&self.files)
            .get(&(file.subfolder.clone(), file.filename.clone()))
            .cloned()
            .ok_or(gateway::ports::ComfyError::NotFound)?;
        Ok(Fetched {
            size: Some(bytes.len() as u64),
            body: futures::stream::iter([Ok(bytes)]).boxed(),
        })
    }

    async fn cancel(&self, prompt_id: &str) -> Result<(), gateway::ports::ComfyError> {
        self.up()?;
        lock(&self.cancelled).push(prompt_id.to_string());
        if self.state(prompt_id).is_some() {
            self.set_state(prompt_id, gateway::domain::comfy::PromptState::Interrupted);
        }
        Ok(())
    }
}

/// Hold-back slots: every write conditional on the version read, as DynamoDB's is.
#[derive(Default)]
pub struct MemSlots {
    records: Mutex<HashMap<String, (gateway::domain::hold::Slots, u64)>>,
}

impl MemSlots {
    /// The key's record as stored now.
    pub fn get(&self, key: &str) -> Option<gateway::domain::hold::Slots> {
        lock(&self.records).get(key).map(|(slots, _)| slots.clone())
    }
}

#[async_trait]
impl gateway::ports::SlotStore for MemSlots {
    async fn slots(
        &self,
        key: &str,
    ) -> Result<Option<(gateway::domain::hold::Slots, u64)>, StoreError> {
        yield_once().await;
        Ok(lock(&self.records).get(key).cloned())
    }

    async fn save_slots(
        &self,
        slots: &gateway::domain::hold::Slots,
        expected: u64,
    ) -> Result<(), StoreError> {
        yield_once().await;
        let mut records = lock(&self.records);
        let stored = records.get(&slots.key).map_or(0, |(_, version)| *version);
        if stored != expected {
            return Err(StoreError::Conflict);
        }
        records.insert(slots.key.clone(), (slots.clone(), expected + 1));
        Ok(())
    }
}

/// Owners' limit overrides and submit buckets, each spend atomic as DynamoDB's
/// compare-and-set is.
#[derive(Default)]
pub struct MemTenants {
    overrides: Mutex<HashMap<String, gateway::domain::tenant::LimitOverrides>>,
    buckets: Mutex<HashMap<String, Millis>>,
    /// How many times an owner's overrides were read (the cache's test).
    pub reads: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl gateway::ports::TenantStore for MemTenants {
    async fn overrides(
        &self,
        owner: &str,
    ) -> Result<Option<gateway::domain::tenant::LimitOverrides>, StoreError> {
        yield_once().await;
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(lock(&self.overrides).get(owner).copied())
    }

    async fn set_overrides(
        &self,
        owner: &str,
        overrides: &gateway::domain::tenant::LimitOverrides,
    ) -> Result<(), StoreError> {
        lock(&self.overrides).insert(owner.to_string(), *overrides);
        Ok(())
    }

    async fn spend_submit(
        &self,
        owner: &str,
        rate: &gateway::domain::tenant::Rate,
        now: Millis,
    ) -> Result<Result<(), Millis>, StoreError> {
        yield_once().await;
        let mut buckets = lock(&self.buckets);
        Ok(rate.admit(buckets.get(owner).copied(), now).map(|next| {
            buckets.insert(owner.to_string(), next);
        }))
    }
}

#[derive(Default)]
pub struct MemBatches {
    batches: Mutex<HashMap<String, gateway::domain::batch::Batch>>,
    /// Answer the next this many creates with `Unavailable`.
    outage: AtomicU64,
}

impl MemBatches {
    pub fn fail_next(&self, calls: u64) {
        self.outage.store(calls, Ordering::SeqCst);
    }
    pub fn count(&self) -> usize {
        lock(&self.batches).len()
    }
}

#[async_trait]
impl gateway::ports::BatchStore for MemBatches {
    async fn create_batch(&self, batch: &gateway::domain::batch::Batch) -> Result<(), StoreError> {
        let left = self.outage.load(Ordering::SeqCst);
        if left > 0 {
            self.outage.store(left - 1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("down (test)".into()));
        }
        let mut batches = lock(&self.batches);
        if batches.contains_key(&batch.id) {
            return Err(StoreError::Conflict);
        }
        batches.insert(batch.id.clone(), batch.clone());
        Ok(())
    }

    async fn batch(&self, id: &str) -> Result<Option<gateway::domain::batch::Batch>, StoreError> {
        Ok(lock(&self.batches).get(id).cloned())
    }
}
