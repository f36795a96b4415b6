//! The MongoDB [`KeyStore`]: a `keys` collection, `_id` = the person id, written and read with
//! majority concerns whatever the read models use, so an acknowledged key survives a primary
//! failover and a destroyed key is not read back from a lagging secondary.
//!
//! Documents: `{_id, state: "active", kek_id, wrapped: BinData, created_at}` or, once erased,
//! `{_id, state: "destroyed", destroyed_at}` (the replacement drops the wrapped key).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use mongodb::options::{CollectionOptions, ReadConcern, WriteConcern};
use mongodb::{Collection, Database};
use uuid::Uuid;

use super::{KeyStore, StoredKey};
use crate::readmodel::StoreError;
use crate::readmodel::mongo::bulk::{from_bson_document, to_bson_document};

pub const KEYS: &str = "keys";
const DUPLICATE_KEY: i32 = 11000;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("mongodb: {e}"))
}

pub struct MongoKeyStore {
    keys: Collection<Document>,
}

impl std::fmt::Debug for MongoKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoKeyStore").finish_non_exhaustive()
    }
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) if w.code == DUPLICATE_KEY)
}

impl MongoKeyStore {
    pub fn new(db: &Database) -> Self {
        let options = CollectionOptions::builder()
            .write_concern(WriteConcern::majority())
            .read_concern(ReadConcern::majority())
            .build();
        Self { keys: db.collection_with_options(KEYS, options) }
    }

    fn document(person: Uuid, key: &StoredKey) -> Result<Document, StoreError> {
        let mut document = to_bson_document(key)?;
        if let StoredKey::Active { wrapped, .. } = key {
            // As BinData rather than an array of numbers.
            document.insert(
                "wrapped",
                mongodb::bson::Binary { subtype: mongodb::bson::spec::BinarySubtype::Generic, bytes: wrapped.clone() },
            );
        }
        document.insert("_id", person.to_string());
        Ok(document)
    }

    fn parse(mut document: Document) -> Result<StoredKey, StoreError> {
        if let Ok(binary) = document.get_binary_generic("wrapped") {
            let numbers: Vec<i32> = binary.iter().map(|b| i32::from(*b)).collect();
            document.insert("wrapped", numbers);
        }
        from_bson_document(document)
    }
}

#[async_trait]
impl KeyStore for MongoKeyStore {
    async fn load(&self, person: Uuid) -> Result<Option<StoredKey>, StoreError> {
        let found = self.keys.find_one(doc! { "_id": person.to_string() }).await.map_err(unavailable)?;
        found.map(Self::parse).transpose()
    }

    /// One query (`_id` in the batch's ids), read through its cursor.
    async fn load_many(&self, persons: &[Uuid]) -> Result<Vec<(Uuid, StoredKey)>, StoreError> {
        let ids: Vec<String> = persons.iter().map(Uuid::to_string).collect();
        let mut cursor = self.keys.find(doc! { "_id": { "$in": ids } }).await.map_err(unavailable)?;
        let mut found = Vec::with_capacity(persons.len());
        while let Some(document) = cursor.try_next().await.map_err(unavailable)? {
            let person = document.get_str("_id").ok().and_then(|id| Uuid::parse_str(id).ok());
            let person = person.ok_or_else(|| unavailable("a key whose _id is not a person id"))?;
            found.push((person, Self::parse(document)?));
        }
        Ok(found)
    }

    async fn insert_if_absent(&self, person: Uuid, key: StoredKey) -> Result<StoredKey, StoreError> {
        match self.keys.insert_one(Self::document(person, &key)?).await {
            Ok(_) => Ok(key),
            Err(e) if is_duplicate(&e) => {
                self.load(person).await?.ok_or_else(|| unavailable("a key reported as existing is not there"))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn destroy(&self, person: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        let tombstone = Self::document(person, &StoredKey::Destroyed { destroyed_at: at })?;
        // Replacing keeps an earlier tombstone's time; the filter skips persons already erased.
        let filter = doc! { "_id": person.to_string(), "state": { "$ne": "destroyed" } };
        match self.keys.replace_one(filter, tombstone).upsert(true).await {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate(&e) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn wrapped_by_other(&self, kek_id: &str, limit: usize) -> Result<Vec<(Uuid, StoredKey)>, StoreError> {
        let filter = doc! { "state": "active", "kek_id": { "$ne": kek_id } };
        let found: Vec<Document> = self
            .keys
            .find(filter)
            .limit(limit as i64)
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        found
            .into_iter()
            .map(|d| {
                let id = Uuid::parse_str(d.get_str("_id").map_err(unavailable)?).map_err(unavailable)?;
                Ok((id, Self::parse(d)?))
            })
            .collect()
    }

    async fn replace_wrapping(&self, person: Uuid, from_kek: &str, key: StoredKey) -> Result<(), StoreError> {
        let filter = doc! { "_id": person.to_string(), "state": "active", "kek_id": from_kek };
        self.keys.replace_one(filter, Self::document(person, &key)?).await.map_err(unavailable)?;
        Ok(())
    }
}
