//! The embedded [`KeyStore`]: one redb file (`keys.redb` in the data dir), person id → JSON
//! [`StoredKey`].
//!
//! redb is copy-on-write: a destroyed key's wrapped bytes stay in free pages until they are
//! reused. [`EmbeddedKeyStore::compact`] packs the file and cuts those pages off, so after it
//! the file holds nothing of a destroyed key.

use std::path::Path;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use uuid::Uuid;

use super::{KeyStore, StoredKey};
use crate::readmodel::StoreError;
use crate::readmodel::embedded::SharedDb;

/// The file name in the data dir.
pub const FILE: &str = "keys.redb";

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("data_keys");

fn unavailable<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

pub struct EmbeddedKeyStore {
    db: SharedDb,
}

impl std::fmt::Debug for EmbeddedKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedKeyStore").finish_non_exhaustive()
    }
}

fn decode(bytes: &[u8]) -> Result<StoredKey, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Unavailable(format!("stored key is corrupt: {e}")))
}

impl EmbeddedKeyStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(unavailable)?;
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(KEYS).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        Ok(Self { db: SharedDb::new(db) })
    }

    fn write(
        db: &Database,
        person: Uuid,
        key: &StoredKey,
        only_if: impl Fn(Option<&StoredKey>) -> bool,
    ) -> Result<StoredKey, StoreError> {
        let txn = db.begin_write().map_err(unavailable)?;
        let stored = {
            let mut table = txn.open_table(KEYS).map_err(unavailable)?;
            let id = person.to_string();
            let current = table.get(id.as_str()).map_err(unavailable)?.map(|g| decode(g.value())).transpose()?;
            if only_if(current.as_ref()) {
                let bytes = serde_json::to_vec(key).map_err(unavailable)?;
                table.insert(id.as_str(), bytes.as_slice()).map_err(unavailable)?;
                key.clone()
            } else {
                current.unwrap_or_else(|| key.clone())
            }
        };
        txn.commit().map_err(unavailable)?;
        Ok(stored)
    }
}

#[async_trait]
impl KeyStore for EmbeddedKeyStore {
    async fn load(&self, person: Uuid) -> Result<Option<StoredKey>, StoreError> {
        self.db
            .blocking(move |db| {
                let txn = db.begin_read().map_err(unavailable)?;
                let table = txn.open_table(KEYS).map_err(unavailable)?;
                let found = table.get(person.to_string().as_str()).map_err(unavailable)?;
                found.map(|g| decode(g.value())).transpose()
            })
            .await
    }

    async fn insert_if_absent(&self, person: Uuid, key: StoredKey) -> Result<StoredKey, StoreError> {
        self.db.blocking(move |db| Self::write(db, person, &key, |current| current.is_none())).await
    }

    async fn destroy(&self, person: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        let tombstone = StoredKey::Destroyed { destroyed_at: at };
        self.db
            .blocking(move |db| {
                Self::write(db, person, &tombstone, |current| !matches!(current, Some(StoredKey::Destroyed { .. })))
                    .map(drop)
            })
            .await
    }

    async fn wrapped_by_other(&self, kek_id: &str, limit: usize) -> Result<Vec<(Uuid, StoredKey)>, StoreError> {
        let kek_id = kek_id.to_owned();
        self.db
            .blocking(move |db| {
                let txn = db.begin_read().map_err(unavailable)?;
                let table = txn.open_table(KEYS).map_err(unavailable)?;
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
        let from_kek = from_kek.to_owned();
        self.db
            .blocking(move |db| {
                Self::write(
                    db,
                    person,
                    &key,
                    |current| matches!(current, Some(StoredKey::Active { kek_id, .. }) if *kek_id == from_kek),
                )
                .map(drop)
            })
            .await
    }

    /// Packs the file so pages freed by destroyed keys are gone from disk.
    async fn compact(&self) -> Result<(), StoreError> {
        self.db.compact().await
    }
}
