//! The seed's whole CNI chain on real nodes: Debian's `macvlan` with our `spiderpool` IPAM, then
//! our `coordinator` (called `veth`, as the seed's NetworkAttachmentDefinition names it), run as
//! libcni runs a conflist, in network namespaces for a router, two zone nodes and their pods,
//! with one agent per node on one real etcd. Each node has a kube-proxy stand-in (iptables
//! DNAT of a ClusterIP and a NodePort to a backend pod in the other zone, MASQUERADE of what it
//! DNATs). Underlay pods reach the ClusterIP and the NodePorts, their node reaches them (the
//! kubelet's probes), a pod with NICs in both zones answers on each from that NIC, and DEL leaves
//! nothing on the node.
//!
//! Needs root, iproute2, ping, etcd, containernetworking-plugins, iptables, curl and python3
//! (the backend's HTTP server): outside CI a missing piece is a loud skip; in CI a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::lab::*;
use serde_json::{json, Value};
use spiderpool_store::testing::{find_binary, require, EtcdServer};

/// The seed's NetworkAttachmentDefinition, as shipped: its `spec.config`.
fn seed_nad() -> Value {
    let text = std::fs::read_to_string(
        [
            env!("CARGO_MANIFEST_DIR"),
            "..",
            "deploy",
            "kubernetes",
            "macvlan-conf.yaml",
        ]
        .iter()
        .collect::<PathBuf>(),
    )
    .expect("deploy/kubernetes/macvlan-conf.yaml");
    let nad: Value = serde_yaml_ng::from_str(&text).expect("yaml");
    serde_json::from_str(nad["spec"]["config"].as_str().expect("spec.config")).expect("json")
}

