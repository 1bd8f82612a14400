//! Kubernetes mode when things go wrong half-way, against the real API server: a client that
//! leaves in the middle of an ADD, objects the view or the store cannot use.
#![cfg(feature = "kube")]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::kube::{holders, lab, pod, wait_for};
use common::{cni, env_for, netconf, plugin};

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// The plugin gives up on an ADD (here: killed while the block write waits on a paused etcd)
/// and the runtime sends DEL at once. The ADD's write still lands after the client left; the
/// DEL waits for it and frees it. Before the fix the DEL found nothing to free, answered 0,
/// and the write landed afterwards: the address leaked for the pod's lifetime.
#[test]
fn an_add_whose_client_left_is_freed_by_the_next_del() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod("cut", "controller-node-1"));
    assert!(ok, "{err}");
    let a = lab.agent("controller-node-1");
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=cut";
    // The pool's block exists and the view has the pod: the next ADD needs etcd only to write.
    for cmd in ["ADD", "DEL"] {
        let c = cni(
            &env_for(cmd, "cut-warm", "eth0", args),
            conf.to_string().as_bytes(),
        );
        assert_eq!(c.code(), 0, "{cmd}: {}\n{}", c.stdout, a.log_text());
    }
    assert!(holders(s).is_empty());
    let etcd = *s.pids().last().expect("etcd pid");

    signal(etcd, "-STOP");
    let mut add = Command::new(plugin())
        .env_clear()
        .envs(env_for("ADD", "cut-1", "eth0", args))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("plugin");
    add.stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("netconf");
    std::thread::sleep(Duration::from_millis(1500));
    // The runtime's timeout: the plugin is gone, its connection closed.
    let _ = add.kill();
    let _ = add.wait();
    let del_conf = conf.to_string();
    let del = std::thread::spawn(move || {
        cni(&env_for("DEL", "cut-1", "eth0", args), del_conf.as_bytes())
    });
    std::thread::sleep(Duration::from_millis(1000));
    signal(etcd, "-CONT");
    let del = del.join().expect("DEL thread");
    assert_eq!(del.code(), 0, "DEL: {}\n{}", del.stdout, a.log_text());
    // Whatever the abandoned ADD wrote is gone now, and stays gone.
    wait_for(
        "the abandoned ADD's record freed",
        Duration::from_secs(10),
        || holders(s).is_empty(),
        &|| format!("{:?}\n{}", holders(s), a.log_text()),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        holders(s).is_empty(),
        "a record appeared after the DEL: {:?}\n{}",
        holders(s),
        a.log_text()
    );
}

/// The block record schema is in the CRD: the API server refuses a SpiderIPBlock whose record
/// is not one (a `kubectl edit` typo).
#[test]
fn the_api_server_refuses_a_block_record_that_is_not_one() {
    let Some(lab) = lab() else { return };
    let (ok, _, err) = lab
        .server
        .kubectl(&["apply", "-f", "-"], &bad_block("v4-10-6-168-48"));
    assert!(!ok, "a record with a numeric pod was accepted");
    assert!(err.contains("pod"), "{err}");
}

fn bad_block(name: &str) -> String {
    format!(
        r#"apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPBlock
metadata: {{name: {name}}}
spec:
  base: 10.6.168.48
  allocations:
    "10.6.168.61": {{pool: test-ippool-6, pod: 42}}
"#
    )
}

/// One SpiderIPBlock holding a slot that is not a record (written before the CRD carried the
/// record schema, or edited around it): before the fix the typed LIST of blocks failed, so no
/// agent could start. Now the agent starts and serves; the block cannot be written any more (the
/// API server validates the whole object), so its addresses count as taken: the pool's other
/// addresses are handed out, those four never, the slot stays as it is, and the log says so.
#[test]
fn an_unreadable_block_record_costs_its_block_not_the_agent() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    // The CRD as an earlier release installed it: records not validated.
    let (ok, _, err) = s.kubectl(
        &[
            "patch",
            "crd",
            "spideripblocks.spiderpool.spidernet.io",
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/allocations","value":{"type":"object","x-kubernetes-preserve-unknown-fields":true}}]"#,
        ],
        "",
    );
    assert!(ok, "{err}");
    wait_for(
        "the relaxed CRD in effect",
        Duration::from_secs(20),
        || {
            s.kubectl(&["apply", "-f", "-"], &bad_block("v4-10-6-168-48"))
                .0
        },
        &|| String::new(),
    );
    s.install_crds(&spiderpool_store::k8s::crd::crds_yaml())
        .expect("CRDs back");

    let a = lab.agent("controller-node-1");
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let mut got = Vec::new();
    for i in 0..7 {
        let name = format!("p{i}");
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod(&name, "controller-node-1"));
        assert!(ok, "{err}");
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}");
        let c = cni(
            &env_for("ADD", &format!("c{i}"), "eth0", &args),
            conf.to_string().as_bytes(),
        );
        if i < 6 {
            assert_eq!(c.code(), 0, "ADD {i}: {}\n{}", c.stdout, a.log_text());
            got.push(c.ip());
        } else {
            assert_ne!(c.code(), 0, "the seventh ADD got {}", c.ip());
            assert!(c.stdout.contains("exhausted"), "{}", c.stdout);
        }
    }
    got.sort();
    let want: Vec<String> = (64..70).map(|i| format!("10.6.168.{i}/16")).collect();
    assert_eq!(
        got, want,
        "addresses of the unreadable block were handed out"
    );
    let (ok, out, err) = s.kubectl(
        &[
            "get",
            "spideripblock",
            "v4-10-6-168-48",
            "-o",
            "jsonpath={.spec.allocations['10\\.6\\.168\\.61']}",
        ],
        "",
    );
    assert!(ok, "{err}");
    let kept: serde_json::Value = serde_json::from_str(&out).expect("slot");
    // (The API server adds the schema's default `created: 0` when it reads the object.)
    assert_eq!(
        (&kept["pool"], &kept["pod"]),
        (&serde_json::json!("test-ippool-6"), &serde_json::json!(42)),
        "{kept}"
    );
    assert!(
        a.log_text().contains("not an allocation record"),
        "{}",
        a.log_text()
    );
}

