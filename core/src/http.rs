//! The HTTP edge shared by every service: RFC 9457 `application/problem+json` errors and the
//! extractors that turn every kind of bad input into one, never into a 5xx or a panic; the
//! router every service is wrapped in; and serving it over HTTP or HTTPS.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument as _;

use crate::auth::{Auth, Rule};
use crate::config::{HttpSettings, TlsSettings};

pub const PROBLEM_JSON: &str = "application/problem+json";

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `address.postcode`; `body` for the body as a whole.
    pub field: String,
    pub message: String,
}

/// An RFC 9457 problem detail.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the problem class; relative to the API.
    #[serde(rename = "type")]
    pub kind: String,
    /// The problem class's fixed summary: one per `kind`, never data.
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// Where commands go: set when a standby site refuses one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub primary: Option<Box<str>>,
    #[serde(skip)]
    pub retry_after_secs: Option<u32>,
}

impl Problem {
    pub fn new(status: StatusCode, kind: &str, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("/problems/{kind}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
            primary: None,
            retry_after_secs: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>, message: impl Into<String>) -> Self {
        self.errors.push(FieldError { field: field.into(), message: message.into() });
        self
    }

    /// 400: the request could not be read at all.
    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed-request", "Malformed request", detail)
    }

    /// 422 for one named field.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let (field, message) = (field.into(), message.into());
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-field", "Invalid field", format!("{field}: {message}"))
            .with_field(field, message)
    }

    /// 422 for several fields at once.
    pub fn invalid_fields(errors: Vec<FieldError>) -> Self {
        let detail = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ");
        let mut problem = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-field", "Invalid field", detail);
        problem.errors = errors;
        problem
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 503 with `Retry-After`: a dependency is down; the client should come back.
    pub fn unavailable(detail: impl Into<String>, retry_after_secs: u32) -> Self {
        let mut problem = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable", detail);
        problem.retry_after_secs = Some(retry_after_secs);
        problem
    }

    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (self.status_code(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A JSON request body, with the raw bytes kept for fingerprinting (idempotency keys).
///
/// Rejections: a missing or non-JSON content type is 415, a body over the limit 413, malformed
/// JSON 400, and wrong types, unknown or missing fields 422 naming the field.
#[derive(Debug)]
pub struct ApiJson<T> {
    pub value: T,
    pub raw: Bytes,
}

/// Like [`ApiJson`], but an empty body (with or without a content type) means `T::default()`.
#[derive(Debug)]
pub struct ApiJsonOrEmpty<T> {
    pub value: T,
    pub raw: Bytes,
}

fn is_json_content_type(parts_headers: &axum::http::HeaderMap) -> Option<bool> {
    let value = parts_headers.get(header::CONTENT_TYPE)?;
    let mime = value.to_str().ok()?.split(';').next()?.trim().to_ascii_lowercase();
    Some(mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")))
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, Problem> {
    Bytes::from_request(req, state).await.map_err(|rejection| match rejection {
        BytesRejection::FailedToBufferBody(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", "Request body too large", e.body_text())
        }
        other => Problem::malformed(other.body_text()),
    })
}

fn unsupported_media_type() -> Problem {
    Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        "Unsupported media type",
        "send the body as Content-Type: application/json",
    )
}

/// Deserializes a JSON document, naming the offending field on failure.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            return Err(match inner.classify() {
                serde_json::error::Category::Data => {
                    let message = strip_position(&inner.to_string());
                    let field = named_field(&message)
                        .map(|name| if path == "." { name } else { format!("{path}.{name}") })
                        .filter(|_| message.starts_with("missing field"))
                        .unwrap_or_else(|| if path == "." { "body".to_owned() } else { path });
                    Problem::invalid_field(field, message)
                }
                _ => {
                    Problem::malformed(format!("body is not valid JSON: {inner}")).with_field("body", inner.to_string())
                }
            });
        }
    };
    de.end().map_err(|e| Problem::malformed(format!("body is not valid JSON: {e}")))?;
    Ok(value)
}

/// serde_json appends " at line L column C"; the field name says more to an API client.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The name between the first pair of backticks in a serde message such as
/// "missing field `given_name`".
fn named_field(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if is_json_content_type(req.headers()) != Some(true) {
            return Err(unsupported_media_type());
        }
        let raw = read_body(req, state).await?;
        Ok(Self { value: parse_json(&raw)?, raw })
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for ApiJsonOrEmpty<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = is_json_content_type(req.headers());
        let raw = read_body(req, state).await?;
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self { value: T::default(), raw });
        }
        if content_type != Some(true) {
            return Err(unsupported_media_type());
        }
        Ok(Self { value: parse_json(&raw)?, raw })
    }
}

/// Query parameters; a bad one is a 400 problem.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|e: QueryRejection| Problem::malformed(e.body_text()))
    }
}

/// Path parameters; a bad one is a 400 problem.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|e: PathRejection| Problem::malformed(e.body_text()))
    }
}

/// Router fallback: unknown routes are a 404 problem.
pub async fn not_found_fallback(uri: axum::http::Uri) -> Problem {
    Problem::not_found(format!("no route for {}", uri.path()))
}

