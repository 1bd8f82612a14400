//! The coordinator's configuration: Spiderpool's keys (and the old `veth` plugin's
//! `service_cidr`), merged over the cluster's `SpiderCoordinator` defaults, and the main plugin's
//! `prevResult`. Pure: no I/O, unit tested.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use crate::error::{CniError, INVALID_CONFIG};

/// `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every NIC of the pod is an underlay NIC: a veth pair to the node carries Service and
    /// node traffic (`underlay`, and `auto`, which is underlay for a chain whose main plugin is
    /// an underlay one, the only chains this coordinator is put in).
    Underlay,
    /// Do nothing; pass the result through (`disabled`, Spiderpool's `disable`).
    Disabled,
}

/// The coordinator's settings after merging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `mode`.
    pub mode: Mode,
    /// `service_cidr`, `serviceCIDR` and `hijackCIDR` (`hijackCustomSubnet`): routed through the
    /// node from the pod.
    pub hijack: Vec<IpNet>,
    /// `podDefaultRouteNIC` (`podDefaultRouteNic`): the NIC that keeps the default route; empty:
    /// the first NIC the coordinator saw (the one that owns the veth pair).
    pub default_route_nic: String,
    /// `tunePodRoutes` (default true): policy routes per NIC, so a NIC answers for its own
    /// addresses.
    pub tune_pod_routes: bool,
    /// `hostRuleTable` (default 500): the node's table holding the routes to its pods.
    pub host_rule_table: u32,
    /// `podRPFilter` (default 0): `rp_filter` in the pod; -1 leaves it alone.
    pub pod_rp_filter: i32,
    /// `podMACPrefix`: two octets the pod NIC's MAC starts with (then the low 4 bytes of its
    /// address); none: the MAC stays.
    pub mac_prefix: Option<[u8; 2]>,
    /// `txQueueLen` (0: unchanged).
    pub tx_queue_len: u32,
    /// `vethLinkAddress`: an address for the pod's `veth0`.
    pub veth_link_address: Option<IpAddr>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::Underlay,
            hijack: Vec::new(),
            default_route_nic: String::new(),
            tune_pod_routes: true,
            host_rule_table: 500,
            pod_rp_filter: 0,
            mac_prefix: None,
            tx_queue_len: 0,
            veth_link_address: None,
        }
    }
}

fn bad(key: &str, why: impl std::fmt::Display) -> CniError {
    CniError::new(INVALID_CONFIG, format!("coordinator: '{key}' {why}"))
}

/// The first of `keys` present in `obj`.
fn pick<'a>(obj: &'a Value, keys: &[&'static str]) -> Option<(&'static str, &'a Value)> {
    keys.iter()
        .find_map(|k| obj.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
}

fn cidrs(key: &str, v: &Value) -> Result<Vec<IpNet>, CniError> {
    let list = v
        .as_array()
        .ok_or_else(|| bad(key, "must be a list of CIDRs"))?;
    list.iter()
        .map(|c| {
            let s = c
                .as_str()
                .ok_or_else(|| bad(key, "must be a list of CIDRs"))?;
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| bad(key, format_args!("has '{s}', which is not a CIDR")))
        })
        .collect()
}

fn int(key: &str, v: &Value, min: i64, max: i64) -> Result<i64, CniError> {
    v.as_i64()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| bad(key, format_args!("must be an integer from {min} to {max}")))
}

/// Parses `podMACPrefix` (`"0a:1b"`): two hex octets, unicast (the first octet's lowest bit 0).
pub fn mac_prefix(s: &str) -> Result<Option<[u8; 2]>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    let parts: Vec<&str> = s.split(':').collect();
    let octets: Option<Vec<u8>> = parts
        .iter()
        .map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect();
    match octets.as_deref() {
        Some([a, b]) if a & 1 == 0 => Ok(Some([*a, *b])),
        Some([_, _]) => Err(format!(
            "'{s}' is a multicast prefix (the first octet's lowest bit is set)"
        )),
        _ => Err(format!("'{s}' is not two hex octets such as '0a:1b'")),
    }
}

