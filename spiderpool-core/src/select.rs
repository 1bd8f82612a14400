//! Choosing candidate pools for each NIC and IP family of a pod (REFERENCE section 2).
//!
//! Sources, first that applies wins: `ipam.spidernet.io/subnets` > `ipam.spidernet.io/subnet` >
//! `ipam.spidernet.io/ippools` > `ipam.spidernet.io/ippool` > namespace default annotations > CNI
//! config defaults > cluster default pools. Wildcards expand in place (matches sorted by name). The
//! user's order is kept; every candidate is reported with why it was skipped.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::range::{Families, IpFamily};
use crate::selector::{format_labels, Labels};
use crate::model::{Pool, PoolSet};

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

/// Defaults carried by the CNI network configuration (`ipam` section).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniDefaults {
    /// `default_ipv4_ippool`.
    #[serde(default)]
    pub default_ipv4_ippool: Vec<String>,
    /// `default_ipv6_ippool`.
    #[serde(default)]
    pub default_ipv6_ippool: Vec<String>,
    /// `clean_gateway`.
    #[serde(default)]
    pub clean_gateway: bool,
    /// The network config's `name` (used for `multusName` when the pod names no network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_name: Option<String>,
}

impl CniDefaults {
    /// Reads the defaults from a CNI network configuration (a single plugin config or a
    /// `.conflist` with `plugins`): the `ipam` section whose `type` is `spiderpool`.
    pub fn from_netconf(conf: &serde_json::Value) -> Result<CniDefaults, String> {
        let name = conf
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_string);
        let ipam = match conf.get("plugins") {
            Some(serde_json::Value::Array(plugins)) => plugins
                .iter()
                .filter_map(|p| p.get("ipam"))
                .find(|i| i.get("type").and_then(|t| t.as_str()) == Some("spiderpool")),
            Some(_) => return Err("\"plugins\" must be a list".into()),
            None => conf.get("ipam"),
        };
        let Some(ipam) = ipam else {
            return Err("no \"ipam\" section of type \"spiderpool\"".into());
        };
        if ipam.get("type").and_then(|t| t.as_str()) != Some("spiderpool") {
            return Err("ipam.type is not \"spiderpool\"".into());
        }
        let list = |key: &str| -> Result<Vec<String>, String> {
            match ipam.get(key) {
                None | Some(serde_json::Value::Null) => Ok(Vec::new()),
                Some(v) => serde_json::from_value(v.clone())
                    .map_err(|e| format!("ipam.{key} must be a list of pool names: {e}")),
            }
        };
        let clean_gateway = match ipam.get("clean_gateway") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(_) => return Err("ipam.clean_gateway must be true or false".into()),
        };
        Ok(CniDefaults {
            default_ipv4_ippool: list("default_ipv4_ippool")?,
            default_ipv6_ippool: list("default_ipv6_ippool")?,
            clean_gateway,
            network_name: name,
        })
    }
}

/// What the selection reads about the pod, its namespace and its node.
#[derive(Debug, Clone, Default)]
pub struct SelectionInput<'a> {
    /// Pod namespace.
    pub pod_namespace: &'a str,
    /// Pod name.
    pub pod_name: &'a str,
    /// Pod labels.
    pub pod_labels: Option<&'a Labels>,
    /// Pod annotations.
    pub pod_annotations: Option<&'a BTreeMap<String, String>>,
    /// Namespace labels.
    pub namespace_labels: Option<&'a Labels>,
    /// Namespace annotations.
    pub namespace_annotations: Option<&'a BTreeMap<String, String>>,
    /// Node name.
    pub node_name: &'a str,
    /// Node labels.
    pub node_labels: Option<&'a Labels>,
    /// Name of the pod's controller (for auto-pool names), e.g. the Deployment.
    pub owner_name: Option<&'a str>,
    /// CNI config defaults.
    pub cni: Option<&'a CniDefaults>,
    /// Families the cluster serves when the pool list comes from cluster defaults.
    pub default_families: Families,
}

