//! Write-path micro-benchmarks. Each group holds Callisto's code and its baseline side by side:
//! compare within a group, not across runs.

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

criterion_group!(benches, codec_vs_plain_avro, murmur2_partitioning);
criterion_main!(benches);
