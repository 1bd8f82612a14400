//! `coordinator`: the CNI meta-plugin chained after an underlay main plugin (macvlan, ipvlan,
//! SR-IOV), Spiderpool's `coordinator` and the seed's `veth` (the same binary, installed or
//! linked under either name).
//!
//! Underlay mode, for the NIC `CNI_IFNAME` whose addresses the main plugin's `prevResult` gives:
//! - a veth pair between the pod (`veth0`) and the node (`veth` + 11 hex digits of a hash of the
//!   container ID), made by the pod's first NIC and shared by the others;
//! - in the pod: a route to each of the node's addresses and to every Service / hijacked CIDR
//!   through `veth0` (IPv4 through the node's address, IPv6 through the node side's `fe80::1`);
//!   the default route stays on the underlay NIC (`podDefaultRouteNIC`);
//! - on the node: a route to each of the pod's addresses through the host side of the pair in
//!   table `hostRuleTable` (500) and a rule `to ADDRESS lookup 500`;
//! - `tunePodRoutes`: the NIC's routes copied into a table of its own (100 + its index in the
//!   pod) and a rule `from ADDRESS lookup` it, so each NIC answers for its own addresses; a NIC
//!   other than the default-route one loses its default route in `main`.
//!
//! DEL removes the node's part (the pair, routes and rules; the pod's part goes with its
//! namespace) and succeeds when it is gone already. CHECK verifies it. GC and STATUS succeed
//! (nothing to collect: the node's part is per container, removed by DEL).

mod config;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;

use ipnet::IpNet;
use serde_json::{json, Value};

use crate::answer::{peek_version, Answer};
use crate::conf::{self, Command, Env};
use crate::error::{CniError, DECODE_FAILURE, INCOMPATIBLE_VERSION, INVALID_CONFIG};
use crate::SUPPORTED_VERSIONS;

use crate::netlink::{self, link_alias, Nl, NlError};
pub use config::{host_veth_name, merge, pod_mac, prev_result, Mode, Prev, Settings};

/// The pod side of the pair.
pub const POD_VETH: &str = "veth0";
/// CNI error code: CHECK found the coordinator's veth, routes or rules missing.
pub const CHECK_FAILED: u32 = 110;
/// CNI error code: a netlink step failed (the message says which).
pub const NETLINK_FAILED: u32 = 111;
/// The node side's IPv6 link-local address on every pair (the pod's IPv6 next hop).
const HOST_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The pod side's (the node's IPv6 next hop to the pod).
const POD_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
/// Linux's main table.
const MAIN: u32 = 254;
/// The alias on the node side of a pair: `spiderpool-coordinator <container> <owner NIC>`.
const ALIAS: &str = "spiderpool-coordinator";

fn nl(e: NlError) -> CniError {
    CniError::new(NETLINK_FAILED, format!("coordinator: {e}"))
}

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// One invocation of the coordinator: environment and stdin in, stdout and status out.
/// `cluster` is the `SpiderCoordinator` default spec (JSON), when the agent serves one.
pub fn run(vars: &BTreeMap<String, String>, stdin: &[u8], cluster: Option<&Value>) -> Answer {
    let version = peek_version(stdin);
    let env = match conf::parse_env(vars) {
        Ok(e) => e,
        Err(e) => return Answer::err(e.version(&version)),
    };
    if env.command == Command::Version {
        return crate::answer::version_answer(&version);
    }
    match invoke(&env, stdin, cluster) {
        Ok(out) => Answer::ok(out),
        Err(e) => Answer::err(e.version(&version)),
    }
}

