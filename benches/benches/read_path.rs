//! Read-path benchmarks. Each group holds Callisto's code and its baseline side by side:
//! compare within a group, not across runs.
//!
//! - `apply_500/documents`: a projector batch of 500 events into the redb read store, against
//!   a raw redb transaction inserting 500 documents of the same size.
//! - `apply_12x500/search`: twelve partitions' batches into the tantivy index at once (they
//!   share its timed group commit), against the same notes added raw with one commit.
//! - `search_1m_notes/*`: query latency on an index of `CALLISTO_BENCH_NOTES` notes (default
//!   1,000,000; built once and kept under `target/bench-data`), against a bare tantivy term
//!   query on the same index; then the p99 of 1,000 single queries of each kind, written to
//!   `target/bench-search-p99.json` for `bench_report`.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use callisto_benches::fixtures;
use callisto_core::readmodel::embedded::EmbeddedReadStore;
use callisto_core::readmodel::search::TantivySearchIndex;
use callisto_core::readmodel::{ProjectedEvent, Projection, SearchIndex, SearchRequest};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use uuid::Uuid;

const BATCH: u64 = 500;

/// 500 events of 25 persons (a registration and 19 notes each) at fresh offsets.
fn batch(next_offset: &AtomicU64) -> Vec<ProjectedEvent> {
    let start = next_offset.fetch_add(BATCH, Ordering::Relaxed);
    let ids: Vec<Uuid> = (0..25).map(|_| Uuid::new_v4()).collect();
    (0..BATCH)
        .map(|i| {
            let id = ids[(i % 25) as usize];
            let event = if i < 25 { fixtures::registered_as(id) } else { fixtures::note_for(id, i) };
            ProjectedEvent { partition: 0, offset: start + i, timestamp_ms: 0, event, principal: None, erased: false }
        })
        .collect()
}

