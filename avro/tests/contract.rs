//! The event contract: schemas parse, every event round-trips through the wire format, ids are
//! stable, and the schemas stay compatible with every released version.

use std::path::Path;
use std::sync::Arc;

use apache_avro::Schema;
use callisto_avro::codec::{CodecError, schema_id};
use callisto_avro::compat::{check_against_released, check_full};
use callisto_avro::events::*;
use callisto_avro::{Codec, EmbeddedRegistry, EventKind, SchemaRegistry};
use chrono::{NaiveDate, TimeZone, Utc};
use uuid::Uuid;

fn codec(dir: &Path) -> Codec {
    let registry = Arc::new(EmbeddedRegistry::open(&dir.join("schemas.redb")).unwrap());
    Codec::new(registry, "persons").unwrap()
}

fn sample_events() -> Vec<PersonEvent> {
    let person_id = Uuid::new_v4();
    let at = Utc.with_ymd_and_hms(2026, 11, 23, 10, 30, 0).unwrap() + chrono::Duration::microseconds(123_456);
    let meta = || (Uuid::new_v4(), person_id, at, "corr-1".to_string());
    let address = Address {
        line1: "1 Ring Road".into(),
        line2: Some("Flat 3".into()),
        city: "Jovia".into(),
        postcode: "J1 4AB".into(),
        country: "GB".into(),
    };
    let (e1, p1, a1, c1) = meta();
    let (e2, p2, a2, c2) = meta();
    let (e3, p3, a3, c3) = meta();
    let (e4, p4, a4, c4) = meta();
    let (e5, p5, a5, c5) = meta();
    let (e6, p6, a6, c6) = meta();
    let (e7, p7, a7, c7) = meta();
    let (e8, p8, a8, c8) = meta();
    let (e9, p9, a9, c9) = meta();
    vec![
        PersonEvent::Registered(PersonRegistered {
            event_id: e1,
            person_id: p1,
            occurred_at: a1,
            correlation_id: c1,
            given_name: "Ada".into(),
            family_name: "Lovelace".into(),
            email: Some("ada@example.org".into()),
            phone: None,
            date_of_birth: Some(NaiveDate::from_ymd_opt(1815, 12, 10).unwrap()),
            address: Some(address.clone()),
            tags: vec!["vip".into(), "math".into()],
        }),
        PersonEvent::Renamed(PersonRenamed {
            event_id: e2,
            person_id: p2,
            occurred_at: a2,
            correlation_id: c2,
            given_name: "Augusta Ada".into(),
            family_name: "King".into(),
        }),
        PersonEvent::ContactChanged(ContactDetailsChanged {
            event_id: e3,
            person_id: p3,
            occurred_at: a3,
            correlation_id: c3,
            email: None,
            phone: Some("+44 20 7946 0000".into()),
        }),
        PersonEvent::AddressChanged(AddressChanged {
            event_id: e4,
            person_id: p4,
            occurred_at: a4,
            correlation_id: c4,
            address,
        }),
        PersonEvent::NoteAdded(NoteAdded {
            event_id: e5,
            person_id: p5,
            occurred_at: a5,
            correlation_id: c5,
            note_id: Uuid::new_v4(),
            text: "Wrote the first program — ünïcödé too.".into(),
        }),
        PersonEvent::Tagged(TagChanged {
            event_id: e6,
            person_id: p6,
            occurred_at: a6,
            correlation_id: c6,
            tag: "analyst".into(),
        }),
        PersonEvent::Untagged(TagChanged {
            event_id: e7,
            person_id: p7,
            occurred_at: a7,
            correlation_id: c7,
            tag: "vip".into(),
        }),
        PersonEvent::Archived(PersonArchived {
            event_id: e8,
            person_id: p8,
            occurred_at: a8,
            correlation_id: c8,
            reason: Some("moved away".into()),
        }),
        PersonEvent::Erased(PersonErased { event_id: e9, person_id: p9, occurred_at: a9, correlation_id: c9 }),
    ]
}

