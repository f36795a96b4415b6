//! Runs each service: opens its backends, builds its router, serves until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use callisto_core::auth::Auth;
use callisto_core::config::Settings;
use callisto_core::http::{ReadinessCheck, Router, document_route, service_router};
use callisto_core::log::EventLog;
use callisto_core::readmodel::Projection;
use callisto_core::readmodel::switch::{SwitchedReadStore, SwitchedSearchIndex};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::DevGenerations;
use crate::backends;

/// How a service checks its callers: the configured checks, or none with `--insecure-no-auth`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Security {
    pub insecure_no_auth: bool,
}

/// `callisto writer`: the command API alone.
pub async fn run_writer(
    settings: Settings,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let auth = Auth::from_settings(&settings, security.insecure_no_auth).await?;
    let embedded = backends::open_log(&settings).await?;
    let claims = backends::open_claim_store(&settings).await?;
    if settings.kafka.brokers.is_some() && settings.log.idempotency_store.is_none() && settings.mongodb.uri.is_none() {
        tracing::warn!(
            "Idempotency-Key is kept in this writer's data dir: a retry that reaches another writer replica is \
             not recognised; set mongodb.uri (or log.idempotency_store = \"mongodb\") when running replicas"
        );
    }
    let state = callisto_writers::state(
        &settings,
        embedded.log.clone(),
        embedded.codec.clone(),
        embedded.keyring.clone(),
        claims,
    )
    .await?;
    let asyncapi = crate::asyncapi::document(&settings.log.topic, settings.log.partitions);
    let app = callisto_writers::build(&settings, state, &auth).merge(document_route("/asyncapi.json", asyncapi, &auth));
    let listener = bind(&settings, "writer").await?;
    callisto_core::http::serve(listener, app, &settings.http.tls, shutdown).await?;
    tracing::info!(service = "writer", "stopped");
    Ok(())
}

/// `callisto projector`: the projectors alone, with health, readiness and metrics on the listen
/// address. On embedded backends it must own the data dir (no writer or dev beside it).
pub async fn run_projector(
    settings: Settings,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let auth = Auth::from_settings(&settings, security.insecure_no_auth).await?;
    let log_side = backends::open_log(&settings).await?;
    let log = log_side.log.clone();
    log.ensure_topic(&settings.log.topic, settings.log.partitions).await?;
    let pointer = backends::generation_pointer(&settings).await?;
    let live = pointer.load().await.context("reading the live generation")?.live;
    let side = backends::open_generation(&settings, live, backends::ReadModelUse::Projecting).await?;
    // Readiness and compaction reach whichever generation is being projected.
    let switches = (Arc::new(SwitchedReadStore::new(side.store)), Arc::new(SwitchedSearchIndex::new(side.search)));
    let projections: Vec<Arc<dyn Projection>> = vec![switches.0.clone(), switches.1.clone()];
    let store = switches.0.clone();
    let stop = CancellationToken::new();
    let projector = tokio::spawn(project_live_generation(
        settings.clone(),
        log,
        log_side.reader(),
        pointer,
        live,
        switches,
        stop.clone(),
    ));
    if settings.privacy.compact_after_erasure_secs > 0 {
        let keyring = log_side.keyring.clone();
        let period = Duration::from_secs(settings.privacy.compact_after_erasure_secs);
        tokio::spawn(crate::admin::compact_after_erasures(period, stop.clone(), move || {
            let (projections, keyring) = (projections.clone(), keyring.clone());
            async move {
                for projection in &projections {
                    projection.compact().await?;
                }
                Ok(keyring.compact().await?)
            }
        }));
    }
    let readiness: ReadinessCheck = Arc::new(move || {
        let store = store.clone();
        Box::pin(async move { store.checkpoints().await.map(|_| ()).map_err(|e| e.to_string()) })
    });
    let openapi = serde_json::to_value(utoipa::openapi::OpenApiBuilder::new().build())?;
    let app = service_router(Router::new(), openapi, readiness, &settings.http, &auth);
    let listener = bind(&settings, "projector").await?;
    let served = callisto_core::http::serve(listener, app, &settings.http.tls, shutdown).await;
    stop.cancel();
    projector.await.context("projector task")??;
    tracing::info!(service = "projector", "stopped");
    Ok(served?)
}