/// Where a NIC's pool list came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// `ipam.spidernet.io/subnets`.
    #[serde(rename = "pod annotation ipam.spidernet.io/subnets")]
    SubnetsAnnotation,
    /// `ipam.spidernet.io/subnet`.
    #[serde(rename = "pod annotation ipam.spidernet.io/subnet")]
    SubnetAnnotation,
    /// `ipam.spidernet.io/ippools`.
    #[serde(rename = "pod annotation ipam.spidernet.io/ippools")]
    IpPoolsAnnotation,
    /// `ipam.spidernet.io/ippool`.
    #[serde(rename = "pod annotation ipam.spidernet.io/ippool")]
    IpPoolAnnotation,
    /// Namespace default annotations.
    #[serde(rename = "namespace annotation ipam.spidernet.io/default-ipv4|6-ippool")]
    NamespaceDefault,
    /// CNI config defaults.
    #[serde(rename = "cni config default_ipv4|6_ippool")]
    CniDefault,
    /// Pools with `spec.default: true`.
    #[serde(rename = "cluster default pools (spec.default: true)")]
    ClusterDefault,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = serde_json::to_value(self).unwrap_or_default();
        f.write_str(v.as_str().unwrap_or("unknown"))
    }
}

/// A pool considered for one NIC and family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Pool name (or the wildcard pattern that matched nothing).
    pub pool: String,
    /// Whether it may serve this pod.
    pub eligible: bool,
    /// Why not, when not eligible (or, after allocation, why it was passed over).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Candidates for one family of one NIC, in the order they are tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyPlan {
    /// Every candidate, user order kept.
    pub candidates: Vec<Candidate>,
    /// First eligible candidate (dry-run choice), if any.
    pub selected: Option<String>,
}

impl FamilyPlan {
    /// Eligible pools in order.
    pub fn eligible(&self) -> impl Iterator<Item = &str> {
        self.candidates
            .iter()
            .filter(|c| c.eligible)
            .map(|c| c.pool.as_str())
    }

