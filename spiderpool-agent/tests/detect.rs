//! IP conflict and gateway detection for real: Debian's `macvlan` calling our `spiderpool` IPAM
//! with `enableIPConflictDetection` / `enableGatewayDetection`, in network namespaces where a
//! host outside the cluster (not ours, on the zone's bridge) already uses two of a pool's three
//! addresses, and a pool's gateway that nobody holds.
//!
//! Needs root, iproute2, ping, etcd and containernetworking-plugins: outside CI a missing piece
//! is a loud skip; in CI a failure.

mod common;

use std::path::{Path, PathBuf};

use common::lab::*;
use common::*;
use serde_json::{json, Value};

fn pools(dir: &Path) -> PathBuf {
    write_manifest(
        dir,
        "detect-pools.yaml",
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata:\n  name: guarded\nspec:\n  subnet: 10.6.0.0/16\n  ips: [10.6.171.60-10.6.171.62]\n  gateway: 10.6.0.1\n\
---\napiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata:\n  name: dead-gw\nspec:\n  subnet: 10.6.0.0/16\n  ips: [10.6.172.60-10.6.172.69]\n  gateway: 10.6.0.254\n",
    )
}

fn conf(sock: &str, pool: &str, ipam_extra: Value) -> Value {
    let mut ipam =
        json!({"type": "spiderpool", "ipam_unix_socket_path": sock, "default_ipv4_ippool": [pool]});
    for (k, v) in ipam_extra.as_object().into_iter().flatten() {
        ipam[k] = v.clone();
    }
    json!({"cniVersion": "1.0.0", "name": format!("net-{pool}"), "type": "macvlan",
           "master": "ens192", "mode": "bridge", "ipam": ipam})
}

#[test]
fn conflicting_addresses_are_skipped_and_recorded_and_a_dead_gateway_fails_the_add() {
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
    for a in ["10.6.171.60/16", "10.6.171.61/16"] {
        sh(&["ip", "-n", &foreign, "addr", "add", a, "dev", "eth0"]);
    }
    let foreign_mac = sh(&["ip", "-n", &foreign, "-o", "link", "show", "dev", "eth0"])
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let path = cni_path(dir.path());
    let rt = Runtime {
        node: &node,
        main: MACVLAN,
        cni_path: &path,
    };
    let detect = json!({"enableIPConflictDetection": true, "enableGatewayDetection": true});
    let guarded = conf(&agent.sock(), "guarded", detect.clone());
    // The first pod gets the one address nobody else uses, whatever the agent tried first.
    let first = ns.add("first");
    let add = plugin_in(&rt, "ADD", &first, "sandbox-first", "", &guarded);
    assert_eq!(add.status, 0, "ADD: {}\n{}", add.stdout, agent.log_text());
    assert_eq!(add.ip(), "10.6.171.62/16", "{}", add.stdout);
    assert!(ping(&first, "10.6.0.1"), "the pod cannot reach its gateway");
    // The second finds only the two the foreign host holds: both recorded in conflict, refused.
    let second = ns.add("second");
    let add2 = plugin_in(&rt, "ADD", &second, "sandbox-second", "", &guarded);
    assert_eq!(add2.code(), 101, "want exhausted: {}", add2.stdout);
    let rows = endpoints(&agent.sock());
    let conflicts: Vec<_> = rows
        .iter()
        .filter(|r| r.0.contains("#ip-conflict-"))
        .map(|r| (r.1.clone(), r.2.clone()))
        .collect();
    assert_eq!(
        conflicts,
        [
            (foreign_mac.clone(), "10.6.171.60".to_string()),
            (foreign_mac.clone(), "10.6.171.61".to_string())
        ],
        "conflict records (interface column: the MAC that answered): {rows:?}"
    );
    assert!(
        agent.log_text().contains("IP conflict"),
        "the agent logs the conflict"
    );
    // DEL of the refused pod (macvlan leaves its link behind) and of the first: the conflict
    // records stay, the first pod's address is free.
    for (pod_ns, cid) in [(&second, "sandbox-second"), (&first, "sandbox-first")] {
        let del = plugin_in(&rt, "DEL", pod_ns, cid, "", &guarded);
        assert_eq!(del.status, 0, "DEL {cid}: {}", del.stdout);
    }
    let counts = pool_counts(&agent.sock());
    assert!(
        counts.contains(&("guarded".to_string(), 2)),
        "the two conflicts stay recorded: {counts:?}"
    );
    // The records keep the addresses out for every network, with detection or without: a
    // fresh pod of a network without it gets .62 again, never .60 or .61.
    let plain = conf(&agent.sock(), "guarded", json!({}));
    let third = ns.add("third");
    let add3 = plugin_in(&rt, "ADD", &third, "sandbox-third", "", &plain);
    assert_eq!(add3.ip(), "10.6.171.62/16", "{}", add3.stdout);
    let del3 = plugin_in(&rt, "DEL", &third, "sandbox-third", "", &plain);
    assert_eq!(del3.status, 0);
    // A gateway nobody holds: ADD fails retryably, naming it and the NIC; nothing stays held.
    let dead = conf(
        &agent.sock(),
        "dead-gw",
        json!({"enableGatewayDetection": true}),
    );
    let fourth = ns.add("fourth");
    let add4 = plugin_in(&rt, "ADD", &fourth, "sandbox-fourth", "", &dead);
    assert_eq!(add4.code(), 11, "{}", add4.stdout);
    let msg = add4.json["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("10.6.0.254") && msg.contains("eth0"), "{msg}");
    assert!(
        pool_counts(&agent.sock()).contains(&("dead-gw".to_string(), 0)),
        "{:?}",
        pool_counts(&agent.sock())
    );
    let del4 = plugin_in(&rt, "DEL", &fourth, "sandbox-fourth", "", &dead);
    assert_eq!(del4.status, 0, "{}", del4.stdout);
}
