//! Projectors as Kafka consumer-group members, on librdkafka's mock cluster (3 brokers): two
//! members share the partitions, and handing partitions over (a member joining, then the first
//! one leaving) neither loses an event nor applies one twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callisto_avro::Codec;
use callisto_core::log::{EventLog, KafkaLog, KafkaLogOptions};
use callisto_core::privacy::EventReader;
use callisto_core::readmodel::{Checkpoints, EventBatch, Projection, StoreError};
use callisto_projectors::{Projector, ProjectorSettings, dlq};
use rdkafka::mocking::MockCluster;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod common;

/// Every application of every event, by whom, shared by both members like a shared database.
#[derive(Default)]
struct Applied {
    by_position: HashMap<(u32, u64), Vec<&'static str>>,
    checkpoints: Checkpoints,
}

/// One member's view of the shared read model.
struct Recording {
    member: &'static str,
    applied: Arc<Mutex<Applied>>,
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
        let events = events.as_slice();
        // Long enough that revokes regularly find a batch in flight.
        tokio::time::sleep(Duration::from_millis(15)).await;
        let mut applied = self.applied.lock().unwrap();
        for event in events {
            applied.by_position.entry((event.partition, event.offset)).or_default().push(self.member);
        }
        applied.checkpoints.insert(partition, through);
        self.progress.send_replace(applied.checkpoints.clone());
        Ok(())
    }

    async fn checkpoints(&self) -> Result<Checkpoints, StoreError> {
        Ok(self.applied.lock().unwrap().checkpoints.clone())
    }

    fn progress(&self) -> watch::Receiver<Checkpoints> {
        self.progress.subscribe()
    }
}

async fn produce(log: &KafkaLog, codec: &Codec, topic: &str, count: usize, pause: Duration) -> Vec<(u32, u64)> {
    let mut positions = Vec::with_capacity(count);
    for _ in 0..count {
        let appended = log.append(common::note_append(codec, topic, "handed over")).await.unwrap();
        positions.push((appended.partition, appended.offset));
        tokio::time::sleep(pause).await;
    }
    positions
}

/// Waits until every position in `expected` has been applied at least once.
async fn wait_applied(applied: &Mutex<Applied>, expected: &[(u32, u64)], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let missing = {
            let applied = applied.lock().unwrap();
            expected.iter().filter(|p| !applied.by_position.contains_key(p)).count()
        };
        if missing == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{missing} of {} events never applied", expected.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Member {
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

async fn start_member(
    name: &'static str,
    options: &KafkaLogOptions,
    reader: &Arc<EventReader>,
    applied: &Arc<Mutex<Applied>>,
    settings: &ProjectorSettings,
) -> Member {
    let log: Arc<dyn EventLog> = Arc::new(KafkaLog::new(options.clone()).unwrap());
    let projection =
        Arc::new(Recording { member: name, applied: applied.clone(), progress: watch::channel(BTreeMap::new()).0 });
    let stop = CancellationToken::new();
    let done =
        Projector::new(log, reader.clone(), vec![projection], settings.clone()).start(stop.clone()).await.unwrap();
    Member { stop, done }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_partitions_and_hand_them_over_without_loss_or_repeats() {
    let cluster = MockCluster::new(3).unwrap();
    let topic = format!("persons-{}", Uuid::new_v4().simple());
    cluster.create_topic(&topic, 6, 3).unwrap();
    cluster.create_topic(&dlq::topic_for(&topic), 6, 3).unwrap();
    let mut options = KafkaLogOptions::new(cluster.bootstrap_servers());
    options.replication_factor = 3;
    options.min_insync_replicas = None;
    options.request_timeout = Duration::from_secs(5);
    // A member that vanishes is noticed quickly; a clean leave never waits for this.
    options.properties.insert("session.timeout.ms".into(), "6000".into());
    options.properties.insert("heartbeat.interval.ms".into(), "500".into());
    let dir = tempfile::tempdir().unwrap();
    let (codec, reader) = common::codec_and_reader(dir.path(), &topic);
    let producer = KafkaLog::new(options.clone()).unwrap();
    let mut settings = ProjectorSettings::new(&topic);
    settings.group = format!("group-test-{}", Uuid::new_v4().simple());
    settings.batch_max = 20;
    settings.poll_wait = Duration::from_millis(100);
    let applied = Arc::new(Mutex::new(Applied::default()));

    // One member: it owns every partition.
    let first = start_member("first", &options, &reader, &applied, &settings).await;
    let mut expected = produce(&producer, &codec, &topic, 300, Duration::ZERO).await;
    wait_applied(&applied, &expected, Duration::from_secs(30)).await;

    // A second member joins under a steady load: the group rebalances and the partitions
    // moved to it start after the shared checkpoint.
    let second = start_member("second", &options, &reader, &applied, &settings).await;
    let joined_at = expected.len();
    expected.extend(produce(&producer, &codec, &topic, 400, Duration::from_millis(10)).await);
    let shared_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let second_applied = applied.lock().unwrap().by_position.values().any(|by| by.contains(&"second"));
        if second_applied {
            break;
        }
        assert!(Instant::now() < shared_deadline, "the second member never got a partition");
        expected.extend(produce(&producer, &codec, &topic, 20, Duration::from_millis(10)).await);
    }
    wait_applied(&applied, &expected, Duration::from_secs(30)).await;
    let first_after_join =
        expected[joined_at..].iter().filter(|p| applied.lock().unwrap().by_position[p].contains(&"first")).count();
    assert!(first_after_join > 0, "the first member kept no partition after the second joined");

    // The first member leaves under load: its partitions drain and move to the second.
    let leaving = tokio::spawn({
        let Member { stop, done } = first;
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop.cancel();
            done.await.unwrap();
        }
    });
    expected.extend(produce(&producer, &codec, &topic, 400, Duration::from_millis(5)).await);
    leaving.await.unwrap();
    let after_leave = produce(&producer, &codec, &topic, 200, Duration::ZERO).await;
    expected.extend(after_leave.iter().copied());
    wait_applied(&applied, &expected, Duration::from_secs(30)).await;

    {
        let applied = applied.lock().unwrap();
        let repeated: Vec<_> = applied.by_position.iter().filter(|(_, by)| by.len() > 1).collect();
        assert!(repeated.is_empty(), "events applied more than once: {:?}", &repeated[..repeated.len().min(5)]);
        assert_eq!(applied.by_position.len(), expected.len(), "applied events that were never produced");
        assert!(
            after_leave.iter().all(|p| applied.by_position[p] == ["second"]),
            "the second member did not take over"
        );
    }
    second.stop.cancel();
    second.done.await.unwrap();
}
