//! Kubernetes mode against the real API server (envtest's kube-apiserver + etcd): the seed's
//! `kubectl apply` of nodes, pools and pods, two agents (`--kube --store kube`) on two "nodes",
//! the CNI plugin's ADD/DEL, and `kubectl get spiderippool` showing the counts.
#![cfg(feature = "kube")]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::kube::{holders, lab, lab_with, pod, records, wait_counts, wait_for};
use common::{cni, env_for, netconf, testdata, workspace_bin, Agent};
use spiderpool_store::testing::KubeServer;

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
    let held: Vec<String> = records(s).into_iter().map(|(ip, _)| ip).collect();
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

/// Pod-lifecycle GC frees the addresses of pods that are gone, finished, terminating past grace
/// plus margin, replaced by a pod with another UID, and of a node that is gone once its pod is
/// gone too; never a live pod's: not a static pod's (the kubelet's UID is in its mirror pod's
/// `kubernetes.io/config.mirror` annotation), not a running pod's whose Node object was deleted.
#[test]
fn lifecycle_gc_frees_dead_pods_and_keeps_live_ones() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let ghost = "apiVersion: v1\nkind: Node\nmetadata: {name: ghost-node, labels: {node-subnet: subnet-6}}\n";
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], ghost);
    assert!(ok, "{err}");
    // A static pod as the API server has it: the mirror pod, with its own metadata.uid and the
    // kubelet's UID (the config hash, what the kubelet passes in K8S_POD_UID) in an annotation.
    let mirror = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: gc-static\n  namespace: default\n  annotations:\n    kubernetes.io/config.mirror: static-config-hash\n    ipam.spidernet.io/ippool: '{\"ipv4\": [\"test-ippool-6\"]}'\nspec:\n  nodeName: controller-node-1\n  containers: [{name: app, image: busybox}]\n";
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], mirror);
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
    let owners = || {
        let (ok, out, err) = s.kubectl(
            &[
                "get",
                "spideripblocks",
                "-o",
                "jsonpath={.items[*].spec.owner}",
            ],
            "",
        );
        assert!(ok, "{err}");
        out.split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        owners(),
        ["ghost-node"],
        "the ghost node owns the block it allocated in"
    );

    let a = Agent::start(
        &lab.dir.path().join("a.sock"),
        &lab.dir.path().join("a.log"),
        &agent_args("controller-node-1"),
    );
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    for name in [
        "gc-live",
        "gc-gone",
        "gc-done",
        "gc-term",
        "gc-repl",
        "gc-static",
    ] {
        let u = match name {
            "gc-repl" => "an-older-pod".to_string(),
            "gc-static" => "static-config-hash".to_string(),
            _ => uid(name),
        };
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_UID={u}");
        let add = cni(
            &env_for("ADD", &format!("c-{name}"), "eth0", &args),
            conf.to_string().as_bytes(),
        );
        assert_eq!(add.code(), 0, "{name}: {}\n{}", add.stdout, a.log_text());
    }
    assert_eq!(holders(s).len(), 7);
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

    let kept = ["c-gc-live", "c-gc-static", "c-ghost"];
    wait_for(
        "GC left",
        Duration::from_secs(30),
        || holders(s) == kept,
        &|| format!("{:?}\n{}", holders(s), a.log_text()),
    );
    // The ghost node's pod still exists: its address stays through more rounds.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(holders(s), kept, "{}", a.log_text());
    let (ok, _, err) = s.kubectl(
        &["delete", "pod", "gc-ghost", "--grace-period=0", "--force"],
        "",
    );
    assert!(ok, "{err}");
    wait_for(
        "the gone node's record freed once its pod is gone",
        Duration::from_secs(30),
        || holders(s) == ["c-gc-live", "c-gc-static"],
        &|| format!("{:?}\n{}", holders(s), a.log_text()),
    );
    wait_for(
        "the gone node's blocks given back once its records are freed",
        Duration::from_secs(30),
        || !owners().iter().any(|o| o == "ghost-node"),
        &|| format!("{:?}\n{}", owners(), a.log_text()),
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
    // The live pod and the static pod keep their addresses through more rounds.
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(holders(s), ["c-gc-live", "c-gc-static"]);
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
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    let mut checked = Vec::new();
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

/// `to` as a path relative to the directory `from` (both absolute): kustomize takes no absolute
/// paths for bases and components.
fn relative(from: &std::path::Path, to: &std::path::Path) -> String {
    let ups = from.components().count().saturating_sub(1);
    let rest = to.strip_prefix("/").unwrap_or(to);
    format!("{}{}", "../".repeat(ups), rest.display())
}

/// The kustomize base, every overlay and every component on its own (over the base) render with
/// `kubectl kustomize` and pass a server-side dry run on the real API server; what each
/// component changes is in the rendered output.
#[test]
fn every_kustomize_overlay_and_component_renders_and_passes_a_server_dry_run() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let root: std::path::PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "deploy"]
        .iter()
        .collect();
    let root = root.canonicalize().expect("deploy/");
    // The monitoring component's kinds (the Prometheus Operator's CRDs, reduced).
    s.install_crds(include_str!("../../testdata/prometheus-operator-crds.yaml"))
        .expect("monitoring CRDs");
    let render = |dir: &std::path::Path| {
        let out = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .expect("kubectl kustomize");
        assert!(
            out.status.success(),
            "{}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (ok, out, err) = s.kubectl(&["apply", "--dry-run=server", "-f", "-"], &text);
        assert!(
            ok && out.contains("(server dry run)"),
            "{}: {err}",
            dir.display()
        );
        text
    };
    let base = render(&root.join("kubernetes"));
    assert!(base.contains("--metrics-addr=$(NODE_IP):5711") && base.contains("path: /opt/cni/bin"));
    let mut overlays = 0;
    for e in std::fs::read_dir(root.join("overlays")).expect("overlays") {
        render(&e.expect("entry").path());
        overlays += 1;
    }
    assert!(overlays >= 3, "{overlays} overlays");
    // Each component alone over the base, with what it must change.
    let expect = [
        ("cni-k3s", "path: /var/lib/rancher/k3s/data/cni", true),
        ("cni-crio", "path: /usr/libexec/cni", true),
        ("default-pool-ipv4", "name: default-v4-ippool", true),
        ("default-pool-ipv6", "name: default-v6-ippool", true),
        ("agent-resources", "memory: 512Mi", true),
        ("metrics-off", "--metrics-addr", false),
        ("monitoring", "kind: PrometheusRule", true),
    ];
    let mut names: Vec<String> = std::fs::read_dir(root.join("components"))
        .expect("components")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut listed: Vec<String> = expect.iter().map(|(n, _, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(names, listed, "every component has its check here");
    for (name, text, present) in expect {
        let dir = lab.dir.path().join(format!("with-{name}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n- {}\ncomponents:\n- {}\n",
                relative(&dir, &root.join("kubernetes")),
                relative(&dir, &root.join("components").join(name))
            ),
        )
        .expect("write");
        let out = render(&dir);
        assert_eq!(
            out.contains(text),
            present,
            "{name}: '{text}' present: {present}"
        );
    }
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
    coordinator_defaults_come_from_the_cluster(s, &a);
    // The Events it posts (a pool left out of the view) are allowed.
    let (_, out, err) = s.kubectl_as(
        &kc,
        &["auth", "can-i", "create", "events", "-n", "default"],
        "",
    );
    assert_eq!(out.trim(), "yes", "{err}");
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
    // Every pod the runtime will ADD exists in the API server first (Kubernetes mode refuses
    // an ADD for a pod it cannot read).
    let mut pods = String::new();
    let mut pod_on = |name: &str, node: &str| {
        pods.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec: {{nodeName: {node}, containers: [{{name: app, image: busybox}}]}}\n"
        ));
    };
    for (i, node) in nodes.iter().enumerate() {
        for w in 0..3 {
            for k in 0..10 {
                pod_on(&format!("burst-{i}-{w}-{k}"), node);
            }
        }
        for k in 0..10 {
            pod_on(&format!("again-{i}-{k}"), node);
        }
    }
    pod_on("during-outage", nodes[1]);
    let (ok, _, err) = lab.server.kubectl(&["apply", "-f", "-"], &pods);
    assert!(ok, "{err}");
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

/// What a record says about its pod, through the full path: when the runtime passes no
/// `K8S_POD_UID`, the record holds the UID of the pod the agent read (so "pod replaced" can be
/// told later); an ADD for a pod the API server does not have is refused with a retryable error
/// (code 11) naming it, and nothing is allocated.
#[test]
fn records_name_the_pod_read_and_a_missing_pod_is_refused() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod("uid-less", "controller-node-1"));
    assert!(ok, "{err}");
    let (ok, uid, err) = s.kubectl(
        &["get", "pod", "uid-less", "-o", "jsonpath={.metadata.uid}"],
        "",
    );
    assert!(ok && !uid.is_empty(), "{err}");
    let a = lab.agent("controller-node-1");
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let add = cni(
        &env_for(
            "ADD",
            "c-uid-less",
            "eth0",
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=uid-less",
        ),
        conf.to_string().as_bytes(),
    );
    assert_eq!(add.code(), 0, "{}\n{}", add.stdout, a.log_text());
    let uids: Vec<String> = records(s)
        .iter()
        .filter(|(_, r)| r["containerID"] == "c-uid-less")
        .map(|(_, r)| r["podUid"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(uids, [uid]);

    let missing = cni(
        &env_for(
            "ADD",
            "c-missing",
            "eth0",
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=not-created;K8S_POD_UID=u-x",
        ),
        conf.to_string().as_bytes(),
    );
    assert_eq!(missing.code(), 11, "{}", missing.stdout);
    assert!(
        missing.stdout.contains("default/not-created") && missing.stdout.contains("does not exist"),
        "{}",
        missing.stdout
    );
    assert_eq!(holders(s), ["c-uid-less"]);
}

/// The `coordinator` plugin's cluster defaults, served by the agent (with its own role) from the
/// `SpiderCoordinator` `default`: `mode: disabled` there makes the plugin pass the result through
/// without touching any namespace, and `status.serviceCIDR` is served as `serviceCIDR`.
fn coordinator_defaults_come_from_the_cluster(s: &KubeServer, a: &Agent) {
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderCoordinator\nmetadata: {name: default}\nspec: {mode: disabled, hostRuleTable: 600, podMACPrefix: \"0a:1b\"}\n",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(
        &[
            "patch",
            "spidercoordinator",
            "default",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"serviceCIDR":["10.233.0.0/18"],"phase":"Synced"}}"#,
        ],
        "",
    );
    assert!(ok, "{err}");
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--unix-socket",
            &a.sock(),
            "http://agent/v1/coordinator",
        ])
        .output()
        .expect("curl");
    let served: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(served["hostRuleTable"], 600, "{served}");
    assert_eq!(served["serviceCIDR"][0], "10.233.0.0/18", "{served}");
    let prev = serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": "10.6.168.61/16"}]});
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "n", "type": "coordinator",
        "agentSocket": a.sock(), "prevResult": prev});
    let mut child = std::process::Command::new(workspace_bin("coordinator", "spiderpool-cni"))
        .env_clear()
        .envs([
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c-coordinator"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/var/run/netns/does-not-exist"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("coordinator runs");
    {
        use std::io::Write;
        let mut i = child.stdin.take().expect("stdin");
        i.write_all(conf.to_string().as_bytes()).expect("write");
    }
    let out = child.wait_with_output().expect("coordinator ends");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the cluster said mode disabled: {text}"
    );
    let result: serde_json::Value = serde_json::from_str(text.trim()).expect("json");
    assert_eq!(result["ips"], prev["ips"], "{text}");
}
