//! `callisto dlq`: the dead-letter topic (`<topic>.dlq`) for operators.
//!
//! - `list`: every dead letter with its projection, source position and error, and counts by
//!   (projection, error).
//! - `show <id>`: one dead letter: original bytes, headers, error, and the decoded payload when
//!   it decodes now.
//! - `replay <id>|--all`: re-drives dead letters through the projection that failed them, after
//!   a fix. The version guard makes this idempotent: a document already past the event's offset
//!   ignores it (the timeline still records it).
//! - `purge`: deletes every dead letter, after confirmation.
//!
//! A dead letter's id is its position in the dead-letter topic, `partition:offset`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use callisto_core::log::{EventLog, LogError, Record};
use callisto_core::privacy::EventReader;
use callisto_core::readmodel::{ProjectedEvent, Projection, timeline_entry};
use callisto_projectors::dlq as headers;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub id: String,
    pub projection: String,
    pub source: String,
    pub error: String,
    pub failed_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Count {
    pub projection: String,
    pub error: String,
    pub count: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Listing {
    pub entries: Vec<Entry>,
    pub counts: Vec<Count>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Detail {
    pub entry: Entry,
    /// Header values as text where they are UTF-8, else as hex.
    pub headers: Vec<(String, String)>,
    pub key: String,
    /// The original bytes; withheld for an erased person, whose events may predate sealing.
    pub payload_hex: Option<String>,
    /// The event as it decodes with today's schemas and opens with the keyring (personal
    /// fields absent and `erased: true` for an erased person), or why it does not.
    pub decoded: Option<serde_json::Value>,
    pub decode_error: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Redrive {
    pub redriven: Vec<String>,
    pub failed: Vec<(String, String)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Purge {
    pub deleted: u64,
}

fn text(bytes: Option<&[u8]>) -> String {
    bytes.map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn entry_of(record: &Record) -> Entry {
    Entry {
        id: format!("{}:{}", record.partition, record.offset),
        projection: text(record.header(headers::PROJECTION)),
        source: format!(
            "{}:{}:{}",
            text(record.header(headers::SOURCE_TOPIC)),
            text(record.header(headers::SOURCE_PARTITION)),
            text(record.header(headers::SOURCE_OFFSET))
        ),
        error: text(record.header(headers::ERROR)),
        failed_at: text(record.header(headers::FAILED_AT)),
    }
}

/// Every dead letter still in the topic, in partition then offset order.
async fn records(log: &dyn EventLog, dlq_topic: &str) -> Result<Vec<Record>, LogError> {
    let mut out = Vec::new();
    let ends = match log.end_offsets(dlq_topic).await {
        Ok(ends) => ends,
        Err(LogError::UnknownTopic(_)) => return Ok(out),
        Err(e) => return Err(e),
    };
    for (partition, end) in ends.into_iter().enumerate() {
        let mut next = 0;
        while next < end {
            let batch = log.read(dlq_topic, partition as u32, next, 1000, Duration::ZERO).await?;
            let Some(last) = batch.last() else { break };
            next = last.offset + 1;
            out.extend(batch);
        }
    }
    Ok(out)
}

pub async fn list(log: &dyn EventLog, dlq_topic: &str) -> Result<Listing, LogError> {
    let entries: Vec<Entry> = records(log, dlq_topic).await?.iter().map(entry_of).collect();
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for e in &entries {
        // Group by the error's first line: details such as byte positions differ per event.
        let kind = e.error.lines().next().unwrap_or_default().to_owned();
        *counts.entry((e.projection.clone(), kind)).or_default() += 1;
    }
    let counts = counts.into_iter().map(|((projection, error), count)| Count { projection, error, count }).collect();
    Ok(Listing { entries, counts })
}

/// Parses `partition:offset`.
pub fn parse_id(id: &str) -> Result<(u32, u64), String> {
    let token: callisto_core::token::ConsistencyToken =
        id.parse().map_err(|_| format!("{id:?} is not a dead-letter id like 3:17"))?;
    Ok((token.partition, token.offset))
}

async fn one(log: &dyn EventLog, dlq_topic: &str, id: &str) -> Result<Record, String> {
    let (partition, offset) = parse_id(id)?;
    let found = log.read(dlq_topic, partition, offset, 1, Duration::ZERO).await.map_err(|e| e.to_string())?;
    found.into_iter().find(|r| r.offset == offset).ok_or_else(|| format!("no dead letter {id}"))
}

pub async fn show(log: &dyn EventLog, reader: &EventReader, dlq_topic: &str, id: &str) -> Result<Detail, String> {
    let record = one(log, dlq_topic, id).await?;
    let (decoded, decode_error, erased) = match reader.read(&record.payload).await {
        Ok(opened) => {
            let source_partition = text(record.header(headers::SOURCE_PARTITION)).parse().unwrap_or(record.partition);
            let source_offset = text(record.header(headers::SOURCE_OFFSET)).parse().unwrap_or(record.offset);
            let projected = ProjectedEvent {
                partition: source_partition,
                offset: source_offset,
                ..ProjectedEvent::from_opened(&record, opened)
            };
            (serde_json::to_value(timeline_entry(&projected)).ok(), None, projected.erased)
        }
        Err(e) => (None, Some(e.to_string()), false),
    };
    Ok(Detail {
        entry: entry_of(&record),
        headers: record
            .headers
            .iter()
            .map(|(name, value)| {
                let shown =
                    std::str::from_utf8(value).map(str::to_owned).unwrap_or_else(|_| format!("0x{}", hex(value)));
                (name.clone(), shown)
            })
            .collect(),
        key: String::from_utf8_lossy(&record.key).into_owned(),
        payload_hex: (!erased).then(|| hex(&record.payload)),
        decoded,
        decode_error,
    })
}

/// Re-drives the given dead letters (all when `ids` is `None`) through their projections.
pub async fn redrive(
    log: &dyn EventLog,
    reader: &EventReader,
    dlq_topic: &str,
    projections: &HashMap<&'static str, Arc<dyn Projection>>,
    ids: Option<&[String]>,
) -> Result<Redrive, String> {
    let chosen: Vec<Record> = match ids {
        Some(ids) => {
            let mut out = Vec::new();
            for id in ids {
                out.push(one(log, dlq_topic, id).await?);
            }
            out
        }
        None => records(log, dlq_topic).await.map_err(|e| e.to_string())?,
    };
    let mut report = Redrive::default();
    for record in chosen {
        let entry = entry_of(&record);
        let outcome = async {
            let projection = projections
                .get(entry.projection.as_str())
                .ok_or_else(|| format!("unknown projection {:?}", entry.projection))?;
            let opened = reader.read(&record.payload).await.map_err(|e| format!("still does not read: {e}"))?;
            let partition =
                text(record.header(headers::SOURCE_PARTITION)).parse().map_err(|_| "no source partition".to_owned())?;
            let offset =
                text(record.header(headers::SOURCE_OFFSET)).parse().map_err(|_| "no source offset".to_owned())?;
            let projected = ProjectedEvent { partition, offset, ..ProjectedEvent::from_opened(&record, opened) };
            // Re-driving must not move the partition's checkpoint: the projector already went
            // past this event, and any other position would skip or repeat live events.
            let checkpoints = projection.checkpoints().await.map_err(|e| e.to_string())?;
            let through = checkpoints.get(&partition).copied().unwrap_or(offset);
            projection.apply(partition, &[projected], through).await.map_err(|e| e.to_string())
        }
        .await;
        match outcome {
            Ok(()) => report.redriven.push(entry.id),
            Err(e) => report.failed.push((entry.id, e)),
        }
    }
    Ok(report)
}

pub async fn purge(log: &dyn EventLog, dlq_topic: &str) -> Result<Purge, LogError> {
    let ends = match log.end_offsets(dlq_topic).await {
        Ok(ends) => ends,
        Err(LogError::UnknownTopic(_)) => return Ok(Purge { deleted: 0 }),
        Err(e) => return Err(e),
    };
    let deleted = records(log, dlq_topic).await?.len() as u64;
    for (partition, end) in ends.into_iter().enumerate() {
        log.delete_records(dlq_topic, partition as u32, end).await?;
    }
    Ok(Purge { deleted })
}
