//! Layered settings: built-in defaults, then an optional TOML file, then `CALLISTO__SECTION__KEY`
//! environment variables, then command-line flags. Unknown keys anywhere are an error, so a typo
//! never silently falls back to a default.
//!
//! Every environment variable Callisto reads is listed in [`ENVIRONMENT`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Every setting as its environment variable, with what it does. The README's configuration
/// reference is generated from the same names.
pub const ENVIRONMENT: &[(&str, &str)] = &[
    ("CALLISTO__HTTP__LISTEN", "address the HTTP server binds, e.g. 127.0.0.1:8080"),
    ("CALLISTO__HTTP__BODY_LIMIT_BYTES", "largest request body accepted; larger ones get 413"),
    ("CALLISTO__STORAGE__DATA_DIR", "directory holding embedded state (log, registry)"),
    ("CALLISTO__LOG__TOPIC", "topic person events are appended to"),
    ("CALLISTO__LOG__PARTITIONS", "partition count used when the topic is created"),
    ("CALLISTO__LOG__APPEND_TIMEOUT_MS", "how long a command waits for a durable append before 503"),
    ("CALLISTO__LOG__QUEUE_CAPACITY", "appends queued for group commit before new ones get 503"),
    ("CALLISTO__LOG__MAX_BATCH", "most appends committed in one group commit"),
    ("CALLISTO__LOG__IDEMPOTENCY_RETENTION_SECS", "how long an Idempotency-Key is remembered (default 24 h)"),
    ("CALLISTO__LOG__IDEMPOTENCY_STORE", "embedded or mongodb: where writers on Kafka claim idempotency keys"),
    ("CALLISTO__KAFKA__BROKERS", "Kafka bootstrap servers; unset uses the embedded log"),
    ("CALLISTO__KAFKA__REPLICATION_FACTOR", "replication factor for topics Callisto creates"),
    ("CALLISTO__KAFKA__MIN_INSYNC_REPLICAS", "min.insync.replicas for topics Callisto creates"),
    ("CALLISTO__KAFKA__REQUEST_TIMEOUT_MS", "bound on every Kafka request"),
    ("CALLISTO__KAFKA__MESSAGE_TIMEOUT_MS", "how long the producer tries to deliver an append"),
    ("CALLISTO__QUERY__CONSISTENCY_WAIT_MS", "longest wait of a read for its consistency token"),
    ("CALLISTO__SCHEMA_REGISTRY__URL", "Confluent-compatible registry; unset uses the embedded one"),
    ("CALLISTO__SCHEMA_REGISTRY__USERNAME", "registry basic-auth user (Confluent Cloud API key)"),
    ("CALLISTO__SCHEMA_REGISTRY__PASSWORD", "registry basic-auth password (API secret); never printed"),
    ("CALLISTO__SCHEMA_REGISTRY__TIMEOUT_MS", "bound on every registry call"),
    ("CALLISTO__MONGODB__URI", "MongoDB URI for the document read model; unset uses the embedded store"),
    ("CALLISTO__MONGODB__DATABASE", "MongoDB database holding persons, timeline and checkpoints"),
    ("CALLISTO__MONGODB__WRITE_CONCERN", "majority (default) or a node count"),
    ("CALLISTO__MONGODB__READ_CONCERN", "majority (default), local, …"),
    ("CALLISTO__MONGODB__TIMEOUT_MS", "bound on every MongoDB call"),
    ("CALLISTO__ELASTICSEARCH__URL", "Elasticsearch URL for search; unset uses the embedded index"),
    ("CALLISTO__ELASTICSEARCH__USERNAME", "Elasticsearch basic-auth user"),
    ("CALLISTO__ELASTICSEARCH__PASSWORD", "Elasticsearch basic-auth password; never printed"),
    ("CALLISTO__ELASTICSEARCH__API_KEY_ID", "Elastic Cloud API key id (instead of basic auth)"),
    ("CALLISTO__ELASTICSEARCH__API_KEY_SECRET", "Elastic Cloud API key secret; never printed"),
    ("CALLISTO__ELASTICSEARCH__PREFIX", "prefix of Callisto's index, alias and template names"),
    ("CALLISTO__ELASTICSEARCH__REFRESH", "bulk refresh policy: wait_for (default), true or false"),
    ("CALLISTO__ELASTICSEARCH__TIMEOUT_MS", "bound on every Elasticsearch call"),
    ("CALLISTO__HTTP__TLS__CERT_FILE", "PEM certificate chain; with key_file, every listener serves HTTPS only"),
    ("CALLISTO__HTTP__TLS__KEY_FILE", "PEM private key of the certificate; never printed"),
    (
        "CALLISTO__HTTP__TLS__CLIENT_CA_FILE",
        "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)",
    ),
    ("CALLISTO__HTTP__TLS__RELOAD_SECS", "how often the certificate files are checked for changes"),
    ("CALLISTO__HTTP__CORS_ORIGINS", "origins allowed by CORS, comma separated; CORS is off when empty"),
    ("CALLISTO__AUTH__API_KEYS_FILE", "API key file (hashes only); default DATA_DIR/api-keys.json; reloaded on change"),
    ("CALLISTO__AUTH__AUDIT_PERSON_READS", "true to write an audit line for every read of one person's document"),
    ("CALLISTO__AUTH__JWT__ISSUER", "expected `iss` of bearer tokens; with discovery, the OIDC issuer URL"),
    ("CALLISTO__AUTH__JWT__AUDIENCE", "expected `aud` of bearer tokens, comma separated"),
    ("CALLISTO__AUTH__JWT__JWKS_URL", "JWKS URL of the token issuer"),
    ("CALLISTO__AUTH__JWT__DISCOVERY", "true to find the JWKS through ISSUER/.well-known/openid-configuration"),
    ("CALLISTO__AUTH__JWT__KEYS_FILE", "static verification keys: a PEM public key or a JWKS file"),
    ("CALLISTO__AUTH__JWT__SCOPE_CLAIM", "claim holding the token's scopes; default `scope`, then `scp`"),
    ("CALLISTO__AUTH__JWT__LEEWAY_SECS", "clock skew allowed on exp and nbf"),
    ("CALLISTO__AUTH__JWT__JWKS_MIN_REFETCH_MS", "floor on JWKS refetches caused by unknown key ids"),
    ("CALLISTO__AUTH__JWT__JWKS_REFRESH_SECS", "how often cached JWKS keys are refreshed"),
    ("CALLISTO__AUTH__JWT__TIMEOUT_MS", "bound on every JWKS and discovery call"),
    ("CALLISTO__AUTH__LIMITS__COMMANDS__PER_SECOND", "commands per second per caller (also READS, SEARCH, ADMIN)"),
    ("CALLISTO__AUTH__LIMITS__COMMANDS__BURST", "commands a caller may send at once (also READS, SEARCH, ADMIN)"),
    (
        "CALLISTO__AUTH__LIMITS__ANONYMOUS__PER_SECOND",
        "requests per second per source address without valid credentials",
    ),
    ("CALLISTO__PRIVACY__KEY_STORE", "embedded or mongodb; where per-person data keys live"),
    ("CALLISTO__PRIVACY__MASTER_KEY_FILE", "file with the 64-hex-digit master key that wraps data keys"),
    ("CALLISTO__PRIVACY__KEY_CACHE_TTL_MS", "how long a data key is cached; bounds use after erasure"),
    ("CALLISTO__PRIVACY__COMPACT_AFTER_ERASURE_SECS", "compaction period of embedded stores after an erasure"),
    ("CALLISTO__TELEMETRY__LOG_FORMAT", "json or text (default: text on a terminal, json otherwise)"),
    ("CALLISTO__TELEMETRY__LOG_LEVEL", "tracing filter, e.g. info or callisto_core=debug"),
    ("CALLISTO__TELEMETRY__OTLP_ENDPOINT", "OTLP/HTTP collector URL; spans are exported when set"),
    ("CALLISTO__TELEMETRY__OTLP_TIMEOUT_MS", "bound on one span export request"),
    ("CALLISTO__TELEMETRY__TRACE_SAMPLE_RATIO", "share of new traces sampled, 0.0 to 1.0"),
    ("CALLISTO__SERVER__ROLE", "primary (default) takes commands; standby refuses them and serves reads"),
    ("CALLISTO__SERVER__PRIMARY_URL", "the primary's command API, named in a standby's refusals"),
];

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub http: HttpSettings,
    pub storage: StorageSettings,
    pub log: LogSettings,
    pub schema_registry: SchemaRegistrySettings,
    pub kafka: KafkaSettings,
    pub query: QuerySettings,
    pub mongodb: MongoSettings,
    pub elasticsearch: ElasticsearchSettings,
    pub telemetry: TelemetrySettings,
    pub auth: AuthSettings,
    pub privacy: PrivacySettings,
}

