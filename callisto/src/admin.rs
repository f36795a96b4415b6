//! Batch commands on an embedded data dir work two ways. The embedded stores belong to one
//! process, so when a `callisto dev` owns the data dir (it advertises its address in
//! `admin.json` there), a command goes through that process's admin API; otherwise it opens
//! the data dir directly.
//!
//! The admin API lives on the dev server's own listener under `/admin/v1/`:
//! - `POST /admin/v1/replay` `{from?}` starts a rebuild into a new generation (202);
//! - `GET /admin/v1/replay` reports the generations and the rebuild's progress;
//! - `POST /admin/v1/replay/rollback` and `POST /admin/v1/replay/drop-old`;
//! - `GET /admin/v1/export?format=&partitions=&from=&to=` streams what `callisto export`
//!   writes;
//! - `GET /admin/v1/dlq`, `GET /admin/v1/dlq/{id}`, `POST /admin/v1/dlq/replay` `{ids?}` and
//!   `POST /admin/v1/dlq/purge` for `callisto dlq`.
//!
//! Every admin route needs the `admin` scope and writes an audit line; the batch commands
//! present `--api-key` (or `CALLISTO_API_KEY`), else the dev key in the data dir.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use callisto_core::config::Settings;
use callisto_core::http::{ApiJsonOrEmpty, Problem, Router};
use callisto_core::log::EventLog;
use callisto_core::privacy::EventReader;
use callisto_core::readmodel::Projection;
use callisto_core::readmodel::switch::{SwitchedReadStore, SwitchedSearchIndex};
use callisto_core::replay::Position;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::replay::{
    Action, GenerationRuntime, Progress, Summary, catch_up, progress_bar, run_direct, start_offsets, summary,
};
use callisto_core::readmodel::generations::{GenerationPointer, Generations};

const ADDR_FILE: &str = "admin.json";

#[derive(Serialize, Deserialize)]
struct Advertised {
    addr: String,
    #[serde(default)]
    tls: bool,
}

/// Records that the dev server at `addr` owns `data_dir`.
pub fn advertise(data_dir: &Path, addr: std::net::SocketAddr, tls: bool) -> std::io::Result<()> {
    let body = serde_json::to_vec(&Advertised { addr: addr.to_string(), tls }).map_err(std::io::Error::other)?;
    std::fs::write(data_dir.join(ADDR_FILE), body)
}

pub fn withdraw(data_dir: &Path) {
    let _ = std::fs::remove_file(data_dir.join(ADDR_FILE));
}

/// A client of a running dev server's admin API, carrying the caller's API key.
struct AdminClient {
    base: String,
    client: reqwest::Client,
}

/// A client builder that trusts the dev server's own certificate when it serves HTTPS.
fn client_builder(settings: &Settings) -> anyhow::Result<reqwest::ClientBuilder> {
    let mut builder = reqwest::Client::builder();
    if let Some(cert) = &settings.http.tls.cert_file {
        let pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)? {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

/// The live dev server that owns the data dir, if one answers, with a client that
/// authenticates as `api_key` (else the dev key).
async fn running_dev(settings: &Settings, api_key: Option<&str>) -> anyhow::Result<Option<AdminClient>> {
    let data_dir = &settings.storage.data_dir;
    let Some(advertised) = std::fs::read(data_dir.join(ADDR_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Advertised>(&bytes).ok())
    else {
        return Ok(None);
    };
    let base = format!("{}://{}", if advertised.tls { "https" } else { "http" }, advertised.addr);
    let probe = client_builder(settings)?.timeout(Duration::from_secs(2)).build()?;
    let alive = probe.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success());
    if !alive {
        return Ok(None);
    }
    let key = crate::keys::batch_key(settings, api_key).with_context(|| {
        format!("a callisto dev owns {}; pass --api-key or set CALLISTO_API_KEY", data_dir.display())
    })?;
    let mut value = reqwest::header::HeaderValue::from_str(&format!("ApiKey {key}"))
        .map_err(|_| anyhow::anyhow!("the API key holds characters a header cannot carry"))?;
    value.set_sensitive(true);
    let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, value)]);
    let client = client_builder(settings)?.default_headers(headers).build()?;
    Ok(Some(AdminClient { base, client }))
}

