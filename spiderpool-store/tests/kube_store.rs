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
        ..Default::default()
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

/// A pool of 65,000 allocations: every object the store writes stays small (16 records), a
/// fresh store reads them all back, and the pool's status counts them without `allocatedIPs`
/// (too large for one object).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_65000_allocations() {
    use spiderpool_core::conformance::lease;
    use spiderpool_core::store::{Filter, LeaseStore, Outcome, Txn};
    use std::net::Ipv4Addr;
    const N: u32 = 65_000;
    let Some(s) = server() else { return };
    let pool = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: big}\nspec: {subnet: 10.100.0.0/16, ips: [10.100.0.1-10.100.253.232]}\n";
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], pool);
    assert!(ok, "{err}");
    let store = fresh(&s).await;
    let base = u32::from(Ipv4Addr::new(10, 100, 0, 0));
    // One transaction per block (16 addresses), 8 at a time.
    let blocks: Vec<Vec<u32>> = (1..=N)
        .collect::<Vec<_>>()
        .chunk_by(|a, b| a / 16 == b / 16)
        .map(<[u32]>::to_vec)
        .collect();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for chunk in blocks {
        let (st, sem) = (store.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("permit");
            let claims = chunk
                .iter()
                .map(|n| {
                    let ip = Ipv4Addr::from(base + n).to_string();
                    lease(&ip, "big", &format!("c{n}"), "eth0", "n1")
                })
                .collect();
            match st
                .commit(Txn {
                    claims,
                    releases: vec![],
                })
                .await
            {
                Ok(Outcome::Committed { .. }) => {}
                other => panic!("block {}: {other:?}", chunk[0]),
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        store
            .list(Filter::Pool("big"))
            .await
            .expect("list")
            .leases
            .len(),
        N as usize
    );
    // A fresh store (an agent starting) reads all of them back.
    let again = KubeStore::connect(client(&s).await, opts(&s))
        .await
        .expect("connect");
    assert_eq!(
        again
            .pool_addresses("big")
            .await
            .expect("addresses")
            .ips
            .len(),
        N as usize
    );
    // Every object stays small: the largest block is 16 records.
    let (ok, out, err) = s.kubectl(
        &["get", "spideripblock", "v4-10-100-0-16", "-o", "json"],
        "",
    );
    assert!(ok, "{err}");
    assert!(out.len() < 8 * 1024, "a full block is {} bytes", out.len());
    // The pool's status counts them; allocatedIPs would not fit one object, so it is left out.
    assert!(again.write_status("big").await.expect("status"));
    let (ok, out, err) = s.kubectl(&["get", "sp", "big", "-o", "json"], "");
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["status"]["allocatedIPCount"], 65_000, "{}", v["status"]);
    assert_eq!(v["status"]["totalIPCount"], 65_000);
    assert!(
        v["status"].get("allocatedIPs").is_none(),
        "allocatedIPs written for 65,000 records"
    );
}

