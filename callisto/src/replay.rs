//! `callisto replay`: rebuild the read models into a new generation from offset 0 (or from a
//! point in time) while the live generation keeps serving, then switch readers to it.
//!
//! - A rebuild writes only to its own generation; the live one is never touched.
//! - Its progress is its own checkpoints, so an interrupted rebuild resumes where it stopped
//!   when run again (the pointer file remembers the generation being built).
//! - The switch is one atomic pointer replacement (and, in a running `callisto dev`, one swap
//!   of the readers' switch). The old generation is kept, and kept current, until
//!   `--drop-old`; `--rollback` switches back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use callisto_core::config::Settings;
use callisto_core::log::EventLog;
use callisto_core::privacy::EventReader;
use callisto_core::readmodel::{Projection, ReadStore, SearchIndex};
use callisto_core::replay::Position;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backends::{self, ReadModelUse};
use crate::generations::Generations;

/// One generation's read models with the projector that keeps them current.
pub struct GenerationRuntime {
    pub generation: u32,
    pub store: Arc<dyn ReadStore>,
    pub search: Arc<dyn SearchIndex>,
    shutdown: CancellationToken,
    projector: tokio::task::JoinHandle<()>,
}

impl GenerationRuntime {
    pub async fn start(
        settings: &Settings,
        log: Arc<dyn EventLog>,
        reader: Arc<EventReader>,
        generation: u32,
        start_offsets: Option<Vec<u64>>,
    ) -> anyhow::Result<Self> {
        let side = backends::open_generation(settings, generation, ReadModelUse::Projecting).await?;
        let shutdown = CancellationToken::new();
        let projections: Vec<Arc<dyn Projection>> = vec![side.store.clone(), side.search.clone()];
        let mut projector_settings = callisto_projectors::ProjectorSettings::new(&settings.log.topic);
        projector_settings.start_offsets = start_offsets;
        projector_settings.group = format!("callisto-projectors.g{generation}");
        let projector = callisto_projectors::Projector::new(log, reader, projections, projector_settings)
            .start(shutdown.clone())
            .await?;
        Ok(Self { generation, store: side.store, search: side.search, shutdown, projector })
    }

    /// Events applied by both projections, summed over partitions.
    pub fn applied(&self) -> u64 {
        let applied = |p: &dyn Projection| -> u64 { p.progress().borrow().values().map(|o| o + 1).sum() };
        applied(self.store.as_ref()).min(applied(self.search.as_ref()))
    }

    /// Stops the projector after its current batch and closes the stores.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.projector.await;
    }
}

