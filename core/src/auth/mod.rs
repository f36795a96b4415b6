//! Who may call Callisto, and how much.
//!
//! Every route but `/healthz` and `/readyz` passes one guard ([`Auth::protect`]) that:
//! 1. authenticates the caller: `Authorization: Bearer <JWT>` ([`jwt`]), or
//!    `Authorization: ApiKey <key>` / `X-Api-Key: <key>` ([`keys`]);
//! 2. checks the route group's scope ([`Rule`]);
//! 3. takes a token from the caller's budget for that group ([`limits`]);
//! 4. hands the [`Caller`] to the handler (writers put it in the event's headers), and writes
//!    an audit line (`target = "audit"`) for admin actions and every refusal.
//!
//! No credentials or bad ones are a 401 with `WWW-Authenticate`, a missing scope a 403, an
//! exhausted budget a 429 with `Retry-After` and `RateLimit-*`; all `application/problem+json`,
//! and none says which check failed beyond what a client needs.
//!
//! ## Layout
//! - [`keys`]: API keys, hashed in a file that services reload on change.
//! - [`jwt`]: bearer tokens against a JWKS (URL, OIDC discovery or file), with key rotation.
//! - [`limits`]: token-bucket rate limits per caller and budget.

pub mod jwt;
pub mod keys;
pub mod limits;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::http::Problem;
pub use limits::{Budget, RateLimits, Verdict};

/// What a caller may do; checked per route group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "persons:write")]
    PersonsWrite,
    #[serde(rename = "persons:read")]
    PersonsRead,
    /// `DELETE /v1/persons/{id}`: erasing a person cannot be undone, so it is a scope of its own.
    #[serde(rename = "persons:erase")]
    PersonsErase,
    #[serde(rename = "search")]
    Search,
    #[serde(rename = "admin")]
    Admin,
    /// `/metrics` alone, so a Prometheus server's key cannot purge dead letters.
    #[serde(rename = "metrics")]
    Metrics,
}

impl Scope {
    pub const ALL: [Scope; 6] =
        [Self::PersonsWrite, Self::PersonsRead, Self::PersonsErase, Self::Search, Self::Admin, Self::Metrics];

    pub fn name(self) -> &'static str {
        match self {
            Self::PersonsWrite => "persons:write",
            Self::PersonsRead => "persons:read",
            Self::PersonsErase => "persons:erase",
            Self::Search => "search",
            Self::Admin => "admin",
            Self::Metrics => "metrics",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|scope| scope.name() == s).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|s| s.name()).collect();
            format!("unknown scope {s:?}; known: {}", known.join(", "))
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Jwt,
    ApiKey,
    /// `--insecure-no-auth`: nobody proved anything.
    None,
}

impl AuthMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::ApiKey => "api_key",
            Self::None => "none",
        }
    }
}

/// An authenticated caller: a token's subject or an API key's id.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub id: String,
    pub method: AuthMethod,
    pub scopes: BTreeSet<Scope>,
    /// The key's own rate limit, replacing the defaults.
    pub limit: Option<crate::config::Limit>,
}

impl Principal {
    /// `api_key:<id>` or `jwt:<subject>`: unique across methods, for buckets and audit lines.
    pub fn qualified(&self) -> String {
        format!("{}:{}", self.method.name(), self.id)
    }
}

/// The caller of the request being served, as the guard found it; handlers take it from the
/// request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub source: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// Missing, malformed, unknown, expired, revoked, badly signed: all the same to a client.
    Invalid,
    /// Credentials cannot be checked now (the token issuer's keys are unreachable).
    Unavailable(String),
}

/// When a route's calls are audited even when they succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audit {
    Never,
    Always,
    /// Only with `auth.audit_person_reads`.
    PersonReads,
}

/// What a route group asks of its callers.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Any one of these scopes will do; none means any authenticated caller.
    pub scopes: &'static [Scope],
    pub budget: Budget,
    pub audit: Audit,
}

