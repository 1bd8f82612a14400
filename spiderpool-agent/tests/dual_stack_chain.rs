//! IPv6 through the whole chain, for real: a dual-stack zone (10.6.0.0/16 and fd00:6::/64 on
//! the router's bridge), Debian's `macvlan` with our `spiderpool` IPAM (IP conflict and gateway
//! detection on: NDP duplicate address detection and a Neighbor Solicitation for the gateway)
//! and our `coordinator`. A foreign host on the bridge holds one of the pool's IPv6 addresses.
//! The pod gets one address of each family, neither held by the foreign host; its node reaches
//! both through the veth pair (the node side's `fe80::1`, the pod side's `fe80::2`); DEL leaves
//! nothing on the node.
//!
//! Needs root, iproute2, ping, etcd and containernetworking-plugins: outside CI a missing piece
//! is a loud skip; in CI a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::lab::*;
use common::*;
use serde_json::{json, Value};

fn pools(dir: &Path) -> PathBuf {
    write_manifest(
        dir,
        "dual-pools.yaml",
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata:\n  name: dual4\nspec:\n  subnet: 10.6.0.0/16\n  ips: [10.6.173.60-10.6.173.69]\n  gateway: 10.6.0.1\n\
---\napiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata:\n  name: dual6\nspec:\n  subnet: fd00:6::/64\n  ips: [fd00:6::173:60-fd00:6::173:61]\n  gateway: fd00:6::1\n",
    )
}

/// `ping` (`-6` for IPv6) from `from_ns` until it answers or `limit` passes (a fresh IPv6
/// address is tentative for about a second: the kernel's own duplicate address detection).
fn ping_within(from_ns: &str, to: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        let ok = Command::new("ip")
            .args(["netns", "exec", from_ns, "ping", "-c", "1", "-W", "1", to])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn addr_of(result: &Value, v6: bool) -> String {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .find(|a| a.contains(':') == v6)
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn dual_stack_chain_with_ndp_conflict_detection_and_probes_over_the_pair() {
    let Some(_) = lab_prerequisites() else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let store = format!("embedded:{}", dir.path().join("leases.redb").display());
    let agent = agent_with(
        dir.path(),
        "controller-node-1",
        &store,
        &[pools(dir.path())],
    );
    let mut ns = Netns::new();
    let (router, node) = zone6(&mut ns);
    let foreign = ns.add("foreign");
    wire(&router, "br6", &foreign, "eth0", "r6f");
    sh(&[
        "ip",
        "-n",
        &router,
        "addr",
        "add",
        "fd00:6::1/64",
        "dev",
        "br6",
        "nodad",
    ]);
    sh(&[
        "ip",
        "-n",
        &node,
        "addr",
        "add",
        "fd00:6::2/64",
        "dev",
        "ens192",
        "nodad",
    ]);
    sh(&[
        "ip",
        "-n",
        &foreign,
        "addr",
        "add",
        "fd00:6::173:60/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    // The foreign host's address must be in use (not tentative) before the pod's ADD probes it.
    assert!(
        ping_within(&router, "fd00:6::173:60", Duration::from_secs(10)),
        "foreign host unreachable"
    );
    let path = cni_path(dir.path());
    let list = json!({"cniVersion": "1.0.0", "name": "dual", "plugins": [
        {"type": "macvlan", "master": "ens192", "mode": "bridge",
         "ipam": {"type": "spiderpool", "ipam_unix_socket_path": agent.sock(),
                  "default_ipv4_ippool": ["dual4"], "default_ipv6_ippool": ["dual6"],
                  "enableIPConflictDetection": true, "enableGatewayDetection": true}},
        {"type": "coordinator", "service_cidr": ["10.233.0.0/18", "fd00:233::/112"]}]});
    let pod = ns.add("pod");
    let chain = Chain {
        node: &node,
        cni_path: &path,
        list,
    };
    let attachment = Pod {
        ns: pod.clone(),
        container: "sandbox-dual".into(),
        ifname: "eth0",
        args: String::new(),
    };
    let conf = |i: usize, prev: Option<&Value>| chain.plugin_conf(i, prev);
    let run = |cmd: &str, i: usize, prev: Option<&Value>| chain.call(i, cmd, &attachment, prev);
    let main = run("ADD", 0, None);
    assert_eq!(
        main.status,
        0,
        "macvlan ADD: {}\n{}",
        main.stdout,
        agent.log_text()
    );
    let (v4, v6) = (addr_of(&main.json, false), addr_of(&main.json, true));
    assert!(v4.starts_with("10.6.173."), "{}", main.stdout);
    // fd00:6::173:60 answers for the foreign host: never handed out, the pod has :61.
    assert_eq!(v6, "fd00:6::173:61", "{}", main.stdout);
    let in_conflict = || {
        endpoints(&agent.sock())
            .iter()
            .any(|r| r.0.contains("#ip-conflict-") && r.2 == "fd00:6::173:60")
    };
    if !in_conflict() {
        // The agent tried :61 first: a second pod finds only :60, which NDP shows in use.
        let other = ns.add("other");
        let rt = Runtime {
            node: &node,
            main: MACVLAN,
            cni_path: &path,
        };
        let add = plugin_in(&rt, "ADD", &other, "sandbox-other", "", &conf(0, None));
        assert_eq!(add.code(), 101, "{}", add.stdout);
        let del = plugin_in(&rt, "DEL", &other, "sandbox-other", "", &conf(0, None));
        assert_eq!(del.status, 0, "{}", del.stdout);
    }
    assert!(in_conflict(), "{:?}", endpoints(&agent.sock()));
    let co = run("ADD", 1, Some(&main.json));
    assert_eq!(co.status, 0, "coordinator ADD: {}", co.stdout);
    // The node reaches both of the pod's addresses through the pair (the kubelet's probes).
    assert!(
        ping_within(&node, &v4, Duration::from_secs(5)),
        "node -> {v4}"
    );
    assert!(
        ping_within(&node, &v6, Duration::from_secs(10)),
        "node -> {v6}"
    );
    let routes = sh(&["ip", "-n", &pod, "-6", "route", "show", "fd00:233::/112"]);
    assert!(routes.contains("via fe80::1 dev veth0"), "{routes}");
    let del = run("DEL", 1, Some(&co.json));
    assert_eq!(del.status, 0, "{}", del.stdout);
    let del = run("DEL", 0, Some(&co.json));
    assert_eq!(del.status, 0, "{}", del.stdout);
    let links = sh(&["ip", "-n", &node, "-o", "link", "show", "type", "veth"]);
    assert_eq!(
        links.lines().filter(|l| !l.contains("ens192")).count(),
        0,
        "{links}"
    );
    for fam in ["-4", "-6"] {
        let rules = sh(&["ip", "-n", &node, fam, "rule"]);
        assert!(!rules.contains("lookup 500"), "{rules}");
    }
}
