//! `callisto export`: a topic's events over a partition set and an offset or time range, as
//! JSON Lines or as an Avro object container file, built on [`callisto_core::replay`].
//!
//! Output order is partition by partition, then offset (see [`callisto_core::replay`]).
//! The bytes are produced in chunks, so the same code writes a file directly or streams an
//! HTTP body from a running `callisto dev` (`GET /admin/v1/export`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use apache_avro::types::Value;
use callisto_avro::events::SealedPersonalData;
use callisto_avro::{Codec, EventKind, PersonEvent};
use callisto_core::config::Settings;
use callisto_core::log::{EventLog, LogError};
use callisto_core::privacy::EventReader;
use callisto_core::readmodel::{ProjectedEvent, timeline_entry};
use callisto_core::replay::{Position, ReplayRequest, Replayed, plan, stream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::backends;

/// Bytes handed to the sink at a time.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line: position, timestamp, key and the decoded event.
    Jsonl,
    /// An Avro object container file carrying its schema (`io.callisto.export.ExportedEvent`).
    Avro,
}

/// How personal fields leave in an export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PersonalData {
    /// Opened with the person's key: readable by whoever holds the file.
    #[default]
    Clear,
    /// Left sealed as in the log: the file holds ciphertext, so erasing a person later makes
    /// their data in this file unreadable too. Readers decrypt with key store access.
    Sealed,
}

/// What to export.
#[derive(Debug, Clone)]
pub struct Selection {
    pub partitions: Option<Vec<u32>>,
    pub from: Option<Position>,
    pub to: Option<Position>,
    pub format: Format,
    pub personal_data: PersonalData,
}

/// What an export wrote; printed at the end (as JSON with `--quiet`).
#[derive(Debug, Serialize)]
pub struct ExportSummary {
    pub topic: String,
    pub format: Format,
    pub records: u64,
    /// Records whose payload did not decode: in JSON Lines they carry an `error` field, in Avro
    /// they are left out (the container's schema has no place for them).
    pub undecodable: u64,
    pub bytes: u64,
}

/// Where export output goes, a chunk at a time.
pub trait ChunkSink {
    fn send(&mut self, chunk: Vec<u8>) -> futures::future::BoxFuture<'_, anyhow::Result<()>>;
}

/// A file or standard output.
pub struct WriteSink(pub Box<dyn Write + Send>);

impl ChunkSink for WriteSink {
    fn send(&mut self, chunk: Vec<u8>) -> futures::future::BoxFuture<'_, anyhow::Result<()>> {
        let written = self.0.write_all(&chunk).map_err(anyhow::Error::from);
        Box::pin(async move { written })
    }
}

/// Exports the selection of `topic`, handing the output to `sink` in chunks; `on_planned` gets
/// the number of records the export will read, `on_record` ticks once per record.
pub async fn export(
    log: Arc<dyn EventLog>,
    reader: Arc<EventReader>,
    topic: &str,
    selection: &Selection,
    on_planned: impl FnOnce(u64),
    mut on_record: impl FnMut(),
    sink: &mut (dyn ChunkSink + Send),
) -> anyhow::Result<ExportSummary> {
    let request = ReplayRequest {
        topic: topic.to_owned(),
        partitions: selection.partitions.clone(),
        from: selection.from,
        to: selection.to,
    };
    let spans = plan(log.as_ref(), &request).await?;
    on_planned(spans.iter().map(|s| s.len()).sum());
    let mut summary =
        ExportSummary { topic: topic.to_owned(), format: selection.format, records: 0, undecodable: 0, bytes: 0 };
    let mut records = std::pin::pin!(stream(log, reader, topic.to_owned(), spans));
    match selection.format {
        Format::Jsonl => {
            let mut buffer = Vec::with_capacity(CHUNK + 1024);
            while let Some(replayed) = next(&mut records, &mut summary).await? {
                on_record();
                serde_json::to_writer(&mut buffer, &jsonl_line(&replayed, selection.personal_data))?;
                buffer.push(b'\n');
                if buffer.len() >= CHUNK {
                    summary.bytes += buffer.len() as u64;
                    sink.send(std::mem::take(&mut buffer)).await?;
                }
            }
            summary.bytes += buffer.len() as u64;
            sink.send(buffer).await?;
        }
        Format::Avro => {
            let mut writer = apache_avro::Writer::new(callisto_avro::schemas::export_schema(), Vec::new());
            while let Some(replayed) = next(&mut records, &mut summary).await? {
                on_record();
                if let Some(row) = avro_row(&replayed, selection.personal_data) {
                    writer.append(row).context("writing an Avro record")?;
                }
                if writer.get_ref().len() >= CHUNK {
                    let chunk = std::mem::take(writer.get_mut());
                    summary.bytes += chunk.len() as u64;
                    sink.send(chunk).await?;
                }
            }
            let rest = writer.into_inner().context("finishing the Avro file")?;
            summary.bytes += rest.len() as u64;
            sink.send(rest).await?;
        }
    }
    Ok(summary)
}