impl Rule {
    pub const COMMANDS: Rule = Rule { scopes: &[Scope::PersonsWrite], budget: Budget::Commands, audit: Audit::Never };
    /// Erasure: a command, and always audited.
    pub const ERASE: Rule = Rule { scopes: &[Scope::PersonsErase], budget: Budget::Commands, audit: Audit::Always };
    pub const READS: Rule = Rule { scopes: &[Scope::PersonsRead], budget: Budget::Reads, audit: Audit::Never };
    pub const PERSON_READ: Rule =
        Rule { scopes: &[Scope::PersonsRead], budget: Budget::Reads, audit: Audit::PersonReads };
    pub const SEARCH: Rule = Rule { scopes: &[Scope::Search], budget: Budget::Search, audit: Audit::Never };
    pub const ADMIN: Rule = Rule { scopes: &[Scope::Admin], budget: Budget::Admin, audit: Audit::Always };
    pub const METRICS: Rule =
        Rule { scopes: &[Scope::Admin, Scope::Metrics], budget: Budget::Admin, audit: Audit::Never };
    /// The OpenAPI document and unknown routes: any authenticated caller.
    pub const ANY_CALLER: Rule = Rule { scopes: &[], budget: Budget::Reads, audit: Audit::Never };

    fn allows(&self, principal: &Principal) -> bool {
        self.scopes.is_empty() || self.scopes.iter().any(|s| principal.scopes.contains(s))
    }
}

/// How a service checks its callers.
pub struct Auth {
    keys: Option<Arc<keys::ApiKeys>>,
    jwt: Option<Arc<jwt::JwtVerifier>>,
    limits: Arc<RateLimits>,
    audit_person_reads: bool,
    insecure: bool,
}

impl Auth {
    /// The checks `settings` configure. With nothing configured a service refuses to start,
    /// naming the settings, unless `insecure_no_auth` says to run open (logged at every start).
    pub async fn from_settings(settings: &Settings, insecure_no_auth: bool) -> anyhow::Result<Arc<Self>> {
        let auth = &settings.auth;
        let keys_path = auth.api_keys_path(&settings.storage);
        let keys_configured = auth.api_keys_file.is_some() || keys_path.exists();
        let limits = RateLimits::new(auth.limits.clone());
        if insecure_no_auth {
            tracing::warn!(
                "--insecure-no-auth: every route is open to anyone who can reach this port; never run this way with real data"
            );
            return Ok(Arc::new(Self { keys: None, jwt: None, limits, audit_person_reads: false, insecure: true }));
        }
        anyhow::ensure!(
            keys_configured || auth.jwt.enabled(),
            "no authentication configured: set auth.jwt.issuer (with audience and jwks_url, discovery or keys_file), \
             or auth.api_keys_file, or create a key with `callisto keys create --data-dir {}`; \
             --insecure-no-auth runs without (never with real data)",
            settings.storage.data_dir.display()
        );
        let keys = if keys_configured { Some(keys::ApiKeys::open(keys_path)?) } else { None };
        let jwt = if auth.jwt.enabled() { Some(jwt::JwtVerifier::new(&auth.jwt).await?) } else { None };
        Ok(Arc::new(Self { keys, jwt, limits, audit_person_reads: auth.audit_person_reads, insecure: false }))
    }

    /// Puts `rule` in front of every route of `router`.
    pub fn protect(self: &Arc<Self>, router: axum::Router, rule: Rule) -> axum::Router {
        router.route_layer(axum::middleware::from_fn_with_state((self.clone(), rule), guard))
    }

    /// Puts `rule` in front of everything `router` answers, its fallback included.
    pub fn protect_all(self: &Arc<Self>, router: axum::Router, rule: Rule) -> axum::Router {
        router.layer(axum::middleware::from_fn_with_state((self.clone(), rule), guard))
    }

    /// The caller the request's credentials stand for.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        if self.insecure {
            return Ok(Principal {
                id: "anonymous".into(),
                method: AuthMethod::None,
                scopes: Scope::ALL.into_iter().collect(),
                limit: None,
            });
        }
        match credentials(headers)? {
            Credentials::Bearer(token) => match &self.jwt {
                Some(jwt) => jwt.verify(token).await,
                None => Err(AuthError::Invalid),
            },
            Credentials::ApiKey(key) => self.keys.as_ref().and_then(|keys| keys.verify(key)).ok_or(AuthError::Invalid),
        }
    }
}

fn header_text(value: &HeaderValue) -> Result<&str, AuthError> {
    value.to_str().map(str::trim).map_err(|_| AuthError::Invalid)
}