/// Applies the keys of `obj` (a network configuration, or a `SpiderCoordinator` spec) over
/// `base`. Unknown keys are ignored; a known key with a wrong value is error 7 naming it.
pub fn merge(base: Settings, obj: &Value) -> Result<Settings, CniError> {
    let mut s = base;
    if let Some((k, v)) = pick(obj, &["mode"]) {
        s.mode = match v.as_str() {
            Some("underlay" | "auto" | "") => Mode::Underlay,
            Some("disabled" | "disable") => Mode::Disabled,
            Some("overlay") => {
                return Err(bad(
                    k,
                    "is 'overlay', which this coordinator does not serve: chain it after an underlay main plugin (macvlan, ipvlan, SR-IOV) with mode 'underlay'",
                ))
            }
            _ => return Err(bad(k, "must be one of underlay, auto, disabled")),
        };
    }
    let mut hijack = Vec::new();
    let mut any = false;
    for keys in [
        &["service_cidr", "serviceCIDR"][..],
        &["hijackCIDR", "hijackCustomSubnet"][..],
    ] {
        if let Some((k, v)) = pick(obj, keys) {
            any = true;
            hijack.extend(cidrs(k, v)?);
        }
    }
    if any {
        hijack.sort();
        hijack.dedup();
        s.hijack = hijack;
    }
    if let Some((k, v)) = pick(obj, &["podDefaultRouteNIC", "podDefaultRouteNic"]) {
        s.default_route_nic = v
            .as_str()
            .ok_or_else(|| bad(k, "must be an interface name"))?
            .to_string();
    }
    if let Some((k, v)) = pick(obj, &["tunePodRoutes"]) {
        s.tune_pod_routes = v.as_bool().ok_or_else(|| bad(k, "must be true or false"))?;
    }
    if let Some((k, v)) = pick(obj, &["hostRuleTable"]) {
        let t = int(k, v, 1, i64::from(u32::MAX))?;
        if (253..=255).contains(&t) {
            return Err(bad(
                k,
                format_args!("is {t}: 253-255 are the kernel's default, main and local tables"),
            ));
        }
        s.host_rule_table = u32::try_from(t).unwrap_or(500);
    }
    if let Some((k, v)) = pick(obj, &["podRPFilter"]) {
        s.pod_rp_filter = i32::try_from(int(k, v, -1, 2)?).unwrap_or(0);
    }
    if let Some((k, v)) = pick(obj, &["podMACPrefix"]) {
        let text = v.as_str().ok_or_else(|| bad(k, "must be a string"))?;
        s.mac_prefix = mac_prefix(text).map_err(|e| bad(k, e))?;
    }
    if let Some((k, v)) = pick(obj, &["txQueueLen"]) {
        s.tx_queue_len = u32::try_from(int(k, v, 0, i64::from(u32::MAX))?).unwrap_or(0);
    }
    if let Some((k, v)) = pick(obj, &["vethLinkAddress"]) {
        let text = v.as_str().ok_or_else(|| bad(k, "must be an IP address"))?;
        s.veth_link_address = if text.is_empty() {
            None
        } else {
            Some(
                text.parse()
                    .map_err(|_| bad(k, format_args!("'{text}' is not an IP address")))?,
            )
        };
    }
    Ok(s)
}

/// The main plugin's result, as far as the coordinator needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prev {
    /// The pod's addresses on `CNI_IFNAME`, with their prefix.
    pub addresses: Vec<IpNet>,
    /// The gateways the result names for them.
    pub gateways: Vec<IpAddr>,
}

/// The addresses `prevResult` gives `ifname` (those whose `interface` index names a sandbox
/// interface called `ifname`, or that name no interface).
pub fn prev_result(prev: &Value, ifname: &str) -> Result<Prev, CniError> {
    let ifaces = prev.get("interfaces").and_then(Value::as_array);
    let index_of_ifname: Option<u64> = ifaces.and_then(|list| {
        list.iter().enumerate().find_map(|(i, it)| {
            let named = it.get("name").and_then(Value::as_str) == Some(ifname);
            let in_pod = it
                .get("sandbox")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty());
            (named && in_pod).then_some(i as u64)
        })
    });
    let mut out = Prev::default();
    for ip in prev
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let mine = match ip.get("interface").and_then(Value::as_u64) {
            Some(i) => Some(i) == index_of_ifname,
            None => true,
        };
        if !mine {
            continue;
        }
        let text = ip.get("address").and_then(Value::as_str).unwrap_or("");
        let addr: IpNet = text.parse().map_err(|_| {
            CniError::new(
                INVALID_CONFIG,
                format!("coordinator: prevResult has address '{text}', which is not a CIDR"),
            )
        })?;
        out.addresses.push(addr);
        if let Some(gw) = ip
            .get("gateway")
            .and_then(Value::as_str)
            .and_then(|g| g.parse().ok())
        {
            out.gateways.push(gw);
        }
    }
    Ok(out)
}

