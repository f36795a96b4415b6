//! Bearer JWTs, verified with `jsonwebtoken` against keys from a JWKS URL, OIDC discovery, or a
//! static PEM/JWKS file.
//!
//! - Key rotation: a token naming an unknown `kid` refetches the JWKS, at most once per
//!   `jwks_min_refetch_ms`, so a flood of made-up `kid`s cannot hammer the provider. The set
//!   is also refreshed on a timer. A provider that is down keeps the cached keys working.
//! - Algorithms: only asymmetric ones (RSA, RSA-PSS, ECDSA, EdDSA), and only the one the key
//!   is for. `alg: none` does not parse, and an HMAC token never meets an RSA/EC key as a
//!   shared secret.
//! - Claims: `exp`, `iss`, `aud` and `sub` are required; `exp` and `nbf` are checked with the
//!   configured leeway.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};

use super::{AuthError, AuthMethod, Principal, Scope};
use crate::config::JwtSettings;
use crate::readmodel::StoreError;
use crate::resilience::Guard;

struct CachedKey {
    kid: Option<String>,
    key: DecodingKey,
    /// The one algorithm the key is published for, when the JWKS says.
    alg: Option<String>,
}

#[derive(Default)]
struct Cache {
    keys: Vec<CachedKey>,
    last_fetch: Option<Instant>,
    fetched_ok: bool,
}

pub struct JwtVerifier {
    settings: JwtSettings,
    remote: bool,
    cache: RwLock<Cache>,
    /// One refetch at a time; others wait for its result.
    refetching: tokio::sync::Mutex<()>,
    http: reqwest::Client,
    guard: Guard,
}

impl JwtVerifier {
    /// Builds the verifier. Static keys must load now; a remote JWKS is fetched now if it
    /// answers, and otherwise on the first token (a provider outage never stops a start).
    pub async fn new(settings: &JwtSettings) -> anyhow::Result<Arc<Self>> {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        let verifier = Arc::new(Self {
            remote: settings.keys_file.is_none(),
            settings: settings.clone(),
            cache: RwLock::new(Cache::default()),
            refetching: tokio::sync::Mutex::new(()),
            http,
            guard: Guard::new("jwks", "all", timeout, 3),
        });
        if let Some(path) = &settings.keys_file {
            let keys =
                static_keys(&std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?)?;
            *verifier.cache.write().expect("jwks lock") =
                Cache { keys, last_fetch: Some(Instant::now()), fetched_ok: true };
            return Ok(verifier);
        }
        if let Err(e) = verifier.refetch().await {
            tracing::warn!(error = %e, "jwks not reachable at start; tokens are verified once it answers");
        }
        let weak: Weak<Self> = Arc::downgrade(&verifier);
        let every = Duration::from_secs(settings.jwks_refresh_secs.max(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(verifier) = weak.upgrade() else { return };
                if let Err(e) = verifier.refetch().await {
                    tracing::warn!(error = %e, "jwks refresh failed; keeping the cached keys");
                }
            }
        });
        Ok(verifier)
    }

    /// The caller a bearer token stands for.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        if header.alg.family() == AlgorithmFamily::Hmac {
            return Err(AuthError::Invalid);
        }
        let kid = header.kid.as_deref();
        if let Some(result) = self.try_verify(token, header.alg, kid) {
            return result;
        }
        // An unknown key id: the provider may have rotated keys.
        if self.remote && self.may_refetch() {
            let fetched = self.refetch_once().await;
            if let Some(result) = self.try_verify(token, header.alg, kid) {
                return result;
            }
            if let Err(e) = fetched {
                return Err(AuthError::Unavailable(format!("the token issuer's keys cannot be fetched: {e}")));
            }
        } else if self.remote && !self.cache.read().expect("jwks lock").fetched_ok {
            return Err(AuthError::Unavailable("the token issuer's keys have not been fetched yet".into()));
        }
        Err(AuthError::Invalid)
    }

    /// `None` when no cached key fits the token's `kid`.
    fn try_verify(&self, token: &str, alg: Algorithm, kid: Option<&str>) -> Option<Result<Principal, AuthError>> {
        let cache = self.cache.read().expect("jwks lock");
        let single = cache.keys.len() == 1;
        let key = cache.keys.iter().find(|k| match (kid, &k.kid) {
            (Some(wanted), Some(have)) => wanted == have,
            (None, _) | (_, None) => single,
        })?;
        // The key decides the algorithm, never the token: same family, and the published one.
        if key.key.family() != alg.family() || key.alg.as_ref().is_some_and(|a| *a != format!("{alg:?}")) {
            return Some(Err(AuthError::Invalid));
        }
        Some(self.check_claims(token, &key.key, alg))
    }

    fn check_claims(&self, token: &str, key: &DecodingKey, alg: Algorithm) -> Result<Principal, AuthError> {
        let mut validation = Validation::new(alg);
        validation.leeway = self.settings.leeway_secs;
        validation.validate_nbf = true;
        validation.set_issuer(&[self.settings.issuer.as_deref().unwrap_or_default()]);
        validation.set_audience(&self.settings.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, &validation)
            .map_err(|_| AuthError::Invalid)?;
        let claims = data.claims;
        let subject = claims.get("sub").and_then(|s| s.as_str()).filter(|s| !s.is_empty()).ok_or(AuthError::Invalid)?;
        let scopes = scopes(&claims, self.settings.scope_claim.as_deref());
        Ok(Principal { id: subject.to_owned(), method: AuthMethod::Jwt, scopes, limit: None })
    }

    fn may_refetch(&self) -> bool {
        let floor = Duration::from_millis(self.settings.jwks_min_refetch_ms);
        self.cache.read().expect("jwks lock").last_fetch.is_none_or(|at| at.elapsed() >= floor)
    }

    /// A refetch, unless another caller just did one while this one waited for the lock.
    async fn refetch_once(&self) -> Result<(), String> {
        let _one = self.refetching.lock().await;
        if !self.may_refetch() {
            return Ok(());
        }
        self.refetch().await
    }

    async fn refetch(&self) -> Result<(), String> {
        self.cache.write().expect("jwks lock").last_fetch = Some(Instant::now());
        let url = match (&self.settings.jwks_url, self.settings.discovery) {
            (Some(url), _) => url.clone(),
            (None, true) => self.discover().await?,
            (None, false) => return Err("no jwks_url and discovery is off".into()),
        };
        let set: JwkSet = self.get_json(&url, "fetch the jwks").await?;
        let keys: Vec<CachedKey> = set.keys.iter().filter_map(cached).collect();
        if keys.is_empty() {
            return Err(format!("the jwks at {url} holds no usable signing key"));
        }
        let count = keys.len();
        let mut cache = self.cache.write().expect("jwks lock");
        cache.keys = keys;
        cache.fetched_ok = true;
        drop(cache);
        tracing::info!(keys = count, "jwks fetched");
        Ok(())
    }

    /// The `jwks_uri` from `ISSUER/.well-known/openid-configuration`.
    async fn discover(&self) -> Result<String, String> {
        let issuer = self.settings.issuer.as_deref().unwrap_or_default().trim_end_matches('/');
        let document: serde_json::Value =
            self.get_json(&format!("{issuer}/.well-known/openid-configuration"), "discover the issuer").await?;
        document["jwks_uri"].as_str().map(str::to_owned).ok_or_else(|| "the discovery document has no jwks_uri".into())
    }

    /// One GET behind the timeout, retries and circuit breaker every dependency call gets.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str, what: &str) -> Result<T, String> {
        let unavailable = |e: reqwest::Error| StoreError::Unavailable(e.without_url().to_string());
        self.guard
            .call(what, || async {
                let response = self.http.get(url).send().await.map_err(unavailable)?;
                let status = response.status();
                if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    return Err(StoreError::Unavailable(format!("answered {status}")));
                }
                if !status.is_success() {
                    return Err(StoreError::Rejected(format!("answered {status}")));
                }
                response.json::<T>().await.map_err(|e| StoreError::Rejected(e.without_url().to_string()))
            })
            .await
            .map_err(|e| e.to_string())
    }
}