/// Projects into generation `live`, which `switches` hold, until `stop`. On MongoDB and
/// Elasticsearch it follows the generation pointer: when a rebuild switches readers (or rolls
/// them back), this projector drains, leaves its groups, points `switches` at the new live
/// generation and carries on there from its checkpoints.
pub async fn project_live_generation(
    settings: Settings,
    log: Arc<dyn EventLog>,
    reader: Arc<callisto_core::privacy::EventReader>,
    pointer: Arc<dyn callisto_core::readmodel::generations::GenerationPointer>,
    mut live: u32,
    switches: (Arc<SwitchedReadStore>, Arc<SwitchedSearchIndex>),
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let follow = backends::has_server_read_models(&settings);
    loop {
        let generation_stop = stop.child_token();
        // The generation's own stores, not the switches: a switch moves only after this drains.
        let projections: Vec<Arc<dyn Projection>> = vec![switches.0.current(), switches.1.current()];
        let settings_for_projector = callisto_projectors::ProjectorSettings::new(&settings.log.topic);
        let projector =
            callisto_projectors::Projector::new(log.clone(), reader.clone(), projections, settings_for_projector)
                .start(generation_stop.clone())
                .await?;
        let next = loop {
            tokio::select! {
                _ = stop.cancelled() => break None,
                _ = tokio::time::sleep(backends::GENERATION_POLL), if follow => match pointer.load().await {
                    Ok(generations) if generations.live != live => break Some(generations.live),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "reading the live generation failed; projecting on"),
                },
            }
        };
        generation_stop.cancel();
        projector.await.context("projector task")?;
        let Some(next) = next else { return Ok(()) };
        let side = backends::open_generation(&settings, next, backends::ReadModelUse::Projecting).await?;
        switches.0.switch_to(side.store);
        switches.1.switch_to(side.search);
        tracing::info!(from = live, to = next, "projecting into the new live generation");
        live = next;
    }
}

/// `callisto query-api`: reads alone. On embedded backends it serves the read models as they are
/// in the data dir; with no projector in the process, tokens past them answer as stale.
pub async fn run_query_api(
    settings: Settings,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let auth = Auth::from_settings(&settings, security.insecure_no_auth).await?;
    let read_side = backends::open_configured_read_models(&settings, backends::ReadModelUse::Serving).await?;
    let state = callisto_query_api::QueryState {
        store: read_side.store,
        search: read_side.search,
        partitions: settings.log.partitions,
        consistency_wait: Duration::from_millis(settings.query.consistency_wait_ms),
    };
    let app = callisto_query_api::build(state, &settings.http, &auth);
    let listener = bind(&settings, "query-api").await?;
    callisto_core::http::serve(listener, app, &settings.http.tls, shutdown).await?;
    tracing::info!(service = "query-api", "stopped");
    Ok(())
}

/// `callisto dev`: everything in one process until `shutdown`. With `kafka_mock`, the event
/// log is an in-process librdkafka mock cluster of that many brokers, to show and test the
/// Kafka path with no servers.
pub async fn run_dev(
    mut settings: Settings,
    kafka_mock: Option<u32>,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _cluster = match kafka_mock {
        Some(brokers) => Some(start_kafka_mock(&mut settings, brokers)?),
        None => None,
    };
    // The key exists before the address is announced, so whoever reads the announcement can
    // call at once.
    if !security.insecure_no_auth {
        crate::keys::ensure_dev_key(&settings)?;
    }
    let listener = bind(&settings, "dev").await?;
    let dev = Dev::start_with(&settings, listener, security).await?;
    shutdown.await;
    dev.stop().await
}

/// Starts a mock cluster, points `settings` at it, and creates the topics (the mock has no
/// admin API to create them through).
pub fn start_kafka_mock(
    settings: &mut Settings,
    brokers: u32,
) -> anyhow::Result<rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>> {
    anyhow::ensure!(brokers >= 1, "--kafka-mock needs at least one broker");
    let cluster = rdkafka::mocking::MockCluster::new(brokers as i32).context("starting the Kafka mock cluster")?;
    let replication = brokers.min(3) as i32;
    let partitions = settings.log.partitions as i32;
    for topic in [settings.log.topic.clone(), callisto_projectors::dlq::topic_for(&settings.log.topic)] {
        cluster.create_topic(&topic, partitions, replication).context("creating a mock topic")?;
    }
    settings.kafka.brokers = Some(cluster.bootstrap_servers());
    settings.kafka.replication_factor = replication;
    settings.kafka.min_insync_replicas = None;
    tracing::info!(brokers, bootstrap = %cluster.bootstrap_servers(), "kafka mock cluster started");
    Ok(cluster)
}

/// The whole backbone in one process: writer, projectors and query API on one port, over the
/// embedded stand-ins, plus the admin API batch commands use while it owns the data dir.
pub struct Dev {
    pub addr: SocketAddr,
    pub log: Arc<dyn EventLog>,
    pub codec: Arc<callisto_avro::Codec>,
    pub keyring: Arc<callisto_core::privacy::Keyring>,
    /// What readers read: the live generation, behind the blue/green switch.
    pub store: Arc<SwitchedReadStore>,
    pub search: Arc<SwitchedSearchIndex>,
    generations: Arc<DevGenerations>,
    data_dir: std::path::PathBuf,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    /// Scheduled compaction; it holds the generations, so `stop` waits for it to end.
    compaction: Option<JoinHandle<()>>,
}

impl Dev {
    /// Starts with authentication on: a dev API key is created on first start.
    pub async fn start(settings: &Settings, listener: TcpListener) -> anyhow::Result<Self> {
        Self::start_with(settings, listener, Security::default()).await
    }