fn apply_batches(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedReadStore::open(&dir.path().join("readmodel.redb")).unwrap();
    let search = TantivySearchIndex::open(&dir.path().join("search")).unwrap();
    let offsets = AtomicU64::new(0);

    let raw = redb::Database::create(dir.path().join("raw.redb")).unwrap();
    const DOCS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("docs");
    let doc = fixtures::document_bytes();

    let mut group = c.benchmark_group("apply_500/documents");
    group.sample_size(20);
    group.bench_function("baseline_raw_redb_txn", |b| {
        b.iter(|| {
            let txn = raw.begin_write().unwrap();
            {
                let mut table = txn.open_table(DOCS).unwrap();
                for _ in 0..BATCH {
                    table.insert(Uuid::new_v4().to_string().as_str(), doc.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        })
    });
    group.bench_function("callisto_read_store_apply", |b| {
        b.iter_batched(
            || batch(&offsets),
            |events| runtime.block_on(store.apply(0, &events, events.last().unwrap().offset)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();

    use tantivy::schema::{STORED, STRING, Schema, TEXT};
    let mut schema = Schema::builder();
    let id = schema.add_text_field("id", STRING | STORED);
    let text = schema.add_text_field("text", TEXT | STORED);
    let raw_index_dir = dir.path().join("raw-search");
    std::fs::create_dir_all(&raw_index_dir).unwrap();
    let raw_index = tantivy::Index::create_in_dir(&raw_index_dir, schema.build()).unwrap();
    let mut raw_writer: tantivy::IndexWriter = raw_index.writer_with_num_threads(1, 50_000_000).unwrap();

    // Search commits on a timer shared by all partitions, so it is measured the way it runs:
    // twelve partitions' batches at once, against the same documents added raw with one commit.
    let mut group = c.benchmark_group("apply_12x500/search");
    group.sample_size(10);
    group.bench_function("baseline_raw_tantivy_add_and_commit", |b| {
        b.iter(|| {
            for i in 0..BATCH * 12 {
                let callisto_avro::PersonEvent::NoteAdded(note) = fixtures::note_for(Uuid::new_v4(), i) else {
                    unreachable!()
                };
                raw_writer.add_document(tantivy::doc!(id => note.note_id.to_string(), text => note.text)).unwrap();
            }
            raw_writer.commit().unwrap();
        })
    });
    group.bench_function("callisto_search_apply_12_partitions", |b| {
        b.iter_batched(
            || (0..12u32).map(|p| (p, batch(&offsets))).collect::<Vec<_>>(),
            |batches| {
                runtime.block_on(futures::future::join_all(batches.iter().map(|(p, events)| {
                    let events: Vec<ProjectedEvent> = events
                        .iter()
                        .cloned()
                        .map(|mut e| {
                            e.partition = *p;
                            e
                        })
                        .collect();
                    let search = &search;
                    async move { search.apply(*p, &events, events.last().unwrap().offset).await.unwrap() }
                })))
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Where benchmark data and side outputs go: `CALLISTO_BENCH_OUT` (the Makefile passes the
/// cargo target dir), else the workspace's `target/`.
fn bench_out() -> PathBuf {
    std::env::var_os("CALLISTO_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn notes_wanted() -> u64 {
    std::env::var("CALLISTO_BENCH_NOTES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000)
}

/// Builds (once) an index of `notes` notes through Callisto's own apply path.
fn large_index(runtime: &tokio::runtime::Runtime, notes: u64) -> TantivySearchIndex {
    let dir = bench_out().join("bench-data").join(format!("search-{notes}"));
    let index = TantivySearchIndex::open(&dir).unwrap();
    let per_batch = 10_000u64;
    let persons_per_batch = 500u64;
    let done = runtime.block_on(index.checkpoints()).unwrap().get(&0).map_or(0, |o| o + 1);
    let mut offset = done;
    let mut built = done / per_batch * (per_batch - persons_per_batch);
    if built < notes {
        eprintln!("building a {notes}-note index in {} (kept for later runs)", dir.display());
    }
    while built < notes {
        let ids: Vec<Uuid> = (0..persons_per_batch).map(|_| Uuid::new_v4()).collect();
        let mut events = Vec::with_capacity(per_batch as usize);
        for (i, id) in ids.iter().enumerate() {
            let mut registered = fixtures::registered_as(*id);
            if let callisto_avro::PersonEvent::Registered(e) = &mut registered {
                e.tags = vec![if i % 10 == 0 { "vip".into() } else { "standard".into() }];
            }
            events.push(ProjectedEvent {
                partition: 0,
                offset,
                timestamp_ms: 0,
                event: registered,
                principal: None,
                erased: false,
            });
            offset += 1;
        }
        for n in 0..(per_batch - persons_per_batch) {
            let id = ids[(n % persons_per_batch) as usize];
            events.push(ProjectedEvent {
                partition: 0,
                offset,
                timestamp_ms: 0,
                event: fixtures::note_for(id, built + n),
                principal: None,
                erased: false,
            });
            offset += 1;
        }
        runtime.block_on(index.apply(0, &events, offset - 1)).unwrap();
        built += per_batch - persons_per_batch;
    }
    index
}

fn search_latency(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let notes = notes_wanted();
    let index = large_index(&runtime, notes);
    let raw = tantivy::Index::open_in_dir(bench_out().join("bench-data").join(format!("search-{notes}")));
    let mut group = c.benchmark_group(format!("search_{notes}_notes"));
    group.sample_size(30);
    if let Ok(raw) = raw {
        let reader = raw.reader().unwrap();
        let text = raw.schema().get_field("text").unwrap();
        group.bench_function("baseline_raw_tantivy_term_top10", |b| {
            b.iter(|| {
                let searcher = reader.searcher();
                let term = tantivy::Term::from_field_text(text, "renewal");
                let query = tantivy::query::TermQuery::new(term, tantivy::schema::IndexRecordOption::WithFreqs);
                black_box(searcher.search(&query, &tantivy::collector::TopDocs::with_limit(10)).unwrap())
            })
        });
    }
    for (name, q, tag) in [
        ("callisto_term", "renewal", None),
        ("callisto_phrase", "\"contract review\"", None),
        ("callisto_boolean_with_tag_facet", "(invoice OR budget) AND NOT meeting", Some("vip")),
    ] {
        let request = top10(q, tag);
        group.bench_function(name, |b| b.iter(|| black_box(runtime.block_on(index.search(&request)).unwrap())));
    }
    group.finish();
    search_p99(&runtime, &index, notes);
}

/// The first page of ten hits for `q`, optionally filtered by `tag`.
fn top10(q: &str, tag: Option<&str>) -> SearchRequest {
    SearchRequest { query: q.into(), tag: tag.map(Into::into), status: None, limit: 10, offset: 0, search_after: None }
}

/// Criterion reports means; the target is on p99, so time 1,000 single queries of each kind
/// and write their p99 as rows for `bench_report`.
fn search_p99(runtime: &tokio::runtime::Runtime, index: &TantivySearchIndex, notes: u64) {
    use callisto_benches::stats::{Row, histogram, ms, record};
    let mut rows = Vec::new();
    for (name, q, tag) in [
        ("term", "renewal", None),
        ("phrase", "\"contract review\"", None),
        ("boolean with tag facet", "(invoice OR budget) AND NOT meeting", Some("vip")),
    ] {
        let request = top10(q, tag);
        let mut latencies = histogram();
        for _ in 0..1_000 {
            let started = std::time::Instant::now();
            black_box(runtime.block_on(index.search(&request)).unwrap());
            record(&mut latencies, started.elapsed());
        }
        rows.push(Row::new(format!("search p99 on {notes} notes: {name}"), ms(&latencies, 0.99), "ms").at_most(20.0));
    }
    let out = bench_out().join("bench-search-p99.json");
    std::fs::write(&out, serde_json::to_vec_pretty(&rows).unwrap()).unwrap();
}

criterion_group!(benches, apply_batches, search_latency);
criterion_main!(benches);
