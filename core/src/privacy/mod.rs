//! Personal data and erasure: crypto-shredding.
//!
//! Every event's personal fields (names, email, phone, date of birth, address, note text,
//! archive reason) are sealed with the person's own data key before the event is written;
//! erasing a person destroys that key, so every copy of those events — partitions, replicas,
//! dead letters, exports, backups — becomes unreadable at once.
//!
//! ## Layout
//! - [`cipher`]: AES-256-GCM sealing of personal data (bound to the event id) and wrapping of
//!   data keys by a master key (bound to the person id).
//! - [`KeyStore`]: the port that keeps wrapped data keys and erasure tombstones; adapters in
//!   [`embedded`] (redb, `keys.redb` in the data dir) and [`mongo`] (a `keys` collection).
//! - [`Keyring`]: what services use. It wraps and unwraps with the master key, caches unwrapped
//!   keys for a bounded time, and calls the store behind a timeout, retries and a circuit
//!   breaker ([`Guard`]).
//!
//! ## Rules
//! - A data key is never stored in clear; only its wrapped form is, under the id of the master
//!   key that wrapped it. Rotating the master key re-wraps stored keys ([`Keyring::rewrap_all`])
//!   and never touches events.
//! - Destroying a key leaves a tombstone, so a destroyed key is never recreated and every
//!   reader (projectors, export, dlq) treats the person's events as erased, including events
//!   written in clear before sealing existed.
//! - A destroyed key can still be used from another process's cache for at most the cache's
//!   time to live (`privacy.key_cache_ttl_ms`); the destroying process forgets it at once.
//! - A registration that lets the writer choose the id takes one from a reserve of persons whose
//!   keys are stored ahead ([`Keyring::new_person`]), so it waits on its event's append alone.
//!   A reserved id is never handed out twice; a restart leaves the unused ones' keys behind.

pub mod cipher;
pub mod embedded;
pub mod mongo;

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callisto_avro::PersonEvent;
use callisto_avro::events::SealedPersonalData;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::readmodel::StoreError;
use crate::resilience::Guard;
pub use cipher::{CipherError, DataKey, MasterKey};

/// What the key store holds for one person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum StoredKey {
    /// The data key, wrapped by the master key `kek_id` (nonce, then ciphertext and tag).
    Active {
        kek_id: String,
        #[serde(with = "serde_bytes")]
        wrapped: Vec<u8>,
        created_at: DateTime<Utc>,
    },
    /// Erased: the key is gone for good.
    Destroyed { destroyed_at: DateTime<Utc> },
}

/// Where wrapped data keys and erasure tombstones live. Adapters report failures as
/// [`StoreError`], so the [`Keyring`] treats them like every other dependency.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    async fn load(&self, person: Uuid) -> Result<Option<StoredKey>, StoreError>;

    /// The records of those `persons` that have one, in one round trip where the store allows:
    /// a batch of events read from the log (a rebuild, a backlog) names thousands of persons,
    /// and [`KeyStore::load`] would take one round trip each. The default asks one by one.
    async fn load_many(&self, persons: &[Uuid]) -> Result<Vec<(Uuid, StoredKey)>, StoreError> {
        let mut found = Vec::new();
        for &person in persons {
            if let Some(stored) = self.load(person).await? {
                found.push((person, stored));
            }
        }
        Ok(found)
    }

    /// Stores `key` unless the person already has a record; returns the record now stored
    /// (the existing one when two writers race, so both seal with the same key).
    async fn insert_if_absent(&self, person: Uuid, key: StoredKey) -> Result<StoredKey, StoreError>;

    /// Replaces whatever the person has with a tombstone. Idempotent.
    async fn destroy(&self, person: Uuid, at: DateTime<Utc>) -> Result<(), StoreError>;

    /// Up to `limit` active keys wrapped by a master key other than `kek_id`.
    async fn wrapped_by_other(&self, kek_id: &str, limit: usize) -> Result<Vec<(Uuid, StoredKey)>, StoreError>;

    /// Replaces an active key wrapped by `from_kek` with `key`; a key destroyed or re-wrapped
    /// meanwhile is left alone.
    async fn replace_wrapping(&self, person: Uuid, from_kek: &str, key: StoredKey) -> Result<(), StoreError>;

    /// Purges what the store still keeps on disk of destroyed keys. Stores that purge on their
    /// own schedule do nothing here.
    async fn compact(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A keyring over the embedded key store `dir/keys.redb` and the master key `dir/master.key`
/// (created when missing), with default options: what a process with a data dir and no key
/// configuration uses.
pub fn open_embedded(dir: &std::path::Path) -> anyhow::Result<Arc<Keyring>> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let store = embedded::EmbeddedKeyStore::open(&dir.join(embedded::FILE))
        .with_context(|| format!("opening the key store in {}", dir.display()))?;
    let master = load_master_key(&dir.join(MASTER_KEY_FILE), true)?;
    Ok(Arc::new(Keyring::new(Arc::new(store), master, Vec::new(), &KeyringOptions::default())))
}

