//! What the MongoDB adapter sends and how it reads answers, without a server: the unordered
//! bulk commands with their version guard and write concern, listing filters, and answers
//! shaped as MongoDB documents them (upserts, E11000 duplicates, write-concern errors).

use callisto_core::readmodel::mongo::{self, bulk, list_filter};
use callisto_core::readmodel::{ListFilter, PersonDoc, Status, StoreError, TimelineEntry, Version};
use mongodb::bson::{Bson, doc};
use uuid::Uuid;

fn person(offset: u64) -> PersonDoc {
    PersonDoc {
        person_id: Uuid::parse_str("0b0eee91-a052-473c-b3b0-90643805ef37").unwrap(),
        given_name: "Ada".into(),
        family_name: "Lovelace".into(),
        email: None,
        phone: None,
        date_of_birth: None,
        address: None,
        tags: vec!["math".into()],
        status: Status::Active,
        archive_reason: None,
        note_count: 2,
        created_at: "2026-11-23T08:00:00Z".parse().unwrap(),
        updated_at: "2026-11-23T09:00:00Z".parse().unwrap(),
        version: Version { partition: 3, offset },
    }
}

#[test]
fn person_writes_are_unordered_upserts_guarded_by_version() {
    let wc = bulk::write_concern("majority", std::time::Duration::from_secs(10));
    assert_eq!(wc, doc! { "w": "majority", "wtimeout": 10_000_i64 });
    assert_eq!(bulk::write_concern("2", std::time::Duration::from_secs(1)), doc! { "w": 2, "wtimeout": 1_000_i64 });
    let command = bulk::upsert_persons(mongo::PERSONS, &[person(14)], &wc).unwrap();
    assert_eq!(command.get_str("update").unwrap(), "persons");
    // A rebuilt generation writes to collections of its own; generation 0 keeps the plain names.
    let rebuilt = bulk::upsert_persons(&mongo::collection_name(mongo::PERSONS, 2), &[person(14)], &wc).unwrap();
    assert_eq!(rebuilt.get_str("update").unwrap(), "persons_g2");
    assert_eq!(mongo::collection_name(mongo::PERSONS, 0), "persons");
    assert!(!command.get_bool("ordered").unwrap());
    assert_eq!(command.get_document("writeConcern").unwrap(), &wc);
    let update = command.get_array("updates").unwrap()[0].as_document().unwrap();
    assert_eq!(
        update.get_document("q").unwrap(),
        &doc! { "_id": "0b0eee91-a052-473c-b3b0-90643805ef37", "version.offset": { "$lt": 14_i64 } }
    );
    assert!(update.get_bool("upsert").unwrap());
    let replacement = update.get_document("u").unwrap();
    assert_eq!(replacement.get_str("_id").unwrap(), "0b0eee91-a052-473c-b3b0-90643805ef37");
    assert_eq!(replacement.get_str("person_id").unwrap(), "0b0eee91-a052-473c-b3b0-90643805ef37", "uuids as strings");
    assert_eq!(replacement.get_str("status").unwrap(), "active");
    assert_eq!(replacement.get_document("version").unwrap(), &doc! { "partition": 3_i64, "offset": 14_i64 });
    assert!(!replacement.keys().any(|k| k.starts_with('$')), "a replacement, not an update operator");
    // What is stored reads back as the same document.
    let stored: PersonDoc = bulk::from_bson_document(replacement.clone()).unwrap();
    assert_eq!(stored, person(14));
}

#[test]
fn timeline_and_checkpoint_commands() {
    let wc = bulk::write_concern("majority", std::time::Duration::from_secs(10));
    let entry = TimelineEntry {
        person_id: person(0).person_id,
        partition: 3,
        offset: 11,
        event_id: Uuid::new_v4(),
        event_type: "NoteAdded".into(),
        occurred_at: "2026-11-23T09:00:00Z".parse().unwrap(),
        correlation_id: "c".into(),
        principal: Some("api_key-1".into()),
        data: serde_json::json!({"text": "engine"}),
        erased: false,
    };
    let insert = bulk::insert_timeline(mongo::TIMELINE, &[entry], &wc).unwrap();
    assert_eq!(insert.get_str("insert").unwrap(), "timeline");
    assert!(!insert.get_bool("ordered").unwrap());
    let stored = insert.get_array("documents").unwrap()[0].as_document().unwrap();
    assert_eq!(stored.get_str("_id").unwrap(), "3:11", "one entry per log position");
    assert_eq!(stored.get_i64("offset").unwrap(), 11);

    let checkpoint = bulk::advance_checkpoint(mongo::CHECKPOINTS, "documents", 3, 11, &wc);
    let update = checkpoint.get_array("updates").unwrap()[0].as_document().unwrap();
    assert_eq!(update.get_document("q").unwrap(), &doc! { "_id": "documents:3", "offset": { "$lt": 11_i64 } });
    assert_eq!(
        update.get_document("u").unwrap(),
        &doc! { "$set": { "projection": "documents", "partition": 3_i64, "offset": 11_i64 } }
    );
}

