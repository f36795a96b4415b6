//! HTTP handlers: one per command. Each validates its body, builds the event, and appends it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::FromRequestParts;
use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post, put};
use callisto_avro::events::*;
use callisto_avro::{Codec, EventKind, PersonEvent};
use callisto_core::auth::{Auth, Caller, Rule};
use callisto_core::http::{ApiJson, ApiJsonOrEmpty, ApiPath, FieldError, Problem};
use callisto_core::log;
use callisto_core::log::{AppendRequest, Appended, EventLog, IdempotencyKey, LogError};
use callisto_core::privacy::{KeyError, Keyring};
use callisto_core::resilience::{self, Breaker};
use callisto_core::telemetry::trace;
use callisto_core::token::{self, ConsistencyToken};
use chrono::Utc;
use failsafe::futures::CircuitBreaker as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tracing::Instrument as _;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::commands::*;

/// Trips after this many consecutive failed appends; then appends fail fast until a probe
/// succeeds after the (jittered, growing) back-off.
const BREAKER_FAILURES: u32 = 5;
/// What a 503 tells clients to wait before retrying.
const RETRY_AFTER_SECS: u32 = 1;

/// Everything a command handler needs; cheap to clone.
#[derive(Clone)]
pub struct WriterState {
    inner: Arc<Inner>,
}

struct Inner {
    log: Arc<dyn EventLog>,
    codec: Arc<Codec>,
    /// Seals every event's personal fields with the person's data key.
    keyring: Arc<Keyring>,
    topic: String,
    append_timeout: Duration,
    breaker: Breaker,
    /// Set on a standby site: commands are refused, naming the primary.
    standby: Option<Standby>,
}

/// A standby site's writer: it refuses every command and says where the primary is.
#[derive(Debug, Clone, Default)]
pub struct Standby {
    pub primary_url: Option<String>,
}

impl Standby {
    fn refusal(&self) -> Problem {
        let detail = match &self.primary_url {
            Some(url) => format!("this site is a standby and accepts no commands; send them to the primary at {url}"),
            None => "this site is a standby and accepts no commands; send them to the primary site".to_owned(),
        };
        let mut problem = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "standby", "Standby site", detail);
        problem.primary = self.primary_url.as_deref().map(Box::from);
        problem
    }
}

impl WriterState {
    pub fn new(
        log: Arc<dyn EventLog>,
        codec: Arc<Codec>,
        keyring: Arc<Keyring>,
        topic: String,
        append_timeout: Duration,
        standby: Option<Standby>,
    ) -> Self {
        let breaker = resilience::breaker("event log", "appends", BREAKER_FAILURES);
        Self { inner: Arc::new(Inner { log, codec, keyring, topic, append_timeout, breaker, standby }) }
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.inner.log
    }
}

/// The answer to every accepted command.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    pub person_id: Uuid,
    pub event_id: Uuid,
    pub partition: u32,
    pub offset: u64,
    /// `partition:offset`; pass it to reads to see this command's effect.
    pub consistency_token: String,
}

/// The command routes, each behind `auth`'s guard with scope `persons:write` and the
/// commands budget; erasure with scope `persons:erase`. On a standby site every one answers
/// 503 naming the primary, after the guard (so callers still learn about bad credentials first).
pub fn routes(state: WriterState, auth: &Arc<Auth>) -> Router {
    let standby = state.inner.standby.clone();
    let erase_route = Router::new().route("/v1/persons/{id}", delete(erase)).with_state(state.clone());
    let routes = Router::new()
        .route("/v1/persons", post(register))
        .route("/v1/persons/{id}/name", put(rename))
        .route("/v1/persons/{id}/contact", put(change_contact))
        .route("/v1/persons/{id}/address", put(change_address))
        .route("/v1/persons/{id}/notes", post(add_note))
        .route("/v1/persons/{id}/tags", post(tag))
        .route("/v1/persons/{id}/tags/{tag}", delete(untag))
        .route("/v1/persons/{id}/archive", post(archive))
        .with_state(state);
    let (routes, erase_route) = match standby {
        Some(standby) => {
            let refuse = axum::middleware::from_fn(move |_: axum::extract::Request, _: axum::middleware::Next| {
                let refusal = standby.refusal();
                async move { refusal.into_response() }
            });
            (routes.route_layer(refuse.clone()), erase_route.route_layer(refuse))
        }
        None => (routes, erase_route),
    };
    auth.protect(routes, Rule::COMMANDS).merge(auth.protect(erase_route, Rule::ERASE))
}