/// The default master key file name in the data dir.
pub const MASTER_KEY_FILE: &str = "master.key";

/// Writes a fresh master key to `path` (mode 0600); refuses to replace an existing file.
pub fn write_new_master_key(path: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    std::io::Write::write_all(&mut file, MasterKey::generate_hex().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing the master key {}", path.display()))
}

/// Reads the master key file at `path`; with `create`, writes a fresh one (mode 0600) first
/// when there is none.
pub fn load_master_key(path: &std::path::Path, create: bool) -> anyhow::Result<MasterKey> {
    use anyhow::Context;
    if create && !path.exists() {
        match write_new_master_key(path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "created a master key; keep it safe, without it no personal data opens");
            }
            // Another process created it first: use theirs.
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::AlreadyExists) => {}
            Err(e) => return Err(e),
        }
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading the master key {}", path.display()))?,
    );
    MasterKey::from_hex(&text).with_context(|| format!("the master key {}", path.display()))
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key store cannot answer now: commands answer 503 and projectors pause.
    #[error("{0}")]
    Unavailable(String),
    /// The person was erased; their data key is destroyed.
    #[error("the person was erased")]
    Erased,
    /// Sealed data that cannot be opened with the key it names: altered, moved to another
    /// event, or sealed with a key the store does not have. Projectors dead-letter the event.
    #[error("personal data does not open: {0}")]
    Unreadable(String),
}

impl From<StoreError> for KeyError {
    /// The guard's message already names the key store and the call.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(why) | StoreError::Rejected(why) | StoreError::InvalidRequest(why) => {
                KeyError::Unavailable(why)
            }
        }
    }
}

/// An event as readers see it: personal fields restored, or blank when the person is erased.
#[derive(Debug, Clone)]
pub struct Opened {
    pub event: PersonEvent,
    /// The seal as written (absent on events written in clear, and for an erased person), for
    /// readers that pass personal data on still sealed.
    pub sealed: Option<SealedPersonalData>,
    /// The person is erased: the event's personal fields are blank for good.
    pub erased: bool,
}

#[derive(Debug, Clone)]
pub struct KeyringOptions {
    /// How long an unwrapped key (or the absence of one) is trusted without asking the store.
    pub cache_ttl: Duration,
    /// Most persons whose key state is cached.
    pub cache_entries: usize,
    /// Bounds each store call.
    pub timeout: Duration,
    /// New persons whose keys are created ahead, for registrations that let the writer choose
    /// the id (see [`Keyring::new_person`]); 0 creates every key on the registration's path.
    pub reserved_persons: usize,
}

impl Default for KeyringOptions {
    fn default() -> Self {
        Self {
            cache_ttl: Duration::from_secs(30),
            cache_entries: 100_000,
            timeout: Duration::from_secs(3),
            reserved_persons: 1024,
        }
    }
}

/// Person ids whose data keys are stored already, handed to registrations without an id.
#[derive(Default)]
struct Reserve {
    /// Oldest first: ids go out in the order they were made.
    ready: Mutex<std::collections::VecDeque<(Uuid, Arc<DataKey>)>>,
    refilling: std::sync::atomic::AtomicBool,
}

/// Keys a refill creates at once: the store's writer commits what is queued together, so a
/// refill of the default reserve's half is a lone commit, then one of the rest. With 64 at once
/// and a reserve of 256, each refill took about five commits (about 28 keys each), and the
/// data-key writer cost twice the CPU per registration (`BENCHMARKS.md`, fifteenth pass).
const REFILL_CONCURRENCY: usize = 512;

/// Persons whose keys [`Keyring::prefetch`] asks the store for in one call: a catch-up batch
/// names up to 12,000, and one call for all of them would be a MongoDB query of about half a
/// megabyte with its answer, under the same timeout as a single key's.
const PREFETCH_CHUNK: usize = 1000;

