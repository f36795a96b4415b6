//! A small Confluent Schema Registry for tests: the REST endpoints a serializer and deserializer
//! use, with ids assigned like the real one (one global id per distinct schema text), optional
//! basic auth, and a switch that makes it answer 503 as a registry in trouble does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Default)]
pub struct RegistryState {
    /// id → schema text, ids from 1.
    pub schemas: Mutex<Vec<String>>,
    /// subject → ids, one per version.
    pub subjects: Mutex<HashMap<String, Vec<u32>>>,
    /// Every request as (method, path, content type).
    pub requests: Mutex<Vec<(String, String, Option<String>)>>,
    pub failing: AtomicBool,
    pub calls: AtomicUsize,
    /// `Basic <base64>` the registry insists on, when set.
    pub authorization: Mutex<Option<String>>,
}

pub struct FakeRegistry {
    pub url: String,
    pub state: Arc<RegistryState>,
    _server: std::thread::JoinHandle<()>,
}

fn error(status: StatusCode, code: u32, message: &str) -> Response {
    let body = json!({"error_code": code, "message": message});
    (status, [(header::CONTENT_TYPE, "application/vnd.schemaregistry.v1+json")], Json(body)).into_response()
}

fn ok(body: Value) -> Response {
    ([(header::CONTENT_TYPE, "application/vnd.schemaregistry.v1+json")], Json(body)).into_response()
}

fn gate(state: &RegistryState, headers: &HeaderMap, method: &str, path: String) -> Option<Response> {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    state.requests.lock().unwrap().push((method.to_owned(), path, content_type));
    if state.failing.load(Ordering::SeqCst) {
        return Some(error(StatusCode::SERVICE_UNAVAILABLE, 50003, "store unavailable"));
    }
    let required = state.authorization.lock().unwrap().clone();
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match required {
        Some(required) if given != Some(required.as_str()) => {
            Some(error(StatusCode::UNAUTHORIZED, 40101, "Unauthorized"))
        }
        _ => None,
    }
}

async fn register(
    State(state): State<Arc<RegistryState>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(refused) = gate(&state, &headers, "POST", format!("/subjects/{subject}/versions")) {
        return refused;
    }
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Invalid schema");
    };
    let Some(text) = body["schema"].as_str() else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Invalid schema");
    };
    if apache_avro::Schema::parse_str(text).is_err() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Invalid schema");
    }
    let id = {
        let mut schemas = state.schemas.lock().unwrap();
        match schemas.iter().position(|s| s == text) {
            Some(at) => at as u32 + 1,
            None => {
                schemas.push(text.to_owned());
                schemas.len() as u32
            }
        }
    };
    let mut subjects = state.subjects.lock().unwrap();
    let versions = subjects.entry(subject).or_default();
    if !versions.contains(&id) {
        versions.push(id);
    }
    ok(json!({"id": id}))
}

async fn by_id(State(state): State<Arc<RegistryState>>, Path(id): Path<u32>, headers: HeaderMap) -> Response {
    if let Some(refused) = gate(&state, &headers, "GET", format!("/schemas/ids/{id}")) {
        return refused;
    }
    let schemas = state.schemas.lock().unwrap();
    match schemas.get((id as usize).wrapping_sub(1)) {
        Some(text) => ok(json!({"schema": text})),
        None => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
    }
}

impl FakeRegistry {
    /// Serves on a free port from a thread of its own, so blocking clients can call it from
    /// anywhere.
    pub fn start() -> FakeRegistry {
        let state = Arc::new(RegistryState::default());
        let app = axum::Router::new()
            .route("/subjects/{subject}/versions", post(register))
            .route("/schemas/ids/{id}", get(by_id))
            .with_state(state.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        FakeRegistry { url: format!("http://{addr}"), state, _server: server }
    }

    pub fn schema_text(&self, id: u32) -> String {
        self.state.schemas.lock().unwrap()[id as usize - 1].clone()
    }
}
