//! Trust at the edge: every operation in every served OpenAPI document refuses callers without
//! valid credentials or without its scope; JWKS rotation; rate limits; TLS and mTLS.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callisto::services::Dev;
use callisto_core::auth::Auth;
use callisto_core::config::{Limit, Settings};
use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;
use common::jwt::{self, SigningKey};

/// Settings trusting tokens signed by `key`, with the anonymous budget raised: the matrix
/// sends hundreds of bad requests from one address on purpose.
fn secure_settings(dir: &Path, key: &SigningKey) -> Settings {
    let mut settings = common::settings(dir);
    std::fs::create_dir_all(dir).unwrap();
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, jwt::jwks(&[key]).to_string()).unwrap();
    jwt::trust_file(&mut settings, &jwks);
    settings.auth.limits.anonymous = Limit { per_second: 10_000, burst: 10_000 };
    settings
}

async fn serve(app: axum::Router, settings: &Settings) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if settings.http.tls.enabled() { "https" } else { "http" };
    let base = format!("{scheme}://{}", listener.local_addr().unwrap());
    let tls = settings.http.tls.clone();
    tokio::spawn(async move { callisto_core::http::serve(listener, app, &tls, std::future::pending()).await });
    base
}

async fn serve_writer(settings: &Settings) -> String {
    let auth = Auth::from_settings(settings, false).await.unwrap();
    let side = callisto::backends::open_log(settings).await.unwrap();
    let state = callisto_writers::state(settings, side.log.clone(), side.codec.clone(), side.keyring.clone(), None)
        .await
        .unwrap();
    serve(callisto_writers::build(settings, state, &auth), settings).await
}

async fn serve_query_api(settings: &Settings) -> String {
    let auth = Auth::from_settings(settings, false).await.unwrap();
    let read = callisto::backends::open_configured_read_models(settings, callisto::backends::ReadModelUse::Serving)
        .await
        .unwrap();
    let state = callisto_query_api::QueryState {
        store: read.store,
        search: read.search,
        partitions: settings.log.partitions,
        consistency_wait: Duration::from_secs(5),
    };
    serve(callisto_query_api::build(state, &settings.http, &auth), settings).await
}

/// The scope this test expects each route group to need, written down independently of the
/// code under test.
fn expected_scope(method: &str, path: &str) -> &'static str {
    match (method, path) {
        (_, p) if p.starts_with("/admin/") => "admin",
        ("get", "/v1/search") => "search",
        ("get", _) => "persons:read",
        ("delete", "/v1/persons/{id}") => "persons:erase",
        _ => "persons:write",
    }
}

/// A request for `method path` with its normal answers, for a service where `person` exists.
struct Call {
    path: String,
    body: Option<Value>,
    normal: &'static [u16],
}

