//! Opens the backends: the event log (Kafka when `kafka.brokers` is set) and the embedded
//! stand-ins under `storage.data_dir`:
//! - `log.redb`: the embedded event log;
//! - `schemas.redb`: the schema registry, unless `schema_registry.url` names a
//!   Confluent-compatible one;
//! - `readmodel.redb`: person documents, timelines and their checkpoints;
//! - `search/`: the tantivy index, its checkpoint in its commit payload;
//! - `keys.redb` and `master.key`: the per-person data keys (wrapped) and the master key that
//!   wraps them, unless `privacy.key_store` is `mongodb` and `privacy.master_key_file` is set.
//!
//! Each is locked by the process that opens it: one Callisto process per data dir.
//!
//! With `mongodb.uri` and `elasticsearch.url` set, the projector and query API use MongoDB and
//! Elasticsearch instead of `readmodel.redb` and `search/` ([`open_configured_read_models`]).
//! Either way the read models come in generations for blue/green rebuilds
//! ([`open_generation`], [`generation_pointer`]).

use std::sync::Arc;

use anyhow::Context;
use callisto_avro::{Codec, ConfluentOptions, ConfluentRegistry, EmbeddedRegistry, SchemaRegistry};
use callisto_core::config::Settings;
use callisto_core::log::idempotency::embedded::EmbeddedClaimStore;
use callisto_core::log::idempotency::mongo::MongoClaimStore;
use callisto_core::log::idempotency::{self as claims, ClaimStore};
use callisto_core::log::{EmbeddedLog, EmbeddedLogOptions, EventLog, KafkaLog, KafkaLogOptions};
use std::time::Duration;

use callisto_core::privacy::embedded::EmbeddedKeyStore;
use callisto_core::privacy::mongo::MongoKeyStore;
use callisto_core::privacy::{EventReader, KeyStore, Keyring, KeyringOptions, load_master_key};
use callisto_core::readmodel::elastic::{ElasticGenerations, ElasticOptions, ElasticSearchIndex};
use callisto_core::readmodel::embedded::EmbeddedReadStore;
use callisto_core::readmodel::generations::{GenerationPointer, Pointers};
use callisto_core::readmodel::mongo::{MongoGenerations, MongoOptions, MongoReadStore, connect_database};
use callisto_core::readmodel::search::TantivySearchIndex;
use callisto_core::readmodel::switch::{SwitchedReadStore, SwitchedSearchIndex};
use callisto_core::readmodel::{ReadStore, SearchIndex};
use callisto_core::resilience::BreakerMetrics;

use crate::generations::FilePointer;

pub struct LogSide {
    pub log: Arc<dyn EventLog>,
    pub codec: Arc<Codec>,
    /// Seals events for writers and opens them for readers.
    pub keyring: Arc<Keyring>,
}

impl LogSide {
    /// How readers of the log (projectors, export, dlq) decode and open events.
    pub fn reader(&self) -> Arc<EventReader> {
        Arc::new(EventReader::new(self.codec.clone(), self.keyring.clone()))
    }
}

pub struct EmbeddedReadSide {
    pub store: Arc<EmbeddedReadStore>,
    pub search: Arc<TantivySearchIndex>,
}

fn in_use(what: &str, dir: &std::path::Path) -> String {
    format!("opening the {what} in {} (is another callisto process using this data dir?)", dir.display())
}

/// MongoDB connection options from `mongodb.*`, when `mongodb.uri` is set.
fn mongo_options(settings: &Settings) -> Option<MongoOptions> {
    let m = &settings.mongodb;
    let mut options = MongoOptions::new(m.uri.clone()?, m.database.clone());
    options.write_concern = m.write_concern.clone();
    options.read_concern = m.read_concern.clone();
    options.timeout = Duration::from_millis(m.timeout_ms);
    Some(options)
}

