//! Fixed IPs for an application, on the real API server: from the first ADD of a new
//! 10-replica Deployment to all 10 addresses allocated, and a scale 10 -> 50, through the
//! `spiderpool` plugin and agent, (a) ours: the agent makes or grows the auto-pool within the ADD
//! (no controller running), vs (b) the baseline Spiderpool's agent follows: the pool is made by a
//! separate controller (ours, reconciling every 100 ms, as fast as an informer) and the agent
//! polls for it every 2 s before allocating (Spiderpool: up to 25 x 2 s).
//!
//! Run: `cargo bench -p spiderpool-agent --bench autopool` (needs the envtest kube-apiserver:
//! `KUBEBUILDER_ASSETS` or ../shared/envtest, etcd, kubectl).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{cni, env_for, netconf, Agent};
use spiderpool_store::k8s::crd::crds_yaml;
use spiderpool_store::testing::KubeServer;

const SUBNET: &str = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderSubnet\nmetadata: {name: subnet-16}\nspec: {subnet: 10.16.0.0/16, ips: [10.16.0.10-10.16.1.9], gateway: 10.16.0.1}\n";
const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: default}\n";

fn apply(s: &KubeServer, y: &str) {
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], y);
    assert!(ok, "{err}");
}

/// A Deployment, its ReplicaSet and pods `from..to`, in one `kubectl apply` (as the controller
/// manager would make them; owner uids are placeholders: nothing here checks them).
fn application(s: &KubeServer, app: &str, from: usize, to: usize, replicas: usize) {
    let mut y = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {app}, namespace: default}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {app}}}}}\n  template:\n    metadata:\n      labels: {{app: {app}}}\n      annotations:\n        ipam.spidernet.io/subnet: '{{\"ipv4\": [\"subnet-16\"]}}'\n    spec: {{containers: [{{name: app, image: busybox}}]}}\n---\napiVersion: apps/v1\nkind: ReplicaSet\nmetadata:\n  name: {app}-rs\n  namespace: default\n  ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: {app}, uid: 00000000-0000-0000-0000-000000000001, controller: true}}]\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {app}}}}}\n  template:\n    metadata: {{labels: {{app: {app}}}}}\n    spec: {{containers: [{{name: app, image: busybox}}]}}\n"
    );
    for i in from..to {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {app}-{i}\n  namespace: default\n  annotations:\n    ipam.spidernet.io/subnet: '{{\"ipv4\": [\"subnet-16\"]}}'\n  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {app}-rs, uid: 00000000-0000-0000-0000-000000000002, controller: true}}]\nspec:\n  nodeName: node-1\n  containers: [{{name: app, image: busybox}}]\n"
        ));
    }
    apply(s, &y);
}

fn pool_size(s: &KubeServer, app: &str) -> i64 {
    let (_, out, _) = s.kubectl(
        &[
            "get",
            "sp",
            "-l",
            &format!("ipam.spidernet.io/app-name={app}"),
            "-o",
            "jsonpath={.items[0].spec.ips}",
        ],
        "",
    );
    let ips: Vec<String> = serde_json::from_str(&out).unwrap_or_default();
    let n = |ip: &str| ip.parse::<std::net::Ipv4Addr>().map(u32::from).unwrap_or(0);
    ips.iter()
        .map(|e| match e.split_once('-') {
            Some((a, b)) => i64::from(n(b) - n(a) + 1),
            None => 1,
        })
        .sum()
}

/// ADDs pods `from..to` of `app`, 10 at a time; the time of the first answer and of the last.
fn add_all(sock: &str, app: &str, from: usize, to: usize) -> (Duration, Duration) {
    let t0 = Instant::now();
    let conf = netconf("1.0.0", "macvlan-conf", sock, serde_json::json!({})).to_string();
    let first = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for w in 0..10 {
            let (conf, first) = (&conf, &first);
            scope.spawn(move || {
                let mut i = from + w;
                while i < to {
                    let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={app}-{i}");
                    let r = cni(
                        &env_for("ADD", &format!("c-{app}-{i}"), "eth0", &args),
                        conf.as_bytes(),
                    );
                    assert_eq!(r.code(), 0, "{app}-{i}: {}", r.stdout);
                    first.lock().expect("lock").get_or_insert(t0.elapsed());
                    i += 10;
                }
            });
        }
    });
    let f = first.into_inner().expect("lock").unwrap_or_default();
    (f, t0.elapsed())
}

