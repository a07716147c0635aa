//! The job store on DynamoDB.
//!
//! One table, partition key `pk`. A job item carries its whole record as JSON in `doc`, plus the
//! attributes that keys, indexes, conditions and the console need as real attributes:
//! - `owner` + `job_id`: the owner index (`owner-index`), newest first because job ids are
//!   UUIDv7 and sort by time;
//! - `owner_status` (`{owner}#{status}`) + `job_id`: the same, one partition per status
//!   (`owner-status-index`), for `GET /jobs?status=`;
//! - `sweep_shard` + `next_check_at`: the sparse sweeper index (`sweep-index`). Both are removed
//!   when a job turns terminal, so the index holds only jobs in flight and a sweep reads only
//!   what is due, however many finished jobs the table keeps;
//! - `version`: the optimistic-concurrency condition on every write;
//! - `expires_at`: DynamoDB TTL (epoch seconds).
//!
//! Idempotency keys are separate items (`pk = idem#<owner>#<key>`; every key format is in
//! `gateway::domain::keys`) written in the same
//! transaction as the job, so two requests with one key can never both create a job.
//!
//! Usage totals are items too (`pk = usage#<owner>#<day>`, counters only, no `owner` or
//! `next_check_at`, so in neither index): the write that ends a job adds to its owner's day in
//! the same transaction, so the totals count each ended job once and never a write that lost.
use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, Put, TransactWriteItem, Update};
use aws_sdk_dynamodb::Client;

use crate::adapters::declared::DeclaredOperations;
use base64::Engine as _;

use gateway::domain::callback::DeliveryLog;
use gateway::domain::job::{Job, JobState, Millis, UsageEntry};
use gateway::domain::keys::{self, SWEEP_SHARDS};
use gateway::domain::usage::DailyUsage;
use gateway::ports::{CreateOutcome, DeliveryLogs, DueJobs, JobPage, JobStore, StoreError};

/// The DynamoDB operations [`DynamoJobStore`] calls.
pub const AWS_OPERATIONS: &[&str] = &[
    "GetItem",
    "PutItem",
    "Query",
    "TransactWriteItems",
    "DeleteItem",
    "BatchGetItem",
    "UpdateItem",
];
/// The operations of [`create_table`], for the local stack only (in AWS the template creates
/// the table).
pub const LOCAL_OPERATIONS: &[&str] = &["CreateTable", "UpdateTimeToLive"];

/// A DynamoDB client that makes only the store's calls.
pub fn client(sdk: &aws_config::SdkConfig) -> Client {
    Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(sdk)
            .interceptor(DeclaredOperations::new("job store", AWS_OPERATIONS))
            .build(),
    )
}

pub const OWNER_INDEX: &str = "owner-index";
pub const SWEEP_INDEX: &str = "sweep-index";
pub const OWNER_STATUS_INDEX: &str = "owner-status-index";

#[derive(Clone)]
pub struct DynamoJobStore {
    client: Client,
    table: String,
}

impl DynamoJobStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn to_item(job: &Job) -> Result<HashMap<String, AttributeValue>, StoreError> {
    let doc = serde_json::to_string(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let mut item = HashMap::from([
        ("pk".to_string(), s(keys::job_item(&job.id))),
        ("job_id".to_string(), s(&job.id)),
        ("owner".to_string(), s(&job.owner)),
        ("state".to_string(), s(job.state.as_str())),
        (
            "owner_status".to_string(),
            s(keys::owner_status(&job.owner, job.state.as_str())),
        ),
        ("workflow".to_string(), s(&job.workflow)),
        ("created_at".to_string(), n(job.timestamps.created_at)),
        ("version".to_string(), n(job.version)),
        ("expires_at".to_string(), n(job.expires_at)),
        ("doc".to_string(), s(doc)),
    ]);
    if let Some(id) = &job.runpod_job_id {
        item.insert("runpod_job_id".into(), s(id));
    }
    if let Some(next) = job.next_check_at {
        item.insert("sweep_shard".into(), s(keys::sweep_shard_of(&job.id)));
        item.insert("next_check_at".into(), n(next));
    }
    Ok(item)
}

fn from_item(item: &HashMap<String, AttributeValue>) -> Result<Job, StoreError> {
    let doc = item
        .get("doc")
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| StoreError::Corrupt("item has no doc".into()))?;
    serde_json::from_str(doc).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The counter of `state` in a usage item.
fn usage_counter(state: JobState) -> &'static str {
    match state {
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::TimedOut => "timed_out",
        JobState::Queued | JobState::Submitted | JobState::Running => "not_ended",
    }
}