/// The key store `privacy.key_store` names (MongoDB by default when `mongodb.uri` is set) and
/// the master key, behind the [`Keyring`].
pub async fn open_keyring(settings: &Settings) -> anyhow::Result<Arc<Keyring>> {
    let privacy = &settings.privacy;
    let dir = &settings.storage.data_dir;
    let mongo = mongo_options(settings);
    let kind = privacy.key_store.clone().unwrap_or_else(|| if mongo.is_some() { "mongodb" } else { "embedded" }.into());
    let store: Arc<dyn KeyStore> = match kind.as_str() {
        "embedded" => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
            Arc::new(
                EmbeddedKeyStore::open(&dir.join(callisto_core::privacy::embedded::FILE))
                    .with_context(|| in_use("key store", dir))?,
            )
        }
        "mongodb" => {
            let options = mongo.context("privacy.key_store = mongodb needs mongodb.uri")?;
            let db = connect_database(&options).await.context("connecting to MongoDB for the key store")?;
            Arc::new(MongoKeyStore::new(&db))
        }
        other => anyhow::bail!("privacy.key_store must be embedded or mongodb, not {other:?}"),
    };
    // A shared key store needs every process on one master key: a per-process default would let
    // each process wrap keys the others cannot unwrap.
    anyhow::ensure!(
        kind == "embedded" || privacy.master_key_file.is_some(),
        "privacy.master_key_file (CALLISTO__PRIVACY__MASTER_KEY_FILE) must be set with a shared key \
         store: every process must use the same master key; create one with `callisto privacy new-master-key`"
    );
    // Only the default location is created on demand; a configured file must exist.
    let master = load_master_key(&privacy.master_key_path(&settings.storage), privacy.master_key_file.is_none())?;
    let previous = privacy
        .previous_master_key_files
        .iter()
        .map(|path| load_master_key(path, false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let options = KeyringOptions {
        cache_ttl: Duration::from_millis(privacy.key_cache_ttl_ms),
        cache_entries: privacy.key_cache_entries,
        timeout: Duration::from_millis(privacy.timeout_ms),
        ..KeyringOptions::default()
    };
    Ok(Arc::new(Keyring::new(store, master, previous, &options)))
}

/// Where the writer claims idempotency keys: nowhere on the embedded log (it keeps them
/// itself); on Kafka the store `log.idempotency_store` names (MongoDB by default when
/// `mongodb.uri` is set, so writer replicas share it).
pub async fn open_claim_store(settings: &Settings) -> anyhow::Result<Option<Arc<dyn ClaimStore>>> {
    if settings.kafka.brokers.is_none() {
        return Ok(None);
    }
    let dir = &settings.storage.data_dir;
    let mongo = mongo_options(settings);
    let kind = settings
        .log
        .idempotency_store
        .clone()
        .unwrap_or_else(|| if mongo.is_some() { "mongodb" } else { "embedded" }.into());
    let store: Arc<dyn ClaimStore> = match kind.as_str() {
        "embedded" => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
            Arc::new(
                EmbeddedClaimStore::open(&dir.join(claims::embedded::FILE))
                    .with_context(|| in_use("idempotency store", dir))?,
            )
        }
        "mongodb" => {
            let options = mongo.context("log.idempotency_store = mongodb needs mongodb.uri")?;
            let db = connect_database(&options).await.context("connecting to MongoDB for idempotency keys")?;
            let retention = Duration::from_secs(settings.log.idempotency_retention_secs);
            Arc::new(MongoClaimStore::open(&db, retention).await.context("opening the idempotency collection")?)
        }
        other => anyhow::bail!("log.idempotency_store must be embedded or mongodb, not {other:?}"),
    };
    Ok(Some(store))
}

/// A Kafka client pair (producer and admin) on `brokers`, configured by `settings.kafka`.
pub fn kafka_log(settings: &Settings, brokers: &str) -> anyhow::Result<KafkaLog> {
    let kafka = &settings.kafka;
    let mut options = KafkaLogOptions::new(brokers.to_owned());
    options.properties = kafka.properties.clone();
    options.replication_factor = kafka.replication_factor;
    options.min_insync_replicas = kafka.min_insync_replicas;
    options.request_timeout = Duration::from_millis(kafka.request_timeout_ms);
    options.message_timeout = Duration::from_millis(kafka.message_timeout_ms);
    KafkaLog::new(options).context("creating the Kafka clients")
}