fn invoke(env: &Env, stdin: &[u8], cluster: Option<&Value>) -> Result<String, CniError> {
    let conf: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            DECODE_FAILURE,
            format!("the network configuration is not JSON: {e}"),
        )
    })?;
    let version = conf.get("cniVersion").and_then(Value::as_str).unwrap_or("");
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!(
                "cniVersion '{version}' is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let min = match env.command {
        Command::Check => "0.4.0",
        Command::Gc | Command::Status => "1.1.0",
        _ => "0.0.0",
    };
    if !conf::version_at_least(version, min) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!(
                "{} needs cniVersion {min} or later; the configuration says {version}",
                env.command.as_str()
            ),
        ));
    }
    let mut s = Settings::default();
    if let Some(c) = cluster {
        s = merge(s, c)?;
    }
    let s = merge(s, &conf)?;
    let prev = conf.get("prevResult").filter(|v| !v.is_null());
    if s.mode == Mode::Disabled || matches!(env.command, Command::Gc | Command::Status) {
        return Ok(match (env.command, prev) {
            (Command::Add, Some(p)) => pass_through(p, version, None, ""),
            (Command::Add, None) => json!({"cniVersion": version}).to_string(),
            _ => String::new(),
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(NETLINK_FAILED, format!("coordinator: runtime: {e}")))?;
    rt.block_on(async {
        match env.command {
            Command::Add => {
                let prev = prev.ok_or_else(|| {
                    CniError::new(
                        INVALID_CONFIG,
                        "coordinator: no prevResult: chain it after the main plugin (macvlan with ipam spiderpool), not alone",
                    )
                })?;
                let mac = add(env, &s, prev).await?;
                Ok(pass_through(prev, version, mac, &ifname(env)))
            }
            Command::Del => del(env, &s, prev).await.map(|()| String::new()),
            Command::Check => {
                let prev = prev.ok_or_else(|| {
                    CniError::new(INVALID_CONFIG, "coordinator: CHECK without prevResult")
                })?;
                check(env, &s, prev).await.map(|()| String::new())
            }
            _ => Ok(String::new()),
        }
    })
}

fn ifname(env: &Env) -> String {
    env.attachment
        .as_ref()
        .map(|a| a.ifname.clone())
        .unwrap_or_default()
}

fn container(env: &Env) -> String {
    env.attachment
        .as_ref()
        .map(|a| a.container_id.clone())
        .unwrap_or_default()
}

/// `prevResult` as this plugin's result, in the configuration's version, with the new MAC of
/// `ifname` when `podMACPrefix` changed it.
fn pass_through(prev: &Value, version: &str, mac: Option<[u8; 6]>, ifname: &str) -> String {
    let mut out = prev.clone();
    out["cniVersion"] = Value::String(version.to_string());
    if let (Some(m), Some(list)) = (mac, out.get_mut("interfaces").and_then(Value::as_array_mut)) {
        let text = m
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        for it in list.iter_mut() {
            let in_pod = it
                .get("sandbox")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty());
            if in_pod && it.get("name").and_then(Value::as_str) == Some(ifname) {
                it["mac"] = Value::String(text.clone());
            }
        }
    }
    out.to_string()
}

/// The node's global addresses, the one on the interface of the default route of its family
/// first (the pod's next hop for Services).
async fn node_addresses(host: &Nl) -> Result<Vec<IpAddr>, CniError> {
    let addrs = host.addresses().await.map_err(nl)?;
    let mut defaults = Vec::new();
    for v6 in [false, true] {
        for r in host.routes(v6).await.map_err(nl)? {
            if r.table == MAIN && r.dst.prefix_len() == 0 {
                defaults.extend(r.oif);
            }
        }
    }
    let mut out: Vec<(bool, IpAddr)> = addrs
        .into_iter()
        .filter(|(_, a, global)| *global && !a.addr().is_loopback())
        .map(|(idx, a, _)| (!defaults.contains(&idx), a.addr()))
        .collect();
    out.sort();
    out.dedup();
    Ok(out.into_iter().map(|(_, a)| a).collect())
}

/// The NIC that made the pod's pair, from the alias on its node side
/// (`spiderpool-coordinator <container> <NIC>`).
fn alias_owner(h: &rtnetlink::packet_route::link::LinkMessage) -> Option<&str> {
    link_alias(h).and_then(|a| a.split(' ').nth(2))
}

