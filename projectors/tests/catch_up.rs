//! A projection catching up on a backlog holds at most `catch_up_records` records in full
//! batches at a time across its partitions, and still applies every event exactly once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callisto_avro::{Codec, EmbeddedRegistry};
use callisto_core::log::{AppendRequest, EmbeddedLog, EmbeddedLogOptions, EventLog};
use callisto_core::privacy::EventReader;
use callisto_core::readmodel::{Checkpoints, ProjectedEvent, Projection, StoreError};
use callisto_projectors::{Projector, ProjectorSettings};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod common;

const TOPIC: &str = "persons";
const PARTITIONS: u32 = 6;
const EVENTS: usize = 1200;
const BATCH: usize = 25;
const BUDGET: usize = 2;

/// Counts applies in flight, the most seen at once, and every application of every event.
struct Counting {
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    applied: Mutex<HashMap<(u32, u64), usize>>,
    checkpoints: Mutex<Checkpoints>,
    progress: watch::Sender<Checkpoints>,
}

#[async_trait]
impl Projection for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }

    fn system(&self) -> &'static str {
        "test"
    }

    async fn apply(&self, partition: u32, events: &[ProjectedEvent], through: u64) -> Result<(), StoreError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        // Long enough for every partition's worker to be waiting to apply at the same time.
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
async fn a_backlog_is_worked_off_within_the_catch_up_budget_and_exactly_once() {
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

    let projection = Arc::new(Counting {
        in_flight: AtomicUsize::new(0),
        most_in_flight: AtomicUsize::new(0),
        applied: Mutex::new(HashMap::new()),
        checkpoints: Mutex::new(BTreeMap::new()),
        progress: watch::channel(BTreeMap::new()).0,
    });
    let settings =
        ProjectorSettings { batch_max: BATCH, catch_up_records: BUDGET * BATCH, ..ProjectorSettings::new(TOPIC) };
    let stop = CancellationToken::new();
    let done = Projector::new(log, reader, vec![projection.clone()], settings).start(stop.clone()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while projection.applied.lock().unwrap().len() < EVENTS {
        assert!(Instant::now() < deadline, "the backlog was never worked off");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    done.await.unwrap();

    let applied = projection.applied.lock().unwrap();
    assert!(expected.iter().all(|p| applied.get(p) == Some(&1)), "every event applied exactly once");
    let most = projection.most_in_flight.load(Ordering::SeqCst);
    assert!(most <= BUDGET, "{most} batches in flight at once, over the budget of {BUDGET}");
}
