//! Once live, a worker reads its partition at most every `live_read_interval` while records keep
//! coming, so records arriving meanwhile share a batch; a record after a quiet spell is applied
//! at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callisto_core::log::EventLog;
use callisto_core::readmodel::{Checkpoints, EventBatch, Projection, StoreError};
use callisto_projectors::{Projector, ProjectorSettings};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod common;

const TOPIC: &str = "persons";

/// Keeps the offsets of each batch it applies.
struct Recording {
    batches: Mutex<Vec<Vec<u64>>>,
    checkpoints: Mutex<Checkpoints>,
    progress: watch::Sender<Checkpoints>,
}

#[async_trait]
impl Projection for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }

    fn system(&self) -> &'static str {
        "test"
    }

    async fn apply_shared(&self, partition: u32, events: EventBatch, through: u64) -> Result<(), StoreError> {
        self.batches.lock().unwrap().push(events.iter().map(|e| e.offset).collect());
        let mut checkpoints = self.checkpoints.lock().unwrap();
        checkpoints.insert(partition, through);
        self.progress.send_replace(checkpoints.clone());
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
async fn records_arriving_within_the_live_read_interval_share_a_batch_and_a_lone_one_is_not_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let (codec, reader) = common::codec_and_reader(dir.path(), TOPIC);
    let log = common::embedded_log(dir.path(), TOPIC, 1).await;
    let append = |log: Arc<dyn EventLog>| {
        let request = common::note_append(&codec, TOPIC, "live");
        async move { log.append(request).await.unwrap().offset }
    };
    let projection = Arc::new(Recording {
        batches: Mutex::new(Vec::new()),
        checkpoints: Mutex::new(BTreeMap::new()),
        progress: watch::channel(BTreeMap::new()).0,
    });
    let interval = Duration::from_secs(2);
    let settings = ProjectorSettings {
        poll_wait: Duration::from_millis(100),
        live_read_interval: interval,
        ..ProjectorSettings::new(TOPIC)
    };
    let stop = CancellationToken::new();
    let done = Projector::new(log.clone(), reader, vec![projection.clone() as Arc<dyn Projection>], settings)
        .start(stop.clone())
        .await
        .unwrap();
    let applied = |through: u64| {
        let projection = projection.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while projection.checkpoints.lock().unwrap().get(&0).is_none_or(|&at| at < through) {
                assert!(Instant::now() < deadline, "offset {through} was never applied");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };

    // A quiet spell, then one record: applied without waiting for the interval.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    let first = append(log.clone()).await;
    applied(first).await;
    assert!(sent.elapsed() < interval / 2, "a lone record waited {:?}", sent.elapsed());
    // Traffic: records sent apart right after it are read together, one interval after it.
    let second = append(log.clone()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = append(log.clone()).await;
    applied(third).await;
    stop.cancel();
    done.await.unwrap();
    assert_eq!(*projection.batches.lock().unwrap(), vec![vec![first], vec![second, third]]);
}