/// The pair: made by the pod's first NIC, reused by the others. Answers the node side's and the
/// pod side's indexes and the NIC that made it (this one when it was just made).
async fn ensure_pair(
    host: &Nl,
    pod: &Nl,
    env: &Env,
    s: &Settings,
    want_v6: bool,
) -> Result<(u32, u32, String), CniError> {
    let hv = host_veth_name(&container(env));
    let existing = host.link(&hv).await.map_err(nl)?;
    if let Some(h) = &existing {
        if let Some(p) = pod.link(POD_VETH).await.map_err(nl)? {
            let owner = alias_owner(h).map_or_else(|| ifname(env), str::to_string);
            return Ok((h.header.index, p.header.index, owner));
        }
        // Half of an earlier, interrupted ADD: start again.
        host.del_link(h.header.index).await.map_err(nl)?;
    }
    let tmp = format!("vp{}", &hv[4..]);
    let alias = format!("{ALIAS} {} {}", container(env), ifname(env));
    host.add_veth(&hv, &tmp, &alias).await.map_err(nl)?;
    let peer = host.index(&tmp).await.map_err(nl)?;
    host.move_link(peer, Path::new(&env.netns), POD_VETH)
        .await
        .map_err(nl)?;
    let hidx = host.index(&hv).await.map_err(nl)?;
    let pidx = pod.index(POD_VETH).await.map_err(nl)?;
    host.set_link(hidx, None, 0).await.map_err(nl)?;
    pod.set_link(pidx, None, 0).await.map_err(nl)?;
    if want_v6 {
        host.add_address(hidx, IpNet::new(HOST_LL.into(), 64).unwrap_or_default())
            .await
            .map_err(nl)?;
        pod.add_address(pidx, IpNet::new(POD_LL.into(), 64).unwrap_or_default())
            .await
            .map_err(nl)?;
    }
    if let Some(a) = s.veth_link_address {
        pod.add_address(pidx, host_prefix(a)).await.map_err(nl)?;
    }
    Ok((hidx, pidx, ifname(env)))
}

/// ADD in underlay mode; the pod NIC's new MAC when `podMACPrefix` set one.
async fn add(env: &Env, s: &Settings, prev: &Value) -> Result<Option<[u8; 6]>, CniError> {
    let nic = ifname(env);
    let p = prev_result(prev, &nic)?;
    if p.addresses.is_empty() {
        return Err(CniError::new(
            INVALID_CONFIG,
            format!("coordinator: prevResult has no address for {nic}: the main plugin's IPAM gave none"),
        ));
    }
    let host = Nl::here().map_err(nl)?;
    let pod = Nl::enter(Path::new(&env.netns)).map_err(nl)?;
    let pod_if = pod.index(&nic).await.map_err(nl)?;
    let mac = s.mac_prefix.map(|pre| {
        let a = p
            .addresses
            .iter()
            .find(|a| a.addr().is_ipv4())
            .unwrap_or(&p.addresses[0]);
        pod_mac(pre, a.addr())
    });
    if mac.is_some() || s.tx_queue_len > 0 {
        pod.set_link(pod_if, mac, s.tx_queue_len)
            .await
            .map_err(nl)?;
    }
    let want_v6 = p.addresses.iter().any(|a| a.addr().is_ipv6());
    let (hidx, pidx, owner_nic) = ensure_pair(&host, &pod, env, s, want_v6).await?;
    if owner_nic == nic {
        pod_routes(&host, &pod, s, &p, pidx).await?;
    }
    // The node reaches the pod's addresses through the pair.
    for a in &p.addresses {
        let gw = a.addr().is_ipv6().then_some(IpAddr::V6(POD_LL));
        host.add_route(host_prefix(a.addr()), hidx, gw, None, s.host_rule_table)
            .await
            .map_err(nl)?;
        host.add_rule(true, host_prefix(a.addr()), s.host_rule_table)
            .await
            .map_err(nl)?;
    }
    if s.tune_pod_routes {
        let default_nic = if s.default_route_nic.is_empty() {
            &owner_nic
        } else {
            &s.default_route_nic
        };
        tune(&pod, &p, pod_if, pidx, &nic != default_nic).await?;
    }
    if s.pod_rp_filter >= 0 && p.addresses.iter().any(|a| a.addr().is_ipv4()) {
        let v = s.pod_rp_filter.to_string();
        for dev in ["all", nic.as_str(), POD_VETH] {
            netlink::sysctl_in(
                Path::new(&env.netns),
                &format!("net/ipv4/conf/{dev}/rp_filter"),
                &v,
            )
            .map_err(nl)?;
        }
    }
    Ok(mac)
}

