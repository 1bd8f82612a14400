//! The node path through real binaries, forked per operation as a container runtime does, in one
//! run: ADD+DEL latency and throughput for (a) the `spiderpool` plugin + `spiderpool-agent` on the
//! embedded store, (b) Debian's `host-local` IPAM, (c) the fork+exec floor (`/bin/cat` answering
//! its input: the least any plugin can cost), sequential and 10 in parallel; (d) 10 agents on one
//! etcd sharing one pool of exactly 1,000 addresses, 1,000 ADDs then 1,000 DELs, with and without
//! the store watch; the agent's memory with 10,000 and 100,000 allocations, the plugin's peak
//! memory per call, and the agent's restart time after `kill -9` with 10,000 allocations.
//! Prints Markdown tables (figures go to docs/benchmarks.md).
//!
//! Run: `cargo bench -p spiderpool-agent --bench node_path` (as any user; (d) needs `etcd`;
//! `BENCH_QUICK=1` for fewer operations).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{netconf, plugin, Agent};
use serde_json::{json, Value};

const HOST_LOCAL: &str = "/usr/lib/cni/host-local";
const ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=plain;K8S_POD_UID=u";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// One exec of `bin` with the CNI environment and `conf` on stdin; returns (ok, seconds, stdout).
fn exec(bin: &Path, cmd: &str, container: &str, conf: &[u8]) -> (bool, f64, String) {
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .env_clear()
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", container)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", "/var/run/netns/bench")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_ARGS", ARGS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(conf);
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        t0.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

struct Run {
    label: String,
    mode: String,
    ops: usize,
    failures: usize,
    add_p50: f64,
    add_p99: f64,
    pairs_per_s: f64,
}