    pub async fn start_with(settings: &Settings, listener: TcpListener, security: Security) -> anyhow::Result<Self> {
        if !security.insecure_no_auth {
            crate::keys::ensure_dev_key(settings)?;
        }
        // The projectors share this process with the API: the search index yields the cores to
        // requests (see `callisto_core::priority`). Set before any index is opened.
        callisto_core::priority::yield_to_requests();
        let auth = Auth::from_settings(settings, security.insecure_no_auth).await?;
        let log_side = backends::open_log(settings).await?;
        let reader = log_side.reader();
        let (log, codec, keyring) = (log_side.log, log_side.codec, log_side.keyring);
        let claims = backends::open_claim_store(settings).await?;
        let writer = callisto_writers::state(settings, log.clone(), codec.clone(), keyring.clone(), claims).await?;
        let partitions = log.partitions(&settings.log.topic).await?;
        let generations = DevGenerations::open(settings, log.clone(), reader).await?;
        let (store, search) = (generations.store.clone(), generations.search.clone());

        let query = callisto_query_api::QueryState {
            store: store.clone(),
            search: search.clone(),
            partitions,
            consistency_wait: Duration::from_millis(settings.query.consistency_wait_ms),
        };
        let app = dev_router(settings, &auth, writer, query, generations.clone(), log.clone(), store.clone());
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let period = settings.privacy.compact_after_erasure_secs;
        let compaction = (period > 0).then(|| {
            let generations = generations.clone();
            tokio::spawn(crate::admin::compact_after_erasures(
                Duration::from_secs(period),
                shutdown.clone(),
                move || {
                    let generations = generations.clone();
                    async move { generations.compact().await.map(drop) }
                },
            ))
        });
        let tls = settings.http.tls.clone();
        let stopped = shutdown.clone().cancelled_owned();
        let server = tokio::spawn(async move { callisto_core::http::serve(listener, app, &tls, stopped).await });
        let data_dir = settings.storage.data_dir.clone();
        crate::admin::advertise(&data_dir, addr, settings.http.tls.enabled())
            .context("advertising the admin address")?;
        Ok(Self { addr, log, codec, keyring, store, search, generations, data_dir, shutdown, server, compaction })
    }

    /// Stops serving (draining in-flight requests), then stops every generation's projectors
    /// after their current batch.
    pub async fn stop(self) -> anyhow::Result<()> {
        crate::admin::withdraw(&self.data_dir);
        self.shutdown.cancel();
        let served = self.server.await.context("http server task")?;
        if let Some(compaction) = self.compaction {
            compaction.await.context("compaction task")?;
        }
        self.generations.stop().await;
        drop(self.generations);
        // Connection tasks that served the last requests may still be dropping their clones of
        // the stores: when `stop` returns, this is their last owner and the data dir is free.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.log) + Arc::strong_count(&self.codec) + Arc::strong_count(&self.keyring) > 3 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("stores still in use after stopping; the data dir may stay locked a while");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(service = "dev", "stopped");
        Ok(served?)
    }
}

fn dev_router(
    settings: &Settings,
    auth: &Arc<Auth>,
    writer: callisto_writers::WriterState,
    query: callisto_query_api::QueryState,
    generations: Arc<DevGenerations>,
    log: Arc<dyn EventLog>,
    store: Arc<SwitchedReadStore>,
) -> Router {
    let partitions = query.partitions;
    let asyncapi = crate::asyncapi::document(&settings.log.topic, partitions);
    let routes = callisto_writers::api::routes(writer, auth)
        .merge(callisto_query_api::routes(query, auth))
        .merge(generations.routes(auth))
        .merge(document_route("/asyncapi.json", asyncapi, auth));
    let mut openapi = callisto_writers::openapi::document();
    callisto_core::rules::merge_documents(&mut openapi, callisto_query_api::openapi::document(partitions));
    callisto_core::rules::merge_documents(
        &mut openapi,
        serde_json::to_value(crate::admin::openapi()).expect("an OpenAPI document serializes"),
    );
    openapi["info"]["title"] = "Callisto".into();
    let readiness: ReadinessCheck = Arc::new(move || {
        let (log, store) = (log.clone(), store.clone());
        Box::pin(async move {
            log.health().await.map_err(|e| e.to_string())?;
            store.checkpoints().await.map(|_| ()).map_err(|e| e.to_string())
        })
    });
    service_router(routes, openapi, readiness, &settings.http, auth)
}

async fn bind(settings: &Settings, service: &str) -> anyhow::Result<TcpListener> {
    let listener =
        TcpListener::bind(&settings.http.listen).await.with_context(|| format!("binding {}", settings.http.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if settings.http.tls.enabled() { "https" } else { "http" };
    tracing::info!(%addr, service, scheme, data_dir = %settings.storage.data_dir.display(), "listening");
    // A fixed, parseable line for scripts and tests that start with port 0.
    println!("callisto {service} listening on {scheme}://{addr}");
    Ok(listener)
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled, so a signal that arrives while a service is still starting (after it
/// announced its address, say) stops it gracefully instead of killing it.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let received = |stream: Option<tokio::signal::unix::Signal>| async move {
            match stream {
                Some(mut stream) => {
                    stream.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let interrupt = received(signal(SignalKind::interrupt()).ok());
        let terminate = received(signal(SignalKind::terminate()).ok());
        async move {
            tokio::select! {
                () = interrupt => {},
                () = terminate => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