fn usage_from_item(
    owner: &str,
    item: &HashMap<String, AttributeValue>,
) -> Result<DailyUsage, StoreError> {
    let pk = item
        .get("pk")
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| StoreError::Corrupt("usage item without pk".into()))?;
    let day = pk
        .strip_prefix(&keys::usage_item(owner, ""))
        .ok_or_else(|| StoreError::Corrupt(format!("{pk} is not this owner's usage")))?;
    let count = |name: &str| -> Result<u64, StoreError> {
        match item.get(name) {
            None => Ok(0),
            Some(value) => value
                .as_n()
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("{pk}: {name} is not a count"))),
        }
    };
    Ok(DailyUsage {
        day: day.to_string(),
        succeeded: count("succeeded")?,
        failed: count("failed")?,
        cancelled: count("cancelled")?,
        timed_out: count("timed_out")?,
        gpu_ms: count("gpu_ms")?,
        cost_nano_usd: count("cost_nano_usd")?,
    })
}

fn unavailable<E: ProvideErrorMetadata + std::fmt::Debug>(err: SdkError<E>) -> StoreError {
    let detail = match err.as_service_error() {
        Some(service) => format!(
            "{}: {}",
            service.code().unwrap_or("unknown"),
            service.message().unwrap_or_default()
        ),
        None => format!("{err:?}"),
    };
    StoreError::Unavailable(detail)
}

/// A listing's cursor: the last job read, and which listing it belongs to (owner, status).
fn encode_cursor(
    key: &HashMap<String, AttributeValue>,
    owner: &str,
    status: Option<&str>,
) -> Option<String> {
    let pk = key.get("pk")?.as_s().ok()?;
    let raw = serde_json::json!({ "pk": pk, "owner": owner, "status": status });
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.to_string()))
}

fn decode_cursor(
    cursor: &str,
    owner: &str,
    status: Option<&str>,
) -> Result<HashMap<String, AttributeValue>, StoreError> {
    let invalid = || StoreError::Corrupt("invalid cursor".into());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| invalid())?;
    let value: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| invalid())?;
    let pk = value["pk"].as_str().ok_or_else(invalid)?;
    // A cursor names a position in one owner's listing; it must not open another's, nor go on
    // a listing of another status.
    if value["owner"].as_str() != Some(owner) || value["status"].as_str() != status {
        return Err(invalid());
    }
    let mut key = HashMap::from([("pk".to_string(), s(pk)), ("job_id".to_string(), s(pk))]);
    match status {
        None => key.insert("owner".to_string(), s(owner)),
        Some(status) => key.insert(
            "owner_status".to_string(),
            s(keys::owner_status(owner, status)),
        ),
    };
    Ok(key)
}

/// Whether `stored` is the record `job` created: the same new id, owner, creation time and
/// input. Not the whole record, which need not survive the round trip bit for bit.
fn same_job(stored: &Job, job: &Job) -> bool {
    stored.id == job.id
        && stored.owner == job.owner
        && stored.timestamps.created_at == job.timestamps.created_at
        && stored.input.key == job.input.key
}