/// `callisto replay`, through the running dev server when there is one.
pub async fn replay(
    settings: &Settings,
    action: Action,
    show_progress: bool,
    api_key: Option<&str>,
) -> anyhow::Result<Summary> {
    match running_dev(settings, api_key).await? {
        Some(admin) => replay_via(&admin, action, show_progress).await,
        None => run_direct(settings, action, show_progress).await,
    }
}

async fn replay_via(admin: &AdminClient, action: Action, show_progress: bool) -> anyhow::Result<Summary> {
    let (client, base) = (&admin.client, &admin.base);
    let check = |response: reqwest::Response| async move {
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        anyhow::ensure!(status.is_success(), "{}", body["detail"].as_str().unwrap_or("the dev server refused"));
        Ok(body)
    };
    let path = match action {
        Action::Rollback => "/admin/v1/replay/rollback",
        Action::DropOld => "/admin/v1/replay/drop-old",
        Action::Rebuild { .. } => "/admin/v1/replay",
    };
    let body = match action {
        Action::Rebuild { from: Some(Position::Offset(o)) } => serde_json::json!({"from": o.to_string()}),
        Action::Rebuild { from: Some(Position::Timestamp(t)) } => serde_json::json!({"from": t.to_rfc3339()}),
        _ => serde_json::json!({}),
    };
    let started = Instant::now();
    let answer = check(client.post(format!("{base}{path}")).json(&body).send().await?).await?;
    let Action::Rebuild { .. } = action else {
        return Ok(serde_json::from_value(answer["summary"].clone())?);
    };
    let bar = progress_bar(show_progress);
    loop {
        let status = check(client.get(format!("{base}/admin/v1/replay")).send().await?).await?;
        let job = &status["job"];
        if let Some(p) = job.get("progress").filter(|p| !p.is_null()) {
            bar.set_length(p["total"].as_u64().unwrap_or(0));
            bar.set_position(p["done"].as_u64().unwrap_or(0));
            bar.set_message(format!("lag {}", p["lag"]));
        }
        match job["state"].as_str() {
            Some("switched") => {
                bar.finish_and_clear();
                let events = job["progress"]["done"].as_u64();
                let seconds = started.elapsed().as_secs_f64();
                return Ok(Summary {
                    action: "rebuild".into(),
                    live: status["generations"]["live"].as_u64().unwrap_or(0) as u32,
                    previous: status["generations"]["previous"].as_u64().map(|p| p as u32),
                    events,
                    seconds: Some(seconds),
                    events_per_second: events.map(|e| e as f64 / seconds.max(0.001)),
                });
            }
            Some("failed") => anyhow::bail!("the rebuild failed: {}", job["error"].as_str().unwrap_or("unknown")),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// `callisto export`, streamed from the running dev server when there is one.
pub async fn export(
    settings: &Settings,
    selection: &crate::export::Selection,
    output: Option<std::path::PathBuf>,
    progress: bool,
    api_key: Option<&str>,
) -> anyhow::Result<crate::export::ExportSummary> {
    use std::io::Write;
    let Some(AdminClient { base, client }) = running_dev(settings, api_key).await? else {
        return crate::export::run_direct(settings, selection, output, progress).await;
    };
    let mut query: Vec<(&str, String)> = vec![
        ("format", serde_json::to_value(selection.format)?.as_str().unwrap_or("jsonl").to_owned()),
        ("personal_data", serde_json::to_value(selection.personal_data)?.as_str().unwrap_or("clear").to_owned()),
    ];
    if let Some(partitions) = &selection.partitions {
        query.push(("partitions", partitions.iter().map(u32::to_string).collect::<Vec<_>>().join(",")));
    }
    for (name, position) in [("from", selection.from), ("to", selection.to)] {
        match position {
            Some(Position::Offset(o)) => query.push((name, o.to_string())),
            Some(Position::Timestamp(t)) => query.push((name, t.to_rfc3339())),
            None => {}
        }
    }
    let mut response = client.get(format!("{base}/admin/v1/export")).query(&query).send().await?;
    if !response.status().is_success() {
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        anyhow::bail!("{}", body["detail"].as_str().unwrap_or("the dev server refused"));
    }
    let mut sink: Box<dyn Write> = match &output {
        Some(path) => Box::new(std::fs::File::create(path)?),
        None => Box::new(std::io::stdout().lock()),
    };
    let (mut bytes, mut lines) = (0u64, 0u64);
    while let Some(chunk) = response.chunk().await.context("the export stream broke off")? {
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        sink.write_all(&chunk)?;
    }
    sink.flush()?;
    let records = if selection.format == crate::export::Format::Jsonl { lines } else { 0 };
    Ok(crate::export::ExportSummary {
        topic: settings.log.topic.clone(),
        format: selection.format,
        records,
        undecodable: 0,
        bytes,
    })
}

/// `callisto privacy compact`: through the running dev server when there is one; else on the
/// configured MongoDB and Elasticsearch read models, or the stopped data dir's kept generations;
/// then the key store.
pub async fn compact(settings: &Settings, api_key: Option<&str>) -> anyhow::Result<Compacted> {
    if let Some(AdminClient { base, client }) = running_dev(settings, api_key).await? {
        let response = client.post(format!("{base}/admin/v1/compact")).send().await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "{}", body["detail"].as_str().unwrap_or("the dev server refused"));
        return Ok(serde_json::from_value(body)?);
    }
    // Servers purge on their own schedule; this asks them to now where they can (Elasticsearch
    // expunges deleted documents).
    let generations = crate::backends::generation_pointer(settings).await?.load().await?;
    let mut compacted = Vec::new();
    for generation in [Some(generations.live), generations.previous].into_iter().flatten() {
        let side =
            crate::backends::open_generation(settings, generation, crate::backends::ReadModelUse::Projecting).await?;
        side.store.compact().await?;
        side.search.compact().await?;
        compacted.push(generation);
    }
    crate::backends::open_keyring(settings).await?.compact().await?;
    Ok(Compacted { generations: compacted, key_store: true })
}

/// Runs `compact` after erasures, every `period`: at the first tick that finds an erasure the
/// projections applied a tick ago or more, so plaintext of an erased person leaves the embedded
/// files within two periods. Ends with `shutdown`.
pub async fn compact_after_erasures<F, Fut>(period: Duration, shutdown: tokio_util::sync::CancellationToken, compact: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut compacted = callisto_core::readmodel::erasures_applied();
    let mut due: Option<u64> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(count) = due.take() {
            match compact().await {
                Ok(()) => compacted = count,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "scheduled compaction failed; retrying next period")
                }
            }
        }
        let now = callisto_core::readmodel::erasures_applied();
        if now != compacted {
            due = Some(now);
        }
    }
}