enum Credentials<'h> {
    Bearer(&'h str),
    ApiKey(&'h str),
}

/// The credentials of a request; more than one kind, or a malformed header, is invalid.
fn credentials(headers: &HeaderMap) -> Result<Credentials<'_>, AuthError> {
    let authorization = headers.get(header::AUTHORIZATION).map(header_text).transpose()?;
    let api_key = headers.get("x-api-key").map(header_text).transpose()?;
    match (authorization, api_key) {
        (Some(_), Some(_)) | (None, None) => Err(AuthError::Invalid),
        (None, Some(key)) if !key.is_empty() => Ok(Credentials::ApiKey(key)),
        (Some(value), None) => {
            let (scheme, rest) = value.split_once(' ').ok_or(AuthError::Invalid)?;
            let rest = rest.trim();
            if rest.is_empty() {
                return Err(AuthError::Invalid);
            }
            if scheme.eq_ignore_ascii_case("bearer") {
                Ok(Credentials::Bearer(rest))
            } else if scheme.eq_ignore_ascii_case("apikey") {
                Ok(Credentials::ApiKey(rest))
            } else {
                Err(AuthError::Invalid)
            }
        }
        _ => Err(AuthError::Invalid),
    }
}

const CORRELATION_HEADER: &str = "x-correlation-id";

/// What the audit trail names a request by.
/// Cheap to take on every request: the text of an audit line is only formatted when one is
/// written.
struct Described {
    method: axum::http::Method,
    route: Option<MatchedPath>,
    uri: axum::http::Uri,
    correlation_id: Option<String>,
    source: Option<IpAddr>,
}

fn describe(req: &Request) -> Described {
    let source = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let route = req.extensions().get::<MatchedPath>().cloned();
    let (method, uri) = (req.method().clone(), req.uri().clone());
    // The client's id, if it sent a usable one; a malformed one is left for the handler to
    // refuse. Without one, an audit line gets a fresh id (and a command's event its own).
    let correlation_id = req
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned);
    Described { method, route, uri, correlation_id, source }
}

/// One structured line on the `audit` target.
fn audit(principal: Option<&Principal>, request: &Described, outcome: &str, status: StatusCode) {
    tracing::info!(
        target: "audit",
        principal = principal.map(Principal::qualified).as_deref().unwrap_or("anonymous"),
        auth_method = principal.map_or("none", |p| p.method.name()),
        source = request.source.map(|s| s.to_string()).as_deref().unwrap_or("unknown"),
        action = %format_args!("{} {}", request.method, request.route.as_ref().map_or("(unknown route)", |r| r.as_str())),
        resource = request.uri.path_and_query().map_or("", |p| p.as_str()),
        outcome,
        status = status.as_u16(),
        correlation_id = %request.correlation_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        "audit"
    );
}

async fn guard(State((auth, rule)): State<(Arc<Auth>, Rule)>, mut req: Request, next: Next) -> Response {
    let request = describe(&req);
    let principal = match auth.authenticate(req.headers()).await {
        Ok(principal) => principal,
        Err(AuthError::Unavailable(why)) => {
            tracing::warn!(error = %why, "credentials cannot be checked");
            audit(None, &request, "unavailable", StatusCode::SERVICE_UNAVAILABLE);
            return Problem::unavailable("credentials cannot be checked right now", 5).into_response();
        }
        Err(AuthError::Invalid) => {
            // Without valid credentials the source address is the only caller there is.
            if let Some(source) = request.source
                && let verdict @ Verdict::Limited { .. } = auth.limits.check_anonymous(source)
            {
                audit(None, &request, "rate_limited", StatusCode::TOO_MANY_REQUESTS);
                return too_many_requests(verdict, "anonymous");
            }
            audit(None, &request, "unauthenticated", StatusCode::UNAUTHORIZED);
            return unauthorized(req.headers());
        }
    };
    if !rule.allows(&principal) {
        audit(Some(&principal), &request, "forbidden", StatusCode::FORBIDDEN);
        return forbidden(rule);
    }
    let verdict = auth.limits.check_caller(rule.budget, &principal.qualified(), principal.limit);
    if let Verdict::Limited { .. } = verdict {
        audit(Some(&principal), &request, "rate_limited", StatusCode::TOO_MANY_REQUESTS);
        return too_many_requests(verdict, rule.budget.name());
    }
    req.extensions_mut().insert(Caller { principal: principal.clone(), source: request.source });
    let mut response = next.run(req).await;
    rate_limit_headers(response.headers_mut(), verdict);
    let audited = match rule.audit {
        Audit::Always => true,
        Audit::PersonReads => auth.audit_person_reads,
        Audit::Never => false,
    };
    if audited {
        let status = response.status();
        let outcome = if status.is_success() { "ok" } else { "failed" };
        audit(Some(&principal), &request, outcome, status);
    }
    response
}