/// What a key store failure means for a command.
fn key_problem(kind: EventKind, person_id: Uuid, error: KeyError) -> Problem {
    match error {
        KeyError::Erased => Problem::new(
            StatusCode::GONE,
            "person-erased",
            "Person erased",
            format!("person {person_id} was erased; no further events are accepted for them"),
        ),
        KeyError::Unavailable(why) => {
            tracing::warn!(command = kind.name(), error = %why, "key store unavailable");
            Problem::unavailable("the key store is unavailable; retry later", RETRY_AFTER_SECS)
        }
        KeyError::Unreadable(why) => {
            tracing::error!(command = kind.name(), error = %why, "the person's data key is unusable");
            Problem::unavailable("the person's data key cannot be used; retry later", RETRY_AFTER_SECS)
        }
    }
}

/// The four fields every event carries, fixed before the event body is built.
struct Envelope {
    event_id: Uuid,
    person_id: Uuid,
    occurred_at: chrono::DateTime<Utc>,
    correlation_id: String,
}

/// The parts of a command request besides its body: where it was sent, its headers
/// (`Idempotency-Key`, `X-Correlation-Id`) and who sent it.
pub struct CommandContext {
    uri: Uri,
    headers: HeaderMap,
    caller: Option<Caller>,
}

impl<S: Send + Sync> FromRequestParts<S> for CommandContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self {
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            caller: parts.extensions.get::<Caller>().cloned(),
        })
    }
}

/// Who asked, for the event's headers: the log itself is the audit trail of writes.
fn caller_headers(caller: Option<&Caller>) -> Vec<(String, Vec<u8>)> {
    let Some(caller) = caller else { return Vec::new() };
    let mut headers = vec![
        (log::PRINCIPAL_HEADER.to_owned(), caller.principal.id.clone().into_bytes()),
        (log::AUTH_METHOD_HEADER.to_owned(), caller.principal.method.name().as_bytes().to_vec()),
    ];
    if let Some(source) = caller.source {
        headers.push((log::SOURCE_ADDRESS_HEADER.to_owned(), source.to_string().into_bytes()));
    }
    headers
}

/// The `{id}` path segment as a person id; anything else is a 400 naming `id`.
pub struct PersonPath(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for PersonPath {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let ApiPath(params) =
            ApiPath::<std::collections::HashMap<String, String>>::from_request_parts(parts, state).await?;
        let raw = params.get("id").map(String::as_str).unwrap_or_default();
        Uuid::parse_str(raw).map(Self).map_err(|e| {
            Problem::malformed(format!("path segment {raw:?} is not a person id: {e}"))
                .with_field("id", "must be a UUID")
        })
    }
}

/// Builds a `PersonEvent` variant from an [`Envelope`] and the event's own fields.
macro_rules! event {
    ($variant:ident($record:ident), $envelope:expr, { $($field:ident $(: $value:expr)?),* $(,)? }) => {{
        let envelope: Envelope = $envelope;
        PersonEvent::$variant($record {
            event_id: envelope.event_id,
            person_id: envelope.person_id,
            occurred_at: envelope.occurred_at,
            correlation_id: envelope.correlation_id,
            $($field $(: $value)?),*
        })
    }};
}

