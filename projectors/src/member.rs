//! A projection as a consumer-group member: which partitions it works on, and their workers.
//!
//! The log decides the assignment (a Kafka consumer group, or every partition for a log without
//! groups). On assignment a partition starts after the projection's checkpoint; on revoke its
//! worker finishes the batch in hand before the partition is released.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use callisto_core::log::{EventLog, GroupHandler, PartitionFeed};
use callisto_core::privacy::EventReader;
use callisto_core::readmodel::Projection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ProjectorSettings;
use crate::retry::until_ok;
use crate::shared::SharedBatches;
use crate::worker::Worker;

pub struct Member {
    pub log: Arc<dyn EventLog>,
    pub reader: Arc<EventReader>,
    pub projection: Arc<dyn Projection>,
    pub settings: ProjectorSettings,
    pub shutdown: CancellationToken,
    /// The projector's catch-up budget, shared by the workers of all its projections (see
    /// [`ProjectorSettings::catch_up_records`]).
    catch_up: Arc<tokio::sync::Semaphore>,
    /// Decoded batches handed between the workers of the projector's projections.
    shared: Arc<SharedBatches>,
    workers: Mutex<HashMap<u32, (CancellationToken, JoinHandle<()>)>>,
}

impl Member {
    pub fn new(
        log: Arc<dyn EventLog>,
        reader: Arc<EventReader>,
        projection: Arc<dyn Projection>,
        settings: ProjectorSettings,
        shutdown: CancellationToken,
        catch_up: Arc<tokio::sync::Semaphore>,
        shared: Arc<SharedBatches>,
    ) -> Self {
        Self { log, reader, projection, settings, shutdown, catch_up, shared, workers: Mutex::new(HashMap::new()) }
    }

    /// The consumer group this projection's members share.
    pub fn group(&self) -> String {
        format!("{}.{}", self.settings.group, self.projection.name())
    }

    /// Partitions this member is working on now.
    pub fn owned(&self) -> Vec<u32> {
        let mut owned: Vec<u32> = self.workers.lock().map(|w| w.keys().copied().collect()).unwrap_or_default();
        owned.sort_unstable();
        owned
    }

    /// Stops every worker, each after the batch in hand.
    pub async fn stop_all(&self) {
        let owned = self.owned();
        self.revoked(&owned).await;
    }
}

#[async_trait]
impl GroupHandler for Member {
    async fn start_offsets(&self, partitions: &[u32]) -> Option<Vec<u64>> {
        let checkpoints = until_ok("reading checkpoints", &self.shutdown, || self.projection.checkpoints()).await?;
        Some(
            partitions
                .iter()
                .map(|p| {
                    let start = self.settings.start_offsets.as_ref().and_then(|s| s.get(*p as usize).copied());
                    checkpoints.get(p).map_or(start.unwrap_or(0), |last| last + 1)
                })
                .collect(),
        )
    }

    fn assigned(&self, feeds: Vec<Box<dyn PartitionFeed>>) {
        let Ok(mut workers) = self.workers.lock() else { return };
        for feed in feeds {
            let partition = feed.partition();
            let stop = self.shutdown.child_token();
            let worker = Worker {
                log: self.log.clone(),
                reader: self.reader.clone(),
                projection: self.projection.clone(),
                settings: self.settings.clone(),
                catch_up: self.catch_up.clone(),
                shared: self.shared.clone(),
                partition,
                feed,
            };
            let handle = tokio::spawn(worker.run(stop.clone()));
            if let Some((old, _)) = workers.insert(partition, (stop, handle)) {
                old.cancel();
            }
        }
    }

    async fn revoked(&self, partitions: &[u32]) {
        let leaving: Vec<_> = match self.workers.lock() {
            Ok(mut workers) => partitions.iter().filter_map(|p| workers.remove(p)).collect(),
            Err(_) => return,
        };
        for (stop, _) in &leaving {
            stop.cancel();
        }
        for (_, handle) in leaving {
            if let Err(e) = handle.await {
                tracing::error!(projection = self.projection.name(), error = %e, "projector worker crashed");
            }
        }
    }
}
