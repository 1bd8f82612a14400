//! Many agents allocating from one pool of 1,000 addresses on the real API server (envtest's
//! kube-apiserver + etcd), through the Kubernetes store vs a baseline doing what Spiderpool does.
//!
//! ```text
//! cargo bench -p spiderpool-store --features kube,testing --bench kube [-- AGENTS...]
//! ```
//! Each "agent" is an engine with its own `KubeStore` (its own connections and watch), as in one
//! agent process; it runs 4 ADDs at a time (a kubelet starting pods). The baseline agent does,
//! per ADD: GET the pool, pick the lowest free address from `status.allocatedIPs`, replace the
//! status with a resourceVersion compare-and-swap, and on 409 retry up to 5 times with jittered
//! backoff (Spiderpool's agent); release is the same loop removing the address. CPU seconds are
//! the API server's and etcd's own (`/proc/PID/stat`), per 1,000 allocations (ADD + DEL phases).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use spiderpool_core::engine::{Attachment, Engine};
use spiderpool_core::manifest::pool_set;
use spiderpool_core::select::SelectionInput;
use spiderpool_store::k8s::crd::{crds_yaml, SpiderIPPool};
use spiderpool_store::k8s::{KubeStore, KubeStoreOptions};
use spiderpool_store::testing::{cpu_seconds, KubeServer};

const ADDRESSES: usize = 1000;
const PER_AGENT_PARALLEL: usize = 4;

fn pool_yaml(name: &str) -> String {
    format!(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {{name: {name}}}\nspec: {{subnet: 10.50.0.0/16, ips: [10.50.0.1-10.50.3.232]}}\n"
    )
}

struct Row {
    what: &'static str,
    agents: usize,
    ok: u64,
    failed: u64,
    conflicts: u64,
    /// Object writes (PUT/POST) sent, ADD and DEL phases.
    writes: u64,
    add_secs: f64,
    del_secs: f64,
    cpu: f64,
}

async fn client(s: &KubeServer) -> kube::Client {
    spiderpool_store::k8s::client(Some(&s.kubeconfig()))
        .await
        .expect("client")
        .0
}

fn cpu(s: &KubeServer) -> f64 {
    s.pids().into_iter().map(cpu_seconds).sum()
}

