//! The one conformance suite every [`LeaseStore`] backend runs (feature `conformance`).
//!
//! Each check takes a fresh, empty store and panics with a message on the first violation of the
//! contract in [`crate::store`]. Backends call them from their own tests (with whatever runtime
//! they need); [`run_all`] runs every check that needs only one store, and [`persistence`] takes a
//! function that reopens the same store.

// A test suite: it reports contract violations by panicking, like any assertion.
#![allow(clippy::panic)]

use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;

use crate::engine::{Attachment, Engine};
use crate::manifest::pool_set;
use crate::select::{SelectionInput, ANNO_IPPOOL};
use crate::store::{Conflict, Filter, Lease, LeaseStore, Outcome, Owner, Release, Txn};
use crate::PoolSet;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("test address {s}"))
}

/// A lease for tests.
pub fn lease(addr: &str, pool: &str, container: &str, ifname: &str, node: &str) -> Lease {
    Lease {
        ip: ip(addr),
        pool: pool.into(),
        owner: Owner {
            pod_namespace: "ns".into(),
            pod_name: format!("pod-{container}"),
            pod_uid: format!("uid-{container}"),
            container_id: container.into(),
            ifname: ifname.into(),
            node: node.into(),
            created: 1_700_000_000,
        },
        clean_gateway: false,
        revision: 0,
    }
}

async fn commit<S: LeaseStore>(s: &S, claims: Vec<Lease>, releases: Vec<Release>) -> Outcome {
    s.commit(Txn { claims, releases })
        .await
        .unwrap_or_else(|e| panic!("{}: commit failed: {e}", s.backend()))
}

async fn all<S: LeaseStore>(s: &S, f: Filter<'_>) -> Vec<Lease> {
    let mut v = s
        .list(f)
        .await
        .unwrap_or_else(|e| panic!("{}: list failed: {e}", s.backend()))
        .leases;
    v.sort_by_key(|l| l.ip);
    v
}

fn strip(mut v: Vec<Lease>) -> Vec<Lease> {
    for l in &mut v {
        l.revision = 0;
    }
    v
}

/// Claims are create-if-absent on the address and on the attachment slot; re-claiming for the
/// same attachment is a no-op; a conflicting transaction applies nothing.
pub async fn claim_semantics<S: LeaseStore>(s: &S) {
    let b = s.backend();
    let a = lease("10.0.0.1", "p", "c1", "eth0", "n1");
    let out = commit(s, vec![a.clone()], vec![]).await;
    let rev1 = match out {
        Outcome::Committed { revision, .. } => revision,
        other => panic!("{b}: first claim refused: {other:?}"),
    };
    let stored = all(s, Filter::All).await;
    assert_eq!(strip(stored.clone()), vec![a.clone()], "{b}: stored record");
    assert!(stored[0].revision > 0, "{b}: record has a revision");

    // Same address, other attachment: refused, and the refusal names the holder.
    let b2 = lease("10.0.0.1", "p", "c2", "eth0", "n2");
    let other = lease("10.0.0.2", "p", "c2", "net1", "n2");
    match commit(s, vec![other.clone(), b2], vec![]).await {
        Outcome::Conflict(c) => {
            assert_eq!(c.len(), 1, "{b}: one conflict");
            match &c[0] {
                Conflict::IpTaken(holder) => {
                    assert_eq!(
                        holder.owner.container_id, "c1",
                        "{b}: conflict names holder"
                    )
                }
                x => panic!("{b}: wrong conflict {x:?}"),
            }
        }
        x => panic!("{b}: duplicate claim accepted: {x:?}"),
    }
    assert_eq!(
        all(s, Filter::All).await.len(),
        1,
        "{b}: refused transaction applied nothing (10.0.0.2 must not exist)"
    );

    // Same attachment slot, another address: refused.
    let again = lease("10.0.0.3", "p", "c1", "eth0", "n1");
    match commit(s, vec![again], vec![]).await {
        Outcome::Conflict(c) => assert!(
            matches!(&c[0], Conflict::AttachmentBound(l) if l.ip == ip("10.0.0.1")),
            "{b}: {c:?}"
        ),
        x => panic!("{b}: second address for one attachment accepted: {x:?}"),
    }

    // Same address, same attachment: idempotent no-op.
    match commit(s, vec![a.clone()], vec![]).await {
        Outcome::Committed { revision, .. } => {
            assert!(revision >= rev1, "{b}: revision went back")
        }
        x => panic!("{b}: idempotent re-claim refused: {x:?}"),
    }
    assert_eq!(all(s, Filter::All).await.len(), 1, "{b}: still one record");

    // The other family of the same attachment is a different slot.
    let v6 = lease("fd00::1", "p6", "c1", "eth0", "n1");
    assert!(
        matches!(commit(s, vec![v6], vec![]).await, Outcome::Committed { .. }),
        "{b}: IPv6 slot of the same NIC"
    );
}