#[test]
fn every_schema_parses_and_names_its_kind() {
    for kind in EventKind::ALL {
        let schema = Schema::parse_str(kind.schema_text()).unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
        let Schema::Record(record) = schema else { panic!("{} is not a record", kind.name()) };
        assert_eq!(record.name.fullname(None), kind.full_name());
        for field in ["event_id", "person_id", "occurred_at", "correlation_id"] {
            assert!(record.lookup.contains_key(field), "{} lacks {field}", kind.name());
        }
    }
}

#[test]
fn every_event_round_trips_through_the_wire_format() {
    let dir = tempfile::tempdir().unwrap();
    let codec = codec(dir.path());
    let events = sample_events();
    let kinds: std::collections::BTreeSet<_> = events.iter().map(PersonEvent::kind).collect();
    assert_eq!(kinds.len(), EventKind::ALL.len(), "samples cover every kind");
    for event in events {
        let bytes = codec.encode(&event).unwrap();
        assert_eq!(bytes[0], 0, "magic byte");
        assert_eq!(schema_id(&bytes).unwrap(), codec.writer_id(event.kind()));
        let back = codec.decode(&bytes).unwrap();
        assert_eq!(back, event);
    }
}

#[test]
fn body_is_plain_avro_readable_with_the_schema_alone() {
    // A consumer that knows nothing of Callisto strips 5 bytes and reads Avro with the schema.
    let dir = tempfile::tempdir().unwrap();
    let codec = codec(dir.path());
    let event = &sample_events()[5];
    let bytes = codec.encode(event).unwrap();
    let value = apache_avro::from_avro_datum(EventKind::PersonTagged.schema(), &mut &bytes[5..], None).unwrap();
    let apache_avro::types::Value::Record(fields) = value else { panic!("not a record") };
    let tag = fields.iter().find(|(name, _)| name == "tag").unwrap();
    assert_eq!(tag.1, apache_avro::types::Value::String("analyst".into()));
}

#[test]
fn corrupt_payloads_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let codec = codec(dir.path());
    let good = codec.encode(&sample_events()[0]).unwrap();
    assert!(matches!(codec.decode(&good[..3]), Err(CodecError::TooShort(3))));
    let mut bad_magic = good.clone();
    bad_magic[0] = 7;
    assert!(matches!(codec.decode(&bad_magic), Err(CodecError::BadMagic(7))));
    let mut unknown_id = good.clone();
    unknown_id[1..5].copy_from_slice(&999u32.to_be_bytes());
    assert!(matches!(codec.decode(&unknown_id), Err(CodecError::Registry(_))));
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(codec.decode(&trailing), Err(CodecError::TrailingBytes(1))));
    // The last byte is the `sealed` union's branch index (null); apache-avro reads a union
    // index cut off at the very end as branch 0, so cuts stop one byte short of it.
    for cut in 5..good.len() - 1 {
        assert!(codec.decode(&good[..cut]).is_err(), "truncated at {cut} must fail");
    }
}

#[test]
fn embedded_registry_ids_are_stable_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let first: Vec<u32> = {
        let c = codec(dir.path());
        EventKind::ALL.iter().map(|k| c.writer_id(*k)).collect()
    };
    let distinct: std::collections::BTreeSet<_> = first.iter().collect();
    assert_eq!(distinct.len(), first.len(), "one id per schema");
    let second: Vec<u32> = {
        let c = codec(dir.path());
        EventKind::ALL.iter().map(|k| c.writer_id(*k)).collect()
    };
    assert_eq!(first, second);

    let registry = EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap();
    let versions = registry.versions(&EventKind::NoteAdded.subject("persons")).unwrap();
    assert_eq!(versions.len(), 1, "re-registering adds no version");
    let schema = registry.schema_by_id(versions[0].1).unwrap();
    assert_eq!(schema.canonical_form(), EventKind::NoteAdded.schema().canonical_form());
}