fn pool_yaml(name: &str, subnet: &str, ips: &str) -> String {
    format!(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {{name: {name}}}\nspec: {{subnet: {subnet}, ips: ['{ips}']}}\n"
    )
}

fn pod_in(name: &str, pool: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n    ipam.spidernet.io/ippool: '{{\"ipv4\": [\"{pool}\"]}}'\nspec:\n  nodeName: controller-node-1\n  containers: [{{name: app, image: busybox}}]\n"
    )
}

/// Two pools that overlap got past admission (no webhook ran). Before the fix the whole view
/// froze at the last good snapshot: a pool created afterwards was never served. Now only the
/// newer of the two is left out, with a log line; the older and every other object stay current.
#[test]
fn an_overlapping_pool_is_left_out_and_the_rest_of_the_view_stays_current() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let a = lab.agent("controller-node-1");
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &pool_yaml("overlap-new", "10.6.0.0/16", "10.6.168.65-10.6.168.70"),
    );
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &pool_yaml("late-pool", "10.8.0.0/16", "10.8.0.10-10.8.0.19"),
    );
    assert!(ok, "{err}");
    for (pod, pool) in [
        ("late", "late-pool"),
        ("older", "test-ippool-6"),
        ("newer", "overlap-new"),
    ] {
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod_in(pod, pool));
        assert!(ok, "{err}");
    }
    let add = |pod: &str| {
        cni(
            &env_for(
                "ADD",
                &format!("c-{pod}"),
                "eth0",
                &format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"),
            ),
            conf.to_string().as_bytes(),
        )
    };
    let mut late = add("late");
    for _ in 0..50 {
        if late.code() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        late = add("late");
    }
    assert_eq!(
        late.code(),
        0,
        "the later pool is not served: {}\n{}",
        late.stdout,
        a.log_text()
    );
    assert!(late.ip().starts_with("10.8.0."), "{}", late.ip());
    let older = add("older");
    assert_eq!(older.code(), 0, "{}", older.stdout);
    assert!(older.ip().starts_with("10.6.168."), "{}", older.ip());
    let newer = add("newer");
    assert_ne!(
        newer.code(),
        0,
        "the newer overlapping pool was served: {}",
        newer.ip()
    );
    assert!(newer.stdout.contains("overlap-new"), "{}", newer.stdout);
    let log = a.log_text();
    assert!(
        log.contains("left out of the view") && log.contains("overlap-new"),
        "{log}"
    );
    // And a Warning Event on the pool, for kubectl users.
    let events = || {
        s.kubectl(
            &[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                "involvedObject.name=overlap-new,reason=LeftOutOfView",
                "-o",
                "jsonpath={.items[*].type} {.items[*].involvedObject.kind} {.items[*].message}",
            ],
            "",
        )
        .1
    };
    wait_for(
        "the LeftOutOfView Event",
        Duration::from_secs(10),
        || events().starts_with("Warning SpiderIPPool ") && events().contains("test-ippool-6"),
        &events,
    );
}

