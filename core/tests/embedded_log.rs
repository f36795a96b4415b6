//! The embedded event log against the `EventLog` contract: positions, durability across
//! reopen, time lookup, consumer offsets, idempotency and concurrent appenders.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use callisto_core::log::{
    AppendRequest, EmbeddedLog, EmbeddedLogOptions, EventLog, IdempotencyKey, LogError, PartitionFeed, PositionFeed,
};
use callisto_core::partition::partition_for;

const TOPIC: &str = "persons";

fn open(dir: &std::path::Path) -> EmbeddedLog {
    EmbeddedLog::open(&dir.join("log.redb"), EmbeddedLogOptions::default()).unwrap()
}

fn request(key: &str, payload: &str) -> AppendRequest {
    AppendRequest {
        topic: TOPIC.into(),
        key: key.as_bytes().to_vec(),
        payload: payload.as_bytes().to_vec(),
        headers: vec![("event_type".into(), b"Test".to_vec())],
        idempotency: None,
    }
}

#[tokio::test]
async fn appends_land_on_the_murmur2_partition_with_dense_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.ensure_topic(TOPIC, 12).await.unwrap();
    let mut next: HashMap<u32, u64> = HashMap::new();
    for i in 0..60 {
        let key = format!("person-{}", i % 7);
        let at = log.append(request(&key, &format!("e{i}"))).await.unwrap();
        assert_eq!(at.partition, partition_for(key.as_bytes(), 12));
        let expected = next.entry(at.partition).or_default();
        assert_eq!(at.offset, *expected, "offsets are dense per partition");
        *expected += 1;
        assert!(!at.replayed);
    }
    let ends = log.end_offsets(TOPIC).await.unwrap();
    assert_eq!(ends.len(), 12);
    for (p, end) in ends.iter().enumerate() {
        assert_eq!(*end, next.get(&(p as u32)).copied().unwrap_or(0));
    }
    let (&p, &count) = next.iter().max_by_key(|(_, n)| **n).unwrap();
    assert!(count >= 2);
    let records = log.read(TOPIC, p, 0, 1000, Duration::ZERO).await.unwrap();
    assert_eq!(records.len() as u64, count);
    assert!(records.windows(2).all(|w| w[0].offset + 1 == w[1].offset && w[0].timestamp_ms <= w[1].timestamp_ms));
    assert_eq!(records[0].header("event_type"), Some(&b"Test"[..]));
    let from_one = log.read(TOPIC, p, 1, 1, Duration::ZERO).await.unwrap();
    assert_eq!(from_one.len(), 1, "max_records is honoured");
    assert_eq!(from_one[0], records[1]);
}

#[tokio::test]
async fn unknown_topics_partitions_and_count_changes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    assert!(matches!(log.append(request("k", "v")).await, Err(LogError::UnknownTopic(_))));
    log.ensure_topic(TOPIC, 3).await.unwrap();
    log.ensure_topic(TOPIC, 3).await.unwrap();
    assert!(matches!(log.ensure_topic(TOPIC, 4).await, Err(LogError::PartitionCountMismatch { actual: 3, .. })));
    assert!(matches!(log.read(TOPIC, 3, 0, 1, Duration::ZERO).await, Err(LogError::UnknownPartition { .. })));
    assert_eq!(log.partitions(TOPIC).await.unwrap(), 3);
}

#[tokio::test]
async fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut written = Vec::new();
    {
        let log = open(dir.path());
        log.ensure_topic(TOPIC, 4).await.unwrap();
        for i in 0..25 {
            let at = log.append(request(&format!("k{}", i % 5), &format!("payload-{i}"))).await.unwrap();
            written.push((at, format!("payload-{i}")));
        }
        log.commit_offsets("projector", TOPIC, &[(0, 3), (2, 1)]).await.unwrap();
    }
    let log = open(dir.path());
    for (at, payload) in &written {
        let got = log.read(TOPIC, at.partition, at.offset, 1, Duration::ZERO).await.unwrap();
        assert_eq!(got[0].offset, at.offset);
        assert_eq!(got[0].payload, payload.as_bytes());
        assert_eq!(got[0].timestamp_ms, at.timestamp_ms);
    }
    assert_eq!(log.committed_offsets("projector", TOPIC).await.unwrap(), vec![(0, 3), (2, 1)]);
    assert!(log.committed_offsets("other", TOPIC).await.unwrap().is_empty());
    // Appends continue where they stopped.
    let at = log.append(request("k0", "after")).await.unwrap();
    let before = written.iter().filter(|(a, _)| a.partition == at.partition).count() as u64;
    assert_eq!(at.offset, before);
}

