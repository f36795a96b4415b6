//! The embedded [`ClaimStore`]: one redb file (`idempotency.redb` in the data dir), key →
//! postcard [`Claim`]. One process holds the file, so it serves a single writer process on
//! Kafka; writer replicas share the MongoDB store instead.

use std::path::Path;

use async_trait::async_trait;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{Claim, ClaimStore};
use crate::readmodel::StoreError;
use crate::readmodel::embedded::SharedDb;

/// The file name in the data dir.
pub const FILE: &str = "idempotency.redb";

const CLAIMS: TableDefinition<&str, &[u8]> = TableDefinition::new("claims");

fn unavailable<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn decode(bytes: &[u8]) -> Result<Claim, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Unavailable(format!("stored claim is corrupt: {e}")))
}

pub struct EmbeddedClaimStore {
    db: SharedDb,
}

impl std::fmt::Debug for EmbeddedClaimStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedClaimStore").finish_non_exhaustive()
    }
}

/// redb's page cache for the claims. Its default (1 GiB) would let the cache grow with the
/// claims kept, while each claim is looked up alone, by its key.
const CACHE_BYTES: usize = 8 << 20;

impl EmbeddedClaimStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(unavailable)?;
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(CLAIMS).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        Ok(Self { db: SharedDb::new(db) })
    }

    /// Runs `change` on the claim under `key` in one write transaction: it returns what to store
    /// (`Some`), to delete (`None`), and the answer.
    async fn update<T: Send + 'static>(
        &self,
        key: &str,
        change: impl FnOnce(Option<Claim>) -> (Option<Option<Claim>>, T) + Send + 'static,
    ) -> Result<T, StoreError> {
        let key = key.to_owned();
        self.db
            .blocking(move |db| {
                let txn = db.begin_write().map_err(unavailable)?;
                let answer = {
                    let mut table = txn.open_table(CLAIMS).map_err(unavailable)?;
                    let current =
                        table.get(key.as_str()).map_err(unavailable)?.map(|g| decode(g.value())).transpose()?;
                    let (write, answer) = change(current);
                    match write {
                        Some(Some(claim)) => {
                            let bytes = postcard::to_allocvec(&claim).map_err(unavailable)?;
                            table.insert(key.as_str(), bytes.as_slice()).map_err(unavailable)?;
                        }
                        Some(None) => {
                            table.remove(key.as_str()).map_err(unavailable)?;
                        }
                        None => {}
                    }
                    answer
                };
                txn.commit().map_err(unavailable)?;
                Ok(answer)
            })
            .await
    }
}

#[async_trait]
impl ClaimStore for EmbeddedClaimStore {
    async fn claim(&self, key: &str, claim: &Claim) -> Result<Option<Claim>, StoreError> {
        let claim = claim.clone();
        self.update(key, move |current| match current {
            Some(existing) => (None, Some(existing)),
            None => (Some(Some(claim)), None),
        })
        .await
    }

    async fn replace(&self, key: &str, owner: &str, claim: &Claim) -> Result<bool, StoreError> {
        let (owner, claim) = (owner.to_owned(), claim.clone());
        self.update(key, move |current| match current {
            Some(existing) if existing.owner == owner => (Some(Some(claim)), true),
            _ => (None, false),
        })
        .await
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        let owner = owner.to_owned();
        self.update(key, move |current| match current {
            Some(existing) if existing.owner == owner => (Some(None), ()),
            _ => (None, ()),
        })
        .await
    }

    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.db
            .blocking(move |db| {
                let txn = db.begin_write().map_err(unavailable)?;
                let purged = {
                    let mut table = txn.open_table(CLAIMS).map_err(unavailable)?;
                    let before = table.len().map_err(unavailable)?;
                    table
                        .retain(|_, value| decode(value).map_or(true, |claim| claim.claimed_at_ms >= before_ms))
                        .map_err(unavailable)?;
                    before - table.len().map_err(unavailable)?
                };
                txn.commit().map_err(unavailable)?;
                Ok(purged)
            })
            .await
    }
}