    /// "a skipped (why), b skipped (why)" for error messages.
    pub fn explain_skips(&self) -> String {
        if self.candidates.is_empty() {
            return "no candidate pool".into();
        }
        self.candidates
            .iter()
            .map(|c| match &c.reason {
                Some(r) if c.eligible => format!("{} {r}", c.pool),
                Some(r) => format!("{} skipped ({r})", c.pool),
                None => format!("{} eligible", c.pool),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A static route from the `ipam.spidernet.io/routes` annotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRequest {
    /// Destination CIDR.
    pub dst: String,
    /// Next hop.
    pub gw: String,
}

/// The plan for one NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicPlan {
    /// Interface name.
    pub ifname: String,
    /// Where its pool list came from.
    pub source: Source,
    /// IPv4 candidates, when IPv4 is requested.
    pub ipv4: Option<FamilyPlan>,
    /// IPv6 candidates, when IPv6 is requested.
    pub ipv6: Option<FamilyPlan>,
    /// Suppress the default route (gateway still returned).
    #[serde(rename = "cleanGateway")]
    pub clean_gateway: bool,
}

impl NicPlan {
    /// The plan of one family.
    pub fn family(&self, f: IpFamily) -> Option<&FamilyPlan> {
        match f {
            IpFamily::V4 => self.ipv4.as_ref(),
            IpFamily::V6 => self.ipv6.as_ref(),
        }
    }
}

/// Pool choices for every NIC one ADD must serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// NICs, in annotation order; the requested one is among them.
    pub nics: Vec<NicPlan>,
    /// Routes from `ipam.spidernet.io/routes`.
    pub routes: Vec<RouteRequest>,
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    /// An annotation is malformed.
    #[error("pod {pod}: annotation {key} is invalid: {reason}")]
    BadAnnotation {
        /// ns/name.
        pod: String,
        /// Annotation key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The requested NIC is not named in `ippools`/`subnets`.
    #[error("pod {pod}: interface {ifname} is not listed in annotation {key} (listed: {listed})")]
    UnknownInterface {
        /// ns/name.
        pod: String,
        /// Requested NIC.
        ifname: String,
        /// Annotation key.
        key: String,
        /// Interfaces that are listed.
        listed: String,
    },
    /// Nothing names a pool for this NIC.
    #[error("pod {pod}: no pool is configured for {ifname}: annotate the pod with ipam.spidernet.io/ippool, set the namespace's default pools, the CNI config's default_ipv4_ippool, or mark a pool default: true")]
    NoSource {
        /// ns/name.
        pod: String,
        /// NIC.
        ifname: String,
    },
}

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

fn is_wildcard(name: &str) -> bool {
    name.contains(['*', '?', '['])
}

/// The pod's `ipam.spidernet.io/routes`, parsed (empty when absent).
pub fn pod_routes(input: &SelectionInput<'_>) -> Result<Vec<RouteRequest>, SelectionError> {
    match input.pod_annotations.and_then(|a| a.get(ANNO_ROUTES)) {
        Some(v) => parse_routes_annotation(v).map_err(|reason| SelectionError::BadAnnotation {
            pod: format!("{}/{}", input.pod_namespace, input.pod_name),
            key: ANNO_ROUTES.to_string(),
            reason,
        }),
        None => Ok(Vec::new()),
    }
}

/// Resolves the pools for `ifname` (and, with `ippools`, for every NIC listed) of one pod.
pub fn resolve(
    pools: &PoolSet,
    input: &SelectionInput<'_>,
    ifname: &str,
) -> Result<Plan, SelectionError> {
    let pod = format!("{}/{}", input.pod_namespace, input.pod_name);
    let empty = BTreeMap::new();
    let annos = input.pod_annotations.unwrap_or(&empty);
    let bad = |key: &str, reason: String| SelectionError::BadAnnotation {
        pod: pod.clone(),
        key: key.to_string(),
        reason,
    };
    let routes = pod_routes(input)?;
    let cni_clean = input.cni.is_some_and(|c| c.clean_gateway);
    // (interface, v4 names, v6 names, clean gateway), source
    let (entries, source): (Vec<PoolsAnnotationEntry>, Source) =
        if let Some(v) = annos.get(ANNO_SUBNETS) {
            let list: Vec<SubnetEntry> =
                serde_json::from_str(v).map_err(|e| bad(ANNO_SUBNETS, e.to_string()))?;
            let named = name_interfaces(list.into_iter().map(PoolsEntry::from).collect())
                .map_err(|r| bad(ANNO_SUBNETS, r))?;
            (auto_pool_entries(named, input), Source::SubnetsAnnotation)
        } else if let Some(v) = annos.get(ANNO_SUBNET) {
            let e: SubnetEntry =
                serde_json::from_str(v).map_err(|e| bad(ANNO_SUBNET, e.to_string()))?;
            let mut entry = PoolsEntry::from(e);
            entry.interface = Some(entry.interface.unwrap_or_else(|| ifname.to_string()));
            let named = name_interfaces(vec![entry]).map_err(|r| bad(ANNO_SUBNET, r))?;
            (auto_pool_entries(named, input), Source::SubnetAnnotation)
        } else if let Some(v) = annos.get(ANNO_IPPOOLS) {
            let list = parse_ippools_annotation(v).map_err(|r| bad(ANNO_IPPOOLS, r))?;
            (list, Source::IpPoolsAnnotation)
        } else if let Some(v) = annos.get(ANNO_IPPOOL) {
            let a = parse_ippool_annotation(v).map_err(|r| bad(ANNO_IPPOOL, r))?;
            (
                vec![PoolsAnnotationEntry {
                    interface: ifname.to_string(),
                    ipv4: a.ipv4,
                    ipv6: a.ipv6,
                    clean_gateway: a.clean_gateway,
                }],
                Source::IpPoolAnnotation,
            )
        } else if let Some((v4, v6)) = namespace_defaults(input).map_err(|(k, r)| bad(k, r))? {
            (
                vec![PoolsAnnotationEntry {
                    interface: ifname.to_string(),
                    ipv4: v4,
                    ipv6: v6,
                    clean_gateway: None,
                }],
                Source::NamespaceDefault,
            )
        } else if let Some(c) = input
            .cni
            .filter(|c| !c.default_ipv4_ippool.is_empty() || !c.default_ipv6_ippool.is_empty())
        {
            (
                vec![PoolsAnnotationEntry {
                    interface: ifname.to_string(),
                    ipv4: c.default_ipv4_ippool.clone(),
                    ipv6: c.default_ipv6_ippool.clone(),
                    clean_gateway: None,
                }],
                Source::CniDefault,
            )
        } else {
            let defaults = |f: IpFamily, want: bool| -> Vec<String> {
                if !want {
                    return Vec::new();
                }
                pools
                    .pools
                    .values()
                    .filter(|p| p.default && p.family == f)
                    .map(|p| p.name.clone())
                    .collect()
            };
            let fam = input.default_families;
            let v4 = defaults(IpFamily::V4, fam.ipv4);
            let v6 = defaults(IpFamily::V6, fam.ipv6);
            if v4.is_empty() && v6.is_empty() {
                return Err(SelectionError::NoSource {
                    pod,
                    ifname: ifname.to_string(),
                });
            }
            (
                vec![PoolsAnnotationEntry {
                    interface: ifname.to_string(),
                    ipv4: v4,
                    ipv6: v6,
                    clean_gateway: None,
                }],
                Source::ClusterDefault,
            )
        };
    if !entries.iter().any(|e| e.interface == ifname) {
        let key = match source {
            Source::SubnetsAnnotation => ANNO_SUBNETS,
            _ => ANNO_IPPOOLS,
        };
        return Err(SelectionError::UnknownInterface {
            pod,
            ifname: ifname.to_string(),
            key: key.to_string(),
            listed: entries
                .iter()
                .map(|e| e.interface.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let nics = entries
        .into_iter()
        .map(|e| {
            let plan = |names: &[String], f: IpFamily| {
                (!names.is_empty()).then(|| family_plan(pools, input, &e.interface, names, f))
            };
            NicPlan {
                ipv4: plan(&e.ipv4, IpFamily::V4),
                ipv6: plan(&e.ipv6, IpFamily::V6),
                clean_gateway: e.clean_gateway.unwrap_or(cni_clean),
                ifname: e.interface,
                source,
            }
        })
        .collect();
    Ok(Plan { nics, routes })
}

/// Turns subnet annotations into the names of the auto-created pools:
/// `auto{4|6}-<app>-<nic>-*` (the controller appends 5 chars of the app's uid).
fn auto_pool_entries(
    named: Vec<PoolsAnnotationEntry>,
    input: &SelectionInput<'_>,
) -> Vec<PoolsAnnotationEntry> {
    let app = input
        .owner_name
        .unwrap_or(input.pod_name)
        .to_ascii_lowercase();
    named
        .into_iter()
        .map(|e| {
            let name = |v: u8, subnets: &[String]| {
                if subnets.is_empty() {
                    Vec::new()
                } else {
                    vec![format!("auto{v}-{app}-{}-?????", e.interface)]
                }
            };
            PoolsAnnotationEntry {
                ipv4: name(4, &e.ipv4),
                ipv6: name(6, &e.ipv6),
                interface: e.interface,
                clean_gateway: e.clean_gateway,
            }
        })
        .collect()
}

type NsDefaults = Option<(Vec<String>, Vec<String>)>;

fn namespace_defaults(input: &SelectionInput<'_>) -> Result<NsDefaults, (&'static str, String)> {
    let Some(annos) = input.namespace_annotations else {
        return Ok(None);
    };
    let v4 = annos
        .get(ANNO_NS_DEFAULT_V4)
        .map(|v| parse_pool_list(v).map_err(|e| (ANNO_NS_DEFAULT_V4, e)))
        .transpose()?;
    let v6 = annos
        .get(ANNO_NS_DEFAULT_V6)
        .map(|v| parse_pool_list(v).map_err(|e| (ANNO_NS_DEFAULT_V6, e)))
        .transpose()?;
    let (v4, v6) = (v4.unwrap_or_default(), v6.unwrap_or_default());
    Ok((!v4.is_empty() || !v6.is_empty()).then_some((v4, v6)))
}

fn family_plan(
    pools: &PoolSet,
    input: &SelectionInput<'_>,
    ifname: &str,
    names: &[String],
    family: IpFamily,
) -> FamilyPlan {
    let mut candidates = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for name in names {
        if is_wildcard(name) {
            let matched: Vec<&Pool> = pools
                .pools
                .values()
                .filter(|p| wildcard_match(name, &p.name))
                .collect();
            if matched.is_empty() {
                candidates.push(Candidate {
                    pool: name.clone(),
                    eligible: false,
                    reason: Some("wildcard matches no pool".into()),
                });
            }
            for p in matched {
                if seen.insert(p.name.clone()) {
                    candidates.push(check(p, input, ifname, family));
                }
            }
        } else if seen.insert(name.clone()) {
            candidates.push(match pools.pools.get(name) {
                Some(p) => check(p, input, ifname, family),
                None => Candidate {
                    pool: name.clone(),
                    eligible: false,
                    reason: Some("pool not found".into()),
                },
            });
        }
    }
    let selected = candidates
        .iter()
        .find(|c| c.eligible)
        .map(|c| c.pool.clone());
    FamilyPlan {
        candidates,
        selected,
    }
}

/// Whether one pool may serve this pod's NIC and family, and if not, why.
pub fn check(pool: &Pool, input: &SelectionInput<'_>, ifname: &str, family: IpFamily) -> Candidate {
    let reason = ineligibility(pool, input, ifname, family);
    Candidate {
        pool: pool.name.clone(),
        eligible: reason.is_none(),
        reason,
    }
}

fn ineligibility(
    pool: &Pool,
    input: &SelectionInput<'_>,
    ifname: &str,
    family: IpFamily,
) -> Option<String> {
    let empty = Labels::new();
    if pool.terminating {
        return Some("pool is terminating".into());
    }
    if pool.disable {
        return Some("pool is disabled".into());
    }
    if pool.family != family {
        return Some(format!("pool is {}, wanted {family}", pool.family));
    }
    if let Some(r) = names_or_selector(
        (&pool.node_name, "nodeName"),
        (pool.node_affinity.as_ref(), "nodeAffinity"),
        input.node_labels.unwrap_or(&empty),
        ("node", input.node_name),
    ) {
        return Some(r);
    }
    if let Some(r) = names_or_selector(
        (&pool.namespace_name, "namespaceName"),
        (pool.namespace_affinity.as_ref(), "namespaceAffinity"),
        input.namespace_labels.unwrap_or(&empty),
        ("namespace", input.pod_namespace),
    ) {
        return Some(r);
    }
    if let Some(sel) = &pool.pod_affinity {
        let labels = input.pod_labels.unwrap_or(&empty);
        let who = format!("{}/{}", input.pod_namespace, input.pod_name);
        if let Some(r) = selector_mismatch(sel, labels, "podAffinity", "pod", &who) {
            return Some(r);
        }
    }
    if !pool.multus_name.is_empty() {
        match multus_network(input, ifname) {
            Some(net) => {
                if !pool
                    .multus_name
                    .iter()
                    .any(|m| multus_matches(m, &net, input.pod_namespace))
                {
                    return Some(format!(
                        "multusName [{}] does not include network {net} of {ifname}",
                        pool.multus_name.join(" ")
                    ));
                }
            }
            None => {
                return Some(format!(
                    "multusName [{}] set, but {ifname} of the pod names no Multus network",
                    pool.multus_name.join(" ")
                ))
            }
        }
    }
    None
}

/// The `nodeName`/`nodeAffinity` (and namespace) rule: a non-empty name list wins over the
/// selector. Returns why the object does not match, if it does not.
fn names_or_selector(
    (names, names_field): (&[String], &str),
    (selector, selector_field): (Option<&crate::selector::LabelSelector>, &str),
    labels: &Labels,
    (what, who): (&str, &str),
) -> Option<String> {
    if !names.is_empty() {
        return (!names.iter().any(|n| n == who)).then(|| {
            format!(
                "{names_field} [{}] does not include {what} {who}",
                names.join(" ")
            )
        });
    }
    selector.and_then(|sel| selector_mismatch(sel, labels, selector_field, what, who))
}

fn selector_mismatch(
    sel: &crate::selector::LabelSelector,
    labels: &Labels,
    field: &str,
    what: &str,
    who: &str,
) -> Option<String> {
    match sel.matches(labels) {
        Ok(true) => None,
        Ok(false) => Some(format!(
            "{field} {sel} does not match {what} {who} labels {}",
            format_labels(labels)
        )),
        Err(e) => Some(format!("{field} is invalid: {e}")),
    }
}

/// The Multus network (`ns/name` or `name`) that serves `ifname` of the pod.
pub fn multus_network(input: &SelectionInput<'_>, ifname: &str) -> Option<String> {
    let annos = input.pod_annotations;
    if ifname == "eth0" {
        return annos
            .and_then(|a| a.get(ANNO_MULTUS_DEFAULT))
            .map(|s| s.trim().to_string())
            .or_else(|| input.cni.and_then(|c| c.network_name.clone()));
    }
    let v = annos?.get(ANNO_MULTUS_NETWORKS)?.trim();
    #[derive(Deserialize)]
    struct Sel {
        name: String,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        interface: Option<String>,
    }
    let list: Vec<(String, Option<String>)> = if v.starts_with('[') {
        serde_json::from_str::<Vec<Sel>>(v)
            .ok()?
            .into_iter()
            .map(|s| {
                let full = match s.namespace {
                    Some(ns) => format!("{ns}/{}", s.name),
                    None => s.name,
                };
                (full, s.interface)
            })
            .collect()
    } else {
        v.split(',')
            .map(|e| {
                let e = e.trim();
                match e.split_once('@') {
                    Some((n, i)) => (n.to_string(), Some(i.to_string())),
                    None => (e.to_string(), None),
                }
            })
            .collect()
    };
    if let Some((n, _)) = list.iter().find(|(_, i)| i.as_deref() == Some(ifname)) {
        return Some(n.clone());
    }
    // Positional: net1 is the first network, net2 the second, ...
    let idx: usize = ifname.strip_prefix("net")?.parse().ok()?;
    list.get(idx.checked_sub(1)?).map(|(n, _)| n.clone())
}

fn multus_matches(entry: &str, network: &str, pod_ns: &str) -> bool {
    let full = |s: &str| {
        if s.contains('/') {
            s.to_string()
        } else {
            format!("{pod_ns}/{s}")
        }
    };
    if entry.contains('/') {
        full(network) == entry
    } else {
        network.rsplit('/').next() == Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("test-*", "test-ippool-6"));
        assert!(wildcard_match("test-ippool-?", "test-ippool-6"));
        assert!(!wildcard_match("test-ippool-?", "test-ippool-66"));
        assert!(wildcard_match("test-ippool-[67]", "test-ippool-7"));
        assert!(!wildcard_match("test-ippool-[!67]", "test-ippool-7"));
        assert!(wildcard_match("pool-[a-c]*", "pool-b-x"));
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("a*b*c", "axxbyyc"));
        assert!(!wildcard_match("a*b*c", "axxbyy"));
        assert!(wildcard_match("a[", "a["));
    }

    #[test]
    fn ippools_interfaces_all_or_none() {
        let ok = parse_ippools_annotation(r#"[{"ipv4":["a"]},{"ipv4":["b"]}]"#).expect("ok");
        assert_eq!(ok[0].interface, "eth0");
        assert_eq!(ok[1].interface, "net1");
        assert!(
            parse_ippools_annotation(r#"[{"interface":"eth0","ipv4":["a"]},{"ipv4":["b"]}]"#)
                .expect_err("mixed")
                .contains("every entry or on none")
        );
        assert!(parse_ippools_annotation(
            r#"[{"interface":"eth0","ipv4":["a"]},{"interface":"eth0","ipv4":["b"]}]"#
        )
        .expect_err("dup")
        .contains("listed twice"));
        assert!(parse_ippools_annotation(r#"[{"interface":"eth0"}]"#)
            .expect_err("no pool")
            .contains("names no pool"));
        assert!(parse_ippools_annotation("not json").is_err());
    }

    #[test]
    fn multus_positional_and_json() {
        let mut annos = BTreeMap::new();
        annos.insert(
            ANNO_MULTUS_NETWORKS.to_string(),
            "kube-system/a, b@net5".to_string(),
        );
        let input = SelectionInput {
            pod_namespace: "ns",
            pod_annotations: Some(&annos),
            ..Default::default()
        };
        assert_eq!(
            multus_network(&input, "net1").as_deref(),
            Some("kube-system/a")
        );
        assert_eq!(multus_network(&input, "net5").as_deref(), Some("b"));
        assert!(multus_matches("ns/b", "b", "ns"));
        assert!(multus_matches("b", "other/b", "ns"));
        assert!(!multus_matches("x/b", "b", "ns"));
        annos.insert(
            ANNO_MULTUS_NETWORKS.to_string(),
            r#"[{"name":"c","namespace":"z","interface":"net2"}]"#.to_string(),
        );
        let input = SelectionInput {
            pod_namespace: "ns",
            pod_annotations: Some(&annos),
            ..Default::default()
        };
        assert_eq!(multus_network(&input, "net2").as_deref(), Some("z/c"));
    }
}
