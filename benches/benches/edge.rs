//! The cost of the guard in front of every route. Each group holds Callisto's check and its
//! baseline side by side: compare within a group, not across runs.
//!
//! - `edge_guard/api_key`: authenticating an `Authorization: ApiKey` header and taking a token
//!   from the caller's bucket, against the one SHA-256 of the key that any hashed-key check
//!   needs.
//! - `edge_guard/bearer_es256`: authenticating an ES256 bearer token against a cached JWKS and
//!   reading its scopes, against `jsonwebtoken::decode` alone with the same key and checks.

use std::hint::black_box;

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use callisto_core::auth::{Auth, Budget, RateLimits, Scope};
use callisto_core::config::{Limit, Settings};
use criterion::{Criterion, criterion_group, criterion_main};
use sha2::Digest;

const ISSUER: &str = "https://issuer.bench";

fn headers(value: &str) -> HeaderMap {
    HeaderMap::from_iter([(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap())])
}

fn edge_guard(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _entered = runtime.enter();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.storage.data_dir = dir.path().to_path_buf();

    // An ES256 key, published as a JWKS file.
    let pair = rcgen::KeyPair::generate().unwrap();
    let raw = pair.public_key_raw();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let (x, y) = (b64(&raw[1..33]), b64(&raw[33..]));
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "k", "alg": "ES256"}]});
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    settings.auth.jwt.issuer = Some(ISSUER.into());
    settings.auth.jwt.audience = vec!["callisto".into()];
    settings.auth.jwt.keys_file = Some(dir.path().join("jwks.json"));

    let key = callisto_core::auth::keys::create(
        &settings.auth.api_keys_path(&settings.storage),
        callisto_core::auth::keys::NewKey {
            name: "bench".into(),
            scopes: [Scope::PersonsWrite].into_iter().collect(),
            expires_at: None,
            rate_limit: None,
        },
    )
    .unwrap();
    let auth = runtime.block_on(Auth::from_settings(&settings, false)).unwrap();
    let unlimited = Limit { per_second: u32::MAX, burst: u32::MAX };
    let limits = RateLimits::new(callisto_core::config::LimitSettings {
        commands: unlimited,
        reads: unlimited,
        search: unlimited,
        admin: unlimited,
        anonymous: unlimited,
    });

    let with_key = headers(&format!("ApiKey {}", key.key));
    let mut group = c.benchmark_group("edge_guard/api_key");
    group.bench_function("baseline_sha256_of_the_key", |b| b.iter(|| black_box(sha2::Sha256::digest(&key.key))));
    group.bench_function("callisto_authenticate_and_budget", |b| {
        b.iter(|| {
            let principal = futures::executor::block_on(auth.authenticate(&with_key)).unwrap();
            black_box(limits.check_caller(Budget::Commands, &principal.qualified(), principal.limit))
        })
    });
    group.finish();

    let mut token_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    token_header.kid = Some("k".into());
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({"iss": ISSUER, "aud": "callisto", "sub": "bench", "exp": now + 3600, "scope": "persons:write search"});
    let signing = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let token = jsonwebtoken::encode(&token_header, &claims, &signing).unwrap();
    let with_token = headers(&format!("Bearer {token}"));
    let decoding = jsonwebtoken::DecodingKey::from_ec_components(&x, &y).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_issuer(&[ISSUER]);
    validation.set_audience(&["callisto"]);
    let mut group = c.benchmark_group("edge_guard/bearer_es256");
    group.bench_function("baseline_jsonwebtoken_decode", |b| {
        b.iter(|| black_box(jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation).unwrap()))
    });
    group.bench_function("callisto_authenticate", |b| {
        b.iter(|| black_box(futures::executor::block_on(auth.authenticate(&with_token)).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, edge_guard);
criterion_main!(benches);