/// Which site this deployment is: the primary takes commands; a standby (a second site whose
/// topic is replicated from the primary's cluster) serves reads and keeps its read models
/// current, and refuses commands naming the primary. Promotion is a config change and restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub role: Role,
    /// The primary's command API (`https://callisto.primary.example`), named in every refusal
    /// a standby answers.
    pub primary_url: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Primary,
    Standby,
}

/// Crypto-shredding: where data keys live and the master key that wraps them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacySettings {
    /// `embedded` (`DATA_DIR/keys.redb`) or `mongodb` (a `keys` collection in `mongodb.database`).
    /// Default: `mongodb` when `mongodb.uri` is set, else `embedded`. Every process that writes
    /// or reads events must share one key store.
    pub key_store: Option<String>,
    /// The master key (64 hex digits in a file, e.g. a mounted Secret). Default
    /// `DATA_DIR/master.key`, created on first start when missing.
    pub master_key_file: Option<PathBuf>,
    /// Master keys rotated out, still used to unwrap keys `callisto privacy rewrap` has not
    /// re-wrapped yet.
    pub previous_master_key_files: Vec<PathBuf>,
    /// How long an unwrapped data key is used without asking the key store: the bound on how
    /// long another process may still seal or open with a key after it is destroyed.
    pub key_cache_ttl_ms: u64,
    /// Persons whose key state is cached per process.
    pub key_cache_entries: usize,
    /// Bound on every key store call.
    pub timeout_ms: u64,
    /// How often a process running projectors compacts its read models and key store after its
    /// projections applied an erasure, so erased data leaves the disk files; 0 turns the
    /// schedule off (`callisto privacy compact` and the admin route remain).
    pub compact_after_erasure_secs: u64,
}

