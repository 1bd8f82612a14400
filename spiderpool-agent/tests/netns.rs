//! The seed, for real: network namespaces for a router, two nodes in two zones and their pods;
//! Debian's `macvlan` and `bridge` plugins calling our `spiderpool` IPAM binary; one
//! `spiderpool-agent` process per node on one real etcd (and one node on the embedded store).
//! Pods get an address of their node's zone and reach each other through the router.
//!
//! Needs root, iproute2, ping, etcd and containernetworking-plugins: outside CI a missing piece
//! is a loud skip; in CI (`CI` set) it is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use serde_json::{json, Value};
use spiderpool_store::testing::{find_binary, is_root, require, EtcdServer};

const MACVLAN: &str = "/usr/lib/cni/macvlan";
const BRIDGE: &str = "/usr/lib/cni/bridge";

/// Everything a lab test needs, or `None` after a loud skip.
fn lab_prerequisites() -> Option<PathBuf> {
    require(
        "root (network namespaces)",
        is_root().then_some(()),
        "run as root, as CI does",
    )?;
    require(
        "iproute2 (ip)",
        find_binary("ip"),
        "apt-get install iproute2",
    )?;
    require("ping", find_binary("ping"), "apt-get install iputils-ping")?;
    for p in [MACVLAN, BRIDGE] {
        require(
            p,
            Path::new(p).exists().then_some(()),
            "apt-get install containernetworking-plugins",
        )?;
    }
    require("etcd", find_binary("etcd"), "apt-get install etcd-server")
}

/// Runs a command; panics with its output when it fails.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Namespaces of one test, deleted on drop (deleting a namespace removes its links).
struct Netns {
    names: Vec<String>,
    tag: String,
}