fn fixture(method: &str, template: &str, person: &str, person_readable: bool) -> Option<Call> {
    let read: &'static [u16] = if person_readable { &[200] } else { &[404] };
    let call = |path: String, body: Option<Value>, normal: &'static [u16]| Some(Call { path, body, normal });
    match (method, template) {
        ("post", "/v1/persons") => call(template.into(), Some(json!({"given_name": "M", "family_name": "X"})), &[202]),
        ("put", "/v1/persons/{id}/name") => {
            call(format!("/v1/persons/{person}/name"), Some(json!({"given_name": "Ma", "family_name": "Trix"})), &[202])
        }
        ("put", "/v1/persons/{id}/contact") => {
            call(format!("/v1/persons/{person}/contact"), Some(json!({"email": "m@example.org"})), &[202])
        }
        ("put", "/v1/persons/{id}/address") => call(
            format!("/v1/persons/{person}/address"),
            Some(json!({"line1": "1 Way", "city": "Oslo", "postcode": "0150", "country": "NO"})),
            &[202],
        ),
        ("post", "/v1/persons/{id}/notes") => {
            call(format!("/v1/persons/{person}/notes"), Some(json!({"text": "matrix"})), &[202])
        }
        ("post", "/v1/persons/{id}/tags") => {
            call(format!("/v1/persons/{person}/tags"), Some(json!({"tag": "matrix"})), &[202])
        }
        ("delete", "/v1/persons/{id}/tags/{tag}") => call(format!("/v1/persons/{person}/tags/matrix"), None, &[202]),
        ("post", "/v1/persons/{id}/archive") => call(format!("/v1/persons/{person}/archive"), None, &[202]),
        // Someone else: the matrix's person must stay writable for the other commands.
        ("delete", "/v1/persons/{id}") => call(format!("/v1/persons/{}", uuid::Uuid::new_v4()), None, &[202]),
        ("get", "/v1/persons") => call("/v1/persons?limit=5".into(), None, &[200]),
        ("get", "/v1/persons/{id}") => call(format!("/v1/persons/{person}"), None, read),
        ("get", "/v1/persons/{id}/timeline") => call(format!("/v1/persons/{person}/timeline"), None, &[200]),
        ("get", "/v1/search") => call("/v1/search?q=matrix".into(), None, &[200]),
        // A rebuild may already run, or a previous generation be kept: 409 is a normal answer.
        ("post", "/admin/v1/replay") => call(template.into(), None, &[202, 409]),
        ("get", "/admin/v1/replay") => call(template.into(), None, &[200]),
        ("post", "/admin/v1/replay/rollback") => call(template.into(), None, &[200, 409]),
        ("post", "/admin/v1/replay/drop-old") => call(template.into(), None, &[200, 409]),
        ("get", "/admin/v1/export") => call("/admin/v1/export?format=jsonl".into(), None, &[200]),
        ("get", "/admin/v1/dlq") => call(template.into(), None, &[200]),
        ("get", "/admin/v1/dlq/{id}") => call("/admin/v1/dlq/0:0".into(), None, &[404]),
        ("post", "/admin/v1/dlq/replay") => call(template.into(), Some(json!({"ids": []})), &[200]),
        ("post", "/admin/v1/dlq/purge") => call(template.into(), None, &[200]),
        ("post", "/admin/v1/compact") => call(template.into(), None, &[200]),
        _ => None,
    }
}

/// Every (method, path, scopes declared) of a served document.
async fn operations(client: &reqwest::Client, base: &str, admin_token: &str) -> Vec<(String, String, Vec<String>)> {
    let anonymous = client.get(format!("{base}/openapi.json")).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED, "the document itself needs credentials");
    let doc: Value =
        client.get(format!("{base}/openapi.json")).bearer_auth(admin_token).send().await.unwrap().json().await.unwrap();
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object(), "bearer scheme declared");
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object(), "api key scheme declared");
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let scopes: BTreeSet<String> = operation["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{method} {path} declares no security"))
                .iter()
                .flat_map(|req| req.as_object().unwrap().values())
                .flat_map(|scopes| scopes.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()))
                .collect();
            out.push((method.clone(), path.clone(), scopes.into_iter().collect()));
        }
    }
    out
}

/// Request headers that carry (or fail to carry) credentials.
type Credentials<'a> = Vec<(&'a str, String)>;

struct Matrix<'a> {
    client: reqwest::Client,
    base: String,
    trusted: &'a SigningKey,
    revoked_key: String,
    person: String,
    person_readable: bool,
}

