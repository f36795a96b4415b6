//! Decoded batches that one projection's worker hands to the other projections' workers of the
//! same partition.
//!
//! Projections catching up on a partition from the same offset (a rebuild of several read
//! models, a backlog after downtime) would each read, decode and open the same records, and
//! decoding and opening (Avro, AES-GCM, the keyring) is about a fifth of a rebuild's CPU. So a
//! worker about to wait for the catch-up budget says where it reads next
//! ([`SharedBatches::wait`]). A worker that decodes a batch starting there hands it over with
//! the budget it holds ([`Reading::offer`]): the batch is read and decoded once, both
//! projections apply it at the same time, and it counts once against the budget, which bounds
//! the batches held. A worker that gets the budget while another is reading its records follows
//! that one instead of reading them too ([`Claim::Follow`]).
//!
//! A batch is only ever handed to a worker that is waiting for exactly its records, from a feed
//! that reads by position, and the worker takes it the moment it stops waiting, so no batch is
//! left holding budget that nobody will take. The receiving worker moves its feed past the
//! records instead of reading them again; it keeps them for dead letters, as the decoding worker
//! does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use callisto_core::log::Record;
use callisto_core::readmodel::EventBatch;
use tokio::sync::{Notify, OwnedSemaphorePermit};

/// A batch decoded by one worker, as another takes it.
#[derive(Clone)]
pub struct Decoded {
    /// The records read, in offset order; never empty.
    pub records: Arc<Vec<Record>>,
    /// The events decoded from them: every record decoded (a batch with dead letters is not
    /// handed over, since each projection records its own).
    pub events: EventBatch,
    /// The catch-up budget the decoding worker took for it, released when every worker holding
    /// the batch is done with it.
    pub budget: Arc<OwnedSemaphorePermit>,
}

impl Decoded {
    fn first(&self) -> Option<u64> {
        self.records.first().map(|r| r.offset)
    }
}

/// A worker waiting for the budget: where it reads next, and how much at most.
struct Wanted {
    next: u64,
    batch_max: usize,
    wake: Arc<Notify>,
}

/// A batch handed over, with the projections it is for that have not taken it yet.
struct Offered {
    batch: Decoded,
    takers: Vec<&'static str>,
}

#[derive(Default)]
struct Partition {
    waiting: HashMap<&'static str, Wanted>,
    /// Workers reading and decoding a batch to hand over: where it starts, and its size at most.
    reading: HashMap<&'static str, (u64, usize)>,
    offered: Vec<Offered>,
}

/// One per projector, shared by the workers of all its projections.
#[derive(Default)]
pub struct SharedBatches {
    partitions: Mutex<HashMap<u32, Partition>>,
}

impl std::fmt::Debug for SharedBatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBatches").finish_non_exhaustive()
    }
}

impl SharedBatches {
    fn with<T>(&self, partition: u32, f: impl FnOnce(&mut Partition) -> T) -> T {
        // A panic while the lock was held leaves nothing half-done worth refusing over.
        let mut partitions = self.partitions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = partitions.entry(partition).or_default();
        let result = f(slot);
        if slot.waiting.is_empty() && slot.reading.is_empty() && slot.offered.is_empty() {
            partitions.remove(&partition);
        }
        result
    }

    /// `projection`'s worker of `partition` starts waiting for the budget to read `batch_max`
    /// records from `next`. It waits until the returned [`Waiting`] is dropped or claimed.
    pub fn wait(self: &Arc<Self>, partition: u32, projection: &'static str, next: u64, batch_max: usize) -> Waiting {
        let wake = Arc::new(Notify::new());
        self.with(partition, |slot| slot.waiting.insert(projection, Wanted { next, batch_max, wake: wake.clone() }));
        Waiting { shared: self.clone(), partition, projection, next, batch_max, wake }
    }
}

