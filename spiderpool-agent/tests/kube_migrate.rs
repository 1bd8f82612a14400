//! `spiderctl migrate` on the real API server, from objects in Spiderpool v1.2's exact format
//! (its CRDs for the shared kinds, `testdata/spiderpool-v1.2/crds.yaml`; pool statuses and
//! SpiderEndpoints as its agent writes them, with the pods' real UIDs): 1,000 allocations over
//! two zone pools, a StatefulSet and a SpiderSubnet auto-pool, plus the inconsistencies a
//! crashed Spiderpool leaves. The migration refuses while Spiderpool runs, a dry run changes
//! nothing, runs killed at four points and rerun end in the same state, our agent then serves
//! the migrated pods (DEL frees, CHECK passes, a new sandbox keeps the address, a StatefulSet
//! pod keeps its, GC frees the gone pod's, nothing imported is handed out again), and the
//! rollback gives Spiderpool its format, CRDs and webhooks back.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::kube::wait_for;
use common::{cni, env_for, netconf, testdata, workspace_bin, Agent};
use serde_json::{json, Value};
use spiderpool_store::testing::KubeServer;

fn spiderctl(s: &KubeServer, args: &[&str], crash: Option<&str>) -> (i32, String, String) {
    let mut c = Command::new(workspace_bin("spiderctl", "spiderpool-agent"));
    c.args(["migrate"])
        .args(args)
        .arg("--kubeconfig")
        .arg(s.kubeconfig())
        .args(["--settle-ms", "300"]);
    if let Some(step) = crash {
        c.env("SPIDERCTL_MIGRATE_CRASH_AFTER", step);
    }
    let out = c.output().expect("spiderctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn apply(s: &KubeServer, items: Vec<Value>) {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    let (ok, _, err) = s.kubectl(&["create", "-f", "-"], &list.to_string());
    assert!(ok, "{err}");
}

/// Creates many namespaced objects of one kind at once through the API (kubectl sends them one
/// by one under its client-side rate limit).
fn create_many(
    s: &KubeServer,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    items: Vec<Value>,
) {
    use kube::api::{Api, DynamicObject, PostParams};
    use kube::core::{ApiResource, GroupVersionKind};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let (client, _) = spiderpool_store::k8s::request_client(Some(&s.kubeconfig()))
            .await
            .expect("client");
        let ar =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: Api<DynamicObject> = Api::namespaced_with(client, "default", &ar);
        let mut set = tokio::task::JoinSet::new();
        for chunk in items.chunks(items.len().div_ceil(16).max(1)) {
            let (api, chunk) = (api.clone(), chunk.to_vec());
            set.spawn(async move {
                for v in chunk {
                    let o: DynamicObject = serde_json::from_value(v).expect("object");
                    api.create(&PostParams::default(), &o)
                        .await
                        .expect("created");
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("task");
        }
    });
}

fn get_json(s: &KubeServer, args: &[&str]) -> Value {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    let (ok, out, err) = s.kubectl(&a, "");
    assert!(ok, "{err}");
    serde_json::from_str(&out).expect("json")
}

fn patch_status(s: &KubeServer, what: &[&str], body: &Value) {
    let mut a = vec!["patch"];
    a.extend_from_slice(what);
    let b = body.to_string();
    a.extend_from_slice(&["--subresource=status", "--type=merge", "-p", &b]);
    let (ok, _, err) = s.kubectl(&a, "");
    assert!(ok, "{err}");
}

/// (pod, ip, pool, node, owner kind)
type Alloc = (String, String, String, String, &'static str);

fn allocations() -> Vec<Alloc> {
    let mut out = Vec::new();
    let v4 = |base: [u8; 3], i: usize| {
        let n = u32::from(std::net::Ipv4Addr::new(base[0], base[1], base[2], 0)) + i as u32;
        std::net::Ipv4Addr::from(n).to_string()
    };
    for i in 0..600 {
        out.push((
            format!("app-{i}"),
            v4([10, 6, 1], i),
            "v4-a".into(),
            "node-a".into(),
            "ReplicaSet",
        ));
    }
    for i in 0..300 {
        out.push((
            format!("bpp-{i}"),
            v4([10, 7, 1], i),
            "v4-b".into(),
            "node-b".into(),
            "ReplicaSet",
        ));
    }
    for i in 0..60 {
        out.push((
            format!("db-{i}"),
            v4([10, 6, 4], i),
            "v4-a".into(),
            "node-a".into(),
            "StatefulSet",
        ));
    }
    for i in 0..40 {
        out.push((
            format!("web-{i}"),
            v4([10, 8, 0], i + 1),
            "auto4-web-eth0-abcde".into(),
            "node-b".into(),
            "ReplicaSet",
        ));
    }
    out
}

/// Spiderpool v1.2 with 1,000 allocations (and three inconsistencies), its agent DaemonSet
/// "running", its webhook registered. Returns pod name -> UID.
fn spiderpool_cluster(s: &KubeServer) -> BTreeMap<String, String> {
    let crds = std::fs::read_to_string(testdata("spiderpool-v1.2/crds.yaml")).expect("fixture");
    s.install_crds(&crds).expect("Spiderpool's CRDs");
    apply(
        s,
        vec![
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": "default"}}),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"}}),
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": "default"},
               "spec": {"replicas": 60, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                        "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}),
        ],
    );
    let sts_uid = get_json(s, &["statefulset", "db"])["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let allocs = allocations();
    let mut pods: Vec<Value> = allocs
        .iter()
        .map(|(pod, _, _, node, kind)| {
            let owner = if *kind == "StatefulSet" {
                json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": sts_uid, "controller": true})
            } else {
                json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "3f0c6f4e-0000-4000-8000-000000000001", "controller": true})
            };
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": pod, "namespace": "default", "ownerReferences": [owner]},
                   "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}})
        })
        .collect();
    pods.push(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "late-1", "namespace": "default"},
                     "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "busybox"}]}}));
    create_many(s, "", "v1", "Pod", "pods", pods);
    let uids: BTreeMap<String, String> = get_json(s, &["pods", "-n", "default"])["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    let mut status: BTreeMap<&str, BTreeMap<String, Value>> = BTreeMap::new();
    let mut endpoints = Vec::new();
    for (pod, ip, pool, node, kind) in &allocs {
        let uid = &uids[pod];
        status.entry(pool).or_default().insert(
            ip.clone(),
            json!({"interface": "eth0", "pod": format!("default/{pod}"), "podUid": uid}),
        );
        let (owner_type, owner_name) = if *kind == "StatefulSet" {
            ("StatefulSet", "db")
        } else {
            ("Deployment", "app")
        };
        endpoints.push(endpoint(pod, uid, node, ip, pool, owner_type, owner_name));
    }
    // A crashed Spiderpool's leftovers: an address in two pools' status (the second for a pod
    // that is gone), a record whose pod is gone, an endpoint whose pool record was never written.
    status.entry("v4-b").or_default().insert(
        "10.6.1.5".into(),
        json!({"interface": "eth0", "pod": "default/ghost", "podUid": "0000-ghost"}),
    );
    status.entry("v4-a").or_default().insert(
        "10.6.3.200".into(),
        json!({"interface": "eth0", "pod": "default/gone-1", "podUid": "0000-gone"}),
    );
    endpoints.push(endpoint(
        "late-1",
        &uids["late-1"],
        "node-a",
        "10.6.3.201",
        "v4-a",
        "Pod",
        "late-1",
    ));
    apply(
        s,
        vec![
            pool("v4-a", "10.6.0.0/16", "10.6.1.0-10.6.4.255", json!({})),
            pool("v4-b", "10.7.0.0/16", "10.7.1.0-10.7.2.255", json!({})),
            pool(
                "auto4-web-eth0-abcde",
                "10.8.0.0/16",
                "10.8.0.1-10.8.0.40",
                json!({
            "ipam.spidernet.io/owner-spider-subnet": "subnet-v4",
            "ipam.spidernet.io/owner-application-gv": "apps_v1",
            "ipam.spidernet.io/owner-application-kind": "Deployment",
            "ipam.spidernet.io/owner-application-namespace": "default",
            "ipam.spidernet.io/owner-application-name": "web",
            "ipam.spidernet.io/owner-application-uid": "9608de8b-fe9b-4a20-9d7c-6b26cd19032e",
            "ipam.spidernet.io/ip-version": "IPv4",
            "ipam.spidernet.io/interface": "eth0",
            "ipam.spidernet.io/ippool-reclaim": "true"}),
            ),
            json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderSubnet", "metadata": {"name": "subnet-v4"},
               "spec": {"subnet": "10.8.0.0/16", "ips": ["10.8.0.1-10.8.0.254"]}}),
            json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderCoordinator", "metadata": {"name": "default"},
               "spec": {"mode": "underlay", "podCIDRType": "none"}}),
        ],
    );
    for (p, entries) in &status {
        let n = entries.len();
        patch_status(
            s,
            &["sp", p],
            &json!({"status": {"allocatedIPs": serde_json::to_string(entries).expect("json"), "allocatedIPCount": n, "totalIPCount": 1024}}),
        );
    }
    patch_status(
        s,
        &["ss", "subnet-v4"],
        &json!({"status": {"controlledIPPools": "{\"auto4-web-eth0-abcde\":{\"ips\":[\"10.8.0.1-10.8.0.40\"],\"application\":\"apps_v1_Deployment_default_web\"}}", "totalIPCount": 254, "allocatedIPCount": 40}}),
    );
    patch_status(
        s,
        &["spidercoordinator", "default"],
        &json!({"status": {"phase": "Synced", "reason": "kept by the backup", "serviceCIDR": ["10.96.0.0/12"]}}),
    );
    create_many(
        s,
        "spiderpool.spidernet.io",
        "v2beta1",
        "SpiderEndpoint",
        "spiderendpoints",
        endpoints,
    );
    spiderpool_workloads(s);
    uids
}