#[test]
fn registry_adds_a_version_when_a_subject_evolves() {
    let dir = tempfile::tempdir().unwrap();
    let registry = EmbeddedRegistry::open(&dir.path().join("r.redb")).unwrap();
    let v1 = EventKind::PersonArchived.schema();
    let v2 = Schema::parse_str(&EventKind::PersonArchived.schema_text().replace(
        r#"{"name": "reason", "type": ["null", "string"], "default": null}"#,
        r#"{"name": "reason", "type": ["null", "string"], "default": null},
    {"name": "archived_by", "type": ["null", "string"], "default": null}"#,
    ))
    .unwrap();
    let id1 = registry.register("persons-x", v1).unwrap();
    let id2 = registry.register("persons-x", &v2).unwrap();
    assert_ne!(id1, id2);
    assert_eq!(registry.versions("persons-x").unwrap(), vec![(1, id1), (2, id2)]);
    // A record written with v2 decodes with today's (v1) reader through resolution.
    assert!(check_full(v1, &v2).is_ok());
}

fn released_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/released")
}

/// The gate: `make test` fails here when a schema under `schemas/` stops being fully compatible
/// with a released copy under `schemas/released/`.
#[test]
fn current_schemas_are_compatible_with_every_released_version() {
    let current_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let checked = check_against_released(&released_root(), |kind| {
        let text =
            std::fs::read_to_string(current_dir.join(format!("{}.avsc", kind.name()))).map_err(|e| e.to_string())?;
        Schema::parse_str(&text).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|problems| panic!("incompatible schema changes:\n{}", problems.join("\n")));
    assert!(checked >= EventKind::ALL.len());
}

#[test]
fn the_evolution_check_rejects_a_new_required_field() {
    let incompatible = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/PersonTagged.incompatible.avsc"),
    )
    .unwrap();
    let result = check_against_released(&released_root(), |kind| {
        let text = if kind == EventKind::PersonTagged { incompatible.as_str() } else { kind.schema_text() };
        Schema::parse_str(text).map_err(|e| e.to_string())
    });
    let problems = result.expect_err("a required field without default must be rejected");
    let releases = callisto_avro::compat::released_versions(&released_root()).unwrap().len();
    assert_eq!(problems.len(), releases, "one problem per release holding PersonTagged: {problems:?}");
    assert!(problems.iter().all(|p| p.contains("PersonTagged")), "{problems:?}");
}

fn sealed_sample() -> SealedPersonalData {
    SealedPersonalData {
        key_id: "k-1".into(),
        algorithm: "AES-256-GCM".into(),
        nonce: vec![7; 12],
        ciphertext: vec![1, 2, 3, 250, 0, 9],
    }
}

#[test]
fn sealed_events_round_trip_with_their_personal_fields_blank() {
    let dir = tempfile::tempdir().unwrap();
    let codec = codec(dir.path());
    for mut event in sample_events() {
        let personal = event.take_personal();
        if !event.carries_personal_data() {
            assert_eq!(personal, PersonalData::default());
            assert!(
                codec.encode_sealed(&event, Some(&sealed_sample())).is_err(),
                "{:?} has nothing to seal",
                event.kind()
            );
            continue;
        }
        assert_ne!(personal, PersonalData::default(), "{:?} carries personal data", event.kind());
        let bytes = codec.encode_sealed(&event, Some(&sealed_sample())).unwrap();
        let (back, sealed) = codec.decode_sealed(&bytes).unwrap();
        assert_eq!(back, event);
        assert_eq!(sealed, Some(sealed_sample()));
        let mut restored = back.clone();
        restored.restore_personal(personal.clone());
        let mut again = restored.clone();
        assert_eq!(again.take_personal(), personal, "take and restore are inverses");
    }
}

#[test]
fn the_wire_body_is_what_apache_avro_writes_for_the_resolved_value() {
    // The codec serializes events straight into Avro binary; apache-avro's own path (a `Value`,
    // resolved into and validated against the schema) must give the very same bytes, sealed or
    // not, for every kind.
    let dir = tempfile::tempdir().unwrap();
    let codec = codec(dir.path());
    for event in sample_events() {
        let mut variants = vec![(event.clone(), None)];
        if event.carries_personal_data() {
            let mut blank = event.clone();
            blank.take_personal();
            variants.push((blank, Some(sealed_sample())));
        }
        for (event, sealed) in variants {
            let bytes = codec.encode_sealed(&event, sealed.as_ref()).unwrap();
            let value = Codec::to_value(&event, sealed.as_ref()).unwrap();
            let expected = apache_avro::to_avro_datum(event.kind().schema(), value).unwrap();
            assert_eq!(&bytes[5..], expected.as_slice(), "{:?}, sealed: {}", event.kind(), sealed.is_some());
        }
    }
}