/// Where each partition starts when rebuilding from `from`.
pub async fn start_offsets(
    log: &dyn EventLog,
    topic: &str,
    from: Option<Position>,
) -> anyhow::Result<Option<Vec<u64>>> {
    Ok(match from {
        None | Some(Position::Offset(0)) => None,
        Some(Position::Offset(o)) => Some(vec![o; log.partitions(topic).await? as usize]),
        Some(Position::Timestamp(t)) => {
            let ends = log.end_offsets(topic).await?;
            let found = log.offsets_for_timestamp(topic, t.timestamp_millis()).await?;
            Some(found.iter().zip(&ends).map(|(f, end)| f.unwrap_or(*end)).collect())
        }
    })
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Progress {
    pub generation: u32,
    /// Events the new generation has applied since its start position.
    pub done: u64,
    /// Events between the start position and the log head now.
    pub total: u64,
    pub lag: u64,
    pub events_per_second: f64,
}

pub async fn progress(
    log: &dyn EventLog,
    topic: &str,
    runtime: &GenerationRuntime,
    starts: &Option<Vec<u64>>,
    since: Instant,
    done_at_start: u64,
) -> anyhow::Result<Progress> {
    let ends: u64 = log.end_offsets(topic).await?.iter().sum();
    let start: u64 = starts.as_ref().map_or(0, |s| s.iter().sum());
    let done = runtime.applied().saturating_sub(start);
    let total = ends.saturating_sub(start);
    let rate = (done.saturating_sub(done_at_start)) as f64 / since.elapsed().as_secs_f64().max(0.001);
    Ok(Progress {
        generation: runtime.generation,
        done,
        total,
        lag: total.saturating_sub(done),
        events_per_second: rate,
    })
}

/// The projections of the generation readers use now: (documents, search).
pub type Reference = (Arc<dyn Projection>, Arc<dyn Projection>);

impl GenerationRuntime {
    pub fn as_reference(&self) -> Reference {
        (self.store.clone(), self.search.clone())
    }
}

/// Whether `runtime` has applied, in every partition and in both projections, at least as much
/// as `reference`.
fn level_with(runtime: &GenerationRuntime, reference: &Reference) -> bool {
    let ahead = |new: &dyn Projection, old: &dyn Projection| {
        let (new, old) = (new.progress().borrow().clone(), old.progress().borrow().clone());
        old.iter().all(|(p, offset)| new.get(p).is_some_and(|n| n >= offset))
    };
    ahead(runtime.store.as_ref(), reference.0.as_ref()) && ahead(runtime.search.as_ref(), reference.1.as_ref())
}

/// Waits until `runtime` has caught up, reporting progress as it goes. With a `reference` (a
/// live generation kept current by its own projector while writes continue) "caught up" means
/// level with it in every partition, so switching readers never shows them an older state;
/// without one (a stopped data dir) it means at the log head.
pub async fn catch_up(
    log: &dyn EventLog,
    topic: &str,
    runtime: &GenerationRuntime,
    reference: Option<&Reference>,
    starts: &Option<Vec<u64>>,
    mut report: impl FnMut(&Progress),
) -> anyhow::Result<Progress> {
    let since = Instant::now();
    let done_at_start = progress(log, topic, runtime, starts, since, 0).await?.done;
    loop {
        let now = progress(log, topic, runtime, starts, since, done_at_start).await?;
        report(&now);
        let caught_up = match reference {
            Some(reference) => level_with(runtime, reference),
            None => now.lag == 0,
        };
        if caught_up {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Rebuild { from: Option<Position> },
    Rollback,
    DropOld,
}

/// What a replay command did; printed at the end (as JSON with `--quiet`).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Summary {
    pub action: String,
    pub live: u32,
    pub previous: Option<u32>,
    pub events: Option<u64>,
    pub seconds: Option<f64>,
    pub events_per_second: Option<f64>,
}

pub fn summary(action: &str, generations: &Generations) -> Summary {
    Summary {
        action: action.to_owned(),
        live: generations.live,
        previous: generations.previous,
        events: None,
        seconds: None,
        events_per_second: None,
    }
}

/// Runs a replay action directly: on a stopped data dir, or on MongoDB and Elasticsearch while
/// their projectors and query APIs keep running (they follow the switch).
pub async fn run_direct(settings: &Settings, action: Action, show_progress: bool) -> anyhow::Result<Summary> {
    let pointer = backends::generation_pointer(settings).await?;
    let mut gens = pointer.load().await.context("reading the generations")?;
    // Writing back what the record says brings every other pointer (Elasticsearch's alias
    // behind MongoDB's document) level with it, should a switch have stopped halfway.
    pointer.save(&gens).await.context("recording the generations")?;
    match action {
        Action::Rollback => {
            let previous = gens.previous.context("there is no previous generation to roll back to")?;
            gens.previous = Some(gens.live);
            gens.live = previous;
            pointer.save(&gens).await.context("switching back")?;
            Ok(summary("rollback", &gens))
        }
        Action::DropOld => {
            let previous = gens.previous.take().context("there is no previous generation to drop")?;
            pointer.save(&gens).await.context("recording the generations")?;
            backends::remove_generation(settings, previous).await?;
            Ok(summary("drop-old", &gens))
        }
        Action::Rebuild { from } => {
            if let Some(previous) = gens.previous {
                anyhow::bail!(
                    "generation {previous} is kept for rollback; run `callisto replay --drop-old` before another rebuild"
                );
            }
            let generation = match gens.building {
                Some(resumed) => resumed,
                None => {
                    let next = gens.next();
                    backends::remove_generation(settings, next).await?;
                    gens.building = Some(next);
                    pointer.save(&gens).await.context("recording the rebuild")?;
                    next
                }
            };
            let side = backends::open_log(settings).await?;
            let starts = start_offsets(side.log.as_ref(), &settings.log.topic, from).await?;
            let started = Instant::now();
            let runtime =
                GenerationRuntime::start(settings, side.log.clone(), side.reader(), generation, starts.clone()).await?;
            // On servers the live generation's projectors keep running: switching once level
            // with it never shows readers an older state. A stopped data dir has nothing moving.
            let reference = if backends::has_server_read_models(settings) {
                let live = backends::open_generation(settings, gens.live, ReadModelUse::Serving).await?;
                Some((live.store as Arc<dyn Projection>, live.search as Arc<dyn Projection>))
            } else {
                None
            };
            let bar = progress_bar(show_progress);
            let done = catch_up(side.log.as_ref(), &settings.log.topic, &runtime, reference.as_ref(), &starts, |p| {
                bar.set_length(p.total);
                bar.set_position(p.done);
                bar.set_message(format!("lag {}", p.lag));
            })
            .await?;
            bar.finish_and_clear();
            runtime.stop().await;
            gens.previous = Some(gens.live);
            gens.live = generation;
            gens.building = None;
            pointer.save(&gens).await.context("switching readers")?;
            let seconds = started.elapsed().as_secs_f64();
            Ok(Summary {
                events: Some(done.done),
                seconds: Some(seconds),
                events_per_second: Some(done.done as f64 / seconds.max(0.001)),
                ..summary("rebuild", &gens)
            })
        }
    }
}

pub fn progress_bar(visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} events [{bar:40}] {per_sec} {msg} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}
