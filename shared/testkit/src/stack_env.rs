//! The environment the Lambda functions read (README, Configuration), pointed at a local stack:
//! one builder for the tests' stacks and the benchmark's. Every credential is a local fake.
use runpod_emulator::Emulator;

/// A local stack's folder on the emulator's volume.
pub const LOCAL_VOLUME_ROOT: &str = "gateway/local";

/// The AWS resources one stack uses.
#[derive(Clone, Debug)]
pub struct Resources {
    pub table: String,
    pub queue_url: String,
    pub stop_queue_url: String,
    pub finalize_queue_url: String,
    pub callback_queue_url: String,
    pub poll_queue_url: String,
    /// The KMS key (an alias) the owners' signing secrets are encrypted with; the local runner
    /// makes it when it is missing.
    pub callback_key: String,
    pub uploads: String,
    pub results: String,
}

/// The gateway's variables for `resources` and `emulator`: webhooks to `webhook_base`, signed
/// with `webhook_secret`, bearer tokens as `dev_tokens` (`token=owner,…`).
pub fn gateway_env(
    resources: &Resources,
    emulator: &Emulator,
    webhook_base: &str,
    webhook_secret: &str,
    dev_tokens: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("JOBS_TABLE", resources.table.clone()),
        ("JOBS_QUEUE_URL", resources.queue_url.clone()),
        ("STOP_QUEUE_URL", resources.stop_queue_url.clone()),
        ("FINALIZE_QUEUE_URL", resources.finalize_queue_url.clone()),
        ("CALLBACK_QUEUE_URL", resources.callback_queue_url.clone()),
        ("POLL_QUEUE_URL", resources.poll_queue_url.clone()),
        ("CALLBACK_KEY_ID", resources.callback_key.clone()),
        ("UPLOADS_BUCKET", resources.uploads.clone()),
        ("RESULTS_BUCKET", resources.results.clone()),
        ("S3_FORCE_PATH_STYLE", "true".into()),
        ("RUNPOD_API_BASE", emulator.api_url.clone()),
        ("RUNPOD_ENDPOINT_ID", emulator.endpoint_id.clone()),
        ("RUNPOD_API_KEY", emulator.api_key.clone()),
        ("VOLUME_ID", emulator.volume_id.clone()),
        ("VOLUME_DATACENTER", "EU-RO-1".into()),
        ("VOLUME_ROOT", LOCAL_VOLUME_ROOT.into()),
        ("VOLUME_S3_ENDPOINT", emulator.s3_url.clone()),
        ("VOLUME_ACCESS_KEY_ID", emulator.volume_access_key.clone()),
        (
            "VOLUME_SECRET_ACCESS_KEY",
            emulator.volume_secret_key.clone(),
        ),
        ("WEBHOOK_BASE_URL", webhook_base.to_string()),
        ("WEBHOOK_SECRET", webhook_secret.to_string()),
        ("GATEWAY_DEV_TOKENS", dev_tokens.to_string()),
        // Every job is held by its owner's key and every submit spends a token, so each test
        // and the benchmark go through both; the limits are far above what either reaches. The
        // tests of the limits set lower ones per owner, in the table.
        ("TENANT_MAX_IN_FLIGHT", "1000".into()),
        ("TENANT_SUBMITS_PER_MINUTE", "1000000".into()),
        ("TENANT_SUBMIT_BURST", "100000".into()),
    ]
}
