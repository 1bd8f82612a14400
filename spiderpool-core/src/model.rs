//! The checked form of pools, subnets and reserved IPs that selection and allocation work on
//! ([`Pool`], [`Subnet`], [`PoolSet`]). Built by [`crate::validate`]; nothing here checks anything.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::range::{Families, IpFamily, IpRange, IpSet};
use crate::selector::LabelSelector;

/// A route after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRoute {
    /// Destination.
    pub dst: IpNet,
    /// Next hop.
    pub gw: IpAddr,
}

/// A validated SpiderIPPool: what selection and allocation read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Name.
    pub name: String,
    /// IP version.
    pub family: IpFamily,
    /// Subnet.
    pub subnet: IpNet,
    /// `ips` merged.
    pub ips: IpSet,
    /// `excludeIPs` merged.
    pub exclude: IpSet,
    /// Gateway (own, or inherited from the SpiderSubnet of the same subnet).
    pub gateway: Option<IpAddr>,
    /// Routes (own, or inherited).
    pub routes: Vec<PoolRoute>,
    /// VLAN.
    pub vlan: Option<i64>,
    /// `nodeAffinity`.
    pub node_affinity: Option<LabelSelector>,
    /// `nodeName`.
    pub node_name: Vec<String>,
    /// `namespaceAffinity`.
    pub namespace_affinity: Option<LabelSelector>,
    /// `namespaceName`.
    pub namespace_name: Vec<String>,
    /// `podAffinity`.
    pub pod_affinity: Option<LabelSelector>,
    /// `multusName`.
    pub multus_name: Vec<String>,
    /// `default`.
    pub default: bool,
    /// `disable`.
    pub disable: bool,
    /// Has a deletion timestamp.
    pub terminating: bool,
}

impl Pool {
    /// `ips` minus `excludeIPs`: Spiderpool's `totalIPCount` counts these.
    pub fn total(&self) -> IpSet {
        self.ips.subtract(&self.exclude)
    }

    /// What may actually be handed out: `ips` minus `excludeIPs`, reserved IPs and the gateway.
    pub fn allocatable(&self, reserved: &IpSet) -> IpSet {
        let mut out = self.total().subtract(reserved);
        if let Some(gw) = self.gateway {
            out = out.subtract(&IpSet::from_ranges(self.family, [IpRange::single(gw)]));
        }
        out
    }
}

/// A validated SpiderSubnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subnet {
    /// Name.
    pub name: String,
    /// IP version.
    pub family: IpFamily,
    /// CIDR.
    pub subnet: IpNet,
    /// `ips` minus `excludeIPs`.
    pub total: IpSet,
    /// Gateway.
    pub gateway: Option<IpAddr>,
    /// Routes.
    pub routes: Vec<PoolRoute>,
}

/// The checked objects of a cluster (or a manifest set): what the engine allocates from.
#[derive(Debug, Clone)]
pub struct PoolSet {
    /// Pools by name.
    pub pools: BTreeMap<String, Pool>,
    /// Subnets by name.
    pub subnets: BTreeMap<String, Subnet>,
    /// Reserved IPs, IPv4.
    pub reserved_v4: IpSet,
    /// Reserved IPs, IPv6.
    pub reserved_v6: IpSet,
}

impl Default for PoolSet {
    fn default() -> Self {
        PoolSet {
            pools: BTreeMap::new(),
            subnets: BTreeMap::new(),
            reserved_v4: IpSet::empty(IpFamily::V4),
            reserved_v6: IpSet::empty(IpFamily::V6),
        }
    }
}

impl PoolSet {
    /// Reserved IPs of one family.
    pub fn reserved(&self, family: IpFamily) -> &IpSet {
        match family {
            IpFamily::V4 => &self.reserved_v4,
            IpFamily::V6 => &self.reserved_v6,
        }
    }

    /// The families served by cluster default pools (`spec.default: true`), or `None` when no pool
    /// is a default: a dual-stack cluster's defaults give both.
    pub fn default_families(&self) -> Option<Families> {
        let has = |f: IpFamily| self.pools.values().any(|p| p.default && p.family == f);
        let (ipv4, ipv6) = (has(IpFamily::V4), has(IpFamily::V6));
        (ipv4 || ipv6).then_some(Families { ipv4, ipv6 })
    }
}

/// The family of a spec: its `ipVersion`, else its subnet's.
fn spec_family(ip_version: Option<IpFamily>, subnet: &str) -> Option<IpFamily> {
    ip_version.or_else(|| {
        let a: IpAddr = subnet.split('/').next()?.parse().ok()?;
        Some(IpFamily::of(&a))
    })
}

/// `ips` minus `excludeIPs` of a spec, when they parse: the one address-set function for specs
/// not (yet) validated (the webhook, auto-pools, the reconcile).
fn spec_addresses(family: Option<IpFamily>, ips: &[String], exclude: &[String]) -> Option<IpSet> {
    let family = family?;
    let ips = IpSet::parse(family, ips).ok()?;
    let ex = IpSet::parse(family, exclude).ok()?;
    Some(ips.subtract(&ex))
}

impl crate::types::IpPoolSpec {
    /// The pool's family: `ipVersion`, else its subnet's.
    pub fn family(&self) -> Option<IpFamily> {
        spec_family(self.ip_version, &self.subnet)
    }

    /// The addresses the pool serves (`ips` minus `excludeIPs`), when its spec parses.
    pub fn addresses(&self) -> Option<IpSet> {
        spec_addresses(self.family(), &self.ips, &self.exclude_ips)
    }
}

impl crate::types::SubnetSpec {
    /// The subnet's family: `ipVersion`, else its CIDR's.
    pub fn family(&self) -> Option<IpFamily> {
        spec_family(self.ip_version, &self.subnet)
    }

    /// The subnet's addresses (`ips` minus `excludeIPs`), when its spec parses.
    pub fn addresses(&self) -> Option<IpSet> {
        spec_addresses(self.family(), &self.ips, &self.exclude_ips)
    }
}
