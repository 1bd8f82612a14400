//! Kubernetes mode against the real API server (envtest's kube-apiserver + etcd): the seed's
//! `kubectl apply` of nodes, pools and pods, two agents (`--kube --store kube`) on two "nodes",
//! the CNI plugin's ADD/DEL, and `kubectl get spiderippool` showing the counts.
#![cfg(feature = "kube")]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{cni, env_for, netconf, testdata, Agent};
use spiderpool_store::k8s::crd::crds_yaml;
use spiderpool_store::testing::KubeServer;

const SEED_POOLS: &str = include_str!("../../testdata/seed-pools.yaml");

fn seed_objects() -> String {
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

fn pod(name: &str, node: &str) -> String {
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
fn pool_counts(s: &KubeServer) -> Vec<(String, String, String)> {
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

fn wait_counts(s: &KubeServer, want: &[(&str, &str, &str)]) {
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

struct Lab {
    server: KubeServer,
    dir: tempfile::TempDir,
}

fn lab() -> Option<Lab> {
    lab_with(&[])
}

fn lab_with(users: &[spiderpool_store::testing::KubeUser]) -> Option<Lab> {
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
    fn agent(&self, node: &str) -> Agent {
        self.agent_as(node, &self.server.kubeconfig())
    }

    fn agent_as(&self, node: &str, kubeconfig: &std::path::Path) -> Agent {
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

#[test]
fn seed_scenario_through_the_api_server() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    wait_counts(
        s,
        &[
            ("test-ippool-6", "<none>", "<none>"),
            ("test-ippool-7", "<none>", "<none>"),
        ],
    );
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &pod("test-app-j9ftl", "controller-node-1"),
    );
    assert!(ok, "{err}");
    // The second pod is created after its agent started: the agent fetches it at ADD if its
    // watch has not delivered it yet.
    let a6 = lab.agent("controller-node-1");
    let a7 = lab.agent("worker-node-1");
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &pod("test-app-nkq5h", "worker-node-1"),
    );
    assert!(ok, "{err}");

    let conf6 = netconf("1.0.0", "macvlan-conf", &a6.sock(), serde_json::json!({}));
    let conf7 = netconf("1.0.0", "macvlan-conf", &a7.sock(), serde_json::json!({}));
    let args6 = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=test-app-j9ftl;K8S_POD_UID=u6";
    let args7 = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=test-app-nkq5h;K8S_POD_UID=u7";
    let add6 = cni(
        &env_for("ADD", "c6", "eth0", args6),
        conf6.to_string().as_bytes(),
    );
    assert_eq!(add6.code(), 0, "{}\n{}", add6.stdout, a6.log_text());
    let add7 = cni(
        &env_for("ADD", "c7", "eth0", args7),
        conf7.to_string().as_bytes(),
    );
    assert_eq!(add7.code(), 0, "{}\n{}", add7.stdout, a7.log_text());
    assert!(add6.ip().starts_with("10.6.168.6"), "{}", add6.ip());
    assert!(add7.ip().starts_with("10.7.168.6"), "{}", add7.ip());
    // Each zone's pool: one allocated of ten, as the seed shows.
    wait_counts(
        s,
        &[("test-ippool-6", "1", "10"), ("test-ippool-7", "1", "10")],
    );
    // What the seed's `kubectl get spiderippool` prints, column for column.
    let (ok, out, err) = s.kubectl(&["get", "spiderippool"], "");
    assert!(ok, "{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec![
                "NAME",
                "VERSION",
                "SUBNET",
                "ALLOCATED-IP-COUNT",
                "TOTAL-IP-COUNT",
                "DEFAULT",
                "DISABLE"
            ],
            vec![
                "test-ippool-6",
                "4",
                "10.6.0.0/16",
                "1",
                "10",
                "false",
                "false"
            ],
            vec![
                "test-ippool-7",
                "4",
                "10.7.0.0/16",
                "1",
                "10",
                "false",
                "false"
            ],
        ]
    );
    let (ok, out, _) = s.kubectl(
        &[
            "get",
            "sp",
            "test-ippool-6",
            "-o",
            "jsonpath={.status.allocatedIPs}",
        ],
        "",
    );
    assert!(ok && out.contains("default/test-app-j9ftl"), "{out}");
    // The records are in the blocks, with kubectl.
    let (ok, out, _) = s.kubectl(&["get", "spideripblocks", "-o", "json"], "");
    assert!(ok && out.contains("\"containerID\": \"c6\""), "{out}");

    // A SpiderEndpoint per pod, in Spiderpool's shape.
    let endpoint = || {
        s.kubectl(
            &["get", "se", "test-app-j9ftl", "-n", "default", "-o",
              "jsonpath={.status.current.ips[0].ipv4} {.status.current.ips[0].ipv4Pool} {.status.current.node} {.status.current.uid}"],
            "",
        )
        .1
    };
    wait_for(
        "SpiderEndpoint",
        Duration::from_secs(15),
        || endpoint() == format!("{} test-ippool-6 controller-node-1 u6", add6.ip()),
        &|| format!("{:?}\n{}", endpoint(), a6.log_text()),
    );
    // A pool holding allocations is not deleted (finalizer) and hands out nothing more.
    let (ok, _, err) = s.kubectl(&["delete", "sp", "test-ippool-6", "--wait=false"], "");
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, out, _) = s.kubectl(&["get", "sp", "test-ippool-6", "-o", "name"], "");
    assert!(
        ok && out.contains("test-ippool-6"),
        "deleted while holding an address: {out}"
    );

    // DEL frees both; the deleting pool goes once empty.
    for (c, args, conf) in [("c6", args6, &conf6), ("c7", args7, &conf7)] {
        let del = cni(
            &env_for("DEL", c, "eth0", args),
            conf.to_string().as_bytes(),
        );
        assert_eq!(del.code(), 0, "{}", del.stdout);
    }
    wait_counts(s, &[("test-ippool-7", "0", "10")]);
    let endpoints = || {
        s.kubectl(&["get", "se", "-n", "default", "-o", "name"], "")
            .1
    };
    wait_for(
        "SpiderEndpoints left",
        Duration::from_secs(15),
        || endpoints().trim().is_empty(),
        &endpoints,
    );
    let _ = testdata("seed-pools.yaml");
}