/// A `callisto dlq` request.
#[derive(Debug, Clone)]
pub enum DlqCommand {
    List,
    Show(String),
    Replay(Option<Vec<String>>),
    Purge,
}

/// `callisto dlq`, through the running dev server when there is one; the answer as JSON.
pub async fn dlq(settings: &Settings, command: DlqCommand, api_key: Option<&str>) -> anyhow::Result<serde_json::Value> {
    let dlq_topic = callisto_projectors::dlq::topic_for(&settings.log.topic);
    if let Some(AdminClient { base, client }) = running_dev(settings, api_key).await? {
        let request = match &command {
            DlqCommand::List => client.get(format!("{base}/admin/v1/dlq")),
            DlqCommand::Show(id) => client.get(format!("{base}/admin/v1/dlq/{id}")),
            DlqCommand::Replay(ids) => {
                client.post(format!("{base}/admin/v1/dlq/replay")).json(&serde_json::json!({"ids": ids}))
            }
            DlqCommand::Purge => client.post(format!("{base}/admin/v1/dlq/purge")),
        };
        let response = request.send().await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "{}", body["detail"].as_str().unwrap_or("the dev server refused"));
        return Ok(body);
    }
    let side = crate::backends::open_log(settings).await?;
    let reader = side.reader();
    let (log, reader) = (side.log.as_ref(), reader.as_ref());
    Ok(match command {
        DlqCommand::List => serde_json::to_value(crate::dlq::list(log, &dlq_topic).await?)?,
        DlqCommand::Show(id) => {
            serde_json::to_value(crate::dlq::show(log, reader, &dlq_topic, &id).await.map_err(anyhow::Error::msg)?)?
        }
        DlqCommand::Replay(ids) => {
            let read =
                crate::backends::open_configured_read_models(settings, crate::backends::ReadModelUse::Projecting)
                    .await?;
            let projections: HashMap<&'static str, Arc<dyn Projection>> = HashMap::from([
                ("documents", read.store as Arc<dyn Projection>),
                ("search", read.search as Arc<dyn Projection>),
            ]);
            let report = crate::dlq::redrive(log, reader, &dlq_topic, &projections, ids.as_deref())
                .await
                .map_err(anyhow::Error::msg)?;
            serde_json::to_value(report)?
        }
        DlqCommand::Purge => serde_json::to_value(crate::dlq::purge(log, &dlq_topic).await?)?,
    })
}

