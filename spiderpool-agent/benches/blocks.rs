//! Kubernetes mode at many nodes, through the whole path: the `spiderpool` plugin forked per ADD
//! and DEL, `spiderpool-agent --kube --store kube` processes (one per node), one real API server
//! (envtest's kube-apiserver and etcd). One pool (1,000 or 65,000 addresses), 1,000 pods spread
//! over the nodes, 1,000 ADDs 10 at a time (each to its pod's node's agent), then 1,000 DELs;
//! `--blocks owned` (node-affine blocks) against `--blocks shared` (the store before them),
//! each in the same run. Then one agent's memory and restart time with 65,000 records in the
//! cluster. Requests and refused writes come from the API server's own `/metrics`
//! (`apiserver_request_total`), CPU from /proc (API server + etcd, the agents, and the plugin
//! processes as this process's waited-for children).
//!
//! Run: `cargo bench -p spiderpool-agent --bench blocks [-- AGENTS ...]` (default 1 10 50;
//! `BENCH_POOLS=1000` to skip the 65,000-address pool; `BENCH_MEMORY_ONLY=1` for the memory and
//! restart part alone; `BENCH_BASELINE_AGENT=PATH` measures that agent binary too, on the same
//! records; needs the envtest kube-apiserver).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{cni, env_for, netconf, Agent};
use spiderpool_store::k8s::crd::crds_yaml;
use spiderpool_store::testing::{cpu_seconds, KubeServer};

const PODS: usize = 1000;
const PARALLEL: usize = 10;

fn apply(s: &KubeServer, y: &str) {
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], y);
    assert!(ok, "{err}");
}

/// `apiserver_request_total` by "VERB resource code".
fn requests(s: &KubeServer) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for l in s
        .get_raw("/metrics", "text/plain")
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let field = |k: &str| {
            l.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let n: f64 = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let key = format!("{} {} {}", field("verb"), field("resource"), field("code"));
        *out.entry(key).or_insert(0.0) += n;
    }
    out
}

/// (requests that are not watches, refused block writes) between two scrapes.
fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> (f64, f64) {
    let mut all = 0.0;
    let mut refused = 0.0;
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0.0);
        if !k.starts_with("WATCH") {
            all += d;
        }
        if k.contains(" spideripblocks 409") {
            refused += d;
        }
    }
    (all, refused)
}

/// CPU seconds of this process's waited-for children (the plugin processes).
fn children_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(13) + ticks(14)) / 100.0
}

/// A memory figure of process `pid` in MiB (`VmRSS:` now, `VmHWM:` the peak).
fn mem_mib(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn pool_yaml(size: usize) -> (String, String) {
    let (name, range) = match size {
        1000 => ("bench-1k", "10.100.0.1-10.100.3.232"),
        _ => ("bench-65k", "10.101.0.1-10.101.253.232"),
    };
    let subnet = if size == 1000 {
        "10.100.0.0/16"
    } else {
        "10.101.0.0/16"
    };
    (
        name.to_string(),
        format!("apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {{name: {name}}}\nspec: {{subnet: {subnet}, ips: [{range}]}}\n"),
    )
}

/// Nodes `node-0..n` and pods `a{n}-0..PODS`, pod i on node i % n (created 32 at a time through
/// the API: `kubectl apply` of 1,000 objects takes minutes).
fn cluster(rt: &tokio::runtime::Runtime, s: &KubeServer, n: usize) {
    use k8s_openapi::api::core::v1::{Node, Pod};
    use kube::api::{Api, PostParams};
    rt.block_on(async {
        let kc = s.kubeconfig();
        let (client, _) = spiderpool_store::k8s::client(Some(&kc))
            .await
            .expect("client");
        let nodes: Api<Node> = Api::all(client.clone());
        for i in 0..n {
            let node: Node = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("node-{i}")}
            }))
            .expect("node");
            let _ = nodes.create(&PostParams::default(), &node).await;
        }
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), "default");
        let sa = serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}}))
            .expect("service account");
        let _ = sas.create(&PostParams::default(), &sa).await;
        let pods: Api<Pod> = Api::namespaced(client, "default");
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        let mut tasks = Vec::new();
        for i in 0..PODS {
            let (pods, sem) = (pods.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire().await.expect("permit");
                let pod: Pod = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("a{n}-{i}"), "namespace": "default"},
                    "spec": {"nodeName": format!("node-{}", if one_active() { 0 } else { i % n }),
                             "containers": [{"name": "c", "image": "busybox"}]}
                }))
                .expect("pod");
                pods.create(&PostParams::default(), &pod)
                    .await
                    .expect("create pod");
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
}

