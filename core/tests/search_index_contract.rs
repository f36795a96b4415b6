//! The `SearchIndex` contract against the embedded tantivy index (always), an independent
//! OpenSearch-compatible server (`osmem-server` from PyPI, started here on a free port), and a
//! real Elasticsearch (with `ELASTICSEARCH_URL`; `ELASTICSEARCH_USERNAME` and
//! `ELASTICSEARCH_PASSWORD` when security is on), which stays the reference.

use std::sync::Arc;
use std::time::Duration;

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

/// A partition that is behind brings full batches, which do not wait for their commit. Later
/// batches fold onto what earlier ones added: a re-tag re-indexes notes not yet committed with
/// the new tag (and does not delete them), batches delivered again (as to a worker restarted at
/// the committed checkpoint) add nothing twice, and a batch that erases someone is committed
/// when its apply returns.
#[tokio::test]
async fn full_batches_fold_onto_what_is_not_yet_committed() {
    use callisto_core::readmodel::CATCH_UP_BATCH;
    use callisto_core::readmodel::{Projection, SearchRequest};

    let (ada, grace) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let others: Vec<uuid::Uuid> = (0..40).map(|_| uuid::Uuid::new_v4()).collect();
    // Ada registers and gets 100 notes; others fill the batch.
    let mut first = vec![contract::registered(ada, "Ada", &["vip"]), contract::registered(grace, "Grace", &["vip"])];
    first.extend(others.iter().map(|id| contract::registered(*id, "Other", &[])));
    first.extend((0..100).map(|i| contract::note(ada, &format!("engine draft {i}"))));
    // Then Ada is tagged, and gets 50 more notes.
    let mut second = vec![contract::tagged(ada, "math")];
    second.extend((0..50).map(|i| contract::note(ada, &format!("engine proof {i}"))));
    for batch in [&mut first, &mut second] {
        let fill = CATCH_UP_BATCH - batch.len();
        batch.extend((0..fill).map(|i| contract::note(others[i % others.len()], "filler")));
    }
    let number = |events: Vec<_>, from: u64| -> Vec<_> {
        events.into_iter().enumerate().map(|(i, e)| contract::at(0, from + i as u64, e)).collect()
    };
    let first = number(first, 0);
    let second = number(second, CATCH_UP_BATCH as u64);
    let through = |batch: &[callisto_core::readmodel::ProjectedEvent]| batch.last().unwrap().offset;

    let dir = tempfile::tempdir().unwrap();
    let index = TantivySearchIndex::open(dir.path()).unwrap();
    index.apply(0, &first, through(&first)).await.unwrap();
    index.apply(0, &second, through(&second)).await.unwrap();
    index.apply(0, &first, through(&first)).await.unwrap();
    index.apply(0, &second, through(&second)).await.unwrap();
    // A short batch waits for its commit, which covers the batches before it.
    let last = through(&second) + 1;
    index.apply(0, &[contract::at(0, last, contract::note(grace, "engine of Grace"))], last).await.unwrap();
    assert_eq!(index.checkpoints().await.unwrap().get(&0), Some(&last));

    let request = |query: &str, tag: Option<&str>| SearchRequest {
        query: query.into(),
        tag: tag.map(str::to_owned),
        status: None,
        limit: 10,
        offset: 0,
        search_after: None,
    };
    let engine = index.search(&request("engine", None)).await.unwrap();
    assert_eq!(engine.total, 151, "Ada's 150 notes and Grace's, each once");
    let math = index.search(&request("engine", Some("math"))).await.unwrap();
    assert_eq!(math.total, 150, "all of Ada's notes carry her new tag");
    assert_eq!(index.search(&request("Other", None)).await.unwrap().total, others.len());

    // A full batch that erases Ada is on disk once applied.
    let mut third = vec![contract::erased(ada)];
    third.extend((1..CATCH_UP_BATCH).map(|i| contract::note(others[i % others.len()], "filler")));
    let third = number(third, last + 1);
    index.apply(0, &third, through(&third)).await.unwrap();
    assert_eq!(index.checkpoints().await.unwrap().get(&0), Some(&through(&third)));
    let engine = index.search(&request("engine", None)).await.unwrap();
    assert_eq!(engine.total, 1, "only Grace's note is left: {:?}", engine.hits);
}

