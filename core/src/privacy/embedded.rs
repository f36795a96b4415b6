//! The embedded [`KeyStore`]: one redb file (`keys.redb` in the data dir), person id → JSON
//! [`StoredKey`].
//!
//! redb is copy-on-write: a destroyed key's wrapped bytes stay in free pages until they are
//! reused. [`EmbeddedKeyStore::compact`] packs the file and cuts those pages off, so after it
//! the file holds nothing of a destroyed key.
//!
//! ## Group commit
//! Every new person needs a key on disk before their first event is acknowledged, so key
//! writes are on the command path. A writer thread takes every write queued while the previous
//! commit was syncing and applies them in one transaction, in arrival order, with one fsync:
//! concurrent registrations share a commit instead of queueing for one each.

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

/// A queued write and who waits for its outcome: what is stored for the person after it.
struct PendingWrite {
    person: Uuid,
    key: StoredKey,
    condition: Condition,
    reply: tokio::sync::oneshot::Sender<Result<StoredKey, StoreError>>,
}

pub struct EmbeddedKeyStore {
    db: SharedDb,
    writes: Option<tokio::sync::mpsc::Sender<PendingWrite>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EmbeddedKeyStore {
    fn drop(&mut self) {
        // The writer finishes what is queued and exits; joining it releases the file.
        self.writes.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
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
        let db = SharedDb::new(db);
        let (writes, queue) = tokio::sync::mpsc::channel(MAX_GROUP);
        let writer = {
            let db = db.clone();
            std::thread::Builder::new()
                .name("callisto-key-writer".into())
                .spawn(move || write_groups(&db, queue))
                .map_err(unavailable)?
        };
        Ok(Self { db, writes: Some(writes), writer: Some(writer) })
    }

    /// Queues a write for the next group commit and waits for it.
    async fn write(&self, person: Uuid, key: StoredKey, condition: Condition) -> Result<StoredKey, StoreError> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let queue = self.writes.as_ref().ok_or_else(|| unavailable("the key store is closing"))?;
        queue.send(PendingWrite { person, key, condition, reply }).await.map_err(unavailable)?;
        outcome.await.map_err(unavailable)?
    }
}

/// The writer thread: one transaction and one commit for every write queued meanwhile.
fn write_groups(db: &SharedDb, mut queue: tokio::sync::mpsc::Receiver<PendingWrite>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = queue.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let outcome = db.run(|db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let stored = {
                let mut table = txn.open_table(KEYS).map_err(unavailable)?;
                group
                    .iter()
                    .map(|write| {
                        let id = write.person.to_string();
                        let current =
                            table.get(id.as_str()).map_err(unavailable)?.map(|g| decode(g.value())).transpose()?;
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
        });
        match outcome {
            Ok(stored) => {
                for (write, stored) in group.drain(..).zip(stored) {
                    let _ = write.reply.send(Ok(stored));
                }
            }
            Err(e) => {
                for write in group.drain(..) {
                    let _ = write.reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
            }
        }
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
        self.write(person, key, Condition::Absent).await
    }

    async fn destroy(&self, person: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.write(person, StoredKey::Destroyed { destroyed_at: at }, Condition::NotDestroyed).await.map(drop)
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
        self.write(person, key, Condition::WrappedBy(from_kek.to_owned())).await.map(drop)
    }

    /// Packs the file so pages freed by destroyed keys are gone from disk.
    async fn compact(&self) -> Result<(), StoreError> {
        self.db.compact().await
    }
}