/// The baseline agent's wait: poll every 2 s until the controller's pool holds `n`.
fn poll_until(s: &KubeServer, app: &str, n: i64) -> Duration {
    let t0 = Instant::now();
    while pool_size(s, app) < n {
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the controller never made the pool"
        );
    }
    t0.elapsed()
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let Some(s) = KubeServer::start() else { return };
    s.install_crds(&crds_yaml()).expect("CRDs");
    apply(&s, NODE);
    apply(&s, SUBNET);
    let dir = tempfile::tempdir().expect("tmp");
    let kc = s.kubeconfig().to_string_lossy().into_owned();
    let agent = Agent::start(
        &dir.path().join("a.sock"),
        &dir.path().join("a.log"),
        &[
            "--node-name",
            "node-1",
            "--kube",
            "--kubeconfig",
            &kc,
            "--store",
            "kube",
        ]
        .map(String::from),
    );
    let sock = agent.sock();

    // Times run from the `kubectl apply` of the application (Deployment, ReplicaSet, pods),
    // as a kubelet's first ADD follows the pod's creation.
    // (a) ours: no controller; the agent makes and grows the pool within the ADDs.
    let t0 = Instant::now();
    application(&s, "ours", 0, 10, 10);
    let (first, all) = add_all(&sock, "ours", 0, 10);
    let (first_a, all_a) = (t0.elapsed() - all + first, t0.elapsed());
    let t1 = Instant::now();
    application(&s, "ours", 10, 50, 50);
    add_all(&sock, "ours", 10, 50);
    let scale_a = t1.elapsed();
    let mut rows = vec![(
        "ours: pool made/grown within the ADD (no controller)".to_string(),
        first_a,
        all_a,
        scale_a,
    )];

    // (b) baseline: a controller makes the pool, the agent polls for it every 2 s; with the
    // controller reconciling every 100 ms (as quick as an informer) and every 1 s.
    for (i, every) in [100u64, 1000].into_iter().enumerate() {
        let log = std::fs::File::create(dir.path().join(format!("c{i}.log"))).expect("log");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .to_string();
        let mut controller = std::process::Command::new(common::workspace_bin(
            "spiderpool-controller",
            "spiderpool-controller",
        ))
        .args([
            "--kubeconfig",
            &kc,
            "--webhook-addr",
            &addr,
            "--reconcile-interval-ms",
            &every.to_string(),
        ])
        .stderr(log)
        .spawn()
        .expect("controller");
        let t = Instant::now();
        while !std::fs::read_to_string(dir.path().join(format!("c{i}.log")))
            .unwrap_or_default()
            .contains("leading=true")
        {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the controller does not lead"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let app = format!("base{i}");
        let t0 = Instant::now();
        application(&s, &app, 0, 10, 10);
        poll_until(&s, &app, 11);
        let (first, all) = add_all(&sock, &app, 0, 10);
        let (first_b, all_b) = (t0.elapsed() - all + first, t0.elapsed());
        let t1 = Instant::now();
        application(&s, &app, 10, 50, 50);
        poll_until(&s, &app, 51);
        add_all(&sock, &app, 10, 50);
        let scale_b = t1.elapsed();
        let _ = controller.kill();
        let _ = controller.wait();
        // The next controller must not wait out this one's Lease.
        let _ = s.kubectl(
            &[
                "delete",
                "lease",
                "-n",
                "kube-system",
                "spiderpool-controller",
            ],
            "",
        );
        rows.push((
            format!(
                "baseline: a controller (every {every} ms) makes it, the agent polls every 2 s"
            ),
            first_b,
            all_b,
            scale_b,
        ));
    }

    println!("| flow | first address (ms) | all 10 (ms) | scale 10 -> 50, all 40 new (ms) |");
    println!("|---|---:|---:|---:|");
    for (name, f, a, sc) in &rows {
        println!("| {name} | {} | {} | {} |", ms(*f), ms(*a), ms(*sc));
    }
    let (_, f0, a0, s0) = rows[0];
    for (name, f, a, sc) in &rows[1..] {
        println!(
            "\nvs {name}: first address {:.1}x, all 10 {:.1}x, scale {:.1}x sooner",
            f.as_secs_f64() / f0.as_secs_f64(),
            a.as_secs_f64() / a0.as_secs_f64(),
            sc.as_secs_f64() / s0.as_secs_f64()
        );
    }
}