impl DynamoJobStore {
    /// The write that ends `job`, and its owner's usage for the day, in one transaction. Two
    /// jobs of one owner ending at once contend for the usage item (DynamoDB cancels one
    /// transaction with `TransactionConflict`): that one is tried again, since its version
    /// condition still decides whether it may land.
    async fn save_ending(
        &self,
        job: &Job,
        expected_version: u64,
        entry: &UsageEntry,
    ) -> Result<(), StoreError> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(to_item(job)?))
            .condition_expression("version = :expected")
            .expression_attribute_values(":expected", n(expected_version))
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let add = Update::builder()
            .table_name(&self.table)
            .key("pk", s(keys::usage_item(&job.owner, &entry.day)))
            .update_expression("ADD #state :one, gpu_ms :gpu, cost_nano_usd :cost")
            .expression_attribute_names("#state", usage_counter(entry.state))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":gpu", n(entry.gpu_ms))
            .expression_attribute_values(":cost", n(entry.cost_nano_usd))
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut last = String::new();
        for attempt in 0..4u32 {
            if attempt > 0 {
                let wait = 20u64 * 2u64.pow(attempt) + rand::random::<u64>() % 40;
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            }
            let result = self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().put(put.clone()).build())
                .transact_items(TransactWriteItem::builder().update(add.clone()).build())
                .send()
                .await;
            let err = match result {
                Ok(_) => return Ok(()),
                Err(err) => err,
            };
            let reasons: Vec<String> = err
                .as_service_error()
                .filter(|e| e.is_transaction_canceled_exception())
                .map(|e| match e {
                    TransactWriteItemsError::TransactionCanceledException(cancelled) => cancelled
                        .cancellation_reasons()
                        .iter()
                        .filter_map(|r| r.code().map(str::to_string))
                        .collect(),
                    _ => Vec::new(),
                })
                .unwrap_or_default();
            if reasons.iter().any(|r| r == "ConditionalCheckFailed") {
                return Err(StoreError::Conflict);
            }
            if !reasons.iter().any(|r| r == "TransactionConflict") {
                return Err(unavailable(err));
            }
            last = format!("{reasons:?}");
        }
        Err(StoreError::Unavailable(format!(
            "the usage total stayed contended: {last}"
        )))
    }
}