impl Default for PrivacySettings {
    fn default() -> Self {
        Self {
            key_store: None,
            master_key_file: None,
            previous_master_key_files: Vec::new(),
            key_cache_ttl_ms: 30_000,
            key_cache_entries: 100_000,
            timeout_ms: 3_000,
            compact_after_erasure_secs: 300,
        }
    }
}

impl PrivacySettings {
    pub fn master_key_path(&self, storage: &StorageSettings) -> PathBuf {
        self.master_key_file.clone().unwrap_or_else(|| storage.data_dir.join(crate::privacy::MASTER_KEY_FILE))
    }
}

/// Who may call Callisto: API keys, bearer JWTs, and the rate limits every caller gets.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// The API key file (hashes, never keys); `DATA_DIR/api-keys.json` when unset.
    pub api_keys_file: Option<PathBuf>,
    /// Audit every read of a single person's document, not only admin actions and refusals.
    pub audit_person_reads: bool,
    pub jwt: JwtSettings,
    pub limits: LimitSettings,
}

impl AuthSettings {
    pub fn api_keys_path(&self, storage: &StorageSettings) -> PathBuf {
        self.api_keys_file.clone().unwrap_or_else(|| storage.data_dir.join(crate::auth::keys::KEYS_FILE))
    }
}

/// Bearer tokens from an OIDC provider or signed with static keys. Off unless `issuer` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JwtSettings {
    pub issuer: Option<String>,
    #[serde(deserialize_with = "comma_list")]
    pub audience: Vec<String>,
    pub jwks_url: Option<String>,
    pub discovery: bool,
    pub keys_file: Option<PathBuf>,
    pub scope_claim: Option<String>,
    pub leeway_secs: u64,
    /// Cached keys are refreshed this often, even when no unknown `kid` arrives.
    pub jwks_refresh_secs: u64,
    pub jwks_min_refetch_ms: u64,
    pub timeout_ms: u64,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            issuer: None,
            audience: Vec::new(),
            jwks_url: None,
            discovery: false,
            keys_file: None,
            scope_claim: None,
            leeway_secs: 30,
            jwks_refresh_secs: 300,
            jwks_min_refetch_ms: 10_000,
            timeout_ms: 5_000,
        }
    }
}