#[test]
fn only_kinds_with_personal_fields_take_sealed_data() {
    let dir = tempfile::tempdir().unwrap();
    let codec = codec(dir.path());
    let sealed = sealed_sample();
    let mut refused = 0;
    for event in sample_events().into_iter().filter(|e| !e.carries_personal_data()) {
        assert!(codec.encode_sealed(&event, Some(&sealed)).is_err(), "{:?} was encoded sealed", event.kind());
        assert!(Codec::to_value(&event, Some(&sealed)).is_err(), "{:?} became a sealed value", event.kind());
        refused += 1;
    }
    assert!(refused > 0, "the samples hold kinds without personal fields");
}

#[test]
fn a_v1_consumer_reads_v2_sealed_events_and_v2_reads_v1_clear_events() {
    let dir = tempfile::tempdir().unwrap();
    let codec = codec(dir.path());
    let v1 = |kind: EventKind| {
        let path = released_root().join("v1").join(format!("{}.avsc", kind.name()));
        Schema::parse_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let mut event = sample_events().remove(0);
    let PersonEvent::Registered(clear) = event.clone() else { panic!("first sample registers") };
    event.take_personal();
    let bytes = codec.encode_sealed(&event, Some(&sealed_sample())).unwrap();
    // An old consumer resolves the v2 record with its v1 schema: the names are blank.
    let old = apache_avro::from_avro_datum(
        EventKind::PersonRegistered.schema(),
        &mut &bytes[5..],
        Some(&v1(EventKind::PersonRegistered)),
    )
    .unwrap();
    let old: PersonRegistered = apache_avro::from_value(&old).unwrap();
    assert_eq!(old.given_name, "");
    assert_eq!(old.tags, clear.tags, "clear fields stay readable");
    // A v1 record decodes with today's reader and has no seal.
    let v1_body = apache_avro::to_avro_datum(
        &v1(EventKind::PersonRegistered),
        apache_avro::to_value(&clear).unwrap().resolve(&v1(EventKind::PersonRegistered)).unwrap(),
    )
    .unwrap();
    let back = apache_avro::from_avro_datum(
        &v1(EventKind::PersonRegistered),
        &mut v1_body.as_slice(),
        Some(EventKind::PersonRegistered.schema()),
    )
    .unwrap();
    assert_eq!(apache_avro::from_value::<PersonRegistered>(&back).unwrap(), clear);
}

/// A record written with another schema of its kind (an older producer's) is resolved into
/// today's schema; one written with today's comes out as written. Either way the value is one
/// of today's schema, which `export --format avro` writes as it is.
#[test]
fn decoded_values_are_in_todays_schema_whichever_schema_wrote_them() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap());
    let codec = Codec::new(registry.clone(), "persons").unwrap();
    let kind = EventKind::PersonRegistered;
    let v1_path = released_root().join("v1").join(format!("{}.avsc", kind.name()));
    let v1 = Schema::parse_str(&std::fs::read_to_string(v1_path).unwrap()).unwrap();
    let v1_id = registry.register(&kind.subject("persons"), &v1).unwrap();
    assert_ne!(v1_id, codec.writer_id(kind), "v1 and today's schema are distinct versions");

    let PersonEvent::Registered(clear) = sample_events().remove(0) else { panic!("first sample registers") };
    let v1_body =
        apache_avro::to_avro_datum(&v1, apache_avro::to_value(&clear).unwrap().resolve(&v1).unwrap()).unwrap();
    let mut v1_record = vec![callisto_avro::codec::MAGIC_BYTE];
    v1_record.extend_from_slice(&v1_id.to_be_bytes());
    v1_record.extend_from_slice(&v1_body);
    let todays_record = codec.encode(&PersonEvent::Registered(clear.clone())).unwrap();

    for (written_with, record) in [("v1", v1_record), ("today's schema", todays_record)] {
        let (decoded_kind, value) = codec.decode_value(&record).unwrap();
        assert_eq!(decoded_kind, kind);
        let Schema::Record(todays) = kind.schema() else { panic!("events are records") };
        let apache_avro::types::Value::Record(fields) = &value else { panic!("decoded to a record") };
        let names: Vec<&str> = fields.iter().map(|(name, _)| name.as_str()).collect();
        let expected: Vec<&str> = todays.fields.iter().map(|field| field.name.as_str()).collect();
        assert_eq!(names, expected, "a record written with {written_with} decodes to today's fields");
        assert_eq!(codec.decode(&record).unwrap(), PersonEvent::Registered(clear.clone()));
    }
}

