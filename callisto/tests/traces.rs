//! One command is one trace, exported over OTLP/HTTP: the HTTP server span (continuing the
//! caller's `traceparent`), the producer span of the append, and in both projections the
//! consumer span of the batch that applied the record, parented on the producer span and linked
//! to it, with the read-model write as its child. A read with a consistency token gets its own
//! server span with the wait as a child. Checked on the embedded log and on the Kafka mock
//! cluster, by decoding what the real exporter sends to an OTLP receiver in this test.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use callisto::services::start_kafka_mock;
use callisto_core::config::{Settings, TelemetrySettings};
use callisto_core::telemetry::{Tracing, init_tracing};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use serde_json::json;

mod common;

/// Spans received so far, with their service name.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

struct Collector {
    spans: Received,
    tracing: Tracing,
}

/// The OTLP receiver (on its own runtime, so it outlives each test's) and the exporter
/// pointed at it: one per test process, as the global subscriber is.
fn collector() -> &'static Collector {
    static COLLECTOR: OnceLock<Collector> = OnceLock::new();
    COLLECTOR.get_or_init(|| {
        let spans = Received::default();
        let (ready, addr) = std::sync::mpsc::channel();
        let store = spans.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                ready.send(listener.local_addr().unwrap()).unwrap();
                let receive = move |body: axum::body::Bytes| async move {
                    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
                    let mut spans = store.lock().unwrap();
                    for resource in request.resource_spans {
                        let service = resource
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|kv| kv.key == "service.name")
                            .and_then(|kv| string_value(kv.value.as_ref()?.value.as_ref()?))
                            .unwrap_or_default();
                        for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                            spans.push((service.clone(), span));
                        }
                    }
                    axum::http::StatusCode::OK
                };
                let app = axum::Router::new().route("/v1/traces", axum::routing::post(receive));
                axum::serve(listener, app).await.unwrap();
            });
        });
        let addr = addr.recv().unwrap();
        let settings = TelemetrySettings {
            otlp_endpoint: Some(format!("http://{addr}")),
            log_level: "warn".into(),
            ..TelemetrySettings::default()
        };
        let tracing = init_tracing(&settings, "callisto-dev").unwrap();
        Collector { spans, tracing }
    })
}

fn string_value(value: &AnyValue) -> Option<String> {
    match value {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| string_value(kv.value.as_ref()?.value.as_ref()?))
}

/// Waits until `done` holds for the spans of `trace_id`, flushing the exporter each round.
async fn spans_of(trace_id: &[u8], done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    let collector = collector();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        collector.tracing.flush();
        let spans: Vec<Span> = collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(service, span)| service == "callisto-dev" && span.trace_id == trace_id)
            .map(|(_, span)| span.clone())
            .collect();
        if done(&spans) || Instant::now() > deadline {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn one<'a>(spans: &'a [Span], what: &str, matches: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| matches(s)).collect();
    assert_eq!(found.len(), 1, "exactly one {what} span among {:#?}", names(spans));
    found[0]
}

fn names(spans: &[Span]) -> Vec<(String, i32)> {
    spans.iter().map(|s| (s.name.clone(), s.kind)).collect()
}

async fn one_command_is_one_trace(settings: &Settings, messaging_system: &str) {
    collector();
    let common::DevApp { dev, base, client } = common::dev_app(settings).await;
    // The caller's own trace: Callisto continues it.
    let trace_id: [u8; 16] = rand::random();
    let caller_span: [u8; 8] = rand::random();
    let traceparent = format!("00-{}-{}-01", hex(&trace_id), hex(&caller_span));
    let accepted = common::json_of(
        client
            .post(format!("{base}/v1/persons"))
            .header("traceparent", &traceparent)
            .json(&json!({"given_name": "Ada", "family_name": "Lovelace"})),
    )
    .await;
    let id = accepted["person_id"].as_str().unwrap().to_owned();
    let token = accepted["consistency_token"].as_str().unwrap().to_owned();

    let complete = |spans: &[Span]| {
        ["documents", "search"].iter().all(|projection| {
            spans.iter().any(|s| {
                s.kind == SpanKind::Client as i32 && attribute(s, "callisto.projection").as_deref() == Some(projection)
            })
        })
    };
    let spans = spans_of(&trace_id, complete).await;

    let server = one(&spans, "HTTP server", |s| s.kind == SpanKind::Server as i32);
    assert_eq!(server.name, "POST /v1/persons");
    assert_eq!(server.parent_span_id, caller_span, "the caller's traceparent is honoured");
    assert_eq!(attribute(server, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attribute(server, "http.route").as_deref(), Some("/v1/persons"));
    assert_eq!(attribute(server, "http.response.status_code").as_deref(), Some("202"));

    let producer = one(&spans, "producer", |s| s.kind == SpanKind::Producer as i32);
    assert_eq!(producer.name, "send persons");
    assert_eq!(producer.parent_span_id, server.span_id, "the append is a child of the request");
    assert_eq!(attribute(producer, "messaging.system").as_deref(), Some(messaging_system));
    assert_eq!(attribute(producer, "messaging.destination.name").as_deref(), Some("persons"));
    assert_eq!(
        attribute(producer, "messaging.destination.partition.id"),
        accepted["partition"].as_u64().map(|p| p.to_string())
    );

    for projection in ["documents", "search"] {
        let process = one(&spans, "consumer", |s| {
            s.kind == SpanKind::Consumer as i32 && attribute(s, "callisto.projection").as_deref() == Some(projection)
        });
        assert_eq!(process.name, "process persons");
        assert_eq!(process.parent_span_id, producer.span_id, "{projection} applies the record in the command's trace");
        assert!(
            process.links.iter().any(|l| l.trace_id == trace_id && l.span_id == producer.span_id),
            "{projection}'s batch span links the record's producer span"
        );
        assert_eq!(attribute(process, "messaging.batch.message_count").as_deref(), Some("1"));
        let write = one(&spans, "read-model write", |s| {
            s.kind == SpanKind::Client as i32 && attribute(s, "callisto.projection").as_deref() == Some(projection)
        });
        assert_eq!(write.parent_span_id, process.span_id, "the {projection} write is a child of its batch span");
        assert!(attribute(write, "db.system.name").is_some());
    }

    // A read with the token: its own trace (here, the caller's), the wait a child of it.
    let read_trace: [u8; 16] = rand::random();
    let read = client
        .get(format!("{base}/v1/persons/{id}"))
        .header("traceparent", format!("00-{}-{}-01", hex(&read_trace), hex(&caller_span)))
        .header("callisto-consistency-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let spans = spans_of(&read_trace, |spans| spans.len() >= 2).await;
    let server = one(&spans, "HTTP server", |s| s.kind == SpanKind::Server as i32);
    assert_eq!(server.name, "GET /v1/persons/{id}");
    let wait = one(&spans, "consistency wait", |s| s.name == "wait documents");
    assert_eq!(wait.parent_span_id, server.span_id);
    assert_eq!(attribute(wait, "callisto.consistency.stale").as_deref(), Some("false"));
    dev.stop().await.unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_log_one_trace_from_http_to_both_read_models() {
    let dir = tempfile::tempdir().unwrap();
    one_command_is_one_trace(&common::settings(dir.path()), "callisto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_one_trace_from_http_through_the_brokers_to_both_read_models() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(dir.path());
    let _cluster = start_kafka_mock(&mut settings, 3).unwrap();
    one_command_is_one_trace(&settings, "kafka").await;
}