/// Options under which the writer closes a journal file for the flusher every `records`
/// records, and never on a timer.
fn flushed_every(records: usize) -> EmbeddedLogOptions {
    EmbeddedLogOptions {
        flush_interval: Duration::from_secs(3600),
        flush_records: records,
        ..EmbeddedLogOptions::default()
    }
}

/// The journal files in `dir`.
fn journal_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("-journal-"))
        .count()
}

/// Copies the log's files as a power cut would leave them, each journal file's end torn; returns
/// how many journal files there were.
fn crash_image(live: &std::path::Path, crashed: &std::path::Path) -> usize {
    let mut journals = 0;
    for entry in std::fs::read_dir(live).unwrap() {
        let path = entry.unwrap().path();
        let copy = crashed.join(path.file_name().unwrap());
        std::fs::copy(&path, &copy).unwrap();
        if copy.to_string_lossy().contains("-journal-") {
            journals += 1;
            let mut torn = std::fs::OpenOptions::new().append(true).open(&copy).unwrap();
            std::io::Write::write_all(&mut torn, &[200, 0, 0, 0, 1, 2, 3, 4, 5, 6]).unwrap();
        }
    }
    journals
}

/// Journal files are written over once flushed: a crash then finds old frames past the new ones
/// in the same file, and must apply the new ones alone.
#[tokio::test]
async fn a_crash_after_journal_files_were_written_over_applies_only_the_unflushed_groups() {
    let live = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    // A journal file is closed every 4 records and only then.
    let options = flushed_every(4);
    let log = EmbeddedLog::open(&live.path().join("log.redb"), options.clone()).unwrap();
    log.ensure_topic(TOPIC, 3).await.unwrap();
    let mut written = Vec::new();
    for i in 0..42 {
        let at = log.append(request(&format!("k{}", i % 5), &format!("payload-{i}"))).await.unwrap();
        written.push((at, format!("payload-{i}")));
    }
    // The flusher takes every closed file; the last two appends are in the journal alone. It
    // runs every 100 ms; on a machine too busy to do so within 300 ms, the test waits longer
    // rather than copy files it is still working on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while journal_files(live.path()) > 1 + 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let journals = crash_image(live.path(), crashed.path());
    assert!(journals <= 1 + 2, "flushed journal files are written over or removed, not kept: {journals}");
    drop(log);
    let log = EmbeddedLog::open(&crashed.path().join("log.redb"), options).unwrap();
    assert_eq!(log.end_offsets(TOPIC).await.unwrap().iter().sum::<u64>(), 42);
    for (at, payload) in &written {
        let got = log.read(TOPIC, at.partition, at.offset, 1, Duration::ZERO).await.unwrap();
        assert_eq!((got[0].offset, got[0].payload.as_slice()), (at.offset, payload.as_bytes()));
    }
}

/// A crash between flushes: what the journal acknowledged is in the log after it, positions,
/// timestamps and idempotency keys included, and a frame torn by the crash is ignored.
#[tokio::test]
async fn appends_only_journaled_at_a_crash_are_there_after_it() {
    let live = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    // Nothing reaches redb while the log is open.
    let options = flushed_every(usize::MAX);
    let mut written = Vec::new();
    {
        let log = EmbeddedLog::open(&live.path().join("log.redb"), options.clone()).unwrap();
        log.ensure_topic(TOPIC, 4).await.unwrap();
        for i in 0..30 {
            let idempotency =
                (i % 10 == 0).then(|| IdempotencyKey { key: format!("retry-{i}"), fingerprint: [i as u8; 32] });
            let at = log
                .append(AppendRequest { idempotency, ..request(&format!("k{}", i % 7), &format!("payload-{i}")) })
                .await
                .unwrap();
            written.push((at, format!("payload-{i}")));
        }
        // The files as a power cut would leave them: redb before any of these appends, and the
        // journal with a frame half written after them.
        assert_eq!(crash_image(live.path(), crashed.path()), 1, "one journal file holds the appends");
    }
    let log = EmbeddedLog::open(&crashed.path().join("log.redb"), options).unwrap();
    let ends = log.end_offsets(TOPIC).await.unwrap();
    assert_eq!(ends.iter().sum::<u64>(), 30);
    for (at, payload) in &written {
        let got = log.read(TOPIC, at.partition, at.offset, 1, Duration::ZERO).await.unwrap();
        assert_eq!((got[0].offset, got[0].timestamp_ms), (at.offset, at.timestamp_ms));
        assert_eq!(got[0].payload, payload.as_bytes());
    }
    let retried = AppendRequest {
        idempotency: Some(IdempotencyKey { key: "retry-10".into(), fingerprint: [10; 32] }),
        ..request("k3", "payload-10")
    };
    let again = log.append(retried).await.unwrap();
    assert!(again.replayed, "the key taken before the crash is remembered");
    assert_eq!((again.partition, again.offset), (written[10].0.partition, written[10].0.offset));
    // Appends go on after the recovered ones.
    let next = log.append(request("k0", "after")).await.unwrap();
    assert_eq!(next.offset, ends[next.partition as usize]);
}

