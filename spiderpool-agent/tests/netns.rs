//! The seed, for real: network namespaces for a router, two nodes in two zones and their pods;
//! Debian's `macvlan` and `bridge` plugins calling our `spiderpool` IPAM binary; one
//! `spiderpool-agent` process per node on one real etcd (and one node on the embedded store).
//! Pods get an address of their node's zone and reach each other through the router.
//!
//! Needs root, iproute2, ping, etcd and containernetworking-plugins: outside CI a missing piece
//! is a loud skip; in CI (`CI` set) it is a failure.

mod common;

use common::lab::*;
use serde_json::json;
use spiderpool_store::testing::EtcdServer;

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