fn fingerprint(path: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() + body.len() + 1);
    out.extend_from_slice(path.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

fn header_text<'h>(headers: &'h HeaderMap, name: &str, max: usize) -> Result<Option<&'h str>, Problem> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text =
        value.to_str().ok().filter(|t| !t.is_empty() && t.len() <= max && t.bytes().all(|b| b.is_ascii_graphic()));
    text.map(Some).ok_or_else(|| {
        Problem::malformed(format!("header {name} must be 1–{max} visible ASCII characters"))
            .with_field(name, "invalid header value")
    })
}

fn reject<T>(kind: EventKind, result: Result<T, Vec<FieldError>>) -> Result<T, Problem> {
    result.map_err(|errors| {
        metrics::counter!("callisto_commands_total", "command" => kind.name(), "outcome" => "rejected").increment(1);
        Problem::invalid_fields(errors)
    })
}

/// Whose event a command appends.
#[derive(Debug, Clone, Copy)]
enum Subject {
    Person(Uuid),
    /// A registration that lets the writer choose the id. It is chosen once the request is
    /// known to be valid, from the keyring's reserve (see [`Keyring::new_person`]), so a
    /// rejected request takes no key and an accepted one waits on no key store write.
    NewPerson,
}

impl WriterState {
    /// Answers the field errors `checked` collected with a 422; otherwise appends the event
    /// `build` makes and answers 202, or the problem that stopped it.
    async fn command(
        &self,
        ctx: CommandContext,
        subject: Subject,
        kind: EventKind,
        body: &[u8],
        checked: Checker,
        build: impl FnOnce(Envelope) -> PersonEvent,
    ) -> Result<Response, Problem> {
        reject(kind, checked.finish(()))?;
        let headers = &ctx.headers;
        // The method is implied by the path: every command route takes exactly one method.
        let request_fingerprint = fingerprint(ctx.uri.path(), body);
        let outcome = |outcome: &'static str| {
            metrics::counter!("callisto_commands_total", "command" => kind.name(), "outcome" => outcome).increment(1);
        };
        let idempotency = header_text(headers, "Idempotency-Key", MAX_IDEMPOTENCY_KEY_CHARS)
            .inspect_err(|_| outcome("rejected"))?
            .map(|key| IdempotencyKey {
                // Scoped to the caller: two callers' keys never meet.
                key: format!(
                    "{}\n{key}",
                    ctx.caller.as_ref().map_or_else(|| "anonymous".to_owned(), |c| c.principal.qualified())
                ),
                fingerprint: Sha256::digest(&request_fingerprint).into(),
            });
        let correlation_id = match header_text(headers, "X-Correlation-Id", MAX_CORRELATION_ID_CHARS) {
            Ok(Some(id)) => id.to_owned(),
            Ok(None) => Uuid::new_v4().to_string(),
            Err(problem) => {
                outcome("rejected");
                return Err(problem);
            }
        };
        let person_id = match subject {
            Subject::Person(id) => id,
            Subject::NewPerson => self.inner.keyring.new_person(),
        };
        let envelope = Envelope { event_id: Uuid::new_v4(), person_id, occurred_at: Utc::now(), correlation_id };
        let event = build(envelope);
        // Personal fields leave this process sealed. `PersonErased` carries none, and its key
        // is already destroyed.
        let (event, sealed) = if kind == EventKind::PersonErased {
            (event, None)
        } else {
            self.inner.keyring.seal(event).await.map_err(|e| {
                outcome(if matches!(e, KeyError::Erased) { "gone" } else { "unavailable" });
                key_problem(kind, person_id, e)
            })?
        };
        let meta = event.meta();
        let payload = self.inner.codec.encode_sealed(&event, sealed.as_ref()).map_err(|e| {
            tracing::error!(error = %e, "encoding a validated command failed");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", "event could not be encoded")
        })?;
        // The append's producer span; its context travels with the record so every projection
        // joins this command's trace. Without span export the record still gets a fresh one.
        let send = trace::producer_span(self.inner.log.system(), &self.inner.topic);
        let mut trace_context = trace::context_headers(&send);
        if trace_context.is_empty() {
            trace_context.push(("traceparent".into(), traceparent().into_bytes()));
        }
        let mut event_headers = vec![
            ("event_id".into(), meta.event_id.to_string().into_bytes()),
            ("event_type".into(), kind.name().as_bytes().to_vec()),
            ("correlation_id".into(), meta.correlation_id.as_bytes().to_vec()),
        ];
        event_headers.extend(trace_context);
        event_headers.extend(caller_headers(ctx.caller.as_ref()));
        let request = AppendRequest {
            topic: self.inner.topic.clone(),
            key: person_id.to_string().into_bytes(),
            payload,
            headers: event_headers,
            idempotency,
        };
        let (event_id, correlation_id) = (meta.event_id, meta.correlation_id.to_owned());