/// A rebuild running inside the dev server.
#[derive(Debug, Clone, Serialize)]
struct Job {
    generation: u32,
    /// `building`, `switched` or `failed`.
    state: &'static str,
    progress: Option<Progress>,
    error: Option<String>,
}

struct DevState {
    gens: Generations,
    runtimes: HashMap<u32, GenerationRuntime>,
    job: Option<Job>,
}

/// The dev server's generations: each kept generation's runtime, and the readers' switches.
pub struct DevGenerations {
    settings: Settings,
    /// Where the generations are recorded (the data dir's file, or the servers').
    pointer: Arc<dyn GenerationPointer>,
    log: Arc<dyn EventLog>,
    reader: Arc<EventReader>,
    pub store: Arc<SwitchedReadStore>,
    pub search: Arc<SwitchedSearchIndex>,
    state: Mutex<DevState>,
    /// The running rebuild's latest progress, updated from its catch-up loop.
    latest: Arc<std::sync::Mutex<Option<Progress>>>,
}

impl DevGenerations {
    /// Starts the live generation (and the previous one, kept current for an instant rollback).
    pub async fn open(
        settings: &Settings,
        log: Arc<dyn EventLog>,
        reader: Arc<EventReader>,
    ) -> anyhow::Result<Arc<Self>> {
        let pointer = crate::backends::generation_pointer(settings).await?;
        let gens = pointer.load().await.context("reading the generations")?;
        let mut runtimes = HashMap::new();
        for generation in [Some(gens.live), gens.previous].into_iter().flatten() {
            let runtime = GenerationRuntime::start(settings, log.clone(), reader.clone(), generation, None).await?;
            runtimes.insert(generation, runtime);
        }
        let live = &runtimes[&gens.live];
        let store = Arc::new(SwitchedReadStore::new(live.store.clone()));
        let search = Arc::new(SwitchedSearchIndex::new(live.search.clone()));
        let state = Mutex::new(DevState { gens, runtimes, job: None });
        let latest = Arc::new(std::sync::Mutex::new(None));
        Ok(Arc::new(Self { settings: settings.clone(), pointer, log, reader, store, search, state, latest }))
    }

    pub async fn stop(&self) {
        let runtimes: Vec<_> = self.state.lock().await.runtimes.drain().map(|(_, r)| r).collect();
        for runtime in runtimes {
            runtime.stop().await;
        }
    }

    /// Compacts every kept generation's read models, then the key store.
    pub async fn compact(&self) -> anyhow::Result<Compacted> {
        let state = self.state.lock().await;
        let mut generations = Vec::new();
        for (generation, runtime) in &state.runtimes {
            runtime.store.compact().await.with_context(|| format!("compacting generation {generation}'s documents"))?;
            runtime
                .search
                .compact()
                .await
                .with_context(|| format!("compacting generation {generation}'s search index"))?;
            generations.push(*generation);
        }
        drop(state);
        self.reader.keyring.compact().await.context("compacting the key store")?;
        generations.sort_unstable();
        tracing::info!(?generations, "compacted read models and key store");
        Ok(Compacted { generations, key_store: true })
    }