/// The last batch of a partition that was behind returns once added, so the catch-up budget it
/// holds is not kept waiting for the commit timer, and is committed at the next tick with no
/// batch after it. One that erases someone returns only once committed.
#[tokio::test]
async fn a_caught_up_partitions_last_batch_is_committed_at_the_next_tick_without_waiting_for_it() {
    use callisto_core::readmodel::{Projection, SearchRequest};

    let ada = uuid::Uuid::new_v4();
    let events: Vec<_> = [contract::registered(ada, "Ada", &["vip"]), contract::note(ada, "engine draft")]
        .into_iter()
        .enumerate()
        .map(|(i, e)| contract::at(0, i as u64, e))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let index = TantivySearchIndex::open(dir.path()).unwrap();
    let mut progress = index.progress();
    index.apply_catching_up(0, Arc::new(events), 1).await.unwrap();
    assert_eq!(index.checkpoints().await.unwrap().get(&0), None, "returned before its commit");

    let committed = progress.wait_for(|checkpoints| checkpoints.get(&0) == Some(&1));
    tokio::time::timeout(Duration::from_secs(10), committed).await.expect("committed with no batch after it").unwrap();
    let request =
        SearchRequest { query: "engine".into(), tag: None, status: None, limit: 10, offset: 0, search_after: None };
    assert_eq!(index.search(&request).await.unwrap().total, 1);

    index.apply_catching_up(0, Arc::new(vec![contract::at(0, 2, contract::erased(ada))]), 2).await.unwrap();
    assert_eq!(index.checkpoints().await.unwrap().get(&0), Some(&2), "an erasure is on disk once applied");
    assert_eq!(index.search(&request).await.unwrap().total, 0);
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

/// Blue/green on Elasticsearch: each generation has its own index and checkpoints; a switch is
/// one `_aliases` call that moves the read alias, which outside readers follow; rollback moves
/// it back; dropping a generation deletes its index and checkpoints.
async fn elastic_generations(url: String) {
    use callisto_core::readmodel::Projection;
    use callisto_core::readmodel::elastic::ElasticGenerations;
    use callisto_core::readmodel::generations::{GenerationPointer, Generations};

    let mut options = ElasticOptions::new(url.clone());
    options.username = std::env::var("ELASTICSEARCH_USERNAME").ok();
    options.password = std::env::var("ELASTICSEARCH_PASSWORD").ok();
    options.prefix = contract::unique("callisto-generations");
    let generation = |n: u32| ElasticOptions { generation: n, ..options.clone() };
    let http = reqwest::Client::new();
    let auth = |request: reqwest::RequestBuilder| match &options.username {
        Some(user) => request.basic_auth(user, options.password.clone()),
        None => request,
    };
    // What a reader outside Callisto (Kibana, an analyst's script) sees through the alias.
    let through_alias = || async {
        let answer: serde_json::Value = auth(http.post(format!("{url}/{}/_search", options.alias())))
            .json(&serde_json::json!({"query": {"term": {"kind": "person"}}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut ids: Vec<String> = answer["hits"]["hits"]
            .as_array()
            .unwrap_or_else(|| panic!("{answer}"))
            .iter()
            .map(|h| h["_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };

    let (blue_person, green_person) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let blue = ElasticSearchIndex::connect(&generation(0)).await.unwrap();
    blue.apply(0, &[contract::at(0, 4, contract::registered(blue_person, "Blue", &[]))], 4).await.unwrap();
    let pointer = ElasticGenerations::new(&options).unwrap();
    assert_eq!(pointer.load().await.unwrap(), Generations::default(), "the first index holds the alias");
    assert_eq!(through_alias().await, [format!("person:{blue_person}")]);

    let green = ElasticSearchIndex::connect(&generation(1)).await.unwrap();
    assert!(green.checkpoints().await.unwrap().is_empty(), "a new generation starts without checkpoints");
    green.apply(0, &[contract::at(0, 9, contract::registered(green_person, "Green", &[]))], 9).await.unwrap();
    assert_eq!(through_alias().await, [format!("person:{blue_person}")], "building is invisible to readers");

    let switched = Generations { live: 1, previous: Some(0), building: None };
    pointer.save(&switched).await.unwrap();
    assert_eq!(through_alias().await, [format!("person:{green_person}")]);
    assert_eq!(pointer.load().await.unwrap(), switched);
    assert_eq!(blue.checkpoints().await.unwrap().get(&0), Some(&4), "each generation keeps its own checkpoints");
    assert_eq!(green.checkpoints().await.unwrap().get(&0), Some(&9));

    let rolled_back = Generations { live: 0, previous: Some(1), building: None };
    pointer.save(&rolled_back).await.unwrap();
    assert_eq!(through_alias().await, [format!("person:{blue_person}")]);
    assert_eq!(pointer.load().await.unwrap(), rolled_back);

    pointer.drop_generation(1).await.unwrap();
    let gone = auth(http.get(format!("{url}/{}", generation(1).index()))).send().await.unwrap();
    assert_eq!(gone.status(), reqwest::StatusCode::NOT_FOUND);
    let rebuilt = ElasticSearchIndex::connect(&generation(1)).await.unwrap();
    assert!(rebuilt.checkpoints().await.unwrap().is_empty(), "a dropped generation's checkpoints are gone");
    assert_eq!(through_alias().await, [format!("person:{blue_person}")], "creating an index never takes the alias");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_generations_switch_with_the_read_alias() {
    let Some(url) = contract::server_url("ELASTICSEARCH_URL") else { return };
    elastic_generations(url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_server_generations_switch_with_the_read_alias() {
    let Some(peer) = contract::peers::Osmem::start() else { return };
    elastic_generations(peer.url.clone()).await;
}