#[derive(Clone)]
enum Cached {
    Active(Arc<DataKey>, Instant),
    /// No key yet (a person registered before sealing existed, or not registered at all).
    Missing(Instant),
    /// Tombstones are permanent, so they never expire.
    Destroyed,
}

/// The data-key service: seals events for writers and opens them for readers.
pub struct Keyring {
    store: Arc<dyn KeyStore>,
    master: MasterKey,
    /// Earlier master keys, to unwrap keys not yet re-wrapped after a rotation.
    previous: Vec<MasterKey>,
    cache: Mutex<lru::LruCache<Uuid, Cached>>,
    ttl: Duration,
    guard: Guard,
    reserve: Reserve,
    reserve_size: usize,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("master", &self.master).finish_non_exhaustive()
    }
}

impl Keyring {
    pub fn new(
        store: Arc<dyn KeyStore>,
        master: MasterKey,
        previous: Vec<MasterKey>,
        options: &KeyringOptions,
    ) -> Self {
        let entries = NonZeroUsize::new(options.cache_entries).unwrap_or(NonZeroUsize::MIN);
        Self {
            store,
            master,
            previous,
            cache: Mutex::new(lru::LruCache::new(entries)),
            ttl: options.cache_ttl,
            guard: Guard::new("key store", "all", options.timeout, 3),
            reserve: Reserve::default(),
            reserve_size: options.reserved_persons,
        }
    }

