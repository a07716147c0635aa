//! Jobs as the API creates them.
use gateway::domain::job::{InputRef, Job, JobTiming, Millis, NewJob};
use gateway::domain::workflow::WorkflowCatalog;
use rand::SeedableRng;

/// A `restore` job at 0.02 megapixels whose JPEG input (`input_size` bytes) is at `input_key`,
/// accepted at `now`: what `POST /jobs` stores.
pub fn restore_job(
    catalog: &WorkflowCatalog,
    id: &str,
    owner: &str,
    input_key: &str,
    input_size: u64,
    timing: JobTiming,
    now: Millis,
) -> Job {
    let restore = catalog.get("restore").expect("the restore workflow");
    let params = restore
        .validate(
            serde_json::json!({"megapixels": 0.02})
                .as_object()
                .expect("an object"),
            &mut rand::rngs::StdRng::seed_from_u64(now as u64),
        )
        .expect("valid parameters");
    Job::new(
        NewJob {
            id: id.into(),
            owner: owner.into(),
            workflow: "restore".into(),
            workflow_version: restore.version().into(),
            params,
            input: InputRef {
                key: input_key.into(),
                content_type: "image/jpeg".into(),
                size: input_size,
                extension: "jpg".into(),
                source_url: None,
            },
            idempotency_key: None,
            request_digest: None,
            callback_url: None,
            callback_events: Vec::new(),
            backend: Default::default(),
            priority: Default::default(),
        },
        timing,
        now,
    )
}

/// `POST /jobs` of a `restore` job with `image` inline, and nothing else.
pub fn inline_request(image: &[u8]) -> gateway::app::api::JobRequest {
    use base64::Engine as _;
    gateway::app::api::JobRequest {
        workflow: "restore".into(),
        params: None,
        input: gateway::app::api::JobInput {
            image_base64: Some(base64::engine::general_purpose::STANDARD.encode(image)),
            upload_id: None,
            url: None,
        },
        retention_secs: None,
        callback_url: None,
        callback_events: None,
        backend: None,
        priority: None,
    }
}
