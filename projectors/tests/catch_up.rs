//! Projections catching up on a backlog hold at most `catch_up_records` records in full batches
//! at a time, across their partitions and across the projections of one projector, and still
//! apply every event exactly once; a batch one projection decoded reaches the other as it is,
//! and every batch of the backlog reaches the stores as one read while catching up.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callisto_core::readmodel::{Checkpoints, EventBatch, Projection, StoreError};
use callisto_projectors::{Projector, ProjectorSettings};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod common;

const TOPIC: &str = "persons";
const PARTITIONS: u32 = 6;
const EVENTS: usize = 1200;
const BATCH: usize = 25;
const BUDGET: usize = 2;

/// Decoded batches being applied, by the address of their events, with the applies of each
/// (with the projector's other projections): a batch two projections apply at once is held once.
#[derive(Default)]
struct InFlight {
    batches: Mutex<HashMap<usize, usize>>,
    most: AtomicUsize,
}

/// Counts batches in flight, the most seen at once, and every application of every event; keeps
/// every batch it was given, so their addresses are never reused.
struct Counting {
    name: &'static str,
    in_flight: Arc<InFlight>,
    applied: Mutex<HashMap<(u32, u64), usize>>,
    /// Each batch, by its partition and first offset.
    batches: Mutex<HashMap<(u32, u64), EventBatch>>,
    /// The batches applied as read under the catch-up budget, by the same key.
    caught_up: Mutex<HashSet<(u32, u64)>>,
    checkpoints: Mutex<Checkpoints>,
    progress: watch::Sender<Checkpoints>,
}

#[async_trait]
impl Projection for Counting {
    fn name(&self) -> &'static str {
        self.name
    }

    fn system(&self) -> &'static str {
        "test"
    }

    async fn apply_shared(&self, partition: u32, events: EventBatch, through: u64) -> Result<(), StoreError> {
        let address = Arc::as_ptr(&events) as usize;
        {
            let mut batches = self.in_flight.batches.lock().unwrap();
            *batches.entry(address).or_default() += 1;
            self.in_flight.most.fetch_max(batches.len(), Ordering::SeqCst);
        }
        if let Some(first) = events.first() {
            self.batches.lock().unwrap().insert((partition, first.offset), events.clone());
        }
        // Long enough for every worker of both projections to be waiting to apply at once.
        tokio::time::sleep(Duration::from_millis(10)).await;
        {
            let mut applied = self.applied.lock().unwrap();
            for event in events.iter() {
                *applied.entry((event.partition, event.offset)).or_default() += 1;
            }
            let mut checkpoints = self.checkpoints.lock().unwrap();
            checkpoints.insert(partition, through);
            self.progress.send_replace(checkpoints.clone());
        }
        let mut batches = self.in_flight.batches.lock().unwrap();
        let applies = batches.get_mut(&address).expect("counted when it started");
        *applies -= 1;
        if *applies == 0 {
            batches.remove(&address);
        }
        Ok(())
    }

    async fn apply_catching_up(&self, partition: u32, events: EventBatch, through: u64) -> Result<(), StoreError> {
        if let Some(first) = events.first() {
            self.caught_up.lock().unwrap().insert((partition, first.offset));
        }
        self.apply_shared(partition, events, through).await
    }

    async fn checkpoints(&self) -> Result<Checkpoints, StoreError> {
        Ok(self.checkpoints.lock().unwrap().clone())
    }

    fn progress(&self) -> watch::Receiver<Checkpoints> {
        self.progress.subscribe()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_worked_off_by_two_projections_within_one_catch_up_budget_and_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (codec, reader) = common::codec_and_reader(dir.path(), TOPIC);
    let log = common::embedded_log(dir.path(), TOPIC, PARTITIONS).await;
    let mut expected = Vec::with_capacity(EVENTS);
    for _ in 0..EVENTS {
        let appended = log.append(common::note_append(&codec, TOPIC, "backlog")).await.unwrap();
        expected.push((appended.partition, appended.offset));
    }

    let in_flight = Arc::new(InFlight::default());
    let projections: Vec<Arc<Counting>> = ["documents-like", "search-like"]
        .into_iter()
        .map(|name| {
            Arc::new(Counting {
                name,
                in_flight: in_flight.clone(),
                applied: Mutex::new(HashMap::new()),
                batches: Mutex::new(HashMap::new()),
                caught_up: Mutex::new(HashSet::new()),
                checkpoints: Mutex::new(BTreeMap::new()),
                progress: watch::channel(BTreeMap::new()).0,
            })
        })
        .collect();
    let settings =
        ProjectorSettings { batch_max: BATCH, catch_up_records: BUDGET * BATCH, ..ProjectorSettings::new(TOPIC) };
    let stop = CancellationToken::new();
    let started: Vec<Arc<dyn Projection>> = projections.iter().map(|p| p.clone() as Arc<dyn Projection>).collect();
    let done = Projector::new(log, reader, started, settings).start(stop.clone()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while projections.iter().any(|p| p.applied.lock().unwrap().len() < EVENTS) {
        assert!(Instant::now() < deadline, "the backlog was never worked off");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    done.await.unwrap();

    for projection in &projections {
        let applied = projection.applied.lock().unwrap();
        let name = projection.name;
        assert!(expected.iter().all(|p| applied.get(p) == Some(&1)), "{name} applied every event exactly once");
    }
    // Every batch of the backlog was read under the budget and applied as such, the short
    // last batch of each partition too, so a store need not hold the budget until it commits.
    for projection in &projections {
        let (batches, caught_up) = (projection.batches.lock().unwrap(), projection.caught_up.lock().unwrap());
        let name = projection.name;
        assert!(batches.keys().all(|start| caught_up.contains(start)), "{name} applied a backlog batch as live");
        assert!(batches.values().any(|batch| batch.len() < BATCH), "{name}: no partition ended in a short batch");
    }
    let most = in_flight.most.load(Ordering::SeqCst);
    assert!(most <= BUDGET, "{most} batches of both projections in flight at once, over the budget of {BUDGET}");

    // Both projections start every partition at offset 0 with the same batch size, so nearly
    // every batch is decoded by one and handed to the other (two workers taking the budget at
    // the same moment each decode their own).
    let (documents, search) = (projections[0].batches.lock().unwrap(), projections[1].batches.lock().unwrap());
    let shared = documents
        .iter()
        .filter(|(start, batch)| search.get(start).is_some_and(|other| Arc::ptr_eq(batch, other)))
        .count();
    let total = documents.len();
    assert!(shared * 2 >= total, "only {shared} of {total} batches were decoded once for both projections");
}