        let started = Instant::now();
        let appended = self.append_guarded(request).instrument(send.clone()).await;
        metrics::histogram!("callisto_append_seconds").record(started.elapsed().as_secs_f64());
        let appended = match appended {
            Ok(appended) => {
                send.record("messaging.destination.partition.id", appended.partition);
                send.record("messaging.kafka.offset", appended.offset);
                appended
            }
            Err(problem) => {
                trace::record_error(&send, problem.title);
                outcome(if problem.status == 503 { "unavailable" } else { "rejected" });
                return Err(problem);
            }
        };
        let (person_id, event_id) =
            if appended.replayed { self.original_ids(&appended).await? } else { (person_id, event_id) };
        outcome(if appended.replayed { "replayed" } else { "accepted" });
        Ok(accepted_response(kind, person_id, event_id, &appended, &correlation_id))
    }

    /// One append behind the timeout and the circuit breaker.
    async fn append_guarded(&self, request: AppendRequest) -> Result<Appended, Problem> {
        let timeout = self.inner.append_timeout;
        let log = self.inner.log.clone();
        let attempt = async move {
            match tokio::time::timeout(timeout, log.append(request)).await {
                Ok(result) => result,
                Err(_) => Err(LogError::Timeout(timeout)),
            }
        };
        let is_failure = |e: &LogError| e.is_transient();
        match self.inner.breaker.call_with(is_failure, attempt).await {
            Ok(appended) => Ok(appended),
            Err(failsafe::Error::Rejected) => Err(Problem::unavailable(
                "the event log is failing; commands are refused until it recovers",
                RETRY_AFTER_SECS,
            )),
            Err(failsafe::Error::Inner(LogError::IdempotencyConflict(_))) => Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
                "this Idempotency-Key was already used with a different request",
            )
            .with_field("Idempotency-Key", "already used with a different request")),
            Err(failsafe::Error::Inner(LogError::InFlight(_))) => {
                let mut problem = Problem::new(
                    StatusCode::CONFLICT,
                    "idempotency-key-in-use",
                    "Request in progress",
                    "a request with this Idempotency-Key is still being processed; retry shortly",
                );
                problem.retry_after_secs = Some(RETRY_AFTER_SECS);
                Err(problem)
            }
            Err(failsafe::Error::Inner(LogError::Unsupported(why))) => Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unsupported",
                "Not supported by this event log",
                why.clone(),
            )
            .with_field("Idempotency-Key", why)),
            Err(failsafe::Error::Inner(e @ LogError::Timeout(_))) => Err(Problem::unavailable(
                format!("{e}; the command may or may not have been stored, retry with the same Idempotency-Key"),
                RETRY_AFTER_SECS,
            )),
            Err(failsafe::Error::Inner(e)) => {
                tracing::warn!(error = %e, "append failed");
                Err(Problem::unavailable(e.to_string(), RETRY_AFTER_SECS))
            }
        }
    }

    /// The ids of the event an idempotent retry points at, read back from the log.
    async fn original_ids(&self, appended: &Appended) -> Result<(Uuid, Uuid), Problem> {
        let records = self
            .inner
            .log
            .read(&self.inner.topic, appended.partition, appended.offset, 1, Duration::ZERO)
            .await
            .map_err(|e| Problem::unavailable(e.to_string(), RETRY_AFTER_SECS))?;
        let record = records.into_iter().find(|r| r.offset == appended.offset);
        let ids = record.and_then(|r| {
            let person = Uuid::parse_str(std::str::from_utf8(&r.key).ok()?).ok()?;
            let event = Uuid::parse_str(std::str::from_utf8(r.header("event_id")?).ok()?).ok()?;
            Some((person, event))
        });
        ids.ok_or_else(|| {
            Problem::unavailable("the original event of this idempotency key is unreadable", RETRY_AFTER_SECS)
        })
    }
}