#[async_trait]
impl JobStore for DynamoJobStore {
    async fn create(&self, job: &Job) -> Result<CreateOutcome, StoreError> {
        let item = to_item(job)?;
        let Some(key) = &job.idempotency_key else {
            let result = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk)")
                .send()
                .await;
            return match result {
                Ok(_) => Ok(CreateOutcome::Created),
                // The job's id is new, so an item already under it can only be this very
                // write: it committed, its answer was lost, and the SDK's retry found it.
                Err(err)
                    if err
                        .as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
                {
                    match self.get(&job.id).await? {
                        Some(stored) if same_job(&stored, job) => Ok(CreateOutcome::Created),
                        _ => Err(StoreError::Conflict),
                    }
                }
                Err(err) => Err(unavailable(err)),
            };
        };
        let job_put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let idem_pk = keys::idempotency_item(&job.owner, key);
        // The key stands for the job until `idempotency_expires_at`; TTL deletes the item up
        // to days later, so an expired one is overwritten rather than waited for.
        let until = job.idempotency_expires_at.unwrap_or(job.expires_at);
        let idem_put = Put::builder()
            .table_name(&self.table)
            .item("pk", s(&idem_pk))
            .item("target_job_id", s(&job.id))
            .item("expires_at", n(until))
            .condition_expression("attribute_not_exists(pk) OR expires_at < :now")
            .expression_attribute_values(":now", n(job.timestamps.created_at / 1000))
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(job_put).build())
            .transact_items(TransactWriteItem::builder().put(idem_put).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(CreateOutcome::Created),
            Err(err)
                if err
                    .as_service_error()
                    .map(|e| e.is_transaction_canceled_exception())
                    .unwrap_or(false) =>
            {
                let now = job.timestamps.created_at;
                match self.find_by_idempotency_key(&job.owner, key, now).await? {
                    // This very write, committed with its answer lost (see above). By id, not
                    // by content: taking it for a replay would remove its input.
                    Some(existing) if same_job(&existing, job) => Ok(CreateOutcome::Created),
                    Some(existing) => Ok(CreateOutcome::Existing(Box::new(existing))),
                    None => Err(StoreError::Conflict),
                }
            }
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn find_by_idempotency_key(
        &self,
        owner: &str,
        key: &str,
        now: Millis,
    ) -> Result<Option<Job>, StoreError> {
        let reserved = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(keys::idempotency_item(owner, key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        let Some(item) = reserved.item() else {
            return Ok(None);
        };
        let until: i64 = item
            .get("expires_at")
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(i64::MAX);
        if until < now / 1000 {
            return Ok(None);
        }
        match item.get("target_job_id").and_then(|v| v.as_s().ok()) {
            Some(target) => self.get(target).await,
            None => Ok(None),
        }
    }

    async fn forget_idempotency_key(&self, job: &Job) -> Result<(), StoreError> {
        let Some(key) = &job.idempotency_key else {
            return Ok(());
        };
        let deleted = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(keys::idempotency_item(&job.owner, key)))
            // Only while it names this job: the key may already stand for a newer one.
            .condition_expression("target_job_id = :job")
            .expression_attribute_values(":job", s(&job.id))
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn get(&self, job_id: &str) -> Result<Option<Job>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(keys::job_item(job_id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        match out.item() {
            // Idempotency items share the table; they are not jobs.
            Some(item) if item.contains_key("doc") => from_item(item).map(Some),
            _ => Ok(None),
        }
    }

    async fn save(&self, job: &Job, expected_version: u64) -> Result<(), StoreError> {
        if let Some(entry) = job.usage_to_count() {
            return self.save_ending(job, expected_version, entry).await;
        }
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(to_item(job)?))
            .condition_expression("version = :expected")
            .expression_attribute_values(":expected", n(expected_version))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err)
                if err
                    .as_service_error()
                    .map(|e| e.is_conditional_check_failed_exception())
                    .unwrap_or(false) =>
            {
                Err(StoreError::Conflict)
            }
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn usage(&self, owner: &str, days: &[String]) -> Result<Vec<DailyUsage>, StoreError> {
        let mut found: HashMap<String, DailyUsage> = HashMap::new();
        // BatchGetItem takes 100 keys; it may answer with some unprocessed, asked again.
        for chunk in days.chunks(100) {
            let mut keys: Vec<HashMap<String, AttributeValue>> = chunk
                .iter()
                .map(|day| HashMap::from([("pk".to_string(), s(keys::usage_item(owner, day)))]))
                .collect();
            for _ in 0..5 {
                if keys.is_empty() {
                    break;
                }
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(std::mem::take(&mut keys)))
                    .consistent_read(true)
                    .build()
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, request)
                    .send()
                    .await
                    .map_err(unavailable)?;
                for item in out
                    .responses()
                    .and_then(|r| r.get(&self.table))
                    .into_iter()
                    .flatten()
                {
                    let usage = usage_from_item(owner, item)?;
                    found.insert(usage.day.clone(), usage);
                }
                keys = out
                    .unprocessed_keys()
                    .and_then(|u| u.get(&self.table))
                    .map(|k| k.keys().to_vec())
                    .unwrap_or_default();
            }
            if !keys.is_empty() {
                return Err(StoreError::Unavailable(
                    "usage totals still unprocessed after retries".into(),
                ));
            }
        }
        Ok(days.iter().filter_map(|day| found.remove(day)).collect())
    }

    async fn list_by_owner(
        &self,
        owner: &str,
        status: Option<JobState>,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<JobPage, StoreError> {
        let status = status.map(JobState::as_str);
        let start = cursor
            .map(|c| decode_cursor(c, owner, status))
            .transpose()?;
        let (index, attribute, value) = match status {
            None => (OWNER_INDEX, "owner", owner.to_string()),
            Some(status) => (
                OWNER_STATUS_INDEX,
                "owner_status",
                keys::owner_status(owner, status),
            ),
        };
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(index)
            .key_condition_expression("#partition = :value")
            .expression_attribute_names("#partition", attribute)
            .expression_attribute_values(":value", s(value))
            .scan_index_forward(false)
            .limit(limit.clamp(1, 100) as i32)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(unavailable)?;
        let jobs = out
            .items()
            .iter()
            .map(from_item)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(JobPage {
            jobs,
            cursor: out
                .last_evaluated_key()
                .and_then(|key| encode_cursor(key, owner, status)),
        })
    }

    async fn due_for_check(&self, now: Millis, limit: u32) -> Result<DueJobs, StoreError> {
        let per_shard = limit.div_ceil(SWEEP_SHARDS).max(1);
        // The shards are independent partitions: ask them all at once, and let one that fails
        // cost only its own jobs this time.
        let shards = futures::future::join_all(
            (0..SWEEP_SHARDS).map(|shard| self.due_in_shard(shard, now, per_shard)),
        )
        .await;
        let mut due = DueJobs::default();
        let mut last_error = None;
        for (shard, result) in shards.into_iter().enumerate() {
            match result {
                Ok(part) => {
                    due.items_read += part.items_read;
                    due.jobs.extend(part.jobs);
                    due.unreadable.extend(part.unreadable);
                }
                Err(err) => {
                    due.failed_parts
                        .push(format!("{}: {err}", keys::sweep_shard(shard as u32)));
                    last_error = Some(err);
                }
            }
        }
        match last_error {
            Some(err) if due.failed_parts.len() == SWEEP_SHARDS as usize => Err(err),
            _ => Ok(due),
        }
    }
}

impl DynamoJobStore {
    async fn due_in_shard(
        &self,
        shard: u32,
        now: Millis,
        limit: u32,
    ) -> Result<DueJobs, StoreError> {
        let mut due = DueJobs::default();
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(SWEEP_INDEX)
                .key_condition_expression("sweep_shard = :shard AND next_check_at <= :now")
                .expression_attribute_values(":shard", s(keys::sweep_shard(shard)))
                .expression_attribute_values(":now", n(now))
                .limit((limit - due.jobs.len() as u32) as i32)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(unavailable)?;
            due.items_read += out.scanned_count().max(0) as u64;
            for item in out.items() {
                match from_item(item) {
                    Ok(job) => due.jobs.push(job),
                    // One bad record must not stop the sweep for every other job.
                    Err(err) => due.unreadable.push(format!(
                        "{} ({err})",
                        item.get("pk")
                            .and_then(|v| v.as_s().ok())
                            .map_or("?", |v| v)
                    )),
                }
            }
            start = out.last_evaluated_key().cloned();
            if start.is_none() || due.jobs.len() as u32 >= limit {
                return Ok(due);
            }
        }
    }
}