/// Scopes from the configured claim, else `scope` (space separated) or `scp` (a list or a
/// space-separated string); names Callisto does not know are ignored.
fn scopes(claims: &serde_json::Map<String, serde_json::Value>, claim: Option<&str>) -> BTreeSet<Scope> {
    let names: Vec<&str> = match claim {
        Some(claim) => vec![claim],
        None => vec!["scope", "scp"],
    };
    let value = names.iter().find_map(|n| claims.get(*n));
    let words: Vec<&str> = match value {
        Some(serde_json::Value::String(s)) => s.split_whitespace().collect(),
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|i| i.as_str()).collect(),
        _ => Vec::new(),
    };
    words.into_iter().filter_map(|w| w.parse().ok()).collect()
}

/// A signing key of a JWKS; encryption keys and symmetric keys are skipped.
fn cached(jwk: &Jwk) -> Option<CachedKey> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    if key.family() == AlgorithmFamily::Hmac {
        return None;
    }
    Some(CachedKey {
        kid: jwk.common.key_id.clone(),
        key,
        // KeyAlgorithm and Algorithm spell the signing algorithms alike (RS256, ES256, …).
        alg: jwk.common.key_algorithm.map(|a| format!("{a:?}")),
    })
}

/// Keys from a file: a JWKS document, or one PEM public key (RSA, EC or Ed25519).
fn static_keys(bytes: &[u8]) -> anyhow::Result<Vec<CachedKey>> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        let set: JwkSet = serde_json::from_slice(bytes)?;
        let keys: Vec<CachedKey> = set.keys.iter().filter_map(cached).collect();
        anyhow::ensure!(!keys.is_empty(), "the JWKS file holds no usable signing key");
        return Ok(keys);
    }
    let key = DecodingKey::from_rsa_pem(bytes)
        .or_else(|_| DecodingKey::from_ec_pem(bytes))
        .or_else(|_| DecodingKey::from_ed_pem(bytes))
        .map_err(|_| anyhow::anyhow!("the key file is neither a JWKS nor a PEM public key"))?;
    Ok(vec![CachedKey { kid: None, key, alg: None }])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn scopes_come_from_scope_scp_or_the_configured_claim() {
        let both = [Scope::PersonsRead, Scope::Search].into_iter().collect::<BTreeSet<_>>();
        assert_eq!(scopes(&claims(serde_json::json!({"scope": "persons:read search openid"})), None), both);
        assert_eq!(scopes(&claims(serde_json::json!({"scp": ["persons:read", "search"]})), None), both);
        assert_eq!(scopes(&claims(serde_json::json!({"scp": "persons:read search"})), None), both);
        let custom = claims(serde_json::json!({"scope": "admin", "permissions": ["search", "persons:read"]}));
        assert_eq!(scopes(&custom, Some("permissions")), both, "the configured claim wins");
        assert!(scopes(&claims(serde_json::json!({"roles": ["admin"]})), None).is_empty());
    }
}
