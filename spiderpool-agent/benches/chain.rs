//! The whole CNI chain as a runtime runs it, forked per plugin per operation, in one run:
//! ADD then DEL of `macvlan` (with our `spiderpool` IPAM and a `spiderpool-agent` process on the
//! embedded store) followed by (a) Debian's `tuning` plugin, the baseline of "one more plugin in
//! the chain", (b) our `coordinator`, (c) our `coordinator` with IP conflict detection on in the
//! IPAM, (d) nothing (macvlan + spiderpool alone). The bench process enters the node's network
//! namespace itself, so no `ip netns exec` sits in the timed path; a fresh pod namespace per
//! iteration is made outside the timing. Prints a Markdown table (figures go to
//! docs/benchmarks.md).
//!
//! Run (root: network namespaces): `cargo bench -p spiderpool-agent --bench chain`
//! (`BENCH_QUICK=1` for 20 iterations per variant instead of 100).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::lab::*;
use serde_json::{json, Value};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// One plugin exec in this process's namespace (the node's).
fn exec(
    bin: &Path,
    cmd: &str,
    container: &str,
    netns: &str,
    cni_path: &Path,
    conf: &Value,
) -> Value {
    let mut child = Command::new(bin)
        .env_clear()
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", container)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", netns)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(conf.to_string().as_bytes());
    }
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{cmd} {}: {text}", bin.display());
    serde_json::from_str(text.trim()).unwrap_or(Value::Null)
}

/// ADD then DEL of the chain `list` for one pod namespace; the two durations in ms.
fn once(list: &Value, cni_path: &Path, pod_ns: &str, container: &str) -> (f64, f64) {
    let netns = format!("/var/run/netns/{pod_ns}");
    let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
    let bin = |p: &Value| plugin_binary(cni_path, p["type"].as_str().unwrap_or_default());
    let t0 = Instant::now();
    let mut prev: Option<Value> = None;
    for (i, p) in plugins.iter().enumerate() {
        prev = Some(exec(
            &bin(p),
            "ADD",
            container,
            &netns,
            cni_path,
            &plugin_conf(list, i, prev.as_ref()),
        ));
    }
    let add = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    for (i, p) in plugins.iter().enumerate().rev() {
        exec(
            &bin(p),
            "DEL",
            container,
            &netns,
            cni_path,
            &plugin_conf(list, i, prev.as_ref()),
        );
    }
    (add, t1.elapsed().as_secs_f64() * 1e3)
}

fn main() {
    if !spiderpool_store::testing::is_root() {
        println!("SKIPPED: the chain bench needs root (network namespaces)");
        return;
    }
    let n: usize = if std::env::var_os("BENCH_QUICK").is_some() {
        20
    } else {
        100
    };
    let dir = tempfile::tempdir().expect("dir");
    let store = format!("embedded:{}", dir.path().join("leases.redb").display());
    let agent = agent_for(dir.path(), "controller-node-1", &store);
    let mut ns = Netns::new();
    let (_router, node) = zone6(&mut ns);
    let cni_path = cni_path(dir.path());
    // From here on this process (and every plugin it forks) is in the node's namespace.
    let f = std::fs::File::open(format!("/var/run/netns/{node}")).expect("node netns");
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    let chain = |detect: bool, third: Option<Value>| {
        let mut ipam = json!({"type": "spiderpool", "ipam_unix_socket_path": agent.sock(),
                              "default_ipv4_ippool": ["test-ippool-6"]});
        if detect {
            ipam["enableIPConflictDetection"] = json!(true);
        }
        let mut plugins =
            vec![json!({"type": "macvlan", "master": "ens192", "mode": "bridge", "ipam": ipam})];
        plugins.extend(third);
        json!({"cniVersion": "1.0.0", "name": "bench", "plugins": plugins})
    };
    let coordinator = json!({"type": "coordinator", "service_cidr": ["10.233.0.0/18"]});
    let variants = [
        ("macvlan + spiderpool", chain(false, None)),
        (
            "macvlan + spiderpool + tuning (baseline)",
            chain(false, Some(json!({"type": "tuning"}))),
        ),
        (
            "macvlan + spiderpool + coordinator",
            chain(false, Some(coordinator.clone())),
        ),
        (
            "macvlan + spiderpool (conflict detection) + coordinator",
            chain(true, Some(coordinator)),
        ),
    ];
    println!("{n} ADD+DEL per variant, each plugin forked per operation, sequential\n");
    println!("| chain | ADD p50 | ADD p99 | DEL p50 | DEL p99 |");
    println!("|---|---|---|---|---|");
    let mut p50 = Vec::new();
    for (name, list) in &variants {
        let (mut adds, mut dels) = (Vec::new(), Vec::new());
        for i in 0..n {
            let pod = ns.add(&format!("b{}-{i}", p50.len()));
            let (a, d) = once(list, &cni_path, &pod, &format!("bench-{}-{i}", p50.len()));
            adds.push(a);
            dels.push(d);
            sh(&["ip", "netns", "del", &pod]);
        }
        adds.sort_by(f64::total_cmp);
        dels.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
            percentile(&adds, 0.5),
            percentile(&adds, 0.99),
            percentile(&dels, 0.5),
            percentile(&dels, 0.99)
        );
        p50.push((percentile(&adds, 0.5), percentile(&dels, 0.5)));
    }
    println!(
        "\ncoordinator vs tuning (ADD+DEL p50): {:.2}x; conflict detection adds {:.1} ms per ADD (p50)",
        (p50[2].0 + p50[2].1) / (p50[1].0 + p50[1].1),
        p50[3].0 - p50[2].0
    );
    drop(agent);
}