/// `WWW-Authenticate` names both schemes; a bearer token that failed gets `invalid_token`
/// (RFC 6750) and nothing about why.
fn unauthorized(headers: &HeaderMap) -> Response {
    let sent_bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("bearer ")));
    let challenge = if sent_bearer {
        r#"Bearer realm="callisto", error="invalid_token", ApiKey realm="callisto""#
    } else {
        r#"Bearer realm="callisto", ApiKey realm="callisto""#
    };
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        "valid credentials are required: Authorization: Bearer <token>, or ApiKey <key>",
    )
    .into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    response
}

fn forbidden(rule: Rule) -> Response {
    let scopes: Vec<&str> = rule.scopes.iter().map(|s| s.name()).collect();
    let mut response = Problem::new(
        StatusCode::FORBIDDEN,
        "insufficient-scope",
        "Forbidden",
        format!("this operation needs the scope {}", scopes.join(" or ")),
    )
    .into_response();
    let challenge = format!(r#"Bearer realm="callisto", error="insufficient_scope", scope="{}""#, scopes.join(" "));
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

fn too_many_requests(verdict: Verdict, budget: &str) -> Response {
    let Verdict::Limited { retry_after_secs, .. } = verdict else { unreachable!("only limited verdicts answer 429") };
    // Budgets are a fixed set of names, so the label stays bounded.
    metrics::counter!("callisto_rate_limited_total", "budget" => budget.to_owned()).increment(1);
    let mut problem = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        "Too many requests",
        format!("the {budget} budget is spent; retry after {retry_after_secs} s"),
    );
    problem.retry_after_secs = Some(u32::try_from(retry_after_secs).unwrap_or(u32::MAX));
    let mut response = problem.into_response();
    rate_limit_headers(response.headers_mut(), verdict);
    response
}

/// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds), as the IETF
/// RateLimit header fields draft spells them.
fn rate_limit_headers(headers: &mut HeaderMap, verdict: Verdict) {
    let (limit, remaining, reset) = match verdict {
        Verdict::Allowed { limit, remaining, reset_secs } => (limit, remaining, reset_secs),
        Verdict::Limited { limit, retry_after_secs } => (limit, 0, retry_after_secs),
    };
    headers.insert("ratelimit-limit", HeaderValue::from(limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(reset));
}

/// Declares the security schemes in `doc`, and on each operation the scopes `rule_for` gives
/// its path, so the document states what the guard enforces.
pub fn document(doc: &mut utoipa::openapi::OpenApi, rule_for: impl Fn(&str) -> Rule) {
    use utoipa::openapi::security::{
        ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some("A JWT from the configured issuer; its `scope` or `scp` claim holds the scopes."))
                .build(),
        ),
    );
    components.add_security_scheme(
        "api_key",
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
            "X-Api-Key",
            "An API key from `callisto keys create`; `Authorization: ApiKey <key>` works too.",
        ))),
    );
    for (path, item) in doc.paths.paths.iter_mut() {
        let rule = rule_for(path);
        let scopes: Vec<&str> = rule.scopes.iter().map(|s| s.name()).collect();
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
            &mut item.head,
            &mut item.options,
            &mut item.trace,
        ];
        for operation in operations.into_iter().flatten() {
            let requirements: Vec<SecurityRequirement> = ["bearer", "api_key"]
                .into_iter()
                .flat_map(|scheme| {
                    let per_scope: Vec<SecurityRequirement> =
                        scopes.iter().map(|s| SecurityRequirement::new(scheme, [*s])).collect();
                    if per_scope.is_empty() {
                        vec![SecurityRequirement::new(scheme, Vec::<String>::new())]
                    } else {
                        per_scope
                    }
                })
                .collect();
            operation.security = Some(requirements);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn credentials_come_from_one_header_in_one_known_scheme() {
        assert!(matches!(credentials(&headers(&[("authorization", "Bearer abc")])), Ok(Credentials::Bearer("abc"))));
        assert!(matches!(credentials(&headers(&[("authorization", "apikey k")])), Ok(Credentials::ApiKey("k"))));
        assert!(matches!(credentials(&headers(&[("x-api-key", "k")])), Ok(Credentials::ApiKey("k"))));
        for bad in [&[("authorization", "Basic dTpw")][..], &[("authorization", "Bearer")], &[("x-api-key", "")], &[]] {
            assert!(credentials(&headers(bad)).is_err());
        }
        let both = headers(&[("authorization", "Bearer a"), ("x-api-key", "b")]);
        assert!(credentials(&both).is_err(), "two kinds of credentials are ambiguous");
    }

    #[test]
    fn scopes_parse_from_their_names_only() {
        for scope in Scope::ALL {
            assert_eq!(scope.name().parse::<Scope>(), Ok(scope));
        }
        assert!("persons:delete".parse::<Scope>().is_err());
    }
}
