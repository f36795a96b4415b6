//! `Idempotency-Key` on a log that cannot deduplicate by itself (Kafka): every writer claims a
//! key in one shared [`ClaimStore`] before it appends, so a key is appended at most once across
//! writer replicas and restarts, and a retry gets the first append's position back.
//!
//! The protocol, per key (scoped by the writer to its caller):
//!
//! 1. **Claim.** Insert `{fingerprint, event_id, partition, claimed_at, owner}` unless a claim is
//!    there. The store decides one winner among racing writers.
//! 2. **Append** (the winner), then **complete** the claim with the offset. An append that
//!    certainly failed releases the claim; one whose outcome is unknown (a timeout) leaves it
//!    pending.
//! 3. **A retry** finds the claim: a different request is a conflict; a completed claim is the
//!    answer (`replayed`); a pending one younger than the settle time is in flight (the retry
//!    waits briefly, then is told to come back). A pending claim older than the settle time
//!    (when no append of it can still land: the producer's delivery timeout has passed) belongs
//!    to a writer that died between claim and answer. The retry looks for the claimed event in
//!    the claimed partition from the claim's time on: found, it completes the claim with that
//!    offset and answers `replayed`; not found, nothing was appended, and the retry takes the
//!    claim over and appends.
//! 4. **Expiry.** Claims older than the retention (24 h by default) are replaced on sight and
//!    purged in the background (MongoDB: a TTL index).
//!
//! - [`embedded`]: claims in a redb file, for a single writer process on Kafka.
//! - [`mongo`]: claims in a MongoDB collection, shared by every writer replica.

pub mod embedded;
pub mod mongo;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{AppendRequest, Appended, EventLog, LogError, Record};
use crate::partition::partition_for;
use crate::readmodel::StoreError;
use crate::resilience::Guard;

/// A writer's claim on an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Digest of the request; the same key with another request is a conflict.
    pub fingerprint: [u8; 32],
    /// The event the claimant appends: a retry after a crash looks for it in the log.
    pub event_id: String,
    pub partition: u32,
    pub claimed_at_ms: i64,
    /// A random token per attempt: only the holder completes, releases or hands over a claim.
    pub owner: String,
    /// Offset and log time of the append, once known.
    pub appended: Option<(u64, i64)>,
}

/// Where writers claim idempotency keys. Implementations make `claim` atomic across every
/// writer that shares the store.
#[async_trait]
pub trait ClaimStore: Send + Sync + 'static {
    /// Inserts `claim` under `key` unless a claim is there; `None` when inserted, else the
    /// claim that is there.
    async fn claim(&self, key: &str, claim: &Claim) -> Result<Option<Claim>, StoreError>;

    /// Replaces the claim `owner` holds with `claim` (completion or takeover); `false` when
    /// `owner` no longer holds it.
    async fn replace(&self, key: &str, owner: &str, claim: &Claim) -> Result<bool, StoreError>;

    /// Drops the claim `owner` holds.
    async fn release(&self, key: &str, owner: &str) -> Result<(), StoreError>;

    /// Deletes claims made before `before_ms`; returns how many.
    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError>;
}

/// How long claims live, and how long a pending one is trusted to be in flight.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyOptions {
    /// Keys expire after this: a retry later than this appends again.
    pub retention: Duration,
    /// After this, a pending claim's append can no longer land (the producer's delivery
    /// timeout, plus margin): the claim is resolved from the log.
    pub settle: Duration,
    /// How long a retry waits for a claim in flight before it is told to come back.
    pub wait: Duration,
    /// Bound on each store call.
    pub timeout: Duration,
}

/// An [`EventLog`] whose appends honour idempotency keys through a [`ClaimStore`]; everything
/// else goes straight to the inner log.
pub struct IdempotentLog {
    inner: Arc<dyn EventLog>,
    store: Arc<dyn ClaimStore>,
    guard: Guard,
    options: IdempotencyOptions,
}

impl std::fmt::Debug for IdempotentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotentLog").field("options", &self.options).finish_non_exhaustive()
    }
}

/// Time to look back before a claim's time when searching the log for its event: the claim is
/// made before the append, but clocks of writers and brokers differ a little.
const CLOCK_SKEW_MS: i64 = 5_000;
/// Records read per step while searching a partition for a claimed event.
const SEARCH_BATCH: usize = 500;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn store_error(e: StoreError) -> LogError {
    LogError::Unavailable(format!("idempotency store: {e}"))
}