/// A StatefulSet pod rescheduled to a node of another zone cannot take its earlier address (the
/// old pool does not serve the new node): it gets one of its new zone, and the earlier one is
/// freed at that ADD. Before the fix GC kept it for the StatefulSet's lifetime (the ordinal is
/// still wanted), contrary to docs/kubernetes.md.
#[test]
fn a_statefulset_pod_moved_to_another_zone_frees_its_old_address() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let sts = "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db, namespace: default}\nspec:\n  replicas: 1\n  serviceName: db\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: db}}\n    spec: {containers: [{name: app, image: busybox}]}\n";
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], sts);
    assert!(ok, "{err}");
    let (_, sts_uid, _) = s.kubectl(&["get", "sts", "db", "-o", "jsonpath={.metadata.uid}"], "");
    let db0 = |node: &str| {
        pod("db-0", node).replace(
            "  labels: {app: test-app}\n",
            &format!("  labels: {{app: db}}\n  ownerReferences:\n  - {{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: {sts_uid}, controller: true}}\n"),
        )
    };
    let zone6 = lab.agent("controller-node-1");
    let zone7 = lab.agent("worker-node-1");
    let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=db-0";
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &db0("controller-node-1"));
    assert!(ok, "{err}");
    let conf6 = netconf(
        "1.0.0",
        "macvlan-conf",
        &zone6.sock(),
        serde_json::json!({}),
    );
    let first = cni(
        &env_for("ADD", "db-0-a", "eth0", args),
        conf6.to_string().as_bytes(),
    );
    assert_eq!(first.code(), 0, "{}\n{}", first.stdout, zone6.log_text());
    assert!(first.ip().starts_with("10.6."), "{}", first.ip());
    // The node is drained: the pod is deleted (the old sandbox's DEL keeps the wanted ordinal's
    // record) and the StatefulSet recreates it in the other zone.
    let del = cni(
        &env_for("DEL", "db-0-a", "eth0", args),
        conf6.to_string().as_bytes(),
    );
    assert_eq!(del.code(), 0, "{}", del.stdout);
    assert_eq!(
        holders(s),
        ["db-0-a"],
        "DEL keeps a wanted ordinal's record"
    );
    let (ok, _, err) = s.kubectl(
        &["delete", "pod", "db-0", "--grace-period=0", "--force"],
        "",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &db0("worker-node-1"));
    assert!(ok, "{err}");
    let conf7 = netconf(
        "1.0.0",
        "macvlan-conf",
        &zone7.sock(),
        serde_json::json!({}),
    );
    let second = cni(
        &env_for("ADD", "db-0-b", "eth0", args),
        conf7.to_string().as_bytes(),
    );
    assert_eq!(second.code(), 0, "{}\n{}", second.stdout, zone7.log_text());
    assert!(second.ip().starts_with("10.7."), "{}", second.ip());
    wait_for(
        "the zone-6 address freed",
        Duration::from_secs(10),
        || holders(s) == ["db-0-b"],
        &|| format!("{:?}\n{}", holders(s), zone7.log_text()),
    );
}