/// A feed records its first position at once and its last as soon as a read finds the partition
/// idle; that it skips the ones between is the next case.
#[tokio::test]
async fn a_position_feed_records_its_first_position_and_its_last_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(open(dir.path()));
    log.ensure_topic(TOPIC, 1).await.unwrap();
    for i in 0..50 {
        log.append(request("k", &format!("e{i}"))).await.unwrap();
    }
    let mut feed = PositionFeed::new(log.clone(), TOPIC.into(), "projector".into(), 0, 0);
    let mut processed = 0;
    loop {
        let records = feed.next_batch(5, Duration::ZERO).await.unwrap();
        let Some(last) = records.last() else { break };
        processed += records.len();
        feed.processed(last.offset + 1).await.unwrap();
        if processed == 5 {
            assert_eq!(log.committed_offsets("projector", TOPIC).await.unwrap(), vec![(0, 5)], "the first is recorded");
        }
    }
    assert_eq!(processed, 50);
    // Ten batches within one interval: only the idle read that ended the loop can have committed
    // the last position.
    assert_eq!(log.committed_offsets("projector", TOPIC).await.unwrap(), vec![(0, 50)]);
}

#[tokio::test]
async fn a_position_feed_commits_at_most_once_per_interval_while_busy() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(open(dir.path()));
    log.ensure_topic(TOPIC, 1).await.unwrap();
    let mut feed = PositionFeed::new(log.clone(), TOPIC.into(), "projector".into(), 0, 0);
    for next in 1..=100 {
        feed.processed(next).await.unwrap();
    }
    // Well inside one interval: only the first position reached the log.
    assert_eq!(log.committed_offsets("projector", TOPIC).await.unwrap(), vec![(0, 1)]);
    tokio::time::sleep(PositionFeed::COMMIT_INTERVAL).await;
    feed.processed(101).await.unwrap();
    assert_eq!(log.committed_offsets("projector", TOPIC).await.unwrap(), vec![(0, 101)]);
}

#[tokio::test]
async fn offsets_for_timestamp_finds_the_first_record_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.ensure_topic(TOPIC, 1).await.unwrap();
    // Enough records that the sparse time index has several entries, and stamps that repeat
    // (several appends in a millisecond) as well as ones that jump.
    let mut stamps = Vec::new();
    for i in 0..100 {
        stamps.push(log.append(request("k", &format!("{i}"))).await.unwrap());
        if i % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let first_at_or_after = |t: i64| stamps.iter().find(|s| s.timestamp_ms >= t).map(|s| s.offset);
    let mut probes: Vec<i64> =
        stamps.iter().flat_map(|s| [s.timestamp_ms - 1, s.timestamp_ms, s.timestamp_ms + 1]).collect();
    probes.extend([0, i64::MIN, i64::MAX]);
    for t in probes {
        assert_eq!(log.offsets_for_timestamp(TOPIC, t).await.unwrap(), vec![first_at_or_after(t)], "at {t}");
    }
    assert_eq!(log.offsets_for_timestamp(TOPIC, 0).await.unwrap(), vec![Some(0)]);
    let future = stamps.last().unwrap().timestamp_ms + 1;
    assert_eq!(log.offsets_for_timestamp(TOPIC, future).await.unwrap(), vec![None]);
}

#[tokio::test]
async fn idempotency_keys_deduplicate_and_detect_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.ensure_topic(TOPIC, 2).await.unwrap();
    let keyed = |fp: u8| AppendRequest {
        idempotency: Some(IdempotencyKey { key: "retry-1".into(), fingerprint: [fp; 32] }),
        ..request("k", "v")
    };
    let first = log.append(keyed(1)).await.unwrap();
    let again = log.append(keyed(1)).await.unwrap();
    assert!(again.replayed);
    assert_eq!((again.partition, again.offset), (first.partition, first.offset));
    assert!(matches!(log.append(keyed(2)).await, Err(LogError::IdempotencyConflict(_))));
    assert_eq!(log.end_offsets(TOPIC).await.unwrap().iter().sum::<u64>(), 1, "nothing appended twice");
}

