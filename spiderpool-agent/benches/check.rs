//! `spiderctl check` at 10,000 records, through the path operators run: the `spiderctl` binary
//! (a fresh process each run: client, LIST of every SpiderIPBlock, pool, subnet, endpoint,
//! StatefulSet and pod, the audit, the JSON report) against the real API server of envtest.
//! The records are written straight through the Kubernetes store (what agents write, without
//! the ADDs); 1,000 of their pods exist, the other 9,000 are leaks, so every record is judged
//! and 9,000 findings are printed.
//!
//! Run: `cargo bench -p spiderpool-agent --bench check [-- RECORDS]` (default 10000; needs the
//! envtest kube-apiserver: `KUBEBUILDER_ASSETS` or ../shared/envtest, etcd, kubectl).

use std::process::Command;
use std::time::Instant;

use futures::StreamExt;
use spiderpool_core::store::{Lease, LeaseStore, Owner, Txn};
use spiderpool_store::k8s::crd::crds_yaml;
use spiderpool_store::k8s::{KubeStore, KubeStoreOptions};
use spiderpool_store::testing::KubeServer;

const LIVE_PODS: usize = 1000;

fn ip(i: usize) -> std::net::IpAddr {
    let n = 0x0a14_0000u32 + 1 + u32::try_from(i).expect("small");
    std::net::IpAddr::V4(n.into())
}

async fn fill(s: &KubeServer, records: usize) {
    let kc = s.kubeconfig();
    let (client, server) = spiderpool_store::k8s::request_client(Some(&kc))
        .await
        .expect("client");
    let store = KubeStore::connect(
        client.clone(),
        KubeStoreOptions {
            server,
            status_interval: None,
            ..Default::default()
        },
    )
    .await
    .expect("store");
    for chunk in (0..records).collect::<Vec<_>>().chunks(256) {
        let claims = chunk
            .iter()
            .map(|&i| Lease {
                ip: ip(i),
                pool: "audit".into(),
                owner: Owner {
                    pod_namespace: "default".into(),
                    pod_name: format!("pod-{i}"),
                    // The live pods' records name no UID (their UIDs are the API server's).
                    pod_uid: if i < LIVE_PODS {
                        String::new()
                    } else {
                        format!("uid-{i}")
                    },
                    container_id: format!("c-{i}"),
                    ifname: "eth0".into(),
                    node: "node-0".into(),
                    network: "net".into(),
                    created: 1,
                },
                clean_gateway: false,
                revision: 0,
            })
            .collect();
        store
            .commit(Txn {
                claims,
                releases: Vec::new(),
            })
            .await
            .expect("records written");
    }
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, "default");
    let made = futures::stream::iter(0..LIVE_PODS.min(records))
        .map(|i| {
            let pods = pods.clone();
            async move {
                let p: k8s_openapi::api::core::v1::Pod =
                    serde_json::from_value(serde_json::json!({
                        "metadata": {"name": format!("pod-{i}"), "namespace": "default"},
                        "spec": {"nodeName": "node-0",
                                 "containers": [{"name": "app", "image": "busybox"}]}
                    }))
                    .expect("pod");
                pods.create(&Default::default(), &p).await.map(|_| ())
            }
        })
        .buffer_unordered(20)
        .collect::<Vec<_>>()
        .await;
    assert!(made.iter().all(Result::is_ok), "pods created");
}

fn main() {
    let records: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let s = KubeServer::start().expect("the envtest kube-apiserver (KUBEBUILDER_ASSETS)");
    s.install_crds(&crds_yaml()).expect("CRDs");
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: audit}\nspec: {subnet: 10.20.0.0/16, ips: [10.20.0.1-10.20.255.254]}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-0}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: default}\n",
    );
    assert!(ok, "{err}");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(fill(&s, records));
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release/spiderctl")
        .canonicalize()
        .or_else(|_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/debug/spiderctl")
                .canonicalize()
        })
        .expect("spiderctl built (cargo build --release -p spiderpool-agent --bins)");
    let mut times = Vec::new();
    let mut findings = 0;
    for _ in 0..5 {
        let t0 = Instant::now();
        let out = Command::new(&bin)
            .args(["check", "-o", "json", "--kubeconfig"])
            .arg(s.kubeconfig())
            .output()
            .expect("spiderctl runs");
        times.push(t0.elapsed().as_secs_f64());
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["checked"]["records"], records);
        findings = v["findings"].as_array().map_or(0, Vec::len);
        assert_eq!(
            findings,
            records - LIVE_PODS.min(records),
            "one leak per record without a pod"
        );
    }
    times.sort_by(f64::total_cmp);
    // The baseline: only the two reads an operator would do by hand to compare records with
    // pods (kubectl, JSON), without comparing anything.
    let mut by_hand = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        for what in ["spideripblocks", "pods"] {
            let (ok, _, err) = s.kubectl(&["get", what, "-A", "-o", "json"], "");
            assert!(ok, "{err}");
        }
        by_hand.push(t0.elapsed().as_secs_f64());
    }
    by_hand.sort_by(f64::total_cmp);
    println!(
        "spiderctl check ({}), {records} records, {} live pods",
        bin.display(),
        LIVE_PODS.min(records)
    );
    println!("| what | records | findings | median s | min s | max s |");
    println!("|---|---|---|---|---|---|");
    for (what, t, f) in [
        ("spiderctl check -o json", &times, findings.to_string()),
        (
            "baseline: kubectl get spideripblocks,pods -A -o json",
            &by_hand,
            "-".to_string(),
        ),
    ] {
        println!(
            "| {what} | {records} | {f} | {:.2} | {:.2} | {:.2} |",
            t[t.len() / 2],
            t[0],
            t[t.len() - 1]
        );
    }
    println!(
        "check / baseline (median): {:.2}x",
        times[times.len() / 2] / by_hand[by_hand.len() / 2]
    );
}