/// Crash point: the agent is killed (abort) between the two block writes of a dual-stack ADD.
/// The IPv4 record is stored, the IPv6 one is not; after a restart the retried ADD keeps the
/// IPv4 address and completes the IPv6 one; DEL frees both.
#[test]
fn agent_killed_between_two_block_writes_recovers_on_retry() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let pools = r#"apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata: {name: ds-v4}
spec: {subnet: 10.30.0.0/16, ips: [10.30.0.10-10.30.0.20]}
---
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata: {name: ds-v6}
spec: {subnet: "fd00:30::/64", ips: ["fd00:30::10-fd00:30::20"]}
"#;
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], pools);
    assert!(ok, "{err}");
    let podyaml = pod("ds-pod", "controller-node-1").replace(
        r#"{"ipv4": ["test-ippool-6", "test-ippool-7"]}"#,
        r#"{"ipv4": ["ds-v4"], "ipv6": ["ds-v6"]}"#,
    );
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &podyaml);
    assert!(ok, "{err}");
    let kubeconfig = s.kubeconfig().to_string_lossy().into_owned();
    let args: Vec<String> = [
        "--node-name",
        "controller-node-1",
        "--kube",
        "--kubeconfig",
        &kubeconfig,
        "--store",
        "kube",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let mut agent = Agent::start_with_env(
        &lab.dir.path().join("ds.sock"),
        &lab.dir.path().join("ds.log"),
        &args,
        &[("SPIDERPOOL_CRASH_AT", "after-claim-block")],
    );
    let conf = netconf(
        "1.0.0",
        "macvlan-conf",
        &agent.sock(),
        serde_json::json!({}),
    );
    let cargs = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=ds-pod;K8S_POD_UID=uds";
    let first = cni(
        &env_for("ADD", "cds", "eth0", cargs),
        conf.to_string().as_bytes(),
    );
    assert_ne!(
        first.code(),
        0,
        "the agent should have died mid-ADD: {}",
        first.stdout
    );
    // What the dead writer left: one record (the IPv4 block was written first).
    let (ok, out, _) = s.kubectl(&["get", "spideripblocks", "-o", "json"], "");
    assert!(ok);
    let blocks: serde_json::Value = serde_json::from_str(&out).expect("json");
    let held: Vec<String> = blocks["items"]
        .as_array()
        .expect("items")
        .iter()
        .flat_map(|b| {
            b["spec"]["allocations"]
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(held.len(), 1, "one record after the crash: {held:?}");
    assert!(held[0].starts_with("10.30.0."), "{held:?}");
    agent.kill9();
    agent.env.clear();
    agent.start_again();
    let retry = cni(
        &env_for("ADD", "cds", "eth0", cargs),
        conf.to_string().as_bytes(),
    );
    assert_eq!(retry.code(), 0, "{}\n{}", retry.stdout, agent.log_text());
    let ips: Vec<&str> = retry.json["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|i| i["address"].as_str())
        .collect();
    assert_eq!(ips.len(), 2, "{ips:?}");
    assert!(
        ips.contains(&format!("{}/16", held[0]).as_str()),
        "kept {}: {ips:?}",
        held[0]
    );
    // Second crash point: killed between the two block writes of the DEL. One record is
    // freed, one is left; the runtime's retried DEL frees the rest.
    agent.kill9();
    agent.env = vec![("SPIDERPOOL_CRASH_AT".into(), "after-release-block".into())];
    agent.start_again();
    let del = cni(
        &env_for("DEL", "cds", "eth0", cargs),
        conf.to_string().as_bytes(),
    );
    assert_ne!(
        del.code(),
        0,
        "the agent should have died mid-DEL: {}",
        del.stdout
    );
    let left = holders(s);
    assert_eq!(left, ["cds"], "one record left after the cut DEL: {left:?}");
    agent.kill9();
    agent.env.clear();
    agent.start_again();
    let del = cni(
        &env_for("DEL", "cds", "eth0", cargs),
        conf.to_string().as_bytes(),
    );
    assert_eq!(del.code(), 0, "{}", del.stdout);
    assert!(
        holders(s).is_empty(),
        "records left after DEL: {:?}",
        holders(s)
    );
}

/// Containers that hold a record in the API server.
fn holders(s: &KubeServer) -> Vec<String> {
    let (ok, out, err) = s.kubectl(&["get", "spideripblocks", "-o", "json"], "");
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let mut c: Vec<String> = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .flat_map(|b| {
            b["spec"]["allocations"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|r| r["containerID"].as_str().map(str::to_string))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect();
    c.sort();
    c
}

/// Pod-lifecycle GC frees the addresses of pods that are gone, finished, terminating past grace
/// plus margin, replaced by a pod with another UID, and of a node that is gone; never a live
/// pod's.
#[test]
fn lifecycle_gc_frees_dead_pods_and_keeps_live_ones() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let ghost = "apiVersion: v1\nkind: Node\nmetadata: {name: ghost-node, labels: {node-subnet: subnet-6}}\n";
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], ghost);
    assert!(ok, "{err}");
    for (name, node) in [
        ("gc-live", "controller-node-1"),
        ("gc-gone", "controller-node-1"),
        ("gc-done", "controller-node-1"),
        ("gc-term", "controller-node-1"),
        ("gc-repl", "controller-node-1"),
        ("gc-ghost", "ghost-node"),
    ] {
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod(name, node));
        assert!(ok, "{err}");
    }
    let uid = |name: &str| {
        let (ok, out, err) = s.kubectl(&["get", "pod", name, "-o", "jsonpath={.metadata.uid}"], "");
        assert!(ok, "{err}");
        out
    };
    let kubeconfig = s.kubeconfig().to_string_lossy().into_owned();
    let agent_args = |node: &str| -> Vec<String> {
        [
            "--node-name",
            node,
            "--kube",
            "--kubeconfig",
            &kubeconfig,
            "--store",
            "kube",
            "--gc-interval-ms",
            "700",
            "--gc-margin-secs",
            "2",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    // The ghost node's agent allocates, then the node disappears with its agent.
    let mut g = Agent::start(
        &lab.dir.path().join("g.sock"),
        &lab.dir.path().join("g.log"),
        &agent_args("ghost-node"),
    );
    let gconf = netconf("1.0.0", "macvlan-conf", &g.sock(), serde_json::json!({}));
    let gargs = format!(
        "K8S_POD_NAMESPACE=default;K8S_POD_NAME=gc-ghost;K8S_POD_UID={}",
        uid("gc-ghost")
    );
    let add = cni(
        &env_for("ADD", "c-ghost", "eth0", &gargs),
        gconf.to_string().as_bytes(),
    );
    assert_eq!(add.code(), 0, "{}\n{}", add.stdout, g.log_text());
    g.kill9();

    let a = Agent::start(
        &lab.dir.path().join("a.sock"),
        &lab.dir.path().join("a.log"),
        &agent_args("controller-node-1"),
    );
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    for name in ["gc-live", "gc-gone", "gc-done", "gc-term", "gc-repl"] {
        let u = if name == "gc-repl" {
            "an-older-pod".to_string()
        } else {
            uid(name)
        };
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_UID={u}");
        let add = cni(
            &env_for("ADD", &format!("c-{name}"), "eth0", &args),
            conf.to_string().as_bytes(),
        );
        assert_eq!(add.code(), 0, "{name}: {}\n{}", add.stdout, a.log_text());
    }
    assert_eq!(holders(s).len(), 6);
    // Now make them dead, each its own way.
    let (ok, _, err) = s.kubectl(
        &["delete", "pod", "gc-gone", "--grace-period=0", "--force"],
        "",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(
        &[
            "patch",
            "pod",
            "gc-done",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Succeeded"}}"#,
        ],
        "",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(
        &[
            "delete",
            "pod",
            "gc-term",
            "--grace-period=1",
            "--wait=false",
        ],
        "",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(&["delete", "node", "ghost-node"], "");
    assert!(ok, "{err}");

    wait_for(
        "GC left",
        Duration::from_secs(30),
        || holders(s) == ["c-gc-live"],
        &|| format!("{:?}\n{}", holders(s), a.log_text()),
    );
    let log = a.log_text();
    for reason in [
        "pod_gone",
        "pod_finished",
        "pod_terminating",
        "pod_replaced",
        "node_gone",
    ] {
        assert!(log.contains(reason), "no GC for {reason}:\n{log}");
    }
    // The live pod keeps its address through more rounds.
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(holders(s), ["c-gc-live"]);
}

fn deploy(name: &str) -> String {
    let path = format!("{}/../deploy/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Multus's NetworkAttachmentDefinition CRD, minimal, so the sample network can be checked.
const NAD_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: network-attachment-definitions.k8s.cni.cncf.io}
spec:
  group: k8s.cni.cncf.io
  scope: Namespaced
  names: {plural: network-attachment-definitions, singular: network-attachment-definition, kind: NetworkAttachmentDefinition, shortNames: [net-attach-def]}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, properties: {config: {type: string}}}
"#;

/// Every manifest in deploy/ is accepted by the real API server (server-side dry run), and the
/// seed pools shipped there are the seed's.
#[test]
fn every_deploy_manifest_is_accepted_by_the_api_server() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    s.install_crds(NAD_CRD).expect("NAD CRD");
    assert_eq!(
        deploy("kubernetes/seed-pools.yaml"),
        include_str!("../../testdata/seed-pools.yaml"),
        "deploy/kubernetes/seed-pools.yaml drifted from the seed"
    );
    let dir = format!("{}/../deploy/kubernetes", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let mut checked = vec!["crds.yaml".to_string()];
    let (ok, _, err) = s.kubectl(
        &["apply", "--dry-run=server", "-f", "-"],
        &deploy("crds.yaml"),
    );
    assert!(ok, "crds.yaml: {err}");
    for f in files {
        let (ok, out, err) = s.kubectl(
            &["apply", "--dry-run=server", "-f", "-"],
            &deploy(&format!("kubernetes/{f}")),
        );
        assert!(ok, "{f}: {err}");
        assert!(out.contains("(server dry run)"), "{f}: {out}");
        checked.push(f);
    }
    assert!(
        checked.iter().any(|f| f == "agent-daemonset.yaml"),
        "{checked:?}"
    );
}

/// The agent's ClusterRole is enough for everything the agent does (ADD, DEL, pool status,
/// finalizer, GC) and refuses writes to anything else.
#[test]
fn the_agent_works_with_its_least_privilege_role_and_nothing_more() {
    let user = spiderpool_store::testing::KubeUser {
        token: "agent-token-0123456789abcdef".into(),
        name: "agent-user".into(),
        groups: String::new(),
    };
    let Some(lab) = lab_with(std::slice::from_ref(&user)) else {
        return;
    };
    let s = &lab.server;
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &deploy("kubernetes/agent-rbac.yaml"));
    assert!(ok, "{err}");
    let bind = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: agent-user}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: spiderpool-agent}\nsubjects: [{kind: User, name: agent-user, apiGroup: rbac.authorization.k8s.io}]\n";
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], bind);
    assert!(ok, "{err}");
    let kc = s
        .write_kubeconfig("agent.kubeconfig", &user.token)
        .expect("kubeconfig");
    for name in ["rbac-a", "rbac-b"] {
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod(name, "controller-node-1"));
        assert!(ok, "{err}");
    }
    let mut args: Vec<String> = Vec::new();
    for a in ["--node-name", "controller-node-1", "--kube", "--kubeconfig"] {
        args.push(a.into());
    }
    args.push(kc.to_string_lossy().into_owned());
    for a in ["--store", "kube", "--gc-interval-ms", "500"] {
        args.push(a.into());
    }
    let a = Agent::start(
        &lab.dir.path().join("r.sock"),
        &lab.dir.path().join("r.log"),
        &args,
    );
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    for name in ["rbac-a", "rbac-b"] {
        let cargs = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}");
        let add = cni(
            &env_for("ADD", &format!("c-{name}"), "eth0", &cargs),
            conf.to_string().as_bytes(),
        );
        assert_eq!(add.code(), 0, "{}\n{}", add.stdout, a.log_text());
    }
    wait_counts(
        s,
        &[
            ("test-ippool-6", "2", "10"),
            ("test-ippool-7", "<none>", "<none>"),
        ],
    );
    let (_, out, _) = s.kubectl(
        &[
            "get",
            "sp",
            "test-ippool-6",
            "-o",
            "jsonpath={.metadata.finalizers}",
        ],
        "",
    );
    assert!(out.contains("spiderpool.spidernet.io"), "finalizer: {out}");
    // GC with the same identity: rbac-b goes, its address is freed.
    let (ok, _, err) = s.kubectl(
        &["delete", "pod", "rbac-b", "--grace-period=0", "--force"],
        "",
    );
    assert!(ok, "{err}");
    wait_for(
        "GC with the agent's role",
        Duration::from_secs(20),
        || holders(s) == ["c-rbac-a"],
        &|| format!("{:?}\n{}", holders(s), a.log_text()),
    );
    let del = cni(
        &env_for(
            "DEL",
            "c-rbac-a",
            "eth0",
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=rbac-a",
        ),
        conf.to_string().as_bytes(),
    );
    assert_eq!(del.code(), 0, "{}", del.stdout);
    assert!(!a.log_text().contains("forbidden"), "{}", a.log_text());
    // And nothing more: writes to other kinds, deletes, pool specs are refused.
    for (args, stdin) in [
        (vec!["create", "configmap", "x", "-n", "default"], ""),
        (vec!["delete", "spiderippool", "test-ippool-7"], ""),
        (vec!["delete", "spideripblocks", "--all"], ""),
        (vec!["label", "node", "controller-node-1", "x=y"], ""),
        (vec!["patch", "pod", "rbac-a", "-p", r#"{"metadata":{"labels":{"x":"y"}}}"#], ""),
        // Pools it may create (an application's auto-pool at its first ADD), subnets not.
        (vec!["apply", "-f", "-"], "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderSubnet\nmetadata: {name: sneaky}\nspec: {subnet: 10.99.0.0/16, ips: [10.99.0.1]}\n"),
    ] {
        let (ok, _, err) = s.kubectl_as(&kc, &args, stdin);
        assert!(!ok && err.contains("forbidden"), "{args:?} was allowed: {err}");
    }
}

/// A StatefulSet pod (created by the test: no controllers run here) with an owner reference.
fn sts_pod(name: &str, node: &str, sts_uid: &str) -> String {
    pod(name, node).replace(
        "  labels: {app: test-app}\n",
        &format!(
            "  labels: {{app: web}}\n  ownerReferences:\n  - {{apiVersion: apps/v1, kind: StatefulSet, name: web, uid: {sts_uid}, controller: true}}\n"
        ),
    )
}

/// StatefulSet pods keep their addresses across a restart (new sandbox on the same node) and a
/// reschedule to another node of the same zone; the old sandbox's late DEL frees nothing; a
/// scale-down releases the higher ordinals.
#[test]
fn statefulset_pods_keep_their_addresses() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let node2 = "apiVersion: v1\nkind: Node\nmetadata: {name: controller-node-2, labels: {node-subnet: subnet-6}}\n";
    let sts = r#"apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web, namespace: default}
spec:
  replicas: 3
  serviceName: web
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: app, image: busybox}]}
"#;
    for y in [node2, sts] {
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], y);
        assert!(ok, "{err}");
    }
    let (_, sts_uid, _) = s.kubectl(&["get", "sts", "web", "-o", "jsonpath={.metadata.uid}"], "");
    for i in 0..3 {
        let (ok, _, err) = s.kubectl(
            &["apply", "-f", "-"],
            &sts_pod(&format!("web-{i}"), "controller-node-1", &sts_uid),
        );
        assert!(ok, "{err}");
    }
    let a1 = lab.agent("controller-node-1");
    let a2 = lab.agent("controller-node-2");
    let conf1 = netconf("1.0.0", "macvlan-conf", &a1.sock(), serde_json::json!({}));
    let conf2 = netconf("1.0.0", "macvlan-conf", &a2.sock(), serde_json::json!({}));
    let args = |i: usize| format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-{i}");
    let add = |conf: &serde_json::Value, c: &str, i: usize| {
        let r = cni(
            &env_for("ADD", c, "eth0", &args(i)),
            conf.to_string().as_bytes(),
        );
        assert_eq!(
            r.code(),
            0,
            "{c}: {}\n{}\n{}",
            r.stdout,
            a1.log_text(),
            a2.log_text()
        );
        r.ip()
    };
    let del = |conf: &serde_json::Value, c: &str, i: usize| {
        let r = cni(
            &env_for("DEL", c, "eth0", &args(i)),
            conf.to_string().as_bytes(),
        );
        assert_eq!(r.code(), 0, "{c}: {}", r.stdout);
    };
    let ip0 = add(&conf1, "web-0-a", 0);
    let ip1 = add(&conf1, "web-1-a", 1);
    let ip2 = add(&conf1, "web-2-a", 2);
    assert_eq!(
        [&ip0, &ip1, &ip2]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3
    );

    // Restart of web-0: the runtime DELs the old sandbox (kept), ADDs a new one: same address.
    del(&conf1, "web-0-a", 0);
    assert!(
        holders(s).contains(&"web-0-a".to_string()),
        "DEL of a wanted ordinal kept it"
    );
    // Meanwhile another pod ADDs: it must not get web-0's address.
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod("other", "controller-node-1"));
    assert!(ok, "{err}");
    let other = cni(
        &env_for(
            "ADD",
            "other-a",
            "eth0",
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=other",
        ),
        conf1.to_string().as_bytes(),
    );
    assert_eq!(other.code(), 0, "{}", other.stdout);
    assert!(
        ![&ip0, &ip1, &ip2].contains(&&other.ip()),
        "{} reused",
        other.ip()
    );
    assert_eq!(
        add(&conf1, "web-0-b", 0),
        ip0,
        "web-0 keeps its address after a restart"
    );
    del(&conf1, "web-0-a", 0); // late DEL of the old sandbox
    assert!(
        holders(s).contains(&"web-0-b".to_string()),
        "late DEL freed the new sandbox's address"
    );

    // Reschedule of web-1 to another node of the zone: the pod is recreated (new UID).
    let (ok, _, err) = s.kubectl(
        &["delete", "pod", "web-1", "--grace-period=0", "--force"],
        "",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &sts_pod("web-1", "controller-node-2", &sts_uid),
    );
    assert!(ok, "{err}");
    assert_eq!(
        add(&conf2, "web-1-b", 1),
        ip1,
        "web-1 keeps its address on another node"
    );
    assert!(!holders(s).contains(&"web-1-a".to_string()));

    // Scale down to 1: web-1 and web-2 go, their addresses are freed by their DELs.
    let (ok, _, err) = s.kubectl(&["scale", "sts", "web", "--replicas=1"], "");
    assert!(ok, "{err}");
    for (i, c, conf) in [(2, "web-2-a", &conf1), (1, "web-1-b", &conf2)] {
        let (ok, _, err) = s.kubectl(
            &[
                "delete",
                "pod",
                &format!("web-{i}"),
                "--grace-period=0",
                "--force",
            ],
            "",
        );
        assert!(ok, "{err}");
        del(conf, c, i);
    }
    let mut left = holders(s);
    left.sort();
    assert_eq!(
        left,
        ["other-a", "web-0-b"],
        "scale-down released the higher ordinals"
    );
}

