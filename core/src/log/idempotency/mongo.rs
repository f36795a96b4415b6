//! The MongoDB [`ClaimStore`]: an `idempotency` collection shared by every writer replica,
//! `_id` = the scoped key, written and read with majority concerns (a claim acknowledged before
//! a failover is still there after it). A TTL index on `expires_at` purges expired claims.
//!
//! Documents: `{_id, fingerprint: BinData, event_id, partition, claimed_at_ms, owner,
//! offset?, timestamp_ms?, expires_at}`.

use std::time::Duration;

use async_trait::async_trait;
use mongodb::bson::{Binary, Document, doc, spec::BinarySubtype};
use mongodb::options::{CollectionOptions, IndexOptions, ReadConcern, WriteConcern};
use mongodb::{Collection, Database, IndexModel};

use super::{Claim, ClaimStore};
use crate::readmodel::StoreError;

pub const IDEMPOTENCY: &str = "idempotency";
const DUPLICATE_KEY: i32 = 11000;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("mongodb: {e}"))
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) if w.code == DUPLICATE_KEY)
}

pub struct MongoClaimStore {
    claims: Collection<Document>,
    retention: Duration,
}

impl std::fmt::Debug for MongoClaimStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoClaimStore").finish_non_exhaustive()
    }
}

impl MongoClaimStore {
    /// Opens the collection and makes sure its TTL index exists.
    pub async fn open(db: &Database, retention: Duration) -> Result<Self, StoreError> {
        let options = CollectionOptions::builder()
            .write_concern(WriteConcern::majority())
            .read_concern(ReadConcern::majority())
            .build();
        let claims = db.collection_with_options(IDEMPOTENCY, options);
        let ttl = IndexModel::builder()
            .keys(doc! { "expires_at": 1 })
            .options(IndexOptions::builder().expire_after(Duration::ZERO).name("expiry".to_owned()).build())
            .build();
        claims.create_index(ttl).await.map_err(unavailable)?;
        Ok(Self { claims, retention })
    }

    fn document(&self, key: &str, claim: &Claim) -> Document {
        let expires = claim.claimed_at_ms.saturating_add(self.retention.as_millis() as i64);
        let mut document = doc! {
            "_id": key,
            "fingerprint": Binary { subtype: BinarySubtype::Generic, bytes: claim.fingerprint.to_vec() },
            "event_id": &claim.event_id,
            "partition": i64::from(claim.partition),
            "claimed_at_ms": claim.claimed_at_ms,
            "owner": &claim.owner,
            "expires_at": mongodb::bson::DateTime::from_millis(expires),
        };
        if let Some((offset, timestamp_ms)) = claim.appended {
            document.insert("offset", offset as i64);
            document.insert("timestamp_ms", timestamp_ms);
        }
        document
    }

    fn parse(document: &Document) -> Result<Claim, StoreError> {
        let fingerprint = document.get_binary_generic("fingerprint").map_err(unavailable)?;
        let offset = document.get_i64("offset").ok();
        Ok(Claim {
            fingerprint: fingerprint.as_slice().try_into().map_err(|_| unavailable("a fingerprint is not 32 bytes"))?,
            event_id: document.get_str("event_id").map_err(unavailable)?.to_owned(),
            partition: u32::try_from(document.get_i64("partition").map_err(unavailable)?).map_err(unavailable)?,
            claimed_at_ms: document.get_i64("claimed_at_ms").map_err(unavailable)?,
            owner: document.get_str("owner").map_err(unavailable)?.to_owned(),
            appended: offset.map(|offset| (offset as u64, document.get_i64("timestamp_ms").unwrap_or(0))),
        })
    }
}

#[async_trait]
impl ClaimStore for MongoClaimStore {
    async fn claim(&self, key: &str, claim: &Claim) -> Result<Option<Claim>, StoreError> {
        match self.claims.insert_one(self.document(key, claim)).await {
            Ok(_) => Ok(None),
            Err(e) if is_duplicate(&e) => {
                let found = self.claims.find_one(doc! { "_id": key }).await.map_err(unavailable)?;
                // Gone between the two calls (released or expired): claim again.
                match found {
                    Some(existing) => Ok(Some(Self::parse(&existing)?)),
                    None => Box::pin(self.claim(key, claim)).await,
                }
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn replace(&self, key: &str, owner: &str, claim: &Claim) -> Result<bool, StoreError> {
        let replaced = self
            .claims
            .replace_one(doc! { "_id": key, "owner": owner }, self.document(key, claim))
            .await
            .map_err(unavailable)?;
        Ok(replaced.matched_count == 1)
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        self.claims.delete_one(doc! { "_id": key, "owner": owner }).await.map_err(unavailable)?;
        Ok(())
    }

    /// The TTL index does this on its own within a minute or so; asked, it deletes the same
    /// claims through that index (`expires_at` = claim time + retention).
    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        let expired = mongodb::bson::DateTime::from_millis(before_ms.saturating_add(self.retention.as_millis() as i64));
        let deleted = self.claims.delete_many(doc! { "expires_at": { "$lt": expired } }).await.map_err(unavailable)?;
        Ok(deleted.deleted_count)
    }
}
