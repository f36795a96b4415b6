//! # callisto-writers — the command API
//!
//! Takes person commands over HTTP, validates them, and appends each as one Avro event to the
//! person topic, keyed by person id. A command is answered `202 Accepted` only once its event
//! is durable in the log, with a consistency token naming where it landed.
//!
//! ## Layout
//! - [`commands`]: request bodies, their limits and validation.
//! - [`api`]: the handlers, idempotency keys, and the guarded (timeout + circuit breaker) append.
//! - [`openapi`]: the OpenAPI document generated from the handlers and types.
//!
//! [`build`] assembles the whole service; tests and the `callisto writer` binary both use it.

pub mod api;
pub mod commands;
pub mod openapi;

use std::sync::Arc;
use std::time::Duration;

use callisto_avro::Codec;
use callisto_core::auth::Auth;
use callisto_core::config::{Role, Settings};
use callisto_core::http::{ReadinessCheck, service_router};
use callisto_core::log::EventLog;
use callisto_core::log::idempotency::{ClaimStore, IdempotencyOptions, IdempotentLog};
use callisto_core::privacy::Keyring;

pub use api::WriterState;

/// The writer's state for `settings`, over an already-open log and codec. Creates the topic
/// with the configured partition count, or checks the count of an existing one.
///
/// `claims` is where idempotency keys are claimed when the log cannot keep them itself (Kafka);
/// the writer's appends then go through [`IdempotentLog`].
pub async fn state(
    settings: &Settings,
    log: Arc<dyn EventLog>,
    codec: Arc<Codec>,
    keyring: Arc<Keyring>,
    claims: Option<Arc<dyn ClaimStore>>,
) -> anyhow::Result<WriterState> {
    log.ensure_topic(&settings.log.topic, settings.log.partitions).await?;
    let append_timeout = Duration::from_millis(settings.log.append_timeout_ms);
    let log: Arc<dyn EventLog> = match claims {
        Some(store) => {
            let kafka = &settings.kafka;
            let options = IdempotencyOptions {
                retention: Duration::from_secs(settings.log.idempotency_retention_secs),
                // Past the producer's delivery timeout an append can no longer land.
                settle: Duration::from_millis(kafka.message_timeout_ms + kafka.request_timeout_ms),
                wait: append_timeout / 2,
                timeout: Duration::from_millis(kafka.request_timeout_ms),
            };
            IdempotentLog::new(log, store, options)
        }
        None => log,
    };
    let standby = (settings.server.role == Role::Standby)
        .then(|| api::Standby { primary_url: settings.server.primary_url.clone() });
    if let Some(standby) = &standby {
        tracing::warn!(primary = ?standby.primary_url, "standby site: commands are refused until this site is promoted");
    }
    Ok(WriterState::new(log, codec, keyring, settings.log.topic.clone(), append_timeout, standby))
}

/// The complete writer service: command routes plus health, readiness, metrics and OpenAPI,
/// every route but health behind `auth`.
pub fn build(settings: &Settings, state: WriterState, auth: &Arc<Auth>) -> axum::Router {
    let log = state.log().clone();
    let readiness: ReadinessCheck = Arc::new(move || {
        let log = log.clone();
        Box::pin(async move { log.health().await.map_err(|e| e.to_string()) })
    });
    service_router(api::routes(state, auth), openapi::document(), readiness, &settings.http, auth)
}