pub async fn open_log(settings: &Settings) -> anyhow::Result<LogSide> {
    let dir = &settings.storage.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    let registry: Arc<dyn SchemaRegistry> = match &settings.schema_registry.url {
        Some(url) => {
            let sr = &settings.schema_registry;
            let mut options = ConfluentOptions::new(url.clone());
            options.timeout = std::time::Duration::from_millis(sr.timeout_ms);
            options.basic_auth = sr.username.clone().map(|user| (user, sr.password.clone().unwrap_or_default()));
            Arc::new(
                ConfluentRegistry::with_instrument(options, BreakerMetrics::new("schema registry", "all"))
                    .context("creating the schema registry client")?,
            )
        }
        None => {
            Arc::new(EmbeddedRegistry::open(&dir.join("schemas.redb")).with_context(|| in_use("schema registry", dir))?)
        }
    };
    let codec = Codec::new(registry, &settings.log.topic).context("registering event schemas")?;
    let log: Arc<dyn EventLog> = match &settings.kafka.brokers {
        Some(brokers) => Arc::new(kafka_log(settings, brokers)?),
        None => {
            let options = EmbeddedLogOptions {
                queue_capacity: settings.log.queue_capacity,
                max_batch: settings.log.max_batch,
                idempotency_retention: Duration::from_secs(settings.log.idempotency_retention_secs),
                ..EmbeddedLogOptions::default()
            };
            Arc::new(EmbeddedLog::open(&dir.join("log.redb"), options).with_context(|| in_use("event log", dir))?)
        }
    };
    let keyring = open_keyring(settings).await?;
    Ok(LogSide { log, codec: Arc::new(codec), keyring })
}

/// The read models the projector and query API serve from: MongoDB and Elasticsearch where
/// configured, the live embedded generation otherwise (each independently).
pub struct ReadSide {
    pub store: Arc<dyn ReadStore>,
    pub search: Arc<dyn SearchIndex>,
}

/// What a process does with the read models it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadModelUse {
    /// Projecting into them: progress comes from its own applies.
    Projecting,
    /// Serving reads while projectors elsewhere write: server-backed read models re-read their
    /// checkpoints on a short timer so consistency tokens can be waited on.
    Serving,
}

/// How often a serving process re-reads checkpoints from MongoDB or Elasticsearch.
const CHECKPOINT_POLL: Duration = Duration::from_millis(200);
/// How often processes that read or project re-read the generation pointer on a server.
pub const GENERATION_POLL: Duration = Duration::from_secs(1);

fn elastic_options(settings: &Settings) -> Option<ElasticOptions> {
    let e = &settings.elasticsearch;
    let mut options = ElasticOptions::new(e.url.clone()?);
    options.username = e.username.clone();
    options.password = e.password.clone();
    options.api_key = e.api_key_id.clone().zip(e.api_key_secret.clone());
    options.prefix = e.prefix.clone();
    options.refresh = e.refresh.clone();
    options.timeout = Duration::from_millis(e.timeout_ms);
    options.bulk_max_actions = e.bulk_max_actions;
    options.bulk_max_bytes = e.bulk_max_bytes;
    Some(options)
}

/// Whether either read model lives on a server (MongoDB, Elasticsearch) rather than in the
/// data dir.
pub fn has_server_read_models(settings: &Settings) -> bool {
    settings.mongodb.uri.is_some() || settings.elasticsearch.url.is_some()
}

/// Whether either read model lives in the data dir (redb documents or the tantivy index).
fn has_embedded_read_model(settings: &Settings) -> bool {
    settings.mongodb.uri.is_none() || settings.elasticsearch.url.is_none()
}

/// Where the read models' generations are recorded: MongoDB's pointer document when MongoDB
/// holds the documents, Elasticsearch's (which also moves its read alias) when it holds search,
/// and `generations.json` when either is embedded. The first is the record; a switch writes all.
pub async fn generation_pointer(settings: &Settings) -> anyhow::Result<Arc<dyn GenerationPointer>> {
    let mut pointers: Vec<Arc<dyn GenerationPointer>> = Vec::new();
    if let Some(options) = mongo_options(settings) {
        let db = connect_database(&options).await.context("connecting to MongoDB")?;
        pointers.push(Arc::new(MongoGenerations::new(&db, options.timeout)));
    }
    if let Some(options) = elastic_options(settings) {
        pointers.push(Arc::new(ElasticGenerations::new(&options).context("creating the Elasticsearch client")?));
    }
    if has_embedded_read_model(settings) {
        pointers.push(Arc::new(FilePointer { data_dir: settings.storage.data_dir.clone() }));
    }
    Ok(Arc::new(Pointers(pointers)))
}