    fn point_readers_at(&self, runtime: &GenerationRuntime) {
        self.store.switch_to(runtime.store.clone());
        self.search.switch_to(runtime.search.clone());
    }

    async fn start_rebuild(self: &Arc<Self>, from: Option<Position>) -> Result<u32, Problem> {
        let conflict =
            |detail: String| Problem::new(StatusCode::CONFLICT, "replay-conflict", "Replay conflict", detail);
        let generation = {
            let mut state = self.state.lock().await;
            if state.job.as_ref().is_some_and(|j| j.state == "building") {
                return Err(conflict("a rebuild is already running".into()));
            }
            if let Some(previous) = state.gens.previous {
                return Err(conflict(format!(
                    "generation {previous} is kept for rollback; run `callisto replay --drop-old` first"
                )));
            }
            let generation = match state.gens.building {
                Some(resumed) => resumed,
                None => {
                    let next = state.gens.next();
                    crate::backends::remove_generation(&self.settings, next).await.map_err(internal)?;
                    let mut gens = state.gens.clone();
                    gens.building = Some(next);
                    self.pointer.save(&gens).await.map_err(unavailable)?;
                    state.gens = gens;
                    next
                }
            };
            state.job = Some(Job { generation, state: "building", progress: None, error: None });
            generation
        };
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.rebuild(generation, from).await {
                tracing::error!(error = %e, generation, "rebuild failed");
                if let Some(job) = this.state.lock().await.job.as_mut() {
                    job.state = "failed";
                    job.error = Some(format!("{e:#}"));
                }
            }
        });
        Ok(generation)
    }

    async fn rebuild(self: &Arc<Self>, generation: u32, from: Option<Position>) -> anyhow::Result<()> {
        let topic = self.settings.log.topic.clone();
        let starts = start_offsets(self.log.as_ref(), &topic, from).await?;
        let runtime =
            GenerationRuntime::start(&self.settings, self.log.clone(), self.reader.clone(), generation, starts.clone())
                .await?;
        let latest = self.latest.clone();
        let reference = {
            let state = self.state.lock().await;
            state.runtimes[&state.gens.live].as_reference()
        };
        // While writes continue the head keeps moving; "caught up" is level with the live
        // generation, which its own projector keeps current.
        let done = catch_up(self.log.as_ref(), &topic, &runtime, Some(&reference), &starts, |p| {
            *latest.lock().expect("progress lock poisoned") = Some(p.clone());
        })
        .await?;
        let mut state = self.state.lock().await;
        let gens = Generations { live: generation, previous: Some(state.gens.live), building: None };
        self.pointer.save(&gens).await?;
        self.point_readers_at(&runtime);
        state.gens = gens;
        state.runtimes.insert(generation, runtime);
        if let Some(job) = state.job.as_mut() {
            job.state = "switched";
            job.progress = Some(done);
        }
        tracing::info!(generation, "readers switched to the rebuilt generation");
        Ok(())
    }

    async fn rollback(&self) -> Result<Summary, Problem> {
        let mut state = self.state.lock().await;
        let previous = state.gens.previous.ok_or_else(|| {
            Problem::new(StatusCode::CONFLICT, "replay-conflict", "Replay conflict", "there is no previous generation")
        })?;
        let gens = Generations { live: previous, previous: Some(state.gens.live), building: None };
        self.pointer.save(&gens).await.map_err(unavailable)?;
        self.point_readers_at(&state.runtimes[&previous]);
        state.gens = gens;
        Ok(summary("rollback", &state.gens))
    }

    async fn drop_old(&self) -> Result<Summary, Problem> {
        let mut state = self.state.lock().await;
        let previous = state.gens.previous.ok_or_else(|| {
            Problem::new(StatusCode::CONFLICT, "replay-conflict", "Replay conflict", "there is no previous generation")
        })?;
        let gens = Generations { previous: None, ..state.gens.clone() };
        self.pointer.save(&gens).await.map_err(unavailable)?;
        state.gens = gens;
        if let Some(runtime) = state.runtimes.remove(&previous) {
            runtime.stop().await;
        }
        crate::backends::remove_generation(&self.settings, previous).await.map_err(internal)?;
        Ok(summary("drop-old", &state.gens))
    }

    /// The generations and the rebuild job, with the running job's latest progress.
    async fn status(&self) -> serde_json::Value {
        let (gens, mut job) = {
            let state = self.state.lock().await;
            (state.gens.clone(), state.job.clone())
        };
        if let Some(job) = job.as_mut().filter(|j| j.state == "building") {
            job.progress = self.latest.lock().expect("progress lock poisoned").clone();
        }
        serde_json::json!({"generations": gens, "job": job})
    }

    /// The admin routes, behind the `admin` scope, each call audited.
    pub fn routes(self: Arc<Self>, auth: &Arc<callisto_core::auth::Auth>) -> Router {
        let routes = Router::new()
            .route("/admin/v1/replay", post(start_replay).get(replay_status))
            .route("/admin/v1/replay/rollback", post(rollback))
            .route("/admin/v1/replay/drop-old", post(drop_old))
            .route("/admin/v1/export", axum::routing::get(export_stream))
            .route("/admin/v1/dlq", axum::routing::get(dlq_list))
            .route("/admin/v1/dlq/replay", post(dlq_replay))
            .route("/admin/v1/dlq/purge", post(dlq_purge))
            .route("/admin/v1/dlq/{id}", axum::routing::get(dlq_show))
            .route("/admin/v1/compact", post(compact_now))
            .with_state(self);
        auth.protect(routes, callisto_core::auth::Rule::ADMIN)
    }
}