impl Matrix<'_> {
    async fn send(&self, method: &str, call: &Call, credentials: &[(&str, String)]) -> (StatusCode, reqwest::Response) {
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let mut request = self.client.request(method, format!("{}{}", self.base, call.path));
        for (name, value) in credentials {
            request = request.header(*name, value);
        }
        if let Some(body) = &call.body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        (response.status(), response)
    }

    /// Walks every operation with every kind of caller; returns how many operations it covered.
    async fn run(&self, admin_token: &str) -> usize {
        let ops = operations(&self.client, &self.base, admin_token).await;
        assert!(!ops.is_empty());
        let impostor = SigningKey::generate(&self.trusted.kid);
        for (method, path, scopes) in &ops {
            assert_eq!(scopes, &vec![expected_scope(method, path).to_owned()], "{method} {path}: declared scopes");
            let call = fixture(method, path, &self.person, self.person_readable)
                .unwrap_or_else(|| panic!("{method} {path} is served but missing from the route matrix"));
            let scope = scopes[0].as_str();
            let others: Vec<&str> =
                callisto_core::auth::Scope::ALL.iter().map(|s| s.name()).filter(|s| *s != scope).collect();
            let mut expired = jwt::claims("matrix", &[scope]);
            expired["exp"] = json!(jwt::now() - 3600);
            let mut wrong_audience = jwt::claims("matrix", &[scope]);
            wrong_audience["aud"] = json!("someone-else");
            let bearer = |token: String| vec![("authorization", format!("Bearer {token}"))];
            let refused: Vec<(&str, Credentials, StatusCode)> = vec![
                ("no credentials", vec![], StatusCode::UNAUTHORIZED),
                ("malformed header", vec![("authorization", "Bearer".into())], StatusCode::UNAUTHORIZED),
                ("bad signature", bearer(impostor.token("matrix", &[scope])), StatusCode::UNAUTHORIZED),
                ("expired token", bearer(self.trusted.sign(&expired)), StatusCode::UNAUTHORIZED),
                ("wrong audience", bearer(self.trusted.sign(&wrong_audience)), StatusCode::UNAUTHORIZED),
                ("revoked key", vec![("x-api-key", self.revoked_key.clone())], StatusCode::UNAUTHORIZED),
                ("without the scope", bearer(self.trusted.token("matrix", &others)), StatusCode::FORBIDDEN),
            ];
            for (case, credentials, want) in refused {
                let (status, response) = self.send(method, &call, &credentials).await;
                assert_eq!(status, want, "{method} {path} with {case}");
                let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
                assert!(content_type.starts_with("application/problem+json"), "{method} {path} {case}: {content_type}");
                if want == StatusCode::UNAUTHORIZED {
                    assert!(response.headers().contains_key("www-authenticate"), "{method} {path} {case}");
                }
                let body = response.text().await.unwrap();
                for secret in ["signature", "expired", "audience", "revoked"] {
                    assert!(!body.to_lowercase().contains(secret), "{case}: the body says which check failed: {body}");
                }
            }
            let (status, response) = self.send(method, &call, &bearer(self.trusted.token("matrix", &[scope]))).await;
            let body = response.text().await.unwrap();
            assert!(call.normal.contains(&status.as_u16()), "{method} {path} with its scope: {status} {body}");
        }
        ops.len()
    }
}

