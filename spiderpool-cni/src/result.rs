//! CNI results in the version the runtime asked for.
//!
//! One ADD answers for one interface (`CNI_IFNAME`): its addresses with the pool subnet's prefix
//! and gateway, the pool's routes and the pod's `ipam.spidernet.io/routes` for that NIC, and a
//! default route per family through the gateway unless `cleangateway` (the gateway is still
//! reported). 0.3.x and 0.4.0 results carry `"version"` per address; 1.0.0 and later do not.

use serde_json::{json, Value};
use spiderpool_core::engine::{Allocation, NicAllocation};

use crate::conf::version_at_least;

/// The result JSON for `ifname` of `alloc` in `version`; `None` when the allocation has no such
/// NIC.
pub fn add_result(alloc: &Allocation, ifname: &str, version: &str) -> Option<Value> {
    let nic = alloc.nic(ifname)?;
    Some(nic_result(nic, version))
}

fn nic_result(nic: &NicAllocation, version: &str) -> Value {
    let legacy = !version_at_least(version, "1.0.0");
    let mut ips = Vec::new();
    let mut routes = Vec::new();
    for (a, v, default) in [(&nic.ipv4, "4", "0.0.0.0/0"), (&nic.ipv6, "6", "::/0")] {
        let Some(a) = a else { continue };
        let mut ip = json!({"address": a.address.to_string()});
        if let Some(gw) = a.gateway {
            ip["gateway"] = Value::String(gw.to_string());
            if !nic.clean_gateway {
                routes.push(json!({"dst": default, "gw": gw.to_string()}));
            }
        }
        if legacy {
            ip["version"] = Value::String(v.to_string());
        }
        ips.push(ip);
    }
    for r in &nic.routes {
        routes.push(json!({"dst": r.dst.to_string(), "gw": r.gw.to_string()}));
    }
    json!({
        "cniVersion": version,
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use spiderpool_core::engine::{AddressInfo, RouteInfo};

    fn alloc(clean: bool) -> Allocation {
        Allocation {
            detect: Default::default(),
            nics: vec![NicAllocation {
                ifname: "eth0".into(),
                ipv4: Some(AddressInfo {
                    address: "10.6.168.60/16".parse().expect("net"),
                    pool: "p".into(),
                    gateway: Some("10.6.0.1".parse().expect("ip")),
                    vlan: None,
                }),
                ipv6: None,
                clean_gateway: clean,
                routes: vec![RouteInfo {
                    dst: "172.16.0.0/16".parse().expect("net"),
                    gw: "10.6.0.254".parse().expect("ip"),
                }],
            }],
        }
    }

    #[test]
    fn results_per_version() {
        let v1 = add_result(&alloc(false), "eth0", "1.0.0").expect("eth0");
        assert_eq!(
            v1,
            json!({"cniVersion":"1.0.0","ips":[{"address":"10.6.168.60/16","gateway":"10.6.0.1"}],
                   "routes":[{"dst":"0.0.0.0/0","gw":"10.6.0.1"},{"dst":"172.16.0.0/16","gw":"10.6.0.254"}],"dns":{}})
        );
        let v031 = add_result(&alloc(false), "eth0", "0.3.1").expect("eth0");
        assert_eq!(v031["ips"][0]["version"], "4");
        assert_eq!(v031["cniVersion"], "0.3.1");
        let clean = add_result(&alloc(true), "eth0", "1.1.0").expect("eth0");
        assert_eq!(
            clean["ips"][0]["gateway"], "10.6.0.1",
            "gateway still reported"
        );
        assert_eq!(
            clean["routes"].as_array().map(Vec::len),
            Some(1),
            "no default route"
        );
        assert!(add_result(&alloc(false), "net1", "1.0.0").is_none());
    }
}