/// Retries a CNI call as a runtime does until it succeeds; the test fails after `limit`.
fn retry_until_ok(
    limit: Duration,
    pause: Duration,
    what: &str,
    mut call: impl FnMut() -> common::Call,
) -> common::Call {
    let t0 = Instant::now();
    loop {
        let r = call();
        if r.code() == 0 {
            return r;
        }
        assert!(t0.elapsed() < limit, "{what}: {}", r.stdout);
        std::thread::sleep(pause);
    }
}

/// Waits (up to 30 s) until `n` answers are in; returns how many there are.
fn wait_answered(results: &std::sync::Mutex<BTreeMap<String, String>>, n: usize) -> usize {
    let t0 = Instant::now();
    while results.lock().expect("lock").len() < n && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(2));
    }
    results.lock().expect("lock").len()
}

/// Three agents on three nodes against one API server, 90 parallel ADDs through the plugin; one
/// agent is killed (-9) mid-burst and restarted, the runtime retrying its failed ADDs; then the
/// API server itself is killed: ADDs fail with code 11 naming it, and succeed again once it is
/// back. No address twice, none lost, and DEL of everything leaves nothing.
#[test]
fn agents_survive_kill9_and_an_api_server_restart_mid_burst() {
    let Some(mut lab) = lab() else { return };
    let burst = r#"apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata: {name: burst}
spec: {subnet: 10.40.0.0/16, ips: [10.40.0.1-10.40.0.200], default: true}
---
apiVersion: v1
kind: Node
metadata: {name: controller-node-2, labels: {node-subnet: subnet-6}}
"#;
    let (ok, _, err) = lab.server.kubectl(&["apply", "-f", "-"], burst);
    assert!(ok, "{err}");
    let nodes = ["controller-node-1", "worker-node-1", "controller-node-2"];
    let mut agents: Vec<Agent> = nodes.iter().map(|n| lab.agent(n)).collect();
    let socks: Vec<String> = agents.iter().map(|a| a.sock()).collect();
    let add = |sock: &str, c: &str| {
        let conf = netconf("1.0.0", "burst-net", sock, serde_json::json!({}));
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={c}");
        cni(
            &env_for("ADD", c, "eth0", &args),
            conf.to_string().as_bytes(),
        )
    };
    // The burst, with agent 0 killed and restarted in the middle of it.
    let results = std::sync::Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for (i, sock) in socks.iter().enumerate() {
            for w in 0..3 {
                let (results, add) = (&results, &add);
                scope.spawn(move || {
                    for k in 0..10 {
                        let c = format!("burst-{i}-{w}-{k}");
                        let r = retry_until_ok(
                            Duration::from_secs(60),
                            Duration::from_millis(100),
                            &c,
                            || add(sock, &c),
                        );
                        results.lock().expect("lock").insert(c.clone(), r.ip());
                    }
                });
            }
        }
        // Kill once a fifth of the burst is answered, so requests are in flight.
        let answered = wait_answered(&results, 18);
        assert!(answered < 90, "the burst ended before the kill");
        agents[0].kill9();
        std::thread::sleep(Duration::from_millis(300));
        agents[0].start_again();
    });
    let results = results.into_inner().expect("lock");
    assert_eq!(results.len(), 90);
    let distinct: std::collections::BTreeSet<&String> = results.values().collect();
    assert_eq!(
        distinct.len(),
        90,
        "an address was handed out twice: {results:?}"
    );
    assert_eq!(holders(&lab.server).len(), 90, "records and answers differ");
    // A retried ADD answers what was recorded (the killed agent's included).
    for (c, ip) in results.iter().take(10) {
        let i: usize = c
            .split('-')
            .nth(1)
            .and_then(|x| x.parse().ok())
            .expect("agent index");
        assert_eq!(&add(&socks[i], c).ip(), ip, "{c}");
    }

    // The API server goes away: an ADD that must write fails with code 11, naming it.
    lab.server.kill_apiserver();
    let down = add(&socks[1], "during-outage");
    assert_eq!(down.code(), 11, "{}", down.stdout);
    assert!(
        down.stdout.contains("127.0.0.1"),
        "the error names the API server: {}",
        down.stdout
    );
    lab.server.start_apiserver().expect("API server back");
    let back = retry_until_ok(
        Duration::from_secs(60),
        Duration::from_millis(300),
        "during-outage",
        || add(&socks[1], "during-outage"),
    );
    assert!(
        !distinct.contains(&back.ip()),
        "{} handed out twice",
        back.ip()
    );
    assert_eq!(holders(&lab.server).len(), 91);

    // A second burst, with the API server killed and restarted in the middle of it: the
    // runtime retries what failed; every ADD ends with its own address.
    let second = std::sync::Mutex::new(BTreeMap::new());
    let server = std::sync::Mutex::new(&mut lab.server);
    std::thread::scope(|scope| {
        for (i, sock) in socks.iter().enumerate() {
            let (second, add) = (&second, &add);
            scope.spawn(move || {
                for k in 0..10 {
                    let c = format!("again-{i}-{k}");
                    let r = retry_until_ok(
                        Duration::from_secs(90),
                        Duration::from_millis(200),
                        &c,
                        || add(sock, &c),
                    );
                    second.lock().expect("lock").insert(c.clone(), r.ip());
                }
            });
        }
        assert!(
            wait_answered(&second, 6) < 30,
            "the burst ended before the restart"
        );
        let mut srv = server.lock().expect("lock");
        srv.kill_apiserver();
        std::thread::sleep(Duration::from_millis(1500));
        srv.start_apiserver().expect("API server back");
    });
    let second = second.into_inner().expect("lock");
    assert_eq!(second.len(), 30);
    let mut all: std::collections::BTreeSet<String> =
        distinct.iter().map(|s| s.to_string()).collect();
    all.insert(back.ip());
    for ip in second.values() {
        assert!(all.insert(ip.clone()), "{ip} handed out twice");
    }
    assert_eq!(
        holders(&lab.server).len(),
        121,
        "records and answers differ"
    );
    let results: BTreeMap<String, String> = results.into_iter().chain(second).collect();

    // DEL everything: nothing left.
    for (c, _) in results
        .iter()
        .chain([(&"during-outage".to_string(), &String::new())])
    {
        let i: usize = c
            .split('-')
            .nth(1)
            .and_then(|x| x.parse().ok())
            .unwrap_or(1);
        let conf = netconf(
            "1.0.0",
            "burst-net",
            &socks[i.min(2)],
            serde_json::json!({}),
        );
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={c}");
        let r = cni(
            &env_for("DEL", c, "eth0", &args),
            conf.to_string().as_bytes(),
        );
        assert_eq!(r.code(), 0, "{c}: {}", r.stdout);
    }
    assert!(
        holders(&lab.server).is_empty(),
        "{:?}",
        holders(&lab.server)
    );
}