/// A fresh W3C trace context for the event, so consumers can join its trace.
fn traceparent() -> String {
    let trace = Uuid::new_v4().simple().to_string();
    let span = &Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

fn accepted_response(
    kind: EventKind,
    person_id: Uuid,
    event_id: Uuid,
    at: &Appended,
    correlation_id: &str,
) -> Response {
    let token = ConsistencyToken { partition: at.partition, offset: at.offset }.to_string();
    let body =
        Accepted { person_id, event_id, partition: at.partition, offset: at.offset, consistency_token: token.clone() };
    let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&token) {
        headers.insert(token::HEADER, value);
    }
    if let Ok(value) = HeaderValue::from_str(correlation_id) {
        headers.insert("x-correlation-id", value);
    }
    if at.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if kind == EventKind::PersonRegistered
        && let Ok(value) = HeaderValue::from_str(&format!("/v1/persons/{person_id}"))
    {
        headers.insert(header::LOCATION, value);
    }
    response
}

const PROBLEM: &str = "application/problem+json";

/// The optional headers every command takes.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKeyHeader {
    /// Retries with the same key get the same answer and append nothing (1–255 visible ASCII),
    /// for `log.idempotency_retention_secs` (24 h); a retry while the first request is still
    /// being appended gets 409 with `Retry-After`.
    #[param(rename = "Idempotency-Key")]
    pub idempotency_key: Option<String>,
    /// Stored in the event and echoed back (1–128 visible ASCII); one is made when absent.
    #[param(rename = "X-Correlation-Id")]
    pub correlation_id: Option<String>,
}

#[utoipa::path(post, path = "/v1/persons", tag = "commands", request_body = RegisterPerson,
    params(IdempotencyKeyHeader),
    responses((status = 202, body = Accepted), (status = "4XX", body = Problem, content_type = PROBLEM),
        (status = 503, body = Problem, content_type = PROBLEM)))]
pub async fn register(
    State(state): State<WriterState>,
    ctx: CommandContext,
    body: ApiJson<RegisterPerson>,
) -> Result<Response, Problem> {
    let cmd = body.value;
    let mut c = Checker::default();
    let given_name = c.text("given_name", &cmd.given_name, MAX_NAME_CHARS, false);
    let family_name = c.text("family_name", &cmd.family_name, MAX_NAME_CHARS, false);
    let email = c.email("email", cmd.email.as_deref());
    let phone = c.phone("phone", cmd.phone.as_deref());
    let date_of_birth = c.date_of_birth("date_of_birth", cmd.date_of_birth.as_deref());
    let address = cmd.address.as_ref().map(|a| c.address("address", a));
    let tags = c.tags("tags", &cmd.tags);
    let subject = cmd.person_id.map_or(Subject::NewPerson, Subject::Person);
    state
        .command(ctx, subject, EventKind::PersonRegistered, &body.raw, c, |e| {
            event!(Registered(PersonRegistered), e, {
                given_name, family_name, email, phone, date_of_birth, address, tags
            })
        })
        .await
}

#[utoipa::path(put, path = "/v1/persons/{id}/name", tag = "commands", request_body = RenamePerson,
    params(("id" = Uuid, Path, description = "the person's id"), IdempotencyKeyHeader),
    responses((status = 202, body = Accepted), (status = "4XX", body = Problem, content_type = PROBLEM),
        (status = 503, body = Problem, content_type = PROBLEM)))]
