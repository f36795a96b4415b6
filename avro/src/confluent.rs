//! A Confluent-compatible Schema Registry over HTTP, through `schema_registry_converter`.
//!
//! - Writers register their schemas at start (`POST /subjects/{subject}/versions`, which
//!   returns the existing id for a schema already there) and keep the ids.
//! - Readers fetch a schema the first time they meet its id (`GET /schemas/ids/{id}`) and keep
//!   it: an id never changes meaning in a registry.
//!
//! Every call has a timeout, is retried with jittered exponential back-off when the registry
//! says it may succeed later, and goes through a circuit breaker, so a registry that is down
//! costs callers one fast error rather than a timeout each. The blocking HTTP client runs on a
//! thread of its own: its calls and its drop must happen outside any async runtime.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use apache_avro::Schema;
use backon::{BackoffBuilder, BlockingRetryable, ExponentialBuilder};
use failsafe::CircuitBreaker as _;
use schema_registry_converter::blocking::schema_registry::{SrSettings, get_schema_by_id, post_schema};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use crate::registry::{RegistryError, SchemaRegistry};

/// Where the registry is and how to reach it.
#[derive(Clone)]
pub struct ConfluentOptions {
    pub url: String,
    /// Basic auth (Confluent Cloud: API key and secret).
    pub basic_auth: Option<(String, String)>,
    /// Per HTTP call.
    pub timeout: Duration,
    /// Attempts per operation when the registry answers with a retriable error.
    pub attempts: usize,
}

impl ConfluentOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), basic_auth: None, timeout: Duration::from_secs(5), attempts: 3 }
    }
}

impl std::fmt::Debug for ConfluentOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfluentOptions")
            .field("url", &self.url)
            .field("basic_auth", &self.basic_auth.as_ref().map(|(user, _)| user))
            .field("timeout", &self.timeout)
            .finish()
    }
}

enum Call {
    Register { subject: String, schema: String, reply: mpsc::Sender<Result<u32, SRCError>> },
    ById { id: u32, reply: mpsc::Sender<Result<String, SRCError>> },
}

type Breaker<I> =
    failsafe::StateMachine<failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::EqualJittered>, I>;

/// `I` observes the circuit breaker's transitions (services publish them as metrics).
pub struct ConfluentRegistry<I = ()> {
    options: ConfluentOptions,
    /// To the client thread; `Sender` is `Sync`, so callers share it directly.
    calls: mpsc::Sender<Call>,
    parsed: RwLock<HashMap<u32, Arc<Schema>>>,
    /// (subject, Parsing Canonical Form) → id.
    registered: RwLock<HashMap<(String, String), u32>>,
    breaker: Breaker<I>,
}

impl<I> std::fmt::Debug for ConfluentRegistry<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfluentRegistry").field("options", &self.options).finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable(e.to_string())
}

impl ConfluentRegistry {
    pub fn new(options: ConfluentOptions) -> Result<Self, RegistryError> {
        Self::with_instrument(options, ())
    }
}

impl<I: failsafe::Instrument> ConfluentRegistry<I> {
    /// A client whose circuit breaker reports its transitions to `instrument`.
    pub fn with_instrument(options: ConfluentOptions, instrument: I) -> Result<Self, RegistryError> {
        let (calls, incoming) = mpsc::channel::<Call>();
        let (ready, started) = mpsc::channel::<Result<(), SRCError>>();
        let client_options = options.clone();
        std::thread::Builder::new()
            .name("schema-registry".into())
            .spawn(move || {
                let mut builder = SrSettings::new_builder(client_options.url.clone());
                builder.set_timeout(client_options.timeout);
                if let Some((user, password)) = &client_options.basic_auth {
                    builder.set_basic_authorization(user, Some(password.as_str()));
                }
                let settings = match builder.build() {
                    Ok(settings) => settings,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                // Ends when the registry is dropped (every sender gone).
                for call in incoming {
                    match call {
                        Call::Register { subject, schema, reply } => {
                            let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema);
                            let _ = reply.send(post_schema(&settings, subject, supplied).map(|r| r.id));
                        }
                        Call::ById { id, reply } => {
                            let _ = reply.send(get_schema_by_id(id, &settings).map(|r| r.schema));
                        }
                    }
                }
            })
            .map_err(unavailable)?;
        started.recv().map_err(unavailable)?.map_err(unavailable)?;
        // Whole seconds, first step halved and jittered: open for 1–2 s at first, up to 30 s.
        let backoff = failsafe::backoff::equal_jittered(Duration::from_secs(2), Duration::from_secs(30));
        let policy = failsafe::failure_policy::consecutive_failures(3, backoff);
        Ok(Self {
            options,
            calls,
            parsed: RwLock::new(HashMap::new()),
            registered: RwLock::new(HashMap::new()),
            breaker: failsafe::Config::new().failure_policy(policy).instrument(instrument).build(),
        })
    }