/// A datum reader decodes what `apache-avro` writes, datum after datum from one buffer, the
/// same as `from_avro_datum`, and a datum cut short is an error.
#[test]
fn a_datum_reader_decodes_as_apache_avro_does() {
    use apache_avro::types::Value;
    use callisto_avro::schemas::DatumReader;
    let schema = EventKind::PersonRegistered.schema();
    let reader = DatumReader::new(schema.clone()).unwrap();
    let values: Vec<Value> = sample_events()
        .iter()
        .filter(|event| event.kind() == EventKind::PersonRegistered)
        .map(|event| Codec::to_value(event, None).unwrap())
        .collect();
    assert!(!values.is_empty());
    let mut buffer = Vec::new();
    for value in &values {
        buffer.extend(apache_avro::to_avro_datum(schema, value.clone()).unwrap());
    }
    let mut body = buffer.as_slice();
    for value in &values {
        let mut alone = body;
        let expected = apache_avro::from_avro_datum(schema, &mut alone, None).unwrap();
        assert_eq!(&reader.read(&mut body).unwrap(), value);
        assert_eq!(&expected, value);
    }
    assert!(body.is_empty(), "{} bytes left", body.len());
    let one = apache_avro::to_avro_datum(schema, values[0].clone()).unwrap();
    let cut = &one[..one.len() / 2];
    assert!(apache_avro::from_avro_datum(schema, &mut &cut[..], None).is_err());
    assert!(reader.read(&mut &cut[..]).is_err());
}

/// Ids decode from every form they arrive in: a `uuid` string as today's schemas write it, a
/// plain string from a writer schema without the logical type, and text in JSON; text that is
/// not a UUID is an error, never a made-up id.
#[test]
fn ids_decode_from_each_form_they_arrive_in() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap());
    let codec = Codec::new(registry.clone(), "persons").unwrap();
    let kind = EventKind::NoteAdded;
    let note = sample_events().into_iter().find(|e| e.kind() == kind).unwrap();
    let PersonEvent::NoteAdded(added) = &note else { panic!("a note") };

    // The canonical form drops logical types: the ids are plain strings there.
    let plain = Schema::parse_str(&kind.schema().canonical_form()).unwrap();
    let plain_id = registry.register(&kind.subject("persons"), &plain).unwrap();
    let record = |value: apache_avro::types::Value| {
        let mut record = vec![callisto_avro::codec::MAGIC_BYTE];
        record.extend_from_slice(&plain_id.to_be_bytes());
        record.extend_from_slice(&apache_avro::to_avro_datum(&plain, value.resolve(&plain).unwrap()).unwrap());
        record
    };
    use apache_avro::types::Value;
    let Value::Record(mut fields) = apache_avro::to_value(added).unwrap() else { panic!("a record") };
    // The codec writes the sealed personal data beside the event's own fields; clear here.
    fields.push(("sealed".into(), Value::Union(0, Box::new(Value::Null))));
    assert_eq!(codec.decode(&record(Value::Record(fields.clone()))).unwrap(), note);
    assert_eq!(codec.decode(&codec.encode(&note).unwrap()).unwrap(), note);

    let person_id = fields.iter_mut().find(|(name, _)| name == "person_id").unwrap();
    person_id.1 = Value::String("0123456789abcdef".into());
    assert!(codec.decode(&record(Value::Record(fields))).is_err());

    let json = serde_json::to_string(added).unwrap();
    assert!(json.contains(&added.person_id.to_string()), "{json}");
    assert_eq!(&serde_json::from_str::<NoteAdded>(&json).unwrap(), added);
    let sixteen = json.replace(&added.person_id.to_string(), "0123456789abcdef");
    assert!(serde_json::from_str::<NoteAdded>(&sixteen).is_err());
}