fn endpoint(
    pod: &str,
    uid: &str,
    node: &str,
    ip: &str,
    pool: &str,
    owner_type: &str,
    owner_name: &str,
) -> Value {
    json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderEndpoint",
           "metadata": {"name": pod, "namespace": "default", "finalizers": ["spiderpool.spidernet.io"]},
           "status": {"current": {"uid": uid, "node": node, "ips": [{"interface": "eth0", "ipv4": format!("{ip}/16"),
                       "ipv4Pool": pool, "ipv4Gateway": "10.6.0.1", "vlan": 0, "cleanGateway": false}]},
                      "ownerControllerType": owner_type, "ownerControllerName": owner_name}})
}

fn pool(name: &str, subnet: &str, ips: &str, labels: Value) -> Value {
    json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
           "metadata": {"name": name, "labels": labels, "finalizers": ["spiderpool.spidernet.io"]},
           "spec": {"subnet": subnet, "ips": [ips], "ipVersion": 4}})
}

/// Spiderpool's agent DaemonSet and controller "running" (ready pods in their status) and its
/// webhook registered, unserved (`failurePolicy: Fail`).
fn spiderpool_workloads(s: &KubeServer) {
    let tmpl = |img: &str| json!({"metadata": {"labels": {"app": "sp"}}, "spec": {"containers": [{"name": "c", "image": img}]}});
    apply(
        s,
        vec![
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "spiderpool-agent", "namespace": "kube-system"},
               "spec": {"selector": {"matchLabels": {"app": "sp"}}, "template": tmpl("ghcr.io/spidernet-io/spiderpool/spiderpool-agent:v1.2.2")}}),
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "spiderpool-controller", "namespace": "kube-system"},
               "spec": {"selector": {"matchLabels": {"app": "sp"}}, "template": tmpl("ghcr.io/spidernet-io/spiderpool/spiderpool-controller:v1.2.2")}}),
            json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration", "metadata": {"name": "spiderpool-controller"},
               "webhooks": [{"name": "spiderippool.spiderpool.spidernet.io", "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
                             "clientConfig": {"service": {"namespace": "kube-system", "name": "spiderpool-controller", "port": 5722, "path": "/mutate"}},
                             "rules": [{"apiGroups": ["spiderpool.spidernet.io"], "apiVersions": ["v2beta1"], "operations": ["CREATE", "UPDATE"], "resources": ["spiderippools"]}]}]}),
        ],
    );
    patch_status(
        s,
        &["-n", "kube-system", "daemonset", "spiderpool-agent"],
        &json!({"status": {"numberReady": 2, "desiredNumberScheduled": 2, "currentNumberScheduled": 2, "numberMisscheduled": 0}}),
    );
    patch_status(
        s,
        &["-n", "kube-system", "deployment", "spiderpool-controller"],
        &json!({"status": {"readyReplicas": 1, "replicas": 1}}),
    );
}

