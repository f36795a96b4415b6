//! The log's tail: records committed to the journal and not yet flushed into redb.
//!
//! Reads at the end of a partition, which is where live readers are, are served from here
//! without a redb transaction; the flusher drops records once redb holds them. A partition's
//! records here are contiguous from its `flushed_end`: below it every record is in redb, and
//! was before `flushed_end` moved, so a reader that finds its offset below `flushed_end` may
//! read redb for it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::journal::JournaledAppend;
use crate::log::Record;

/// An idempotency key an unflushed append took.
#[derive(Debug, Clone, Copy)]
pub(super) struct TakenKey {
    pub partition: u32,
    pub offset: u64,
    pub fingerprint: [u8; 32],
    pub timestamp_ms: i64,
}

/// Where the records from an offset on are.
pub(super) enum Located {
    /// All of them, up to the limit asked for, are in memory: these (none past the end).
    InMemory(Vec<Record>),
    /// Those below this offset are in redb.
    FlushedBelow(u64),
    /// Nothing was appended to the partition since the log was opened: all are in redb.
    Untracked,
}

#[derive(Default)]
pub(super) struct Tail {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    partitions: HashMap<String, HashMap<u32, PartitionTail>>,
    keys: HashMap<(String, String), TakenKey>,
    records: usize,
}

struct PartitionTail {
    flushed_end: u64,
    records: VecDeque<Record>,
}

impl PartitionTail {
    fn end(&self) -> u64 {
        self.flushed_end + self.records.len() as u64
    }
}

impl Tail {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state whole before it can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> Located {
        let state = self.lock();
        let Some(tail) = state.partitions.get(topic).and_then(|p| p.get(&partition)) else {
            return Located::Untracked;
        };
        if from < tail.flushed_end {
            return Located::FlushedBelow(tail.flushed_end);
        }
        let skip = usize::try_from(from - tail.flushed_end).unwrap_or(usize::MAX);
        Located::InMemory(tail.records.iter().skip(skip).take(max).cloned().collect())
    }

    /// The offset after the partition's last record, when anything was appended to it since
    /// the log was opened.
    pub fn end(&self, topic: &str, partition: u32) -> Option<u64> {
        self.lock().partitions.get(topic).and_then(|p| p.get(&partition)).map(PartitionTail::end)
    }

    /// The first unflushed record of the partition stamped at or after `timestamp_ms`.
    pub fn first_at_or_after(&self, topic: &str, partition: u32, timestamp_ms: i64) -> Option<u64> {
        let state = self.lock();
        let tail = state.partitions.get(topic)?.get(&partition)?;
        tail.records.iter().find(|r| r.timestamp_ms >= timestamp_ms).map(|r| r.offset)
    }

    /// Where an unflushed append took `key`.
    pub fn key(&self, topic: &str, key: &str) -> Option<TakenKey> {
        self.lock().keys.get(&(topic.to_owned(), key.to_owned())).copied()
    }

    /// The keys unflushed appends took, as (topic, key).
    pub fn keys(&self) -> Vec<(String, String)> {
        self.lock().keys.keys().cloned().collect()
    }

    /// Records held in memory, over every partition.
    pub fn len(&self) -> usize {
        self.lock().records
    }

    /// A group commit's appends, in offset order per partition, each with the key it took.
    pub fn appended(&self, appends: impl IntoIterator<Item = (Record, Option<(String, TakenKey)>)>) {
        let mut state = self.lock();
        for (record, key) in appends {
            if let Some((key, taken)) = key {
                state.keys.insert((record.topic.clone(), key), taken);
            }
            let partitions = match state.partitions.get_mut(&record.topic) {
                Some(partitions) => partitions,
                None => state.partitions.entry(record.topic.clone()).or_default(),
            };
            // The first append since open: every record before it is in redb.
            let tail = partitions
                .entry(record.partition)
                .or_insert_with(|| PartitionTail { flushed_end: record.offset, records: VecDeque::new() });
            debug_assert_eq!(tail.end(), record.offset, "appends arrive in offset order");
            tail.records.push_back(record);
            state.records += 1;
        }
    }