impl JwtSettings {
    pub fn enabled(&self) -> bool {
        self.issuer.is_some()
    }
}

/// A token bucket: `per_second` refill, `burst` at once.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub per_second: u32,
    pub burst: u32,
}

/// One budget per route group and caller, so a caller hammering one never slows another.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    pub commands: Limit,
    pub reads: Limit,
    pub search: Limit,
    pub admin: Limit,
    /// Per source address, for requests without valid credentials.
    pub anonymous: Limit,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            commands: Limit { per_second: 500, burst: 1000 },
            reads: Limit { per_second: 1000, burst: 2000 },
            search: Limit { per_second: 200, burst: 400 },
            admin: Limit { per_second: 20, burst: 40 },
            anonymous: Limit { per_second: 10, burst: 20 },
        }
    }
}

/// TLS for every listener of the process; plain HTTP when `cert_file` is unset.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Clients must present a certificate signed by one of these CAs (mTLS).
    pub client_ca_file: Option<PathBuf>,
    pub reload_secs: u64,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self { cert_file: None, key_file: None, client_ca_file: None, reload_secs: 10 }
    }
}

/// Paths only; the key file's content never passes through here.
impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("client_ca_file", &self.client_ca_file)
            .field("reload_secs", &self.reload_secs)
            .finish()
    }
}

impl TlsSettings {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }
}

/// A list from a TOML array or a comma-separated environment variable.
fn comma_list<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(de)? {
        OneOrMany::One(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
        OneOrMany::Many(v) => v,
    })
}

/// The MongoDB document read model; the embedded store when `uri` is unset.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MongoSettings {
    pub uri: Option<String>,
    pub database: String,
    pub write_concern: String,
    pub read_concern: String,
    pub timeout_ms: u64,
}

impl Default for MongoSettings {
    fn default() -> Self {
        Self {
            uri: None,
            database: "callisto".into(),
            write_concern: "majority".into(),
            read_concern: "majority".into(),
            timeout_ms: 10_000,
        }
    }
}

/// A URI's credentials never print.
impl std::fmt::Debug for MongoSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let uri = self.uri.as_ref().map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => format!("{}://<redacted>@{}", &u[..scheme], &u[at + 1..]),
            _ => u.clone(),
        });
        f.debug_struct("MongoSettings")
            .field("uri", &uri)
            .field("database", &self.database)
            .field("write_concern", &self.write_concern)
            .field("read_concern", &self.read_concern)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// The Elasticsearch search read model; the embedded index when `url` is unset.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ElasticsearchSettings {
    pub url: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub api_key_id: Option<String>,
    pub api_key_secret: Option<String>,
    pub prefix: String,
    pub refresh: String,
    pub timeout_ms: u64,
    pub bulk_max_actions: usize,
    pub bulk_max_bytes: usize,
}

impl Default for ElasticsearchSettings {
    fn default() -> Self {
        Self {
            url: None,
            username: None,
            password: None,
            api_key_id: None,
            api_key_secret: None,
            prefix: "callisto".into(),
            refresh: "wait_for".into(),
            timeout_ms: 30_000,
            bulk_max_actions: 1000,
            bulk_max_bytes: 5 * 1024 * 1024,
        }
    }
}

/// Secrets never print.
impl std::fmt::Debug for ElasticsearchSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("ElasticsearchSettings")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("api_key_id", &self.api_key_id)
            .field("api_key_secret", &redacted(&self.api_key_secret))
            .field("prefix", &self.prefix)
            .field("refresh", &self.refresh)
            .field("timeout_ms", &self.timeout_ms)
            .finish_non_exhaustive()
    }
}

/// Kafka as the event log. Unset `brokers` means the embedded log.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    pub brokers: Option<String>,
    /// librdkafka properties passed through to every client (security.protocol, sasl.*, ssl.*).
    pub properties: std::collections::BTreeMap<String, String>,
    pub replication_factor: i32,
    pub min_insync_replicas: Option<u32>,
    pub request_timeout_ms: u64,
    pub message_timeout_ms: u64,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: None,
            properties: Default::default(),
            replication_factor: 3,
            min_insync_replicas: Some(2),
            request_timeout_ms: 10_000,
            message_timeout_ms: 30_000,
        }
    }
}

