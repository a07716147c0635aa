//! Test controls for a separate process: the fault switches over HTTP, outside the token check
//! and the slow-answers fault so that a test can always turn them off.
//!
//! - `GET /__admin/faults`: the faults in force;
//! - `PUT /__admin/faults`: replaces them (missing fields: off);
//! - `POST /__admin/faults`: changes only the fields given;
//! - `POST /__admin/restart`: a server restart (queue and history lost).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::{App, Faults, FaultsPatch};

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/__admin/faults",
            get(faults).put(replace_faults).post(patch_faults),
        )
        .route("/__admin/restart", post(restart))
        .with_state(app)
}

async fn faults(State(app): State<Arc<App>>) -> Json<Faults> {
    Json(app.faults())
}

async fn replace_faults(State(app): State<Arc<App>>, Json(new): Json<Faults>) -> Json<Faults> {
    app.update_faults(|f| *f = new);
    Json(app.faults())
}

async fn patch_faults(State(app): State<Arc<App>>, Json(patch): Json<FaultsPatch>) -> Json<Faults> {
    app.update_faults(|f| f.apply(patch));
    Json(app.faults())
}

async fn restart(State(app): State<Arc<App>>) -> StatusCode {
    app.restart();
    StatusCode::NO_CONTENT
}
