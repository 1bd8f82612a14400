//! The embedded store on a disk that really fills up (a small tmpfs, needs root): a failed commit
//! is a retryable error that loses nothing, and the store recovers in the same process once space
//! is back (redb refuses writes after a failed commit until the file is reopened).

use spiderpool_core::conformance::lease;
use spiderpool_core::store::{Filter, LeaseStore, Outcome, Txn};
use spiderpool_store::embedded::EmbeddedStore;
use spiderpool_store::testing::SmallDisk;

/// Every address the store holds, sorted.
async fn addresses(store: &EmbeddedStore) -> Vec<std::net::IpAddr> {
    store
        .list(Filter::All)
        .await
        .expect("list")
        .leases
        .into_iter()
        .map(|l| l.ip)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_recovers_from_a_full_disk_without_restart() {
    let Some(disk) = SmallDisk::mount(8 << 20) else {
        return;
    };
    // Ballast that takes most of the disk; deleting it gives the space back.
    let ballast = disk.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; 5 << 20]).expect("ballast");
    let path = disk.path().join("leases.redb");
    let store = EmbeddedStore::open(&path).expect("open");
    let long = "x".repeat(2000);
    let mut acknowledged = Vec::new();
    let mut failure = None;
    for i in 0..20_000u32 {
        let mut l = lease(
            &std::net::Ipv4Addr::from(0x0a60_0000 + i).to_string(),
            "p",
            &format!("c{i}"),
            "eth0",
            "n1",
        );
        l.owner.pod_name = format!("{long}-{i}");
        match store
            .commit(Txn {
                claims: vec![l.clone()],
                releases: vec![],
            })
            .await
        {
            Ok(Outcome::Committed { .. }) => acknowledged.push(l.ip),
            Ok(x) => panic!("unexpected outcome {x:?}"),
            Err(e) => {
                failure = Some((e, l));
                break;
            }
        }
    }
    let (err, refused) = failure.expect("the disk never filled up");
    assert!(
        err.is_retryable(),
        "a full disk must be a retryable error (CNI code 11): {err}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "the error names the file: {err}"
    );
    assert!(
        acknowledged.len() > 10,
        "filled after {} records",
        acknowledged.len()
    );
    // Nothing acknowledged is lost and the refused record is not there.
    let held = addresses(&store).await;
    assert_eq!(held, acknowledged, "state after the failed commit");
    // Still full: still a retryable error, not a wedged store.
    let again = store
        .commit(Txn {
            claims: vec![refused.clone()],
            releases: vec![],
        })
        .await;
    assert!(
        matches!(&again, Err(e) if e.is_retryable()),
        "while the disk is full: {again:?}"
    );
    // Space comes back: the same store (same process) commits again.
    std::fs::remove_file(&ballast).expect("free space");
    let out = store
        .commit(Txn {
            claims: vec![refused.clone()],
            releases: vec![],
        })
        .await
        .expect("commit after space is back");
    assert!(matches!(out, Outcome::Committed { .. }), "{out:?}");
    acknowledged.push(refused.ip);
    // And it is durable: a reopen reads every acknowledged record.
    drop(store);
    let reopened = EmbeddedStore::open(&path).expect("reopen");
    let held = addresses(&reopened).await;
    assert_eq!(held, acknowledged, "after reopen");
}
