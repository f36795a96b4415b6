//! Read models behind a switch, for blue/green rebuilds: readers go through a
//! [`SwitchedReadStore`] / [`SwitchedSearchIndex`], and a rebuild flips it from the live
//! generation to the new one in one step. A request reads wholly from one generation: it takes
//! the current one once, at its start.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    Checkpoints, EventBatch, ListFilter, Page, PersonDoc, Projection, ReadStore, SearchIndex, SearchRequest,
    SearchResults, StoreError, TimelineEntry,
};

pub struct SwitchedReadStore {
    current: RwLock<Arc<dyn ReadStore>>,
}

pub struct SwitchedSearchIndex {
    current: RwLock<Arc<dyn SearchIndex>>,
}

impl SwitchedReadStore {
    pub fn new(live: Arc<dyn ReadStore>) -> Self {
        Self { current: RwLock::new(live) }
    }

    pub fn current(&self) -> Arc<dyn ReadStore> {
        self.current.read().expect("switch lock poisoned").clone()
    }

    /// Points readers at `next`; returns the generation they read before.
    pub fn switch_to(&self, next: Arc<dyn ReadStore>) -> Arc<dyn ReadStore> {
        std::mem::replace(&mut *self.current.write().expect("switch lock poisoned"), next)
    }
}

impl SwitchedSearchIndex {
    pub fn new(live: Arc<dyn SearchIndex>) -> Self {
        Self { current: RwLock::new(live) }
    }

    pub fn current(&self) -> Arc<dyn SearchIndex> {
        self.current.read().expect("switch lock poisoned").clone()
    }

    pub fn switch_to(&self, next: Arc<dyn SearchIndex>) -> Arc<dyn SearchIndex> {
        std::mem::replace(&mut *self.current.write().expect("switch lock poisoned"), next)
    }
}

/// Readers only: projectors write to a generation directly, never through the switch.
macro_rules! delegate_projection {
    ($switch:ty) => {
        #[async_trait]
        impl Projection for $switch {
            fn name(&self) -> &'static str {
                self.current().name()
            }

            fn system(&self) -> &'static str {
                self.current().system()
            }

            fn batch_max(&self) -> Option<usize> {
                self.current().batch_max()
            }

            async fn apply_shared(&self, partition: u32, events: EventBatch, through: u64) -> Result<(), StoreError> {
                self.current().apply_shared(partition, events, through).await
            }

            async fn apply_catching_up(
                &self,
                partition: u32,
                events: EventBatch,
                through: u64,
            ) -> Result<(), StoreError> {
                self.current().apply_catching_up(partition, events, through).await
            }

            async fn compact(&self) -> Result<(), StoreError> {
                self.current().compact().await
            }

            async fn checkpoints(&self) -> Result<Checkpoints, StoreError> {
                self.current().checkpoints().await
            }

            fn progress(&self) -> watch::Receiver<Checkpoints> {
                self.current().progress()
            }
        }
    };
}

delegate_projection!(SwitchedReadStore);
delegate_projection!(SwitchedSearchIndex);

#[async_trait]
impl ReadStore for SwitchedReadStore {
    async fn get(&self, person_id: Uuid) -> Result<Option<PersonDoc>, StoreError> {
        self.current().get(person_id).await
    }

    async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
        cursor: Option<Uuid>,
    ) -> Result<Page<PersonDoc>, StoreError> {
        self.current().list(filter, limit, cursor).await
    }

    async fn timeline(
        &self,
        person_id: Uuid,
        limit: usize,
        cursor: Option<u64>,
    ) -> Result<Page<TimelineEntry>, StoreError> {
        self.current().timeline(person_id, limit, cursor).await
    }
}

#[async_trait]
impl SearchIndex for SwitchedSearchIndex {
    async fn search(&self, request: &SearchRequest) -> Result<SearchResults, StoreError> {
        self.current().search(request).await
    }
}