/// A worker waiting for the budget, or for a batch another projection's worker decodes from the
/// records it reads next.
pub struct Waiting {
    shared: Arc<SharedBatches>,
    partition: u32,
    projection: &'static str,
    next: u64,
    batch_max: usize,
    wake: Arc<Notify>,
}

/// What a worker holding the budget does next.
pub enum Claim {
    /// Use this batch, handed over with its own budget (the worker's goes back).
    Handed(Decoded),
    /// Another projection's worker is reading these records to hand them over: keep waiting.
    Follow,
    /// Read and decode the records, and offer them through this.
    Read(Reading),
}

impl Waiting {
    /// Woken when a batch is handed over, or when a worker it follows gives up.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// The batch handed over, if one was; waiting ends with it.
    pub fn take(&self) -> Option<Decoded> {
        self.shared.with(self.partition, |slot| {
            let taken = take_offered(slot, self.projection);
            if taken.is_some() {
                slot.waiting.remove(self.projection);
            }
            taken
        })
    }

    /// With the budget in hand: take a batch handed over meanwhile, follow a worker already
    /// reading the same records, or read them.
    pub fn claim(&self) -> Claim {
        self.shared.with(self.partition, |slot| {
            if let Some(batch) = take_offered(slot, self.projection) {
                slot.waiting.remove(self.projection);
                return Claim::Handed(batch);
            }
            let wanted = (self.next, self.batch_max);
            if slot.reading.iter().any(|(name, at)| *name != self.projection && *at == wanted) {
                return Claim::Follow;
            }
            slot.waiting.remove(self.projection);
            slot.reading.insert(self.projection, wanted);
            Claim::Read(Reading { shared: self.shared.clone(), partition: self.partition, projection: self.projection })
        })
    }
}

impl Drop for Waiting {
    /// Waiting ends however the wait does (a stop, a claim): nothing is handed to a worker that
    /// is gone, and a batch handed over at that moment is dropped with its budget.
    fn drop(&mut self) {
        self.shared.with(self.partition, |slot| {
            slot.waiting.remove(self.projection);
            take_offered(slot, self.projection)
        });
    }
}

/// A worker reading a batch that others may be waiting for; when dropped, those it did not hand
/// the batch to stop following it.
pub struct Reading {
    shared: Arc<SharedBatches>,
    partition: u32,
    projection: &'static str,
}

impl Reading {
    /// `batch` is decoded, from `batch_max` records at most: hands it to the other projections'
    /// workers waiting to read the same records. Returns how many take it.
    pub fn offer(&self, batch_max: usize, batch: &Decoded) -> usize {
        self.shared.with(self.partition, |slot| {
            let takers: Vec<&'static str> = slot
                .waiting
                .iter()
                .filter(|(name, w)| {
                    **name != self.projection && Some(w.next) == batch.first() && w.batch_max == batch_max
                })
                .map(|(name, _)| *name)
                .collect();
            for name in &takers {
                slot.waiting[name].wake.notify_one();
            }
            let count = takers.len();
            if count > 0 {
                slot.offered.push(Offered { batch: batch.clone(), takers });
            }
            count
        })
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.shared.with(self.partition, |slot| {
            let Some(at) = slot.reading.remove(self.projection) else { return };
            for wanted in slot.waiting.values().filter(|w| (w.next, w.batch_max) == at) {
                wanted.wake.notify_one();
            }
        });
    }
}