/// The job table's shape, as data: what [`create_table`] creates locally, and what the
/// deployment contract test holds `template.yaml`'s table to.
pub struct TableSchema {
    /// (attribute, `S` or `N`) for every key attribute of the table and its indexes.
    pub attributes: &'static [(&'static str, &'static str)],
    /// The partition key.
    pub key: &'static str,
    /// (index, partition key, sort key); every index projects all attributes.
    pub indexes: &'static [(&'static str, &'static str, &'static str)],
    /// The DynamoDB TTL attribute (epoch seconds).
    pub ttl: &'static str,
}

pub const TABLE: TableSchema = TableSchema {
    attributes: &[
        ("pk", "S"),
        ("owner", "S"),
        ("job_id", "S"),
        ("sweep_shard", "S"),
        ("next_check_at", "N"),
        ("owner_status", "S"),
    ],
    key: "pk",
    indexes: &[
        (OWNER_INDEX, "owner", "job_id"),
        (SWEEP_INDEX, "sweep_shard", "next_check_at"),
        (OWNER_STATUS_INDEX, "owner_status", "job_id"),
    ],
    ttl: "expires_at",
};

/// Creates the job table as [`TABLE`] describes it (the local stack's; in AWS the template
/// creates it). Idempotent.
pub async fn create_table(client: &Client, table: &str) -> Result<(), String> {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType,
        Projection, ProjectionType, ScalarAttributeType, TimeToLiveSpecification,
    };
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .map_err(|e| e.to_string())
    };
    let mut request = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key(TABLE.key, KeyType::Hash)?);
    for (name, kind) in TABLE.attributes {
        request = request.attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(*name)
                .attribute_type(ScalarAttributeType::from(*kind))
                .build()
                .map_err(|e| e.to_string())?,
        );
    }
    for (index, partition, sort) in TABLE.indexes {
        request = request.global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(*index)
                .key_schema(key(partition, KeyType::Hash)?)
                .key_schema(key(sort, KeyType::Range)?)
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::All)
                        .build(),
                )
                .build()
                .map_err(|e| e.to_string())?,
        );
    }
    match request.send().await {
        Ok(_) => {}
        Err(err)
            if err
                .as_service_error()
                .map(|e| e.is_resource_in_use_exception())
                .unwrap_or(false) =>
        {
            return Ok(())
        }
        Err(err) => return Err(format!("{err:?}")),
    }
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name(TABLE.ttl)
                .enabled(true)
                .build()
                .map_err(|e| e.to_string())?,
        )
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(())
}