/// A pod recreated under the same name (new UID) gets its own address; the old sandbox's late
/// DEL frees only the old one.
#[test]
fn a_recreated_pod_never_shares_or_loses_an_address() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let a = lab.agent("controller-node-1");
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=again";
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod("again", "controller-node-1"));
    assert!(ok, "{err}");
    let first = cni(
        &env_for("ADD", "again-1", "eth0", args),
        conf.to_string().as_bytes(),
    );
    assert_eq!(first.code(), 0, "{}", first.stdout);
    let (ok, _, err) = s.kubectl(
        &["delete", "pod", "again", "--grace-period=0", "--force"],
        "",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod("again", "controller-node-1"));
    assert!(ok, "{err}");
    let second = cni(
        &env_for("ADD", "again-2", "eth0", args),
        conf.to_string().as_bytes(),
    );
    assert_eq!(second.code(), 0, "{}", second.stdout);
    assert_ne!(
        first.ip(),
        second.ip(),
        "the old sandbox still holds its address"
    );
    let late = cni(
        &env_for("DEL", "again-1", "eth0", args),
        conf.to_string().as_bytes(),
    );
    assert_eq!(late.code(), 0, "{}", late.stdout);
    assert_eq!(
        holders(s),
        ["again-2"],
        "the late DEL freed the new pod's address"
    );
    let replay = cni(
        &env_for("ADD", "again-2", "eth0", args),
        conf.to_string().as_bytes(),
    );
    assert_eq!(replay.ip(), second.ip());
}