fn take_offered(slot: &mut Partition, projection: &'static str) -> Option<Decoded> {
    let at = slot.offered.iter().position(|o| o.takers.contains(&projection))?;
    let offered = &mut slot.offered[at];
    offered.takers.retain(|name| *name != projection);
    let batch = offered.batch.clone();
    if offered.takers.is_empty() {
        slot.offered.swap_remove(at);
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    async fn batch(budget: &Arc<Semaphore>, first: u64, records: u64) -> Decoded {
        let permit = budget.clone().acquire_many_owned(1).await.unwrap();
        let record = |offset| Record {
            topic: "persons".into(),
            partition: 0,
            offset,
            timestamp_ms: 0,
            key: Vec::new(),
            payload: Vec::new(),
            headers: Vec::new(),
        };
        Decoded {
            records: Arc::new((first..first + records).map(record).collect()),
            events: Arc::default(),
            budget: Arc::new(permit),
        }
    }

    fn reading(waiting: &Waiting) -> Reading {
        match waiting.claim() {
            Claim::Read(reading) => reading,
            _ => panic!("nobody else reads these records"),
        }
    }

    async fn woken(waiting: &Waiting) {
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting.woken()).await.expect("woken");
    }

    #[tokio::test]
    async fn a_batch_goes_only_to_workers_waiting_for_exactly_its_records() {
        let shared = Arc::new(SharedBatches::default());
        let budget = Arc::new(Semaphore::new(4));
        let search = shared.wait(0, "search", 100, 50);
        let _elsewhere = shared.wait(0, "elsewhere", 150, 50);
        let smaller = shared.wait(0, "smaller", 100, 25);
        let other_partition = shared.wait(1, "other-partition", 100, 50);
        let documents = reading(&shared.wait(0, "documents", 100, 50));
        let decoded = batch(&budget, 100, 50).await;
        assert_eq!(documents.offer(50, &decoded), 1, "only the worker at offset 100 taking 50");
        woken(&search).await;
        let taken = search.take().expect("handed over");
        assert_eq!((taken.records.len(), taken.first()), (50, Some(100)));
        assert!(search.take().is_none(), "taken once");
        assert!(smaller.take().is_none());
        assert!(other_partition.take().is_none());
        assert_eq!(documents.offer(50, &decoded), 0, "the taker no longer waits");
    }

    #[tokio::test]
    async fn the_budget_is_held_until_every_holder_is_done() {
        let shared = Arc::new(SharedBatches::default());
        let budget = Arc::new(Semaphore::new(2));
        let search = shared.wait(3, "search", 0, 10);
        let documents = reading(&shared.wait(3, "documents", 0, 10));
        let decoded = batch(&budget, 0, 10).await;
        assert_eq!(documents.offer(10, &decoded), 1);
        drop((decoded, documents));
        assert_eq!(budget.available_permits(), 1, "the offered batch holds the budget");
        let Claim::Handed(taken) = search.claim() else { panic!("a batch handed over is claimed first") };
        drop(search);
        assert_eq!(budget.available_permits(), 1);
        drop(taken);
        assert_eq!(budget.available_permits(), 2, "released once the taker is done");

        // A worker that stops waiting leaves no batch behind holding the budget.
        let search = shared.wait(3, "search", 10, 10);
        let documents = reading(&shared.wait(3, "documents", 10, 10));
        assert_eq!(documents.offer(10, &batch(&budget, 10, 10).await), 1);
        drop((search, documents));
        assert_eq!(budget.available_permits(), 2);
        assert!(shared.partitions.lock().unwrap().is_empty(), "nothing is left behind");
    }

    #[tokio::test]
    async fn a_worker_with_the_budget_follows_one_already_reading_its_records() {
        let shared = Arc::new(SharedBatches::default());
        let budget = Arc::new(Semaphore::new(2));
        let search = shared.wait(0, "search", 0, 10);
        let documents = reading(&shared.wait(0, "documents", 0, 10));
        assert!(matches!(search.claim(), Claim::Follow));
        assert_eq!(documents.offer(10, &batch(&budget, 0, 10).await), 1);
        woken(&search).await;
        assert!(search.take().is_some(), "the followed worker's batch");

        // A worker that reads without handing its batch over (dead letters) wakes its followers,
        // which then read for themselves.
        let search = shared.wait(0, "search", 10, 10);
        let documents = reading(&shared.wait(0, "documents", 10, 10));
        assert!(matches!(search.claim(), Claim::Follow));
        drop(documents);
        woken(&search).await;
        assert!(search.take().is_none());
        assert!(matches!(search.claim(), Claim::Read(_)));
    }
}
