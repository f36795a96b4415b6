//! Replay: a stream of decoded events from a position in the log, for batch jobs written in Rust.
//! `callisto export` is built on it. Events come opened by the keyring: personal fields in
//! clear, or blank and marked erased for an erased person.
//!
//! ```no_run
//! # async fn job(log: std::sync::Arc<dyn callisto_core::log::EventLog>, reader: std::sync::Arc<callisto_core::privacy::EventReader>) -> anyhow::Result<()> {
//! use callisto_core::replay::{Position, ReplayRequest, plan, stream};
//! use futures::StreamExt;
//! let request = ReplayRequest { topic: "persons".into(), partitions: None, from: Some(Position::Offset(0)), to: None };
//! let spans = plan(log.as_ref(), &request).await?;
//! let mut events = std::pin::pin!(stream(log, reader, "persons".into(), spans));
//! while let Some(replayed) = events.next().await {
//!     let replayed = replayed?;
//!     println!("{}:{} {:?}", replayed.record.partition, replayed.record.offset, replayed.event.map(|e| e.event.kind()));
//! }
//! # Ok(()) }
//! ```
//!
//! **Order:** partition by partition in ascending partition number, and within a partition by
//! offset. That is the log's own order for each person (a person's events share a partition);
//! there is no order across partitions to keep.
//!
//! **Range:** `from` is inclusive and `to` exclusive. A timestamp resolves per partition to the
//! first offset at or after it (Kafka's `offsetsForTimes`), so `from`/`to` as times select the
//! records whose log timestamp is in `[from, to)`. The end is also capped at the log head as of
//! [`plan`], so a replay of a live topic ends.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::privacy::{EventReader, Opened};
use chrono::{DateTime, Utc};
use futures::Stream;

use crate::log::{EventLog, LogError, Record};

/// A position in every partition: the same offset, or the first record at or after a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Offset(u64),
    Timestamp(DateTime<Utc>),
}

impl std::str::FromStr for Position {
    type Err = String;

    /// Digits are an offset; anything else must be an RFC 3339 time.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse().map(Position::Offset).map_err(|e| format!("{s:?}: {e}"));
        }
        DateTime::parse_from_rfc3339(s)
            .map(|t| Position::Timestamp(t.with_timezone(&Utc)))
            .map_err(|_| format!("{s:?} is neither an offset nor an RFC 3339 time such as 2026-11-23T08:00:00Z"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRequest {
    pub topic: String,
    /// `None` means every partition.
    pub partitions: Option<Vec<u32>>,
    /// Inclusive; `None` is the start of each partition.
    pub from: Option<Position>,
    /// Exclusive; `None` is the log head as of planning.
    pub to: Option<Position>,
}

/// The offsets `[start, end)` of one partition that a replay covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSpan {
    pub partition: u32,
    pub start: u64,
    pub end: u64,
}

impl PartitionSpan {
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("partition {partition} does not exist: topic {topic:?} has {partitions}")]
    NoSuchPartition { topic: String, partition: u32, partitions: u32 },
}

/// One replayed record: the record as stored, and its decoded event (or why it did not decode).
#[derive(Debug, Clone)]
pub struct Replayed {
    pub record: Record,
    /// The event opened by the keyring (personal fields blank and `erased` for an erased
    /// person), or why it does not read.
    pub event: Result<Opened, String>,
}

/// Resolves a request to offset spans, one per selected partition, in partition order.
pub async fn plan(log: &dyn EventLog, request: &ReplayRequest) -> Result<Vec<PartitionSpan>, ReplayError> {
    let count = log.partitions(&request.topic).await?;
    let partitions: Vec<u32> = match &request.partitions {
        None => (0..count).collect(),
        Some(list) => {
            if let Some(&bad) = list.iter().find(|p| **p >= count) {
                return Err(ReplayError::NoSuchPartition {
                    topic: request.topic.clone(),
                    partition: bad,
                    partitions: count,
                });
            }
            let mut list = list.clone();
            list.sort_unstable();
            list.dedup();
            list
        }
    };
    let ends = log.end_offsets(&request.topic).await?;
    let starts = resolve(log, &request.topic, request.from, &vec![0; ends.len()], &ends).await?;
    let stops = resolve(log, &request.topic, request.to, &ends, &ends).await?;
    Ok(partitions
        .into_iter()
        .map(|p| {
            let i = p as usize;
            let end = stops[i].min(ends[i]);
            PartitionSpan { partition: p, start: starts[i].min(end), end }
        })
        .collect())
}

/// Per partition, the offset `position` names; `default` when there is none.
async fn resolve(
    log: &dyn EventLog,
    topic: &str,
    position: Option<Position>,
    default: &[u64],
    ends: &[u64],
) -> Result<Vec<u64>, LogError> {
    match position {
        None => Ok(default.to_vec()),
        Some(Position::Offset(o)) => Ok(vec![o; default.len()]),
        Some(Position::Timestamp(t)) => {
            let found = log.offsets_for_timestamp(topic, t.timestamp_millis()).await?;
            Ok(found.iter().zip(ends).map(|(f, end)| f.unwrap_or(*end)).collect())
        }
    }
}

/// Records per read.
const BATCH: usize = 1000;

/// Streams the spans' records, decoded, in the documented order. Reads a batch at a time, so
/// memory stays flat however long the replay.
pub fn stream(
    log: Arc<dyn EventLog>,
    reader: Arc<EventReader>,
    topic: String,
    spans: Vec<PartitionSpan>,
) -> impl Stream<Item = Result<Replayed, LogError>> {
    struct State {
        log: Arc<dyn EventLog>,
        reader: Arc<EventReader>,
        topic: String,
        spans: VecDeque<PartitionSpan>,
        buffered: VecDeque<Record>,
    }
    let state = State {
        log,
        reader,
        topic,
        spans: spans.into_iter().filter(|s| !s.is_empty()).collect(),
        buffered: VecDeque::new(),
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(record) = state.buffered.pop_front() {
                let event = match state.reader.read(&record.payload).await {
                    Ok(opened) => Ok(opened),
                    // A key store outage is not a property of the record: the replay stops
                    // rather than hand out records it could not open.
                    Err(e) if e.is_outage() => {
                        state.spans.clear();
                        state.buffered.clear();
                        return Some((Err(LogError::Unavailable(e.to_string())), state));
                    }
                    Err(e) => Err(e.to_string()),
                };
                return Some((Ok(Replayed { record, event }), state));
            }
            let span = state.spans.front_mut()?;
            if span.start >= span.end {
                state.spans.pop_front();
                continue;
            }
            let want = BATCH.min(span.len() as usize);
            match state.log.read(&state.topic, span.partition, span.start, want, Duration::ZERO).await {
                Ok(records) if records.is_empty() => {
                    // The span ends below the head, so an empty read means the records are gone.
                    state.spans.pop_front();
                }
                Ok(records) => {
                    let end = span.end;
                    span.start = records.last().map_or(end, |r| r.offset + 1);
                    // The batch's data keys in one key store call, not one per person as each
                    // record is opened (see `EventReader::prefetch_keys`).
                    state.reader.prefetch_keys(&records).await;
                    state.buffered.extend(records.into_iter().filter(|r| r.offset < end));
                }
                Err(e) => {
                    state.spans.clear();
                    return Some((Err(e), state));
                }
            }
        }
    })
}
