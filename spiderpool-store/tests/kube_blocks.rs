//! Node-affine blocks against the real API server (envtest's kube-apiserver and etcd): the
//! conformance suite with owners, two agents claiming one free block at once, borrowing, an
//! empty block given back, the blocks of a gone node, and blocks without owners (migrated).
#![cfg(all(feature = "kube", feature = "testing"))]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use spiderpool_core::conformance::{self, lease};
use spiderpool_core::engine::{Attachment, Engine};
use spiderpool_core::manifest::pool_set;
use spiderpool_core::select::SelectionInput;
use spiderpool_core::store::{Filter, LeaseStore, Outcome, Release, Txn};
use spiderpool_store::k8s::crd::{crds_yaml, SpiderIPBlock};
use spiderpool_store::k8s::{KubeStore, KubeStoreOptions};
use spiderpool_store::testing::KubeServer;

fn server() -> Option<KubeServer> {
    let s = KubeServer::start()?;
    s.install_crds(&crds_yaml()).expect("CRDs");
    Some(s)
}

async fn client(s: &KubeServer) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(s.kubeconfig()).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    kube::Client::try_from(cfg).expect("client")
}

fn opts(s: &KubeServer, node: Option<&str>, return_after: Duration) -> KubeStoreOptions {
    KubeStoreOptions {
        server: s.url(),
        status_interval: None,
        node: node.map(str::to_string),
        return_after,
        ..Default::default()
    }
}

async fn store(s: &KubeServer, node: Option<&str>) -> KubeStore {
    KubeStore::connect(client(s).await, opts(s, node, Duration::from_secs(3600)))
        .await
        .expect("connect")
}

fn clear(s: &KubeServer) {
    let (ok, _, err) = s.kubectl(&["delete", "spideripblocks", "--all", "--wait=true"], "");
    assert!(ok, "{err}");
}

/// Every block as the server has it: name -> (owner, addresses).
async fn blocks(s: &KubeServer) -> BTreeMap<String, (Option<String>, Vec<String>)> {
    let api: kube::Api<SpiderIPBlock> = kube::Api::all(client(s).await);
    let list = api.list(&Default::default()).await.expect("list blocks");
    list.items
        .into_iter()
        .map(|b| {
            let name = b.metadata.name.clone().unwrap_or_default();
            (
                name,
                (b.spec.owner, b.spec.allocations.into_keys().collect()),
            )
        })
        .collect()
}

async fn claim(st: &KubeStore, ip: &str, container: &str, node: &str) -> Outcome {
    st.commit(Txn {
        claims: vec![lease(ip, "p", container, "eth0", node)],
        releases: vec![],
    })
    .await
    .expect("commit")
}

async fn release(st: &KubeStore, ip: &str, container: &str, node: &str) {
    let l = lease(ip, "p", container, "eth0", node);
    let out = st
        .commit(Txn {
            claims: vec![],
            releases: vec![Release::from(&l)],
        })
        .await
        .expect("release");
    assert!(matches!(out, Outcome::Committed { .. }), "{out:?}");
}

/// Waits until `f` holds of the store (its watch catches up), or fails.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_store_with_owned_blocks_conforms() {
    let Some(s) = server() else { return };
    conformance::run_all(|| async {
        clear(&s);
        store(&s, Some("node-a")).await
    })
    .await;
}

