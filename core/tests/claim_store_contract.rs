//! The idempotency `ClaimStore` contract against the embedded store (always) and MongoDB (with
//! `MONGODB_URI`): one claimant wins among racing writers, only the holder completes, hands over
//! or releases a claim, completions survive a reopen, and purging drops only expired claims.

use std::sync::Arc;
use std::time::Duration;

use callisto_core::log::idempotency::embedded::EmbeddedClaimStore;
use callisto_core::log::idempotency::mongo::MongoClaimStore;
use callisto_core::log::idempotency::{Claim, ClaimStore};
use callisto_core::readmodel::mongo::{MongoOptions, connect_database};

mod contract;

fn claim(owner: &str, claimed_at_ms: i64) -> Claim {
    Claim {
        fingerprint: [7; 32],
        event_id: format!("event-of-{owner}"),
        partition: 3,
        claimed_at_ms,
        owner: owner.into(),
        appended: None,
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `open` opens the same storage again each time it is called (a writer restart).
async fn claim_store_contract<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn ClaimStore>>,
{
    let store = open().await;
    let key = format!("caller\npersons\n{}", uuid::Uuid::new_v4());

    // Racing claimants: exactly one inserts, every other one is shown the winner's claim.
    let racers = (0..8).map(|i| {
        let (store, key) = (store.clone(), key.clone());
        async move { (i, store.claim(&key, &claim(&format!("w{i}"), now_ms())).await.unwrap()) }
    });
    let outcomes = futures::future::join_all(racers).await;
    let winners: Vec<usize> = outcomes.iter().filter(|(_, seen)| seen.is_none()).map(|(i, _)| *i).collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let winner = format!("w{}", winners[0]);
    for (_, seen) in &outcomes {
        if let Some(seen) = seen {
            assert_eq!(seen.owner, winner);
            assert_eq!(seen.appended, None);
        }
    }

    // Only the holder completes it.
    let mut done = claim(&winner, now_ms());
    done.appended = Some((41, 1_700_000_000_123));
    assert!(!store.replace(&key, "w-nobody", &done).await.unwrap());
    assert!(store.replace(&key, &winner, &done).await.unwrap());
    let store = open().await;
    let seen = store.claim(&key, &claim("late", now_ms())).await.unwrap().expect("the completed claim is there");
    assert_eq!(seen.appended, Some((41, 1_700_000_000_123)));
    assert_eq!((seen.fingerprint, seen.partition, seen.event_id.as_str()), ([7; 32], 3, done.event_id.as_str()));

    // A takeover changes the holder: the old one can no longer release it.
    assert!(store.replace(&key, &winner, &claim("heir", now_ms())).await.unwrap());
    store.release(&key, &winner).await.unwrap();
    assert_eq!(store.claim(&key, &claim("late", now_ms())).await.unwrap().unwrap().owner, "heir");
    store.release(&key, "heir").await.unwrap();
    assert_eq!(store.claim(&key, &claim("next", now_ms())).await.unwrap(), None, "released: free to claim");

    // Purge drops claims made before the cut, and only those.
    let old = format!("{key}-old");
    assert_eq!(store.claim(&old, &claim("old", now_ms() - 3_600_000)).await.unwrap(), None);
    let purged = store.purge(now_ms() - 60_000).await.unwrap();
    assert!(purged >= 1, "{purged}");
    assert_eq!(store.claim(&old, &claim("fresh", now_ms())).await.unwrap(), None, "the expired claim was purged");
    assert_eq!(
        store.claim(&key, &claim("late", now_ms())).await.unwrap().unwrap().owner,
        "next",
        "a live claim was purged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_claim_store_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idempotency.redb");
    // redb holds the file for one process: a "reopen" shares the open store, as a restart of the
    // writer would reopen the same file.
    let store: Arc<dyn ClaimStore> = Arc::new(EmbeddedClaimStore::open(&path).unwrap());
    claim_store_contract(|| {
        let store = store.clone();
        async move { store }
    })
    .await;
    // Completions are on disk: a writer restarted on the file still replays them.
    let mut done = claim("before-restart", now_ms());
    assert_eq!(store.claim("kept", &done).await.unwrap(), None);
    done.appended = Some((9, 99));
    assert!(store.replace("kept", "before-restart", &done).await.unwrap());
    drop(store);
    let reopened = EmbeddedClaimStore::open(&path).unwrap();
    assert_eq!(reopened.claim("kept", &claim("after-restart", now_ms())).await.unwrap(), Some(done));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mongodb_claim_store_meets_the_contract() {
    let Some(uri) = contract::server_url("MONGODB_URI") else { return };
    let options = MongoOptions::new(uri, contract::unique("callisto-claims"));
    claim_store_contract(|| {
        let options = options.clone();
        async move {
            let db = connect_database(&options).await.unwrap();
            Arc::new(MongoClaimStore::open(&db, Duration::from_secs(3600)).await.unwrap()) as Arc<dyn ClaimStore>
        }
    })
    .await;
}
