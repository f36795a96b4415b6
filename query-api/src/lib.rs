//! # callisto-query-api — reads
//!
//! Serves persons, their timelines and full-text search from the read models, through the
//! `ReadStore` and `SearchIndex` ports, so the same code reads embedded stores or MongoDB and
//! Elasticsearch.
//!
//! ## Layout
//! - [`params`]: query-parameter parsing; every bad value is a 400 naming the parameter.
//! - [`consistency`]: waiting, within a bound, until projections pass a consistency token.
//! - [`api`]: the handlers.
//! - [`openapi`]: the generated OpenAPI document.

pub mod api;
pub mod consistency;
pub mod openapi;
pub mod params;

use std::sync::Arc;
use std::time::Duration;

use callisto_core::auth::Auth;
use callisto_core::config::HttpSettings;
use callisto_core::http::{ReadinessCheck, service_router};
use callisto_core::readmodel::{ReadStore, SearchIndex};

/// Everything the handlers read from; cheap to clone.
#[derive(Clone)]
pub struct QueryState {
    pub store: Arc<dyn ReadStore>,
    pub search: Arc<dyn SearchIndex>,
    /// Partitions of the topic, to reject tokens naming a partition that does not exist.
    pub partitions: u32,
    pub consistency_wait: Duration,
}

/// The query routes alone, for composing with other services (as `callisto dev` does).
pub fn routes(state: QueryState, auth: &Arc<Auth>) -> axum::Router {
    api::routes(state, auth)
}

/// The complete query service: routes plus health, readiness, metrics and OpenAPI, every route
/// but health behind `auth`.
pub fn build(state: QueryState, http: &HttpSettings, auth: &Arc<Auth>) -> axum::Router {
    let store = state.store.clone();
    let readiness: ReadinessCheck = Arc::new(move || {
        let store = store.clone();
        Box::pin(async move { store.checkpoints().await.map(|_| ()).map_err(|e| e.to_string()) })
    });
    let document = openapi::document(state.partitions);
    service_router(routes(state, auth), document, readiness, http, auth)
}