/// Delivery logs share the table: one item per job, `pk = deliveries#<job>`, the log as JSON
/// in `doc`, written on the same version rule as jobs, and removed by DynamoDB's TTL with the
/// job's record at the latest.
#[async_trait]
impl DeliveryLogs for DynamoJobStore {
    async fn delivery_log(&self, job_id: &str) -> Result<Option<(DeliveryLog, u64)>, StoreError> {
        let Some((doc, version)) = self.doc_item(keys::delivery_log(job_id)).await? else {
            return Ok(None);
        };
        let log = serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Some((log, version)))
    }

    async fn save_delivery_log(&self, log: &DeliveryLog, expected: u64) -> Result<(), StoreError> {
        let doc = serde_json::to_string(log).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let request = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(keys::delivery_log(&log.job_id)))
            .item("doc", s(doc));
        put_versioned(request, expected).await
    }

    async fn forget_delivery_log(&self, job_id: &str) -> Result<(), StoreError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(keys::delivery_log(job_id)))
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

impl DynamoJobStore {
    /// A JSON record of the table's own items and its version (`doc`, `version`).
    async fn doc_item(&self, pk: String) -> Result<Option<(String, u64)>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        let Some(item) = out.item() else {
            return Ok(None);
        };
        let doc = item
            .get("doc")
            .and_then(|v| v.as_s().ok())
            .ok_or_else(|| StoreError::Corrupt("a record without doc".into()))?;
        let version = item
            .get("version")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Ok(Some((doc.clone(), version)))
    }
}

/// Hold-back slots share the table: one item per key, `pk = slots#<key>`, the record as JSON in
/// `doc`, written on the same version rule as jobs.
#[async_trait]
impl gateway::ports::SlotStore for DynamoJobStore {
    async fn slots(
        &self,
        key: &str,
    ) -> Result<Option<(gateway::domain::hold::Slots, u64)>, StoreError> {
        let Some((doc, version)) = self.doc_item(keys::slots_item(key)).await? else {
            return Ok(None);
        };
        let slots = serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Some((slots, version)))
    }

    async fn save_slots(
        &self,
        slots: &gateway::domain::hold::Slots,
        expected: u64,
    ) -> Result<(), StoreError> {
        let doc = serde_json::to_string(slots).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let request = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(keys::slots_item(&slots.key)))
            .item("doc", s(doc));
        put_versioned(request, expected).await
    }
}

/// Rounds of a submit bucket's compare-and-set before a busy owner's submit gives up for now.
const RATE_ROUNDS: usize = 8;
/// A submit bucket's item outlives its last token by this (epoch seconds, DynamoDB's TTL): a
/// quiet owner's bucket is full again by then, the same as no item.
const RATE_ITEM_TTL_SECS: i64 = 86_400;

