//! The one conformance suite (spiderpool_core::conformance), run against every backend:
//! memory, embedded (redb files in a temp dir) and etcd (a real etcd server on loopback).

use std::sync::Arc;

use spiderpool_core::conformance;
use spiderpool_store::embedded::EmbeddedStore;
use spiderpool_store::{AnyStore, MemoryStore};

#[tokio::test]
async fn memory_conforms() {
    conformance::run_all(|| async { AnyStore::Memory(Arc::new(MemoryStore::new())) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_conforms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let n = std::sync::atomic::AtomicUsize::new(0);
    let dir_path = dir.path().to_path_buf();
    conformance::run_all(|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir_path.join(format!("store-{i}.redb"));
        async move { EmbeddedStore::open(path).expect("open") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_persists_across_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("leases.redb");
    conformance::persistence(|| {
        let path = path.clone();
        async move { EmbeddedStore::open(path).expect("open") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_group_commit_shares_fsyncs_between_concurrent_commits() {
    use spiderpool_core::conformance::lease;
    use spiderpool_core::store::{LeaseStore, Outcome, Txn};
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(dir.path().join("g.redb")).expect("open");
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move {
                let l = lease(
                    &format!("10.1.{}.{}", i / 200, i % 200 + 1),
                    "p",
                    &format!("c{i}"),
                    "eth0",
                    "n",
                );
                s.commit(Txn {
                    claims: vec![l],
                    releases: vec![],
                })
                .await
            })
        })
        .collect();
    for t in tasks {
        assert!(matches!(
            t.await.expect("task"),
            Ok(Outcome::Committed { .. })
        ));
    }
    let stats = store.commit_stats();
    assert_eq!(stats.commits, 200);
    assert!(
        stats.batches < 100,
        "200 concurrent commits took {} fsyncs: group commit is not batching",
        stats.batches
    );
    // And every acknowledged commit is on disk: reopen and count.
    drop(store);
    let again = EmbeddedStore::open(dir.path().join("g.redb")).expect("reopen");
    assert_eq!(again.len(), 200);
}

#[test]
fn embedded_refuses_a_corrupt_file_instead_of_forgetting_records() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("garbage.redb");
    std::fs::write(
        &path,
        b"this is not a redb file at all, but it is long enough to look like one",
    )
    .expect("write");
    let err = EmbeddedStore::open(&path).expect_err("must refuse");
    assert!(err.to_string().contains("garbage.redb"), "{err}");
}

#[cfg(feature = "etcd")]
mod etcd {
    use spiderpool_core::conformance;
    use spiderpool_core::store::{Filter, LeaseStore};
    use spiderpool_store::etcd::{EtcdConfig, EtcdStore};
    use spiderpool_store::testing::{require_etcd, unique_prefix, EtcdServer};

    async fn connect(url: &str, prefix: &str) -> EtcdStore {
        let mut cfg = EtcdConfig::new(vec![url.to_string()]);
        cfg.prefix = prefix.to_string();
        EtcdStore::connect(cfg).await.expect("connect to etcd")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn etcd_conforms() {
        let Some(bin) = require_etcd() else { return };
        let server = EtcdServer::start(&bin).expect("etcd starts");
        let url = server.url();
        conformance::run_all(|| {
            let url = url.clone();
            async move { connect(&url, &unique_prefix("conformance")).await }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_persists_across_reconnect_and_server_restart() {
        let Some(bin) = require_etcd() else { return };
        let mut server = EtcdServer::start(&bin).expect("etcd starts");
        let url = server.url();
        let prefix = unique_prefix("persist");
        conformance::persistence(|| {
            let (url, prefix) = (url.clone(), prefix.clone());
            async move { connect(&url, &prefix).await }
        })
        .await;
        // Records survive a SIGKILL of etcd itself, too (etcd fsyncs its WAL per commit).
        let before = connect(&url, &prefix)
            .await
            .list(Filter::All)
            .await
            .expect("list");
        server.restart().expect("etcd restarts");
        let after = connect(&url, &prefix)
            .await
            .list(Filter::All)
            .await
            .expect("list");
        assert_eq!(before.leases, after.leases);
        assert!(!after.leases.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_refuses_names_that_would_break_the_key_layout() {
        use spiderpool_core::conformance::lease;
        use spiderpool_core::store::Txn;
        let Some(bin) = require_etcd() else { return };
        let server = EtcdServer::start(&bin).expect("etcd starts");
        let s = connect(&server.url(), &unique_prefix("names")).await;
        let bad = lease("10.0.0.1", "p", "ctr/eth0", "eth0", "n1");
        let err = s
            .commit(Txn {
                claims: vec![bad],
                releases: vec![],
            })
            .await
            .expect_err("refused");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("container id 'ctr/eth0'"), "{err}");
        assert!(s.list(Filter::All).await.expect("list").leases.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_lists_a_pool_larger_than_one_grpc_message() {
        use spiderpool_core::conformance::lease;
        use spiderpool_core::store::{Outcome, Txn};
        let Some(bin) = require_etcd() else { return };
        let server = EtcdServer::start(&bin).expect("etcd starts");
        let s = connect(&server.url(), &unique_prefix("big")).await;
        // 20,000 records of ~400 bytes: ~8 MB per listing, twice tonic's 4 MB message limit.
        let n = 20_000u32;
        let long = "x".repeat(120);
        let all: Vec<_> = (0..n)
            .map(|i| {
                let mut l = lease(
                    &std::net::Ipv4Addr::from(0x0a50_0000 + i).to_string(),
                    "big",
                    &format!("c{i}"),
                    "eth0",
                    "n1",
                );
                l.owner.pod_name = format!("{long}-{i}");
                l
            })
            .collect();
        let chunks: Vec<Vec<_>> = all
            .chunks(spiderpool_store::etcd::CHUNK)
            .map(|c| c.to_vec())
            .collect();
        let mut tasks = Vec::new();
        for group in chunks.chunks(chunks.len() / 8 + 1) {
            let (s, group) = (s.clone(), group.to_vec());
            tasks.push(tokio::spawn(async move {
                for c in group {
                    let out = s
                        .commit(Txn {
                            claims: c,
                            releases: vec![],
                        })
                        .await;
                    assert!(matches!(out, Ok(Outcome::Committed { .. })), "{out:?}");
                }
            }));
        }
        for t in tasks {
            t.await.expect("fill task");
        }
        let pool = s.list(Filter::Pool("big")).await.expect("paged listing");
        assert_eq!(pool.leases.len(), n as usize);
        let node = s.list(Filter::Node("n1")).await.expect("paged listing");
        assert_eq!(node.leases.len(), n as usize);
    }

    #[tokio::test]
    async fn etcd_unreachable_is_a_clear_retryable_error() {
        // Nothing listens on this port (bound and released just now).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let mut cfg = EtcdConfig::new(vec![format!("http://127.0.0.1:{port}")]);
        cfg.connect_timeout = std::time::Duration::from_millis(500);
        cfg.request_timeout = std::time::Duration::from_millis(500);
        let result = match EtcdStore::connect(cfg).await {
            Err(e) => Err(e),
            Ok(s) => s.list(Filter::All).await.map(|_| ()),
        };
        let err = result.expect_err("no etcd there");
        assert!(err.is_retryable(), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("try again"),
            "{msg}"
        );
    }
}
