//! Choosing candidate pools for each NIC and IP family of a pod (REFERENCE section 2).
//!
//! Sources, first that applies wins: `ipam.spidernet.io/subnets` > `ipam.spidernet.io/subnet` >
//! `ipam.spidernet.io/ippools` > `ipam.spidernet.io/ippool` > namespace default annotations > CNI
//! config defaults > cluster default pools. Wildcards expand in place (matches sorted by name). The
//! user's order is kept; every candidate is reported with why it was skipped.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{Pool, PoolSet};
use crate::range::{Families, IpFamily};
use crate::selector::Labels;

mod annotations;
mod eligibility;
#[cfg(test)]
mod tests;

use annotations::is_wildcard;
pub use annotations::*;
pub use eligibility::{check, multus_network};

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
    /// The pools already made for the pod's application from its `subnet(s)` annotation (the
    /// agent's auto-pools), by NIC: selected in place of the controller's wildcard names.
    pub auto_pools: Option<&'a [PoolsAnnotationEntry]>,
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
    let routes = pod_routes(input)?;
    let (entries, source) = sources(pools, input, ifname)?;
    if !entries.iter().any(|e| e.interface == ifname) {
        let key = match source {
            Source::SubnetsAnnotation => ANNO_SUBNETS,
            _ => ANNO_IPPOOLS,
        };
        return Err(SelectionError::UnknownInterface {
            pod: pod_id(input),
            ifname: ifname.to_string(),
            key: key.to_string(),
            listed: entries
                .iter()
                .map(|e| e.interface.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let cni_clean = input.cni.is_some_and(|c| c.clean_gateway);
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

fn pod_id(input: &SelectionInput<'_>) -> String {
    format!("{}/{}", input.pod_namespace, input.pod_name)
}

/// One NIC's pool lists, from a source without interface names.
fn one_nic(ifname: &str, ipv4: Vec<String>, ipv6: Vec<String>) -> Vec<PoolsAnnotationEntry> {
    vec![PoolsAnnotationEntry {
        interface: ifname.to_string(),
        ipv4,
        ipv6,
        clean_gateway: None,
    }]
}

/// The pool lists per NIC from the first source that applies, and which one it was.
fn sources(
    pools: &PoolSet,
    input: &SelectionInput<'_>,
    ifname: &str,
) -> Result<(Vec<PoolsAnnotationEntry>, Source), SelectionError> {
    let empty = BTreeMap::new();
    let annos = input.pod_annotations.unwrap_or(&empty);
    let bad = |key: &str, reason: String| SelectionError::BadAnnotation {
        pod: pod_id(input),
        key: key.to_string(),
        reason,
    };
    if let Some(v) = annos.get(ANNO_SUBNETS) {
        let named = parse_subnets_annotation(v).map_err(|r| bad(ANNO_SUBNETS, r))?;
        return Ok((auto_pool_entries(named, input), Source::SubnetsAnnotation));
    }
    if let Some(v) = annos.get(ANNO_SUBNET) {
        let named = vec![parse_subnet_annotation(v, ifname).map_err(|r| bad(ANNO_SUBNET, r))?];
        let mut entries = auto_pool_entries(named, input);
        // One subnet for the NIC being added, whatever the pools were made for.
        if let [only] = entries.as_mut_slice() {
            only.interface = ifname.to_string();
        }
        return Ok((entries, Source::SubnetAnnotation));
    }
    if let Some(v) = annos.get(ANNO_IPPOOLS) {
        let list = parse_ippools_annotation(v).map_err(|r| bad(ANNO_IPPOOLS, r))?;
        return Ok((list, Source::IpPoolsAnnotation));
    }
    if let Some(v) = annos.get(ANNO_IPPOOL) {
        let a = parse_ippool_annotation(v).map_err(|r| bad(ANNO_IPPOOL, r))?;
        let mut entries = one_nic(ifname, a.ipv4, a.ipv6);
        entries[0].clean_gateway = a.clean_gateway;
        return Ok((entries, Source::IpPoolAnnotation));
    }
    if let Some((v4, v6)) = namespace_defaults(input).map_err(|(k, r)| bad(k, r))? {
        return Ok((one_nic(ifname, v4, v6), Source::NamespaceDefault));
    }
    if let Some(c) = input
        .cni
        .filter(|c| !c.default_ipv4_ippool.is_empty() || !c.default_ipv6_ippool.is_empty())
    {
        let (v4, v6) = (c.default_ipv4_ippool.clone(), c.default_ipv6_ippool.clone());
        return Ok((one_nic(ifname, v4, v6), Source::CniDefault));
    }
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
            pod: pod_id(input),
            ifname: ifname.to_string(),
        });
    }
    Ok((one_nic(ifname, v4, v6), Source::ClusterDefault))
}

/// Turns subnet annotations into the names of the auto-created pools:
/// `auto{4|6}-<app>-<nic>-*` (the controller appends 5 chars of the app's uid).
fn auto_pool_entries(
    named: Vec<PoolsAnnotationEntry>,
    input: &SelectionInput<'_>,
) -> Vec<PoolsAnnotationEntry> {
    if let Some(made) = input.auto_pools {
        return made.to_vec();
    }
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
