//! Generations of the read models, for blue/green rebuilds: which one readers use (`live`),
//! the one kept for rollback (`previous`) and one being built. A [`GenerationPointer`] records
//! them where every process that reads or projects can see them: a file beside the embedded
//! stores, a document in MongoDB, the read alias of Elasticsearch. Switching is one atomic
//! write of the pointer; processes that follow it move to the new generation without a
//! restart.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::StoreError;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generations {
    /// The generation readers use.
    pub live: u32,
    /// The generation readers used before the last switch, kept until `--drop-old`.
    pub previous: Option<u32>,
    /// A rebuild in progress (or interrupted); running `callisto replay` again resumes it.
    pub building: Option<u32>,
}

impl Generations {
    /// The number a new rebuild gets.
    pub fn next(&self) -> u32 {
        [Some(self.live), self.previous, self.building].into_iter().flatten().max().unwrap_or(0) + 1
    }
}

/// Where the generations of a deployment's read models are recorded.
#[async_trait]
pub trait GenerationPointer: Send + Sync + 'static {
    /// The recorded generations; the default (generation 0 live) when none are recorded.
    async fn load(&self) -> Result<Generations, StoreError>;

    /// Records `next` in one atomic write. Where `live` changes, readers that follow the
    /// pointer move with it.
    async fn save(&self, next: &Generations) -> Result<(), StoreError>;
}

/// Pointers saved together (the first is the record, read back by `load`): a deployment with
/// MongoDB and Elasticsearch keeps the generations in MongoDB and moves Elasticsearch's read
/// alias with them.
pub struct Pointers(pub Vec<std::sync::Arc<dyn GenerationPointer>>);

#[async_trait]
impl GenerationPointer for Pointers {
    async fn load(&self) -> Result<Generations, StoreError> {
        match self.0.first() {
            Some(record) => record.load().await,
            None => Ok(Generations::default()),
        }
    }

    async fn save(&self, next: &Generations) -> Result<(), StoreError> {
        for pointer in &self.0 {
            pointer.save(next).await?;
        }
        Ok(())
    }
}
