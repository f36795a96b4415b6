//! `callisto export`: a topic's events over a partition set and an offset or time range, as
//! JSON Lines or as an Avro object container file, built on [`callisto_core::replay`].
//!
//! Output order is partition by partition, then offset (see [`callisto_core::replay`]).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use apache_avro::types::Value;
use callisto_avro::EventKind;
use callisto_core::config::Settings;
use callisto_core::readmodel::{ProjectedEvent, timeline_entry};
use callisto_core::replay::{Position, ReplayRequest, plan, stream};
use futures::StreamExt;
use serde::Serialize;

use crate::backends;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line: position, timestamp, key and the decoded event.
    Jsonl,
    /// An Avro object container file carrying its schema (`io.callisto.export.ExportedEvent`).
    Avro,
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub partitions: Option<Vec<u32>>,
    pub from: Option<Position>,
    pub to: Option<Position>,
    pub format: Format,
    /// `None` writes to standard output.
    pub output: Option<PathBuf>,
    pub progress: bool,
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
    pub spans: Vec<SpanSummary>,
}

#[derive(Debug, Serialize)]
pub struct SpanSummary {
    pub partition: u32,
    pub start: u64,
    pub end: u64,
}

pub async fn run(settings: &Settings, options: ExportOptions) -> anyhow::Result<ExportSummary> {
    let side = backends::open_log(settings)?;
    let topic = settings.log.topic.clone();
    let request = ReplayRequest {
        topic: topic.clone(),
        partitions: options.partitions.clone(),
        from: options.from,
        to: options.to,
    };
    let spans = plan(side.log.as_ref(), &request).await?;
    let total: u64 = spans.iter().map(|s| s.len()).sum();
    let bar = if options.progress {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} events [{bar:40}] {per_sec} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let sink: Box<dyn Write> = match &options.output {
        Some(path) => Box::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut sink = std::io::BufWriter::new(sink);
    let mut summary = ExportSummary {
        topic: topic.clone(),
        format: options.format,
        records: 0,
        undecodable: 0,
        spans: spans.iter().map(|s| SpanSummary { partition: s.partition, start: s.start, end: s.end }).collect(),
    };
    let codec = side.codec.clone();
    let mut records = std::pin::pin!(stream(side.log.clone(), codec.clone(), topic.clone(), spans));
    match options.format {
        Format::Jsonl => {
            let mut line_buffer = Vec::new();
            drain(&mut records, &bar, &mut summary, |replayed| {
                line_buffer.clear();
                serde_json::to_writer(&mut line_buffer, &jsonl_line(&replayed.record, &replayed.event))?;
                line_buffer.push(b'\n');
                sink.write_all(&line_buffer)?;
                Ok(())
            })
            .await?;
        }
        Format::Avro => {
            let mut writer = apache_avro::Writer::new(callisto_avro::schemas::export_schema(), &mut sink);
            drain(&mut records, &bar, &mut summary, |replayed| {
                let record = &replayed.record;
                let Ok((kind, value)) = codec.decode_value(&record.payload) else { return Ok(()) };
                let branch = EventKind::ALL.iter().position(|k| *k == kind).expect("every kind is in ALL") as u32;
                let row = Value::Record(vec![
                    ("topic".into(), Value::String(record.topic.clone())),
                    ("partition".into(), Value::Int(record.partition as i32)),
                    ("offset".into(), Value::Long(record.offset as i64)),
                    ("timestamp".into(), Value::TimestampMillis(record.timestamp_ms)),
                    ("key".into(), Value::String(String::from_utf8_lossy(&record.key).into_owned())),
                    ("event".into(), Value::Union(branch, Box::new(value))),
                ]);
                writer.append(row).context("writing an Avro record")?;
                Ok(())
            })
            .await?;
            writer.into_inner().context("finishing the Avro file")?;
        }
    }
    sink.flush()?;
    bar.finish_and_clear();
    Ok(summary)
}

/// Feeds every replayed record to `emit`, counting and ticking the progress bar.
async fn drain(
    records: &mut (
             impl futures::Stream<Item = Result<callisto_core::replay::Replayed, callisto_core::log::LogError>> + Unpin
         ),
    bar: &indicatif::ProgressBar,
    summary: &mut ExportSummary,
    mut emit: impl FnMut(&callisto_core::replay::Replayed) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    while let Some(replayed) = records.next().await {
        let replayed = replayed?;
        bar.inc(1);
        summary.records += 1;
        if replayed.event.is_err() {
            summary.undecodable += 1;
        }
        emit(&replayed)?;
    }
    Ok(())
}

fn jsonl_line(
    record: &callisto_core::log::Record,
    event: &Result<callisto_avro::PersonEvent, String>,
) -> serde_json::Value {
    let timestamp = chrono::DateTime::from_timestamp_millis(record.timestamp_ms).map(|t| t.to_rfc3339());
    let mut line = serde_json::json!({
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": timestamp,
        "key": String::from_utf8_lossy(&record.key),
    });
    match event {
        Ok(event) => {
            let projected = ProjectedEvent {
                partition: record.partition,
                offset: record.offset,
                timestamp_ms: record.timestamp_ms,
                event: event.clone(),
            };
            line["event"] = serde_json::to_value(timeline_entry(&projected)).unwrap_or_default();
        }
        Err(error) => line["error"] = serde_json::Value::String(error.clone()),
    }
    line
}
