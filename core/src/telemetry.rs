//! All telemetry is set up here: structured logs through `tracing`, metrics through the
//! `metrics` facade rendered by the Prometheus exporter. Metric labels are bounded enums
//! (command kinds, outcomes, routes), never ids.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetrySettings};

/// Installs the global tracing subscriber. Later calls are no-ops, so tests may call it freely.
pub fn init_tracing(settings: &TelemetrySettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.log_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match settings.log_format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
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
    ("callisto_projected_events_total", MetricKind::Counter, "Events applied, by projection."),
    (
        "callisto_projection_batch_seconds",
        MetricKind::Histogram,
        "Time to decode, open and apply one batch, by projection.",
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