/// Gives every bare error response (405 from the router, 408 from a timeout, …) a problem body,
/// so clients can rely on one error format.
pub async fn problem_for_bare_errors(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(PROBLEM_JSON));
    if (status.is_client_error() || status.is_server_error()) && !is_problem {
        let title = status.canonical_reason().unwrap_or("Error");
        let kind = title.to_ascii_lowercase().replace(' ', "-");
        let mut problem = Problem::new(status, &kind, title, title.to_owned()).into_response();
        for (name, value) in response.headers() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                problem.headers_mut().insert(name.clone(), value.clone());
            }
        }
        return problem;
    }
    response
}

/// Answers a panic inside a handler with a 500 problem instead of a dropped connection.
pub fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", "the server hit a bug; it was logged")
        .into_response()
}

/// Answers `/readyz`: `Ok` when the service can do its job now, else why not.
pub type ReadinessCheck =
    std::sync::Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// `document` as JSON at `path`, for any authenticated caller: how the API contracts are served.
pub fn document_route(path: &str, document: serde_json::Value, auth: &std::sync::Arc<Auth>) -> axum::Router {
    let document = std::sync::Arc::new(document);
    auth.protect(
        Router::new().route(path, axum::routing::get(move || async move { axum::Json(document.as_ref().clone()) })),
        Rule::ANY_CALLER,
    )
}

/// Wraps a service's API routes with what every Callisto service serves and does:
/// `/openapi.json` (any authenticated caller), `/healthz` and `/readyz` (open), `/metrics`
/// (scope `admin` or `metrics`), problem+json for every error, security headers, CORS when
/// origins are configured, a body limit, panic containment and request tracing. Routes not
/// found answer 401 to anonymous callers, so nothing about the API leaks without credentials.
pub fn service_router(
    api: axum::Router,
    openapi: serde_json::Value,
    readiness: ReadinessCheck,
    settings: &HttpSettings,
    auth: &std::sync::Arc<Auth>,
) -> axum::Router {
    use axum::routing::get;
    // Install the recorder before the first request, so no early metric is dropped.
    crate::telemetry::prometheus();
    let documented = document_route("/openapi.json", openapi, auth);
    let metrics = auth.protect(
        Router::new().route(
            "/metrics",
            get(|| async {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::prometheus().render())
            }),
        ),
        Rule::METRICS,
    );
    let fallback = auth.protect_all(Router::new().fallback(not_found_fallback), Rule::ANY_CALLER);
    let router = api
        .merge(documented)
        .merge(metrics)
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route(
            "/readyz",
            get(move || async move {
                match readiness().await {
                    Ok(()) => axum::Json(serde_json::json!({"status": "ready"})).into_response(),
                    Err(why) => Problem::unavailable(why, 1).into_response(),
                }
            }),
        )
        .fallback_service(fallback)
        .layer(axum::extract::DefaultBodyLimit::max(settings.body_limit_bytes))
        .layer(axum::middleware::map_response(problem_for_bare_errors))
        .layer(axum::middleware::map_response(security_headers));
    with_cors(router.route_layer(axum::middleware::from_fn(record_request)), &settings.cors_origins)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response))
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

/// RED metrics per route: requests by route template, method and status class, and their
/// duration. Labels are bounded: templates, not paths; methods outside the usual ones are
/// `other`. Refusals by the guard (401, 403, 429) count too. Each request also runs in its
/// server span (exported when traces are on).
async fn record_request(
    matched: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method: &'static str = match request.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let started = std::time::Instant::now();
    let span = crate::telemetry::trace::http_server_span(request.method().as_str(), &route, request.headers());
    let response = next.run(request).instrument(span.clone()).await;
    crate::telemetry::trace::record_http_status(&span, response.status().as_u16());
    let status = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let labels = [("route", route), ("method", method.to_owned())];
    metrics::histogram!("callisto_http_request_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
    metrics::counter!("callisto_http_requests_total", "route" => labels[0].1.clone(), "method" => method, "status" => status)
        .increment(1);
    response
}

/// `nosniff` everywhere, and no caching anywhere: answers hold person data or depend on who
/// asks.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// CORS answers only for the configured origins; with none, browsers get no CORS headers and
/// keep cross-origin pages out.
fn with_cors(router: axum::Router, origins: &[String]) -> axum::Router {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    if origins.is_empty() {
        return router;
    }
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([
            axum::http::Method::GET,
            axum::http::Method::POST,
            axum::http::Method::PUT,
            axum::http::Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("x-api-key"),
            header::HeaderName::from_static("idempotency-key"),
            header::HeaderName::from_static("callisto-consistency-token"),
            header::HeaderName::from_static("x-correlation-id"),
        ])
        .max_age(std::time::Duration::from_secs(600));
    router.layer(cors)
}

pub use axum::Router;

/// Serves `app` on `listener` until `shutdown` resolves, then drains in-flight requests. With
/// TLS configured the listener speaks HTTPS only; a plain HTTP client fails its handshake.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: &TlsSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    if !tls.enabled() {
        return axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    }
    let config = crate::tls::reloading_config(tls).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let handle = axum_server::Handle::new();
    let draining = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        draining.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
    });
    axum_server::from_tcp_rustls(listener.into_std()?, config)?.handle(handle).serve(app).await
}