const PROBLEM: &str = "application/problem+json";

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        start_replay,
        replay_status,
        rollback,
        drop_old,
        export_stream,
        dlq_list,
        dlq_show,
        dlq_replay,
        dlq_purge,
        compact_now
    ),
    components(schemas(Problem, callisto_core::http::FieldError))
)]
struct AdminApi;

/// The admin API's OpenAPI document, every operation declared as needing `admin`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    let mut doc = AdminApi::openapi();
    callisto_core::auth::document(&mut doc, |_| callisto_core::auth::Rule::ADMIN);
    doc
}

fn internal(e: anyhow::Error) -> Problem {
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", format!("{e:#}"))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    /// Rebuild from this offset or RFC 3339 time instead of from offset 0.
    from: Option<String>,
}

/// Starts a rebuild into a new generation; readers switch to it once it has caught up.
#[utoipa::path(post, path = "/admin/v1/replay", tag = "admin", request_body(content = ReplayBody, description = "optional"),
    responses((status = 202, description = "the rebuild started", body = Object), (status = "4XX", body = Problem, content_type = PROBLEM), (status = 503, body = Problem, content_type = PROBLEM)))]
async fn start_replay(
    State(dev): State<Arc<DevGenerations>>,
    body: ApiJsonOrEmpty<ReplayBody>,
) -> Result<Response, Problem> {
    let from =
        body.value.from.map(|f| f.parse::<Position>().map_err(|e| Problem::invalid_field("from", e))).transpose()?;
    let generation = dev.start_rebuild(from).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({"generation": generation}))).into_response())
}

/// The generations and the running rebuild's progress.
#[utoipa::path(get, path = "/admin/v1/replay", tag = "admin", responses((status = 200, body = Object), (status = "4XX", body = Problem, content_type = PROBLEM), (status = 503, body = Problem, content_type = PROBLEM)))]
async fn replay_status(State(dev): State<Arc<DevGenerations>>) -> Json<serde_json::Value> {
    Json(dev.status().await)
}

/// Switches readers back to the previous generation.
#[utoipa::path(post, path = "/admin/v1/replay/rollback", tag = "admin", responses((status = 200, body = Object), (status = "4XX", body = Problem, content_type = PROBLEM), (status = 503, body = Problem, content_type = PROBLEM)))]
async fn rollback(State(dev): State<Arc<DevGenerations>>) -> Result<Json<serde_json::Value>, Problem> {
    Ok(Json(serde_json::json!({"summary": dev.rollback().await?})))
}

