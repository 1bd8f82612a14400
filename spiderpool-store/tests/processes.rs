#![cfg_attr(not(feature = "etcd"), allow(unused_imports))]
//! Real processes against real stores:
//! - the embedded store SIGKILLed in the middle of a stream of allocations, then reopened;
//! - several OS processes allocating concurrently from one small pool through one real etcd;
//! - etcd killed and restarted while allocations run.
//!
//! Each worker is `lease-tool alloc`, which prints a JSON line per allocation only after the store
//! acknowledged it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use spiderpool_core::store::{Filter, LeaseStore};
use spiderpool_store::embedded::EmbeddedStore;

fn lease_tool(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lease-tool"))
        .arg("alloc")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("lease-tool starts")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// What one worker reported.
#[derive(Default, Debug)]
struct Report {
    ok: BTreeMap<String, String>, // container id -> ip
    exhausted: usize,
    retries: usize,
    errors: Vec<String>,
    summary: Option<Value>,
}

fn absorb(report: &mut Report, line: &str) {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return; // a line cut short by SIGKILL
    };
    if v.get("summary").is_some() {
        report.summary = Some(v);
    } else if let (Some(cid), Some(ip)) = (v["cid"].as_str(), v["ip"].as_str()) {
        assert!(
            report.ok.insert(cid.to_string(), ip.to_string()).is_none(),
            "{cid} reported twice"
        );
    } else if v.get("exhausted").is_some() {
        report.exhausted += 1;
    } else if v.get("retry").is_some() {
        report.retries += 1;
    } else if let Some(e) = v["error"].as_str() {
        report.errors.push(e.to_string());
    }
}

fn read_all(child: &mut Child) -> Report {
    let mut report = Report::default();
    let out = child.stdout.take().expect("stdout");
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        absorb(&mut report, &line);
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "lease-tool failed: {status}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_survives_sigkill_mid_stream() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("leases.redb");
    let store_arg = format!("embedded:{}", path.display());
    let mut acknowledged: BTreeMap<String, String> = BTreeMap::new();
    // Three rounds, killed after different numbers of acknowledgements, same file.
    for (round, kill_after) in [(0, 40usize), (1, 333), (2, 1)] {
        let node = format!("r{round}");
        let mut child = lease_tool(&args(&[
            "--store",
            &store_arg,
            "--pool-size",
            "65000",
            "--count",
            "1000000",
            "--node",
            &node,
            "--concurrency",
            "8",
        ]));
        let out = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(out).lines();
        let mut report = Report::default();
        while report.ok.len() < kill_after {
            let line = lines
                .next()
                .expect("worker ended before the kill")
                .expect("read line");
            absorb(&mut report, &line);
        }
        child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
                                        // Lines already written before the kill were acknowledged too.
        for line in lines.map_while(Result::ok) {
            absorb(&mut report, &line);
        }
        let _ = child.wait();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        acknowledged.extend(report.ok);

        let store = EmbeddedStore::open(&path).expect("reopens after SIGKILL");
        let leases = store.list(Filter::All).await.expect("list").leases;
        let by_cid: BTreeMap<String, String> = leases
            .iter()
            .map(|l| (l.owner.container_id.clone(), l.ip.to_string()))
            .collect();
        assert_eq!(by_cid.len(), leases.len(), "one record per container");
        for (cid, ip) in &acknowledged {
            assert_eq!(
                by_cid.get(cid),
                Some(ip),
                "round {round}: acknowledged {cid} -> {ip} lost after SIGKILL"
            );
        }
        // Extra records (durable but never reported) can only be the commits in flight at each
        // kill: one per worker (8) per round so far. Lines are flushed per record, so every
        // reported allocation was read above.
        let extra = by_cid
            .keys()
            .filter(|cid| !acknowledged.contains_key(*cid))
            .count();
        assert!(
            extra <= 8 * (round + 1),
            "round {round}: {extra} records were never acknowledged (at most 8 per kill can be in flight)"
        );
        drop(store);
    }
}

#[cfg(feature = "etcd")]
mod etcd {
    use super::*;
    use spiderpool_store::etcd::{EtcdConfig, EtcdStore};
    use spiderpool_store::testing::{require_etcd, unique_prefix, EtcdServer};