/// `BENCH_ONE_ACTIVE=1`: every pod on node-0 (the other agents only watch): what the watch
/// fan-out costs.
fn one_active() -> bool {
    std::env::var("BENCH_ONE_ACTIVE").is_ok()
}

fn agent(s: &KubeServer, dir: &Path, node: usize, blocks: &str) -> Agent {
    Agent::start(
        &dir.join(format!("node-{node}.sock")),
        &dir.join(format!("node-{node}.log")),
        &agent_args(s, node, blocks),
    )
}

fn agent_args(s: &KubeServer, node: usize, blocks: &str) -> Vec<String> {
    vec![
        "--node-name".into(),
        format!("node-{node}"),
        "--kube".into(),
        "--kubeconfig".into(),
        s.kubeconfig().to_string_lossy().into_owned(),
        "--store".into(),
        "kube".into(),
        "--blocks".into(),
        blocks.into(),
    ]
}

struct Row {
    agents: usize,
    pool: usize,
    mode: &'static str,
    add_per_s: f64,
    del_per_s: f64,
    p50: f64,
    p99: f64,
    failed: usize,
    refused: f64,
    requests: f64,
    cpu_server: f64,
    cpu_agents: f64,
    cpu_plugins: f64,
}

/// `cmd` for every pod, PARALLEL at a time, each to its node's agent; latencies in ms and the
/// failures.
fn drive(cmd: &str, n: usize, socks: &[String], pool: &str) -> (Vec<f64>, usize, f64) {
    let confs: Vec<String> = socks
        .iter()
        .map(|sock| {
            netconf(
                "1.0.0",
                "bench",
                sock,
                serde_json::json!({"default_ipv4_ippool": [pool]}),
            )
            .to_string()
        })
        .collect();
    let t0 = Instant::now();
    let results: Vec<(Vec<f64>, usize)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..PARALLEL)
            .map(|w| {
                let confs = &confs;
                scope.spawn(move || {
                    let (mut lat, mut failed) = (Vec::new(), 0);
                    let mut i = w;
                    while i < PODS {
                        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME=a{n}-{i}");
                        let t = Instant::now();
                        let r = cni(
                            &env_for(cmd, &format!("c{n}-{i}"), "eth0", &args),
                            confs[if one_active() { 0 } else { i % n }].as_bytes(),
                        );
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        if r.code() != 0 {
                            failed += 1;
                            if failed == 1 {
                                eprintln!("{cmd} a{n}-{i} failed: {}", r.stdout);
                            }
                        }
                        i += PARALLEL;
                    }
                    (lat, failed)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = results.iter().flat_map(|r| r.0.clone()).collect();
    lat.sort_by(f64::total_cmp);
    (lat, results.iter().map(|r| r.1).sum(), wall)
}

fn run(s: &KubeServer, dir: &Path, n: usize, size: usize, mode: &'static str) -> Row {
    let (ok, _, err) = s.kubectl(&["delete", "spideripblocks", "--all", "--wait=true"], "");
    assert!(ok, "{err}");
    let (pool, y) = pool_yaml(size);
    apply(s, &y);
    let agents: Vec<Agent> = (0..n).map(|i| agent(s, dir, i, mode)).collect();
    let socks: Vec<String> = agents.iter().map(Agent::sock).collect();
    let pids: Vec<u32> = agents
        .iter()
        .filter_map(|a| a.child.as_ref().map(|c| c.id()))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let (r0, s0, a0, c0) = (requests(s), cpu(&s.pids()), cpu(&pids), children_cpu());
    let (lat, failed, wall) = drive("ADD", n, &socks, &pool);
    let (r1, s1, a1, c1) = (requests(s), cpu(&s.pids()), cpu(&pids), children_cpu());
    let (_, del_failed, del_wall) = drive("DEL", n, &socks, &pool);
    let (reqs, refused) = delta(&r0, &r1);
    if std::env::var("BENCH_BREAKDOWN").is_ok() {
        for (k, v) in &r1 {
            let d = v - r0.get(k).copied().unwrap_or(0.0);
            if d > 0.0 {
                eprintln!("  {n} agents {mode}: {k}: {:.3} per ADD", d / PODS as f64);
            }
        }
    }
    let per = PODS as f64;
    drop(agents);
    Row {
        agents: n,
        pool: size,
        mode,
        add_per_s: per / wall,
        del_per_s: per / del_wall,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        failed: failed + del_failed,
        refused: refused / per,
        requests: reqs / per,
        cpu_server: (s1 - s0) * 1000.0 / per,
        cpu_agents: (a1 - a0) * 1000.0 / per,
        cpu_plugins: (c1 - c0) * 1000.0 / per,
    }
}

/// 65,000 records in the blocks, written by a store in this process (as another node's agent
/// would).
fn prefill_65k(rt: &tokio::runtime::Runtime, s: &KubeServer) {
    use spiderpool_core::store::{Lease, LeaseStore, Outcome, Owner, Txn};
    // Strings as long as a cluster's: a Deployment pod's name, a UID, a 64-hex container id.
    let lease = |ip: &str, n: u32| Lease {
        ip: ip.parse().expect("ip"),
        pool: "bench-65k".into(),
        owner: Owner {
            pod_namespace: "default".into(),
            pod_name: format!("bench-app-7d9f8b6c5d-{n:05}"),
            pod_uid: format!("{n:08x}-5c1e-4a7b-9d2f-{:012x}", u64::from(n) * 7919),
            container_id: format!("{:032x}{n:032x}", u128::from(n) * 0x9e37_79b9_7f4a_7c15),
            ifname: "eth0".into(),
            node: "prefill".into(),
            network: "bench".into(),
            created: 1_700_000_000,
        },
        clean_gateway: false,
        revision: 0,
    };
    let (ok, _, err) = s.kubectl(&["delete", "spideripblocks", "--all", "--wait=true"], "");
    assert!(ok, "{err}");
    apply(s, "apiVersion: v1\nkind: Node\nmetadata: {name: prefill}\n");
    // The pool exists, as in a cluster: the agent's status projection reads its records.
    apply(s, "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: bench-65k}\nspec: {subnet: 10.101.0.0/16, ips: [10.101.0.1-10.101.255.254]}\n");
    rt.block_on(async {
        let kc = s.kubeconfig();
        let (client, _) = spiderpool_store::k8s::client(Some(&kc))
            .await
            .expect("client");
        let store = spiderpool_store::k8s::KubeStore::connect(
            client,
            spiderpool_store::k8s::KubeStoreOptions {
                status_interval: None,
                node: Some("prefill".into()),
                ..Default::default()
            },
        )
        .await
        .expect("store");
        let base = u32::from(std::net::Ipv4Addr::new(10, 101, 0, 0));
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
        let mut tasks = Vec::new();
        for blk in 0..(65_000 / 16 + 1) {
            let (st, sem) = (store.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire().await.expect("permit");
                let claims = (1..=16u32)
                    .map(|k| blk * 16 + k)
                    .filter(|n| *n <= 65_000 && (n & 0xff) != 0)
                    .map(|n| {
                        let ip = std::net::Ipv4Addr::from(base + n).to_string();
                        lease(&ip, n)
                    })
                    .collect();
                let out = st
                    .commit(Txn {
                        claims,
                        releases: vec![],
                    })
                    .await;
                assert!(matches!(out, Ok(Outcome::Committed { .. })), "{out:?}");
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
}

/// One agent started on the 65,000 records: RSS 3 s after it is ready and its peak, its start,
/// its restart after `kill -9`, and the LISTs of blocks the API server answered for both.
struct Memory {
    rss: f64,
    peak: f64,
    start: f64,
    restart: f64,
    lists: f64,
}

fn memory_and_restart(s: &KubeServer, dir: &Path, bin: &Path) -> Memory {
    let lists = |s: &KubeServer| {
        requests(s)
            .iter()
            .filter(|(k, _)| k.starts_with("LIST spideripblocks"))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    let l0 = lists(s);
    let t0 = Instant::now();
    let mut a = Agent::start_bin(
        bin,
        &dir.join("mem.sock"),
        &dir.join("mem.log"),
        &agent_args(s, 0, "owned"),
    );
    let start = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    let pid = a.child.as_ref().map(|c| c.id()).unwrap_or(0);
    let (rss, peak) = (mem_mib(pid, "VmRSS:"), mem_mib(pid, "VmHWM:"));
    a.kill9();
    let t1 = Instant::now();
    a.start_again();
    let restart = t1.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    if std::env::var("BENCH_AGENT_LOG").is_ok() {
        eprintln!("{}", a.log_text());
    }
    Memory {
        rss,
        peak,
        start,
        restart,
        lists: lists(s) - l0,
    }
}

/// Where an agent's start goes with 65,000 records: the blocks listed as JSON values, listed
/// typed, and a whole `KubeStore::connect` (list, mirror, watch start).
fn load_breakdown(rt: &tokio::runtime::Runtime, s: &KubeServer) {
    use kube::api::{Api, ListParams};
    use spiderpool_store::k8s::crd::SpiderIPBlock;
    rt.block_on(async {
        let kc = s.kubeconfig();
        let (client, _) = spiderpool_store::k8s::client(Some(&kc))
            .await
            .expect("client");
        let raw: Api<kube::api::DynamicObject> = Api::all_with(
            client.clone(),
            &kube::api::ApiResource::erase::<SpiderIPBlock>(&()),
        );
        let t = Instant::now();
        let mut lp = ListParams::default().limit(500);
        let mut n = 0;
        loop {
            let page = raw.list(&lp).await.expect("list");
            n += page.items.len();
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp = lp.continue_token(&c),
                None => break,
            }
        }
        eprintln!(
            "LIST {n} blocks as JSON values: {:.2} s",
            t.elapsed().as_secs_f64()
        );
        let typed: Api<SpiderIPBlock> = Api::all(client.clone());
        let t = Instant::now();
        let mut lp = ListParams::default().limit(500);
        loop {
            let page = typed.list(&lp).await.expect("list");
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp = lp.continue_token(&c),
                None => break,
            }
        }
        eprintln!("LIST typed: {:.2} s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut lp = ListParams::default().match_any().limit(500);
        let mut n = 0;
        loop {
            let page = typed.list(&lp).await.expect("list");
            n += page.items.len();
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp = lp.continue_token(&c),
                None => break,
            }
        }
        eprintln!(
            "LIST typed from the watch cache (resourceVersion=0): {n} in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let store = spiderpool_store::k8s::KubeStore::connect(
            client,
            spiderpool_store::k8s::KubeStoreOptions {
                status_interval: None,
                ..Default::default()
            },
        )
        .await
        .expect("store");
        eprintln!("KubeStore::connect: {:.2} s", t.elapsed().as_secs_f64());
        drop(store);
    });
}

fn main() {
    let ns: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ns = if ns.is_empty() { vec![1, 10, 50] } else { ns };
    let pools: Vec<usize> = std::env::var("BENCH_POOLS")
        .ok()
        .map(|v| v.split(',').filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 65_000]);
    let Some(s) = KubeServer::start() else {
        eprintln!("SKIPPED: no envtest kube-apiserver (KUBEBUILDER_ASSETS or ../shared/envtest)");
        return;
    };
    s.install_crds(&crds_yaml()).expect("CRDs");
    let dir = tempfile::tempdir().expect("tmp");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    let memory_only = std::env::var("BENCH_MEMORY_ONLY").is_ok();
    for &n in ns.iter().filter(|_| !memory_only) {
        cluster(&rt, &s, n);
        for &size in &pools {
            for mode in ["shared", "owned"]
                .into_iter()
                .filter(|m| std::env::var("BENCH_MODES").map_or(true, |v| v.contains(m)))
            {
                let r = run(&s, dir.path(), n, size, mode);
                eprintln!(
                    "{n} agents, pool {size}, {mode}: {:.0} ADD/s, {:.2} refused/alloc",
                    r.add_per_s, r.refused
                );
                rows.push(r);
            }
        }
    }
    println!("\n{PODS} ADDs ({PARALLEL} at a time) then {PODS} DELs through the plugin and agent processes, one real API server\n");
    println!("| agents | pool | blocks | ADD/s | DEL/s | ADD p50 / p99 | refused claims per allocation | API requests per allocation | CPU per ADD: API server + etcd / agents / plugins = total | failed |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} / {:.0} ms | {:.3} | {:.2} | {:.2} / {:.2} / {:.2} = {:.2} ms | {} |",
            r.agents, r.pool, r.mode, r.add_per_s, r.del_per_s, r.p50, r.p99, r.refused,
            r.requests, r.cpu_server, r.cpu_agents, r.cpu_plugins,
            r.cpu_server + r.cpu_agents + r.cpu_plugins, r.failed
        );
    }
    if pools.contains(&65_000) {
        prefill_65k(&rt, &s);
        if std::env::var("BENCH_LOAD_BREAKDOWN").is_ok() {
            load_breakdown(&rt, &s);
        }
        let mut builds = vec![(
            "this tree".to_string(),
            std::path::PathBuf::from(env!("CARGO_BIN_EXE_spiderpool-agent")),
        )];
        if let Some(b) = std::env::var_os("BENCH_BASELINE_AGENT") {
            builds.push((
                format!("baseline {}", b.to_string_lossy()),
                std::path::PathBuf::from(b),
            ));
        }
        let mut lines = Vec::new();
        for (label, bin) in &builds {
            for _ in 0..2 {
                let m = memory_and_restart(&s, dir.path(), bin);
                lines.push(format!(
                    "| {label} | {:.1} / {:.1} MiB | {:.2} s | {:.2} s | {:.0} |",
                    m.rss, m.peak, m.start, m.restart, m.lists
                ));
            }
        }
        println!("\nOne agent with 65,000 records in the cluster (two runs per build)\n");
        println!("| agent | RSS once ready / peak | start | restart after kill -9 | LISTs of blocks for both |");
        println!("|---|---|---|---|---|");
        for l in lines {
            println!("{l}");
        }
    }
}