/// Deletes the previous generation.
#[utoipa::path(post, path = "/admin/v1/replay/drop-old", tag = "admin", responses((status = 200, body = Object), (status = "4XX", body = Problem, content_type = PROBLEM), (status = 503, body = Problem, content_type = PROBLEM)))]
async fn drop_old(State(dev): State<Arc<DevGenerations>>) -> Result<Json<serde_json::Value>, Problem> {
    Ok(Json(serde_json::json!({"summary": dev.drop_old().await?})))
}

impl DevGenerations {
    fn dlq_topic(&self) -> String {
        callisto_projectors::dlq::topic_for(&self.settings.log.topic)
    }
}

fn unavailable(e: impl std::fmt::Display) -> Problem {
    Problem::unavailable(e.to_string(), 1)
}

/// Every dead letter, with counts by projection and error.
#[utoipa::path(get, path = "/admin/v1/dlq", tag = "admin", responses((status = 200, body = Object), (status = "4XX", body = Problem, content_type = PROBLEM), (status = 503, body = Problem, content_type = PROBLEM)))]
async fn dlq_list(State(dev): State<Arc<DevGenerations>>) -> Result<Json<crate::dlq::Listing>, Problem> {
    Ok(Json(crate::dlq::list(dev.log.as_ref(), &dev.dlq_topic()).await.map_err(unavailable)?))
}

/// One dead letter: original bytes, headers, error and decoded payload.
#[utoipa::path(get, path = "/admin/v1/dlq/{id}", tag = "admin",
    params(("id" = String, Path, description = "`partition:offset` in the dead-letter topic")),
    responses((status = 200, body = Object), (status = "4XX", body = Problem, content_type = PROBLEM), (status = 503, body = Problem, content_type = PROBLEM)))]
async fn dlq_show(
    State(dev): State<Arc<DevGenerations>>,
    callisto_core::http::ApiPath(id): callisto_core::http::ApiPath<String>,
) -> Result<Json<crate::dlq::Detail>, Problem> {
    crate::dlq::parse_id(&id).map_err(|e| Problem::malformed(e.clone()).with_field("id", e))?;
    crate::dlq::show(dev.log.as_ref(), &dev.reader, &dev.dlq_topic(), &id).await.map(Json).map_err(Problem::not_found)
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    /// Dead-letter ids to re-drive; all of them when absent.
    ids: Option<Vec<String>>,
}

/// Re-drives dead letters through their projections.
#[utoipa::path(post, path = "/admin/v1/dlq/replay", tag = "admin", request_body(content = RedriveBody, description = "optional"),
    responses((status = 200, body = Object), (status = "4XX", body = Problem, content_type = PROBLEM), (status = 503, body = Problem, content_type = PROBLEM)))]
async fn dlq_replay(
    State(dev): State<Arc<DevGenerations>>,
    body: ApiJsonOrEmpty<RedriveBody>,
) -> Result<Json<crate::dlq::Redrive>, Problem> {
    for id in body.value.ids.iter().flatten() {
        crate::dlq::parse_id(id).map_err(|e| Problem::invalid_field("ids", e))?;
    }
    let projections: HashMap<&'static str, Arc<dyn Projection>> = HashMap::from([
        ("documents", dev.store.clone() as Arc<dyn Projection>),
        ("search", dev.search.clone() as Arc<dyn Projection>),
    ]);
    let report =
        crate::dlq::redrive(dev.log.as_ref(), &dev.reader, &dev.dlq_topic(), &projections, body.value.ids.as_deref())
            .await
            .map_err(Problem::not_found)?;
    Ok(Json(report))
}

/// What a compaction did.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Compacted {
    /// The generations whose read models were compacted.
    pub generations: Vec<u32>,
    pub key_store: bool,
}

/// Compacts every kept generation's read models and the key store, so what erasures deleted
/// leaves the files on disk now rather than at the next scheduled compaction.
#[utoipa::path(post, path = "/admin/v1/compact", tag = "admin", responses((status = 200, body = Compacted), (status = "4XX", body = Problem, content_type = PROBLEM), (status = 503, body = Problem, content_type = PROBLEM)))]
async fn compact_now(State(dev): State<Arc<DevGenerations>>) -> Result<Json<Compacted>, Problem> {
    Ok(Json(dev.compact().await.map_err(unavailable)?))
}

