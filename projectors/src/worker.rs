//! One worker per (projection, partition): the ordered loop that keeps a read model current.

use std::sync::Arc;
use std::time::{Duration, Instant};

use callisto_core::log::{AppendRequest, EventLog, LogError, PartitionFeed, Record};
use callisto_core::privacy::EventReader;
use callisto_core::readmodel::{EventBatch, ProjectedEvent, Projection, StoreError};
use callisto_core::telemetry::trace;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::member::Member;
use crate::retry::{backoff, until_ok};
use crate::shared::{Claim, Decoded, Reading, SharedBatches};
use crate::{ProjectorSettings, dlq};

pub struct Worker {
    /// For dead letters.
    pub log: Arc<dyn EventLog>,
    /// Decodes records and opens their personal data.
    pub reader: Arc<EventReader>,
    pub projection: Arc<dyn Projection>,
    pub settings: ProjectorSettings,
    /// The projector's catch-up budget, shared with the workers of its other projections (see
    /// [`ProjectorSettings::catch_up_records`]).
    pub catch_up: Arc<tokio::sync::Semaphore>,
    /// Batches decoded by the workers of the projector's other projections on the same
    /// partition, handed over while catching up.
    pub shared: Arc<SharedBatches>,
    pub partition: u32,
    /// The partition's records, starting after the projection's checkpoint.
    pub feed: Box<dyn PartitionFeed>,
}

/// How applying a batch ended.
enum Outcome {
    Applied,
    Stopped,
}

