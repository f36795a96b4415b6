//! The `ReadStore` contract against the embedded store (always) and MongoDB (with
//! `MONGODB_URI`, e.g. `mongodb://localhost:27017/?replicaSet=rs0`).

use std::sync::Arc;

use callisto_core::readmodel::ReadStore;
use callisto_core::readmodel::embedded::EmbeddedReadStore;
use callisto_core::readmodel::mongo::{MongoOptions, MongoReadStore};

mod contract;

#[tokio::test]
async fn the_embedded_store_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    contract::read_store_contract(|name| {
        let path = base.join(format!("{name}.redb"));
        async move { Arc::new(EmbeddedReadStore::open(&path).unwrap()) as Arc<dyn ReadStore> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_meets_the_contract() {
    let Some(uri) = contract::server_url("MONGODB_URI") else { return };
    let run = contract::unique("callisto-contract");
    contract::read_store_contract(|name| {
        let options = MongoOptions::new(uri.clone(), format!("{run}-{name}"));
        async move { MongoReadStore::connect(&options).await.unwrap() as Arc<dyn ReadStore> }
    })
    .await;
}