/// The pod NIC's MAC for `podMACPrefix`: the prefix, then the low four bytes of the address
/// (an IPv4 address whole; the last four bytes of an IPv6 one).
pub fn pod_mac(prefix: [u8; 2], addr: IpAddr) -> [u8; 6] {
    let low: [u8; 4] = match addr {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let o = a.octets();
            [o[12], o[13], o[14], o[15]]
        }
    };
    [prefix[0], prefix[1], low[0], low[1], low[2], low[3]]
}

/// The node-side name of a pod's veth pair: `veth` and 11 hex digits of a hash of the
/// container ID (15 characters, the kernel's limit), the same for every call of one container.
pub fn host_veth_name(container_id: &str) -> String {
    let h = spiderpool_core::fnv1a(container_id.bytes());
    format!("veth{:011x}", h & 0x0fff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_merge_over_defaults_and_wrong_values_name_the_key() {
        let s = merge(
            Settings::default(),
            &json!({"type": "veth", "service_cidr": ["10.233.0.0/18"], "unknown": 1}),
        )
        .expect("seed's veth entry");
        assert_eq!(s.mode, Mode::Underlay);
        assert_eq!(
            s.hijack,
            vec!["10.233.0.0/18".parse::<IpNet>().expect("net")]
        );
        assert_eq!(s.host_rule_table, 500);
        // The cluster's defaults, then the network's own keys win.
        let cluster = merge(
            Settings::default(),
            &json!({"hostRuleTable": 600, "podMACPrefix": "0a:1b", "hijackCIDR": ["169.254.20.10/32"]}),
        )
        .expect("cluster");
        let s = merge(cluster, &json!({"hostRuleTable": 700, "txQueueLen": 2000})).expect("net");
        assert_eq!(s.host_rule_table, 700);
        assert_eq!(s.mac_prefix, Some([0x0a, 0x1b]));
        assert_eq!(s.tx_queue_len, 2000);
        assert_eq!(s.hijack.len(), 1);
        for (conf, key) in [
            (json!({"mode": "fast"}), "mode"),
            (json!({"mode": "overlay"}), "mode"),
            (json!({"hostRuleTable": 254}), "hostRuleTable"),
            (json!({"hostRuleTable": "500"}), "hostRuleTable"),
            (json!({"podRPFilter": 3}), "podRPFilter"),
            (json!({"podMACPrefix": "01:00"}), "podMACPrefix"),
            (json!({"podMACPrefix": "0a1b"}), "podMACPrefix"),
            (json!({"service_cidr": ["10.233.0.0/99"]}), "service_cidr"),
            (json!({"hijackCIDR": "10.0.0.0/8"}), "hijackCIDR"),
            (json!({"tunePodRoutes": "yes"}), "tunePodRoutes"),
            (json!({"vethLinkAddress": "x"}), "vethLinkAddress"),
        ] {
            let e = merge(Settings::default(), &conf).expect_err("wrong value");
            assert_eq!(e.code, INVALID_CONFIG);
            assert!(e.msg.contains(&format!("'{key}'")), "{key}: {}", e.msg);
        }
        assert_eq!(
            merge(Settings::default(), &json!({"mode": "disable"}))
                .expect("ok")
                .mode,
            Mode::Disabled
        );
    }

    #[test]
    fn prev_result_gives_the_addresses_of_the_interface() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/run/netns/p"},
                {"name": "net1", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/run/netns/p"}
            ],
            "ips": [
                {"address": "10.6.168.61/16", "gateway": "10.6.0.1", "interface": 1},
                {"address": "10.7.168.61/16", "interface": 2},
                {"address": "fd00:6::61/64", "interface": 1}
            ]
        });
        let p = prev_result(&prev, "eth0").expect("ok");
        assert_eq!(p.addresses.len(), 2);
        assert_eq!(p.addresses[0].to_string(), "10.6.168.61/16");
        assert_eq!(p.gateways, vec!["10.6.0.1".parse::<IpAddr>().expect("ip")]);
        let e = prev_result(&json!({"ips": [{"address": "nope"}]}), "eth0").expect_err("bad");
        assert_eq!(e.code, INVALID_CONFIG);
    }

    #[test]
    fn mac_and_veth_names() {
        assert_eq!(
            pod_mac([0x0a, 0x1b], "10.6.168.61".parse().expect("ip")),
            [0x0a, 0x1b, 10, 6, 168, 61]
        );
        let n = host_veth_name("4f1c0ffee");
        assert_eq!(n.len(), 15);
        assert_eq!(n, host_veth_name("4f1c0ffee"));
        assert_ne!(n, host_veth_name("4f1c0ffef"));
    }
}