/// Pass-through properties may hold credentials (`sasl.password`), so only their names print.
impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .field("replication_factor", &self.replication_factor)
            .field("min_insync_replicas", &self.min_insync_replicas)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuerySettings {
    /// How long a read carrying a consistency token waits for the projections to reach it.
    pub consistency_wait_ms: u64,
}

impl Default for QuerySettings {
    fn default() -> Self {
        Self { consistency_wait_ms: 5_000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    pub listen: String,
    pub body_limit_bytes: usize,
    pub tls: TlsSettings,
    /// Origins allowed to call from a browser; CORS answers nothing when empty.
    #[serde(deserialize_with = "comma_list")]
    pub cors_origins: Vec<String>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            body_limit_bytes: 256 * 1024,
            tls: TlsSettings::default(),
            cors_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    pub data_dir: PathBuf,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self { data_dir: PathBuf::from("./data") }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub topic: String,
    pub partitions: u32,
    pub append_timeout_ms: u64,
    pub queue_capacity: usize,
    pub max_batch: usize,
    /// How long an `Idempotency-Key` is remembered; a retry after this appends again.
    pub idempotency_retention_secs: u64,
    /// Where writers on Kafka claim idempotency keys: `embedded` (`DATA_DIR/idempotency.redb`,
    /// one writer process) or `mongodb` (shared by writer replicas). Default: `mongodb` when
    /// `mongodb.uri` is set, else `embedded`. The embedded log keeps keys itself.
    pub idempotency_store: Option<String>,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            topic: "persons".into(),
            partitions: 12,
            append_timeout_ms: 5_000,
            queue_capacity: 8192,
            max_batch: 1024,
            idempotency_retention_secs: 24 * 3600,
            idempotency_store: None,
        }
    }
}

#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaRegistrySettings {
    /// A Confluent-compatible Schema Registry; the embedded registry when unset.
    pub url: Option<String>,
    /// Basic auth (Confluent Cloud: the API key and secret).
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeout_ms: u64,
}

impl Default for SchemaRegistrySettings {
    fn default() -> Self {
        Self { url: None, username: None, password: None, timeout_ms: 5_000 }
    }
}

/// The password never prints.
impl std::fmt::Debug for SchemaRegistrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistrySettings")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `json` or `text`; unset, text on a terminal and JSON otherwise (a log collector).
    pub log_format: Option<LogFormat>,
    /// Callisto's own level or a full filter. Libraries (tantivy, hyper, rdkafka, the MongoDB
    /// and Elasticsearch clients) log at `warn` unless the filter names them.
    pub log_level: String,
    /// OTLP/HTTP collector base URL (`http://collector:4318`); spans are exported to
    /// `{otlp_endpoint}/v1/traces` when set, and not created at all otherwise.
    pub otlp_endpoint: Option<String>,
    /// Bound on one export request to the collector.
    pub otlp_timeout_ms: u64,
    /// Share of new traces sampled (0.0–1.0); a caller's `traceparent` decision is kept.
    pub trace_sample_ratio: f64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: None,
            log_level: "info".into(),
            otlp_endpoint: None,
            otlp_timeout_ms: 5_000,
            trace_sample_ratio: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

impl Settings {
    /// Builds settings from the layers. `overrides` are (dotted key, value) pairs from flags,
    /// applied last.
    pub fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> anyhow::Result<Self> {
        Self::load_from(file, overrides, config::Environment::with_prefix("CALLISTO"))
    }