/// Readiness and liveness reflect a wedged store: while a block write hangs (etcd paused behind
/// the API server), the agent reports itself unready once a command has run past
/// `--ready-stuck-secs`, and not alive past `--live-stuck-secs`, naming the container; both
/// recover when the store answers again.
#[test]
fn probes_report_a_wedged_store_and_recover() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod("wedge", "controller-node-1"));
    assert!(ok, "{err}");
    let kc = s.kubeconfig().to_string_lossy().into_owned();
    let args: Vec<String> = [
        "--node-name",
        "controller-node-1",
        "--kube",
        "--kubeconfig",
        &kc,
        "--store",
        "kube",
        "--ready-stuck-secs",
        "2",
        "--live-stuck-secs",
        "4",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let a = common::Agent::start(
        &lab.dir.path().join("w.sock"),
        &lab.dir.path().join("w.log"),
        &args,
    );
    let health = |live: bool| {
        let mut cmd = vec!["health", "--socket"];
        let sock = a.sock();
        cmd.push(&sock);
        if live {
            cmd.push("--live");
        }
        let out = common::spiderctl(&cmd);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(health(false).0, Some(0), "{}", health(false).1);
    assert_eq!(health(true).0, Some(0));
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=wedge";
    let warm = cni(
        &env_for("ADD", "wedge-warm", "eth0", args),
        conf.to_string().as_bytes(),
    );
    assert_eq!(warm.code(), 0, "{}", warm.stdout);
    let etcd = *s.pids().last().expect("etcd pid");
    signal(etcd, "-STOP");
    let c = conf.to_string();
    let add =
        std::thread::spawn(move || cni(&env_for("ADD", "wedge-1", "net1", args), c.as_bytes()));
    std::thread::sleep(Duration::from_millis(3000));
    let (ready, why) = health(false);
    let (alive, _) = health(true);
    std::thread::sleep(Duration::from_millis(2500));
    let (alive_later, why_live) = health(true);
    signal(etcd, "-CONT");
    let _ = add.join();
    assert_eq!(ready, Some(1), "ready while a write hangs");
    assert!(why.contains("wedge-1"), "{why}");
    assert_eq!(alive, Some(0), "not alive before --live-stuck-secs");
    assert_eq!(alive_later, Some(1), "alive past --live-stuck-secs");
    assert!(why_live.contains("wedge-1"), "{why_live}");
    wait_for(
        "ready again",
        Duration::from_secs(20),
        || health(false).0 == Some(0) && health(true).0 == Some(0),
        &|| a.log_text(),
    );
}

/// A pod that moved: its new node rewrote its SpiderEndpoint before the old node's projector
/// noticed the pod's record was gone. The old node must leave the endpoint alone (it deletes only
/// an endpoint that is still its own, conditional on the version it read).
#[test]
fn the_old_node_does_not_delete_an_endpoint_the_new_node_wrote() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let a = lab.agent("controller-node-1");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod("mover", "controller-node-1"));
    assert!(ok, "{err}");
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=mover";
    let add = cni(
        &env_for("ADD", "c-mover", "eth0", args),
        conf.to_string().as_bytes(),
    );
    assert_eq!(add.code(), 0, "{}\n{}", add.stdout, a.log_text());
    let node_of = || {
        s.kubectl(
            &[
                "get",
                "se",
                "mover",
                "-n",
                "default",
                "-o",
                "jsonpath={.status.current.node}",
            ],
            "",
        )
        .1
    };
    wait_for(
        "the old node's SpiderEndpoint",
        Duration::from_secs(15),
        || node_of() == "controller-node-1",
        &|| format!("{:?}\n{}", node_of(), a.log_text()),
    );
    // The new node's agent writes the endpoint (as its projector does), then the old one's DEL.
    let (ok, _, err) = s.kubectl(
        &[
            "patch",
            "se",
            "mover",
            "-n",
            "default",
            "--type=merge",
            "-p",
            r#"{"status":{"current":{"node":"worker-node-1"}}}"#,
        ],
        "",
    );
    assert!(ok, "{err}");
    let del = cni(
        &env_for("DEL", "c-mover", "eth0", args),
        conf.to_string().as_bytes(),
    );
    assert_eq!(del.code(), 0, "{}", del.stdout);
    wait_for(
        "the record freed",
        Duration::from_secs(15),
        || holders(s).is_empty(),
        &|| format!("{:?}", holders(s)),
    );
    // Several projector rounds (1 s each) later, the new node's endpoint is still there.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(node_of(), "worker-node-1", "{}", a.log_text());
}

/// An upgrade as docs/kubernetes.md describes it: the CRDs of the new release applied over the
/// running ones (objects and records in place), then the agent replaced (SIGTERM, new process):
/// every allocation is kept (CHECK passes, the same address is recorded, the pool count holds)
/// and the new agent serves the next ADD.
#[test]
fn crds_applied_over_running_objects_and_a_replaced_agent_keep_every_allocation() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let mut a = lab.agent("controller-node-1");
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let mut held = Vec::new();
    for name in ["up-a", "up-b"] {
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod(name, "controller-node-1"));
        assert!(ok, "{err}");
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}");
        let add = cni(
            &env_for("ADD", &format!("c-{name}"), "eth0", &args),
            conf.to_string().as_bytes(),
        );
        assert_eq!(add.code(), 0, "{}\n{}", add.stdout, a.log_text());
        held.push((name, args, add.json.clone()));
    }
    // The new release's CRDs over the current ones (server-side apply keeps every object).
    s.install_crds(&spiderpool_store::k8s::crd::crds_yaml())
        .expect("CRDs re-applied");
    let (ok, out, _) = s.kubectl(&["get", "spideripblocks", "-o", "name"], "");
    assert!(
        ok && !out.trim().is_empty(),
        "blocks after the CRD upgrade: {out}"
    );
    assert!(a.terminate().success(), "the agent stops cleanly");
    a.start_again();
    for (name, args, result) in &held {
        let mut check = conf.clone();
        check["prevResult"] = result.clone();
        let out = cni(
            &env_for("CHECK", &format!("c-{name}"), "eth0", args),
            check.to_string().as_bytes(),
        );
        assert_eq!(
            out.code(),
            0,
            "{name} after the upgrade: {}\n{}",
            out.stdout,
            a.log_text()
        );
    }
    assert_eq!(holders(s), ["c-up-a", "c-up-b"]);
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod("up-c", "controller-node-1"));
    assert!(ok, "{err}");
    let add = cni(
        &env_for(
            "ADD",
            "c-up-c",
            "eth0",
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=up-c",
        ),
        conf.to_string().as_bytes(),
    );
    assert_eq!(add.code(), 0, "{}", add.stdout);
    let ips: std::collections::BTreeSet<String> = held
        .iter()
        .map(|(_, _, r)| {
            r["ips"][0]["address"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .chain([add.ip()])
        .collect();
    assert_eq!(ips.len(), 3, "an address was handed out twice: {ips:?}");
}