/// Tenants share the table. `limits#<owner>`: numbers `max_in_flight`, `submits_per_minute`,
/// `submit_burst`, each optional, written by operators (the README shows the command).
/// `rate#<owner>`: the submit bucket's arrival time `tat` (epoch ms), set by compare-and-set
/// so two submits never spend one token.
#[async_trait]
impl gateway::ports::TenantStore for DynamoJobStore {
    async fn overrides(
        &self,
        owner: &str,
    ) -> Result<Option<gateway::domain::tenant::LimitOverrides>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(keys::limits_item(owner)))
            .send()
            .await
            .map_err(unavailable)?;
        let Some(item) = out.item() else {
            return Ok(None);
        };
        let number = |name: &str| -> Result<Option<u32>, StoreError> {
            item.get(name)
                .map(|value| {
                    value
                        .as_n()
                        .ok()
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!("limits: {name} is not a count"))
                        })
                })
                .transpose()
        };
        Ok(Some(gateway::domain::tenant::LimitOverrides {
            max_in_flight: number("max_in_flight")?,
            submits_per_minute: number("submits_per_minute")?,
            submit_burst: number("submit_burst")?,
        }))
    }

    async fn set_overrides(
        &self,
        owner: &str,
        overrides: &gateway::domain::tenant::LimitOverrides,
    ) -> Result<(), StoreError> {
        let mut request = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(keys::limits_item(owner)));
        for (name, value) in [
            ("max_in_flight", overrides.max_in_flight),
            ("submits_per_minute", overrides.submits_per_minute),
            ("submit_burst", overrides.submit_burst),
        ] {
            if let Some(value) = value {
                request = request.item(name, n(value));
            }
        }
        request.send().await.map_err(unavailable)?;
        Ok(())
    }

    async fn spend_submit(
        &self,
        owner: &str,
        rate: &gateway::domain::tenant::Rate,
        now: Millis,
    ) -> Result<Result<(), Millis>, StoreError> {
        use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
        // Two writes, chosen by where the stored time stands, and neither conditional on the
        // exact value read: concurrent submits of one owner then never make each other retry.
        // A full bucket (no time, or one already past) restarts from now; a partly spent one
        // adds an interval to what is stored, as long as that stays within the tolerance.
        // Each refusal of a condition tells the stored time, which picks the next step.
        let mut full = true;
        for _ in 0..RATE_ROUNDS {
            let request = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(keys::rate_item(owner)))
                .expression_attribute_values(":now", n(now))
                .expression_attribute_values(":interval", n(rate.interval_ms))
                .return_values_on_condition_check_failure(
                    aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure::AllOld,
                );
            let request = if full {
                request
                    .update_expression("SET tat = :now + :interval, expires_at = :expires")
                    .condition_expression("attribute_not_exists(tat) OR tat <= :now")
                    .expression_attribute_values(
                        ":expires",
                        n((now + rate.interval_ms) / 1_000 + RATE_ITEM_TTL_SECS),
                    )
            } else {
                request
                    .update_expression("SET tat = tat + :interval, expires_at = :expires")
                    .condition_expression("tat > :now AND tat <= :latest")
                    .expression_attribute_values(":latest", n(now + rate.tolerance_ms))
                    .expression_attribute_values(
                        ":expires",
                        n((now + rate.tolerance_ms + rate.interval_ms) / 1_000
                            + RATE_ITEM_TTL_SECS),
                    )
            };
            let err = match request.send().await {
                Ok(_) => return Ok(Ok(())),
                Err(err) => err,
            };
            let Some(UpdateItemError::ConditionalCheckFailedException(failed)) =
                err.as_service_error()
            else {
                return Err(unavailable(err));
            };
            let stored = failed
                .item()
                .and_then(|item| item.get("tat"))
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse::<Millis>().ok());
            // The same decision the domain makes, on the time now stored.
            if let Err(wait_ms) = rate.admit(stored, now) {
                return Ok(Err(wait_ms));
            }
            full = stored.is_none_or(|tat| tat <= now);
        }
        Err(StoreError::Conflict)
    }
}

