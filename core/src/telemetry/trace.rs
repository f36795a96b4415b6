//! Distributed traces: OpenTelemetry spans exported over OTLP/HTTP when
//! `telemetry.otlp_endpoint` is set, and W3C trace context carried in HTTP and record headers.
//!
//! One command is one trace: the HTTP server span, the producer span of its append (whose
//! context travels in the record's `traceparent` header), and in every projection a consumer
//! span for the batch that applied the record (parented on the record's context when the batch
//! holds just that record, linked to it otherwise, as the messaging conventions say for batch
//! consumers), with the read-model write as its child.
//!
//! Spans are emitted under the target [`TARGET`], which only the OpenTelemetry layer listens to:
//! with no endpoint set no layer is interested, `tracing` disables them at the call site, and
//! tracing costs a branch.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span meant for export.
pub const TARGET: &str = "callisto::trace";

/// Most links one batch span carries; a catch-up batch of thousands would otherwise make one
/// span the size of the batch.
pub const MAX_LINKS: usize = 128;

/// The W3C `traceparent` (and `tracestate`, when there is one) of `span`, or `None` when the
/// span is not exported.
pub fn context_headers(span: &Span) -> Vec<(String, Vec<u8>)> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.into_iter().map(|(name, value)| (name, value.into_bytes())).collect()
}

/// The remote span context that `traceparent`/`tracestate` header values describe, if valid.
pub fn remote_context(traceparent: Option<&[u8]>, tracestate: Option<&[u8]>) -> Option<opentelemetry::Context> {
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_owned(), std::str::from_utf8(traceparent?).ok()?.to_owned());
    if let Some(state) = tracestate.and_then(|s| std::str::from_utf8(s).ok()) {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let context = TraceContextPropagator::new().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

/// The server span of one HTTP request, named and attributed as the HTTP semantic conventions
/// say, continuing the caller's trace when the request carries a `traceparent`.
pub fn http_server_span(method: &str, route: &str, headers: &axum::http::HeaderMap) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "HTTP request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
    );
    if !span.is_disabled()
        && let Some(parent) = remote_context(
            headers.get("traceparent").map(|v| v.as_bytes()),
            headers.get("tracestate").map(|v| v.as_bytes()),
        )
    {
        let _ = span.set_parent(parent);
    }
    span
}

/// Records the response status on an HTTP server span; 5xx marks it failed (4xx is the
/// client's error, not the server's, for a server span).
pub fn record_http_status(span: &Span, status: u16) {
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// The producer span of one append to `topic`.
pub fn producer_span(system: &str, topic: &str) -> Span {
    tracing::info_span!(
        target: TARGET,
        "send",
        otel.name = %format_args!("send {topic}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = topic,
        messaging.destination.partition.id = tracing::field::Empty,
        messaging.kafka.offset = tracing::field::Empty,
    )
}

/// The consumer span of one batch applied by `projection`: parented on the only record's
/// context, or linked to every record's context (up to [`MAX_LINKS`]).
pub fn process_span<'a>(
    system: &str,
    topic: &str,
    projection: &str,
    partition: u32,
    contexts: impl ExactSizeIterator<Item = Option<opentelemetry::Context>> + 'a,
) -> Span {
    let count = contexts.len();
    let span = tracing::info_span!(
        target: TARGET,
        "process",
        otel.name = %format_args!("process {topic}"),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        messaging.system = system,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = topic,
        messaging.destination.partition.id = partition,
        messaging.batch.message_count = count,
        messaging.consumer.group.name = projection,
        callisto.projection = projection,
    );
    if span.is_disabled() {
        return span;
    }
    let contexts: Vec<opentelemetry::Context> = contexts.flatten().take(MAX_LINKS).collect();
    if count == 1
        && let Some(parent) = contexts.first()
    {
        let _ = span.set_parent(parent.clone());
    }
    for context in &contexts {
        span.add_link(context.span().span_context().clone());
    }
    span
}

/// The span of one read-model write (a batch and its checkpoint) to `system`.
pub fn write_span(system: &str, projection: &str, events: usize) -> Span {
    tracing::info_span!(
        target: TARGET,
        "write",
        otel.name = %format_args!("apply {projection}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        db.system.name = system,
        db.operation.name = "apply",
        db.operation.batch.size = events,
        callisto.projection = projection,
    )
}

/// A query's wait for its consistency tokens to be applied by `projection`.
pub fn consistency_wait_span(projection: &str, tokens: usize) -> Span {
    tracing::info_span!(
        target: TARGET,
        "consistency wait",
        otel.name = %format_args!("wait {projection}"),
        otel.kind = "internal",
        callisto.projection = projection,
        callisto.consistency.tokens = tokens,
        callisto.consistency.stale = tracing::field::Empty,
    )
}

/// Marks a span failed with a short reason.
pub fn record_error(span: &Span, reason: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_context_accepts_w3c_and_refuses_junk() {
        let valid = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = remote_context(Some(valid), Some(b"vendor=1")).expect("a valid traceparent");
        assert_eq!(context.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(context.span().span_context().is_remote());
        assert!(remote_context(Some(b"00-0000-bad"), None).is_none());
        assert!(remote_context(Some(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None).is_none());
        assert!(remote_context(None, None).is_none());
        // With no exporter installed, spans are disabled and carry no context to inject.
        assert!(context_headers(&producer_span("kafka", "persons")).is_empty());
    }
}