    /// An id for a person the writer registers, whose data key is, when the reserve has one,
    /// stored already: the registration then waits on the event's append alone, not on a key
    /// store write before it. The reserve refills in the background once it is half empty, in
    /// groups the store commits together; while it is empty (or the store is down) the id is
    /// fresh and [`Keyring::seal`] creates its key as it would for an id the caller chose.
    ///
    /// A reserved id is handed out once and never again, not even after a restart (the reserve
    /// lives in memory). What a restart leaves behind is at most the reserve's keys stored for
    /// persons that were never registered: no personal data, about a hundred bytes each.
    ///
    /// Ids are UUIDv7, which sort by the time they were made, for the reason MongoDB's ObjectId
    /// starts with a timestamp: the stores keep people in B-trees ordered by id, and random ids
    /// put each new person on a page of their own, so a refill's commit rewrote one page per key
    /// and the documents store one per registration. Time-ordered ids land together at the
    /// tree's right edge. The id tells whoever sees it when it was reserved, at or shortly before
    /// the registration, which the log's record of the registration tells anyway.
    pub fn new_person(self: &Arc<Self>) -> Uuid {
        let (taken, left) = {
            let mut ready = self.reserve.ready.lock().expect("key reserve poisoned");
            (ready.pop_front(), ready.len())
        };
        if left < self.reserve_size / 2 && !self.reserve.refilling.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let keyring = self.clone();
            tokio::spawn(async move { keyring.refill_reserve(left).await });
        }
        match taken {
            Some((person, key)) => {
                self.remember(person, Cached::Active(key, Instant::now()));
                person
            }
            None => Uuid::now_v7(),
        }
    }

    /// Creates keys until the reserve is full again, each ready as soon as it is stored. It stops
    /// at the first failure: the store is down (the guard reports that), and the registrations
    /// that find the reserve empty meanwhile create their keys on their own path.
    async fn refill_reserve(&self, left: usize) {
        use futures::StreamExt;
        let mut created = futures::stream::iter(0..self.reserve_size.saturating_sub(left))
            .map(|_| async {
                let person = Uuid::now_v7();
                self.store_new_key(person).await.map(|key| (person, key))
            })
            .buffer_unordered(REFILL_CONCURRENCY);
        while let Some(outcome) = created.next().await {
            match outcome {
                Ok(reserved) => self.reserve.ready.lock().expect("key reserve poisoned").push_back(reserved),
                Err(e) => {
                    tracing::debug!(error = %e, "refilling the data-key reserve stopped");
                    break;
                }
            }
        }
        self.reserve.refilling.store(false, std::sync::atomic::Ordering::Release);
    }

    /// Persons in the reserve now (see [`Keyring::new_person`]).
    pub fn reserved_persons(&self) -> usize {
        self.reserve.ready.lock().expect("key reserve poisoned").len()
    }

    fn cached(&self, person: Uuid) -> Option<Cached> {
        let mut cache = self.cache.lock().expect("key cache poisoned");
        let found = cache.get(&person)?.clone();
        let fresh = self.is_fresh(&found);
        if !fresh {
            cache.pop(&person);
        }
        fresh.then_some(found)
    }

    /// Whether a cached state may still be used: tombstones always, the rest within the TTL.
    fn is_fresh(&self, state: &Cached) -> bool {
        match state {
            Cached::Active(_, at) | Cached::Missing(at) => at.elapsed() < self.ttl,
            Cached::Destroyed => true,
        }
    }

    fn remember(&self, person: Uuid, state: Cached) {
        self.cache.lock().expect("key cache poisoned").put(person, state);
    }

    fn unwrap_stored(&self, person: Uuid, stored: &StoredKey) -> Result<Cached, KeyError> {
        match stored {
            StoredKey::Destroyed { .. } => Ok(Cached::Destroyed),
            StoredKey::Active { kek_id, wrapped, .. } => {
                let master = std::iter::once(&self.master)
                    .chain(&self.previous)
                    .find(|m| m.id() == kek_id)
                    .ok_or_else(|| {
                        KeyError::Unreadable(format!(
                            "the person's key is wrapped by master key {kek_id}, which is not configured"
                        ))
                    })?;
                let key = master.unwrap_key(person, wrapped).map_err(|e| KeyError::Unreadable(e.to_string()))?;
                Ok(Cached::Active(Arc::new(key), Instant::now()))
            }
        }
    }

    /// Loads into the cache, a call to the store per 1,000 persons, the keys of those `persons`
    /// it does not hold fresh: a batch of events read from the log then opens from the cache
    /// instead of waiting on the store once for each person it has not seen (a rebuild's first
    /// pass over a partition, a projector process behind the writers). Never more than the
    /// cache holds, which would evict what it had just loaded. Returns how many it loaded.
    ///
    /// What it caches is what [`Keyring::open`] would have loaded and cached one by one, under
    /// the same freshness bound, so erasure is seen exactly as soon. Persons with nothing
    /// stored are remembered as such, as `open` does; a key that cannot be unwrapped is left
    /// for `open` to report.
    pub async fn prefetch(&self, persons: impl IntoIterator<Item = Uuid>) -> Result<usize, KeyError> {
        let wanted: std::collections::HashSet<Uuid> = persons.into_iter().collect();
        let missing: Vec<Uuid> = {
            let cache = self.cache.lock().expect("key cache poisoned");
            let mut missing: Vec<Uuid> =
                wanted.into_iter().filter(|person| !cache.peek(person).is_some_and(|c| self.is_fresh(c))).collect();
            // In key order, so the store reads its pages in order.
            missing.sort_unstable();
            missing.truncate(cache.cap().get());
            missing
        };
        let mut loaded = 0;
        // A call per chunk, each under the store's timeout like any other call.
        for chunk in missing.chunks(PREFETCH_CHUNK) {
            let stored = self.guard.call("loading data keys", || self.store.load_many(chunk)).await?;
            let mut found: std::collections::HashMap<Uuid, StoredKey> = stored.into_iter().collect();
            let now = Instant::now();
            for &person in chunk {
                let state = match found.remove(&person) {
                    Some(stored) => match self.unwrap_stored(person, &stored) {
                        Ok(state) => state,
                        Err(_) => continue,
                    },
                    None => Cached::Missing(now),
                };
                self.remember(person, state);
                loaded += 1;
            }
        }
        Ok(loaded)
    }

    /// The person's key state, from the cache while fresh.
    async fn state(&self, person: Uuid, bypass_cache: bool) -> Result<Cached, KeyError> {
        if !bypass_cache && let Some(found) = self.cached(person) {
            return Ok(found);
        }
        let stored = self.guard.call("loading a data key", || self.store.load(person)).await?;
        let state = match stored {
            Some(stored) => self.unwrap_stored(person, &stored)?,
            None => Cached::Missing(Instant::now()),
        };
        self.remember(person, state.clone());
        Ok(state)
    }

    /// The key new events of `person` are sealed with, created on first use.
    /// [`KeyError::Erased`] once the person is erased.
    pub async fn key_for_writing(&self, person: Uuid) -> Result<Arc<DataKey>, KeyError> {
        match self.state(person, false).await? {
            Cached::Active(key, _) => Ok(key),
            Cached::Destroyed => Err(KeyError::Erased),
            Cached::Missing(_) => self.create_key(person).await,
        }
    }

    /// The key a person's first event (their registration) is sealed with. The person is almost
    /// always new, so the store is not asked first: the insert itself answers with the key (or
    /// tombstone) already stored when the id was used before. This saves a registration one
    /// store round trip.
    pub async fn key_for_first_event(&self, person: Uuid) -> Result<Arc<DataKey>, KeyError> {
        match self.cached(person) {
            Some(Cached::Active(key, _)) => Ok(key),
            Some(Cached::Destroyed) => Err(KeyError::Erased),
            Some(Cached::Missing(_)) | None => self.create_key(person).await,
        }
    }

    /// Creates and stores a key for `person` unless one is stored; returns the stored one.
    async fn create_key(&self, person: Uuid) -> Result<Arc<DataKey>, KeyError> {
        match self.store_new_key(person).await {
            Ok(key) => {
                self.remember(person, Cached::Active(key.clone(), Instant::now()));
                Ok(key)
            }
            Err(KeyError::Erased) => {
                self.remember(person, Cached::Destroyed);
                Err(KeyError::Erased)
            }
            Err(e) => Err(e),
        }
    }

    /// Stores a new key for `person` unless one is stored, and returns the stored one without
    /// caching it: a reserved person's key is cached when the person is handed out, so a refill
    /// does not push hundreds of keys nobody reads yet through the cache. The key just made is
    /// used as it is when it is the one stored (its wrapped bytes carry a fresh random nonce,
    /// so equal bytes mean this very write); only a key stored before is unwrapped.
    async fn store_new_key(&self, person: Uuid) -> Result<Arc<DataKey>, KeyError> {
        let (key, wrapped) = self.master.new_data_key(person).map_err(|e| KeyError::Unreadable(e.to_string()))?;
        let fresh = StoredKey::Active { kek_id: self.master.id().to_owned(), wrapped, created_at: Utc::now() };
        let stored =
            self.guard.call("creating a data key", || self.store.insert_if_absent(person, fresh.clone())).await?;
        let ours = matches!(
            (&stored, &fresh),
            (StoredKey::Active { wrapped: kept, .. }, StoredKey::Active { wrapped: made, .. }) if kept == made
        );
        if ours {
            return Ok(Arc::new(key));
        }
        match self.unwrap_stored(person, &stored)? {
            Cached::Active(key, _) => Ok(key),
            _ => Err(KeyError::Erased),
        }
    }

    /// Refuses with [`KeyError::Erased`] when `person` is erased.
    pub async fn ensure_not_erased(&self, person: Uuid) -> Result<(), KeyError> {
        match self.state(person, false).await? {
            Cached::Destroyed => Err(KeyError::Erased),
            _ => Ok(()),
        }
    }

    /// Moves `event`'s personal fields into a sealed payload, leaving them blank in the event.
    /// Refuses events of an erased person.
    pub async fn seal(&self, mut event: PersonEvent) -> Result<(PersonEvent, Option<SealedPersonalData>), KeyError> {
        let meta = event.meta();
        let (person, event_id) = (meta.person_id, meta.event_id);
        if !event.carries_personal_data() {
            self.ensure_not_erased(person).await?;
            return Ok((event, None));
        }
        let key = match event {
            PersonEvent::Registered(_) => self.key_for_first_event(person).await?,
            _ => self.key_for_writing(person).await?,
        };
        let personal = event.take_personal();
        let sealed = key.seal(&key_id(person), event_id, &personal).map_err(|e| KeyError::Unreadable(e.to_string()))?;
        Ok((event, Some(sealed)))
    }

    /// Restores `event`'s personal fields from `sealed`, or blanks them when the person is
    /// erased. Events written in clear (before sealing) pass through unless erased.
    pub async fn open(&self, mut event: PersonEvent, sealed: Option<SealedPersonalData>) -> Result<Opened, KeyError> {
        let meta = event.meta();
        let (person, event_id) = (meta.person_id, meta.event_id);
        if matches!(event, PersonEvent::Erased(_)) {
            return Ok(Opened { event, sealed: None, erased: true });
        }
        let mut state = self.state(person, false).await?;
        if sealed.is_some() && matches!(state, Cached::Missing(_)) {
            // Another process created the key after this one last looked.
            state = self.state(person, true).await?;
        }
        match (state, sealed) {
            (Cached::Destroyed, _) => {
                event.take_personal();
                Ok(Opened { event, sealed: None, erased: true })
            }
            (_, None) => Ok(Opened { event, sealed: None, erased: false }),
            (Cached::Missing(_), Some(_)) => {
                Err(KeyError::Unreadable(format!("no data key for person {person} in the key store")))
            }
            (Cached::Active(key, _), Some(sealed)) => {
                let personal = key.open(event_id, &sealed).map_err(|e| KeyError::Unreadable(e.to_string()))?;
                event.restore_personal(personal);
                Ok(Opened { event, sealed: Some(sealed), erased: false })
            }
        }
    }

    /// Purges destroyed keys from the store's files (see [`KeyStore::compact`]).
    pub async fn compact(&self) -> Result<(), KeyError> {
        Ok(self.store.compact().await?)
    }

    /// Destroys the person's data key (idempotent); this process forgets it at once.
    pub async fn destroy(&self, person: Uuid) -> Result<(), KeyError> {
        let at = Utc::now();
        self.guard.call("destroying a data key", || self.store.destroy(person, at)).await?;
        self.remember(person, Cached::Destroyed);
        metrics::counter!("callisto_persons_erased_total").increment(1);
        Ok(())
    }

    /// The id of the master key new data keys are wrapped with.
    pub fn master_key_id(&self) -> &str {
        self.master.id()
    }

    /// Re-wraps every stored key still wrapped by a previous master key with the current one.
    /// Returns how many were re-wrapped. Events are untouched: data keys do not change.
    pub async fn rewrap_all(&self) -> Result<usize, KeyError> {
        let current = self.master.id().to_owned();
        let mut done = 0;
        loop {
            let page =
                self.guard.call("listing keys to re-wrap", || self.store.wrapped_by_other(&current, 500)).await?;
            if page.is_empty() {
                return Ok(done);
            }
            let mut progressed = false;
            for (person, stored) in page {
                let StoredKey::Active { kek_id, wrapped, created_at } = stored else { continue };
                let Some(old) = self.previous.iter().find(|m| m.id() == kek_id) else {
                    return Err(KeyError::Unreadable(format!(
                        "a key is wrapped by master key {kek_id}, which is neither current nor previous"
                    )));
                };
                let rewrapped =
                    self.master.rewrap_from(old, person, &wrapped).map_err(|e| KeyError::Unreadable(e.to_string()))?;
                let key = StoredKey::Active { kek_id: current.clone(), wrapped: rewrapped, created_at };
                self.guard
                    .call("re-wrapping a key", || self.store.replace_wrapping(person, &kek_id, key.clone()))
                    .await?;
                done += 1;
                progressed = true;
            }
            if !progressed {
                return Ok(done);
            }
        }
    }
}

