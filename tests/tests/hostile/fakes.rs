//! The routers over the test kit's in-memory ports, so thousands of hostile requests run in
//! seconds: the job store keeps DynamoDB's conditional-write rule, the object stores record
//! every key touched, RunPod answers `/status` with one fixed report.
use std::sync::Arc;

use gateway::domain::job::Millis;
use gateway::ports::RunPodStatus;
use gateway_http::api::identity::IdentitySource;
use gateway_http::api::ApiState;
pub use testkit::fakes::MemObjects;
use testkit::Kit;

pub const TOKEN: &str = "alice-token";
pub const NOW: Millis = testkit::START;

/// Everything the API and webhook routers need, in memory: the kit's ports (`world.store`,
/// `world.volume`, …) behind the two routers.
pub struct World(Kit);

impl std::ops::Deref for World {
    type Target = Kit;
    fn deref(&self) -> &Kit {
        &self.0
    }
}

impl World {
    /// A world whose volume and uploads hold these objects and whose RunPod reports
    /// `runpod_status` for the job it names.
    pub fn new(volume: MemObjects, uploads: MemObjects, runpod_status: RunPodStatus) -> Self {
        let mut kit = Kit::new();
        kit.volume = Arc::new(volume);
        kit.uploads = Arc::new(uploads);
        if let Some(id) = runpod_status.id.clone() {
            kit.runpod.set_status(&id, runpod_status);
        }
        Self(kit)
    }

    pub fn api(&self) -> axum::Router {
        let identity = IdentitySource::parse_dev_tokens(&format!("{TOKEN}=alice")).unwrap();
        // The real image probe: what a hostile body claims to be is the point of these tests.
        let mut api = self.0.api();
        api.images = Arc::new(gateway_aws::adapters::images::ImageHeaders);
        gateway_http::api::router(Arc::new(ApiState::new(api, self.0.callbacks(), identity)))
    }

    pub fn webhook(&self) -> axum::Router {
        gateway_http::webhook::router(Arc::new(self.0.webhook()))
    }
}
