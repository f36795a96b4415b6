//! `Idempotency-Key` on Kafka: two writers on one mock cluster share a claim store, so a key is
//! appended once however its retries are spread over them, and a retry after a writer died
//! between its append and its answer gets that append back (or, when nothing was appended,
//! appends exactly once). Keys expire after the retention, on Kafka and on the embedded log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use callisto::backends::{LogSide, kafka_log, open_log};
use callisto::services::start_kafka_mock;
use callisto_core::auth::Auth;
use callisto_core::config::Settings;
use callisto_core::log::idempotency::ClaimStore;
use callisto_core::log::idempotency::embedded::EmbeddedClaimStore;
use callisto_core::log::{AppendRequest, Appended, EventLog, LogError};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Notify;

mod common;
use common::{DevApp, dev_app, settings};

/// A writer serving `log` (wrapped by the claims of `claims`) on a free port; its base URL and
/// the server task, which a test aborts to kill the writer.
async fn writer(
    settings: &Settings,
    side: &LogSide,
    log: Arc<dyn EventLog>,
    claims: Arc<dyn ClaimStore>,
) -> (String, tokio::task::JoinHandle<()>) {
    let auth = Auth::from_settings(settings, false).await.unwrap();
    let state =
        callisto_writers::state(settings, log, side.codec.clone(), side.keyring.clone(), Some(claims)).await.unwrap();
    let app = callisto_writers::build(settings, state, &auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let tls = settings.http.tls.clone();
    let server = tokio::spawn(async move {
        callisto_core::http::serve(listener, app, &tls, std::future::pending()).await.unwrap();
    });
    (base, server)
}

/// A mock cluster, the first writer's log side, and a claim store both writers share.
struct Backbone {
    _cluster: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    settings: Settings,
    side: LogSide,
    claims: Arc<dyn ClaimStore>,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Backbone {
    fn new_kafka_log(&self) -> Arc<dyn EventLog> {
        Arc::new(kafka_log(&self.settings, self.settings.kafka.brokers.as_deref().unwrap()).unwrap())
    }

    /// Records in the topic, over every partition.
    async fn records(&self) -> u64 {
        self.side.log.end_offsets(&self.settings.log.topic).await.unwrap().iter().sum()
    }
}

async fn backbone(tune: impl FnOnce(&mut Settings)) -> Backbone {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    let cluster = start_kafka_mock(&mut settings, 1).unwrap();
    tune(&mut settings);
    let side = open_log(&settings).await.unwrap();
    let claims = Arc::new(EmbeddedClaimStore::open(&dir.path().join("claims.redb")).unwrap());
    let client = common::client(dir.path());
    Backbone { _cluster: cluster, settings, side, claims, client, _dir: dir }
}

fn register(client: &reqwest::Client, base: &str, key: &str, given_name: &str) -> reqwest::RequestBuilder {
    client
        .post(format!("{base}/v1/persons"))
        .header("idempotency-key", key)
        .json(&json!({"given_name": given_name, "family_name": "Retry"}))
}

fn replayed(response: &reqwest::Response) -> bool {
    response.headers().get("idempotent-replayed").is_some_and(|v| v == "true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_over_two_writers_append_once() {
    let backbone = backbone(|_| {}).await;
    let stranger_key = callisto::keys::create(
        &backbone.settings,
        "stranger".into(),
        [callisto_core::auth::Scope::PersonsWrite].into(),
        None,
        None,
    )
    .unwrap()
    .key;
    let (a, _a) = writer(&backbone.settings, &backbone.side, backbone.side.log.clone(), backbone.claims.clone()).await;
    let (b, _b) = writer(&backbone.settings, &backbone.side, backbone.new_kafka_log(), backbone.claims.clone()).await;
    let before = backbone.records().await;

    let attempts = (0..8).map(|i| {
        let base = if i % 2 == 0 { a.clone() } else { b.clone() };
        let client = backbone.client.clone();
        async move {
            let response = register(&client, &base, "order-7", "Ada").send().await.unwrap();
            let status = response.status();
            let retry_after = response.headers().get("retry-after").is_some();
            (status, retry_after, response.json::<Value>().await.unwrap())
        }
    });
    let answers = futures::future::join_all(attempts).await;
    let accepted: Vec<&Value> = answers.iter().filter(|(s, ..)| *s == StatusCode::ACCEPTED).map(|(.., v)| v).collect();
    assert!(!accepted.is_empty(), "{answers:?}");
    for (status, retry_after, body) in &answers {
        if *status != StatusCode::ACCEPTED {
            // Only a retry racing the first append may be told to come back.
            assert_eq!(*status, StatusCode::CONFLICT, "{body}");
            assert!(retry_after, "{body}");
            assert_eq!(body["type"], "/problems/idempotency-key-in-use", "{body}");
        }
    }
    for body in &accepted {
        assert_eq!((&body["person_id"], &body["offset"]), (&accepted[0]["person_id"], &accepted[0]["offset"]));
    }
    assert_eq!(backbone.records().await, before + 1, "one key, one append: {answers:?}");

    // A later retry, at either writer, is the first answer again.
    for base in [&a, &b] {
        let again = register(&backbone.client, base, "order-7", "Ada").send().await.unwrap();
        assert_eq!(again.status(), StatusCode::ACCEPTED);
        assert!(replayed(&again));
        let again: Value = again.json().await.unwrap();
        assert_eq!(again["offset"], accepted[0]["offset"]);
        assert_eq!(again["person_id"], accepted[0]["person_id"]);
    }
    // The same key with another request is a conflict, not an append.
    let other = register(&backbone.client, &b, "order-7", "Grace").send().await.unwrap();
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // Keys belong to their caller: another caller's "order-7" is a request of its own.
    let stranger = common::client_with_key(&stranger_key);
    let theirs = register(&stranger, &a, "order-7", "Ada").send().await.unwrap();
    assert_eq!(theirs.status(), StatusCode::ACCEPTED);
    assert!(!replayed(&theirs));
    assert_eq!(backbone.records().await, before + 2);
}

/// A writer that dies mid-request: its log appends (or not), then never answers again.
struct DyingLog {
    inner: Arc<dyn EventLog>,
    appends_before_dying: bool,
    appended: Mutex<Option<Appended>>,
    dying: Notify,
}

impl DyingLog {
    async fn append_then_die(&self, request: AppendRequest) -> Result<Appended, LogError> {
        if self.appends_before_dying {
            *self.appended.lock().unwrap() = Some(self.inner.append(request).await?);
        }
        self.dying.notify_one();
        std::future::pending().await
    }
}

callisto_core::event_log_decorator!(DyingLog, inner, |log, request| log.append_then_die(request).await);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_writer_died_mid_request_appends_exactly_once() {
    // Claims settle once the producer's delivery timeout has surely passed: 1.5 s + 1 s here.
    let backbone = backbone(|s| {
        s.kafka.message_timeout_ms = 1_500;
        s.kafka.request_timeout_ms = 1_000;
        s.log.append_timeout_ms = 2_000;
    })
    .await;
    let (survivor, _survivor) =
        writer(&backbone.settings, &backbone.side, backbone.new_kafka_log(), backbone.claims.clone()).await;

    for appends_before_dying in [true, false] {
        let key = format!("dies-{appends_before_dying}");
        let dying = Arc::new(DyingLog {
            inner: backbone.side.log.clone(),
            appends_before_dying,
            appended: Mutex::new(None),
            dying: Notify::new(),
        });
        let (doomed, server) = writer(&backbone.settings, &backbone.side, dying.clone(), backbone.claims.clone()).await;
        let before = backbone.records().await;
        let request = tokio::spawn(register(&backbone.client, &doomed, &key, "Lin").send());
        dying.dying.notified().await;
        server.abort();
        request.abort();
        let died_at = tokio::time::Instant::now();
        assert_eq!(backbone.records().await, before + u64::from(appends_before_dying));

        // The survivor cannot know yet whether the dead writer's append will land: come back.
        let early = register(&backbone.client, &survivor, &key, "Lin").send().await.unwrap();
        assert_eq!(early.status(), StatusCode::CONFLICT, "{}", early.text().await.unwrap());
        assert!(early.headers().get("retry-after").is_some());

        // Once it has settled, the log decides.
        let answer = loop {
            let answer = register(&backbone.client, &survivor, &key, "Lin").send().await.unwrap();
            if answer.status() != StatusCode::CONFLICT {
                break answer;
            }
            assert!(died_at.elapsed() < Duration::from_secs(20), "the claim never settled");
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert_eq!(answer.status(), StatusCode::ACCEPTED);
        assert_eq!(replayed(&answer), appends_before_dying, "replayed exactly when the dead writer had appended");
        let answer: Value = answer.json().await.unwrap();
        if let Some(theirs) = dying.appended.lock().unwrap().take() {
            assert_eq!(
                (answer["partition"].as_u64(), answer["offset"].as_u64()),
                (Some(theirs.partition.into()), Some(theirs.offset))
            );
        }
        assert_eq!(backbone.records().await, before + 1, "appended exactly once");

        let again = register(&backbone.client, &survivor, &key, "Lin").send().await.unwrap();
        assert!(replayed(&again));
        assert_eq!(again.json::<Value>().await.unwrap()["offset"], answer["offset"]);
        assert_eq!(backbone.records().await, before + 1);
    }
}

/// Keys are remembered for the retention and forgotten after it, on both logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_expire_after_the_retention() {
    for on_kafka in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings(dir.path());
        let _cluster = on_kafka.then(|| start_kafka_mock(&mut settings, 1).unwrap());
        settings.log.idempotency_retention_secs = 1;
        let DevApp { dev, base, client } = dev_app(&settings).await;

        let first = register(&client, &base, "once-a-second", "Tim").send().await.unwrap();
        assert_eq!(first.status(), StatusCode::ACCEPTED);
        let first: Value = first.json().await.unwrap();
        let within = register(&client, &base, "once-a-second", "Tim").send().await.unwrap();
        assert!(replayed(&within), "kafka: {on_kafka}");
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        let after = register(&client, &base, "once-a-second", "Tim").send().await.unwrap();
        assert_eq!(after.status(), StatusCode::ACCEPTED);
        assert!(!replayed(&after), "kafka: {on_kafka}: an expired key was replayed");
        let after: Value = after.json().await.unwrap();
        assert_ne!(after["person_id"], first["person_id"]);
        // And the new append holds the key afresh.
        let again = register(&client, &base, "once-a-second", "Tim").send().await.unwrap();
        assert!(replayed(&again), "kafka: {on_kafka}");
        assert_eq!(again.json::<Value>().await.unwrap()["offset"], after["offset"]);
        dev.stop().await.unwrap();
    }
}