/// Keys expire after the retention: a retry then appends afresh, and expired keys are purged
/// from the file, while a key taken again since its first append is kept.
#[tokio::test]
async fn idempotency_keys_expire_and_are_purged() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedLogOptions { idempotency_retention: Duration::from_secs(1), ..EmbeddedLogOptions::default() };
    let log = EmbeddedLog::open(&dir.path().join("log.redb"), options).unwrap();
    log.ensure_topic(TOPIC, 2).await.unwrap();
    let keyed = |key: &str| AppendRequest {
        idempotency: Some(IdempotencyKey { key: key.into(), fingerprint: [7; 32] }),
        ..request("k", "v")
    };
    for key in ["once", "twice", "other"] {
        assert!(!log.append(keyed(key)).await.unwrap().replayed);
    }
    assert_eq!(log.idempotency_keys().unwrap(), 3);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // Expired: a new append that takes the key again.
    assert!(!log.append(keyed("twice")).await.unwrap().replayed);
    // The purge runs between group commits once the retention has passed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while log.idempotency_keys().unwrap() != 1 {
        assert!(std::time::Instant::now() < deadline, "expired keys were never purged");
        log.append(request("k", "tick")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(log.append(keyed("twice")).await.unwrap().replayed, "the key taken again is kept");
}

#[tokio::test]
async fn a_long_poll_read_wakes_on_append() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(dir.path()));
    log.ensure_topic(TOPIC, 1).await.unwrap();
    let reader = {
        let log = log.clone();
        tokio::spawn(async move { log.read(TOPIC, 0, 0, 10, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    log.append(request("k", "wake")).await.unwrap();
    let records = tokio::time::timeout(Duration::from_secs(5), reader).await.unwrap().unwrap().unwrap();
    assert_eq!(records.len(), 1);
    let empty = log.read(TOPIC, 0, 1, 10, Duration::from_millis(20)).await.unwrap();
    assert!(empty.is_empty(), "times out empty");
}

/// Many concurrent appenders: no offset lost or given twice, and each key's events keep the
/// order in which their appender issued them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appenders_lose_nothing_and_keep_per_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(dir.path()));
    log.ensure_topic(TOPIC, 12).await.unwrap();
    const APPENDERS: usize = 32;
    const PER_APPENDER: usize = 50;
    let tasks: Vec<_> = (0..APPENDERS)
        .map(|a| {
            let log = log.clone();
            tokio::spawn(async move {
                let key = format!("person-{a}");
                let mut positions = Vec::new();
                for seq in 0..PER_APPENDER {
                    let at = log.append(request(&key, &format!("{a}:{seq}"))).await.unwrap();
                    positions.push(at);
                }
                (key, positions)
            })
        })
        .collect();
    let mut acked = HashSet::new();
    for task in tasks {
        let (key, positions) = task.await.unwrap();
        let p = partition_for(key.as_bytes(), 12);
        assert!(positions.iter().all(|at| at.partition == p));
        assert!(positions.windows(2).all(|w| w[0].offset < w[1].offset), "per-key order");
        for at in positions {
            assert!(acked.insert((at.partition, at.offset)), "offset handed out twice");
        }
    }
    assert_eq!(acked.len(), APPENDERS * PER_APPENDER);
    let ends = log.end_offsets(TOPIC).await.unwrap();
    assert_eq!(ends.iter().sum::<u64>() as usize, APPENDERS * PER_APPENDER, "nothing extra written");
    let mut seen_per_key: BTreeMap<String, usize> = BTreeMap::new();
    for (p, end) in ends.iter().enumerate() {
        let records = log.read(TOPIC, p as u32, 0, usize::MAX, Duration::ZERO).await.unwrap();
        assert_eq!(records.len() as u64, *end, "dense offsets in partition {p}");
        for record in records {
            let text = String::from_utf8(record.payload).unwrap();
            let (appender, seq) = text.split_once(':').unwrap();
            let expected = seen_per_key.entry(format!("person-{appender}")).or_default();
            assert_eq!(seq.parse::<usize>().unwrap(), *expected, "log order is issue order per key");
            *expected += 1;
        }
    }
}

/// Group commit: with many appenders waiting, commits carry more than one append each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(dir.path()));
    log.ensure_topic(TOPIC, 4).await.unwrap();
    let commits_before = log.commit_count();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.append(request(&format!("k{i}"), "x")).await.unwrap() })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let commits = log.commit_count() - commits_before;
    assert!(commits < 200, "200 concurrent appends took {commits} commits; group commit is not grouping");
}

#[tokio::test]
async fn deleting_records_removes_only_those_below_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.ensure_topic(TOPIC, 1).await.unwrap();
    for i in 0..6 {
        log.append(request("k", &format!("{i}"))).await.unwrap();
    }
    log.delete_records(TOPIC, 0, 4).await.unwrap();
    let left = log.read(TOPIC, 0, 0, 100, Duration::ZERO).await.unwrap();
    assert_eq!(left.iter().map(|r| r.offset).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(log.end_offsets(TOPIC).await.unwrap(), [6], "offsets are never reused");
    assert_eq!(log.append(request("k", "next")).await.unwrap().offset, 6);
}