const SUBNET_16: &str = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderSubnet\nmetadata: {name: subnet-16}\nspec: {subnet: 10.16.0.0/16, ips: [10.16.0.10-10.16.0.109], gateway: 10.16.0.1}\n";

/// An application object with a pod template asking for an auto-pool from subnet-16.
fn app_yaml(kind: &str, name: &str, replicas: u32, extra_annos: &str) -> String {
    let api = if kind == "Job" || kind == "CronJob" {
        "batch/v1"
    } else {
        "apps/v1"
    };
    let template = format!(
        "metadata:\n      labels: {{app: {name}}}\n      annotations:\n        ipam.spidernet.io/subnet: '{{\"ipv4\": [\"subnet-16\"]}}'\n{extra_annos}    spec: {{containers: [{{name: app, image: busybox}}], restartPolicy: {}}}",
        if kind == "Job" || kind == "CronJob" { "Never" } else { "Always" }
    );
    match kind {
        "CronJob" => format!(
            "apiVersion: {api}\nkind: CronJob\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  schedule: '* * * * *'\n  jobTemplate:\n    spec:\n      parallelism: {replicas}\n      template:\n        metadata:\n          labels: {{app: {name}}}\n          annotations:\n            ipam.spidernet.io/subnet: '{{\"ipv4\": [\"subnet-16\"]}}'\n        spec: {{containers: [{{name: app, image: busybox}}], restartPolicy: Never}}\n"
        ),
        "Job" => format!("apiVersion: {api}\nkind: Job\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  parallelism: {replicas}\n  template:\n    {template}\n"),
        "DaemonSet" => format!("apiVersion: {api}\nkind: DaemonSet\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    {template}\n"),
        _ => format!("apiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  replicas: {replicas}\n{}  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    {template}\n",
            if kind == "StatefulSet" { format!("  serviceName: {name}\n") } else { String::new() }),
    }
}

fn uid_of(s: &KubeServer, kind: &str, name: &str) -> String {
    let (ok, out, err) = s.kubectl(
        &[
            "get",
            kind,
            name,
            "-n",
            "default",
            "-o",
            "jsonpath={.metadata.uid}",
        ],
        "",
    );
    assert!(ok, "{err}");
    out
}

/// A pod of an application (as its controller would make it), with the template's annotation.
fn app_pod(name: &str, owner_kind: &str, owner: &str, owner_uid: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: x}}\n  annotations:\n    ipam.spidernet.io/subnet: '{{\"ipv4\": [\"subnet-16\"]}}'\n  ownerReferences:\n  - {{apiVersion: apps/v1, kind: {owner_kind}, name: {owner}, uid: {owner_uid}, controller: true}}\nspec:\n  nodeName: controller-node-1\n  containers: [{{name: app, image: busybox}}]\n"
    )
}