/// A process killed on drop.
struct Bg(Child);
impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ip_of(result: &Value) -> String {
    result["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

fn http_code(from_ns: &str, url: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            from_ns,
            "curl",
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{http_code}", url])
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// kube-proxy's part for one Service: the ClusterIP and the node's NodePort DNAT to the
/// backend, and MASQUERADE of DNATed traffic (the sources are outside the cluster CIDR).
fn kube_proxy(node: &str, node_ip: &str, backend: &str) {
    let to = format!("{backend}:8080");
    for dst in ["10.233.0.10/32:80", &format!("{node_ip}/32:30080")] {
        let (d, port) = dst.split_once(':').expect("dst:port");
        sh(&[
            "ip",
            "netns",
            "exec",
            node,
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            d,
            "-p",
            "tcp",
            "--dport",
            port,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ]);
    }
    sh(&[
        "ip",
        "netns",
        "exec",
        node,
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-m",
        "conntrack",
        "--ctstate",
        "DNAT",
        "-j",
        "MASQUERADE",
    ]);
}

/// What the coordinator leaves on a node: veth links, rules to table 500, routes in it.
fn node_leftovers(node: &str) -> String {
    let links = sh(&["ip", "-n", node, "-o", "link", "show", "type", "veth"]);
    let links: Vec<&str> = links
        .lines()
        .filter(|l| !l.contains("ens192") && !l.contains("ens224"))
        .collect();
    let rules = sh(&["ip", "-n", node, "rule"]);
    let rules: Vec<&str> = rules.lines().filter(|l| l.contains("lookup 500")).collect();
    let table = Command::new("ip")
        .args(["-n", node, "route", "show", "table", "500"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut out = String::new();
    for l in links.iter().chain(rules.iter()) {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(&table);
    out
}

fn extras(dir: &Path) -> PathBuf {
    write_manifest(
        dir,
        "zone7-node6.yaml",
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata:\n  name: zone7-node6\nspec:\n  subnet: 10.7.0.0/16\n  ips: [10.7.169.60-10.7.169.69]\n  gateway: 10.7.0.1\n",
    )
}

fn chain_prerequisites() -> Option<PathBuf> {
    let etcd = lab_prerequisites()?;
    require(
        "iptables",
        find_binary("iptables"),
        "apt-get install iptables",
    )?;
    require("curl", find_binary("curl"), "apt-get install curl")?;
    require("python3", find_binary("python3"), "apt-get install python3")?;
    Some(etcd)
}

#[test]
fn seed_chain_services_probes_two_nics_and_nothing_left_after_del() {
    let Some(etcd_bin) = chain_prerequisites() else {
        return;
    };
    let etcd = EtcdServer::start(&etcd_bin).expect("etcd starts");
    let dir = tempfile::tempdir().expect("dir");
    let store = format!("etcd:{}#/chain-{}/", etcd.url(), std::process::id());
    let extra = [extras(dir.path())];
    let agent6 = agent_with(dir.path(), "controller-node-1", &store, &extra);
    let agent7 = agent_with(dir.path(), "worker-node-1", &store, &extra);
    let mut ns = Netns::new();
    let router = ns.add("router");
    let node6 = ns.add("node6");
    let node7 = ns.add("node7");
    for (br, gw) in [("br6", "10.6.0.1/16"), ("br7", "10.7.0.1/16")] {
        sh(&["ip", "-n", &router, "link", "add", br, "type", "bridge"]);
        sh(&["ip", "-n", &router, "addr", "add", gw, "dev", br]);
        sh(&["ip", "-n", &router, "link", "set", br, "up"]);
    }
    wire(&router, "br6", &node6, "ens192", "r6a");
    wire(&router, "br7", &node6, "ens224", "r6b");
    wire(&router, "br7", &node7, "ens192", "r7a");
    for (node, addr, gw) in [
        (&node6, "10.6.0.2/16", "10.6.0.1"),
        (&node7, "10.7.0.2/16", "10.7.0.1"),
    ] {
        sh(&["ip", "-n", node, "addr", "add", addr, "dev", "ens192"]);
        sh(&["ip", "-n", node, "route", "add", "default", "via", gw]);
    }
    for n in [&router, &node6, &node7] {
        sh(&[
            "ip",
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
    }
    let path = cni_path(dir.path());
    // The seed's NAD, unchanged but for the agent's socket (each test agent has its own).
    let seed = |sock: &str| {
        let mut l = seed_nad();
        l["plugins"][0]["ipam"]["ipam_unix_socket_path"] = json!(sock);
        l
    };
    let seed6 = Chain {
        node: &node6,
        cni_path: &path,
        list: seed(&agent6.sock()),
    };
    let seed7 = Chain {
        node: &node7,
        cni_path: &path,
        list: seed(&agent7.sock()),
    };
    let tag = ns.tag.clone();
    let attach = |name: &str, ifname: &'static str, args: String| Pod {
        ns: format!("{tag}-{name}"),
        container: format!("sandbox-{name}"),
        ifname,
        args,
    };
    let pod6_ns = ns.add("test-app-j9ftl");
    let pod7_ns = ns.add("test-app-nkq5h");
    let pod6 = attach("test-app-j9ftl", "eth0", pod_args("test-app-j9ftl"));
    let pod7 = attach("test-app-nkq5h", "eth0", pod_args("test-app-nkq5h"));
    assert_eq!(
        (pod6.ns.as_str(), pod7.ns.as_str()),
        (pod6_ns.as_str(), pod7_ns.as_str())
    );
    let r7 = seed7.add(&pod7);
    let r6 = seed6.add(&pod6);
    let (ip6, ip7) = (ip_of(&r6), ip_of(&r7));
    assert!(
        ip6.starts_with("10.6.168.") && ip7.starts_with("10.7.168."),
        "{ip6} {ip7}"
    );
    // The kubelet's probes: each node reaches its own pod (through the veth pair: a macvlan
    // child cannot talk to its parent).
    assert!(ping(&node6, &ip6), "node6 cannot reach its pod {ip6}");
    assert!(ping(&node7, &ip7), "node7 cannot reach its pod {ip7}");
    // The pod's default route stays on its underlay NIC.
    let routes = sh(&["ip", "-n", &pod6_ns, "route", "show", "default"]);
    assert!(
        routes.contains("dev eth0") && !routes.contains("veth0"),
        "{routes}"
    );
    // Services: a backend in zone 7, reached from zone 6 by ClusterIP and NodePort.
    let _server = Bg(Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod7_ns,
            "python3",
            "-m",
            "http.server",
            "8080",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("http server"));
    let start = Instant::now();
    while http_code(&pod7_ns, "http://127.0.0.1:8080/") != "200" {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "backend never listened"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    kube_proxy(&node6, "10.6.0.2", &ip7);
    kube_proxy(&node7, "10.7.0.2", &ip7);
    assert_eq!(
        http_code(&pod6_ns, "http://10.233.0.10/"),
        "200",
        "pod6 -> ClusterIP"
    );
    assert_eq!(
        http_code(&pod6_ns, "http://10.6.0.2:30080/"),
        "200",
        "pod6 -> own node's NodePort"
    );
    assert_eq!(
        http_code(&pod6_ns, "http://10.7.0.2:30080/"),
        "200",
        "pod6 -> node7's NodePort"
    );
    assert_eq!(
        http_code(&pod7_ns, "http://10.233.0.10/"),
        "200",
        "pod7 -> ClusterIP (its own backend)"
    );
    // Pod to pod across the zones, through the router.
    assert!(
        ping(&pod6_ns, &ip7) && ping(&pod7_ns, &ip6),
        "pods do not reach each other"
    );
    let checks = seed6.check(&pod6, &r6);
    // The seed's list is 0.3.1: CHECK is refused there, by macvlan as by us (CHECK needs 0.4.0).
    assert!(
        checks.iter().all(|c| c.status != 0),
        "CHECK at 0.3.1 must be refused"
    );

    // A pod with NICs in both zones, on node6, at 1.0.0; its eth0's MAC from podMACPrefix.
    let net = |name: &str, master: &str, pool: &str, sock: &str, coordinator: Value| {
        let mut co = json!({"type": "coordinator", "service_cidr": ["10.233.0.0/18"]});
        for (k, v) in coordinator.as_object().into_iter().flatten() {
            co[k] = v.clone();
        }
        json!({"cniVersion": "1.0.0", "name": name, "plugins": [
            {"type": "macvlan", "master": master, "mode": "bridge",
             "ipam": {"type": "spiderpool", "ipam_unix_socket_path": sock, "default_ipv4_ippool": [pool]}},
            co]})
    };
    let multi_ns = ns.add("multi");
    let a = Chain {
        node: &node6,
        cni_path: &path,
        list: net(
            "zone6",
            "ens192",
            "test-ippool-6",
            &agent6.sock(),
            json!({"podMACPrefix": "0a:1b"}),
        ),
    };
    let b = Chain {
        node: &node6,
        cni_path: &path,
        list: net("zone7", "ens224", "zone7-node6", &agent6.sock(), json!({})),
    };
    let m0 = attach("multi", "eth0", String::new());
    let m1 = attach("multi", "net1", String::new());
    let ra = a.add(&m0);
    let rb = b.add(&m1);
    let (ma, mb) = (ip_of(&ra), ip_of(&rb));
    assert!(
        ma.starts_with("10.6.168.") && mb.starts_with("10.7.169."),
        "{ma} {mb}"
    );
    let link = sh(&["ip", "-n", &multi_ns, "-o", "link", "show", "dev", "eth0"]);
    assert!(
        link.contains("link/ether 0a:1b:"),
        "podMACPrefix not honoured: {link}"
    );
    assert_eq!(
        ra["interfaces"]
            .as_array()
            .and_then(|l| l.iter().find(|i| i["name"] == "eth0"))
            .and_then(|i| i["mac"].as_str())
            .map(|m| m.starts_with("0a:1b:")),
        Some(true),
        "the result reports the new MAC: {ra}"
    );
    // One default route, on eth0; each NIC answers from itself.
    let defaults = sh(&["ip", "-n", &multi_ns, "route", "show", "default"]);
    assert!(
        defaults.contains("dev eth0") && !defaults.contains("net1"),
        "{defaults}"
    );
    let via = |to: &str, from: &str| sh(&["ip", "-n", &multi_ns, "route", "get", to, "from", from]);
    assert!(via(&ip7, &ma).contains("dev eth0"), "{}", via(&ip7, &ma));
    assert!(via(&ip6, &mb).contains("dev net1"), "{}", via(&ip6, &mb));
    for (from, what) in [(&pod7_ns, "pod7"), (&pod6_ns, "pod6"), (&node6, "node6")] {
        for to in [&ma, &mb] {
            assert!(
                ping(from, to),
                "{what} cannot reach the two-NIC pod at {to}"
            );
        }
    }
    for (chain, pod, r) in [(&a, &m0, &ra), (&b, &m1, &rb)] {
        for c in chain.check(pod, r) {
            assert_eq!(c.status, 0, "CHECK {}: {}", pod.ifname, c.stdout);
        }
    }
    // DEL of everything: nothing of the coordinator's is left on the nodes, no address held.
    b.del(&m1, &rb);
    a.del(&m0, &ra);
    seed6.del(&pod6, &r6);
    seed7.del(&pod7, &r7);
    for n in [&node6, &node7] {
        assert_eq!(node_leftovers(n), "", "left on {n} after DEL");
    }
    // DEL again, and DEL once the pod's namespace is gone: still success.
    seed6.del(&pod6, &r6);
    sh(&["ip", "netns", "del", &pod7_ns]);
    seed7.del(&pod7, &r7);
    assert!(
        pool_counts(&agent6.sock()).iter().all(|(_, n)| *n == 0),
        "{:?}",
        pool_counts(&agent6.sock())
    );
    drop(etcd);
}
