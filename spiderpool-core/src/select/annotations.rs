//! The pod and namespace annotations selection reads: names, values, parsers, and the
//! shell-style wildcards pool names may use.

use serde::Deserialize;

use super::RouteRequest;

/// Pod annotation: pools for one NIC.
pub const ANNO_IPPOOL: &str = "ipam.spidernet.io/ippool";
/// Pod annotation: pools for several NICs.
pub const ANNO_IPPOOLS: &str = "ipam.spidernet.io/ippools";
/// Pod annotation: auto-pool from one subnet.
pub const ANNO_SUBNET: &str = "ipam.spidernet.io/subnet";
/// Pod annotation: auto-pools for several NICs.
pub const ANNO_SUBNETS: &str = "ipam.spidernet.io/subnets";
/// Namespace annotation: default IPv4 pools.
pub const ANNO_NS_DEFAULT_V4: &str = "ipam.spidernet.io/default-ipv4-ippool";
/// Namespace annotation: default IPv6 pools.
pub const ANNO_NS_DEFAULT_V6: &str = "ipam.spidernet.io/default-ipv6-ippool";
/// Pod annotation: extra routes.
pub const ANNO_ROUTES: &str = "ipam.spidernet.io/routes";
/// Multus: the network of eth0.
pub const ANNO_MULTUS_DEFAULT: &str = "v1.multus-cni.io/default-network";
/// Multus: additional networks.
pub const ANNO_MULTUS_NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolsEntry {
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    ipv4: Vec<String>,
    #[serde(default)]
    ipv6: Vec<String>,
    #[serde(default, alias = "cleanGateway")]
    cleangateway: Option<bool>,
}

impl From<SubnetEntry> for PoolsEntry {
    fn from(e: SubnetEntry) -> Self {
        PoolsEntry {
            interface: e.interface,
            ipv4: e.ipv4,
            ipv6: e.ipv6,
            cleangateway: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
struct SubnetEntry {
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    ipv4: Vec<String>,
    #[serde(default)]
    ipv6: Vec<String>,
}

/// The `ipam.spidernet.io/ippool` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpPoolAnnotation {
    /// IPv4 pools in order.
    pub ipv4: Vec<String>,
    /// IPv6 pools in order.
    pub ipv6: Vec<String>,
    /// cleangateway.
    pub clean_gateway: Option<bool>,
}

/// Parses the `ipam.spidernet.io/ippool` value.
pub fn parse_ippool_annotation(v: &str) -> Result<IpPoolAnnotation, String> {
    let e: PoolsEntry = serde_json::from_str(v).map_err(|e| e.to_string())?;
    if e.ipv4.is_empty() && e.ipv6.is_empty() {
        return Err("names no pool: give \"ipv4\" and/or \"ipv6\" lists".into());
    }
    Ok(IpPoolAnnotation {
        ipv4: e.ipv4,
        ipv6: e.ipv6,
        clean_gateway: e.cleangateway,
    })
}

/// One NIC's entry of the `ipam.spidernet.io/ippools` annotation, interface name resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolsAnnotationEntry {
    /// Interface.
    pub interface: String,
    /// IPv4 pools.
    pub ipv4: Vec<String>,
    /// IPv6 pools.
    pub ipv6: Vec<String>,
    /// cleangateway.
    pub clean_gateway: Option<bool>,
}

/// Parses the `ipam.spidernet.io/ippools` value: `interface` on all entries or none (then entry `i`
/// is `eth0` for 0 and `net{i}` after), no duplicate interface, each entry names a pool.
pub fn parse_ippools_annotation(v: &str) -> Result<Vec<PoolsAnnotationEntry>, String> {
    let entries: Vec<PoolsEntry> = serde_json::from_str(v).map_err(|e| e.to_string())?;
    name_interfaces(entries)
}

/// Parses the `ipam.spidernet.io/subnets` value: one entry per NIC (interfaces named as for
/// `ippools`), each listing the SpiderSubnets (not pools) per family.
pub fn parse_subnets_annotation(v: &str) -> Result<Vec<PoolsAnnotationEntry>, String> {
    let list: Vec<SubnetEntry> = serde_json::from_str(v).map_err(|e| e.to_string())?;
    name_interfaces(list.into_iter().map(PoolsEntry::from).collect())
}

/// Parses the `ipam.spidernet.io/subnet` value: the SpiderSubnets per family of one NIC
/// (`interface`, or `ifname` when the value names none).
pub fn parse_subnet_annotation(v: &str, ifname: &str) -> Result<PoolsAnnotationEntry, String> {
    let e: SubnetEntry = serde_json::from_str(v).map_err(|e| e.to_string())?;
    let mut entry = PoolsEntry::from(e);
    entry.interface = Some(entry.interface.unwrap_or_else(|| ifname.to_string()));
    let mut named = name_interfaces(vec![entry])?;
    named.pop().ok_or_else(|| "no entry".to_string())
}

fn name_interfaces(entries: Vec<PoolsEntry>) -> Result<Vec<PoolsAnnotationEntry>, String> {
    if entries.is_empty() {
        return Err("empty list".into());
    }
    let named = entries.iter().filter(|e| e.interface.is_some()).count();
    if named != 0 && named != entries.len() {
        return Err("set \"interface\" on every entry or on none".into());
    }
    let mut out: Vec<PoolsAnnotationEntry> = Vec::with_capacity(entries.len());
    for (i, e) in entries.into_iter().enumerate() {
        let (v4, v6, cg) = (e.ipv4, e.ipv6, e.cleangateway);
        let interface = e.interface.unwrap_or_else(|| {
            if i == 0 {
                "eth0".to_string()
            } else {
                format!("net{i}")
            }
        });
        if interface.is_empty() {
            return Err(format!("entry {i} has an empty interface"));
        }
        if out.iter().any(|e| e.interface == interface) {
            return Err(format!("interface {interface} is listed twice"));
        }
        if v4.is_empty() && v6.is_empty() {
            return Err(format!("entry for {interface} names no pool"));
        }
        out.push(PoolsAnnotationEntry {
            interface,
            ipv4: v4,
            ipv6: v6,
            clean_gateway: cg,
        });
    }
    Ok(out)
}

/// Parses the `ipam.spidernet.io/routes` value.
pub fn parse_routes_annotation(v: &str) -> Result<Vec<RouteRequest>, String> {
    let routes: Vec<RouteRequest> = serde_json::from_str(v).map_err(|e| e.to_string())?;
    for r in &routes {
        if r.dst.parse::<ipnet::IpNet>().is_err() {
            return Err(format!("dst '{}' is not a CIDR", r.dst));
        }
        if r.gw.parse::<std::net::IpAddr>().is_err() {
            return Err(format!("gw '{}' is not an IP address", r.gw));
        }
    }
    Ok(routes)
}

/// Parses a namespace default-pool annotation (a JSON array of names).
pub fn parse_pool_list(v: &str) -> Result<Vec<String>, String> {
    serde_json::from_str(v).map_err(|e| e.to_string())
}

/// Shell-style wildcard match: `*`, `?`, `[abc]`, `[a-z]`, `[!a]`/`[^a]`.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = match_class(&p, pi, n[ni]) {
                        if matched {
                            pi = next;
                            ni += 1;
                            continue;
                        }
                    } else if n[ni] == '[' {
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the class starting at `p[start] == '['`; returns (matched, index after `]`),
/// or `None` when the class is not closed (then `[` is literal).
fn match_class(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

pub(super) fn is_wildcard(name: &str) -> bool {
    name.contains(['*', '?', '['])
}
