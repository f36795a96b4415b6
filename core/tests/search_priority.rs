//! The embedded search index's threads run below the request path in a process that serves
//! requests. A test binary of its own: the check looks at every thread of the process, and the
//! contract tests' indexes, opened before this one asked to yield, run at the normal priority.

use callisto_core::readmodel::search::TantivySearchIndex;

mod contract;

/// In a process that serves requests, the embedded index's threads (its committer, tantivy's
/// indexing and merge threads, including indexing threads started again by a commit) run below
/// the request path's priority.
#[tokio::test]
async fn the_embedded_index_indexes_at_background_priority() {
    use callisto_core::priority::{BACKGROUND_NICE, current_nice, yield_to_requests};
    use callisto_core::readmodel::Projection;

    yield_to_requests();
    let dir = tempfile::tempdir().unwrap();
    let index = TantivySearchIndex::open(dir.path()).unwrap();
    let id = uuid::Uuid::new_v4();
    // Two batches, so at least one commit has restarted the indexing threads.
    index.apply(0, &contract::history(id), 10).await.unwrap();
    index.apply(0, &[contract::at(0, 11, contract::note(id, "second batch"))], 11).await.unwrap();

    let index_threads = ["thrd-tantivy", "merge_thread", "segment_update", "callisto-search"];
    let mut seen = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
        let Some((head, tail)) = stat.rsplit_once(')') else { continue };
        let name = head.split_once('(').map_or("", |(_, name)| name).to_owned();
        // After the name: state is the first field, nice the seventeenth.
        let nice: i32 = tail.split_whitespace().nth(16).and_then(|n| n.parse().ok()).unwrap_or(0);
        if index_threads.iter().any(|prefix| name.starts_with(prefix)) {
            seen.push((name, nice));
        }
    }
    assert!(seen.iter().any(|(name, _)| name.starts_with("thrd-tantivy")), "indexing threads: {seen:?}");
    assert!(seen.iter().any(|(name, _)| name.starts_with("merge_thread")), "merge threads: {seen:?}");
    assert!(seen.iter().all(|(_, nice)| *nice >= BACKGROUND_NICE), "{seen:?}");
    assert!(current_nice().is_some_and(|nice| nice < BACKGROUND_NICE), "the test's own thread is not lowered");
}
