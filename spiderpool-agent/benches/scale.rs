//! API load per node as the cluster grows: N simulated agents in this process, each with its own
//! `KubeStore` (mirror, block writes, status projector) and `KubeView` (watches of its Node,
//! Namespaces, its Pods, pools, subnets, reserved IPs, node names), all on one real API server
//! (envtest's kube-apiserver + etcd). One pool of 1,000 addresses, 1,000 pods spread over the N
//! nodes; 1,000 ADDs through the agent's own decision path (`ipam::add`: pod from the view,
//! selection, engine, store), 10 at a time; then GC rounds on every agent with every pod alive.
//!
//! Printed: API requests per GC round per agent (from the API server's own
//! `apiserver_request_total`), API server + etcd CPU per allocation (from /proc), ADD/s.
//! Left out: the plugin fork and the agent's socket (measured by `node_path` and
//! docs/benchmarks.md's whole-path runs); agents share one process and two HTTP clients.
//!
//! Run: `cargo bench -p spiderpool-agent --bench scale [-- N ...]` (default 10 50 100; needs the
//! envtest kube-apiserver: `KUBEBUILDER_ASSETS` or ../shared/envtest, etcd, kubectl).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use spiderpool_agent::agent::Agent;
use spiderpool_agent::view::KubeView;
use spiderpool_core::api::{AddRequest, PodRef};
use spiderpool_core::engine::Attachment;
use spiderpool_core::lifecycle::Suspects;
use spiderpool_core::select::CniDefaults;
use spiderpool_store::k8s::crd::crds_yaml;
use spiderpool_store::k8s::{KubeStore, KubeStoreOptions};
use spiderpool_store::testing::{cpu_seconds, KubeServer};
use spiderpool_store::AnyStore;

const ALLOCATIONS: usize = 1000;
const GC_ROUNDS: usize = 3;

fn apply(s: &KubeServer, y: &str) {
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], y);
    assert!(ok, "{err}");
}

/// Requests by (verb, resource, code), for the breakdown.
fn by_kind(s: &KubeServer) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
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
        let key = format!(
            "{} {}{} {}",
            field("verb"),
            field("resource"),
            match field("subresource").as_str() {
                "" => String::new(),
                sub => format!("/{sub}"),
            },
            field("code")
        );
        *out.entry(key).or_insert(0.0) += n;
    }
    out
}

/// Every request the API server has answered, and the watch requests among them.
fn requests(s: &KubeServer) -> (f64, f64) {
    let mut all = 0.0;
    let mut watches = 0.0;
    for l in s
        .get_raw("/metrics", "text/plain")
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let n: f64 = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        all += n;
        if l.contains("verb=\"WATCH\"") {
            watches += n;
        }
    }
    (all, watches)
}

fn cpu(s: &KubeServer) -> f64 {
    s.pids().into_iter().map(cpu_seconds).sum()
}

struct Row {
    agents: usize,
    add_per_sec: f64,
    cpu_ms_per_alloc: f64,
    requests_per_alloc: f64,
    gc_requests_per_agent_round: f64,
}