pub async fn rename(
    State(state): State<WriterState>,
    PersonPath(person_id): PersonPath,
    ctx: CommandContext,
    body: ApiJson<RenamePerson>,
) -> Result<Response, Problem> {
    let mut c = Checker::default();
    let given_name = c.text("given_name", &body.value.given_name, MAX_NAME_CHARS, false);
    let family_name = c.text("family_name", &body.value.family_name, MAX_NAME_CHARS, false);
    state
        .command(
            ctx,
            Subject::Person(person_id),
            EventKind::PersonRenamed,
            &body.raw,
            c,
            |e| event!(Renamed(PersonRenamed), e, { given_name, family_name }),
        )
        .await
}

#[utoipa::path(put, path = "/v1/persons/{id}/contact", tag = "commands", request_body = ChangeContact,
    params(("id" = Uuid, Path, description = "the person's id"), IdempotencyKeyHeader),
    responses((status = 202, body = Accepted), (status = "4XX", body = Problem, content_type = PROBLEM),
        (status = 503, body = Problem, content_type = PROBLEM)))]
pub async fn change_contact(
    State(state): State<WriterState>,
    PersonPath(person_id): PersonPath,
    ctx: CommandContext,
    body: ApiJson<ChangeContact>,
) -> Result<Response, Problem> {
    let mut c = Checker::default();
    if body.value.email.is_none() && body.value.phone.is_none() {
        c.errors.push(FieldError { field: "body".into(), message: "give email, phone or both".into() });
    }
    let email = c.email("email", body.value.email.as_deref());
    let phone = c.phone("phone", body.value.phone.as_deref());
    state
        .command(
            ctx,
            Subject::Person(person_id),
            EventKind::ContactDetailsChanged,
            &body.raw,
            c,
            |e| event!(ContactChanged(ContactDetailsChanged), e, { email, phone }),
        )
        .await
}

#[utoipa::path(put, path = "/v1/persons/{id}/address", tag = "commands", request_body = AddressBody,
    params(("id" = Uuid, Path, description = "the person's id"), IdempotencyKeyHeader),
    responses((status = 202, body = Accepted), (status = "4XX", body = Problem, content_type = PROBLEM),
        (status = 503, body = Problem, content_type = PROBLEM)))]
pub async fn change_address(
    State(state): State<WriterState>,
    PersonPath(person_id): PersonPath,
    ctx: CommandContext,
    body: ApiJson<AddressBody>,
) -> Result<Response, Problem> {
    let mut c = Checker::default();
    let address = c.address("address", &body.value);
    state
        .command(ctx, Subject::Person(person_id), EventKind::AddressChanged, &body.raw, c, |e| {
            event!(AddressChanged(AddressChanged), e, { address })
        })
        .await
}

#[utoipa::path(post, path = "/v1/persons/{id}/notes", tag = "commands", request_body = AddNote,
    params(("id" = Uuid, Path, description = "the person's id"), IdempotencyKeyHeader),
    responses((status = 202, body = Accepted), (status = "4XX", body = Problem, content_type = PROBLEM),
        (status = 503, body = Problem, content_type = PROBLEM)))]
pub async fn add_note(
    State(state): State<WriterState>,
    PersonPath(person_id): PersonPath,
    ctx: CommandContext,
    body: ApiJson<AddNote>,
) -> Result<Response, Problem> {
    let mut c = Checker::default();
    let text = c.text("text", &body.value.text, MAX_NOTE_CHARS, true);
    state
        .command(
            ctx,
            Subject::Person(person_id),
            EventKind::NoteAdded,
            &body.raw,
            c,
            |e| event!(NoteAdded(NoteAdded), e, { note_id: Uuid::new_v4(), text }),
        )
        .await
}

#[utoipa::path(post, path = "/v1/persons/{id}/tags", tag = "commands", request_body = TagBody,
    params(("id" = Uuid, Path, description = "the person's id"), IdempotencyKeyHeader),
    responses((status = 202, body = Accepted), (status = "4XX", body = Problem, content_type = PROBLEM),
        (status = 503, body = Problem, content_type = PROBLEM)))]
