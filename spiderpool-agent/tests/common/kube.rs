//! Fixtures for the Kubernetes-mode scenarios: the real API server with the seed's nodes and
//! pools applied, agents in Kubernetes mode, and helpers that read what `kubectl` shows.

use std::time::{Duration, Instant};

use spiderpool_store::k8s::crd::crds_yaml;
use spiderpool_store::testing::KubeServer;

use super::Agent;

pub const SEED_POOLS: &str = include_str!("../../../testdata/seed-pools.yaml");

pub fn seed_objects() -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: default}\n",
    );
    for (node, zone) in [
        ("controller-node-1", "subnet-6"),
        ("worker-node-1", "subnet-7"),
    ] {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {node}, labels: {{node-subnet: {zone}}}}}\n"
        ));
    }
    out
}

pub fn pod(name: &str, node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{app: test-app}}
  annotations:
    ipam.spidernet.io/ippool: '{{"ipv4": ["test-ippool-6", "test-ippool-7"]}}'
spec:
  nodeName: {node}
  containers: [{{name: app, image: busybox}}]
"#
    )
}

/// `kubectl get spiderippool` rows: name -> (allocated, total).
pub fn pool_counts(s: &KubeServer) -> Vec<(String, String, String)> {
    let (ok, out, err) = s.kubectl(
        &[
            "get",
            "spiderippool",
            "--no-headers",
            "-o",
            "custom-columns=N:.metadata.name,A:.status.allocatedIPCount,T:.status.totalIPCount",
        ],
        "",
    );
    assert!(ok, "{err}");
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[1].to_string(), f[2].to_string())
        })
        .collect()
}

pub fn wait_counts(s: &KubeServer, want: &[(&str, &str, &str)]) {
    let t0 = Instant::now();
    loop {
        let got = pool_counts(s);
        let want: Vec<(String, String, String)> = want
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
        if got == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "kubectl get spiderippool: {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub struct Lab {
    pub server: KubeServer,
    pub dir: tempfile::TempDir,
}

pub fn lab() -> Option<Lab> {
    lab_with(&[])
}

pub fn lab_with(users: &[spiderpool_store::testing::KubeUser]) -> Option<Lab> {
    let server = KubeServer::start_with_users(users)?;
    server.install_crds(&crds_yaml()).expect("CRDs");
    let (ok, _, err) = server.kubectl(&["apply", "-f", "-"], &seed_objects());
    assert!(ok, "{err}");
    let (ok, _, err) = server.kubectl(&["apply", "-f", "-"], SEED_POOLS);
    assert!(ok, "{err}");
    Some(Lab {
        server,
        dir: tempfile::tempdir().expect("tmp"),
    })
}

impl Lab {
    pub fn agent(&self, node: &str) -> Agent {
        self.agent_as(node, &self.server.kubeconfig())
    }

    pub fn agent_as(&self, node: &str, kubeconfig: &std::path::Path) -> Agent {
        Agent::start(
            &self.dir.path().join(format!("{node}.sock")),
            &self.dir.path().join(format!("{node}.log")),
            &[
                "--node-name".into(),
                node.into(),
                "--kube".into(),
                "--kubeconfig".into(),
                kubeconfig.to_string_lossy().into_owned(),
                "--store".into(),
                "kube".into(),
            ],
        )
    }
}

/// Containers that hold a record in the API server.
/// Every allocation record in the SpiderIPBlocks, as (address, record).
pub fn records(s: &KubeServer) -> Vec<(String, serde_json::Value)> {
    let (ok, out, err) = s.kubectl(&["get", "spideripblocks", "-o", "json"], "");
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .flat_map(|b| {
            b["spec"]["allocations"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(ip, r)| (ip.clone(), r.clone()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// The containers holding records, sorted.
pub fn holders(s: &KubeServer) -> Vec<String> {
    let mut c: Vec<String> = records(s)
        .iter()
        .filter_map(|(_, r)| r["containerID"].as_str().map(str::to_string))
        .collect();
    c.sort();
    c
}

pub fn wait_for(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> bool,
    log: &dyn Fn() -> String,
) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}