async fn run(n: usize) -> Row {
    let s = KubeServer::start().expect("the envtest kube-apiserver (KUBEBUILDER_ASSETS)");
    s.install_crds(&crds_yaml()).expect("CRDs");
    let mut y = String::from(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: scale}\nspec: {subnet: 10.40.0.0/16, ips: [10.40.0.1-10.40.3.232]}\n",
    );
    for i in 0..n {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-{i}}}\n"
        ));
    }
    y.push_str("---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: default}\n");
    apply(&s, &y);
    let kc = s.kubeconfig();
    let (watch, server) = spiderpool_store::k8s::client(Some(&kc))
        .await
        .expect("client");
    let (req, _) = spiderpool_store::k8s::request_client(Some(&kc))
        .await
        .expect("client");
    // The pods, created 20 at a time (kubectl apply of 1,000 objects is far slower).
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(req.clone(), "default");
    let made = futures::stream::iter(0..ALLOCATIONS)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let p: k8s_openapi::api::core::v1::Pod =
                    serde_json::from_value(serde_json::json!({
                        "metadata": {"name": format!("pod-{i}"), "namespace": "default"},
                        "spec": {"nodeName": format!("node-{}", i % n),
                                 "containers": [{"name": "app", "image": "busybox"}]}
                    }))
                    .expect("pod");
                pods.create(&Default::default(), &p).await.map(|_| ())
            }
        })
        .buffer_unordered(20)
        .collect::<Vec<_>>()
        .await;
    assert!(
        made.iter().all(|r| r.is_ok()),
        "{:?}",
        made.iter().find(|r| r.is_err())
    );
    // `SCALE_BLOCKS=shared`: the store before node-affine blocks (no owner, no preference).
    let shared = std::env::var("SCALE_BLOCKS").is_ok_and(|v| v == "shared");
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        let node = format!("node-{i}");
        let opts = KubeStoreOptions {
            server: server.clone(),
            node: (!shared).then(|| node.clone()),
            ..Default::default()
        };
        let store = KubeStore::connect(watch.clone(), opts)
            .await
            .expect("store");
        let view = KubeView::start(
            watch.clone(),
            req.clone(),
            server.clone(),
            &node,
            Duration::from_secs(120),
        )
        .await
        .expect("view");
        agents.push(Arc::new(Agent::new(node, AnyStore::Kube(store), view)));
    }
    // Every agent's view holds its pods.
    for (i, a) in agents.iter().enumerate() {
        let want = (ALLOCATIONS + n - 1 - i) / n;
        let t0 = Instant::now();
        while a.view.snapshot().pods.len() < want {
            assert!(t0.elapsed() < Duration::from_secs(120), "pods not seen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (r0, w0) = requests(&s);
    let k0 = by_kind(&s);
    let c0 = cpu(&s);
    let t0 = Instant::now();
    let adds = futures::stream::iter(0..ALLOCATIONS)
        .map(|i| {
            let a = agents[i % n].clone();
            async move {
                let req = AddRequest {
                    attachment: Attachment {
                        container_id: format!("c-{i}"),
                        ifname: "eth0".into(),
                    },
                    netns: String::new(),
                    pod: Some(PodRef {
                        namespace: "default".into(),
                        name: format!("pod-{i}"),
                        uid: String::new(),
                    }),
                    cni: CniDefaults {
                        default_ipv4_ippool: vec!["scale".into()],
                        ..Default::default()
                    },
                };
                spiderpool_agent::ipam::add(&a, &req).await
            }
        })
        .buffer_unordered(10)
        .collect::<Vec<_>>()
        .await;
    let elapsed = t0.elapsed();
    let failed = adds.iter().filter(|r| r.is_err()).count();
    assert_eq!(
        failed,
        0,
        "ADDs failed: {:?}",
        adds.iter().find(|r| r.is_err())
    );
    // The status projectors finish (they run every second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (r1, w1) = requests(&s);
    let c1 = cpu(&s);
    if std::env::var_os("SCALE_BREAKDOWN").is_some() {
        for (k, v) in by_kind(&s) {
            let d = v - k0.get(&k).copied().unwrap_or(0.0);
            if d >= 1.0 {
                eprintln!("N={n} {k}: {:.2} per allocation", d / ALLOCATIONS as f64);
            }
        }
    }

    let mut suspects: Vec<Suspects> = (0..n).map(|_| Suspects::default()).collect();
    let (g0, gw0) = requests(&s);
    for _ in 0..GC_ROUNDS {
        for (a, sus) in agents.iter().zip(suspects.iter_mut()) {
            let freed = spiderpool_agent::gc::round(a, sus, &Default::default())
                .await
                .expect("GC round");
            assert!(freed.is_empty(), "GC freed live pods' addresses");
        }
    }
    let (g1, gw1) = requests(&s);
    // Requests that are not watches (re-listing watches are not GC's).
    let gc_requests = (g1 - gw1) - (g0 - gw0);
    Row {
        agents: n,
        add_per_sec: ALLOCATIONS as f64 / elapsed.as_secs_f64(),
        cpu_ms_per_alloc: (c1 - c0) * 1000.0 / ALLOCATIONS as f64,
        requests_per_alloc: ((r1 - w1) - (r0 - w0)) / ALLOCATIONS as f64,
        gc_requests_per_agent_round: gc_requests / (n * GC_ROUNDS) as f64,
    }
}

fn main() {
    let ns: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ns = if ns.is_empty() { vec![10, 50, 100] } else { ns };
    if spiderpool_store::testing::envtest_dir().is_none() {
        eprintln!("SKIPPED: no envtest kube-apiserver (KUBEBUILDER_ASSETS or ../shared/envtest)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    for n in ns {
        rows.push(rt.block_on(run(n)));
    }
    println!(
        "\n{ALLOCATIONS} ADDs (ipam::add, 10 at a time) then {GC_ROUNDS} GC rounds on every agent, one pool of {ALLOCATIONS}, all pods alive\n"
    );
    println!("| agents | ADD/s | API requests per allocation | API server + etcd CPU per allocation | API requests per GC round per agent |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} ms | {:.2} |",
            r.agents,
            r.add_per_sec,
            r.requests_per_alloc,
            r.cpu_ms_per_alloc,
            r.gc_requests_per_agent_round
        );
    }
    let (first, last) = (&rows[0], &rows[rows.len() - 1]);
    println!(
        "\nCPU per allocation N={} -> N={}: {:.2}x (target: within 1.5x)",
        first.agents,
        last.agents,
        last.cpu_ms_per_alloc / first.cpu_ms_per_alloc.max(1e-9)
    );
}