fn stop_spiderpool(s: &KubeServer) {
    patch_status(
        s,
        &["-n", "kube-system", "daemonset", "spiderpool-agent"],
        &json!({"status": {"numberReady": 0}}),
    );
    patch_status(
        s,
        &["-n", "kube-system", "deployment", "spiderpool-controller"],
        &json!({"status": {"readyReplicas": 0}}),
    );
}

/// address -> (pod, pool, container) from the SpiderIPBlocks.
fn blocks(s: &KubeServer) -> BTreeMap<String, (String, String, String)> {
    common::kube::records(s)
        .into_iter()
        .map(|(ip, r)| {
            (
                ip,
                (
                    r["pod"].as_str().unwrap_or_default().to_string(),
                    r["pool"].as_str().unwrap_or_default().to_string(),
                    r["containerID"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect()
}

fn block_versions(s: &KubeServer) -> Vec<String> {
    let v = get_json(s, &["spideripblocks"]);
    let mut out: Vec<String> = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            b["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_running_spiderpool_is_taken_over_in_place_and_given_back() {
    let Some(s) = KubeServer::start() else { return };
    let uids = spiderpool_cluster(&s);

    // Refused while Spiderpool runs, naming what to stop.
    let (code, _, err) = spiderctl(&s, &["from-spiderpool"], None);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("DaemonSet kube-system/spiderpool-agent has 2 ready pods")
            && err.contains(
                "kubectl -n kube-system scale deployment spiderpool-controller --replicas=0"
            ),
        "{err}"
    );
    stop_spiderpool(&s);

    // A dry run reports every inconsistency and changes nothing.
    let before = get_json(&s, &["sp"]);
    let (code, out, err) = spiderctl(&s, &["from-spiderpool", "--dry-run"], None);
    assert_eq!(code, 1, "{out}{err}");
    for kind in [
        "[address-in-two-pools] 10.6.1.5",
        "[pod-gone] 10.6.3.200",
        "[endpoint-without-pool-record] 10.6.3.201",
        "would delete Spiderpool's MutatingWebhookConfiguration spiderpool-controller",
        "would mark auto-pool auto4-web-eth0-abcde",
        "1002 to import in 3 pools",
    ] {
        assert!(out.contains(kind), "{kind} missing from:\n{out}");
    }
    assert_eq!(
        get_json(&s, &["sp"]),
        before,
        "the dry run changed the pools"
    );
    let (ok, _, _) = s.kubectl(
        &["get", "crd", "spideripblocks.spiderpool.spidernet.io"],
        "",
    );
    assert!(!ok, "the dry run installed a CRD");

    // Killed at four points (as kill -9 would), each time run again.
    for step in ["backup", "crds", "import-half", "import"] {
        let (code, out, err) = spiderctl(&s, &["from-spiderpool"], Some(step));
        assert_ne!(code, 0, "crash point {step} did not stop it:\n{out}{err}");
        assert!(err.contains(&format!("crash point after {step}")), "{err}");
    }
    let (code, out, err) = spiderctl(&s, &["from-spiderpool"], None);
    assert_eq!(
        code, 1,
        "findings are reported, the run completes:\n{out}{err}"
    );
    assert!(
        out.contains("checked: every imported address (1002) is held by the same pod, each once"),
        "{out}"
    );

    // Every address held by the same pod as in Spiderpool, once.
    let held = blocks(&s);
    assert_eq!(held.len(), 1002);
    for (pod, ip, pool, _, _) in allocations() {
        let (p, pl, c) = &held[&ip];
        assert_eq!(
            (p.as_str(), pl.as_str()),
            (format!("default/{pod}").as_str(), pool.as_str()),
            "{ip}"
        );
        assert_eq!(c, &format!("spiderpool-import-{}", uids[&pod]));
    }
    assert_eq!(
        held["10.6.1.5"].0, "default/app-5",
        "the endpoint's pool wins the duplicate"
    );
    let versions = block_versions(&s);
    let (code, out, _) = spiderctl(&s, &["from-spiderpool"], None);
    assert_eq!(code, 1, "{out}");
    assert_eq!(block_versions(&s), versions, "a rerun changed the blocks");

    // Converted as the switch needs: CRDs ours, the webhook gone, the auto-pool marked, the
    // endpoints' finalizer off, the field only Spiderpool's schema has pruned (kept in the backup).
    let crd = get_json(&s, &["crd", "spiderendpoints.spiderpool.spidernet.io"]);
    assert!(
        crd["spec"]["versions"][0]["subresources"]["status"].is_null(),
        "our SpiderEndpoint CRD, like Spiderpool's, has no status subresource"
    );
    let (ok, _, _) = s.kubectl(
        &[
            "get",
            "mutatingwebhookconfiguration",
            "spiderpool-controller",
        ],
        "",
    );
    assert!(!ok, "Spiderpool's webhook is still registered");
    let auto = get_json(&s, &["sp", "auto4-web-eth0-abcde"]);
    assert_eq!(
        auto["metadata"]["labels"]["ipam.spidernet.io/app-uid"],
        "9608de8b-fe9b-4a20-9d7c-6b26cd19032e"
    );
    assert_eq!(
        auto["metadata"]["labels"]["ipam.spidernet.io/ip-version"],
        "4"
    );
    assert!(get_json(&s, &["se", "app-1"])["metadata"]["finalizers"].is_null());
    assert!(
        get_json(&s, &["spidercoordinator", "default"])["status"]["reason"].is_null(),
        "our schema prunes status.reason"
    );
    let counts = get_json(&s, &["sp", "v4-a"]);
    assert_eq!(counts["status"]["allocatedIPCount"], 662);

    serve_migrated_pods(&s, &uids, &held);

    // Back to Spiderpool: its format, CRDs and webhook; no blocks.
    let (code, out, err) = spiderctl(&s, &["to-spiderpool"], None);
    assert_eq!(code, 0, "{out}{err}");
    let crd = get_json(&s, &["crd", "spiderendpoints.spiderpool.spidernet.io"]);
    assert!(
        crd["spec"]["versions"][0]["subresources"].is_null(),
        "Spiderpool's SpiderEndpoint CRD has no status subresource"
    );
    assert_eq!(
        get_json(&s, &["spidercoordinator", "default"])["status"]["reason"],
        "kept by the backup"
    );
    let (ok, _, _) = s.kubectl(
        &[
            "get",
            "mutatingwebhookconfiguration",
            "spiderpool-controller",
        ],
        "",
    );
    assert!(ok, "Spiderpool's webhook is back");
    let (ok, _, _) = s.kubectl(
        &["get", "crd", "spideripblocks.spiderpool.spidernet.io"],
        "",
    );
    assert!(!ok, "the SpiderIPBlock CRD is gone");
    let a = get_json(&s, &["sp", "v4-a"]);
    let ips: BTreeMap<String, Value> =
        serde_json::from_str(a["status"]["allocatedIPs"].as_str().unwrap_or_default())
            .expect("Spiderpool's format");
    assert_eq!(
        ips["10.6.1.3"],
        json!({"interface": "eth0", "pod": "default/app-3", "podUid": uids["app-3"]})
    );
    assert!(
        !ips.contains_key("10.6.1.1"),
        "the DEL'd address is free for Spiderpool too"
    );
    assert!(!ips.contains_key("10.6.3.200"), "GC freed the gone pod's");
    assert_eq!(
        a["status"]["allocatedIPCount"].as_u64(),
        Some(ips.len() as u64)
    );
    let auto = get_json(&s, &["sp", "auto4-web-eth0-abcde"]);
    assert_eq!(
        auto["metadata"]["labels"]["ipam.spidernet.io/ip-version"],
        "IPv4"
    );
}

/// Our agent on node-a serves the migrated pods as its own.
fn serve_migrated_pods(
    s: &KubeServer,
    uids: &BTreeMap<String, String>,
    held: &BTreeMap<String, (String, String, String)>,
) {
    let dir = tempfile::tempdir().expect("tmp");
    let mut a = Agent::start(
        &dir.path().join("a.sock"),
        &dir.path().join("a.log"),
        &[
            "--node-name",
            "node-a",
            "--kube",
            "--kubeconfig",
            &s.kubeconfig().to_string_lossy(),
            "--store",
            "kube",
            "--gc-interval-ms",
            "300",
        ]
        .map(String::from),
    );
    let conf = netconf(
        "1.0.0",
        "macvlan-conf",
        &a.sock(),
        json!({"default_ipv4_ippool": ["v4-a"]}),
    )
    .to_string();
    let args = |pod: &str| {
        format!(
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_UID={}",
            uids[pod]
        )
    };
    let run = |cmd: &str, container: &str, pod: &str| {
        cni(
            &env_for(cmd, container, "eth0", &args(pod)),
            conf.as_bytes(),
        )
    };
    // CHECK of the running sandbox passes; DEL frees.
    let check = run("CHECK", "sandbox-app-2", "app-2");
    assert_eq!(check.code(), 0, "{}\n{}", check.stdout, a.log_text());
    let del = run("DEL", "sandbox-app-1", "app-1");
    assert_eq!(del.code(), 0, "{}", del.stdout);
    // A new sandbox of a pod keeps its address; so does a StatefulSet pod's.
    let add = run("ADD", "sandbox-app-3-new", "app-3");
    assert!(
        add.stdout.contains("\"10.6.1.3/16\""),
        "{}\n{}",
        add.stdout,
        a.log_text()
    );
    let add = run("ADD", "sandbox-db-0-new", "db-0");
    assert!(
        add.stdout.contains("\"10.6.4.0/16\""),
        "{}\n{}",
        add.stdout,
        a.log_text()
    );
    // A new pod never gets an imported address.
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "fresh", "namespace": "default", "annotations": {"ipam.spidernet.io/ippool": "{\"ipv4\":[\"v4-a\"]}"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "busybox"}]}}).to_string());
    assert!(ok, "{err}");
    let fresh = cni(
        &env_for(
            "ADD",
            "sandbox-fresh",
            "eth0",
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=fresh",
        ),
        conf.as_bytes(),
    );
    assert_eq!(fresh.code(), 0, "{}\n{}", fresh.stdout, a.log_text());
    let v: Value = serde_json::from_str(&fresh.stdout).expect("result");
    let got = v["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        !held.contains_key(&got) || got == "10.6.1.1",
        "{got} was imported for another pod"
    );
    // GC frees the record of the pod that is gone, keeps the live ones.
    wait_for(
        "GC frees the gone pod's imported address",
        Duration::from_secs(20),
        || !blocks(s).contains_key("10.6.3.200"),
        &|| a.log_text(),
    );
    let now = blocks(s);
    assert!(!now.contains_key("10.6.1.1"));
    assert_eq!(
        now["10.6.1.2"].2,
        format!("spiderpool-import-{}", uids["app-2"])
    );
    assert_eq!(now["10.6.1.3"].2, "sandbox-app-3-new");
    a.terminate();
}
