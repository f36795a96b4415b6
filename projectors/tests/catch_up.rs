//! Projections catching up on a backlog hold at most `catch_up_records` records in full batches
//! at a time, across their partitions and across the projections of one projector, and still
//! apply every event exactly once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callisto_avro::{Codec, EmbeddedRegistry};
use callisto_core::log::{AppendRequest, EmbeddedLog, EmbeddedLogOptions, EventLog};
use callisto_core::privacy::EventReader;
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

/// Counts applies in flight (with the projector's other projections), the most seen at once,
/// and every application of every event.
struct Counting {
    name: &'static str,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
    applied: Mutex<HashMap<(u32, u64), usize>>,
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
        let events = events.as_slice();
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        // Long enough for every worker of both projections to be waiting to apply at once.
        tokio::time::sleep(Duration::from_millis(10)).await;
        {
            let mut applied = self.applied.lock().unwrap();
            for event in events {
                *applied.entry((event.partition, event.offset)).or_default() += 1;
            }
            let mut checkpoints = self.checkpoints.lock().unwrap();
            checkpoints.insert(partition, through);
            self.progress.send_replace(checkpoints.clone());
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Ok(())
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
    let codec =
        Arc::new(Codec::new(Arc::new(EmbeddedRegistry::open(&dir.path().join("s.redb")).unwrap()), TOPIC).unwrap());
    let reader = Arc::new(EventReader::new(codec.clone(), callisto_core::privacy::open_embedded(dir.path()).unwrap()));
    let log: Arc<dyn EventLog> =
        Arc::new(EmbeddedLog::open(&dir.path().join("log.redb"), EmbeddedLogOptions::default()).unwrap());
    log.ensure_topic(TOPIC, PARTITIONS).await.unwrap();
    let mut expected = Vec::with_capacity(EVENTS);
    for _ in 0..EVENTS {
        let event = common::note("backlog");
        let request = AppendRequest {
            topic: TOPIC.into(),
            key: event.meta().person_id.to_string().into_bytes(),
            payload: codec.encode(&event).unwrap(),
            headers: Vec::new(),
            idempotency: None,
        };
        let appended = log.append(request).await.unwrap();
        expected.push((appended.partition, appended.offset));
    }

    let (in_flight, most_in_flight) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let projections: Vec<Arc<Counting>> = ["documents-like", "search-like"]
        .into_iter()
        .map(|name| {
            Arc::new(Counting {
                name,
                in_flight: in_flight.clone(),
                most_in_flight: most_in_flight.clone(),
                applied: Mutex::new(HashMap::new()),
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
    let most = most_in_flight.load(Ordering::SeqCst);
    assert!(most <= BUDGET, "{most} batches of both projections in flight at once, over the budget of {BUDGET}");
}
