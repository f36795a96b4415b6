//! The command API over real HTTP: each test gets its own server on port 0 and its own data dir.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callisto_avro::{Codec, EmbeddedRegistry, EventKind, PersonEvent};
use callisto_core::config::Settings;
use callisto_core::log::{AppendRequest, Appended, EmbeddedLog, EmbeddedLogOptions, EventLog, LogError, Record};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct TestApp {
    base: String,
    client: reqwest::Client,
    log: Arc<dyn EventLog>,
    codec: Arc<Codec>,
    keyring: Arc<callisto_core::privacy::Keyring>,
    settings: Settings,
    _dir: tempfile::TempDir,
}

async fn spawn_app() -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap());
    let codec = Arc::new(Codec::new(registry, "persons").unwrap());
    let log: Arc<dyn EventLog> =
        Arc::new(EmbeddedLog::open(&dir.path().join("log.redb"), EmbeddedLogOptions::default()).unwrap());
    spawn_with(log, codec, Settings::default(), dir).await
}

async fn spawn_with(
    log: Arc<dyn EventLog>,
    codec: Arc<Codec>,
    mut settings: Settings,
    dir: tempfile::TempDir,
) -> TestApp {
    settings.http.body_limit_bytes = 64 * 1024;
    settings.storage.data_dir = dir.path().to_path_buf();
    // The tests call as an API key with every scope; the guard itself is tested in callisto's
    // route matrix.
    let key = callisto_core::auth::keys::create(
        &settings.auth.api_keys_path(&settings.storage),
        callisto_core::auth::keys::NewKey {
            name: "writer tests".into(),
            scopes: callisto_core::auth::Scope::ALL.into_iter().collect(),
            expires_at: None,
            rate_limit: None,
        },
    )
    .unwrap();
    let auth = callisto_core::auth::Auth::from_settings(&settings, false).await.unwrap();
    let keyring = callisto_core::privacy::open_embedded(dir.path()).unwrap();
    let state = callisto_writers::state(&settings, log.clone(), codec.clone(), keyring.clone(), None).await.unwrap();
    let app = callisto_writers::build(&settings, state, &auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let tls = settings.http.tls.clone();
    tokio::spawn(async move { callisto_core::http::serve(listener, app, &tls, std::future::pending()).await });
    let headers = reqwest::header::HeaderMap::from_iter([(
        reqwest::header::AUTHORIZATION,
        format!("ApiKey {}", key.key).parse().unwrap(),
    )]);
    let client = reqwest::Client::builder().default_headers(headers).build().unwrap();
    TestApp { base, client, log, codec, keyring, settings, _dir: dir }
}

impl TestApp {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        into_parts(request.send().await.unwrap()).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn register(&self) -> String {
        let (status, _, body) = self.post("/v1/persons", json!({"given_name": "Ada", "family_name": "Lovelace"})).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["person_id"].as_str().unwrap().to_owned()
    }

    async fn total_events(&self) -> u64 {
        self.log.end_offsets(&self.settings.log.topic).await.unwrap().iter().sum()
    }

    async fn event_at(&self, body: &Value) -> (Record, PersonEvent) {
        let partition = body["partition"].as_u64().unwrap() as u32;
        let offset = body["offset"].as_u64().unwrap();
        let records = self.log.read("persons", partition, offset, 1, Duration::ZERO).await.unwrap();
        let record = records.into_iter().next().expect("acknowledged event is in the log");
        assert_eq!(record.offset, offset);
        // As written, the personal fields are sealed; opened with the person's key, they are back.
        let (event, sealed) = self.codec.decode_sealed(&record.payload).unwrap();
        assert_eq!(sealed.is_some(), event.carries_personal_data(), "{event:?}");
        let opened = self.keyring.open(event, sealed).await.unwrap();
        assert!(!opened.erased);
        (record, opened.event)
    }
}

async fn into_parts(response: reqwest::Response) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
    (status, headers, body)
}

