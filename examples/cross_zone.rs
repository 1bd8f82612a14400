//! The seed scenario, end to end in one process: "IP allocation across network zones".
//!
//! Two SpiderIPPools with `nodeAffinity` (10.6.0.0/16 for nodes labelled `node-subnet=subnet-6`,
//! 10.7.0.0/16 for `subnet-7`), two nodes, a DaemonSet whose pods name both pools in
//! `ipam.spidernet.io/ippool`. Each node's agent allocates for its own pod through the engine; the
//! pods land in their node's zone. Nodes and pods are simulated in this process (no cluster, no
//! container runtime): the output shows only what the program knows (pod, node, address, pool).
//! The records live in the default embedded durable store (one
//! redb file, in a temporary directory unless `SPIDERPOOL_STORE` names a file); the example closes
//! and reopens it, as an agent restart would, before releasing everything.
//!
//! Run: `cargo run --example cross_zone`

use std::collections::BTreeMap;
use std::process::ExitCode;

use futures::executor::block_on;
use spiderpool_agent::ctl::table;
use spiderpool_core::engine::{Attachment, Engine};
use spiderpool_core::manifest::pool_set;
use spiderpool_core::select::{SelectionInput, ANNO_IPPOOL};
use spiderpool_core::store::{Filter, LeaseStore};
use spiderpool_core::Families;
use spiderpool_store::embedded::EmbeddedStore;

const POOLS: &str = include_str!("../testdata/seed-pools.yaml");

struct Node {
    name: &'static str,
    labels: BTreeMap<String, String>,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cross_zone failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    println!("The seed scenario, simulated in one process: two nodes in two network zones, one");
    println!("pod of the test-app DaemonSet on each, each node's engine allocating through one");
    println!(
        "shared embedded lease store. No cluster, container runtime or CNI plugin is involved."
    );
    let pools = pool_set(POOLS).map_err(|problems| problems.join("\n"))?;
    println!(
        "\nPools (the seed's SpiderIPPools, testdata/seed-pools.yaml): {}",
        pools.pools.keys().cloned().collect::<Vec<_>>().join(", ")
    );

    let nodes = [
        Node {
            name: "controller-node-1",
            labels: [("node-subnet".to_string(), "subnet-6".to_string())].into(),
        },
        Node {
            name: "worker-node-1",
            labels: [("node-subnet".to_string(), "subnet-7".to_string())].into(),
        },
    ];
    println!("\nSimulated nodes:");
    let mut rows = vec![["NODE".to_string(), "LABELS".into()]];
    for n in &nodes {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rows.push([n.name.to_string(), labels.join(",")]);
    }
    print!("{}", table::render(&rows));

    // One lease store shared by every node's agent; one engine (agent) per node.
    let tmp = std::env::temp_dir().join(format!("spiderpool-cross-zone-{}", std::process::id()));
    let path = std::env::var_os("SPIDERPOOL_STORE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.join("leases.redb"));
    println!("\n(lease store: embedded, {})", path.display());
    let store = EmbeddedStore::open(&path).map_err(|e| e.to_string())?;
    let engines: Vec<Engine<EmbeddedStore>> = nodes
        .iter()
        .map(|n| Engine::new(store.clone(), n.name))
        .collect();

    // The DaemonSet's pod template annotation, exactly as in the seed's text.
    let annotations: BTreeMap<String, String> = [(
        ANNO_IPPOOL.to_string(),
        r#"{"ipv4": ["test-ippool-6", "test-ippool-7"]}"#.to_string(),
    )]
    .into();
    let pod_labels: BTreeMap<String, String> = [("app".to_string(), "test-app".to_string())].into();
    let pod_names = ["test-app-j9ftl", "test-app-nkq5h"];

    let mut pod_rows = vec![["POD".to_string(), "NODE".into(), "IP".into(), "POOL".into()]];
    let mut attachments = Vec::new();
    for ((node, engine), pod) in nodes.iter().zip(&engines).zip(pod_names) {
        let input = SelectionInput {
            pod_namespace: "default",
            pod_name: pod,
            pod_labels: Some(&pod_labels),
            pod_annotations: Some(&annotations),
            node_name: node.name,
            node_labels: Some(&node.labels),
            default_families: Families::default(),
            ..Default::default()
        };
        let att = Attachment {
            container_id: format!("sandbox-{pod}"),
            ifname: "eth0".into(),
        };
        let alloc = block_on(engine.allocate(&pools, &input, &att, &format!("uid-{pod}"), 0))
            .map_err(|e| e.to_string())?;
        let ip = alloc
            .nic("eth0")
            .and_then(|n| n.ipv4.as_ref())
            .ok_or("no IPv4 address allocated")?;
        pod_rows.push([
            format!("default/{pod}"),
            node.name.to_string(),
            ip.address.addr().to_string(),
            ip.pool.clone(),
        ]);
        // The pod's IP must come from its own node's zone.
        let zone = &node.labels["node-subnet"];
        let want = format!("test-ippool-{}", zone.trim_start_matches("subnet-"));
        if ip.pool != want {
            return Err(format!(
                "{pod} on {} got {} from {}",
                node.name, ip.address, ip.pool
            ));
        }
        attachments.push(att);
    }
    println!("\nAllocations (simulated pods of DaemonSet test-app):");
    print!("{}", table::render(&pod_rows));

    let print_pools = |store: &EmbeddedStore, title: &str| -> Result<(), String> {
        println!(
            "\nPools as `kubectl get spiderippool` shows them, counted from the store{title}:"
        );
        let rows = block_on(spiderpool_core::usage::pool_rows(&pools, store))
            .map_err(|e| e.to_string())?;
        print!("{}", table::ippools(&rows));
        Ok(())
    };
    print_pools(&store, "")?;

    // An agent restart: close the store, open the file again; every allocation is still there.
    drop(engines);
    drop(store);
    let store = EmbeddedStore::open(&path).map_err(|e| e.to_string())?;
    let engines: Vec<Engine<EmbeddedStore>> = nodes
        .iter()
        .map(|n| Engine::new(store.clone(), n.name))
        .collect();
    let kept = block_on(store.list(Filter::All)).map_err(|e| e.to_string())?;
    println!(
        "\n(agent restarted: {} allocations read back from {})",
        kept.leases.len(),
        path.display()
    );
    if kept.leases.len() != attachments.len() {
        return Err("allocations lost across the restart".into());
    }

    println!("\nThe DaemonSet is deleted: a release (CNI DEL) for every pod.");
    for (engine, att) in engines.iter().zip(&attachments) {
        let freed = block_on(engine.release(&att.container_id, Some(&att.ifname)))
            .map_err(|e| e.to_string())?;
        for l in freed {
            println!(
                "released {} ({}/{} on {}) back to {}",
                l.ip, l.owner.pod_namespace, l.owner.pod_name, l.owner.node, l.pool
            );
        }
    }
    print_pools(&store, " (after release)")?;
    let left = block_on(store.list(Filter::All)).map_err(|e| e.to_string())?;
    if !left.leases.is_empty() {
        return Err(format!("{} addresses leaked", left.leases.len()));
    }
    drop(engines);
    drop(store);
    if std::env::var_os("SPIDERPOOL_STORE").is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(())
}