/// Deletes every dead letter.
#[utoipa::path(post, path = "/admin/v1/dlq/purge", tag = "admin", responses((status = 200, body = Object), (status = "4XX", body = Problem, content_type = PROBLEM), (status = 503, body = Problem, content_type = PROBLEM)))]
async fn dlq_purge(State(dev): State<Arc<DevGenerations>>) -> Result<Json<crate::dlq::Purge>, Problem> {
    Ok(Json(crate::dlq::purge(dev.log.as_ref(), &dev.dlq_topic()).await.map_err(unavailable)?))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ExportParams {
    /// `jsonl` (default) or `avro`.
    #[param(value_type = Option<String>)]
    format: Option<crate::export::Format>,
    /// `clear` (default): personal fields opened; `sealed`: left sealed as in the log.
    #[param(value_type = Option<String>)]
    personal_data: Option<crate::export::PersonalData>,
    partitions: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// Streams the topic's events as `callisto export` writes them.
#[utoipa::path(get, path = "/admin/v1/export", tag = "admin", params(ExportParams),
    responses((status = 200, description = "JSON Lines or an Avro container file", content_type = "application/x-ndjson"), (status = "4XX", body = Problem, content_type = PROBLEM), (status = 503, body = Problem, content_type = PROBLEM)))]
async fn export_stream(
    State(dev): State<Arc<DevGenerations>>,
    callisto_core::http::ApiQuery(params): callisto_core::http::ApiQuery<ExportParams>,
) -> Result<Response, Problem> {
    let partitions = params
        .partitions
        .map(|list| list.split(',').map(|p| p.trim().parse::<u32>()).collect::<Result<Vec<_>, _>>())
        .transpose()
        .map_err(|_| {
            Problem::malformed("partitions must be numbers separated by commas").with_field("partitions", "e.g. 0,3")
        })?;
    let position = |field: &str, raw: Option<String>| {
        raw.map(|r| r.parse::<Position>().map_err(|e| Problem::malformed(e.clone()).with_field(field, e))).transpose()
    };
    let selection = crate::export::Selection {
        partitions,
        from: position("from", params.from)?,
        to: position("to", params.to)?,
        format: params.format.unwrap_or(crate::export::Format::Jsonl),
        personal_data: params.personal_data.unwrap_or_default(),
    };
    let selection_format = selection.format;
    // Planning errors (an unknown partition) are answered before the stream starts.
    let request = callisto_core::replay::ReplayRequest {
        topic: dev.settings.log.topic.clone(),
        partitions: selection.partitions.clone(),
        from: selection.from,
        to: selection.to,
    };
    callisto_core::replay::plan(dev.log.as_ref(), &request)
        .await
        .map_err(|e| Problem::malformed(e.to_string()).with_field("partitions", e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(8);
    let (log, reader, topic) = (dev.log.clone(), dev.reader.clone(), dev.settings.log.topic.clone());
    tokio::spawn(async move {
        let mut sink = ChannelSink(tx.clone());
        let sent = crate::export::export(log, reader, &topic, &selection, |_| {}, || {}, &mut sink).await;
        if let Err(e) = sent {
            // Aborting the body tells the client the export is incomplete.
            let _ = tx.send(Err(std::io::Error::other(format!("{e:#}")))).await;
        }
    });
    let body = axum::body::Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let content_type = match selection_format {
        crate::export::Format::Jsonl => "application/x-ndjson",
        crate::export::Format::Avro => "application/avro",
    };
    Ok(([(axum::http::header::CONTENT_TYPE, content_type)], body).into_response())
}

/// Export chunks onto an HTTP response body.
struct ChannelSink(tokio::sync::mpsc::Sender<Result<axum::body::Bytes, std::io::Error>>);

impl crate::export::ChunkSink for ChannelSink {
    fn send(&mut self, chunk: Vec<u8>) -> futures::future::BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move { self.0.send(Ok(chunk.into())).await.map_err(|_| anyhow::anyhow!("client went away")) })
    }
}