impl Netns {
    fn new() -> Netns {
        Netns {
            names: Vec::new(),
            tag: format!(
                "sp{}x{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// Creates namespace `<tag>-<what>` with loopback up; returns its name.
    fn add(&mut self, what: &str) -> String {
        let name = format!("{}-{what}", self.tag);
        sh(&["ip", "netns", "add", &name]);
        self.names.push(name.clone());
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// A router namespace with `gw` (CIDR) on a veth whose other end is `ens192` in `node`.
    fn uplink(&self, router: &str, node: &str, side: &str, gw: &str) {
        sh(&[
            "ip", "link", "add", "ens192", "netns", node, "type", "veth", "peer", "name", side,
            "netns", router,
        ]);
        sh(&["ip", "-n", node, "link", "set", "ens192", "up"]);
        sh(&["ip", "-n", router, "addr", "add", gw, "dev", side]);
        sh(&["ip", "-n", router, "link", "set", side, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// A main CNI plugin run inside a node's namespace, as the node's runtime runs it.
struct Runtime<'a> {
    node: &'a str,
    main: &'a str,
    cni_path: &'a Path,
}

/// Runs `rt.main` for `cmd` on the pod namespace `pod_ns`.
fn plugin_in(
    rt: &Runtime<'_>,
    cmd: &str,
    pod_ns: &str,
    container: &str,
    args: &str,
    conf: &Value,
) -> Call {
    let netns = format!("/var/run/netns/{pod_ns}");
    let cni_path = rt.cni_path.to_string_lossy().into_owned();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", rt.node, rt.main])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", &netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &cni_path)
        .env("CNI_ARGS", args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("plugin runs");
    {
        use std::io::Write;
        let mut i = child.stdin.take().expect("stdin");
        i.write_all(conf.to_string().as_bytes())
            .expect("write conf");
    }
    let out = child.wait_with_output().expect("plugin ends");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Call {
        status: out.status.code().unwrap_or(-1),
        json: serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        stdout: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// CNI_PATH with our IPAM binary in it.
fn cni_path(dir: &Path) -> PathBuf {
    let p = dir.join("cni-bin");
    std::fs::create_dir_all(&p).expect("mkdir");
    std::os::unix::fs::symlink(plugin(), p.join("spiderpool")).expect("symlink");
    p
}

fn pod_args(name: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_UID=uid-{name}")
}

fn ping(from_ns: &str, to: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", from_ns, "ping", "-c", "1", "-W", "2", to])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn agent_for(dir: &Path, node: &str, store: &str) -> Agent {
    let args: Vec<String> = [
        "--node-name",
        node,
        "--store",
        store,
        "--manifests",
        &testdata("seed-pools.yaml").to_string_lossy(),
        "--manifests",
        &testdata("seed-cluster.yaml").to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Agent::start(
        &dir.join(format!("{node}.sock")),
        &dir.join(format!("{node}.log")),
        &args,
    )
}

fn pool_counts(socket: &str) -> Vec<(String, u64)> {
    let out = spiderctl(&["get", "ippools", "--socket", socket, "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    v.as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default().to_string(),
                r["allocatedIpCount"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn seed_two_zones_macvlan_on_etcd_pods_ping_across_the_router() {
    let Some(etcd_bin) = lab_prerequisites() else {
        return;
    };
    let etcd = EtcdServer::start(&etcd_bin).expect("etcd starts");
    let dir = tempfile::tempdir().expect("dir");
    let store = format!("etcd:{}#/seed-{}/", etcd.url(), std::process::id());
    let agent6 = agent_for(dir.path(), "controller-node-1", &store);
    let agent7 = agent_for(dir.path(), "worker-node-1", &store);
    let mut ns = Netns::new();
    let router = ns.add("router");
    let node6 = ns.add("node6");
    let node7 = ns.add("node7");
    ns.uplink(&router, &node6, "r6", "10.6.0.1/16");
    ns.uplink(&router, &node7, "r7", "10.7.0.1/16");
    sh(&[
        "ip",
        "netns",
        "exec",
        &router,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    let path = cni_path(dir.path());
    let conf = |sock: &str, version: &str| {
        json!({"cniVersion": version, "name": "macvlan-zone", "type": "macvlan", "master": "ens192",
               "mode": "bridge", "ipam": {"type": "spiderpool", "ipam_unix_socket_path": sock}})
    };
    // One pod per node, as the seed's DaemonSet places them.
    let pods = [
        (
            &node6,
            &agent6,
            "test-app-j9ftl",
            "10.6.168.",
            "test-ippool-6",
        ),
        (
            &node7,
            &agent7,
            "test-app-nkq5h",
            "10.7.168.",
            "test-ippool-7",
        ),
    ];
    let mut ips = Vec::new();
    for (node, agent, pod, prefix, pool) in &pods {
        let pod_ns = ns.add(pod);
        let c = conf(&agent.sock(), "1.0.0");
        let add = plugin_in(
            &Runtime {
                node,
                main: MACVLAN,
                cni_path: &path,
            },
            "ADD",
            &pod_ns,
            &format!("sandbox-{pod}"),
            &pod_args(pod),
            &c,
        );
        assert_eq!(
            add.status,
            0,
            "macvlan ADD for {pod}: {}\nagent log:\n{}",
            add.stdout,
            agent.log_text()
        );
        let ip = add.json["ips"][0]["address"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(ip.starts_with(prefix), "{pod} got {ip}, not from {pool}");
        // The address is really on the pod's eth0.
        let shown = sh(&["ip", "-n", &pod_ns, "-o", "addr", "show", "dev", "eth0"]);
        assert!(shown.contains(&ip), "{pod}: eth0 shows {shown}");
        let routes = sh(&["ip", "-n", &pod_ns, "route"]);
        assert!(routes.contains("default via 10."), "{pod}: routes {routes}");
        // CHECK with the result as prevResult.
        let mut chk = c.clone();
        chk["prevResult"] = add.json.clone();
        let check = plugin_in(
            &Runtime {
                node,
                main: MACVLAN,
                cni_path: &path,
            },
            "CHECK",
            &pod_ns,
            &format!("sandbox-{pod}"),
            &pod_args(pod),
            &chk,
        );
        assert_eq!(check.status, 0, "CHECK {pod}: {}", check.stdout);
        ips.push((pod_ns, ip.split('/').next().unwrap_or_default().to_string()));
    }
    // Across zones, through the router, both ways.
    assert!(
        ping(&ips[0].0, &ips[1].1),
        "{} cannot reach {}",
        ips[0].0,
        ips[1].1
    );
    assert!(
        ping(&ips[1].0, &ips[0].1),
        "{} cannot reach {}",
        ips[1].0,
        ips[0].1
    );
    // The probe can fail: an address nobody holds does not answer.
    assert!(
        !ping(&ips[0].0, "10.7.168.250"),
        "ping answered for an unassigned address"
    );
    let counts = pool_counts(&agent6.sock());
    assert_eq!(
        counts,
        [
            ("test-ippool-6".to_string(), 1),
            ("test-ippool-7".to_string(), 1)
        ],
        "one per zone, seen from either agent"
    );
    // DEL frees everything.
    for ((node, agent, pod, _, _), (pod_ns, _)) in pods.iter().zip(&ips) {
        let c = conf(&agent.sock(), "1.0.0");
        let del = plugin_in(
            &Runtime {
                node,
                main: MACVLAN,
                cni_path: &path,
            },
            "DEL",
            pod_ns,
            &format!("sandbox-{pod}"),
            &pod_args(pod),
            &c,
        );
        assert_eq!(del.status, 0, "DEL {pod}: {}", del.stdout);
    }
    assert_eq!(
        pool_counts(&agent7.sock()),
        [
            ("test-ippool-6".to_string(), 0),
            ("test-ippool-7".to_string(), 0)
        ]
    );
    drop(etcd);
}

#[test]
fn bridge_plugin_on_the_embedded_store_at_every_legacy_version() {
    let Some(_) = lab_prerequisites() else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let store = format!("embedded:{}", dir.path().join("leases.redb").display());
    let agent = agent_for(dir.path(), "controller-node-1", &store);
    let mut ns = Netns::new();
    let router = ns.add("router");
    let node = ns.add("node6");
    ns.uplink(&router, &node, "r6", "10.6.0.1/16");
    // The node's bridge, with its uplink enslaved: pods on it reach the router.
    sh(&["ip", "-n", &node, "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "-n", &node, "link", "set", "ens192", "master", "br0"]);
    sh(&["ip", "-n", &node, "link", "set", "br0", "up"]);
    let path = cni_path(dir.path());
    for (i, version) in ["0.3.1", "0.4.0", "1.0.0"].iter().enumerate() {
        let pod = format!("bridge-pod-{i}");
        let pod_ns = ns.add(&pod);
        let c = json!({"cniVersion": version, "name": "bridge-zone", "type": "bridge", "bridge": "br0",
                       "ipam": {"type": "spiderpool", "ipam_unix_socket_path": agent.sock(),
                                "default_ipv4_ippool": ["test-ippool-6"]}});
        let cid = format!("sandbox-{pod}");
        let add = plugin_in(
            &Runtime {
                node: &node,
                main: BRIDGE,
                cni_path: &path,
            },
            "ADD",
            &pod_ns,
            &cid,
            &pod_args(&pod),
            &c,
        );
        assert_eq!(
            add.status,
            0,
            "bridge ADD at {version}: {}\n{}",
            add.stdout,
            agent.log_text()
        );
        assert_eq!(add.json["cniVersion"], *version);
        let ip = add.json["ips"][0]["address"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(ip.starts_with("10.6.168."), "{version}: {ip}");
        assert!(
            ping(&pod_ns, "10.6.0.1"),
            "{version}: pod {ip} cannot reach its gateway"
        );
        if *version != "0.3.1" {
            let mut chk = c.clone();
            chk["prevResult"] = add.json.clone();
            let check = plugin_in(
                &Runtime {
                    node: &node,
                    main: BRIDGE,
                    cni_path: &path,
                },
                "CHECK",
                &pod_ns,
                &cid,
                &pod_args(&pod),
                &chk,
            );
            assert_eq!(check.status, 0, "CHECK at {version}: {}", check.stdout);
        }
        let del = plugin_in(
            &Runtime {
                node: &node,
                main: BRIDGE,
                cni_path: &path,
            },
            "DEL",
            &pod_ns,
            &cid,
            &pod_args(&pod),
            &c,
        );
        assert_eq!(del.status, 0, "DEL at {version}: {}", del.stdout);
    }
    assert!(pool_counts(&agent.sock()).iter().all(|(_, n)| *n == 0));
}