/// Batches share the table: `pk = batch#<id>`, the batch as JSON in `doc`, removed by
/// DynamoDB's TTL with its jobs' records.
#[async_trait]
impl gateway::ports::BatchStore for DynamoJobStore {
    async fn create_batch(&self, batch: &gateway::domain::batch::Batch) -> Result<(), StoreError> {
        let doc = serde_json::to_string(batch).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let request = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(keys::batch_item(&batch.id)))
            .item("doc", s(doc))
            .item("expires_at", n(batch.expires_at));
        put_versioned(request, 0).await
    }

    async fn batch(&self, id: &str) -> Result<Option<gateway::domain::batch::Batch>, StoreError> {
        let Some((doc, _)) = self.doc_item(keys::batch_item(id)).await? else {
            return Ok(None);
        };
        serde_json::from_str(&doc)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }
}

/// Writes a record of the table's own items (delivery logs, signing keys) as version
/// `expected + 1`, only if the stored one is still `expected` (0: none stored yet); a lost race
/// is `StoreError::Conflict`.
pub(crate) async fn put_versioned(
    request: aws_sdk_dynamodb::operation::put_item::builders::PutItemFluentBuilder,
    expected: u64,
) -> Result<(), StoreError> {
    let request = request.item("version", n(expected + 1));
    let request = if expected == 0 {
        request.condition_expression("attribute_not_exists(pk)")
    } else {
        request
            .condition_expression("version = :expected")
            .expression_attribute_values(":expected", n(expected))
    };
    match request.send().await {
        Ok(_) => Ok(()),
        Err(err)
            if err
                .as_service_error()
                .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
        {
            Err(StoreError::Conflict)
        }
        Err(err) => Err(unavailable(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Job records as the release before this one wrote them (`tests/fixtures/records`, one
    /// per kind of job in flight or done). A deploy must not leave jobs the new code cannot
    /// read: change the record only in ways these still decode under (new fields with
    /// defaults), or add a format version and keep reading the old one.
    #[test]
    fn records_written_by_the_previous_release_still_decode() {
        let fixtures = [
            (
                "queued",
                include_str!("../../tests/fixtures/records/queued.json"),
            ),
            (
                "dispatch-leased",
                include_str!("../../tests/fixtures/records/dispatch-leased.json"),
            ),
            (
                "submitted",
                include_str!("../../tests/fixtures/records/submitted.json"),
            ),
            (
                "succeeded",
                include_str!("../../tests/fixtures/records/succeeded.json"),
            ),
            (
                "cancelled",
                include_str!("../../tests/fixtures/records/cancelled.json"),
            ),
        ];
        for (name, doc) in fixtures {
            let item = HashMap::from([("doc".to_string(), s(doc))]);
            let job = from_item(&item).unwrap_or_else(|e| panic!("{name}: {e}"));
            let again = from_item(&to_item(&job).unwrap()).unwrap();
            assert_eq!(again, job, "{name} round-trips");
        }
    }

    #[test]
    fn a_cursor_cannot_be_replayed_by_another_owner() {
        let key = HashMap::from([
            ("pk".to_string(), s("job-1")),
            ("owner".to_string(), s("alice")),
        ]);
        let cursor = encode_cursor(&key, "alice", None).unwrap();
        assert!(decode_cursor(&cursor, "alice", None).is_ok());
        assert!(decode_cursor(&cursor, "mallory", None).is_err());
        assert!(decode_cursor("not-base64!", "alice", None).is_err());
    }

    #[test]
    fn a_cursor_goes_on_only_the_status_listing_it_came_from() {
        let key = HashMap::from([("pk".to_string(), s("job-1"))]);
        let cursor = encode_cursor(&key, "alice", Some("running")).unwrap();
        let resumed = decode_cursor(&cursor, "alice", Some("running")).unwrap();
        assert_eq!(resumed["owner_status"], s("alice#running"));
        assert!(decode_cursor(&cursor, "alice", Some("failed")).is_err());
        assert!(decode_cursor(&cursor, "alice", None).is_err());
    }
}