fn auto_pool_ips(s: &KubeServer, prefix: &str) -> Vec<String> {
    let (ok, out, err) = s.kubectl(&["get", "sp", "-o", "json"], "");
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|p| {
            p["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .flat_map(|p| p["spec"]["ips"].as_array().cloned().unwrap_or_default())
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect()
}

/// The seed's second half: a Deployment annotated with `ipam.spidernet.io/subnet` gets a pool
/// carved from the subnet at its first ADD (no waiting for a controller), sized replicas + 1, its
/// own (a second application never shares an address), grown by the agent when scaled up; a bare
/// pod asking for an auto-pool is refused with a clear error.
#[test]
fn an_application_gets_its_auto_pool_at_its_first_add() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], SUBNET_16);
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &app_yaml("Deployment", "web", 3, ""));
    assert!(ok, "{err}");
    let dep_uid = uid_of(s, "deployment", "web");
    let rs = format!("apiVersion: apps/v1\nkind: ReplicaSet\nmetadata:\n  name: web-5d9\n  namespace: default\n  ownerReferences:\n  - {{apiVersion: apps/v1, kind: Deployment, name: web, uid: {dep_uid}, controller: true}}\nspec:\n  replicas: 3\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: app, image: busybox}}]}}\n");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &rs);
    assert!(ok, "{err}");
    let rs_uid = uid_of(s, "replicaset", "web-5d9");
    let a = lab.agent("controller-node-1");
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let add = |pod: &str| {
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}");
        cni(
            &env_for("ADD", &format!("c-{pod}"), "eth0", &args),
            conf.to_string().as_bytes(),
        )
    };
    let mut ips = std::collections::BTreeSet::new();
    for i in 0..3 {
        let name = format!("web-5d9-{i}");
        let (ok, _, err) = s.kubectl(
            &["apply", "-f", "-"],
            &app_pod(&name, "ReplicaSet", "web-5d9", &rs_uid),
        );
        assert!(ok, "{err}");
        let t0 = Instant::now();
        let r = add(&name);
        assert_eq!(r.code(), 0, "{}\n{}", r.stdout, a.log_text());
        if i == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "first ADD took {:?}",
                t0.elapsed()
            );
            let last: u8 = r
                .ip()
                .trim_end_matches("/16")
                .rsplit('.')
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            assert!(
                (10..=13).contains(&last),
                "{} is not from the pool carved first",
                r.ip()
            );
        }
        assert!(ips.insert(r.ip()), "{} twice", r.ip());
    }
    let pool = format!("auto4-web-eth0-{}", &dep_uid[..5]);
    assert_eq!(
        auto_pool_ips(s, "auto4-web-"),
        ["10.16.0.10-10.16.0.13"],
        "replicas + 1, lowest first"
    );
    let (_, out, _) = s.kubectl(
        &[
            "get",
            "sp",
            &pool,
            "-o",
            "jsonpath={.spec.podAffinity.matchLabels.ipam\\.spidernet\\.io/app-kind}",
        ],
        "",
    );
    assert_eq!(out, "Deployment");
    let (_, out, _) = s.kubectl(
        &[
            "get",
            "ss",
            "subnet-16",
            "-o",
            "jsonpath={.status.allocatedIPCount} {.status.totalIPCount}",
        ],
        "",
    );
    assert_eq!(out, "4 100");
    let (_, out, _) = s.kubectl(
        &[
            "get",
            "ss",
            "subnet-16",
            "-o",
            "jsonpath={.status.controlledIPPools}",
        ],
        "",
    );
    assert!(
        out.contains(&pool) && out.contains("apps_v1_Deployment_default_web"),
        "{out}"
    );

    // A second application: its own addresses.
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &app_yaml(
            "StatefulSet",
            "api",
            2,
            "        ipam.spidernet.io/ippool-ip-number: '5'\n",
        ),
    );
    assert!(ok, "{err}");
    let sts_uid = uid_of(s, "statefulset", "api");
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &app_pod("api-0", "StatefulSet", "api", &sts_uid),
    );
    assert!(ok, "{err}");
    let r = add("api-0");
    assert_eq!(r.code(), 0, "{}", r.stdout);
    assert_eq!(
        auto_pool_ips(s, "auto4-api-"),
        ["10.16.0.14-10.16.0.18"],
        "a fixed 5, after web's"
    );
    assert!(ips.insert(r.ip()));

    // Scale web to 10: the next pod's ADD grows the pool to 11, past api's addresses.
    let (ok, _, err) = s.kubectl(&["scale", "deployment", "web", "--replicas=10"], "");
    assert!(ok, "{err}");
    for i in 3..10 {
        let name = format!("web-5d9-{i}");
        let (ok, _, err) = s.kubectl(
            &["apply", "-f", "-"],
            &app_pod(&name, "ReplicaSet", "web-5d9", &rs_uid),
        );
        assert!(ok, "{err}");
        let r = add(&name);
        assert_eq!(r.code(), 0, "{}\n{}", r.stdout, a.log_text());
        assert!(ips.insert(r.ip()), "{} twice", r.ip());
    }
    assert_eq!(
        auto_pool_ips(s, "auto4-web-"),
        ["10.16.0.10-10.16.0.13", "10.16.0.19-10.16.0.25"]
    );
    let (_, out, _) = s.kubectl(
        &[
            "get",
            "ss",
            "subnet-16",
            "-o",
            "jsonpath={.status.allocatedIPCount}",
        ],
        "",
    );
    assert_eq!(out, "16");

    // A bare pod cannot have an auto-pool: refused, saying why and what to do.
    let bare = app_pod("bare", "ReplicaSet", "x", "y").replace("  ownerReferences:\n  - {apiVersion: apps/v1, kind: ReplicaSet, name: x, uid: y, controller: true}\n", "");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &bare);
    assert!(ok, "{err}");
    let r = add("bare");
    assert_ne!(r.code(), 0);
    assert!(
        r.stdout.contains("has no controller") && r.stdout.contains("ipam.spidernet.io/ippool"),
        "{}",
        r.stdout
    );
}