/// Why a record could not be read as an event.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes are not an event this build understands (or the registry cannot say).
    #[error("decode: {0}")]
    Decode(#[from] callisto_avro::CodecError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl ReadError {
    /// A dependency is down: pause and retry, never dead-letter for it.
    pub fn is_outage(&self) -> bool {
        matches!(self, ReadError::Key(KeyError::Unavailable(_)))
    }
}

/// Decodes records and opens their sealed personal data: how every reader of the log (projectors,
/// export, dlq, replay) sees events.
#[derive(Debug, Clone)]
pub struct EventReader {
    pub codec: Arc<callisto_avro::Codec>,
    pub keyring: Arc<Keyring>,
}

impl EventReader {
    pub fn new(codec: Arc<callisto_avro::Codec>, keyring: Arc<Keyring>) -> Self {
        Self { codec, keyring }
    }

    pub async fn read(&self, payload: &[u8]) -> Result<Opened, ReadError> {
        let (event, sealed) = self.codec.decode_sealed(payload)?;
        Ok(self.keyring.open(event, sealed).await?)
    }

    /// Loads the data keys of the persons `records` belong to in one call to the key store
    /// ([`Keyring::prefetch`]), before they are read one by one. The log is keyed by person, so
    /// the records' keys name them without decoding anything; a record keyed otherwise is
    /// skipped. Best effort: should the store fail here, each record's own read waits for it
    /// and reports it as it always does.
    pub async fn prefetch_keys(&self, records: &[crate::log::Record]) {
        let persons = records.iter().filter_map(|record| Uuid::try_parse_ascii(&record.key).ok());
        if let Err(e) = self.keyring.prefetch(persons).await {
            tracing::debug!(error = %e, "loading a batch's data keys at once failed; loading them one by one");
        }
    }
}

/// The key id a sealed payload names: one data key per person, so the person id.
pub fn key_id(person: Uuid) -> String {
    person.to_string()
}