/// Two agents write into the same free blocks at the same moment: every block gets exactly one
/// owner, both records land (the loser borrows), and one address is still won once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_claiming_one_free_block_at_once() {
    let Some(s) = server() else { return };
    clear(&s);
    let (a, b) = (store(&s, Some("a")).await, store(&s, Some("b")).await);
    let mut tasks = Vec::new();
    for blk in 0..8u32 {
        let base = blk * 16;
        for (st, node, off) in [(a.clone(), "a", 1), (b.clone(), "b", 2)] {
            tasks.push(tokio::spawn(async move {
                let ip = format!("10.40.0.{}", base + off);
                claim(&st, &ip, &format!("{node}{blk}"), node).await
            }));
        }
        // And both want one address of the block.
        for (st, node) in [(a.clone(), "a"), (b.clone(), "b")] {
            tasks.push(tokio::spawn(async move {
                let ip = format!("10.40.0.{}", base + 9);
                claim(&st, &ip, &format!("{node}{blk}-same"), node).await
            }));
        }
    }
    let mut committed = 0;
    for t in tasks {
        if matches!(t.await.expect("task"), Outcome::Committed { .. }) {
            committed += 1;
        }
    }
    assert_eq!(
        committed,
        8 * 3,
        "both distinct claims and one of each contested one"
    );
    let got = blocks(&s).await;
    assert_eq!(got.len(), 8, "{got:?}");
    for (name, (owner, ips)) in &got {
        assert!(
            matches!(owner.as_deref(), Some("a" | "b")),
            "{name} has one owner: {owner:?}"
        );
        assert_eq!(ips.len(), 3, "{name}: {ips:?}");
    }
    // Both mirrors agree on who owns what.
    eventually("mirrors agree on owners", || {
        let (fa, fb) = (a.affinity().expect("a"), b.affinity().expect("b"));
        fa.own.len() + fb.own.len() == 8 && fa.own.iter().all(|ip| fb.foreign.contains(ip))
    })
    .await;
}

const POOL: &str = r#"
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata: {name: p}
spec: {subnet: 10.50.0.0/16, ips: ["10.50.0.0-10.50.0.15"]}
"#;

/// An ADD through the engine for pod `name` on `node` from pool `p`.
async fn add(e: &Engine<KubeStore>, name: &str) -> Result<String, String> {
    let set = pool_set(POOL).expect("pool");
    let annos: BTreeMap<String, String> = [(
        "ipam.spidernet.io/ippool".to_string(),
        r#"{"ipv4":["p"]}"#.to_string(),
    )]
    .into();
    let input = SelectionInput {
        pod_namespace: "ns",
        pod_name: name,
        pod_annotations: Some(&annos),
        node_name: e.node(),
        ..Default::default()
    };
    let att = Attachment {
        container_id: name.into(),
        ifname: "eth0".into(),
    };
    let a = e
        .allocate(&set, &input, &att, "uid", 1_700_000_000)
        .await
        .map_err(|e| e.to_string())?;
    Ok(a.nics[0]
        .ipv4
        .as_ref()
        .expect("v4")
        .address
        .addr()
        .to_string())
}

/// A pool of one block: the first node owns it, the second borrows single addresses in it with
/// the same compare-and-swap, the owner stays, and the pool fills exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_borrows_in_the_first_nodes_block() {
    let Some(s) = server() else { return };
    clear(&s);
    let ea = Engine::new(store(&s, Some("a")).await, "a");
    let eb = Engine::new(store(&s, Some("b")).await, "b");
    let first = add(&ea, "a-0").await.expect("a-0");
    eventually("b sees a's block", || {
        eb.store().affinity().is_some_and(|f| f.foreign.len() == 1)
    })
    .await;
    let mut seen: HashSet<String> = [first].into();
    for i in 0..5 {
        assert!(seen.insert(add(&eb, &format!("b-{i}")).await.expect("b")));
    }
    assert_eq!(eb.stats().borrowed_picks, 5, "{:?}", eb.stats());
    for i in 1..11 {
        assert!(seen.insert(add(&ea, &format!("a-{i}")).await.expect("a")));
    }
    assert_eq!(seen.len(), 16);
    let err = add(&eb, "b-full").await.expect_err("the pool is full");
    assert!(err.contains("exhausted"), "{err}");
    let got = blocks(&s).await;
    assert_eq!(got["v4-10-50-0-0"].0.as_deref(), Some("a"), "{got:?}");
}

