//! Write-path micro-benchmarks. Each group holds Callisto's code and its baseline side by side:
//! compare within a group, not across runs.
//!
//! - `avro_round_trip/*`: Callisto's codec (wire format, registry ids, typed events) against a
//!   plain `apache-avro` `Value` round trip.
//! - `partitioning_1024_uuid_keys`: Kafka's murmur2 against std's hasher.
//! - `log_append/*`: the embedded log with 1, 8 and 64 appenders against raw redb commits.
//! - `personal_data_seal/*` and `personal_data_open/*`: sealing an event's personal fields with
//!   the person's data key (writers) and opening them (projectors, rebuilds), with the key in
//!   the keyring's cache and read from the key store, against the codec alone on a clear event.
//! - `kafka_append/*`: the Kafka log's appends (delivery report awaited, token fields
//!   extracted) against a raw rdkafka `FutureProducer` with the same producer settings, on a
//!   3-broker librdkafka mock cluster.

use std::hint::black_box;
use std::sync::Arc;

use apache_avro::{from_avro_datum, to_avro_datum};
use callisto_avro::{Codec, EmbeddedRegistry, PersonEvent};
use callisto_benches::fixtures;
use callisto_core::partition::partition_for;
use criterion::{Criterion, criterion_group, criterion_main};

fn codec_vs_plain_avro(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap());
    let codec = Codec::new(registry, "persons").unwrap();
    for (name, event) in [("registered", fixtures::registered()), ("note_50_words", fixtures::note(50))] {
        let kind = event.kind();
        let schema = kind.schema();
        let bytes = codec.encode(&event).unwrap();
        let value = from_avro_datum(schema, &mut &bytes[5..], None).unwrap();
        let mut group = c.benchmark_group(format!("avro_round_trip/{name}"));
        group.bench_function("baseline_apache_avro_value", |b| {
            b.iter(|| {
                let body = to_avro_datum(schema, black_box(value.clone())).unwrap();
                black_box(from_avro_datum(schema, &mut body.as_slice(), None).unwrap())
            })
        });
        group.bench_function("callisto_codec", |b| {
            b.iter(|| {
                let framed = codec.encode(black_box(&event)).unwrap();
                black_box::<PersonEvent>(codec.decode(&framed).unwrap())
            })
        });
        group.finish();
    }
}

fn murmur2_partitioning(c: &mut Criterion) {
    let keys: Vec<String> = (0..1024).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let mut group = c.benchmark_group("partitioning_1024_uuid_keys");
    group.bench_function("baseline_std_hash", |b| {
        use std::hash::{BuildHasher, RandomState};
        let state = RandomState::new();
        b.iter(|| keys.iter().map(|k| (state.hash_one(k.as_bytes()) % 12) as u32).sum::<u32>())
    });
    group.bench_function("callisto_murmur2", |b| {
        b.iter(|| keys.iter().map(|k| partition_for(k.as_bytes(), 12)).sum::<u32>())
    });
    group.finish();
}

/// Appends per iteration, per appender.
const APPENDS_EACH: usize = 4;

/// The embedded log's appends with 1, 8 and 64 concurrent appenders (one by one, then group
/// commit), against raw redb with the same number of writers, each committing its own record
/// with the same (immediate) durability.
fn log_appends(c: &mut Criterion) {
    use callisto_core::log::{AppendRequest, EmbeddedLog, EmbeddedLogOptions, EventLog};
    use criterion::Throughput;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(&dir.path().join("log.redb"), EmbeddedLogOptions::default()).unwrap());
    runtime.block_on(log.ensure_topic("persons", 12)).unwrap();
    let raw = Arc::new(redb::Database::create(dir.path().join("raw.redb")).unwrap());
    const RAW: redb::TableDefinition<(u32, u64), &[u8]> = redb::TableDefinition::new("raw");
    let payload = vec![7u8; 200];
    let raw_offset = Arc::new(std::sync::atomic::AtomicU64::new(0));

    for appenders in [1usize, 8, 64] {
        let mut group = c.benchmark_group(format!("log_append/{appenders}_appenders"));
        group.sample_size(10);
        group.throughput(Throughput::Elements((appenders * APPENDS_EACH) as u64));
        group.bench_function("baseline_raw_redb_commit_each", |b| {
            b.iter(|| {
                std::thread::scope(|scope| {
                    for _ in 0..appenders {
                        let (raw, payload, raw_offset) = (raw.clone(), payload.clone(), raw_offset.clone());
                        scope.spawn(move || {
                            for _ in 0..APPENDS_EACH {
                                let offset = raw_offset.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let txn = raw.begin_write().unwrap();
                                txn.open_table(RAW).unwrap().insert((0, offset), payload.as_slice()).unwrap();
                                txn.commit().unwrap();
                            }
                        });
                    }
                })
            })
        });
        group.bench_function("callisto_embedded_log", |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let tasks: Vec<_> = (0..appenders)
                        .map(|a| {
                            let (log, payload) = (log.clone(), payload.clone());
                            tokio::spawn(async move {
                                for _ in 0..APPENDS_EACH {
                                    let request = AppendRequest {
                                        topic: "persons".into(),
                                        key: format!("person-{a}").into_bytes(),
                                        payload: payload.clone(),
                                        headers: vec![],
                                        idempotency: None,
                                    };
                                    log.append(request).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap();
                    }
                })
            })
        });
        group.finish();
    }
}

