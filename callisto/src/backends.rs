//! Opens the embedded stand-ins under `storage.data_dir`: the event log (`log.redb`) and the
//! schema registry (`schemas.redb`). Each file is locked by the process that opens it.

use std::sync::Arc;

use anyhow::Context;
use callisto_avro::{Codec, EmbeddedRegistry};
use callisto_core::config::Settings;
use callisto_core::log::{EmbeddedLog, EmbeddedLogOptions, EventLog};

pub struct Embedded {
    pub log: Arc<dyn EventLog>,
    pub codec: Arc<Codec>,
}

impl Embedded {
    pub fn open(settings: &Settings) -> anyhow::Result<Self> {
        let dir = &settings.storage.data_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
        anyhow::ensure!(
            settings.schema_registry.url.is_none(),
            "schema_registry.url is set, but this build only has the embedded registry"
        );
        let registry = EmbeddedRegistry::open(&dir.join("schemas.redb")).with_context(|| {
            format!("opening the schema registry in {} (is another callisto using it?)", dir.display())
        })?;
        let codec = Codec::new(Arc::new(registry), &settings.log.topic).context("registering event schemas")?;
        let options =
            EmbeddedLogOptions { queue_capacity: settings.log.queue_capacity, max_batch: settings.log.max_batch };
        let log = EmbeddedLog::open(&dir.join("log.redb"), options)
            .with_context(|| format!("opening the event log in {} (is another callisto using it?)", dir.display()))?;
        Ok(Self { log: Arc::new(log), codec: Arc::new(codec) })
    }
}
