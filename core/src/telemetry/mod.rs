//! All telemetry is set up here: structured logs through `tracing`, metrics through the
//! `metrics` facade rendered by the Prometheus exporter, and traces through OpenTelemetry when
//! an OTLP endpoint is configured. Metric labels are bounded enums (command kinds, outcomes,
//! routes), never ids.
//!
//! - [`trace`]: span constructors and W3C trace-context propagation.

pub mod trace;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetrySettings};

/// Keeps the trace exporter alive; dropping it flushes the spans still queued.
#[derive(Debug, Default)]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Exports every span ended so far (tests and short-lived commands call this).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!(error = %e, "flushing spans failed");
        }
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::debug!(error = %e, "stopping the span exporter");
        }
    }
}

/// Libraries whose info lines are chatter for an operator (a tantivy commit, a connection
/// opened): they log at `warn` unless the configured filter names them.
const QUIET_LIBRARIES: &[&str] =
    &["tantivy", "hyper", "hyper_util", "h2", "reqwest", "rustls", "rdkafka", "librdkafka", "mongodb", "elasticsearch"];

/// The filter for `log_level`: the libraries at `warn` first, so a directive of the operator's
/// for one of them, which comes later, wins.
pub fn log_filter(log_level: &str) -> String {
    let quiet: Vec<String> = QUIET_LIBRARIES
        .iter()
        .filter(|library| !log_level.split(',').any(|d| d.trim().starts_with(&format!("{library}="))))
        .map(|library| format!("{library}=warn"))
        .collect();
    format!("{},{log_level}", quiet.join(","))
}

/// Installs the global tracing subscriber: logs, and span export when
/// `settings.otlp_endpoint` is set (as `service`). Later calls install nothing, so tests may
/// call it freely; only the first one's exporter receives spans.
pub fn init_tracing(settings: &TelemetrySettings, service: &str) -> anyhow::Result<Tracing> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(log_filter(&settings.log_level)))
        // Spans for export are not log lines, whatever the log level says.
        .add_directive(format!("{}=off", trace::TARGET).parse()?);
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let format = settings.log_format.unwrap_or_else(|| {
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() { LogFormat::Text } else { LogFormat::Json }
    });
    let logs = match format {
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).with_filter(filter).boxed(),
        LogFormat::Text => logs.with_filter(filter).boxed(),
    };
    let provider = match &settings.otlp_endpoint {
        Some(endpoint) => Some(span_exporter(endpoint, service, settings)?),
        None => None,
    };
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("callisto"))
            .with_filter(Targets::new().with_target(trace::TARGET, LevelFilter::INFO))
    });
    if tracing_subscriber::registry().with(logs).with(spans).try_init().is_err() {
        return Ok(Tracing::default());
    }
    if let Some(endpoint) = &settings.otlp_endpoint {
        tracing::info!(endpoint = %endpoint, service, "exporting traces over OTLP/HTTP");
    }
    Ok(Tracing { provider })
}

/// OTLP/HTTP (protobuf) to `{endpoint}/v1/traces`, batched on the SDK's own thread: a slow or
/// absent collector costs dropped spans (the queue is bounded), never a stalled request.
fn span_exporter(endpoint: &str, service: &str, settings: &TelemetrySettings) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .with_timeout(std::time::Duration::from_millis(settings.otlp_timeout_ms))
        .build()
        .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint {endpoint:?}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_owned()).build();
    // Parent-based: a caller's sampling decision (its traceparent flags) is kept; new traces
    // are sampled at the configured ratio.
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.trace_sample_ratio)));
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).with_sampler(sampler).build())
}

/// Latency buckets in seconds: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS))
            .expect("static buckets are valid");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (e.g. by an embedding program); then our
        // handle renders an empty page rather than failing the service.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

/// How a metric is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric Callisto exports, with its `# HELP` text: one list, so a scrape can be checked
/// against it.
pub const METRICS: &[(&str, MetricKind, &str)] = &[
    (
        "callisto_http_requests_total",
        MetricKind::Counter,
        "HTTP requests answered, by route template, method and status class.",
    ),
    (
        "callisto_http_request_duration_seconds",
        MetricKind::Histogram,
        "Time to answer an HTTP request, by route template and method.",
    ),
    (
        "callisto_commands_total",
        MetricKind::Counter,
        "Commands by kind and outcome (accepted, replayed, rejected, gone, unavailable).",
    ),
    ("callisto_append_seconds", MetricKind::Histogram, "Time from a validated command to its durable append."),
    (
        "callisto_log_group_commit_seconds",
        MetricKind::Histogram,
        "Time of one embedded-log group commit, fsync included.",
    ),
    ("callisto_log_group_commit_size", MetricKind::Histogram, "Appends per embedded-log group commit."),
    (
        "callisto_log_append_wait_seconds",
        MetricKind::Histogram,
        "Time from an append's arrival in the embedded log's queue to its answer: the commit under way, its own group commit.",
    ),
    (
        "callisto_store_group_commit_seconds",
        MetricKind::Histogram,
        "Time of one embedded-store group commit (data keys, documents), fsync included, by writer thread.",
    ),
    (
        "callisto_store_group_commit_size",
        MetricKind::Histogram,
        "Writes per embedded-store group commit, by writer thread.",
    ),
    ("callisto_projected_events_total", MetricKind::Counter, "Events applied, by projection."),
    (
        "callisto_projection_batch_seconds",
        MetricKind::Histogram,
        "Time to decode, open and apply one batch, by projection.",
    ),
    (
        "callisto_projection_shared_batches_total",
        MetricKind::Counter,
        "Batches a projection applied as another projection's worker decoded them while both caught up on the same records, by projection.",
    ),
    (
        "callisto_projection_lag",
        MetricKind::Gauge,
        "Records in the log a projection has not applied yet, by partition.",
    ),
    (
        "callisto_projection_lag_seconds",
        MetricKind::Gauge,
        "Age of the oldest event a projection has not applied yet, by partition; 0 when caught up.",
    ),
    ("callisto_dead_letters_total", MetricKind::Counter, "Events dead-lettered, by projection."),
    ("callisto_search_commit_seconds", MetricKind::Histogram, "Time of one search index commit."),
    ("callisto_query_seconds", MetricKind::Histogram, "Time to answer a query, consistency wait included, by route."),
    (
        "callisto_stale_reads_total",
        MetricKind::Counter,
        "Reads answered stale because their consistency token was not reached in time.",
    ),
    ("callisto_persons_erased_total", MetricKind::Counter, "Persons erased: data keys destroyed by this process."),
    (
        "callisto_breaker_state",
        MetricKind::Gauge,
        "Circuit breaker in front of a dependency: 0 closed, 1 half-open (probing), 2 open (calls refused).",
    ),
    (
        "callisto_breaker_rejections_total",
        MetricKind::Counter,
        "Calls an open circuit breaker refused without calling the dependency.",
    ),
    ("callisto_rate_limited_total", MetricKind::Counter, "Requests refused with 429 because a rate budget was spent."),
];

fn describe() {
    for (name, kind, help) in METRICS {
        match kind {
            MetricKind::Counter => metrics::describe_counter!(*name, *help),
            MetricKind::Gauge => metrics::describe_gauge!(*name, *help),
            MetricKind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
}