impl IdempotentLog {
    /// Wraps `inner`; purges expired claims hourly for as long as the log is in use.
    pub fn new(inner: Arc<dyn EventLog>, store: Arc<dyn ClaimStore>, options: IdempotencyOptions) -> Arc<Self> {
        let guard = Guard::new("idempotency store", "all", options.timeout, 3);
        let log = Arc::new(Self { inner, store, guard, options });
        let weak = Arc::downgrade(&log);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                every.tick().await;
                // Ends with the log, so its store (and file) is released with it.
                let Some(purging) = weak.upgrade() else { return };
                let before = now_ms() - purging.options.retention.as_millis() as i64;
                match purging.guard.call("purge", || purging.store.purge(before)).await {
                    Ok(purged) => tracing::debug!(purged, "expired idempotency keys purged"),
                    Err(e) => tracing::warn!(error = %e, "purging expired idempotency keys failed"),
                }
            }
        });
        log
    }

    async fn claim(&self, key: &str, claim: &Claim) -> Result<Option<Claim>, LogError> {
        self.guard.call("claim", || self.store.claim(key, claim)).await.map_err(store_error)
    }

    async fn replace(&self, key: &str, owner: &str, claim: &Claim) -> Result<bool, LogError> {
        self.guard.call("replace", || self.store.replace(key, owner, claim)).await.map_err(store_error)
    }

    /// Appends under a claim this writer holds, and records where the event landed.
    async fn append_claimed(&self, key: &str, claim: Claim, request: AppendRequest) -> Result<Appended, LogError> {
        match self.inner.append(request).await {
            Ok(appended) => {
                let done = Claim { appended: Some((appended.offset, appended.timestamp_ms)), ..claim.clone() };
                // The event is in the log: if recording that fails, a later retry finds it there.
                if let Err(e) = self.replace(key, &claim.owner, &done).await {
                    tracing::warn!(error = %e, "recording an idempotent append failed; retries will find it in the log");
                }
                Ok(appended)
            }
            Err(e) if e.is_transient() => Err(e), // outcome unknown: stays pending
            Err(e) => {
                let _ = self.guard.call("release", || self.store.release(key, &claim.owner)).await;
                Err(e)
            }
        }
    }

    /// The claimed event's position, searched in its partition among the records written
    /// between the claim and its settling. The broker's time index gives the first of them; a
    /// broker that cannot answer by time (librdkafka's mock cluster) is searched backwards from
    /// the end until records older than the claim.
    async fn find_claimed(&self, topic: &str, claim: &Claim) -> Result<Option<(u64, i64)>, LogError> {
        let earliest = claim.claimed_at_ms - CLOCK_SKEW_MS;
        let latest = claim.claimed_at_ms.saturating_add(self.options.settle.as_millis() as i64) + CLOCK_SKEW_MS;
        let partition = claim.partition;
        let is_it = |r: &Record| r.header("event_id") == Some(claim.event_id.as_bytes());
        let end = self.inner.end_offsets(topic).await?.get(partition as usize).copied().unwrap_or(0);
        let indexed =
            self.inner.offsets_for_timestamp(topic, earliest).await?.get(partition as usize).copied().flatten();
        if let Some(mut from) = indexed {
            while from < end {
                let records = self.inner.read(topic, partition, from, SEARCH_BATCH, Duration::ZERO).await?;
                let Some(last) = records.last() else { break };
                from = last.offset + 1;
                if let Some(found) = records.iter().find(|r| is_it(r)) {
                    return Ok(Some((found.offset, found.timestamp_ms)));
                }
                if last.timestamp_ms > latest {
                    break;
                }
            }
            return Ok(None);
        }
        let mut upto = end;
        while upto > 0 {
            let from = upto.saturating_sub(SEARCH_BATCH as u64);
            let records = self.inner.read(topic, partition, from, (upto - from) as usize, Duration::ZERO).await?;
            if let Some(found) = records.iter().find(|r| r.offset < upto && is_it(r)) {
                return Ok(Some((found.offset, found.timestamp_ms)));
            }
            match records.first() {
                Some(first) if first.timestamp_ms >= earliest => upto = from,
                _ => break,
            }
        }
        Ok(None)
    }

    /// An append that honours its idempotency key (one without a key goes straight through).
    async fn append_once(&self, mut request: AppendRequest) -> Result<Appended, LogError> {
        let Some(idempotency) = request.idempotency.take() else { return self.inner.append(request).await };
        let key = format!("{}\n{}", request.topic, idempotency.key);
        let event_id = request
            .headers
            .iter()
            .find(|(name, _)| name == "event_id")
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
            .ok_or_else(|| LogError::Unavailable("an idempotent append needs an event_id header".into()))?;
        let partitions = self.inner.partitions(&request.topic).await?;
        let mine = Claim {
            fingerprint: idempotency.fingerprint,
            event_id,
            partition: partition_for(&request.key, partitions),
            claimed_at_ms: now_ms(),
            owner: uuid::Uuid::new_v4().to_string(),
            appended: None,
        };
        let waiting_until = tokio::time::Instant::now() + self.options.wait;
        loop {
            let Some(theirs) = self.claim(&key, &mine).await? else {
                return self.append_claimed(&key, mine, request).await;
            };
            let age = Duration::from_millis((now_ms() - theirs.claimed_at_ms).max(0) as u64);
            if age >= self.options.retention {
                // Expired: this request starts afresh, as on a log that never saw the key.
                if self.replace(&key, &theirs.owner, &mine).await? {
                    return self.append_claimed(&key, mine, request).await;
                }
                continue;
            }
            if theirs.fingerprint != mine.fingerprint {
                return Err(LogError::IdempotencyConflict(idempotency.key));
            }
            if let Some((offset, timestamp_ms)) = theirs.appended {
                return Ok(Appended { partition: theirs.partition, offset, timestamp_ms, replayed: true });
            }
            if age < self.options.settle {
                // In flight at another writer (or this one): wait a little for it to finish.
                if tokio::time::Instant::now() >= waiting_until {
                    return Err(LogError::InFlight(idempotency.key));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            // Its writer died between claim and answer: the log says whether it appended.
            match self.find_claimed(&request.topic, &theirs).await? {
                Some(appended) => {
                    let done = Claim { appended: Some(appended), ..theirs.clone() };
                    self.replace(&key, &theirs.owner, &done).await?;
                    let (offset, timestamp_ms) = appended;
                    return Ok(Appended { partition: theirs.partition, offset, timestamp_ms, replayed: true });
                }
                None => {
                    if self.replace(&key, &theirs.owner, &mine).await? {
                        return self.append_claimed(&key, mine, request).await;
                    }
                }
            }
        }
    }
}

crate::event_log_decorator!(IdempotentLog, inner, |log, request| log.append_once(request).await);