    /// redb now holds `appends`: drop them, and the keys they took unless taken again since.
    pub fn flushed(&self, appends: &[JournaledAppend<'_>]) {
        let mut state = self.lock();
        let mut dropped = 0;
        for append in appends {
            if let Some(tail) =
                state.partitions.get_mut(append.topic.as_ref()).and_then(|p| p.get_mut(&append.partition))
                && append.offset >= tail.flushed_end
            {
                while tail.records.front().is_some_and(|r| r.offset <= append.offset) {
                    tail.records.pop_front();
                    dropped += 1;
                }
                tail.flushed_end = append.offset + 1;
            }
            if let Some((key, _)) = &append.idempotency {
                let id = (append.topic.clone().into_owned(), key.clone().into_owned());
                if state.keys.get(&id).is_some_and(|k| (k.partition, k.offset) == (append.partition, append.offset)) {
                    state.keys.remove(&id);
                }
            }
        }
        state.records -= dropped;
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn record(partition: u32, offset: u64, timestamp_ms: i64) -> Record {
        Record {
            topic: "persons".into(),
            partition,
            offset,
            timestamp_ms,
            key: b"k".to_vec(),
            headers: Vec::new(),
            payload: offset.to_le_bytes().to_vec(),
        }
    }

    fn journaled(partition: u32, offset: u64, key: Option<&str>) -> JournaledAppend<'static> {
        JournaledAppend {
            topic: "persons".into(),
            partition,
            offset,
            timestamp_ms: 0,
            record: Cow::Owned(Vec::new()),
            idempotency: key.map(|k| (Cow::Owned(k.to_owned()), [0; 32])),
        }
    }

    #[test]
    fn reads_below_what_memory_holds_are_sent_to_redb_and_flushing_moves_that_line() {
        let tail = Tail::default();
        assert!(matches!(tail.read("persons", 0, 0, 10), Located::Untracked));
        let key = TakenKey { partition: 0, offset: 5, fingerprint: [1; 32], timestamp_ms: 10 };
        tail.appended((5..9).map(|o| (record(0, o, 10 * o as i64), (o == 5).then(|| ("retry".to_owned(), key)))));
        assert_eq!(tail.len(), 4);
        assert_eq!(tail.end("persons", 0), Some(9));
        assert_eq!(tail.end("persons", 1), None);
        assert!(matches!(tail.read("persons", 0, 4, 10), Located::FlushedBelow(5)));
        let Located::InMemory(records) = tail.read("persons", 0, 6, 2) else { panic!("in memory") };
        assert_eq!(records.iter().map(|r| r.offset).collect::<Vec<_>>(), [6, 7]);
        let Located::InMemory(past_end) = tail.read("persons", 0, 9, 10) else { panic!("in memory") };
        assert!(past_end.is_empty());
        assert_eq!(tail.first_at_or_after("persons", 0, 65), Some(7));
        assert_eq!(tail.key("persons", "retry").map(|k| k.offset), Some(5));

        tail.flushed(&[journaled(0, 5, Some("retry")), journaled(0, 6, None)]);
        assert_eq!(tail.len(), 2);
        assert!(matches!(tail.read("persons", 0, 6, 10), Located::FlushedBelow(7)));
        let Located::InMemory(records) = tail.read("persons", 0, 7, 10) else { panic!("in memory") };
        assert_eq!(records.iter().map(|r| r.offset).collect::<Vec<_>>(), [7, 8]);
        assert!(tail.key("persons", "retry").is_none(), "a flushed key is redb's to answer");
        assert_eq!(tail.end("persons", 0), Some(9));
    }

    #[test]
    fn a_key_taken_again_before_its_first_append_is_flushed_stays() {
        let tail = Tail::default();
        let first = TakenKey { partition: 0, offset: 0, fingerprint: [1; 32], timestamp_ms: 1 };
        let again = TakenKey { partition: 0, offset: 1, fingerprint: [2; 32], timestamp_ms: 2 };
        tail.appended([
            (record(0, 0, 1), Some(("k".to_owned(), first))),
            (record(0, 1, 2), Some(("k".to_owned(), again))),
        ]);
        tail.flushed(&[journaled(0, 0, Some("k"))]);
        assert_eq!(tail.key("persons", "k").map(|k| k.offset), Some(1));
    }
}