/// A key with every scope, revoked, once the service has seen it revoked.
async fn revoked_key(settings: &Settings, client: &reqwest::Client, probe: &str) -> String {
    let created = callisto::keys::create(
        settings,
        "to revoke".into(),
        callisto_core::auth::Scope::ALL.into_iter().collect(),
        None,
        None,
    )
    .unwrap();
    callisto::keys::revoke(settings, &created.stored.id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = client.get(probe).header("x-api-key", &created.key).send().await.unwrap().status();
        if status == StatusCode::UNAUTHORIZED {
            return created.key;
        }
        assert!(Instant::now() < deadline, "the revocation was never picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The matrix on the service at `base`, with a key revoked on it first.
async fn run_matrix(
    client: &reqwest::Client,
    base: &str,
    settings: &Settings,
    trusted: &SigningKey,
    person: &str,
    person_readable: bool,
    admin_token: &str,
) -> usize {
    let revoked_key = revoked_key(settings, client, &format!("{base}/v1/persons")).await;
    let matrix = Matrix {
        client: client.clone(),
        base: base.to_owned(),
        trusted,
        revoked_key,
        person: person.to_owned(),
        person_readable,
    };
    matrix.run(admin_token).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_of_dev_writer_and_query_api_refuses_bad_callers() {
    let root = tempfile::tempdir().unwrap();
    let key = SigningKey::generate("matrix-key");
    let client = reqwest::Client::new();
    let admin = key.token("admin", &["admin"]);

    // dev: writer, query API and admin API on one listener.
    let settings = secure_settings(&root.path().join("dev"), &key);
    let dev = Dev::start(&settings, tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).await.unwrap();
    let base = format!("http://{}", dev.addr);
    let writer_token = key.token("setup", &["persons:write", "persons:read"]);
    let register = client.post(format!("{base}/v1/persons")).bearer_auth(&writer_token);
    let person = common::json_of(register.json(&json!({"given_name": "Mat", "family_name": "Rix"}))).await;
    let id = person["person_id"].as_str().unwrap().to_owned();
    let visible = client
        .get(format!("{base}/v1/persons/{id}?after={}", person["consistency_token"].as_str().unwrap()))
        .bearer_auth(&writer_token)
        .send()
        .await
        .unwrap();
    assert_eq!(visible.status(), StatusCode::OK);
    let covered = run_matrix(&client, &base, &settings, &key, &id, true, &admin).await;
    assert_eq!(covered, 23, "dev serves 9 commands (erasure among them), 4 reads and 10 admin operations");

    // What no document lists: health is open, metrics needs admin or metrics, unknown routes
    // say nothing to strangers.
    let get = |path: &str, token: Option<&str>| {
        let request = client.get(format!("{base}{path}"));
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(get("/healthz", None).await, StatusCode::OK);
    assert_eq!(get("/readyz", None).await, StatusCode::OK);
    assert_eq!(get("/metrics", None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(get("/metrics", Some(&key.token("reader", &["persons:read"]))).await, StatusCode::FORBIDDEN);
    assert_eq!(get("/metrics", Some(&key.token("prometheus", &["metrics"]))).await, StatusCode::OK);
    assert_eq!(get("/metrics", Some(&admin)).await, StatusCode::OK);
    assert_eq!(get("/no/such/route", None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(get("/no/such/route", Some(&admin)).await, StatusCode::NOT_FOUND);
    let wrong_method = client.patch(format!("{base}/v1/persons")).send().await.unwrap();
    assert_eq!(wrong_method.status(), StatusCode::UNAUTHORIZED, "a wrong method tells strangers nothing either");
    let refused = client.post(format!("{base}/admin/v1/dlq/purge")).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "the purge from the issue's report");
    dev.stop().await.unwrap();

    // The writer and the query API as separate services.
    let settings = secure_settings(&root.path().join("writer"), &key);
    let base = serve_writer(&settings).await;
    assert_eq!(run_matrix(&client, &base, &settings, &key, &id, false, &admin).await, 9);

    let settings = secure_settings(&root.path().join("query"), &key);
    let base = serve_query_api(&settings).await;
    assert_eq!(run_matrix(&client, &base, &settings, &key, &id, false, &admin).await, 4);
}

#[tokio::test]
async fn tokens_alg_none_and_hmac_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate("k1");
    let settings = secure_settings(dir.path(), &key);
    let base = serve_query_api(&settings).await;
    let client = reqwest::Client::new();
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let claims = jwt::claims("mallory", &["persons:read"]);
    let none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT", "kid": "k1"})), b64(&claims));
    // HS256 keyed with the public key's JWK text: the classic RSA/EC-to-HMAC confusion.
    let hmac = jsonwebtoken::encode(
        &jsonwebtoken::Header { kid: Some("k1".into()), ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256) },
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key.jwk().to_string().as_bytes()),
    )
    .unwrap();
    for token in [none, hmac] {
        let status = client.get(format!("{base}/v1/persons")).bearer_auth(&token).send().await.unwrap().status();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let good = client.get(format!("{base}/v1/persons")).bearer_auth(key.token("alice", &["persons:read"]));
    assert_eq!(good.send().await.unwrap().status(), StatusCode::OK);
    // `nbf` in the future is refused; `exp` just past, within the leeway, is still accepted.
    let mut early = jwt::claims("alice", &["persons:read"]);
    early["nbf"] = json!(jwt::now() + 3600);
    let mut skewed = jwt::claims("alice", &["persons:read"]);
    skewed["exp"] = json!(jwt::now() - 5);
    let mut no_subject = jwt::claims("alice", &["persons:read"]);
    no_subject.as_object_mut().unwrap().remove("sub");
    for (claims, want) in
        [(early, StatusCode::UNAUTHORIZED), (skewed, StatusCode::OK), (no_subject, StatusCode::UNAUTHORIZED)]
    {
        let answer = client.get(format!("{base}/v1/persons")).bearer_auth(key.sign(&claims)).send().await.unwrap();
        assert_eq!(answer.status(), want, "{claims}");
    }
}

#[tokio::test]
async fn a_service_without_authentication_refuses_to_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let settings = common::settings(dir.path());
    let err = Auth::from_settings(&settings, false).await.err().expect("no authentication configured");
    let message = format!("{err:#}");
    assert!(message.contains("auth.jwt.issuer") && message.contains("--insecure-no-auth"), "{message}");
    assert!(Auth::from_settings(&settings, true).await.is_ok(), "the explicit flag runs open");
}

/// A JWKS server whose key set the test changes, and which it can take down.
struct JwksServer {
    url: String,
    /// The server's base URL, which is also its OIDC issuer.
    issuer: String,
    keys: Arc<Mutex<Value>>,
    up: Arc<std::sync::atomic::AtomicBool>,
    fetches: Arc<std::sync::atomic::AtomicUsize>,
}

async fn jwks_server(initial: Value) -> JwksServer {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let keys = Arc::new(Mutex::new(initial));
    let up = Arc::new(AtomicBool::new(true));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (k, u, f) = (keys.clone(), up.clone(), fetches.clone());
    let discovery = Arc::new(Mutex::new(String::new()));
    let document = discovery.clone();
    let app = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            axum::routing::get(move || {
                let document = document.clone();
                async move { document.lock().unwrap().clone() }
            }),
        )
        .route(
            "/jwks",
            axum::routing::get(move || {
                let (k, u, f) = (k.clone(), u.clone(), f.clone());
                async move {
                    f.fetch_add(1, Ordering::SeqCst);
                    if !u.load(Ordering::SeqCst) {
                        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, String::new());
                    }
                    (axum::http::StatusCode::OK, k.lock().unwrap().to_string())
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let url = format!("{issuer}/jwks");
    *discovery.lock().unwrap() = json!({"issuer": issuer, "jwks_uri": url}).to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    JwksServer { url, issuer, keys, up, fetches }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_are_picked_up_and_cached_keys_survive_a_jwks_outage() {
    use std::sync::atomic::Ordering;
    let old = SigningKey::generate("2026-old");
    let new = SigningKey::generate("2026-new");
    let server = jwks_server(jwt::jwks(&[&old])).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(dir.path());
    settings.auth.jwt.issuer = Some(jwt::ISSUER.into());
    settings.auth.jwt.audience = vec![jwt::AUDIENCE.into()];
    settings.auth.jwt.jwks_url = Some(server.url.clone());
    settings.auth.jwt.jwks_min_refetch_ms = 1_000;
    settings.auth.jwt.timeout_ms = 1_000;
    let base = serve_query_api(&settings).await;
    let client = reqwest::Client::new();
    let status = |token: String| {
        let request = client.get(format!("{base}/v1/persons")).bearer_auth(token);
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(status(old.token("a", &["persons:read"])).await, StatusCode::OK);
    assert_eq!(status(new.token("a", &["persons:read"])).await, StatusCode::UNAUTHORIZED, "not published yet");

    // The provider rotates: the new key appears; no restart.
    *server.keys.lock().unwrap() = jwt::jwks(&[&old, &new]);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(status(new.token("a", &["persons:read"])).await, StatusCode::OK, "rotated key accepted");

    // A flood of unknown key ids refetches at most once per floor.
    let before = server.fetches.load(Ordering::SeqCst);
    let stranger = SigningKey::generate("made-up");
    for _ in 0..20 {
        assert_eq!(status(stranger.token("a", &["persons:read"])).await, StatusCode::UNAUTHORIZED);
    }
    let refetches = server.fetches.load(Ordering::SeqCst) - before;
    assert!(refetches <= 2, "{refetches} fetches for 20 unknown kids within the floor");

    // The provider goes down: cached keys keep working.
    server.up.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(status(stranger.token("a", &["persons:read"])).await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(status(old.token("a", &["persons:read"])).await, StatusCode::OK);
    assert_eq!(status(new.token("a", &["persons:read"])).await, StatusCode::OK);
}

#[tokio::test]
async fn a_burst_over_a_keys_budget_is_limited_and_other_keys_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let settings = common::settings(dir.path());
    let scopes: BTreeSet<_> = [callisto_core::auth::Scope::PersonsRead].into_iter().collect();
    let limited = Limit { per_second: 1, burst: 3 };
    let small = callisto::keys::create(&settings, "small".into(), scopes.clone(), None, Some(limited)).unwrap();
    let other = callisto::keys::create(&settings, "other".into(), scopes, None, None).unwrap();
    let base = serve_query_api(&settings).await;
    let client = reqwest::Client::new();
    let get = |key: &str| client.get(format!("{base}/v1/persons")).header("x-api-key", key).send();
    for remaining in [2, 1, 0] {
        let answer = get(&small.key).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.headers()["ratelimit-limit"], "3");
        assert_eq!(answer.headers()["ratelimit-remaining"], remaining.to_string().as_str());
    }
    let limited = get(&small.key).await.unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(limited.headers()["ratelimit-remaining"], "0");
    assert!(limited.headers()["content-type"].to_str().unwrap().starts_with("application/problem+json"));
    for _ in 0..10 {
        assert_eq!(get(&other.key).await.unwrap().status(), StatusCode::OK, "another key in the same second");
    }
}

#[tokio::test]
async fn anonymous_callers_are_limited_per_source_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(dir.path());
    settings.auth.limits.anonymous = Limit { per_second: 1, burst: 5 };
    callisto::keys::ensure_dev_key(&settings).unwrap();
    let base = serve_query_api(&settings).await;
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(client.get(format!("{base}/v1/persons")).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses[..5], [401; 5]);
    assert_eq!(statuses[7], 429, "{statuses:?}");
    let key = common::api_key(dir.path());
    let keyed = client.get(format!("{base}/v1/persons")).header("x-api-key", key).send().await.unwrap();
    assert_eq!(keyed.status(), StatusCode::OK, "a caller with credentials has its own budget");
}

#[tokio::test]
async fn tls_serves_https_refuses_plain_http_and_enforces_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::tls::generate(dir.path());
    let mut settings = common::settings(dir.path());
    settings.http.tls.cert_file = Some(pki.server_cert.clone());
    settings.http.tls.key_file = Some(pki.server_key.clone());
    let key = common::api_key(dir.path());
    let base = serve_query_api(&settings).await;
    assert!(base.starts_with("https://"));
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let https = reqwest::Client::builder().add_root_certificate(ca.clone()).build().unwrap();
    let answer = https.get(format!("{base}/v1/persons")).header("x-api-key", &key).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.headers()["x-content-type-options"], "nosniff");
    assert_eq!(answer.headers()["cache-control"], "no-store");

    let plain = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let attempt = plain.get(base.replace("https://", "http://") + "/healthz").send().await;
    assert!(attempt.is_err(), "plain HTTP to a TLS listener gets no answer: {attempt:?}");
    let still = https.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(still.status(), StatusCode::OK, "the listener survives a plain HTTP client");

    // mTLS: a client certificate from the configured CA is required.
    settings.http.tls.client_ca_file = Some(pki.ca_file.clone());
    settings.storage.data_dir = dir.path().join("mtls");
    let key = common::api_key(&settings.storage.data_dir);
    let base = serve_query_api(&settings).await;
    let anonymous = https.get(format!("{base}/healthz")).send().await;
    assert!(anonymous.is_err(), "a client without a certificate is refused: {anonymous:?}");
    let identity = reqwest::Identity::from_pem(&pki.client_identity).unwrap();
    let with_cert = reqwest::Client::builder().add_root_certificate(ca).identity(identity).build().unwrap();
    let answer = with_cert.get(format!("{base}/v1/persons")).header("x-api-key", &key).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
}

fn callisto(args: &[&str], data_dir: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_callisto"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("CALLISTO__TELEMETRY__LOG_LEVEL", "warn")
        .output()
        .unwrap()
}

#[test]
fn services_without_authentication_refuse_to_start_unless_told_to_run_open() {
    let dir = tempfile::tempdir().unwrap();
    for service in ["writer", "query-api", "projector"] {
        let output = callisto(&[service, "--listen", "127.0.0.1:0"], dir.path());
        assert!(!output.status.success(), "{service} started with no authentication");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("auth.jwt.issuer") && stderr.contains("auth.api_keys_file"), "{stderr}");
    }
    // With the flag it runs, and says at start that it is open.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_callisto"))
        .args(["writer", "--listen", "127.0.0.1:0", "--insecure-no-auth", "--data-dir"])
        .arg(dir.path())
        .env("CALLISTO__TELEMETRY__LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert!(line.contains("listening on http://"), "{line}");
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--insecure-no-auth"), "the open start is logged: {stderr}");
}

#[tokio::test]
async fn keys_are_created_shown_once_listed_without_secrets_and_revoked_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let created = callisto(
        &["keys", "create", "--name", "crm", "--scopes", "persons:read,search", "--rate-per-second", "5", "--json"],
        dir.path(),
    );
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let created: Value = serde_json::from_slice(&created.stdout).unwrap();
    let (key, id) = (created["key"].as_str().unwrap().to_owned(), created["id"].as_str().unwrap().to_owned());
    assert_eq!(created["scopes"], json!(["persons:read", "search"]));
    let bad_scope = callisto(&["keys", "create", "--name", "x", "--scopes", "persons:delete"], dir.path());
    assert!(!bad_scope.status.success(), "an unknown scope is refused");

    let listed = callisto(&["keys", "list", "--json"], dir.path());
    let listed_text = String::from_utf8_lossy(&listed.stdout).into_owned();
    let secret = key.splitn(3, '_').nth(2).unwrap();
    assert!(!listed_text.contains(secret), "list never shows a key");
    let listed: Value = serde_json::from_str(&listed_text).unwrap();
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["rate_limit"], json!({"per_second": 5, "burst": 10}));
    assert_eq!(listed[0]["usable"], true);
    assert!(!std::fs::read_to_string(dir.path().join("api-keys.json")).unwrap().contains(secret));

    let settings = common::settings(dir.path());
    let base = serve_query_api(&settings).await;
    let client = reqwest::Client::new();
    let get = || client.get(format!("{base}/v1/search?q=x")).header("authorization", format!("ApiKey {key}")).send();
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);
    let timeline = client.get(format!("{base}/v1/persons/{}/timeline", uuid::Uuid::new_v4())).header("x-api-key", &key);
    assert_eq!(timeline.send().await.unwrap().status(), StatusCode::OK, "persons:read covers timelines");

    let revoked = callisto(&["keys", "revoke", &id], dir.path());
    assert!(revoked.status.success());
    let audit = String::from_utf8_lossy(&revoked.stderr);
    assert!(audit.contains("keys.revoke") && !audit.contains(secret), "one audit line, no secret: {audit}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get().await.unwrap().status() != StatusCode::UNAUTHORIZED {
        assert!(Instant::now() < deadline, "the running service never saw the revocation");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn oidc_discovery_finds_the_jwks() {
    let key = SigningKey::generate("discovered");
    let server = jwks_server(jwt::jwks(&[&key])).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(dir.path());
    settings.auth.jwt.issuer = Some(server.issuer.clone());
    settings.auth.jwt.audience = vec![jwt::AUDIENCE.into()];
    settings.auth.jwt.discovery = true;
    let base = serve_query_api(&settings).await;
    let mut claims = jwt::claims("oidc-user", &["persons:read"]);
    claims["iss"] = json!(server.issuer);
    let answer = reqwest::Client::new().get(format!("{base}/v1/persons")).bearer_auth(key.sign(&claims)).send();
    assert_eq!(answer.await.unwrap().status(), StatusCode::OK);
    let foreign = key.token("oidc-user", &["persons:read"]);
    let refused = reqwest::Client::new().get(format!("{base}/v1/persons")).bearer_auth(foreign).send();
    assert_eq!(refused.await.unwrap().status(), StatusCode::UNAUTHORIZED, "another issuer's token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = common::tls::generate(&dir.path().join("first"));
    let renewed = common::tls::generate(&dir.path().join("renewed"));
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let (cert, key) = (live.join("tls.pem"), live.join("tls.key"));
    std::fs::copy(&first.server_cert, &cert).unwrap();
    std::fs::copy(&first.server_key, &key).unwrap();
    let mut settings = common::settings(dir.path());
    settings.http.tls.cert_file = Some(cert.clone());
    settings.http.tls.key_file = Some(key.clone());
    settings.http.tls.reload_secs = 1;
    common::api_key(dir.path());
    let base = serve_query_api(&settings).await;
    let trusting = |pki: &common::tls::Pki| {
        let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
        reqwest::Client::builder().add_root_certificate(ca).pool_max_idle_per_host(0).build().unwrap()
    };
    assert!(trusting(&first).get(format!("{base}/healthz")).send().await.is_ok());
    assert!(trusting(&renewed).get(format!("{base}/healthz")).send().await.is_err(), "not renewed yet");

    // Renewal writes the key first and the certificate last, as certificate tools do.
    std::fs::copy(&renewed.server_key, &key).unwrap();
    std::fs::copy(&renewed.server_cert, &cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while trusting(&renewed).get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the renewed certificate was never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(trusting(&first).get(format!("{base}/healthz")).send().await.is_err(), "the old one is gone");
}

#[tokio::test]
async fn cors_answers_only_configured_origins() {
    let preflight = |base: String| async move {
        reqwest::Client::new()
            .request(reqwest::Method::OPTIONS, format!("{base}/v1/persons"))
            .header("origin", "https://app.example")
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
            .await
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(dir.path());
    common::api_key(dir.path());
    let closed = preflight(serve_query_api(&settings).await).await;
    assert!(!closed.headers().contains_key("access-control-allow-origin"), "CORS is off by default");

    settings.storage.data_dir = dir.path().join("open");
    common::api_key(&settings.storage.data_dir);
    settings.http.cors_origins = vec!["https://app.example".into()];
    let open = preflight(serve_query_api(&settings).await).await;
    assert_eq!(open.headers()["access-control-allow-origin"], "https://app.example");
    let allowed = open.headers()["access-control-allow-headers"].to_str().unwrap().to_owned();
    assert!(allowed.contains("authorization"), "{allowed}");
}
