//! The audit trail, with this process's logs captured: commands carry who asked in their event
//! headers and timeline entries; admin actions, key changes, person reads (when enabled) and
//! every refusal write one `audit` line; no secret reaches the logs, metrics or error bodies.
//!
//! One test in its own binary: the log capture is process-wide.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callisto::services::Dev;
use callisto_core::auth::Scope;
use callisto_core::config::Limit;
use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;
use common::jwt::{self, SigningKey};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn audit_lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["target"] == "audit")
            .collect()
    }

    /// The audit lines for `action` (e.g. `POST /admin/v1/dlq/purge`) with `outcome`.
    fn find(&self, action: &str, outcome: &str) -> Vec<Value> {
        self.audit_lines().into_iter().filter(|l| l["action"] == action && l["outcome"] == outcome).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_the_audit_trail_of_writes_and_admin_actions_and_refusals_are_audited() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_target(true)
        .with_env_filter("info")
        .with_writer(move || writer.clone())
        .init();

    let dir = tempfile::tempdir().unwrap();
    let signer = SigningKey::generate("audit-key");
    let mut settings = common::settings(dir.path());
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, jwt::jwks(&[&signer]).to_string()).unwrap();
    jwt::trust_file(&mut settings, &jwks);
    settings.auth.audit_person_reads = true;
    // Unknown keys are retried below until the service loads them; keep those off a 429.
    settings.auth.limits.anonymous = Limit { per_second: 1_000, burst: 1_000 };
    settings.schema_registry.password = Some("registry-hunter2".into());
    let dev = Dev::start(&settings, tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).await.unwrap();
    let base = format!("http://{}", dev.addr);
    let dev_key = common::api_key(dir.path());
    let dev_key_id = dev_key.split('_').nth(1).unwrap().to_owned();
    let client = common::client_with_key(&dev_key);
    let plain = reqwest::Client::new();

    // A command by API key: its event's headers name the key, the method and the address.
    let person = common::post_json(
        &client,
        format!("{base}/v1/persons"),
        json!({"given_name": "Audit", "family_name": "Trail"}),
    )
    .await;
    let id = person["person_id"].as_str().unwrap().to_owned();
    let (partition, offset) = (person["partition"].as_u64().unwrap() as u32, person["offset"].as_u64().unwrap());
    let record = dev.log.read("persons", partition, offset, 1, Duration::ZERO).await.unwrap().remove(0);
    assert_eq!(record.header("callisto.principal"), Some(dev_key_id.as_bytes()));
    assert_eq!(record.header("callisto.auth_method"), Some(&b"api_key"[..]));
    assert_eq!(record.header("callisto.source_address"), Some(&b"127.0.0.1"[..]));

    // A command by bearer token: the token's subject.
    let token = signer.token("ada@frontend", &["persons:write", "persons:read"]);
    let note = common::json_of(
        plain.post(format!("{base}/v1/persons/{id}/notes")).bearer_auth(&token).json(&json!({"text": "audited"})),
    )
    .await;
    let consistency = note["consistency_token"].as_str().unwrap();
    let timeline = common::json_of(client.get(format!("{base}/v1/persons/{id}/timeline?after={consistency}"))).await;
    let principals: Vec<&str> =
        timeline["items"].as_array().unwrap().iter().map(|e| e["principal"].as_str().unwrap()).collect();
    assert_eq!(principals, [dev_key_id.as_str(), "ada@frontend"], "{timeline}");

    // A read of one person, audited because the setting is on.
    assert_eq!(client.get(format!("{base}/v1/persons/{id}")).send().await.unwrap().status(), StatusCode::OK);
    let reads = capture.find("GET /v1/persons/{id}", "ok");
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0]["principal"], format!("api_key:{dev_key_id}"));
    assert_eq!(reads[0]["resource"], format!("/v1/persons/{id}"));
    assert!(!reads[0]["correlation_id"].as_str().unwrap().is_empty());

    // Admin actions: one line each, naming who, what, on what, and how it went.
    let admin: [(&str, &str, Option<Value>); 6] = [
        ("GET", "/admin/v1/dlq", None),
        ("POST", "/admin/v1/dlq/replay", Some(json!({"ids": []}))),
        ("POST", "/admin/v1/dlq/purge", None),
        ("GET", "/admin/v1/export", None),
        ("GET", "/admin/v1/replay", None),
        ("POST", "/admin/v1/replay/rollback", None),
    ];
    for (method, path, body) in &admin {
        let mut request =
            client.request(method.parse().unwrap(), format!("{base}{path}")).header("x-correlation-id", "corr-42");
        if let Some(body) = body {
            request = request.json(body);
        }
        let status = request.send().await.unwrap().status();
        let outcome = if status.is_success() { "ok" } else { "failed" };
        let lines = capture.find(&format!("{method} {path}"), outcome);
        assert_eq!(lines.len(), 1, "{method} {path} ({status}): {lines:?}");
        assert_eq!(lines[0]["principal"], format!("api_key:{dev_key_id}"));
        assert_eq!(lines[0]["correlation_id"], "corr-42");
        assert_eq!(lines[0]["status"], status.as_u16());
        assert!(lines[0]["timestamp"].is_string(), "every line has its time");
    }
    assert_eq!(capture.find("POST /admin/v1/replay/rollback", "failed").len(), 1, "nothing to roll back: 409");

    // Key changes from the command line.
    let scopes = [Scope::PersonsRead].into_iter().collect();
    let throttled = Limit { per_second: 1, burst: 1 };
    let created = callisto::keys::create(&settings, "audited".into(), scopes, None, Some(throttled)).unwrap();
    assert_eq!(capture.find("keys.create", "ok").len(), 2, "the dev key and this one");

    // Refusals: 401, 403 and 429, each one line.
    let anonymous = plain.post(format!("{base}/admin/v1/dlq/purge")).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let forged = "cal_0123456789abcdef_forged-secret-value";
    let refused = plain.get(format!("{base}/v1/persons")).header("x-api-key", forged).send().await.unwrap();
    let refused_body = refused.text().await.unwrap();
    assert!(!refused_body.contains("forged-secret-value"), "{refused_body}");
    let reader = signer.token("reader", &["persons:read"]);
    let forbidden = plain.post(format!("{base}/admin/v1/dlq/purge")).bearer_auth(&reader).send().await.unwrap();
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        // The service reloads the key file within seconds; until then the key is unknown.
        let answer = plain.get(format!("{base}/v1/persons")).header("x-api-key", &created.key).send().await.unwrap();
        if answer.status() == StatusCode::OK {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the new key was never loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its burst of one is spent.
    let limited = plain.get(format!("{base}/v1/persons")).header("x-api-key", &created.key).send().await.unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.headers().contains_key("retry-after"));
    assert_eq!(capture.find("POST /admin/v1/dlq/purge", "unauthenticated").len(), 1);
    let unauthenticated = capture.find("GET /v1/persons", "unauthenticated");
    assert!(!unauthenticated.is_empty() && unauthenticated.iter().all(|l| l["principal"] == "anonymous"));
    let forbidden_lines = capture.find("POST /admin/v1/dlq/purge", "forbidden");
    assert_eq!(forbidden_lines.len(), 1);
    assert_eq!(forbidden_lines[0]["principal"], "jwt:reader");
    let limited_lines = capture.find("GET /v1/persons", "rate_limited");
    assert_eq!(limited_lines.len(), 1, "{limited_lines:?}");
    assert_eq!(limited_lines[0]["principal"], format!("api_key:{}", created.stored.id));
    callisto::keys::revoke(&settings, &created.stored.id).unwrap();
    assert_eq!(capture.find("keys.revoke", "ok").len(), 1);

    // No secret anywhere: logs, metrics, error bodies.
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let logs = capture.text();
    let secrets = [
        dev_key.as_str(),
        dev_key.splitn(3, '_').nth(2).unwrap(),
        created.key.as_str(),
        token.as_str(),
        reader.as_str(),
        "forged-secret-value",
        "registry-hunter2",
    ];
    for secret in secrets {
        assert!(!logs.contains(secret), "a secret reached the logs");
        assert!(!metrics.contains(secret), "a secret reached the metrics");
        assert!(!refused_body.contains(secret), "a secret reached an error body");
    }
    assert!(!format!("{settings:?}").contains("registry-hunter2"));
    assert!(!format!("{created:?}").contains(&created.key));
    assert!(capture.audit_lines().len() >= 12, "the capture saw the audit trail");
    dev.stop().await.unwrap();
}
