//! Several agents (real processes) sharing one pool in one real etcd.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use spiderpool_store::testing::{require_etcd, EtcdServer};

const SHARED: &str = "kind: SpiderIPPool\nmetadata: {name: shared}\nspec: {subnet: 10.60.0.0/24, ips: [10.60.0.1-10.60.0.50]}\n";
const ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=plain;K8S_POD_UID=u";

/// Agents sharing the pool `shared` in one etcd (under one key prefix).
struct Shared {
    dir: std::path::PathBuf,
    store: String,
    manifests: std::path::PathBuf,
}

impl Shared {
    fn new(dir: &std::path::Path, etcd: &EtcdServer, prefix: &str) -> Shared {
        let manifests = dir.join("pools.yaml");
        std::fs::write(&manifests, SHARED).expect("write");
        Shared {
            dir: dir.to_path_buf(),
            store: format!("etcd:{}#/{prefix}/", etcd.url()),
            manifests,
        }
    }

    /// Starts the agent of `node`; `metrics` serves its /metrics there.
    fn agent(&self, node: &str, watch: bool, metrics: Option<&str>) -> Agent {
        let mut args: Vec<String> = [
            "--node-name",
            node,
            "--store",
            &self.store,
            "--manifests",
            &self.manifests.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !watch {
            args.push("--no-watch".into());
        }
        if let Some(m) = metrics {
            args.extend(["--metrics-addr".to_string(), m.to_string()]);
        }
        Agent::start(
            &self.dir.join(format!("{node}.sock")),
            &self.dir.join(format!("{node}.log")),
            &args,
        )
    }
}

fn conf(sock: &str) -> Vec<u8> {
    netconf(
        "1.0.0",
        "n",
        sock,
        json!({"default_ipv4_ippool": ["shared"]}),
    )
    .to_string()
    .into_bytes()
}

/// Lost races (claims the store refused) an agent counted, read from its `/metrics`.
fn conflicts(metrics_addr: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(metrics_addr).expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    text.lines()
        .find_map(|l| {
            l.strip_prefix("spiderpool_ipam_allocation_update_ippool_conflict_counts_total ")
        })
        .and_then(|v| v.trim().parse().ok())
        .expect("conflict counter")
}

#[test]
fn fifty_parallel_adds_across_two_nodes_into_fifty_addresses_then_exhausted() {
    let Some(bin) = require_etcd() else { return };
    let etcd = EtcdServer::start(&bin).expect("etcd");
    let dir = tempfile::tempdir().expect("dir");
    let shared = Shared::new(dir.path(), &etcd, "agents");
    let agents = [
        shared.agent("node-a", true, None),
        shared.agent("node-b", true, None),
    ];
    let socks: Vec<String> = agents.iter().map(Agent::sock).collect();
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let sock = socks[i % 2].clone();
            std::thread::spawn(move || {
                cni(
                    &env_for("ADD", &format!("p{i}"), "eth0", ARGS),
                    &conf(&sock),
                )
            })
        })
        .collect();
    let mut ips = std::collections::BTreeSet::new();
    for h in handles {
        let out = h.join().expect("thread");
        assert_eq!(out.status, 0, "{}", out.stdout);
        assert!(ips.insert(out.ip()), "{} handed out twice", out.ip());
    }
    assert_eq!(ips.len(), 50);
    for sock in &socks {
        let more = cni(&env_for("ADD", "one-more", "eth0", ARGS), &conf(sock));
        assert_eq!(more.code(), 101, "{}", more.stdout);
        assert!(
            more.stdout
                .contains("shared skipped (exhausted (50/50 allocated))"),
            "{}",
            more.stdout
        );
    }
    // Everything back.
    for i in 0..50 {
        let out = cni(
            &env_for("DEL", &format!("p{i}"), "eth0", ARGS),
            &conf(&socks[(i + 1) % 2]),
        );
        assert_eq!(out.status, 0, "{}", out.stdout);
    }
    assert!(endpoints(&socks[0]).is_empty());
}

/// Node B builds its cache, node A fills the pool's other addresses, then B allocates the rest.
/// Returns B's lost races.
fn stale_cache_races(watch: bool) -> u64 {
    let etcd = EtcdServer::start(&require_etcd().expect("etcd")).expect("etcd");
    let dir = tempfile::tempdir().expect("dir");
    let shared = Shared::new(dir.path(), &etcd, "stale");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let a = shared.agent("node-a", watch, None);
    let b = shared.agent("node-b", watch, Some(&metrics));
    assert_eq!(
        cni(&env_for("ADD", "b0", "eth0", ARGS), &conf(&b.sock())).status,
        0
    );
    for i in 0..25 {
        assert_eq!(
            cni(
                &env_for("ADD", &format!("a{i}"), "eth0", ARGS),
                &conf(&a.sock())
            )
            .status,
            0
        );
    }
    std::thread::sleep(Duration::from_millis(300)); // let the watch deliver
    for i in 1..25 {
        let out = cni(
            &env_for("ADD", &format!("b{i}"), "eth0", ARGS),
            &conf(&b.sock()),
        );
        assert_eq!(out.status, 0, "{}", out.stdout);
    }
    let all: Vec<Value> = endpoints(&b.sock()).iter().map(|r| json!(r.2)).collect();
    let distinct: std::collections::BTreeSet<String> = all.iter().map(|v| v.to_string()).collect();
    assert_eq!((all.len(), distinct.len()), (50, 50));
    conflicts(&metrics)
}

#[test]
fn the_store_watch_keeps_another_nodes_cache_fresh() {
    if require_etcd().is_none() {
        return;
    }
    let with = stale_cache_races(true);
    let without = stale_cache_races(false);
    eprintln!("node B's lost races for 24 ADDs after node A filled the pool: {with} with the watch, {without} without");
    assert_eq!(with, 0, "lost races with the watch");
    assert!(
        without > 0,
        "without the watch the stale cache must lose races (else this test proves nothing)"
    );
}