/// Opens generation `generation` of both read models, each on its server or in the data dir.
pub async fn open_generation(settings: &Settings, generation: u32, usage: ReadModelUse) -> anyhow::Result<ReadSide> {
    let poll = (usage == ReadModelUse::Serving).then_some(CHECKPOINT_POLL);
    let embedded =
        if has_embedded_read_model(settings) { Some(open_embedded_generation(settings, generation)?) } else { None };
    let embedded = || embedded.as_ref().expect("opened when a server is not configured");
    let store: Arc<dyn ReadStore> = match mongo_options(settings) {
        Some(options) => {
            let options = MongoOptions { checkpoint_poll: poll, generation, ..options };
            MongoReadStore::connect(&options).await.context("connecting to MongoDB")?
        }
        None => embedded().store.clone(),
    };
    let search: Arc<dyn SearchIndex> = match elastic_options(settings) {
        Some(options) => {
            let options = ElasticOptions { checkpoint_poll: poll, generation, ..options };
            ElasticSearchIndex::connect(&options).await.context("connecting to Elasticsearch")?
        }
        None => embedded().search.clone(),
    };
    Ok(ReadSide { store, search })
}

/// Deletes generation `generation` of both read models, wherever each lives.
pub async fn remove_generation(settings: &Settings, generation: u32) -> anyhow::Result<()> {
    if let Some(options) = mongo_options(settings) {
        let db = connect_database(&options).await.context("connecting to MongoDB")?;
        callisto_core::readmodel::mongo::drop_generation(&db, generation).await.context("dropping collections")?;
    }
    if let Some(options) = elastic_options(settings) {
        ElasticGenerations::new(&options)?.drop_generation(generation).await.context("deleting the index")?;
    }
    if has_embedded_read_model(settings) {
        crate::generations::remove(&settings.storage.data_dir, generation)?;
    }
    Ok(())
}

/// The live generation's read models. A serving process on a server follows the generation
/// pointer: when a rebuild elsewhere switches (or rolls back), its readers move within
/// [`GENERATION_POLL`], without a restart.
pub async fn open_configured_read_models(settings: &Settings, usage: ReadModelUse) -> anyhow::Result<ReadSide> {
    let pointer = generation_pointer(settings).await?;
    let live = pointer.load().await.context("reading the live generation")?.live;
    let side = open_generation(settings, live, usage).await?;
    if usage == ReadModelUse::Projecting || !has_server_read_models(settings) {
        return Ok(side);
    }
    let store = Arc::new(SwitchedReadStore::new(side.store));
    let search = Arc::new(SwitchedSearchIndex::new(side.search));
    tokio::spawn(follow_live_generation(
        settings.clone(),
        pointer,
        live,
        Arc::downgrade(&store),
        Arc::downgrade(&search),
    ));
    Ok(ReadSide { store, search })
}

/// Switches `store` and `search` to each new live generation the pointer names, for as long
/// as they are in use.
async fn follow_live_generation(
    settings: Settings,
    pointer: Arc<dyn GenerationPointer>,
    mut live: u32,
    store: std::sync::Weak<SwitchedReadStore>,
    search: std::sync::Weak<SwitchedSearchIndex>,
) {
    let mut every = tokio::time::interval(GENERATION_POLL);
    loop {
        every.tick().await;
        if store.strong_count() == 0 {
            return;
        }
        let now = match pointer.load().await {
            Ok(generations) => generations.live,
            Err(e) => {
                tracing::warn!(error = %e, "reading the live generation failed; readers stay where they are");
                continue;
            }
        };
        if now == live {
            continue;
        }
        match open_generation(&settings, now, ReadModelUse::Serving).await {
            Ok(side) => {
                let (Some(store), Some(search)) = (store.upgrade(), search.upgrade()) else { return };
                store.switch_to(side.store);
                search.switch_to(side.search);
                tracing::info!(from = live, to = now, "readers follow the live generation");
                live = now;
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), generation = now, "opening the live generation failed"),
        }
    }
}

/// The live generation's embedded read models (see [`crate::generations`]).
pub fn open_read_models(settings: &Settings) -> anyhow::Result<EmbeddedReadSide> {
    let live = crate::generations::FilePointer { data_dir: settings.storage.data_dir.clone() }.load()?.live;
    open_embedded_generation(settings, live)
}

pub fn open_embedded_generation(settings: &Settings, generation: u32) -> anyhow::Result<EmbeddedReadSide> {
    let dir = &crate::generations::dir(&settings.storage.data_dir, generation);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let store =
        EmbeddedReadStore::open(&dir.join("readmodel.redb")).with_context(|| in_use("read model store", dir))?;
    let search = TantivySearchIndex::open(&dir.join("search")).with_context(|| in_use("search index", dir))?;
    Ok(EmbeddedReadSide { store: Arc::new(store), search: Arc::new(search) })
}
