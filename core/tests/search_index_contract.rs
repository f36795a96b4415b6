//! The `SearchIndex` contract against the embedded tantivy index (always), an independent
//! OpenSearch-compatible server (`osmem-server` from PyPI, started here on a free port), and a
//! real Elasticsearch (with `ELASTICSEARCH_URL`; `ELASTICSEARCH_USERNAME` and
//! `ELASTICSEARCH_PASSWORD` when security is on), which stays the reference.

use std::sync::Arc;

use callisto_core::readmodel::SearchIndex;
use callisto_core::readmodel::elastic::{ElasticOptions, ElasticSearchIndex};
use callisto_core::readmodel::search::TantivySearchIndex;

mod contract;

#[tokio::test]
async fn the_embedded_index_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    contract::search_index_contract(contract::Server::Reference, |name| {
        let path = base.join(name);
        async move { Arc::new(TantivySearchIndex::open(&path).unwrap()) as Arc<dyn SearchIndex> }
    })
    .await;
}

/// The Elasticsearch adapter's contract against the server at `url`.
async fn elastic_contract(url: String, server: contract::Server) {
    let run = contract::unique("callisto-contract");
    contract::search_index_contract(server, |name| {
        let mut options = ElasticOptions::new(url.clone());
        options.username = std::env::var("ELASTICSEARCH_USERNAME").ok();
        options.password = std::env::var("ELASTICSEARCH_PASSWORD").ok();
        options.prefix = format!("{run}-{name}");
        async move { ElasticSearchIndex::connect(&options).await.unwrap() as Arc<dyn SearchIndex> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_meets_the_contract() {
    let Some(url) = contract::server_url("ELASTICSEARCH_URL") else { return };
    elastic_contract(url, contract::Server::Reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_opensearch_server_meets_the_contract() {
    let Some(peer) = contract::peers::Osmem::start() else { return };
    elastic_contract(peer.url.clone(), contract::Server::Osmem).await;
}