impl Worker {
    /// Projects the feed until `stop` is cancelled. A batch being applied when `stop` arrives is
    /// finished and recorded first, so whoever takes the partition next starts after it.
    pub async fn run(mut self, stop: CancellationToken) {
        let name = self.projection.name();
        let partition = self.partition;
        tracing::debug!(projection = name, partition, "projector worker starting");
        let batch_max = self.projection.batch_max().unwrap_or(self.settings.batch_max);
        // Whether the last batch was full: the partition is catching up, so its next read waits
        // for the budget, and does not wait for records (it stops being behind once a read
        // comes back short). Every worker starts out behind, which bounds a rebuild's start.
        let mut behind = true;
        let share = u32::try_from(batch_max.min(self.settings.catch_up_records).max(1)).unwrap_or(u32::MAX);
        // When the last live read that followed traffic started: the next waits for the interval
        // after it.
        let mut live_read_at: Option<Instant> = None;
        while !stop.is_cancelled() {
            if !behind && let Some(due) = live_read_at.map(|at| at + self.settings.live_read_interval) {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep_until(due.into()) => {}
                }
            }
            // While catching up: the budget this batch holds, and the batch decoded from the same
            // records by another projection's worker, if one was handed over with its budget.
            let Budget { permit: budget, handed, reading } = if behind {
                let Some(budget) = self.wait_for_budget(share, batch_max, &stop).await else { return };
                budget
            } else {
                Budget::default()
            };
            // A batch handed over brings its records: the feed moves past them unread.
            let (records, handed) = match handed {
                Some(batch) => {
                    if let Some(last) = batch.records.last() {
                        self.feed.skip_to(last.offset + 1);
                    }
                    metrics::counter!("callisto_projection_shared_batches_total", "projection" => name).increment(1);
                    (batch.records, Some(batch.events))
                }
                None => {
                    let wait = if behind { Duration::ZERO } else { self.settings.poll_wait };
                    let read_at = Instant::now();
                    let Some(records) = self.next_batch(batch_max, wait, &stop).await else { return };
                    // A live read that found records at once follows traffic; one that waited
                    // for them, or found none, came after a quiet spell and holds nothing back.
                    // Catch-up reads are paced by the budget instead.
                    let following_traffic =
                        !behind && !records.is_empty() && read_at.elapsed() < self.settings.live_read_interval;
                    live_read_at = following_traffic.then_some(read_at);
                    (Arc::new(records), None)
                }
            };
            // A batch read under the catch-up budget, the last of a backlog included.
            let catching_up = budget.is_some();
            behind = records.len() >= batch_max;
            let Some(last) = records.last() else { continue };
            let through = last.offset;
            let started = Instant::now();
            // Joins the trace of each record's command (see `telemetry::trace`).
            let process = trace::process_span(
                self.log.system(),
                &last.topic,
                name,
                partition,
                records.iter().map(|r| trace::remote_context(r.header("traceparent"), r.header("tracestate"))),
            );
            // The decoded events, shared with the store, which may apply them on a thread of its
            // own, and the record each came from (for dead letters).
            let (events, sources) = match handed {
                Some(events) => (events, records.iter().collect::<Vec<_>>()),
                None => {
                    if records.len() > 1 {
                        self.reader.prefetch_keys(&records).instrument(process.clone()).await;
                    }
                    let mut events = Vec::with_capacity(records.len());
                    let mut sources = Vec::with_capacity(records.len());
                    for record in records.iter() {
                        match self.decode(record, &stop).instrument(process.clone()).await {
                            Some(Ok(event)) => {
                                events.push(event);
                                sources.push(record);
                            }
                            Some(Err(error)) => {
                                if !self.dead_letter(record, &error, &stop).await {
                                    return;
                                }
                            }
                            None => return,
                        }
                    }
                    let events = Arc::new(events);
                    // Another projection's worker may be waiting to read these very records. A
                    // batch with dead letters is not handed over: each projection records its own.
                    if let (Some(budget), Some(reading)) = (&budget, reading)
                        && events.len() == records.len()
                    {
                        let batch =
                            Decoded { records: records.clone(), events: events.clone(), budget: budget.clone() };
                        reading.offer(batch_max, &batch);
                    }
                    (events, sources)
                }
            };
            if let Outcome::Stopped =
                self.apply(&sources, &events, through, catching_up, &stop).instrument(process).await
            {
                return;
            }
            callisto_core::readmodel::record_erasures(events.iter());
            metrics::counter!("callisto_projected_events_total", "projection" => name).increment(records.len() as u64);
            metrics::histogram!("callisto_projection_batch_seconds", "projection" => name)
                .record(started.elapsed().as_secs_f64());
            // The group's position: a lag signal and where a consumer without the read model's
            // checkpoint would start. Resuming always uses the projection's own checkpoint.
            if let Err(e) = self.feed.processed(through + 1).await {
                tracing::debug!(error = %e, "recording the group position failed");
            }
        }
    }

    /// Waits for the catch-up budget, or for a batch another projection's worker decodes from the
    /// records this one reads next, which brings the budget it holds. `None` on stop.
    async fn wait_for_budget(&self, share: u32, batch_max: usize, stop: &CancellationToken) -> Option<Budget> {
        let acquire = self.catch_up.clone().acquire_many_owned(share);
        let Some(next) = self.feed.next_offset() else {
            return tokio::select! {
                () = stop.cancelled() => None,
                permit = acquire => Some(Budget { permit: permit.ok().map(Arc::new), ..Budget::default() }),
            };
        };
        let waiting = self.shared.wait(self.partition, self.projection.name(), next, batch_max);
        tokio::pin!(acquire);
        let mut held = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return None,
                permit = &mut acquire, if held.is_none() => match permit {
                    Ok(permit) => held = Some(permit),
                    // Closed: there is no budget to keep to.
                    Err(_) => return Some(Budget::default()),
                },
                () = waiting.woken() => {
                    if let Some(batch) = waiting.take() {
                        return Some(Budget::handed(batch));
                    }
                    if held.is_none() {
                        continue;
                    }
                }
            }
            match waiting.claim() {
                Claim::Handed(batch) => return Some(Budget::handed(batch)),
                Claim::Follow => {}
                Claim::Read(reading) => {
                    return Some(Budget { permit: held.map(Arc::new), handed: None, reading: Some(reading) });
                }
            }
        }
    }

    /// The next batch of at most `max` records, waiting up to `wait` for the first, retried with
    /// back-off while the log fails. `None` on stop.
    async fn next_batch(&mut self, max: usize, wait: Duration, stop: &CancellationToken) -> Option<Vec<Record>> {
        let mut delays = backoff();
        let mut failures = 0u32;
        loop {
            let read = tokio::select! {
                () = stop.cancelled() => return None,
                read = self.feed.next_batch(max, wait) => read,
            };
            match read {
                Ok(records) => return Some(records),
                Err(e) => {
                    failures += 1;
                    if failures == 3 {
                        tracing::warn!(partition = self.partition, error = %e, "reading the log keeps failing; retrying with back-off");
                    }
                    tokio::select! {
                        () = stop.cancelled() => return None,
                        () = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))) => {}
                    }
                }
            }
        }
    }

    /// Decodes and opens with a few attempts (a registry may be briefly unreachable); a key
    /// store that is down is waited for, however long. `None` on shutdown.
    async fn decode(&self, record: &Record, shutdown: &CancellationToken) -> Option<Result<ProjectedEvent, String>> {
        let mut delays = backoff();
        let mut attempt = 1;
        let mut outages = 0u32;
        loop {
            match self.reader.read(&record.payload).await {
                Ok(opened) => {
                    return Some(Ok(ProjectedEvent::from_opened(record, opened)));
                }
                Err(e) if e.is_outage() => {
                    outages += 1;
                    if outages == 3 {
                        tracing::warn!(partition = self.partition, error = %e, "key store unavailable; partition paused, retrying with back-off");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))) => {}
                    }
                }
                Err(e) if attempt >= self.settings.event_attempts => return Some(Err(e.to_string())),
                Err(_) => {
                    attempt += 1;
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))) => {}
                    }
                }
            }
        }
    }

    /// Applies the batch with its checkpoint, `catching_up` when it was read under the catch-up
    /// budget ([`Projection::apply_catching_up`]). A store that is down is retried until it is
    /// back; a batch the store rejects is applied event by event to dead-letter only the culprit.
    async fn apply(
        &self,
        sources: &[&Record],
        events: &EventBatch,
        through: u64,
        catching_up: bool,
        shutdown: &CancellationToken,
    ) -> Outcome {
        match self.apply_retrying(events, through, catching_up, shutdown).await {
            None => Outcome::Stopped,
            Some(Ok(())) => Outcome::Applied,
            Some(Err(rejection)) => {
                tracing::warn!(projection = self.projection.name(), partition = self.partition, error = %rejection,
                    "batch rejected; isolating the failing events");
                for (record, event) in sources.iter().zip(events.iter()) {
                    match self.apply_retrying(&Arc::new(vec![event.clone()]), event.offset, false, shutdown).await {
                        None => return Outcome::Stopped,
                        Some(Ok(())) => {}
                        Some(Err(error)) => {
                            if !self.dead_letter(record, &error, shutdown).await {
                                return Outcome::Stopped;
                            }
                        }
                    }
                }
                // Trailing records may all have been dead-lettered: still move the checkpoint.
                match self.apply_retrying(&Arc::default(), through, false, shutdown).await {
                    None => Outcome::Stopped,
                    Some(_) => Outcome::Applied,
                }
            }
        }
    }

    /// `Some(Err)` is a rejection (after `event_attempts` tries); outages are retried forever.
    async fn apply_retrying(
        &self,
        events: &EventBatch,
        through: u64,
        catching_up: bool,
        shutdown: &CancellationToken,
    ) -> Option<Result<(), String>> {
        let mut delays = backoff();
        let mut rejections = 0;
        let mut outages = 0u32;
        loop {
            let write = trace::write_span(self.projection.system(), self.projection.name(), events.len());
            let (partition, events) = (self.partition, events.clone());
            let applied = if catching_up {
                self.projection.apply_catching_up(partition, events, through).instrument(write.clone()).await
            } else {
                self.projection.apply_shared(partition, events, through).instrument(write.clone()).await
            };
            if let Err(e) = &applied {
                // A fixed reason: store messages may quote the documents.
                let reason = if matches!(e, StoreError::Unavailable(_)) { "store unavailable" } else { "rejected" };
                trace::record_error(&write, reason);
            }
            let error = match applied {
                Ok(()) => return Some(Ok(())),
                Err(StoreError::Rejected(e) | StoreError::InvalidRequest(e)) => {
                    rejections += 1;
                    if rejections >= self.settings.event_attempts {
                        return Some(Err(format!("apply: {e}")));
                    }
                    e
                }
                Err(StoreError::Unavailable(e)) => {
                    outages += 1;
                    if outages == 3 {
                        tracing::warn!(projection = self.projection.name(), partition = self.partition, error = %e,
                            "store unavailable; partition paused, retrying with back-off");
                    }
                    e
                }
            };
            tracing::debug!(projection = self.projection.name(), partition = self.partition, %error, "apply failed");
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))) => {}
            }
        }
    }

    /// Appends the dead letter, retrying until the log takes it. `false` on shutdown.
    async fn dead_letter(&self, record: &Record, error: &str, shutdown: &CancellationToken) -> bool {
        let name = self.projection.name();
        tracing::warn!(
            projection = name,
            partition = record.partition,
            offset = record.offset,
            error,
            "dead-lettering event"
        );
        let request = dlq::dead_letter(record, name, error);
        let append = || {
            let request = request.clone();
            async move {
                match self.log.append(request.clone()).await {
                    // A log without idempotency keys (Kafka): a worker that crashes between
                    // this append and its checkpoint may dead-letter the event twice, which
                    // `dlq replay` absorbs through the version guard.
                    Err(LogError::Unsupported(_)) => {
                        self.log.append(AppendRequest { idempotency: None, ..request }).await
                    }
                    other => other,
                }
            }
        };
        let appended = until_ok("dead-lettering an event", shutdown, append).await;
        if appended.is_some() {
            metrics::counter!("callisto_dead_letters_total", "projection" => name).increment(1);
        }
        appended.is_some()
    }
}