/// `spiderpool-controller --kubeconfig PATH --webhook-addr HOST:PORT`, killed on drop.
struct ControllerProc {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl ControllerProc {
    fn start(s: &KubeServer, dir: &std::path::Path, tag: &str) -> ControllerProc {
        let log = dir.join(format!("controller-{tag}.log"));
        let out = std::fs::File::create(&log).expect("log");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .to_string();
        let child = std::process::Command::new(spiderpool_store::testing::workspace_bin(
            "spiderpool-controller",
            "spiderpool-controller",
        ))
        .arg("--kubeconfig")
        .arg(s.kubeconfig())
        .args(["--webhook-addr", &addr, "--reconcile-interval-ms", "300"])
        .stdout(std::process::Stdio::null())
        .stderr(out)
        .spawn()
        .expect("controller");
        let c = ControllerProc { child, log };
        let t0 = Instant::now();
        while !c.log_text().contains("serving the admission webhooks") {
            assert!(t0.elapsed() < Duration::from_secs(20), "{}", c.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn subnet_allocated(s: &KubeServer) -> String {
    let (_, out, _) = s.kubectl(
        &[
            "get",
            "ss",
            "subnet-16",
            "-o",
            "jsonpath={.status.allocatedIPCount}",
        ],
        "",
    );
    out
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool, log: &dyn Fn() -> String) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The controller follows applications: makes the pool before the first pod, grows it ahead of
/// a scale-up, shrinks it by free addresses only on a scale-down, reclaims it with the
/// application (after its last address is freed), and 20 create/delete cycles leave the
/// subnet's free count where it started.
#[test]
fn the_controller_follows_applications_and_reclaims_their_pools() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let c = ControllerProc::start(s, lab.dir.path(), "a");
    let log = || c.log_text();
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], SUBNET_16);
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &app_yaml("Deployment", "web", 3, ""));
    assert!(ok, "{err}");
    // Made ahead of any pod: replicas + 1.
    wait_for(
        "pool made ahead",
        Duration::from_secs(15),
        || auto_pool_ips(s, "auto4-web-") == ["10.16.0.10-10.16.0.13"],
        &log,
    );
    let dep_uid = uid_of(s, "deployment", "web");
    let rs = format!("apiVersion: apps/v1\nkind: ReplicaSet\nmetadata:\n  name: web-5d9\n  namespace: default\n  ownerReferences:\n  - {{apiVersion: apps/v1, kind: Deployment, name: web, uid: {dep_uid}, controller: true}}\nspec:\n  replicas: 3\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: app, image: busybox}}]}}\n");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &rs);
    assert!(ok, "{err}");
    let rs_uid = uid_of(s, "replicaset", "web-5d9");
    let a = lab.agent("controller-node-1");
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let call = |cmd: &str, pod: &str| {
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}");
        cni(
            &env_for(cmd, &format!("c-{pod}"), "eth0", &args),
            conf.to_string().as_bytes(),
        )
    };
    // Scale to 10 first: the pool grows to 11 before the pods come.
    let (ok, _, err) = s.kubectl(&["scale", "deployment", "web", "--replicas=10"], "");
    assert!(ok, "{err}");
    wait_for(
        "grown ahead",
        Duration::from_secs(15),
        || auto_pool_ips(s, "auto4-web-") == ["10.16.0.10-10.16.0.20"],
        &log,
    );
    for i in 0..10 {
        let name = format!("web-5d9-{i}");
        let (ok, _, err) = s.kubectl(
            &["apply", "-f", "-"],
            &app_pod(&name, "ReplicaSet", "web-5d9", &rs_uid),
        );
        assert!(ok, "{err}");
        let r = call("ADD", &name);
        assert_eq!(r.code(), 0, "{}\n{}", r.stdout, a.log_text());
    }
    // Scale down to 2: eight pods go (their DELs free their addresses); the pool shrinks to
    // 3 by free addresses only, keeping the two in use.
    let (ok, _, err) = s.kubectl(&["scale", "deployment", "web", "--replicas=2"], "");
    assert!(ok, "{err}");
    for i in 2..10 {
        let name = format!("web-5d9-{i}");
        assert_eq!(call("DEL", &name).code(), 0);
        let _ = s.kubectl(&["delete", "pod", &name, "--grace-period=0", "--force"], "");
    }
    let in_use: Vec<String> = holders(s);
    assert_eq!(in_use.len(), 2);
    wait_for(
        "shrunk to 3",
        Duration::from_secs(20),
        || {
            let (_, out, _) = s.kubectl(
                &[
                    "get",
                    "sp",
                    "-l",
                    "ipam.spidernet.io/app-name=web",
                    "-o",
                    "jsonpath={.items[0].status.totalIPCount}",
                ],
                "",
            );
            out == "3"
        },
        &log,
    );
    wait_for(
        "subnet counts follow",
        Duration::from_secs(10),
        || subnet_allocated(s) == "3",
        &log,
    );

    // The application goes: its pool is reclaimed once its last addresses are freed.
    let (ok, _, err) = s.kubectl(&["delete", "deployment", "web"], "");
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(&["delete", "replicaset", "web-5d9"], "");
    assert!(ok, "{err}");
    for i in 0..2 {
        assert_eq!(call("DEL", &format!("web-5d9-{i}")).code(), 0);
    }
    wait_for(
        "reclaimed",
        Duration::from_secs(20),
        || auto_pool_ips(s, "auto4-web-").is_empty(),
        &log,
    );
    wait_for(
        "subnet empty again",
        Duration::from_secs(10),
        || subnet_allocated(s) == "0",
        &log,
    );

    // 20 create/delete cycles: the subnet's free count returns to its start.
    for cycle in 0..20 {
        let name = format!("cyc{cycle}");
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &app_yaml("Deployment", &name, 2, ""));
        assert!(ok, "{err}");
        wait_for(
            "cycle pool",
            Duration::from_secs(15),
            || auto_pool_ips(s, &format!("auto4-{name}-")).len() == 1,
            &log,
        );
        let (ok, _, err) = s.kubectl(&["delete", "deployment", &name], "");
        assert!(ok, "{err}");
    }
    wait_for(
        "all cycles reclaimed",
        Duration::from_secs(30),
        || auto_pool_ips(s, "auto4-cyc").is_empty(),
        &log,
    );
    wait_for(
        "subnet free count back at its start",
        Duration::from_secs(10),
        || subnet_allocated(s) == "0",
        &log,
    );
}

/// Addresses in a list of `a` / `a-b` IPv4 entries.
fn count_ips(entries: &[String]) -> u32 {
    let n = |ip: &str| {
        ip.parse::<std::net::Ipv4Addr>()
            .map(u32::from)
            .expect("ipv4")
    };
    entries
        .iter()
        .map(|e| match e.split_once('-') {
            Some((a, b)) => n(b) - n(a) + 1,
            None => 1,
        })
        .sum()
}

fn pool_size(s: &KubeServer, app: &str) -> u32 {
    count_ips(&auto_pool_ips(s, &format!("auto4-{app}-")))
}