/// In the pod: the node's addresses and the hijacked CIDRs through `veth0`.
async fn pod_routes(
    host: &Nl,
    pod: &Nl,
    s: &Settings,
    p: &Prev,
    pidx: u32,
) -> Result<(), CniError> {
    let node = node_addresses(host).await?;
    for v6 in [false, true] {
        let Some(src) = p
            .addresses
            .iter()
            .map(|a| a.addr())
            .find(|a| a.is_ipv6() == v6)
        else {
            continue;
        };
        let fam: Vec<IpAddr> = node.iter().copied().filter(|a| a.is_ipv6() == v6).collect();
        let Some(first) = fam.first().copied() else {
            continue;
        };
        let hop = if v6 { IpAddr::V6(HOST_LL) } else { first };
        for n in &fam {
            let gw = v6.then_some(hop);
            pod.add_route(host_prefix(*n), pidx, gw, Some(src), MAIN)
                .await
                .map_err(nl)?;
        }
        for c in s.hijack.iter().filter(|c| c.addr().is_ipv6() == v6) {
            pod.add_route(*c, pidx, Some(hop), Some(src), MAIN)
                .await
                .map_err(nl)?;
        }
    }
    Ok(())
}

/// `tunePodRoutes`: the NIC answers for its own addresses from a table of its own.
async fn tune(
    pod: &Nl,
    p: &Prev,
    pod_if: u32,
    pidx: u32,
    not_default: bool,
) -> Result<(), CniError> {
    let table = 100 + pod_if;
    for v6 in [false, true] {
        if !p.addresses.iter().any(|a| a.addr().is_ipv6() == v6) {
            continue;
        }
        for r in pod.routes(v6).await.map_err(nl)? {
            if r.table != MAIN || !r.oif.is_some_and(|o| o == pod_if || o == pidx) {
                continue;
            }
            if r.dst.prefix_len() == 0 && r.oif == Some(pod_if) && not_default {
                pod.copy_route(r.msg.clone(), table).await.map_err(nl)?;
                pod.del_route(r.msg).await.map_err(nl)?;
            } else if !matches!(r.dst.addr(), IpAddr::V6(a) if a.is_unicast_link_local()) {
                pod.copy_route(r.msg, table).await.map_err(nl)?;
            }
        }
    }
    for a in &p.addresses {
        pod.add_rule(false, host_prefix(a.addr()), table)
            .await
            .map_err(nl)?;
    }
    Ok(())
}