async fn ours(s: &KubeServer, agents: usize) -> Row {
    let pool = format!("ours-{agents}");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pool_yaml(&pool));
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(&["delete", "spideripblocks", "--all"], "");
    assert!(ok, "{err}");
    let pools = Arc::new(pool_set(&pool_yaml(&pool)).expect("pool"));
    let mut engines = Vec::new();
    for i in 0..agents {
        let opts = KubeStoreOptions {
            server: s.url(),
            status_interval: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        let store = KubeStore::connect(client(s).await, opts)
            .await
            .expect("store");
        engines.push(Arc::new((
            Engine::new(store.clone(), format!("node-{i}")),
            store,
        )));
    }
    let annos: Arc<BTreeMap<String, String>> = Arc::new(
        [(
            "ipam.spidernet.io/ippool".to_string(),
            format!(r#"{{"ipv4":["{pool}"]}}"#),
        )]
        .into(),
    );
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu(s);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (a, e) in engines.iter().enumerate() {
        for w in 0..PER_AGENT_PARALLEL {
            let (e, pools, annos, ok, failed) = (
                e.clone(),
                pools.clone(),
                annos.clone(),
                ok.clone(),
                failed.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                while i < ADDRESSES / agents + usize::from(a < ADDRESSES % agents) {
                    let name = format!("pod-{a}-{i}");
                    let input = SelectionInput {
                        pod_namespace: "default",
                        pod_name: &name,
                        pod_annotations: Some(&annos),
                        node_name: "n",
                        ..Default::default()
                    };
                    let att = Attachment {
                        container_id: name.clone(),
                        ifname: "eth0".into(),
                    };
                    match e.0.allocate(&pools, &input, &att, "uid", 1).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(err) => {
                            eprintln!("ADD {name}: {err}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    i += PER_AGENT_PARALLEL;
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    let add_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for (a, e) in engines.iter().enumerate() {
        for w in 0..PER_AGENT_PARALLEL {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                while i < ADDRESSES / agents + usize::from(a < ADDRESSES % agents) {
                    let name = format!("pod-{a}-{i}");
                    if let Err(err) = e.0.release(&name, None).await {
                        eprintln!("DEL {name}: {err}");
                    }
                    i += PER_AGENT_PARALLEL;
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    let del_secs = t1.elapsed().as_secs_f64();
    // Let the status writers finish their last round: their cost is part of ours.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let cpu = cpu(s) - cpu0;
    let conflicts = engines.iter().map(|e| e.1.conflicts()).sum();
    let writes = engines.iter().map(|e| e.1.writes()).sum();
    Row {
        what: "kube store",
        agents,
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        conflicts,
        writes,
        add_secs,
        del_secs,
        cpu,
    }
}

/// Spiderpool's loop: GET, pick the lowest free, replace the whole status (CAS), retry 5 times.
async fn baseline_op(
    api: &Api<SpiderIPPool>,
    pool: &str,
    pod: &str,
    add: bool,
    conflicts: &AtomicU64,
    writes: &AtomicU64,
) -> bool {
    for attempt in 0..=5u32 {
        let Ok(mut p) = api.get(pool).await else {
            continue;
        };
        let mut st = p.status.clone().unwrap_or_default();
        let mut map: BTreeMap<String, serde_json::Value> = st
            .allocated_ips
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        if add {
            let free = (1..=ADDRESSES as u32)
                .map(|n| {
                    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 50, 0, 0)) + n)
                        .to_string()
                })
                .find(|ip| !map.contains_key(ip));
            let Some(ip) = free else { return false };
            map.insert(
                ip,
                serde_json::json!({"pod": format!("default/{pod}"), "podUid": "uid"}),
            );
        } else {
            map.retain(|_, v| v["pod"] != format!("default/{pod}"));
        }
        st.allocated_ip_count = Some(map.len() as i64);
        st.allocated_ips = Some(serde_json::to_string(&map).unwrap_or_default());
        p.status = Some(st);
        writes.fetch_add(1, Ordering::Relaxed);
        match api.replace_status(pool, &PostParams::default(), &p).await {
            Ok(_) => return true,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                conflicts.fetch_add(1, Ordering::Relaxed);
                let ms = 10u64 * (1 << attempt.min(4));
                let jitter = u64::from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.subsec_nanos())
                        .unwrap_or(0),
                ) % ms;
                tokio::time::sleep(Duration::from_millis(ms / 2 + jitter / 2)).await;
            }
            Err(_) => {}
        }
    }
    false
}

async fn baseline(s: &KubeServer, agents: usize) -> Row {
    let pool = format!("base-{agents}");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pool_yaml(&pool));
    assert!(ok, "{err}");
    let mut apis = Vec::new();
    for _ in 0..agents {
        apis.push(Api::<SpiderIPPool>::all(client(s).await));
    }
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let conflicts = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu(s);
    let mut secs = [0.0; 2];
    for (phase, add) in [true, false].into_iter().enumerate() {
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for (a, api) in apis.iter().enumerate() {
            for w in 0..PER_AGENT_PARALLEL {
                let (api, pool, ok, failed, conflicts, writes) = (
                    api.clone(),
                    pool.clone(),
                    ok.clone(),
                    failed.clone(),
                    conflicts.clone(),
                    writes.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut i = w;
                    while i < ADDRESSES / agents + usize::from(a < ADDRESSES % agents) {
                        let name = format!("pod-{a}-{i}");
                        let done = baseline_op(&api, &pool, &name, add, &conflicts, &writes).await;
                        if add {
                            if done {
                                ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        i += PER_AGENT_PARALLEL;
                    }
                }));
            }
        }
        for t in tasks {
            t.await.expect("task");
        }
        secs[phase] = t0.elapsed().as_secs_f64();
    }
    Row {
        what: "baseline (Spiderpool's loop)",
        agents,
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        conflicts: conflicts.load(Ordering::Relaxed),
        writes: writes.load(Ordering::Relaxed),
        add_secs: secs[0],
        del_secs: secs[1],
        cpu: cpu(s) - cpu0,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let agents: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let agents = if agents.is_empty() {
        vec![1, 4, 10]
    } else {
        agents
    };
    let Some(s) = KubeServer::start() else { return };
    s.install_crds(&crds_yaml()).expect("CRDs");
    println!(
        "{ADDRESSES} allocations then release, one pool of exactly {ADDRESSES} addresses, {PER_AGENT_PARALLEL} ADDs at a time per agent\n"
    );
    println!(
        "| store | agents | ok | failed | conflicts/alloc | writes/alloc | ADD/s | DEL/s | apiserver+etcd CPU s / 1,000 allocs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &agents {
        for row in [ours(&s, n).await, baseline(&s, n).await] {
            println!(
                "| {} | {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} |",
                row.what,
                row.agents,
                row.ok,
                row.failed,
                row.conflicts as f64 / row.ok.max(1) as f64,
                row.writes as f64 / row.ok.max(1) as f64,
                row.ok as f64 / row.add_secs,
                row.ok as f64 / row.del_secs,
                row.cpu * 1000.0 / row.ok.max(1) as f64,
            );
        }
    }
}