/// Releases delete only what the named attachment holds, are idempotent and never abort.
pub async fn release_semantics<S: LeaseStore>(s: &S) {
    let b = s.backend();
    let a = lease("10.0.1.1", "p", "c1", "eth0", "n1");
    let c = lease("10.0.1.2", "p", "c2", "eth0", "n1");
    commit(s, vec![a.clone(), c.clone()], vec![]).await;
    // Wrong owner: nothing removed, not an error.
    let wrong = Release {
        ip: a.ip,
        container_id: "old-sandbox".into(),
        ifname: "eth0".into(),
    };
    match commit(s, vec![], vec![wrong]).await {
        Outcome::Committed { released, .. } => {
            assert!(released.is_empty(), "{b}: released another's record")
        }
        x => panic!("{b}: release by non-owner aborted: {x:?}"),
    }
    assert_eq!(all(s, Filter::All).await.len(), 2, "{b}: nothing removed");
    // Right owner, plus an absent address: one removed.
    let rel = vec![
        Release::from(&a),
        Release::from(&lease("10.0.1.9", "p", "c9", "eth0", "n1")),
    ];
    match commit(s, vec![], rel.clone()).await {
        Outcome::Committed { released, .. } => {
            assert_eq!(strip(released), vec![a.clone()], "{b}: released exactly a")
        }
        x => panic!("{b}: release refused: {x:?}"),
    }
    // Again: no-op.
    match commit(s, vec![], rel).await {
        Outcome::Committed { released, .. } => assert!(released.is_empty(), "{b}: twice"),
        x => panic!("{b}: repeated release refused: {x:?}"),
    }
    assert_eq!(strip(all(s, Filter::All).await), vec![c], "{b}: c remains");
    // The freed address and slot can be claimed again by someone else.
    let reuse = lease("10.0.1.1", "p", "c3", "eth0", "n2");
    assert!(matches!(
        commit(s, vec![reuse], vec![]).await,
        Outcome::Committed { .. }
    ));
}

/// Filters return exactly the matching records; revisions grow with writes.
pub async fn listing<S: LeaseStore>(s: &S) {
    let b = s.backend();
    let recs = vec![
        lease("10.0.2.1", "pa", "c1", "eth0", "n1"),
        lease("10.0.2.2", "pa", "c2", "eth0", "n2"),
        lease("10.0.3.1", "pb", "c1", "net1", "n1"),
        lease("fd00::2:1", "p6", "c3", "eth0", "n2"),
    ];
    let before = s.list(Filter::All).await.map(|l| l.revision).unwrap_or(0);
    commit(s, recs.clone(), vec![]).await;
    let after = s
        .list(Filter::All)
        .await
        .unwrap_or_else(|e| panic!("{b}: {e}"))
        .revision;
    assert!(after > before, "{b}: revision {before} -> {after}");
    let ips = |v: Vec<Lease>| v.into_iter().map(|l| l.ip.to_string()).collect::<Vec<_>>();
    assert_eq!(
        ips(all(s, Filter::Pool("pa")).await),
        ["10.0.2.1", "10.0.2.2"],
        "{b}"
    );
    assert_eq!(
        ips(all(s, Filter::Container("c1")).await),
        ["10.0.2.1", "10.0.3.1"],
        "{b}"
    );
    assert_eq!(
        ips(all(s, Filter::Node("n2")).await),
        ["10.0.2.2", "fd00::2:1"],
        "{b}"
    );
    assert_eq!(all(s, Filter::All).await.len(), 4, "{b}");
    assert!(all(s, Filter::Container("nope")).await.is_empty(), "{b}");
}

const POOL: &str = r#"
kind: SpiderIPPool
metadata: {name: small}
spec: {subnet: 10.9.0.0/16, ips: [10.9.0.1-10.9.0.20]}
"#;

fn small_pool() -> PoolSet {
    pool_set(POOL).unwrap_or_else(|e| panic!("{e:?}"))
}