/// The next record, counted in the summary.
async fn next(
    records: &mut (impl futures::Stream<Item = Result<Replayed, LogError>> + Unpin),
    summary: &mut ExportSummary,
) -> anyhow::Result<Option<Replayed>> {
    let Some(replayed) = records.next().await else { return Ok(None) };
    let replayed = replayed?;
    summary.records += 1;
    if replayed.event.is_err() {
        summary.undecodable += 1;
    }
    Ok(Some(replayed))
}

/// `callisto export` on a stopped data dir: to a file, or standard output when `output` is
/// `None`, with a progress bar on stderr when `progress`.
pub async fn run_direct(
    settings: &Settings,
    selection: &Selection,
    output: Option<PathBuf>,
    progress: bool,
) -> anyhow::Result<ExportSummary> {
    let side = backends::open_log(settings).await?;
    let bar = crate::replay::progress_bar(progress);
    let file: Box<dyn Write + Send> = match &output {
        Some(path) => Box::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?),
        None => Box::new(std::io::stdout()),
    };
    let mut sink = WriteSink(Box::new(std::io::BufWriter::new(file)));
    let summary = export(
        side.log.clone(),
        side.reader(),
        &settings.log.topic,
        selection,
        |total| bar.set_length(total),
        || bar.inc(1),
        &mut sink,
    )
    .await?;
    sink.0.flush()?;
    bar.finish_and_clear();
    Ok(summary)
}

/// An event as the export writes it: whether the person is erased, and the event opened, or
/// (with [`PersonalData::Sealed`]) as written in the log, blank with its `sealed` field. An
/// erased person's events are blank either way.
struct Exported {
    event: PersonEvent,
    sealed: Option<SealedPersonalData>,
    erased: bool,
}

fn exported(replayed: &Replayed, personal_data: PersonalData) -> Option<Exported> {
    let opened = replayed.event.as_ref().ok()?;
    let mut event = opened.event.clone();
    if personal_data == PersonalData::Clear || opened.erased {
        return Some(Exported { event, sealed: None, erased: opened.erased });
    }
    event.take_personal();
    Some(Exported { event, sealed: opened.sealed.clone(), erased: false })
}

/// The Avro row of one record, or `None` when its payload does not read. Personal fields are
/// in clear (or sealed, as asked), or blank with `erased: true` for an erased person.
fn avro_row(replayed: &Replayed, personal_data: PersonalData) -> Option<Value> {
    let record = &replayed.record;
    let Exported { event, sealed, erased } = exported(replayed, personal_data)?;
    let value = Codec::to_value(&event, sealed.as_ref()).ok()?;
    let kind = event.kind();
    let branch = EventKind::ALL.iter().position(|k| *k == kind)? as u32;
    Some(Value::Record(vec![
        ("topic".into(), Value::String(record.topic.clone())),
        ("partition".into(), Value::Int(record.partition as i32)),
        ("offset".into(), Value::Long(record.offset as i64)),
        ("timestamp".into(), Value::TimestampMillis(record.timestamp_ms)),
        ("key".into(), Value::String(String::from_utf8_lossy(&record.key).into_owned())),
        ("event".into(), Value::Union(branch, Box::new(value))),
        ("erased".into(), Value::Boolean(erased)),
    ]))
}

fn jsonl_line(replayed: &Replayed, personal_data: PersonalData) -> serde_json::Value {
    let (record, event) = (&replayed.record, &replayed.event);
    let timestamp = chrono::DateTime::from_timestamp_millis(record.timestamp_ms).map(|t| t.to_rfc3339());
    let mut line = serde_json::json!({
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": timestamp,
        "key": String::from_utf8_lossy(&record.key),
    });
    if let Err(error) = event {
        line["error"] = serde_json::Value::String(error.clone());
        return line;
    }
    let Some(Exported { event, sealed, erased }) = exported(replayed, personal_data) else { return line };
    let projected = ProjectedEvent { erased, ..ProjectedEvent::from_record(record, event) };
    line["event"] = serde_json::to_value(timeline_entry(&projected)).unwrap_or_default();
    if erased {
        line["erased"] = serde_json::Value::Bool(true);
    }
    if let Some(sealed) = sealed {
        use base64::Engine as _;
        let base64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        line["sealed"] = serde_json::json!({
            "key_id": sealed.key_id,
            "algorithm": sealed.algorithm,
            "nonce": base64(&sealed.nonce),
            "ciphertext": base64(&sealed.ciphertext),
        });
    }
    line
}