/// DEL: the node's part of this NIC (and the pair, when this NIC made it).
async fn del(env: &Env, s: &Settings, prev: Option<&Value>) -> Result<(), CniError> {
    let nic = ifname(env);
    let host = Nl::here().map_err(nl)?;
    let mut ips: Vec<IpNet> = match prev {
        Some(p) => prev_result(p, &nic)
            .map(|p| p.addresses.iter().map(|a| host_prefix(a.addr())).collect())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    // The NIC's addresses, while the pod's namespace still exists.
    if !env.netns.is_empty() && Path::new(&env.netns).exists() {
        if let Ok(pod) = Nl::enter(Path::new(&env.netns)) {
            if let (Ok(Some(l)), Ok(addrs)) = (pod.link(&nic).await, pod.addresses().await) {
                ips.extend(
                    addrs
                        .into_iter()
                        .filter(|(i, _, g)| *i == l.header.index && *g)
                        .map(|(_, a, _)| host_prefix(a.addr())),
                );
            }
        }
    }
    let hv = host_veth_name(&container(env));
    let link = host.link(&hv).await.map_err(nl)?;
    let owner = link
        .as_ref()
        .is_some_and(|h| alias_owner(h).is_none_or(|o| o == nic));
    if let Some(h) = &link {
        for v6 in [false, true] {
            for r in host.routes(v6).await.map_err(nl)? {
                if r.table != s.host_rule_table || r.oif != Some(h.header.index) {
                    continue;
                }
                if owner {
                    ips.push(r.dst);
                } else if ips.contains(&r.dst) {
                    host.del_route(r.msg).await.map_err(nl)?;
                }
            }
        }
    }
    for r in host.rules().await.map_err(nl)? {
        if r.table == s.host_rule_table
            && r.src.is_none()
            && r.dst.is_some_and(|d| ips.contains(&d))
        {
            host.del_rule(r.msg).await.map_err(nl)?;
        }
    }
    if let (true, Some(h)) = (owner, link) {
        host.del_link(h.header.index).await.map_err(nl)?;
    }
    Ok(())
}

/// CHECK: the pair, the node's routes and rules for the NIC's addresses.
async fn check(env: &Env, s: &Settings, prev: &Value) -> Result<(), CniError> {
    let nic = ifname(env);
    let p = prev_result(prev, &nic)?;
    let host = Nl::here().map_err(nl)?;
    let hv = host_veth_name(&container(env));
    let missing = |what: String| CniError::new(CHECK_FAILED, format!("coordinator: {what}"));
    let h = host.link(&hv).await.map_err(nl)?.ok_or_else(|| {
        missing(format!(
            "the node side of the pod's veth pair ({hv}) is missing"
        ))
    })?;
    let pod = Nl::enter(Path::new(&env.netns)).map_err(nl)?;
    pod.link(POD_VETH)
        .await
        .map_err(nl)?
        .ok_or_else(|| missing(format!("the pod has no {POD_VETH}")))?;
    let rules = host.rules().await.map_err(nl)?;
    let mut routes = host.routes(false).await.map_err(nl)?;
    routes.extend(host.routes(true).await.map_err(nl)?);
    for a in &p.addresses {
        let dst = host_prefix(a.addr());
        if !routes
            .iter()
            .any(|r| r.table == s.host_rule_table && r.dst == dst && r.oif == Some(h.header.index))
        {
            return Err(missing(format!(
                "the node has no route to {dst} through {hv} in table {}",
                s.host_rule_table
            )));
        }
        if !rules
            .iter()
            .any(|r| r.table == s.host_rule_table && r.dst == Some(dst))
        {
            return Err(missing(format!(
                "the node has no rule 'to {dst} lookup {}'",
                s.host_rule_table
            )));
        }
    }
    Ok(())
}

/// The cluster's `SpiderCoordinator` defaults (its `spec`), for ADD, DEL and CHECK, from the
/// agent on this node (`GET /v1/coordinator` on `agentSocket`, default the agent's socket).
/// None when no agent runs here or it has none. ADD fails with code 11 when the socket exists
/// but the agent does not answer (the defaults may carry the Service CIDRs); DEL and CHECK go on
/// with the built-in defaults.
pub fn cluster_defaults(
    vars: &BTreeMap<String, String>,
    stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    // Only the verbs that touch the node read them (VERSION, GC and STATUS cost no request).
    if !matches!(
        vars.get("CNI_COMMAND").map(String::as_str),
        Some("ADD" | "DEL" | "CHECK")
    ) {
        return Ok(None);
    }
    let conf: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
    let socket = conf
        .get("agentSocket")
        .and_then(Value::as_str)
        .unwrap_or(spiderpool_core::api::DEFAULT_SOCKET);
    let adding = vars.get("CNI_COMMAND").map(String::as_str) == Some("ADD");
    let timeout = std::time::Duration::from_secs(10);
    match crate::client::exchange::<()>(socket, "GET", "/v1/coordinator", None, timeout) {
        Ok((200, body)) => Ok(serde_json::from_slice(&body).ok()),
        Ok(_) | Err(crate::client::ClientError::NoSocket { .. }) => Ok(None),
        Err(e) if adding => Err(CniError::from(e.into_api())),
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(cmd: &str) -> BTreeMap<String, String> {
        [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/var/run/netns/none"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn version_gc_status_and_disabled_need_no_netlink() {
        let a = run(&vars("VERSION"), br#"{"cniVersion":"1.1.0"}"#, None);
        assert_eq!(a.status, 0);
        assert!(a.stdout.contains("supportedVersions"));
        for cmd in ["GC", "STATUS"] {
            let a = run(
                &vars(cmd),
                br#"{"cniVersion":"1.1.0","name":"n","type":"coordinator"}"#,
                None,
            );
            assert_eq!((a.status, a.stdout.as_str()), (0, ""), "{cmd}");
            let a = run(
                &vars(cmd),
                br#"{"cniVersion":"1.0.0","name":"n","type":"coordinator"}"#,
                None,
            );
            assert_eq!(a.status, INCOMPATIBLE_VERSION as i32, "{cmd} at 1.0.0");
        }
        let conf = br#"{"cniVersion":"0.3.1","name":"n","type":"veth","mode":"disabled",
            "prevResult":{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.6.168.61/16"}]}}"#;
        let a = run(&vars("ADD"), conf, None);
        assert_eq!(a.status, 0, "{}", a.stdout);
        let out: Value = serde_json::from_str(&a.stdout).expect("json");
        assert_eq!(out["ips"][0]["address"], "10.6.168.61/16");
    }

    #[test]
    fn bad_input_is_an_error_naming_what_is_wrong() {
        let a = run(&vars("ADD"), b"{", None);
        assert_eq!(a.status, DECODE_FAILURE as i32);
        let a = run(&vars("ADD"), br#"{"cniVersion":"9.9.9"}"#, None);
        assert_eq!(a.status, INCOMPATIBLE_VERSION as i32);
        let a = run(
            &vars("ADD"),
            br#"{"cniVersion":"1.0.0","name":"n","type":"veth","hostRuleTable":255}"#,
            None,
        );
        assert_eq!(a.status, INVALID_CONFIG as i32);
        assert!(a.stdout.contains("hostRuleTable"), "{}", a.stdout);
        // The cluster default is checked as well, and the network's key wins over it.
        let cluster = json!({"hostRuleTable": 600});
        let a = run(
            &vars("ADD"),
            br#"{"cniVersion":"1.0.0","name":"n","type":"veth","mode":"disabled"}"#,
            Some(&cluster),
        );
        assert_eq!(a.status, 0);
        let a = run(
            &vars("ADD"),
            br#"{"cniVersion":"1.0.0","name":"n","type":"veth"}"#,
            None,
        );
        assert_eq!(a.status, INVALID_CONFIG as i32);
        assert!(a.stdout.contains("prevResult"), "{}", a.stdout);
    }

    #[test]
    fn the_result_passes_through_with_the_new_mac() {
        let prev = json!({"cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "aa:aa:aa:aa:aa:aa", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "10.6.168.61/16", "interface": 0}]});
        let out: Value = serde_json::from_str(&pass_through(
            &prev,
            "1.0.0",
            Some([0x0a, 0x1b, 10, 6, 168, 61]),
            "eth0",
        ))
        .expect("json");
        assert_eq!(out["interfaces"][0]["mac"], "0a:1b:0a:06:a8:3d");
        assert_eq!(out["ips"], prev["ips"]);
    }
}