/// `n` ADD+DEL pairs through `bin`, `parallel` callers at once (each caller its own containers).
fn add_del(label: &str, bin: &Path, conf: &[u8], n: usize, parallel: usize, tag: &str) -> Run {
    let t0 = Instant::now();
    let per = n / parallel;
    let workers: Vec<_> = (0..parallel)
        .map(|w| {
            let (bin, conf, tag) = (bin.to_path_buf(), conf.to_vec(), tag.to_string());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut fail = 0;
                for i in 0..per {
                    let cid = format!("{tag}-{w}-{i}");
                    let (ok, s, _) = exec(&bin, "ADD", &cid, &conf);
                    lat.push(s);
                    fail += usize::from(!ok);
                    let (ok, _, _) = exec(&bin, "DEL", &cid, &conf);
                    fail += usize::from(!ok);
                }
                (lat, fail)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut failures = 0;
    for w in workers {
        let (l, f) = w.join().expect("worker");
        lat.extend(l);
        failures += f;
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Run {
        label: label.into(),
        mode: if parallel == 1 {
            "sequential".into()
        } else {
            format!("{parallel} parallel")
        },
        ops: per * parallel,
        failures,
        add_p50: percentile(&lat, 0.5),
        add_p99: percentile(&lat, 0.99),
        pairs_per_s: (per * parallel) as f64 / secs,
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Writes `n` allocations into a fresh embedded store file.
fn fill_embedded(path: &Path, n: u32) {
    use spiderpool_core::store::{Lease, LeaseStore, Owner, Txn};
    let store = spiderpool_store::embedded::EmbeddedStore::open(path).expect("open");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let base = u32::from(std::net::Ipv4Addr::new(10, 80, 0, 1));
    let leases: Vec<Lease> = (0..n)
        .map(|i| Lease {
            ip: std::net::IpAddr::V4(std::net::Ipv4Addr::from(base + i)),
            pool: "big".into(),
            owner: Owner {
                pod_namespace: "bench".into(),
                pod_name: format!("pod-{i}"),
                pod_uid: format!("uid-{i}"),
                container_id: format!("filled-{i}"),
                ifname: "eth0".into(),
                node: "bench-node".into(),
                network: "n".into(),
                created: 0,
            },
            clean_gateway: false,
            revision: 0,
        })
        .collect();
    rt.block_on(async {
        for c in leases.chunks(2000) {
            store
                .commit(Txn {
                    claims: c.to_vec(),
                    releases: vec![],
                })
                .await
                .expect("fill");
        }
    });
}

fn agent_args(node: &str, store: &str, manifests: &Path) -> Vec<String> {
    [
        "--node-name",
        node,
        "--store",
        store,
        "--manifests",
        &manifests.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let n = if quick { 100 } else { 400 };
    let dir = tempfile::tempdir().expect("dir");
    let plugin_bin = plugin();
    let mut out = String::new();

    // (a) our plugin + agent on the embedded store.
    let pools = dir.path().join("pools.yaml");
    std::fs::write(
        &pools,
        "kind: SpiderIPPool\nmetadata: {name: bench}\nspec: {subnet: 10.70.0.0/16, ips: [10.70.0.1-10.70.255.254]}\n---\n\
         kind: SpiderIPPool\nmetadata: {name: big}\nspec: {subnet: 10.80.0.0/14, ips: [10.80.0.1-10.83.255.254]}\n",
    )
    .expect("pools");
    let store = format!("embedded:{}", dir.path().join("a.redb").display());
    let agent = Agent::start(
        &dir.path().join("a.sock"),
        &dir.path().join("a.log"),
        &agent_args("bench-node", &store, &pools),
    );
    let ours = netconf(
        "1.0.0",
        "bench",
        &agent.sock(),
        json!({"default_ipv4_ippool": ["bench"]}),
    )
    .to_string()
    .into_bytes();
    // (b) host-local on the same machine.
    let hl = json!({"cniVersion": "1.0.0", "name": "bench", "type": "macvlan",
        "ipam": {"type": "host-local", "dataDir": dir.path().join("host-local").to_string_lossy(),
                 "ranges": [[{"subnet": "10.71.0.0/16"}]]}})
    .to_string()
    .into_bytes();
    let floor_bin = Path::new("/bin/cat");
    let mut runs = Vec::new();
    for parallel in [1usize, 10] {
        let m = if parallel == 1 { n / 2 } else { n };
        runs.push(add_del(
            "(c) fork+exec floor (/bin/cat)",
            floor_bin,
            &ours,
            m,
            parallel,
            "floor",
        ));
        runs.push(add_del(
            "(a) spiderpool + agent (embedded)",
            &plugin_bin,
            &ours,
            m,
            parallel,
            "ours",
        ));
        if Path::new(HOST_LOCAL).exists() {
            runs.push(add_del(
                "(b) host-local",
                Path::new(HOST_LOCAL),
                &hl,
                m,
                parallel,
                "hl",
            ));
        }
    }
    out.push_str("| IPAM | callers | ADD+DEL pairs | failures | ADD p50 | ADD p99 | pairs/s |\n|---|---|---|---|---|---|---|\n");
    for r in &runs {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} ms | {:.2} ms | {:.0} |\n",
            r.label,
            r.mode,
            r.ops,
            r.failures,
            r.add_p50 * 1e3,
            r.add_p99 * 1e3,
            r.pairs_per_s
        ));
    }
    let find = |label: &str, mode: &str| {
        runs.iter()
            .find(|r| r.label.starts_with(label) && r.mode == mode)
    };
    if let (Some(a), Some(b), Some(c)) = (
        find("(a)", "10 parallel"),
        find("(b)", "10 parallel"),
        find("(a)", "sequential").zip(find("(c)", "sequential")),
    ) {
        out.push_str(&format!(
            "\nRatios in this run: (a)/(b) throughput at 10 parallel = {:.1}x; (a) sequential ADD p50 - floor p50 = {:.2} ms.\n",
            a.pairs_per_s / b.pairs_per_s,
            (c.0.add_p50 - c.1.add_p50) * 1e3
        ));
    }

    // Plugin peak memory per call (GNU time's maximum resident set size).
    if Path::new("/usr/bin/time").exists() {
        let mut child = Command::new("/usr/bin/time")
            .args(["-f", "%M"])
            .arg(&plugin_bin)
            .env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "rss-probe")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", "/var/run/netns/x")
            .env("CNI_ARGS", ARGS)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("time");
        if let Some(mut i) = child.stdin.take() {
            let _ = i.write_all(&ours);
        }
        let o = child.wait_with_output().expect("wait");
        let kib: u64 = String::from_utf8_lossy(&o.stderr)
            .trim()
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0);
        out.push_str(&format!(
            "\nPlugin peak resident memory for one ADD: {:.1} MiB.\n",
            kib as f64 / 1024.0
        ));
    }
    drop(agent);

    // Agent memory and restart time with 10,000 and 100,000 allocations in its store.
    out.push_str("\n| allocations in the store | agent ready after start (after kill -9) | agent RSS after one ADD |\n|---|---|---|\n");
    for count in [10_000u32, 100_000] {
        let path = dir.path().join(format!("m{count}.redb"));
        fill_embedded(&path, count);
        let store = format!("embedded:{}", path.display());
        let mut a = Agent::start(
            &dir.path().join(format!("m{count}.sock")),
            &dir.path().join(format!("m{count}.log")),
            &agent_args("bench-node", &store, &pools),
        );
        let conf = netconf(
            "1.0.0",
            "bench",
            &a.sock(),
            json!({"default_ipv4_ippool": ["big"]}),
        )
        .to_string()
        .into_bytes();
        let (ok, _, text) = exec(&plugin_bin, "ADD", "mem-probe", &conf);
        assert!(ok, "{text}");
        let pid = a.child.as_ref().map(|c| c.id()).unwrap_or(0);
        let rss = rss_kib(pid, "VmRSS:");
        a.kill9();
        let t0 = Instant::now();
        a.start_again();
        let ready = t0.elapsed();
        out.push_str(&format!(
            "| {count} | {:.0} ms | {:.1} MiB |\n",
            ready.as_secs_f64() * 1e3,
            rss as f64 / 1024.0
        ));
    }

    // (d) 10 agents on one etcd, one pool of exactly 1,000 addresses.
    #[allow(unused_mut)]
    let mut etcd_rows = String::new();
    if let Some(bin) = spiderpool_store::testing::find_binary("etcd") {
        let etcd = spiderpool_store::testing::EtcdServer::start(&bin).expect("etcd");
        let shared = dir.path().join("shared.yaml");
        std::fs::write(&shared, "kind: SpiderIPPool\nmetadata: {name: shared}\nspec: {subnet: 10.90.0.0/16, ips: [10.90.0.1-10.90.3.232]}\n").expect("write");
        etcd_rows.push_str("| 10 agents, one etcd, 1,000 addresses | ADD ok | ADD failures | duplicates | ADD/s | ADD p50 | ADD p99 | lost races | left after DEL | DEL/s |\n|---|---|---|---|---|---|---|---|---|---|\n");
        for watch in [true, false] {
            let prefix = format!("/shared-{watch}/");
            let agents: Vec<(Agent, String)> = (0..10)
                .map(|i| {
                    let port = std::net::TcpListener::bind("127.0.0.1:0")
                        .expect("port")
                        .local_addr()
                        .expect("a")
                        .port();
                    let metrics = format!("127.0.0.1:{port}");
                    let mut args = agent_args(
                        &format!("node-{i}"),
                        &format!("etcd:{}#{prefix}", etcd.url()),
                        &shared,
                    );
                    args.extend(["--metrics-addr".to_string(), metrics.clone()]);
                    if !watch {
                        args.push("--no-watch".into());
                    }
                    let a = Agent::start(
                        &dir.path().join(format!("e{watch}{i}.sock")),
                        &dir.path().join(format!("e{watch}{i}.log")),
                        &args,
                    );
                    (a, metrics)
                })
                .collect();
            let confs: Vec<Vec<u8>> = agents
                .iter()
                .map(|(a, _)| {
                    netconf(
                        "1.0.0",
                        "bench",
                        &a.sock(),
                        json!({"default_ipv4_ippool": ["shared"]}),
                    )
                    .to_string()
                    .into_bytes()
                })
                .collect();
            let plugin_bin2 = plugin_bin.clone();
            let t0 = Instant::now();
            let workers: Vec<_> = (0..10)
                .map(|w| {
                    let (conf, bin) = (confs[w].clone(), plugin_bin2.clone());
                    std::thread::spawn(move || {
                        let mut got = Vec::new();
                        let mut lat = Vec::new();
                        let mut fail = 0;
                        for i in 0..100 {
                            let (ok, s, text) = exec(&bin, "ADD", &format!("e-{w}-{i}"), &conf);
                            lat.push(s);
                            if ok {
                                let v: Value =
                                    serde_json::from_str(text.trim()).unwrap_or(Value::Null);
                                got.push(
                                    v["ips"][0]["address"]
                                        .as_str()
                                        .unwrap_or_default()
                                        .to_string(),
                                );
                            } else {
                                fail += 1;
                            }
                        }
                        (got, lat, fail)
                    })
                })
                .collect();
            let mut got = Vec::new();
            let mut lat = Vec::new();
            let mut fail = 0;
            for w in workers {
                let (g, l, f) = w.join().expect("worker");
                got.extend(g);
                lat.extend(l);
                fail += f;
            }
            let add_secs = t0.elapsed().as_secs_f64();
            lat.sort_by(f64::total_cmp);
            let distinct: std::collections::BTreeSet<&String> = got.iter().collect();
            let lost: u64 = agents
                .iter()
                .map(|(_, m)| {
                    metric(
                        m,
                        "spiderpool_ipam_allocation_update_ippool_conflict_counts_total",
                    )
                })
                .sum();
            let t1 = Instant::now();
            let dels: Vec<_> = (0..10)
                .map(|w| {
                    let (conf, bin) = (confs[w].clone(), plugin_bin2.clone());
                    std::thread::spawn(move || {
                        (0..100)
                            .filter(|i| !exec(&bin, "DEL", &format!("e-{w}-{i}"), &conf).0)
                            .count()
                    })
                })
                .collect();
            let del_fail: usize = dels.into_iter().map(|d| d.join().expect("del")).sum();
            let del_secs = t1.elapsed().as_secs_f64();
            let left = common::endpoints(&agents[0].0.sock()).len();
            etcd_rows.push_str(&format!(
                "| watch {} | {} | {} | {} | {:.0} | {:.1} ms | {:.1} ms | {} | {} | {:.0} |\n",
                if watch { "on" } else { "off" },
                got.len(),
                fail + del_fail,
                got.len() - distinct.len(),
                got.len() as f64 / add_secs,
                percentile(&lat, 0.5) * 1e3,
                percentile(&lat, 0.99) * 1e3,
                lost,
                left,
                1000.0 / del_secs
            ));
        }
    } else {
        etcd_rows.push_str("(d) skipped: no etcd binary\n");
    }
    out.push('\n');
    out.push_str(&etcd_rows);
    print!("{out}");
}

fn metric(addr: &str, name: &str) -> u64 {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
