//! SpiderSubnet auto-pools against the real API server: made at an application's first ADD by
//! the agent, followed by the controller's reconcile (made ahead, grown, shrunk, reclaimed),
//! every application kind, concurrent applications on several agents, the controller killed
//! mid scale-up.
#![cfg(feature = "kube")]

mod common;

use std::time::{Duration, Instant};

use common::kube::{holders, lab, wait_for};
use common::{cni, env_for, netconf};
use spiderpool_store::testing::KubeServer;

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
    // The ledger follows a shrunk pool after the reconcile's SHRINK_GRACE (10 s).
    wait_for(
        "subnet counts follow",
        Duration::from_secs(25),
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

/// An application whose name is longer than a label value (63 characters) keeps its pool and
/// every round of the reconcile succeeds: the reconcile finds the application by the pool's
/// annotation, not by the cut label (it used to look for an application of the cut name, and
/// every round failed).
#[test]
fn an_application_with_a_70_character_name_keeps_its_pool() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], SUBNET_16);
    assert!(ok, "{err}");
    let name = format!("long-{}", "x".repeat(65));
    assert_eq!(name.len(), 70);
    let dep = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: long}}}}\n  template:\n    metadata:\n      labels: {{app: long}}\n      annotations:\n        ipam.spidernet.io/subnet: '{{\"ipv4\": [\"subnet-16\"]}}'\n    spec: {{containers: [{{name: app, image: busybox}}]}}\n"
    );
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &dep);
    assert!(ok, "{err}");
    let c = ControllerProc::start(s, lab.dir.path(), "long");
    let log = || c.log_text();
    let pool_uid = || {
        let (_, out, _) = s.kubectl(
            &[
                "get",
                "sp",
                "-l",
                "ipam.spidernet.io/owner-spider-subnet",
                "-o",
                "jsonpath={.items[*].metadata.uid}",
            ],
            "",
        );
        out
    };
    wait_for(
        "pool made ahead",
        Duration::from_secs(15),
        || !pool_uid().is_empty(),
        &log,
    );
    let first = pool_uid();
    assert!(!first.contains(' '), "one pool: {first}");
    // Ten reconcile rounds later: the same pool, never reclaimed.
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(pool_uid(), first, "{}", log());
    let text = log();
    for bad in [
        "reclaimed=[\"auto4",
        "reconcile failed",
        "not followed",
        "not made",
    ] {
        assert!(!text.contains(bad), "{bad}:\n{text}");
    }
}

/// The subnet's ledger entry for a pool, as address strings.
fn ledger_entry(s: &KubeServer, prefix: &str) -> (String, serde_json::Value) {
    let (ok, out, err) = s.kubectl(
        &[
            "get",
            "ss",
            "subnet-16",
            "-o",
            "jsonpath={.status.controlledIPPools}",
        ],
        "",
    );
    assert!(ok, "{err}");
    let ledger: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let (name, _) = ledger
        .as_object()
        .and_then(|m| m.iter().find(|(k, _)| k.starts_with(prefix)))
        .unwrap_or_else(|| panic!("no ledger entry for {prefix}: {out}"));
    (name.clone(), ledger)
}

/// An agent grows a pool in two writes: the subnet's ledger (compare-and-swap), then the pool.
/// A reconcile that reads the pool between the two sees a pool older than the ledger; before
/// the fix it rewrote the entry from that pool at once, freeing in the ledger the addresses the
/// pool was about to hold (another application could then be carved them: two pools overlap).
/// Now an entry holding more than its pool is left alone for `SHRINK_GRACE` (10 s) unchanged,
/// and only then shrunk (an agent killed between its two writes leaves such an entry).
#[test]
fn the_reconcile_never_shrinks_a_ledger_entry_from_a_pool_read_mid_growth() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], SUBNET_16);
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &app_yaml("Deployment", "grow", 2, ""),
    );
    assert!(ok, "{err}");
    let c = ControllerProc::start(s, lab.dir.path(), "grow");
    let log = || c.log_text();
    wait_for(
        "the pool made ahead",
        Duration::from_secs(20),
        || count_ips(&auto_pool_ips(s, "auto4-grow-")) == 3,
        &log,
    );
    wait_for(
        "the ledger in line",
        Duration::from_secs(10),
        || subnet_allocated(s) == "3",
        &log,
    );
    // The agent's first write: the entry grows by 10.16.0.100; the pool is not written yet.
    let (pool, mut ledger) = ledger_entry(s, "auto4-grow-");
    ledger[&pool]["ips"]
        .as_array_mut()
        .expect("ips")
        .push("10.16.0.100".into());
    let patch = serde_json::json!({"status": {"controlledIPPools": ledger.to_string()}});
    let (ok, _, err) = s.kubectl(
        &[
            "patch",
            "ss",
            "subnet-16",
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ],
        "",
    );
    assert!(ok, "{err}");
    // Ten rounds later the entry still holds it.
    std::thread::sleep(Duration::from_secs(3));
    let (_, now) = ledger_entry(s, "auto4-grow-");
    assert!(
        now[&pool]["ips"].to_string().contains("10.16.0.100"),
        "the entry was shrunk from a pool read mid-growth: {now}\n{}",
        log()
    );
    // Never completed (the agent died between its writes): shrunk after the grace.
    wait_for(
        "the stale entry shrunk after the grace",
        Duration::from_secs(25),
        || {
            let (_, now) = ledger_entry(s, "auto4-grow-");
            !now[&pool]["ips"].to_string().contains("10.16.0.100")
        },
        &log,
    );
    assert_eq!(subnet_allocated(s), "3");
}