fn assert_problem(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &Value,
    want: StatusCode,
    field: Option<&str>,
) {
    assert_eq!(status, want, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(body["status"], want.as_u16());
    assert!(body["title"].is_string() && body["detail"].is_string() && body["type"].is_string(), "{body}");
    if let Some(field) = field {
        let fields: Vec<&str> =
            body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
        assert!(fields.contains(&field), "expected field {field} in {body}");
    }
}

#[tokio::test]
async fn register_appends_a_decodable_event_and_answers_with_a_token() {
    let app = spawn_app().await;
    let person_id = "0b8e7a52-2a0e-4d54-9a0e-5d7b6c1f2e11";
    let (status, headers, body) = app
        .post(
            "/v1/persons",
            json!({"person_id": person_id, "given_name": " Ada ", "family_name": "Lovelace", "email": "ada@example.org",
                   "phone": "+44 20 7946 0000", "date_of_birth": "1815-12-10", "tags": ["VIP", "math"],
                   "address": {"line1": "1 Ring Road", "city": "Jovia", "postcode": "J1", "country": "gb"}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["person_id"], person_id);
    let token = format!("{}:{}", body["partition"], body["offset"]);
    assert_eq!(body["consistency_token"], token.as_str());
    assert_eq!(headers["callisto-consistency-token"], token.as_str());
    assert_eq!(headers["location"], format!("/v1/persons/{person_id}").as_str());
    let expected_partition = callisto_core::partition::partition_for(person_id.as_bytes(), 12);
    assert_eq!(body["partition"], expected_partition);

    let (record, event) = app.event_at(&body).await;
    assert_eq!(record.key, person_id.as_bytes());
    assert_eq!(record.header("event_type"), Some(&b"PersonRegistered"[..]));
    assert_eq!(record.header("event_id").unwrap(), body["event_id"].as_str().unwrap().as_bytes());
    assert!(record.header("traceparent").is_some_and(|t| t.len() == 55));
    let PersonEvent::Registered(e) = event else { panic!("wrong event {event:?}") };
    assert_eq!(e.given_name, "Ada", "names are trimmed");
    for clear in ["Lovelace", "ada@", "7946", "Ring Road"] {
        let bytes = clear.as_bytes();
        assert!(!record.payload.windows(bytes.len()).any(|w| w == bytes), "{clear:?} is in the payload in clear");
    }
    let PersonEvent::Registered(as_written) = app.codec.decode(&record.payload).unwrap() else { unreachable!() };
    assert_eq!((as_written.given_name.as_str(), as_written.email), ("", None), "written blank, sealed");
    assert_eq!(e.tags, ["vip", "math"]);
    assert_eq!(e.address.unwrap().country, "GB");
    assert_eq!(e.date_of_birth.unwrap().to_string(), "1815-12-10");
    assert_eq!(e.event_id.to_string(), body["event_id"].as_str().unwrap());
}

#[tokio::test]
async fn every_command_endpoint_appends_its_event_type() {
    let app = spawn_app().await;
    let id = app.register().await;
    let address = json!({"line1": "2 Moon St", "line2": "Apt 9", "city": "Io", "postcode": "IO 1", "country": "SE"});
    let cases: Vec<(reqwest::Method, String, Option<Value>, EventKind)> = vec![
        (
            reqwest::Method::PUT,
            format!("/v1/persons/{id}/name"),
            Some(json!({"given_name": "Augusta", "family_name": "King"})),
            EventKind::PersonRenamed,
        ),
        (
            reqwest::Method::PUT,
            format!("/v1/persons/{id}/contact"),
            Some(json!({"phone": "020 7946 0001"})),
            EventKind::ContactDetailsChanged,
        ),
        (reqwest::Method::PUT, format!("/v1/persons/{id}/address"), Some(address), EventKind::AddressChanged),
        (
            reqwest::Method::POST,
            format!("/v1/persons/{id}/notes"),
            Some(json!({"text": "Met at the\nanalytical engine demo."})),
            EventKind::NoteAdded,
        ),
        (
            reqwest::Method::POST,
            format!("/v1/persons/{id}/tags"),
            Some(json!({"tag": "Engine"})),
            EventKind::PersonTagged,
        ),
        (reqwest::Method::DELETE, format!("/v1/persons/{id}/tags/engine"), None, EventKind::PersonUntagged),
        (
            reqwest::Method::POST,
            format!("/v1/persons/{id}/archive"),
            Some(json!({"reason": "moved away"})),
            EventKind::PersonArchived,
        ),
        (reqwest::Method::POST, format!("/v1/persons/{id}/archive"), Some(json!({})), EventKind::PersonArchived),
        (reqwest::Method::POST, format!("/v1/persons/{id}/archive"), None, EventKind::PersonArchived),
    ];
    let mut last_offset = 0;
    for (method, path, body, kind) in cases {
        let (status, _, answer) = app.send(method, &path, body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{path}: {answer}");
        assert_eq!(answer["person_id"], id.as_str());
        let offset = answer["offset"].as_u64().unwrap();
        assert!(offset > last_offset, "one person's events are ordered in one partition");
        last_offset = offset;
        let (_, event) = app.event_at(&answer).await;
        assert_eq!(event.kind(), kind, "{path}");
        assert_eq!(event.meta().person_id.to_string(), id);
        match event {
            PersonEvent::Tagged(e) | PersonEvent::Untagged(e) => assert_eq!(e.tag, "engine"),
            PersonEvent::NoteAdded(e) => assert!(e.text.contains('\n')),
            PersonEvent::ContactChanged(e) => {
                assert_eq!((e.email, e.phone.as_deref()), (None, Some("020 7946 0001")))
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn bad_input_gets_a_problem_naming_the_field_and_appends_nothing() {
    let app = spawn_app().await;
    let id = app.register().await;
    let before = app.total_events().await;
    let person = |extra: Value| {
        let mut base = json!({"given_name": "Ada", "family_name": "Lovelace"});
        base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        base
    };
    let cases: Vec<(String, Value, StatusCode, &str)> = vec![
        (
            "/v1/persons".into(),
            json!({"given_name": "Ada", "family_name": 7}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "family_name",
        ),
        ("/v1/persons".into(), person(json!({"tags": "vip"})), StatusCode::UNPROCESSABLE_ENTITY, "tags"),
        ("/v1/persons".into(), person(json!({"nickname": "Countess"})), StatusCode::UNPROCESSABLE_ENTITY, "nickname"),
        ("/v1/persons".into(), json!({"given_name": "Ada"}), StatusCode::UNPROCESSABLE_ENTITY, "family_name"),
        (
            "/v1/persons".into(),
            person(json!({"person_id": "not-a-uuid"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "person_id",
        ),
        ("/v1/persons".into(), person(json!({"email": "ada(at)example"})), StatusCode::UNPROCESSABLE_ENTITY, "email"),
        (
            "/v1/persons".into(),
            person(json!({"date_of_birth": "10/12/1815"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "date_of_birth",
        ),
        (
            "/v1/persons".into(),
            person(json!({"date_of_birth": "2999-01-01"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "date_of_birth",
        ),
        (
            "/v1/persons".into(),
            person(json!({"given_name": "x".repeat(201)})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "given_name",
        ),
        ("/v1/persons".into(), person(json!({"given_name": "   "})), StatusCode::UNPROCESSABLE_ENTITY, "given_name"),
        (
            "/v1/persons".into(),
            person(json!({"address": {"line1": "x", "city": "y", "postcode": "z", "country": "Sweden"}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "address.country",
        ),
        (
            "/v1/persons".into(),
            person(json!({"address": {"line1": "x", "city": "y", "country": "SE"}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "address.postcode",
        ),
        ("/v1/persons".into(), person(json!({"tags": ["ok", "not ok"]})), StatusCode::UNPROCESSABLE_ENTITY, "tags[1]"),
        (
            format!("/v1/persons/{id}/notes"),
            json!({"text": "é".repeat(10_001)}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "text",
        ),
        (format!("/v1/persons/{id}/notes"), json!({"text": ""}), StatusCode::UNPROCESSABLE_ENTITY, "text"),
        (format!("/v1/persons/{id}/tags"), json!({"tag": "has space"}), StatusCode::UNPROCESSABLE_ENTITY, "tag"),
        (format!("/v1/persons/{id}/archive"), json!({"reason": 5}), StatusCode::UNPROCESSABLE_ENTITY, "reason"),
        ("/v1/persons/not-a-uuid/notes".into(), json!({"text": "hi"}), StatusCode::BAD_REQUEST, "id"),
    ];
    for (path, body, want, field) in cases {
        let (status, headers, answer) = app.post(&path, body).await;
        assert_problem(status, &headers, &answer, want, Some(field));
    }
    for (path, body, field) in [
        (format!("/v1/persons/{id}/contact"), json!({}), "body"),
        (format!("/v1/persons/{id}/contact"), json!({"email": "nope"}), "email"),
        (format!("/v1/persons/{id}/name"), json!({"given_name": "A"}), "family_name"),
    ] {
        let (status, headers, answer) = app.send(reqwest::Method::PUT, &path, Some(body)).await;
        assert_problem(status, &headers, &answer, StatusCode::UNPROCESSABLE_ENTITY, Some(field));
    }
    let (status, headers, answer) =
        app.send(reqwest::Method::DELETE, &format!("/v1/persons/{id}/tags/-bad"), None).await;
    assert_problem(status, &headers, &answer, StatusCode::UNPROCESSABLE_ENTITY, Some("tag"));

    // Malformed JSON, wrong content type, oversized body: sent raw.
    let raw = |body: &'static str, content_type: Option<&'static str>| {
        let mut request = app.client.post(format!("{}/v1/persons", app.base)).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        request
    };
    let (status, headers, answer) =
        into_parts(raw(r#"{"given_name": "Ada","#, Some("application/json")).send().await.unwrap()).await;
    assert_problem(status, &headers, &answer, StatusCode::BAD_REQUEST, Some("body"));
    let (status, headers, answer) = into_parts(
        raw(r#"{"given_name":"A","family_name":"B"} trailing"#, Some("application/json")).send().await.unwrap(),
    )
    .await;
    assert_problem(status, &headers, &answer, StatusCode::BAD_REQUEST, None);
    let (status, headers, answer) =
        into_parts(raw(r#"{"given_name":"A","family_name":"B"}"#, Some("text/plain")).send().await.unwrap()).await;
    assert_problem(status, &headers, &answer, StatusCode::UNSUPPORTED_MEDIA_TYPE, None);
    let (status, headers, answer) =
        into_parts(raw(r#"{"given_name":"A","family_name":"B"}"#, None).send().await.unwrap()).await;
    assert_problem(status, &headers, &answer, StatusCode::UNSUPPORTED_MEDIA_TYPE, None);
    let huge = format!(r#"{{"text": "{}"}}"#, "a".repeat(100 * 1024));
    let response = app
        .client
        .post(format!("{}/v1/persons/{id}/notes", app.base))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    let (status, headers, answer) = into_parts(response).await;
    assert_problem(status, &headers, &answer, StatusCode::PAYLOAD_TOO_LARGE, None);
    let response = app
        .client
        .post(format!("{}/v1/persons", app.base))
        .json(&json!({"given_name": "A", "family_name": "B"}))
        .header("idempotency-key", "bad key with spaces")
        .send()
        .await
        .unwrap();
    let (status, headers, answer) = into_parts(response).await;
    assert_problem(status, &headers, &answer, StatusCode::BAD_REQUEST, Some("Idempotency-Key"));

    assert_eq!(app.total_events().await, before, "no rejected command was appended");
}

#[tokio::test]
async fn an_idempotency_key_makes_retries_safe() {
    let app = spawn_app().await;
    let send = |body: Value| {
        app.client.post(format!("{}/v1/persons", app.base)).header("idempotency-key", "signup-7f3a").json(&body).send()
    };
    let body = json!({"given_name": "Grace", "family_name": "Hopper"});
    let (s1, h1, first) = into_parts(send(body.clone()).await.unwrap()).await;
    let (s2, h2, second) = into_parts(send(body.clone()).await.unwrap()).await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(first, second, "a retry gets the same answer, generated ids included");
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(app.total_events().await, 1, "nothing appended twice");
    let (status, headers, answer) =
        into_parts(send(json!({"given_name": "Grace", "family_name": "Brewster"})).await.unwrap()).await;
    assert_problem(status, &headers, &answer, StatusCode::UNPROCESSABLE_ENTITY, Some("Idempotency-Key"));
    assert_eq!(app.total_events().await, 1);
}

#[tokio::test]
async fn service_endpoints_are_served() {
    let app = spawn_app().await;
    app.register().await;
    let (status, _, health) = app.send(reqwest::Method::GET, "/healthz", None).await;
    assert_eq!((status, health["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (status, _, _) = app.send(reqwest::Method::GET, "/readyz", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, doc) = app.send(reqwest::Method::GET, "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    for path in ["/v1/persons", "/v1/persons/{id}/notes", "/v1/persons/{id}/tags/{tag}", "/v1/persons/{id}/archive"] {
        assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
    }
    assert!(doc["components"]["schemas"]["RegisterPerson"].is_object());
    let metrics = app.client.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"callisto_commands_total{command="PersonRegistered",outcome="accepted"}"#), "{metrics}");
    assert!(metrics.contains("callisto_append_seconds_bucket"), "{metrics}");
    let (status, headers, body) = app.send(reqwest::Method::GET, "/nope", None).await;
    assert_problem(status, &headers, &body, StatusCode::NOT_FOUND, None);
    let (status, headers, body) = app.send(reqwest::Method::GET, "/v1/persons", None).await;
    assert_problem(status, &headers, &body, StatusCode::METHOD_NOT_ALLOWED, None);
}

/// A log that never answers, or always fails: the writer must answer 503 promptly.
struct BrokenLog {
    hang: bool,
}

#[async_trait]
impl EventLog for BrokenLog {
    async fn ensure_topic(&self, _: &str, _: u32) -> Result<(), LogError> {
        Ok(())
    }
    async fn partitions(&self, _: &str) -> Result<u32, LogError> {
        Ok(12)
    }
    async fn append(&self, _: AppendRequest) -> Result<Appended, LogError> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        Err(LogError::Unavailable("disk on fire".into()))
    }
    async fn read(&self, _: &str, _: u32, _: u64, _: usize, _: Duration) -> Result<Vec<Record>, LogError> {
        Err(LogError::Unavailable("disk on fire".into()))
    }
    async fn end_offsets(&self, _: &str) -> Result<Vec<u64>, LogError> {
        Ok(vec![0; 12])
    }
    async fn offsets_for_timestamp(&self, _: &str, _: i64) -> Result<Vec<Option<u64>>, LogError> {
        Ok(vec![None; 12])
    }
    async fn commit_offsets(&self, _: &str, _: &str, _: &[(u32, u64)]) -> Result<(), LogError> {
        Ok(())
    }
    async fn committed_offsets(&self, _: &str, _: &str) -> Result<Vec<(u32, u64)>, LogError> {
        Ok(vec![])
    }
    async fn delete_records(&self, _: &str, _: u32, _: u64) -> Result<(), LogError> {
        Err(LogError::Unavailable("disk on fire".into()))
    }
    async fn health(&self) -> Result<(), LogError> {
        Err(LogError::Unavailable("disk on fire".into()))
    }
}

async fn spawn_broken(hang: bool) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap());
    let codec = Arc::new(Codec::new(registry, "persons").unwrap());
    let mut settings = Settings::default();
    settings.log.append_timeout_ms = 1_000;
    spawn_with(Arc::new(BrokenLog { hang }), codec, settings, dir).await
}

#[tokio::test]
async fn an_unavailable_log_gets_a_prompt_503_with_retry_after() {
    for hang in [false, true] {
        let app = spawn_broken(hang).await;
        let body = json!({"given_name": "Ada", "family_name": "Lovelace"});
        let mut slowest = Duration::ZERO;
        for _ in 0..8 {
            let started = Instant::now();
            let (status, headers, answer) = app.post("/v1/persons", body.clone()).await;
            slowest = slowest.max(started.elapsed());
            assert_problem(status, &headers, &answer, StatusCode::SERVICE_UNAVAILABLE, None);
            assert_eq!(headers["retry-after"], "1");
        }
        // Bounded by the 1 s append timeout, not by the hang; the breaker then answers at once.
        assert!(slowest < Duration::from_secs(4), "hang={hang}: a 503 took {slowest:?}");
        let started = Instant::now();
        let (status, _, answer) = app.post("/v1/persons", body.clone()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(answer["detail"].as_str().unwrap().contains("refused until it recovers"), "breaker is open: {answer}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "an open breaker answers without waiting for the 1 s timeout"
        );
        let (status, _, _) = app.send(reqwest::Method::GET, "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