/// An empty block goes back after the delay; another node then owns it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_block_goes_back_after_the_delay() {
    let Some(s) = server() else { return };
    clear(&s);
    let quick = Duration::from_millis(800);
    let a = KubeStore::connect(client(&s).await, opts(&s, Some("a"), quick))
        .await
        .expect("a");
    let b = store(&s, Some("b")).await;
    assert!(matches!(
        claim(&a, "10.60.0.1", "c1", "a").await,
        Outcome::Committed { .. }
    ));
    release(&a, "10.60.0.1", "c1", "a").await;
    // Kept for the delay (a pod restarting on the node finds its block still there).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(blocks(&s).await.len(), 1);
    let mut gone = false;
    for _ in 0..60 {
        if blocks(&s).await.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the empty block was never given back");
    eventually("a forgets the block", || {
        a.affinity().is_some_and(|f| f.own.is_empty())
    })
    .await;
    assert!(matches!(
        claim(&b, "10.60.0.2", "c2", "b").await,
        Outcome::Committed { .. }
    ));
    assert_eq!(blocks(&s).await["v4-10-60-0-0"].0.as_deref(), Some("b"));
}

/// A gone node's blocks go back once they hold none of its records: an empty one is deleted,
/// one with another node's borrowed record is kept, free, with the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_nodes_blocks_return_once_its_records_are_freed() {
    let Some(s) = server() else { return };
    clear(&s);
    let (a, b) = (store(&s, Some("a")).await, store(&s, Some("b")).await);
    claim(&a, "10.70.0.1", "a1", "a").await;
    claim(&a, "10.70.0.17", "a2", "a").await;
    eventually("b sees a's blocks", || {
        b.affinity().is_some_and(|f| f.foreign.len() == 2)
    })
    .await;
    assert!(matches!(
        claim(&b, "10.70.0.2", "b1", "b").await,
        Outcome::Committed { .. }
    ));
    assert!(
        b.idle_block_owners().is_empty(),
        "a's records are still there"
    );
    // Node a goes; GC (here: by hand) frees its records.
    release(&b, "10.70.0.1", "a1", "a").await;
    release(&b, "10.70.0.17", "a2", "a").await;
    assert_eq!(b.idle_block_owners(), vec!["a".to_string()]);
    assert_eq!(b.return_blocks(&["a".into()]).await.expect("return"), 2);
    eventually("the deletion reaches b", || {
        b.affinity().is_some_and(|f| f.foreign.is_empty())
    })
    .await;
    let got = blocks(&s).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got["v4-10-70-0-0"], (None, vec!["10.70.0.2".to_string()]));
    assert_eq!(
        b.list(Filter::Node("b")).await.expect("list").leases.len(),
        1
    );
    // Free again: b's next write there makes it b's.
    claim(&b, "10.70.0.3", "b2", "b").await;
    assert_eq!(blocks(&s).await["v4-10-70-0-0"].0.as_deref(), Some("b"));
}

/// Blocks written before node-affine blocks (or by `spiderctl migrate`) have no owner: they are
/// free blocks, their records kept, and the first node to write into one owns it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_without_owners_become_free_blocks_with_their_records() {
    let Some(s) = server() else { return };
    clear(&s);
    let old = store(&s, None).await;
    for i in 1..=4 {
        let ip = format!("10.80.0.{i}");
        claim(&old, &ip, &format!("m{i}"), "x").await;
    }
    assert_eq!(blocks(&s).await["v4-10-80-0-0"].0, None);
    drop(old);
    let e = Engine::new(store(&s, Some("b")).await, "b");
    assert!(e
        .store()
        .affinity()
        .is_some_and(|f| f.own.is_empty() && f.foreign.is_empty()));
    claim(e.store(), "10.80.0.9", "n1", "b").await;
    let got = blocks(&s).await;
    let (owner, ips) = &got["v4-10-80-0-0"];
    assert_eq!(owner.as_deref(), Some("b"));
    assert_eq!(ips.len(), 5, "the migrated records are kept: {ips:?}");
}