/// What a batch read while catching up holds.
#[derive(Default)]
struct Budget {
    /// Its share of the catch-up budget.
    permit: Option<Arc<OwnedSemaphorePermit>>,
    /// The batch, when another projection's worker decoded it.
    handed: Option<Decoded>,
    /// Where the worker reads the batch itself, how it hands it over.
    reading: Option<Reading>,
}

impl Budget {
    fn handed(batch: Decoded) -> Self {
        Self { permit: Some(batch.budget.clone()), handed: Some(batch), reading: None }
    }
}

/// Publishes, once a second, for the partitions this process works on:
/// - `callisto_projection_lag{projection, partition}`: records in the log the projection has not
///   applied yet;
/// - `callisto_projection_lag_seconds{projection, partition}`: how long the oldest of them has
///   been waiting (its log timestamp to now), 0 when caught up — what an operator can compare
///   with a freshness target, whatever the write rate.
pub async fn report_lag(log: Arc<dyn EventLog>, members: Vec<Arc<Member>>, topic: String, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(ends) = log.end_offsets(&topic).await else { continue };
        for member in &members {
            let checkpoints = member.projection.progress().borrow().clone();
            for partition in member.owned() {
                let Some(&end) = ends.get(partition as usize) else { continue };
                let applied = checkpoints.get(&partition).map_or(0, |last| last + 1);
                let labels =
                    [("projection", member.projection.name().to_owned()), ("partition", partition.to_string())];
                metrics::gauge!("callisto_projection_lag", &labels).set(end.saturating_sub(applied) as f64);
                // One record read, only while behind: the oldest event not applied yet.
                let seconds = if end > applied {
                    match log.read(&topic, partition, applied, 1, Duration::ZERO).await {
                        Ok(records) => records.first().map_or(0.0, |r| {
                            (chrono::Utc::now().timestamp_millis() - r.timestamp_ms).max(0) as f64 / 1000.0
                        }),
                        Err(_) => continue,
                    }
                } else {
                    0.0
                };
                metrics::gauge!("callisto_projection_lag_seconds", &labels).set(seconds);
            }
        }
    }
}