/// Through the engine: idempotent allocate and release, GC frees exactly the unlisted.
pub async fn engine_idempotency_and_gc<S: LeaseStore>(s: S) {
    let b = s.backend();
    let pools = small_pool();
    let engine = Engine::new(s, "node-a");
    let annos = [(ANNO_IPPOOL.to_string(), r#"{"ipv4":["small"]}"#.to_string())].into();
    let input = SelectionInput {
        pod_namespace: "ns",
        pod_name: "p",
        pod_annotations: Some(&annos),
        node_name: "node-a",
        ..Default::default()
    };
    let mut got = Vec::new();
    for i in 0..5 {
        let att = Attachment {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        };
        let a = engine
            .allocate(&pools, &input, &att, "u", 0)
            .await
            .unwrap_or_else(|e| panic!("{b}: allocate: {e}"));
        let again = engine
            .allocate(&pools, &input, &att, "u", 0)
            .await
            .unwrap_or_else(|e| panic!("{b}: re-allocate: {e}"));
        assert_eq!(a, again, "{b}: repeated ADD returns the same");
        got.push(a);
    }
    let freed = engine
        .release("c0", Some("eth0"))
        .await
        .unwrap_or_else(|e| panic!("{b}: {e}"));
    assert_eq!(freed.len(), 1, "{b}");
    let freed = engine
        .release("c0", Some("eth0"))
        .await
        .unwrap_or_else(|e| panic!("{b}: {e}"));
    assert!(freed.is_empty(), "{b}: second DEL frees nothing");
    let valid: Vec<Attachment> = ["c1", "c3"]
        .iter()
        .map(|c| Attachment {
            container_id: c.to_string(),
            ifname: "eth0".into(),
        })
        .collect();
    let freed: BTreeSet<String> = engine
        .gc(&valid)
        .await
        .unwrap_or_else(|e| panic!("{b}: gc: {e}"))
        .into_iter()
        .map(|l| l.owner.container_id)
        .collect();
    assert_eq!(
        freed,
        ["c2", "c4"].iter().map(|s| s.to_string()).collect(),
        "{b}: GC frees exactly the unlisted"
    );
    let left: BTreeSet<String> = all(engine.store(), Filter::All)
        .await
        .into_iter()
        .map(|l| l.owner.container_id)
        .collect();
    assert_eq!(
        left,
        ["c1", "c3"].iter().map(|s| s.to_string()).collect(),
        "{b}"
    );
}

/// Many concurrent allocations by several engines (nodes) over one store and one 20-address
/// pool: exactly 20 succeed, all distinct; the rest fail cleanly as exhausted.
pub async fn no_duplicates_under_concurrency<S: LeaseStore + Clone>(s: S) {
    let b = s.backend();
    let pools = small_pool();
    let engines: Vec<Engine<S>> = (0..4)
        .map(|i| Engine::new(s.clone(), format!("node-{i}")))
        .collect();
    let annos = [(ANNO_IPPOOL.to_string(), r#"{"ipv4":["small"]}"#.to_string())].into();
    let futs = (0..32).map(|i| {
        let e = &engines[i % engines.len()];
        let pools = &pools;
        let annos = &annos;
        async move {
            let input = SelectionInput {
                pod_namespace: "ns",
                pod_name: "p",
                pod_annotations: Some(annos),
                node_name: "n",
                ..Default::default()
            };
            let att = Attachment {
                container_id: format!("c{i}"),
                ifname: "eth0".into(),
            };
            e.allocate(pools, &input, &att, "u", 0).await
        }
    });
    let results = futures::future::join_all(futs).await;
    let mut ips = BTreeSet::new();
    let mut ok = 0;
    for r in &results {
        match r {
            Ok(a) => {
                ok += 1;
                let addr = a.nics[0].ipv4.as_ref().map(|x| x.address.addr());
                assert!(ips.insert(addr), "{b}: {addr:?} handed out twice");
            }
            Err(e) => assert!(
                e.to_string().contains("exhausted (20/20 allocated)"),
                "{b}: unexpected failure: {e}"
            ),
        }
    }
    assert_eq!(ok, 20, "{b}: every address used exactly once");
    assert_eq!(all(&s, Filter::All).await.len(), 20, "{b}: records");
}

/// Every check that needs one fresh store each. `make` returns a new, empty store.
pub async fn run_all<S, F, Fut>(make: F)
where
    S: LeaseStore + Clone,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    claim_semantics(&make().await).await;
    release_semantics(&make().await).await;
    listing(&make().await).await;
    engine_idempotency_and_gc(make().await).await;
    no_duplicates_under_concurrency(make().await).await;
}

/// Records survive closing and reopening the store. `open` opens the same store each time (the
/// previous handle is dropped before the next open).
pub async fn persistence<S, F, Fut>(open: F)
where
    S: LeaseStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let recs = vec![
        lease("10.0.5.1", "p", "c1", "eth0", "n1"),
        lease("fd00::5:1", "p6", "c1", "eth0", "n1"),
        lease("10.0.5.2", "p", "c2", "eth0", "n1"),
    ];
    let (b, rev) = {
        let s = open().await;
        commit(&s, recs.clone(), vec![]).await;
        commit(&s, vec![], vec![Release::from(&recs[2])]).await;
        let rev = s.list(Filter::All).await.map(|l| l.revision).unwrap_or(0);
        (s.backend(), rev)
    };
    let s = open().await;
    let got = all(&s, Filter::All).await;
    assert_eq!(strip(got), recs[..2].to_vec(), "{b}: records after reopen");
    let rev2 = s.list(Filter::All).await.map(|l| l.revision).unwrap_or(0);
    assert!(
        rev2 >= rev,
        "{b}: revision went back after reopen ({rev} -> {rev2})"
    );
    // The attachment index survived too: the slot is still bound.
    match commit(&s, vec![lease("10.0.5.9", "p", "c1", "eth0", "n1")], vec![]).await {
        Outcome::Conflict(_) => {}
        x => panic!("{b}: attachment index lost on reopen: {x:?}"),
    }
    assert_eq!(all(&s, Filter::Container("c1")).await.len(), 2, "{b}");
}