    /// Runs one call on the client thread, waiting at most a little over its HTTP timeout.
    fn call<T>(&self, make: impl Fn(mpsc::Sender<Result<T, SRCError>>) -> Call) -> Result<T, SRCError> {
        let (reply, answer) = mpsc::channel();
        let sent = self.calls.send(make(reply));
        if sent.is_err() {
            return Err(SRCError::non_retryable_without_cause("the schema registry client has stopped"));
        }
        answer
            .recv_timeout(self.options.timeout + Duration::from_secs(1))
            .unwrap_or_else(|_| Err(SRCError::new("no answer from the schema registry in time", None, true)))
    }

    /// Retries what the registry says may succeed later, behind the circuit breaker.
    fn resilient<T>(&self, what: &str, op: impl Fn() -> Result<T, SRCError>) -> Result<T, RegistryError> {
        let delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(self.options.attempts.saturating_sub(1))
            .with_jitter();
        let retried = || op.retry(delays.build()).when(|e: &SRCError| e.retriable).call();
        // Only outages count against the breaker; a 404 or a 409 is an answer.
        match self.breaker.call_with(|e: &SRCError| e.retriable, retried) {
            Ok(value) => Ok(value),
            Err(failsafe::Error::Rejected) => {
                Err(RegistryError::Unavailable(format!("{what}: the schema registry is failing; calls are paused")))
            }
            Err(failsafe::Error::Inner(e)) if e.retriable => Err(RegistryError::Unavailable(format!("{what}: {e}"))),
            Err(failsafe::Error::Inner(e)) => Err(RegistryError::Refused(format!("{what}: {e}"))),
        }
    }
}

impl<I: failsafe::Instrument + Send + Sync> SchemaRegistry for ConfluentRegistry<I> {
    fn register(&self, subject: &str, schema: &Schema) -> Result<u32, RegistryError> {
        let key = (subject.to_owned(), schema.canonical_form());
        if let Some(id) = self.registered.read().ok().and_then(|r| r.get(&key).copied()) {
            return Ok(id);
        }
        let text = serde_json::to_string(schema).map_err(|e| RegistryError::Refused(e.to_string()))?;
        let id = self.resilient(&format!("registering {subject}"), || {
            self.call(|reply| Call::Register { subject: subject.to_owned(), schema: text.clone(), reply })
        })?;
        if let Ok(mut registered) = self.registered.write() {
            registered.insert(key, id);
        }
        if let Ok(mut parsed) = self.parsed.write() {
            parsed.entry(id).or_insert_with(|| Arc::new(schema.clone()));
        }
        Ok(id)
    }

    fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(schema) = self.parsed.read().ok().and_then(|p| p.get(&id).cloned()) {
            return Ok(schema);
        }
        let text = self.resilient(&format!("fetching schema {id}"), || self.call(|reply| Call::ById { id, reply }));
        let text = match text {
            Err(RegistryError::Refused(reason)) if reason.contains("404") => return Err(RegistryError::UnknownId(id)),
            other => other?,
        };
        let schema =
            Arc::new(Schema::parse_str(&text).map_err(|e| RegistryError::Corrupt { id, reason: e.to_string() })?);
        if let Ok(mut parsed) = self.parsed.write() {
            parsed.insert(id, schema.clone());
        }
        Ok(schema)
    }
}
