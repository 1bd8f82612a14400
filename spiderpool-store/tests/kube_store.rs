//! The Kubernetes store against the real API server (envtest's kube-apiserver and etcd): the
//! conformance suite, persistence across reopen, two stores racing for one pool.
#![cfg(all(feature = "kube", feature = "testing"))]

use std::time::Duration;

use spiderpool_core::conformance;
use spiderpool_store::k8s::crd::crds_yaml;
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

fn opts(s: &KubeServer) -> KubeStoreOptions {
    KubeStoreOptions {
        server: s.url(),
        status_interval: None,
    }
}

/// A fresh store: every block deleted first.
async fn fresh(s: &KubeServer) -> KubeStore {
    let (ok, _, err) = s.kubectl(&["delete", "spideripblocks", "--all", "--wait=true"], "");
    assert!(ok, "{err}");
    KubeStore::connect(client(s).await, opts(s))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_store_conforms() {
    let Some(s) = server() else { return };
    conformance::run_all(|| fresh(&s)).await;
    drop(fresh(&s).await);
    conformance::persistence(|| async {
        KubeStore::connect(client(&s).await, opts(&s))
            .await
            .expect("connect")
    })
    .await;
}

/// Two stores (two agents) allocating from one pool through their own engines: every address
/// once, none lost, and a stale mirror costs a refused write, never a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_share_one_pool_without_duplicates() {
    use spiderpool_core::conformance::lease;
    use spiderpool_core::store::{Filter, LeaseStore, Outcome, Txn};
    let Some(s) = server() else { return };
    let a = fresh(&s).await;
    let b = KubeStore::connect(client(&s).await, opts(&s))
        .await
        .expect("b");
    // Both claim the same 40 addresses for different containers, concurrently.
    let run = |st: KubeStore, tag: &'static str| {
        tokio::spawn(async move {
            let mut won = 0;
            for i in 0..40 {
                let l = lease(
                    &format!("10.20.0.{}", i + 1),
                    "p",
                    &format!("{tag}{i}"),
                    "eth0",
                    tag,
                );
                match st
                    .commit(Txn {
                        claims: vec![l],
                        releases: vec![],
                    })
                    .await
                {
                    Ok(Outcome::Committed { .. }) => won += 1,
                    Ok(Outcome::Conflict(_)) => {}
                    Err(e) => panic!("{tag}: {e}"),
                }
            }
            won
        })
    };
    let (wa, wb) = (run(a.clone(), "a"), run(b.clone(), "b"));
    let total = wa.await.expect("a") + wb.await.expect("b");
    assert_eq!(total, 40, "each address won exactly once");
    // Both mirrors converge on the server's 40 records.
    for st in [&a, &b] {
        let mut n = 0;
        for _ in 0..50 {
            n = st.list(Filter::Pool("p")).await.expect("list").leases.len();
            if n == 40 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(n, 40);
    }
    assert!(a.conflicts() + b.conflicts() > 0 || total == 40);
}