/// Every kind of application gets its pool, sized by its replicas (or the template's number),
/// and scaled with it; pools never share an address; a kept pool (`ippool-reclaim: "false"`)
/// outlives its application and goes back to a re-created one of the same kind, namespace and
/// name, not to another kind.
#[test]
fn every_kind_gets_a_pool_and_kept_pools_go_back() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let c = ControllerProc::start(s, lab.dir.path(), "k");
    let log = || c.log_text();
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], SUBNET_16);
    assert!(ok, "{err}");
    let apps = [
        ("StatefulSet", "s1", 2, 3),
        ("DaemonSet", "d1", 0, 2),
        ("ReplicaSet", "r1", 2, 3),
        ("Job", "j1", 2, 3),
        ("CronJob", "cj1", 1, 2),
    ];
    for (kind, name, replicas, _) in apps {
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &app_yaml(kind, name, replicas, ""));
        assert!(ok, "{kind}: {err}");
    }
    for (kind, name, _, size) in apps {
        wait_for(
            &format!("{kind} {name} pool of {size}"),
            Duration::from_secs(20),
            || pool_size(s, name) == size,
            &log,
        );
    }
    let mut all: Vec<String> = apps
        .iter()
        .flat_map(|(_, n, _, _)| auto_pool_ips(s, &format!("auto4-{n}-")))
        .collect();
    let total: u32 = count_ips(&all);
    all.sort();
    all.dedup();
    assert_eq!(count_ips(&all), total, "pools share an address");
    // Scale the StatefulSet 2 -> 4 -> 1.
    let (ok, _, err) = s.kubectl(&["scale", "statefulset", "s1", "--replicas=4"], "");
    assert!(ok, "{err}");
    wait_for(
        "s1 grown to 5",
        Duration::from_secs(15),
        || pool_size(s, "s1") == 5,
        &log,
    );
    let (ok, _, err) = s.kubectl(&["scale", "statefulset", "s1", "--replicas=1"], "");
    assert!(ok, "{err}");
    wait_for(
        "s1 shrunk to 2",
        Duration::from_secs(15),
        || pool_size(s, "s1") == 2,
        &log,
    );
    for (kind, name, _, _) in apps {
        let (ok, _, err) = s.kubectl(&["delete", &kind.to_lowercase(), name], "");
        assert!(ok, "{err}");
    }
    wait_for(
        "all reclaimed",
        Duration::from_secs(20),
        || subnet_allocated(s) == "0",
        &log,
    );

    // Kept pools.
    let keep = "        ipam.spidernet.io/ippool-reclaim: 'false'\n        ipam.spidernet.io/ippool-ip-number: '2'\n";
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &app_yaml("Deployment", "keep", 1, keep),
    );
    assert!(ok, "{err}");
    wait_for(
        "keep's pool",
        Duration::from_secs(15),
        || pool_size(s, "keep") == 2,
        &log,
    );
    let kept = auto_pool_ips(s, "auto4-keep-");
    let (_, pool_name, _) = s.kubectl(
        &[
            "get",
            "sp",
            "-l",
            "ipam.spidernet.io/app-name=keep",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
        "",
    );
    let (ok, _, err) = s.kubectl(&["delete", "deployment", "keep"], "");
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        auto_pool_ips(s, "auto4-keep-"),
        kept,
        "a kept pool outlives its application"
    );
    // Another kind of the same name gets a pool of its own.
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &app_yaml("StatefulSet", "keep", 1, keep),
    );
    assert!(ok, "{err}");
    wait_for(
        "the StatefulSet's own pool",
        Duration::from_secs(15),
        || pool_size(s, "keep") == 4,
        &log,
    );
    // The Deployment re-created: it takes its kept pool back, no new pool.
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &app_yaml("Deployment", "keep", 1, keep),
    );
    assert!(ok, "{err}");
    let new_uid = uid_of(s, "deployment", "keep");
    wait_for(
        "taken back",
        Duration::from_secs(15),
        || {
            let (_, out, _) = s.kubectl(
                &[
                    "get",
                    "sp",
                    &pool_name,
                    "-o",
                    "jsonpath={.metadata.labels.ipam\\.spidernet\\.io/app-uid}",
                ],
                "",
            );
            out == new_uid
        },
        &log,
    );
    assert_eq!(pool_size(s, "keep"), 4, "no third pool");
}

fn replicaset_for(s: &KubeServer, dep: &str) -> (String, String) {
    let dep_uid = uid_of(s, "deployment", dep);
    let rs = format!("apiVersion: apps/v1\nkind: ReplicaSet\nmetadata:\n  name: {dep}-rs\n  namespace: default\n  ownerReferences:\n  - {{apiVersion: apps/v1, kind: Deployment, name: {dep}, uid: {dep_uid}, controller: true}}\nspec:\n  selector: {{matchLabels: {{app: {dep}}}}}\n  template:\n    metadata: {{labels: {{app: {dep}}}}}\n    spec: {{containers: [{{name: app, image: busybox}}]}}\n");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &rs);
    assert!(ok, "{err}");
    (
        format!("{dep}-rs"),
        uid_of(s, "replicaset", &format!("{dep}-rs")),
    )
}

/// Two applications' first pods on two agents at once: each application's pool is carved once,
/// no address is in both; a controller killed in the middle of a scale-up converges after its
/// restart; a StatefulSet pod with an auto-pool keeps its address across a restart.
#[test]
fn concurrent_applications_never_share_and_the_controller_converges() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let node2 = "apiVersion: v1\nkind: Node\nmetadata: {name: controller-node-2, labels: {node-subnet: subnet-6}}\n";
    for y in [SUBNET_16, node2] {
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], y);
        assert!(ok, "{err}");
    }
    let mut pods = Vec::new();
    for (app, node) in [("a1", "controller-node-1"), ("a2", "controller-node-2")] {
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &app_yaml("Deployment", app, 5, ""));
        assert!(ok, "{err}");
        let (rs, rs_uid) = replicaset_for(s, app);
        for i in 0..5 {
            let name = format!("{app}-{i}");
            let y = app_pod(&name, "ReplicaSet", &rs, &rs_uid).replace("controller-node-1", node);
            let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &y);
            assert!(ok, "{err}");
            pods.push((name, node));
        }
    }
    let agents = [
        lab.agent("controller-node-1"),
        lab.agent("controller-node-2"),
    ];
    let socks: Vec<String> = agents.iter().map(|a| a.sock()).collect();
    let got = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for (name, node) in &pods {
            let sock = if *node == "controller-node-1" {
                &socks[0]
            } else {
                &socks[1]
            };
            let got = &got;
            scope.spawn(move || {
                let conf = netconf("1.0.0", "macvlan-conf", sock, serde_json::json!({}));
                let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}");
                let r = cni(
                    &env_for("ADD", &format!("c-{name}"), "eth0", &args),
                    conf.to_string().as_bytes(),
                );
                assert_eq!(r.code(), 0, "{name}: {}", r.stdout);
                got.lock().expect("lock").push(r.ip());
            });
        }
    });
    let mut got = got.into_inner().expect("lock");
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 10, "an address twice: {got:?}");
    let (p1, p2) = (auto_pool_ips(s, "auto4-a1-"), auto_pool_ips(s, "auto4-a2-"));
    assert_eq!((count_ips(&p1), count_ips(&p2)), (6, 6), "{p1:?} {p2:?}");
    let mut both = [p1.clone(), p2.clone()].concat();
    both.sort();
    both.dedup();
    assert_eq!(count_ips(&both), 12, "the two pools overlap: {p1:?} {p2:?}");
    assert_eq!(subnet_allocated(s), "12");

    // Scale a1 to 12 and kill the controller at once; its successor converges.
    let c = ControllerProc::start(s, lab.dir.path(), "1");
    let (ok, _, err) = s.kubectl(&["scale", "deployment", "a1", "--replicas=12"], "");
    assert!(ok, "{err}");
    drop(c);
    let c2 = ControllerProc::start(s, lab.dir.path(), "2");
    let log = || c2.log_text();
    wait_for(
        "a1 grown to 13",
        Duration::from_secs(30),
        || pool_size(s, "a1") == 13,
        &log,
    );
    wait_for(
        "subnet counts converge",
        Duration::from_secs(15),
        || subnet_allocated(s) == "19",
        &log,
    );

    // A StatefulSet pod with an auto-pool keeps its address across a restart.
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &app_yaml("StatefulSet", "db", 2, ""));
    assert!(ok, "{err}");
    let sts_uid = uid_of(s, "statefulset", "db");
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &app_pod("db-0", "StatefulSet", "db", &sts_uid),
    );
    assert!(ok, "{err}");
    let conf = netconf("1.0.0", "macvlan-conf", &socks[0], serde_json::json!({}));
    let call = |cmd: &str, c: &str| {
        cni(
            &env_for(
                cmd,
                c,
                "eth0",
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=db-0",
            ),
            conf.to_string().as_bytes(),
        )
    };
    let first = call("ADD", "db-0-a");
    assert_eq!(first.code(), 0, "{}", first.stdout);
    assert_eq!(call("DEL", "db-0-a").code(), 0);
    let again = call("ADD", "db-0-b");
    assert_eq!(again.code(), 0, "{}", again.stdout);
    assert_eq!(again.ip(), first.ip(), "db-0 keeps its address");
}