/// A TCP relay to the API server that can stop relaying without closing anything: what a
/// silently dropped connection (a firewall, a dead NAT entry, a partitioned node) looks like.
struct BlackHole {
    port: u16,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl BlackHole {
    async fn start(upstream: std::net::SocketAddr) -> BlackHole {
        use std::sync::atomic::Ordering::Relaxed;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = frozen.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                for (mut r, mut w) in [
                    (
                        Box::new(dr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(uw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(ur) as _, Box::new(dw) as _),
                ] {
                    let f = f.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let Ok(n) = r.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            // Frozen: hold the bytes forever, close nothing.
                            while f.load(Relaxed) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        BlackHole { port, frozen }
    }

    fn freeze(&self) {
        self.frozen
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Nothing waits forever: when the connection to the API server silently stops answering, a
/// write gives up within the store's deadline with a retryable error naming the server (the
/// plugin's code 11), instead of hanging the block's queue for the kernel's TCP timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_api_server_costs_a_deadline_not_a_hang() {
    use spiderpool_core::conformance::lease;
    use spiderpool_core::store::{LeaseStore, Txn};
    let Some(s) = server() else { return };
    let port: u16 = s
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let hole = BlackHole::start(upstream).await;
    let kc = kube::config::Kubeconfig::read_from(s.kubeconfig()).expect("kubeconfig");
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    cfg.cluster_url = format!("https://127.0.0.1:{}/", hole.port)
        .parse()
        .expect("proxy url");
    cfg.default_retry = false;
    let client = kube::Client::try_from(cfg).expect("client");
    let (ok, _, err) = s.kubectl(&["delete", "spideripblocks", "--all", "--wait=true"], "");
    assert!(ok, "{err}");
    let opts = KubeStoreOptions {
        request_timeout: Duration::from_secs(2),
        write_deadline: Duration::from_secs(5),
        ..opts(&s)
    };
    let store = KubeStore::connect(client, opts).await.expect("connect");
    hole.freeze();
    let t0 = std::time::Instant::now();
    let txn = Txn {
        claims: vec![lease("10.60.0.1", "p", "c1", "eth0", "node-1")],
        releases: Vec::new(),
    };
    let out = tokio::time::timeout(Duration::from_secs(60), store.commit(txn))
        .await
        .expect("the write gave up by itself, within a minute");
    let e = out.expect_err("nothing answered");
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("SpiderIPBlock"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "gave up after {:?}",
        t0.elapsed()
    );
}

/// The client every one-shot call outside the store uses (the agent's pod reads at ADD and GC,
/// StatefulSets, auto-pools, SpiderEndpoints; the whole controller): a GET to an API server that
/// silently stops answering fails after `REQUEST_TIMEOUT` instead of hanging for the kernel's
/// TCP timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_client_gives_up_on_a_silent_api_server() {
    let Some(s) = server() else { return };
    let port: u16 = s
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("port");
    let hole = BlackHole::start(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
    let kc = std::fs::read_to_string(s.kubeconfig()).expect("kubeconfig");
    let relayed = kc.replace(
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{}", hole.port),
    );
    assert_ne!(kc, relayed, "the kubeconfig names the server");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("relayed.kubeconfig");
    std::fs::write(&path, relayed).expect("write");
    let (client, _) = spiderpool_store::k8s::request_client(Some(&path))
        .await
        .expect("client");
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, "default");
    pods.get_opt("warm")
        .await
        .expect("answers before the freeze");
    hole.freeze();
    let t0 = std::time::Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(60), pods.get_opt("any"))
        .await
        .expect("the GET gave up by itself, within a minute");
    assert!(out.is_err(), "nothing answered: {out:?}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(20),
        "gave up after {waited:?} (REQUEST_TIMEOUT is {:?})",
        spiderpool_store::k8s::REQUEST_TIMEOUT
    );
}

/// LISTs of SpiderIPBlocks the API server has answered (its own `/metrics`).
fn block_lists(s: &KubeServer) -> f64 {
    s.get_raw("/metrics", "text/plain")
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("verb=\"LIST\"")
                && l.contains("resource=\"spideripblocks\"")
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// The store reads the blocks once at start (its watch starts at that listing's version; kube's
/// watcher listed everything a second time), and a watch whose version the server no longer
/// has lists again, dropping what was deleted meanwhile and keeping what is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_listing_at_start_and_a_new_one_when_the_watch_version_is_gone() {
    use spiderpool_core::conformance::lease;
    use spiderpool_core::store::{Filter, LeaseStore, Outcome, Txn};
    use spiderpool_store::k8s::crd::{BlockRecord, Slot, SpiderIPBlock, SpiderIPBlockSpec};
    let Some(s) = server() else { return };
    let (ok, _, err) = s.kubectl(&["delete", "spideripblocks", "--all", "--wait=true"], "");
    assert!(ok, "{err}");
    let before = block_lists(&s);
    let store = KubeStore::connect(client(&s).await, opts(&s))
        .await
        .expect("connect");
    let out = store
        .commit(Txn {
            claims: vec![lease("10.40.0.1", "p", "c1", "eth0", "n1")],
            releases: vec![],
        })
        .await
        .expect("commit");
    assert!(matches!(out, Outcome::Committed { .. }), "{out:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        block_lists(&s) - before,
        1.0,
        "the store listed the blocks more than once at start"
    );
    // A block the server does not have (deleted while the watch was away), in the mirror.
    let mut phantom = SpiderIPBlock::new(
        "v4-10-41-0-0",
        SpiderIPBlockSpec {
            allocations: [(
                "10.41.0.1".to_string(),
                Slot::Record(BlockRecord {
                    pool: "p".into(),
                    pod: "ns/gone".into(),
                    container_id: "gone".into(),
                    interface: "eth0".into(),
                    node: "n1".into(),
                    ..BlockRecord::default()
                }),
            )]
            .into_iter()
            .collect(),
            ..SpiderIPBlockSpec::default()
        },
    );
    phantom.metadata.resource_version = Some("2".into());
    store.absorb(&phantom);
    let ips = |store: &KubeStore| {
        let store = store.clone();
        async move {
            let mut v: Vec<String> = store
                .list(Filter::All)
                .await
                .expect("list")
                .leases
                .iter()
                .map(|l| l.ip.to_string())
                .collect();
            v.sort();
            v
        }
    };
    assert_eq!(ips(&store).await, ["10.40.0.1", "10.41.0.1"]);
    store.watch_from("1");
    let t0 = std::time::Instant::now();
    while ips(&store).await != ["10.40.0.1"] {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the expired watch did not list again: {:?}",
            ips(&store).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(block_lists(&s) - before, 2.0, "one listing after the 410");
}
