//! The embedded [`KeyStore`]: one redb file (`keys.redb` in the data dir), person id → JSON
//! [`StoredKey`].
//!
//! redb is copy-on-write: a destroyed key's wrapped bytes stay in free pages until they are
//! reused. [`EmbeddedKeyStore::compact`] packs the file and cuts those pages off, so after it
//! the file holds nothing of a destroyed key.
//!
//! ## Group commit
//! Every new person needs a key on disk before their first event is acknowledged, so key
//! writes are on the command path. They go through a [`GroupCommit`]: every write queued while
//! the previous commit was syncing is applied in one transaction, in arrival order, with one
//! fsync, so concurrent registrations share a commit instead of queueing for one each.

use std::path::Path;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use uuid::Uuid;

use super::{KeyStore, StoredKey};
use crate::group_commit::GroupCommit;
use crate::readmodel::StoreError;
use crate::readmodel::embedded::SharedDb;

/// The file name in the data dir.
pub const FILE: &str = "keys.redb";

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("data_keys");
type KeysTable = redb::ReadOnlyTable<&'static str, &'static [u8]>;

fn unavailable<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Most writes one group commit takes.
const MAX_GROUP: usize = 1024;

/// When a write replaces what is stored.
enum Condition {
    Absent,
    NotDestroyed,
    WrappedBy(String),
}

impl Condition {
    fn holds(&self, current: Option<&StoredKey>) -> bool {
        match self {
            Condition::Absent => current.is_none(),
            Condition::NotDestroyed => !matches!(current, Some(StoredKey::Destroyed { .. })),
            Condition::WrappedBy(from) => matches!(current, Some(StoredKey::Active { kek_id, .. }) if kek_id == from),
        }
    }
}

/// A key write: what to store for the person, and when.
struct KeyWrite {
    person: Uuid,
    key: StoredKey,
    condition: Condition,
}

pub struct EmbeddedKeyStore {
    db: SharedDb,
    writes: GroupCommit<KeyWrite, StoredKey>,
}

impl std::fmt::Debug for EmbeddedKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedKeyStore").finish_non_exhaustive()
    }
}

fn decode(bytes: &[u8]) -> Result<StoredKey, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Unavailable(format!("stored key is corrupt: {e}")))
}

/// redb's page cache for the key store. Its default (1 GiB) would let the cache grow with the
/// number of persons whose keys a rebuild reads. The keyring caches the keys themselves, so this
/// cache only keeps the B-tree's upper pages from being read again.
const CACHE_BYTES: usize = 8 << 20;

impl EmbeddedKeyStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(unavailable)?;
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(KEYS).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        let db = SharedDb::new(db);
        let writes = db.group_commit("callisto-key-writer", MAX_GROUP, None, None, write_group)?;
        Ok(Self { db, writes })
    }

    /// Runs `read` over the keys table in one read transaction, on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&KeysTable) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.db
            .blocking(move |db| {
                let txn = db.begin_read().map_err(unavailable)?;
                read(&txn.open_table(KEYS).map_err(unavailable)?)
            })
            .await
    }

    /// Queues a write for the next group commit and waits for it: what is stored after it.
    async fn write(&self, person: Uuid, key: StoredKey, condition: Condition) -> Result<StoredKey, StoreError> {
        self.writes.submit(KeyWrite { person, key, condition }).await
    }
}

/// Applies `group` in arrival order in one transaction: what is stored after each write.
fn write_group(db: &Database, group: &[KeyWrite]) -> Result<Vec<StoredKey>, StoreError> {
    let txn = db.begin_write().map_err(unavailable)?;
    let stored = {
        let mut table = txn.open_table(KEYS).map_err(unavailable)?;
        group
            .iter()
            .map(|write| {
                let id = write.person.to_string();
                let current = table.get(id.as_str()).map_err(unavailable)?.map(|g| decode(g.value())).transpose()?;
                if write.condition.holds(current.as_ref()) {
                    let bytes = serde_json::to_vec(&write.key).map_err(unavailable)?;
                    table.insert(id.as_str(), bytes.as_slice()).map_err(unavailable)?;
                    Ok(write.key.clone())
                } else {
                    Ok(current.unwrap_or_else(|| write.key.clone()))
                }
            })
            .collect::<Result<Vec<_>, StoreError>>()?
    };
    txn.commit().map_err(unavailable)?;
    Ok(stored)
}

#[async_trait]
impl KeyStore for EmbeddedKeyStore {
    async fn load(&self, person: Uuid) -> Result<Option<StoredKey>, StoreError> {
        self.read(move |table| {
            let found = table.get(person.to_string().as_str()).map_err(unavailable)?;
            found.map(|g| decode(g.value())).transpose()
        })
        .await
    }

    /// One read transaction for the whole batch.
    async fn load_many(&self, persons: &[Uuid]) -> Result<Vec<(Uuid, StoredKey)>, StoreError> {
        let persons = persons.to_vec();
        self.read(move |table| {
            let mut found = Vec::new();
            for person in persons {
                if let Some(stored) = table.get(person.to_string().as_str()).map_err(unavailable)? {
                    found.push((person, decode(stored.value())?));
                }
            }
            Ok(found)
        })
        .await
    }

    async fn insert_if_absent(&self, person: Uuid, key: StoredKey) -> Result<StoredKey, StoreError> {
        self.write(person, key, Condition::Absent).await
    }

    async fn destroy(&self, person: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.write(person, StoredKey::Destroyed { destroyed_at: at }, Condition::NotDestroyed).await.map(drop)
    }

    async fn wrapped_by_other(&self, kek_id: &str, limit: usize) -> Result<Vec<(Uuid, StoredKey)>, StoreError> {
        let kek_id = kek_id.to_owned();
        self.read(move |table| {
            let mut found = Vec::new();
            for entry in table.iter().map_err(unavailable)? {
                let (id, value) = entry.map_err(unavailable)?;
                let key = decode(value.value())?;
                if matches!(&key, StoredKey::Active { kek_id: k, .. } if *k != kek_id) {
                    found.push((Uuid::parse_str(id.value()).map_err(unavailable)?, key));
                    if found.len() >= limit {
                        break;
                    }
                }
            }
            Ok(found)
        })
        .await
    }

    async fn replace_wrapping(&self, person: Uuid, from_kek: &str, key: StoredKey) -> Result<(), StoreError> {
        self.write(person, key, Condition::WrappedBy(from_kek.to_owned())).await.map(drop)
    }

    /// Packs the file so pages freed by destroyed keys are gone from disk.
    async fn compact(&self) -> Result<(), StoreError> {
        self.db.compact().await
    }
}