    fn load_from(file: Option<&Path>, overrides: &[(&str, String)], env: config::Environment) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml).required(true));
        }
        builder = builder.add_source(env.prefix_separator("__").separator("__").try_parsing(true));
        for (key, value) in overrides {
            builder = builder.set_override(*key, value.as_str())?;
        }
        let settings: Settings =
            builder.build().context("reading configuration")?.try_deserialize().context("invalid configuration")?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let telemetry = &self.telemetry;
        anyhow::ensure!(
            (0.0..=1.0).contains(&telemetry.trace_sample_ratio),
            "telemetry.trace_sample_ratio {} is not between 0 and 1",
            telemetry.trace_sample_ratio
        );
        if let Some(endpoint) = &telemetry.otlp_endpoint {
            anyhow::ensure!(
                endpoint.starts_with("http://") || endpoint.starts_with("https://"),
                "telemetry.otlp_endpoint {endpoint:?} is not an http(s) URL like http://collector:4318"
            );
        }
        anyhow::ensure!(
            self.http.listen.parse::<SocketAddr>().is_ok(),
            "http.listen {:?} is not an address like 127.0.0.1:8080",
            self.http.listen
        );
        anyhow::ensure!(self.http.body_limit_bytes >= 1024, "http.body_limit_bytes must be at least 1024");
        anyhow::ensure!(
            !self.log.topic.is_empty() && self.log.topic.len() <= 249,
            "log.topic must be 1 to 249 characters"
        );
        anyhow::ensure!(
            self.log.topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "log.topic may hold only ASCII letters, digits, '.', '_' and '-'"
        );
        anyhow::ensure!(self.log.partitions >= 1, "log.partitions must be at least 1");
        anyhow::ensure!(self.log.append_timeout_ms >= 1, "log.append_timeout_ms must be at least 1");
        anyhow::ensure!(self.log.queue_capacity >= 1 && self.log.max_batch >= 1, "log queue sizes must be at least 1");
        let tls = &self.http.tls;
        anyhow::ensure!(
            tls.cert_file.is_some() == tls.key_file.is_some(),
            "http.tls.cert_file and http.tls.key_file go together"
        );
        anyhow::ensure!(
            tls.client_ca_file.is_none() || tls.enabled(),
            "http.tls.client_ca_file (mTLS) needs http.tls.cert_file and key_file"
        );
        let jwt = &self.auth.jwt;
        if jwt.enabled() {
            anyhow::ensure!(!jwt.audience.is_empty(), "auth.jwt.audience must be set with auth.jwt.issuer");
            anyhow::ensure!(
                jwt.jwks_url.is_some() || jwt.discovery || jwt.keys_file.is_some(),
                "auth.jwt needs jwks_url, discovery = true or keys_file to verify tokens"
            );
        }
        let limits = &self.auth.limits;
        for (name, limit) in [
            ("commands", limits.commands),
            ("reads", limits.reads),
            ("search", limits.search),
            ("admin", limits.admin),
            ("anonymous", limits.anonymous),
        ] {
            anyhow::ensure!(
                limit.per_second >= 1 && limit.burst >= 1,
                "auth.limits.{name} must be at least 1/s, burst 1"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> config::Environment {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        config::Environment::with_prefix("CALLISTO").source(Some(map))
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("callisto.toml");
        std::fs::write(&file, "[log]\ntopic = \"from-file\"\npartitions = 6\n[http]\nlisten = \"127.0.0.1:9000\"\n")
            .unwrap();
        let settings = Settings::load_from(
            Some(&file),
            &[("http.listen", "127.0.0.1:9100".into())],
            env(&[("CALLISTO__LOG__PARTITIONS", "24")]),
        )
        .unwrap();
        assert_eq!(settings.log.topic, "from-file");
        assert_eq!(settings.log.partitions, 24, "environment beats file");
        assert_eq!(settings.http.listen, "127.0.0.1:9100", "flags beat everything");
        assert_eq!(settings.log.append_timeout_ms, LogSettings::default().append_timeout_ms);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Settings::load_from(None, &[], env(&[("CALLISTO__LOG__PARTITONS", "3")])).unwrap_err();
        assert!(format!("{err:#}").contains("partitons"), "{err:#}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[htp]\nlisten = \"x\"\n").unwrap();
        assert!(Settings::load_from(Some(&file), &[], env(&[])).is_err());
    }

    #[test]
    fn kafka_properties_pass_through_from_the_file_and_do_not_print() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[kafka]\nbrokers = \"b1:9092\"\n[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.password\" = \"hunter2\"\n",
        )
        .unwrap();
        let settings = Settings::load_from(Some(&file), &[], env(&[])).unwrap();
        assert_eq!(settings.kafka.properties.get("security.protocol").map(String::as_str), Some("SASL_SSL"));
        assert!(!format!("{settings:?}").contains("hunter2"), "secrets never print");
    }

    #[test]
    fn invalid_values_are_rejected() {
        assert!(Settings::load_from(None, &[("log.partitions", "0".into())], env(&[])).is_err());
        assert!(Settings::load_from(None, &[("http.listen", "nowhere".into())], env(&[])).is_err());
        assert!(Settings::load_from(None, &[("log.topic", "bad topic".into())], env(&[])).is_err());
    }
}