#[test]
fn answers_are_read_as_documented() {
    // An upsert that inserted (update command reference).
    let upserted = doc! { "ok": 1, "nModified": 0, "n": 1, "upserted": [ { "index": 0, "_id": "p1" } ] };
    assert_eq!(bulk::outcome(&upserted).unwrap(), bulk::Outcome { written: 1, already_applied: 0 });

    // The stored document is newer: the guard's filter misses and the upsert collides (E11000).
    let duplicate = doc! {
        "n": 1,
        "writeErrors": [ { "index": 1, "code": 11000,
            "errmsg": "E11000 duplicate key error collection: callisto.persons index: _id_ dup key: { _id: \"p2\" }" } ],
        "ok": 1,
    };
    assert_eq!(bulk::outcome(&duplicate).unwrap(), bulk::Outcome { written: 1, already_applied: 1 });

    // Written, but not known to be durable: retry the batch.
    let write_concern = doc! {
        "n": 1, "nModified": 1,
        "writeConcernError": { "code": 64, "codeName": "WriteConcernFailed", "errmsg": "waiting for replication timed out",
                               "errInfo": { "wtimeout": true } },
        "ok": 1,
    };
    assert!(
        matches!(bulk::outcome(&write_concern), Err(StoreError::Unavailable(m)) if m.contains("replication timed out"))
    );

    // A document MongoDB will never take: the projector isolates and dead-letters it.
    let too_large = doc! { "n": 0, "writeErrors": [ { "index": 0, "code": 10334, "errmsg": "BSONObj size: 17000000 is invalid" } ], "ok": 1 };
    assert!(matches!(bulk::outcome(&too_large), Err(StoreError::Rejected(_))));

    // Anything else is an outage to retry.
    let interrupted = doc! { "n": 0, "writeErrors": [ { "index": 0, "code": 11602, "errmsg": "operation was interrupted" } ], "ok": 1 };
    assert!(matches!(bulk::outcome(&interrupted), Err(StoreError::Unavailable(_))));
    assert_eq!(bulk::outcome(&doc! { "n": Bson::Int64(3), "ok": 1.0 }).unwrap().written, 3);
}

#[test]
fn listing_filters_use_the_indexed_fields_and_the_id_cursor() {
    // Erased persons' markers are never listed.
    assert_eq!(list_filter(&ListFilter::default(), None), doc! { "status": { "$ne": "erased" } });
    let cursor = Uuid::parse_str("0b0eee91-a052-473c-b3b0-90643805ef37").unwrap();
    let filter = ListFilter { tag: Some("vip".into()), status: Some(Status::Archived) };
    assert_eq!(
        list_filter(&filter, Some(cursor)),
        doc! { "tags": "vip", "status": "archived", "_id": { "$gt": "0b0eee91-a052-473c-b3b0-90643805ef37" } }
    );
}

#[test]
fn erasing_scrubs_every_timeline_entry_of_the_persons() {
    let wc = bulk::write_concern("majority", std::time::Duration::from_secs(10));
    let ids = vec!["0b0eee91-a052-473c-b3b0-90643805ef37".to_owned()];
    let command = bulk::scrub_timelines(mongo::TIMELINE, &ids, &wc);
    assert_eq!(command.get_str("update").unwrap(), "timeline");
    let update = command.get_array("updates").unwrap()[0].as_document().unwrap();
    assert_eq!(
        update.get_document("q").unwrap(),
        &doc! { "person_id": { "$in": ["0b0eee91-a052-473c-b3b0-90643805ef37"] }, "erased": { "$ne": true } }
    );
    assert_eq!(update.get_document("u").unwrap(), &doc! { "$set": { "data": {}, "erased": true } });
    assert!(update.get_bool("multi").unwrap(), "every entry, not the first");
    assert_eq!(command.get_document("writeConcern").unwrap(), &wc);
}
