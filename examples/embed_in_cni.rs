//! Another CNI embedding `spiderpool-core`: no agent, no daemon, the pools inline.
//!
//! A plugin that wants Spiderpool's pool semantics (node affinity, backup pools, validation with
//! Spiderpool's messages, a next-fit bitmap allocator) links the core crate, implements
//! [`LeaseStore`] over whatever it already persists to, and calls the engine from its ADD/DEL.
//! Here the store is the in-memory one and the "CNI" handles ADD and DEL of one container.
//!
//! Run: `cargo run --example embed_in_cni`

use std::collections::BTreeMap;
use std::process::ExitCode;

use futures::executor::block_on;
use spiderpool_core::engine::{Attachment, Engine};
use spiderpool_core::manifest::pool_set;
use spiderpool_core::select::{CniDefaults, SelectionInput};
use spiderpool_core::store::{LeaseStore, MemoryStore};

/// The network config the runtime would hand the plugin on stdin.
const NETCONF: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "rack-net",
  "type": "my-cni",
  "ipam": { "type": "spiderpool", "default_ipv4_ippool": ["rack-a", "rack-spill"] }
}"#;

/// The plugin ships its pools inline; they are validated exactly as Spiderpool's webhook would.
const POOLS: &str = r#"
kind: SpiderIPPool
metadata: {name: rack-a}
spec:
  subnet: 192.168.10.0/24
  ips: [192.168.10.10-192.168.10.11]
  gateway: 192.168.10.1
  nodeName: [host-a]
---
kind: SpiderIPPool
metadata: {name: rack-spill}
spec:
  subnet: 192.168.20.0/24
  ips: [192.168.20.10-192.168.20.200]
  gateway: 192.168.20.1
"#;

/// What a plugin prints for ADD (CNI 1.0.0 result, IPAM part).
fn cni_result(alloc: &spiderpool_core::Allocation, ifname: &str) -> serde_json::Value {
    let ips: Vec<serde_json::Value> = alloc
        .nic(ifname)
        .into_iter()
        .flat_map(|n| [n.ipv4.as_ref(), n.ipv6.as_ref()])
        .flatten()
        .map(|a| serde_json::json!({"address": a.address.to_string(), "gateway": a.gateway}))
        .collect();
    serde_json::json!({"cniVersion": "1.0.0", "ips": ips})
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let conf: serde_json::Value = serde_json::from_str(NETCONF)?;
    let defaults = CniDefaults::from_netconf(&conf)?;
    let pools = pool_set(POOLS).map_err(|problems| problems.join("\n"))?;

    let engine = Engine::new(MemoryStore::new(), "host-a");
    let empty = BTreeMap::new();
    for i in 0..3 {
        let pod = format!("job-{i}");
        let input = SelectionInput {
            pod_namespace: "batch",
            pod_name: &pod,
            pod_annotations: Some(&empty),
            node_name: "host-a",
            cni: Some(&defaults),
            ..Default::default()
        };
        let att = Attachment {
            container_id: format!("ctr-{i}"),
            ifname: "eth0".into(),
        };
        let alloc = block_on(engine.allocate(&pools, &input, &att, "uid", 0))?;
        // rack-a holds two addresses; the third pod spills over to the backup pool.
        println!("ADD {pod}: {}", cni_result(&alloc, "eth0"));
    }
    for i in 0..3 {
        let freed = block_on(engine.release(&format!("ctr-{i}"), Some("eth0")))?;
        println!(
            "DEL ctr-{i}: released {:?}",
            freed.iter().map(|l| l.ip).collect::<Vec<_>>()
        );
    }
    let left = block_on(engine.store().list(spiderpool_core::store::Filter::All))?;
    println!("records left: {}", left.leases.len());
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embed_in_cni failed: {e}");
            ExitCode::FAILURE
        }
    }
}