/// 256 appends with 64 in flight: `KafkaLog::append` against the same sends on a raw
/// `FutureProducer` configured like it (idempotent, acks=all, murmur2_random, lz4, 5 ms linger).
fn kafka_appends(c: &mut Criterion) {
    use callisto_core::log::{AppendRequest, EventLog, KafkaLog, KafkaLogOptions};
    use criterion::Throughput;
    use futures::StreamExt;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    const APPENDS: usize = 256;
    const IN_FLIGHT: usize = 64;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cluster = rdkafka::mocking::MockCluster::new(3).unwrap();
    cluster.create_topic("persons", 12, 3).unwrap();
    let mut options = KafkaLogOptions::new(cluster.bootstrap_servers());
    options.min_insync_replicas = None;
    let log = runtime.block_on(async { KafkaLog::new(options).unwrap() });
    let raw: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .create()
        .unwrap();
    let payload = vec![7u8; 200];
    let keys: Vec<Vec<u8>> = (0..APPENDS).map(|n| format!("person-{n}").into_bytes()).collect();

    let mut group = c.benchmark_group("kafka_append/256_appends_64_in_flight");
    group.sample_size(10);
    group.throughput(Throughput::Elements(APPENDS as u64));
    group.bench_function("baseline_raw_rdkafka_future_producer", |b| {
        b.iter(|| {
            runtime.block_on(async {
                futures::stream::iter(&keys)
                    .map(|key| {
                        let record = FutureRecord::to("persons").key(key).payload(&payload);
                        raw.send(record, std::time::Duration::from_secs(10))
                    })
                    .buffer_unordered(IN_FLIGHT)
                    .for_each(|delivery| async move {
                        delivery.unwrap();
                    })
                    .await
            })
        })
    });
    group.bench_function("callisto_kafka_log", |b| {
        b.iter(|| {
            runtime.block_on(async {
                futures::stream::iter(&keys)
                    .map(|key| {
                        log.append(AppendRequest {
                            topic: "persons".into(),
                            key: key.clone(),
                            payload: payload.clone(),
                            headers: vec![],
                            idempotency: None,
                        })
                    })
                    .buffer_unordered(IN_FLIGHT)
                    .for_each(|appended| async move {
                        black_box(appended.unwrap());
                    })
                    .await
            })
        })
    });
    group.finish();
}

/// What crypto-shredding adds per event: the writer's seal + encode and a reader's decode + open,
/// against encoding and decoding the same event in clear.
fn personal_data(c: &mut Criterion) {
    use callisto_core::privacy::embedded::EmbeddedKeyStore;
    use callisto_core::privacy::{Keyring, KeyringOptions, MasterKey};
    use std::time::Duration;

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap());
    let codec = Codec::new(registry, "persons").unwrap();
    let store = Arc::new(EmbeddedKeyStore::open(&dir.path().join("keys.redb")).unwrap());
    let keyring = |ttl: Duration| {
        let master = MasterKey::from_hex(&std::fs::read_to_string(dir.path().join("master.key")).unwrap()).unwrap();
        Keyring::new(store.clone(), master, Vec::new(), &KeyringOptions { cache_ttl: ttl, ..Default::default() })
    };
    callisto_core::privacy::write_new_master_key(&dir.path().join("master.key")).unwrap();
    let cached = keyring(Duration::from_secs(3600));
    let uncached = keyring(Duration::ZERO);
    for (name, event) in [("registered", fixtures::registered()), ("note_50_words", fixtures::note(50))] {
        let clear = codec.encode(&event).unwrap();
        let (blank, sealed) = runtime.block_on(cached.seal(event.clone())).unwrap();
        let sealed_bytes = codec.encode_sealed(&blank, sealed.as_ref()).unwrap();

        let mut group = c.benchmark_group(format!("personal_data_seal/{name}"));
        group.bench_function("baseline_encode_clear", |b| {
            b.iter(|| runtime.block_on(async { black_box(codec.encode(black_box(&event)).unwrap()) }))
        });
        for (label, ring) in
            [("callisto_seal_and_encode_cached_key", &cached), ("callisto_seal_and_encode_key_store_read", &uncached)]
        {
            group.bench_function(label, |b| {
                b.iter(|| {
                    runtime.block_on(async {
                        let (blank, sealed) = ring.seal(black_box(event.clone())).await.unwrap();
                        black_box(codec.encode_sealed(&blank, sealed.as_ref()).unwrap())
                    })
                })
            });
        }
        group.finish();

        let mut group = c.benchmark_group(format!("personal_data_open/{name}"));
        group.bench_function("baseline_decode_clear", |b| {
            b.iter(|| runtime.block_on(async { black_box(codec.decode(black_box(&clear)).unwrap()) }))
        });
        for (label, ring) in
            [("callisto_decode_and_open_cached_key", &cached), ("callisto_decode_and_open_key_store_read", &uncached)]
        {
            group.bench_function(label, |b| {
                b.iter(|| {
                    runtime.block_on(async {
                        let (event, sealed) = codec.decode_sealed(black_box(&sealed_bytes)).unwrap();
                        black_box(ring.open(event, sealed).await.unwrap())
                    })
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, codec_vs_plain_avro, murmur2_partitioning, personal_data, log_appends, kafka_appends);
criterion_main!(benches);