    async fn records(url: &str, prefix: &str) -> Vec<spiderpool_core::store::Lease> {
        let mut cfg = EtcdConfig::new(vec![url.to_string()]);
        cfg.prefix = prefix.to_string();
        let s = EtcdStore::connect(cfg).await.expect("connect");
        s.list(Filter::All).await.expect("list").leases
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn four_processes_share_one_small_pool_without_duplicates() {
        let Some(bin) = require_etcd() else { return };
        let server = EtcdServer::start(&bin).expect("etcd starts");
        let prefix = unique_prefix("procs");
        let store = format!("etcd:{}#{prefix}", server.url());
        // 4 processes x 2 concurrent requests x 40 attempts = 160 attempts on 100 addresses.
        let mut children: Vec<Child> = (0..4)
            .map(|i| {
                lease_tool(&args(&[
                    "--store",
                    &store,
                    "--pool-size",
                    "100",
                    "--count",
                    "40",
                    "--node",
                    &format!("node-{i}"),
                    "--concurrency",
                    "2",
                ]))
            })
            .collect();
        let reports: Vec<Report> = children.iter_mut().map(read_all).collect();
        let mut ips = BTreeSet::new();
        let (mut ok, mut exhausted) = (0, 0);
        for r in &reports {
            assert!(r.errors.is_empty(), "clean errors only: {:?}", r.errors);
            for ip in r.ok.values() {
                assert!(ips.insert(ip.clone()), "{ip} handed out twice");
            }
            ok += r.ok.len();
            exhausted += r.exhausted;
        }
        assert_eq!(ok, 100, "every address handed out exactly once");
        assert_eq!(exhausted, 60, "the losers get a clean 'exhausted'");
        let stored = records(&server.url(), &prefix).await;
        assert_eq!(stored.len(), 100);
        let stored_ips: BTreeSet<String> = stored.iter().map(|l| l.ip.to_string()).collect();
        assert_eq!(stored_ips, ips, "etcd holds exactly what was acknowledged");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_restart_during_allocations_gives_retryable_errors_and_no_duplicates() {
        let Some(bin) = require_etcd() else { return };
        let mut server = EtcdServer::start(&bin).expect("etcd starts");
        let prefix = unique_prefix("restart");
        let store = format!("etcd:{}#{prefix}", server.url());
        let mut child = lease_tool(&args(&[
            "--store",
            &store,
            "--pool-size",
            "5000",
            "--count",
            "600",
            "--node",
            "n1",
            "--concurrency",
            "4",
            "--retry-secs",
            "60",
        ]));
        let out = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(out).lines();
        let mut report = Report::default();
        while report.ok.len() < 100 {
            let line = lines.next().expect("worker alive").expect("line");
            absorb(&mut report, &line);
        }
        server.kill();
        let down = Instant::now();
        // Let the worker hit the outage for a while.
        while down.elapsed() < Duration::from_secs(2) {
            match lines.next() {
                Some(Ok(line)) => absorb(&mut report, &line),
                _ => break,
            }
            if report.retries >= 4 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        server.restart().expect("etcd restarts");
        for line in lines.map_while(Result::ok) {
            absorb(&mut report, &line);
        }
        assert!(child.wait().expect("wait").success());
        assert!(
            report.retries > 0,
            "the outage was seen as retryable errors"
        );
        assert!(
            report.errors.is_empty(),
            "no non-retryable error: {:?}",
            report.errors
        );
        assert_eq!(
            report.ok.len(),
            600,
            "every allocation eventually succeeded"
        );
        let distinct: BTreeSet<&String> = report.ok.values().collect();
        assert_eq!(distinct.len(), 600, "no duplicate address");
        let stored = records(&server.url(), &prefix).await;
        let by_cid: BTreeMap<String, String> = stored
            .iter()
            .map(|l| (l.owner.container_id.clone(), l.ip.to_string()))
            .collect();
        assert_eq!(stored.len(), 600, "no record leaked by a retried commit");
        assert_eq!(
            by_cid, report.ok,
            "etcd holds exactly what was acknowledged"
        );
    }
}
