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
            },
            idempotency_key: None,
            request_digest: None,
            callback_url: None,
        },
        timing,
        now,
    )
}
