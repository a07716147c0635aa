//! The public API's use case: what submitting, reading, listing and cancelling jobs need. The
//! routes, identity and response shapes are the HTTP crate's (`gateway_http::api`).
use std::sync::Arc;

use crate::config::Settings;
use crate::domain::workflow::WorkflowCatalog;
use crate::ports::{Clock, JobQueue, JobStore, ObjectStore, RunPod};

pub struct Api {
    pub store: Arc<dyn JobStore>,
    pub queue: Arc<dyn JobQueue>,
    pub uploads: Arc<dyn ObjectStore>,
    pub results: Arc<dyn ObjectStore>,
    pub runpod: Arc<dyn RunPod>,
    pub catalog: Arc<WorkflowCatalog>,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
}