pub async fn tag(
    State(state): State<WriterState>,
    PersonPath(person_id): PersonPath,
    ctx: CommandContext,
    body: ApiJson<TagBody>,
) -> Result<Response, Problem> {
    let mut c = Checker::default();
    let tag = c.tag("tag", &body.value.tag);
    state
        .command(ctx, Subject::Person(person_id), EventKind::PersonTagged, &body.raw, c, |e| {
            event!(Tagged(TagChanged), e, { tag })
        })
        .await
}

#[utoipa::path(delete, path = "/v1/persons/{id}/tags/{tag}", tag = "commands",
    params(("id" = Uuid, Path, description = "the person's id"), ("tag" = String, Path, description = "the tag to remove"),
        IdempotencyKeyHeader),
    responses((status = 202, body = Accepted), (status = "4XX", body = Problem, content_type = PROBLEM),
        (status = 503, body = Problem, content_type = PROBLEM)))]
pub async fn untag(
    State(state): State<WriterState>,
    PersonPath(person_id): PersonPath,
    ApiPath(segments): ApiPath<(String, String)>,
    ctx: CommandContext,
) -> Result<Response, Problem> {
    let mut c = Checker::default();
    let tag = c.tag("tag", &segments.1);
    state
        .command(ctx, Subject::Person(person_id), EventKind::PersonUntagged, &[], c, |e| {
            event!(Untagged(TagChanged), e, { tag })
        })
        .await
}

#[utoipa::path(post, path = "/v1/persons/{id}/archive", tag = "commands", request_body = ArchivePerson,
    params(("id" = Uuid, Path, description = "the person's id"), IdempotencyKeyHeader),
    responses((status = 202, body = Accepted), (status = "4XX", body = Problem, content_type = PROBLEM),
        (status = 503, body = Problem, content_type = PROBLEM)))]
pub async fn archive(
    State(state): State<WriterState>,
    PersonPath(person_id): PersonPath,
    ctx: CommandContext,
    body: ApiJsonOrEmpty<ArchivePerson>,
) -> Result<Response, Problem> {
    let mut c = Checker::default();
    let reason = c.optional_text("reason", body.value.reason.as_deref(), MAX_REASON_CHARS);
    state
        .command(ctx, Subject::Person(person_id), EventKind::PersonArchived, &body.raw, c, |e| {
            event!(Archived(PersonArchived), e, { reason })
        })
        .await
}

#[utoipa::path(delete, path = "/v1/persons/{id}", tag = "commands",
    params(("id" = Uuid, Path, description = "the person's id"), IdempotencyKeyHeader),
    responses((status = 202, body = Accepted,
            description = "The person's data key is destroyed and `PersonErased` is appended. Idempotent."),
        (status = "4XX", body = Problem, content_type = PROBLEM),
        (status = 503, body = Problem, content_type = PROBLEM)))]
/// Erases a person: destroys their data key, so every event's personal fields become unreadable
/// everywhere, then appends `PersonErased` so read models drop what they hold. Repeating it is
/// harmless: the key stays destroyed and read models treat a second `PersonErased` as the first.
pub async fn erase(
    State(state): State<WriterState>,
    PersonPath(person_id): PersonPath,
    ctx: CommandContext,
) -> Result<Response, Problem> {
    let kind = EventKind::PersonErased;
    // The key goes first: if the append then fails, a retry appends it, and nothing can be
    // read in the meantime.
    state.inner.keyring.destroy(person_id).await.map_err(|e| key_problem(kind, person_id, e))?;
    // The guard writes the audit line for the request itself (`Rule::ERASE` always audits).
    tracing::info!(%person_id, "data key destroyed");
    state
        .command(ctx, Subject::Person(person_id), kind, &[], Checker::default(), |e| {
            PersonEvent::Erased(PersonErased {
                event_id: e.event_id,
                person_id: e.person_id,
                occurred_at: e.occurred_at,
                correlation_id: e.correlation_id,
            })
        })
        .await
}
