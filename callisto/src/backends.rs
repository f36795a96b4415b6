//! Opens the backends: the event log (Kafka when `kafka.brokers` is set) and the embedded
//! stand-ins under `storage.data_dir`:
//! - `log.redb`: the embedded event log;
//! - `schemas.redb`: the schema registry, unless `schema_registry.url` names a
//!   Confluent-compatible one;
//! - `readmodel.redb`: person documents, timelines and their checkpoints;
//! - `search/`: the tantivy index, its checkpoint in its commit payload.
//!
//! Each is locked by the process that opens it: one Callisto process per data dir.
//!
//! With `mongodb.uri` and `elasticsearch.url` set, the projector and query API use MongoDB and
//! Elasticsearch instead of `readmodel.redb` and `search/` ([`open_configured_read_models`]).

use std::sync::Arc;

use anyhow::Context;
use callisto_avro::{Codec, ConfluentOptions, ConfluentRegistry, EmbeddedRegistry, SchemaRegistry};
use callisto_core::config::Settings;
use callisto_core::log::{EmbeddedLog, EmbeddedLogOptions, EventLog, KafkaLog, KafkaLogOptions};
use std::time::Duration;

use callisto_core::readmodel::elastic::{ElasticOptions, ElasticSearchIndex};
use callisto_core::readmodel::embedded::EmbeddedReadStore;
use callisto_core::readmodel::mongo::{MongoOptions, MongoReadStore};
use callisto_core::readmodel::search::TantivySearchIndex;
use callisto_core::readmodel::{ReadStore, SearchIndex};

pub struct LogSide {
    pub log: Arc<dyn EventLog>,
    pub codec: Arc<Codec>,
}

pub struct EmbeddedReadSide {
    pub store: Arc<EmbeddedReadStore>,
    pub search: Arc<TantivySearchIndex>,
}

fn in_use(what: &str, dir: &std::path::Path) -> String {
    format!("opening the {what} in {} (is another callisto process using this data dir?)", dir.display())
}

pub fn open_log(settings: &Settings) -> anyhow::Result<LogSide> {
    let dir = &settings.storage.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    let registry: Arc<dyn SchemaRegistry> = match &settings.schema_registry.url {
        Some(url) => {
            let sr = &settings.schema_registry;
            let mut options = ConfluentOptions::new(url.clone());
            options.timeout = std::time::Duration::from_millis(sr.timeout_ms);
            options.basic_auth = sr.username.clone().map(|user| (user, sr.password.clone().unwrap_or_default()));
            Arc::new(ConfluentRegistry::new(options).context("creating the schema registry client")?)
        }
        None => {
            Arc::new(EmbeddedRegistry::open(&dir.join("schemas.redb")).with_context(|| in_use("schema registry", dir))?)
        }
    };
    let codec = Codec::new(registry, &settings.log.topic).context("registering event schemas")?;
    let log: Arc<dyn EventLog> = match &settings.kafka.brokers {
        Some(brokers) => {
            let kafka = &settings.kafka;
            let mut options = KafkaLogOptions::new(brokers.clone());
            options.properties = kafka.properties.clone();
            options.replication_factor = kafka.replication_factor;
            options.min_insync_replicas = kafka.min_insync_replicas;
            options.request_timeout = std::time::Duration::from_millis(kafka.request_timeout_ms);
            options.message_timeout = std::time::Duration::from_millis(kafka.message_timeout_ms);
            Arc::new(KafkaLog::new(options).context("creating the Kafka clients")?)
        }
        None => {
            let options = EmbeddedLogOptions {
                queue_capacity: settings.log.queue_capacity,
                max_batch: settings.log.max_batch,
                ..EmbeddedLogOptions::default()
            };
            Arc::new(EmbeddedLog::open(&dir.join("log.redb"), options).with_context(|| in_use("event log", dir))?)
        }
    };
    Ok(LogSide { log, codec: Arc::new(codec) })
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

pub async fn open_configured_read_models(settings: &Settings, usage: ReadModelUse) -> anyhow::Result<ReadSide> {
    let poll = (usage == ReadModelUse::Serving).then_some(CHECKPOINT_POLL);
    let embedded = if settings.mongodb.uri.is_none() || settings.elasticsearch.url.is_none() {
        Some(open_read_models(settings)?)
    } else {
        None
    };
    let embedded = || embedded.as_ref().expect("opened when a server is not configured");
    let store: Arc<dyn ReadStore> = match &settings.mongodb.uri {
        Some(uri) => {
            let m = &settings.mongodb;
            let mut options = MongoOptions::new(uri.clone(), m.database.clone());
            options.write_concern = m.write_concern.clone();
            options.read_concern = m.read_concern.clone();
            options.timeout = Duration::from_millis(m.timeout_ms);
            options.checkpoint_poll = poll;
            MongoReadStore::connect(&options).await.context("connecting to MongoDB")?
        }
        None => embedded().store.clone(),
    };
    let search: Arc<dyn SearchIndex> = match &settings.elasticsearch.url {
        Some(url) => {
            let e = &settings.elasticsearch;
            let mut options = ElasticOptions::new(url.clone());
            options.username = e.username.clone();
            options.password = e.password.clone();
            options.api_key = e.api_key_id.clone().zip(e.api_key_secret.clone());
            options.prefix = e.prefix.clone();
            options.refresh = e.refresh.clone();
            options.timeout = Duration::from_millis(e.timeout_ms);
            options.bulk_max_actions = e.bulk_max_actions;
            options.bulk_max_bytes = e.bulk_max_bytes;
            options.checkpoint_poll = poll;
            ElasticSearchIndex::connect(&options).await.context("connecting to Elasticsearch")?
        }
        None => embedded().search.clone(),
    };
    Ok(ReadSide { store, search })
}

/// `what` works on the embedded read models only; with MongoDB or Elasticsearch configured it
/// says so instead of silently using the embedded ones.
pub fn require_embedded_read_models(settings: &Settings, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        settings.mongodb.uri.is_none() && settings.elasticsearch.url.is_none(),
        "{what} works on the embedded read models; with mongodb.uri or elasticsearch.url set, run \
         `callisto projector` and `callisto query-api` instead"
    );
    Ok(())
}

/// The live generation's embedded read models (see [`crate::generations`]).
pub fn open_read_models(settings: &Settings) -> anyhow::Result<EmbeddedReadSide> {
    let live = crate::generations::Generations::load(&settings.storage.data_dir)?.live;
    open_generation(settings, live)
}

pub fn open_generation(settings: &Settings, generation: u32) -> anyhow::Result<EmbeddedReadSide> {
    let dir = &crate::generations::dir(&settings.storage.data_dir, generation);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let store =
        EmbeddedReadStore::open(&dir.join("readmodel.redb")).with_context(|| in_use("read model store", dir))?;
    let search = TantivySearchIndex::open(&dir.join("search")).with_context(|| in_use("search index", dir))?;
    Ok(EmbeddedReadSide { store: Arc::new(store), search: Arc::new(search) })
}
