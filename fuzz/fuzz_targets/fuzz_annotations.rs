//! Annotation parsing and pool selection must never panic on any annotation value.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use spiderpool_core::select::{self, SelectionInput};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = select::parse_ippool_annotation(s);
    let _ = select::parse_ippools_annotation(s);
    let _ = select::parse_routes_annotation(s);
    let _ = select::parse_pool_list(s);
    let _ = select::wildcard_match(s, "test-ippool-6");
    for key in [
        select::ANNO_IPPOOL,
        select::ANNO_IPPOOLS,
        select::ANNO_SUBNET,
        select::ANNO_SUBNETS,
        select::ANNO_ROUTES,
        select::ANNO_MULTUS_NETWORKS,
    ] {
        let annos: BTreeMap<String, String> = [(key.to_string(), s.to_string())].into();
        let input = SelectionInput {
            pod_namespace: "ns",
            pod_name: "pod",
            pod_annotations: Some(&annos),
            node_name: "node",
            ..Default::default()
        };
        let _ = select::resolve(&Default::default(), &input, "eth0");
        let _ = select::resolve(&Default::default(), &input, "net1");
    }
});
