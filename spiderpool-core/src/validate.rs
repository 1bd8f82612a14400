//! Validation with Spiderpool's rules and messages, for one object and across a set of objects,
//! and the checked form ([`Pool`]) that selection and allocation work on.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::range::{IpFamily, IpRange, IpSet};
use crate::selector::LabelSelector;
use crate::types::{Object, Route, SpiderIpPool, SpiderReservedIp, SpiderSubnet};

/// One problem with one field of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// `Kind/name`.
    pub object: String,
    /// JSON path of the field, e.g. `spec.ips[1]`.
    pub field: String,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

impl std::error::Error for ValidationError {}

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

    /// Checks and converts a SpiderIPPool.
    pub fn from_spec(obj: &SpiderIpPool) -> Result<Pool, Vec<ValidationError>> {
        let mut errs = Errors::new(format!("SpiderIPPool/{}", obj.metadata.name));
        let s = &obj.spec;
        check_name(&mut errs, &obj.metadata.name);
        let common = check_common(
            &mut errs,
            s.ip_version,
            &s.subnet,
            &s.ips,
            &s.exclude_ips,
            s.gateway.as_deref(),
            &s.routes,
        );
        if let Some(pa) = &s.pod_affinity {
            if pa.is_empty() {
                errs.push(
                    "spec.podAffinity",
                    "must not be empty: remove it, or give matchLabels or matchExpressions",
                );
            }
        }
        for (field, sel) in [
            ("spec.podAffinity", &s.pod_affinity),
            ("spec.nodeAffinity", &s.node_affinity),
            ("spec.namespaceAffinity", &s.namespace_affinity),
        ] {
            if let Some(Err(e)) = sel.as_ref().map(LabelSelector::validate) {
                errs.push(field, e.to_string());
            }
        }
        for (i, m) in s.multus_name.iter().enumerate() {
            let parts: Vec<&str> = m.split('/').collect();
            if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
                errs.push(
                    format!("spec.multusName[{i}]"),
                    format!("'{m}' must be 'namespace/name' or 'name'"),
                );
            }
        }
        let Common {
            family,
            subnet,
            ips,
            exclude,
            gateway,
            routes,
        } = match (errs.finish(), common) {
            (Ok(()), Some(c)) => c,
            (Err(e), _) => return Err(e),
            (Ok(()), None) => return Err(Vec::new()),
        };
        Ok(Pool {
            name: obj.metadata.name.clone(),
            family,
            subnet,
            ips,
            exclude,
            gateway,
            routes,
            vlan: s.vlan,
            node_affinity: s.node_affinity.clone(),
            node_name: s.node_name.clone(),
            namespace_affinity: s.namespace_affinity.clone(),
            namespace_name: s.namespace_name.clone(),
            pod_affinity: s.pod_affinity.clone(),
            multus_name: s.multus_name.clone(),
            default: s.default.unwrap_or(false),
            disable: s.disable.unwrap_or(false),
            terminating: obj.metadata.deletion_timestamp.is_some(),
        })
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

impl Subnet {
    /// Checks and converts a SpiderSubnet.
    pub fn from_spec(obj: &SpiderSubnet) -> Result<Subnet, Vec<ValidationError>> {
        let mut errs = Errors::new(format!("SpiderSubnet/{}", obj.metadata.name));
        check_name(&mut errs, &obj.metadata.name);
        let s = &obj.spec;
        let common = check_common(
            &mut errs,
            s.ip_version,
            &s.subnet,
            &s.ips,
            &s.exclude_ips,
            s.gateway.as_deref(),
            &s.routes,
        );
        errs.finish()?;
        let Common {
            family,
            subnet,
            ips,
            exclude,
            gateway,
            routes,
        } = common.ok_or_else(Vec::new)?;
        Ok(Subnet {
            name: obj.metadata.name.clone(),
            family,
            subnet,
            total: ips.subtract(&exclude),
            gateway,
            routes,
        })
    }
}

/// Checks a SpiderReservedIP and returns its addresses.
pub fn reserved_ips(obj: &SpiderReservedIp) -> Result<IpSet, Vec<ValidationError>> {
    let mut errs = Errors::new(format!("SpiderReservedIP/{}", obj.metadata.name));
    let family = obj.spec.ip_version.or_else(|| {
        obj.spec
            .ips
            .first()
            .and_then(|e| e.parse::<IpRange>().ok())
            .map(|r| r.family())
    });
    let Some(family) = family else {
        errs.push(
            "spec.ipVersion",
            "cannot infer the IP version: set ipVersion or give at least one IP",
        );
        return Err(errs.errors);
    };
    let mut ranges = Vec::new();
    for (i, e) in obj.spec.ips.iter().enumerate() {
        match IpRange::parse_family(e, family) {
            Ok(r) => ranges.push(r),
            Err(err) => errs.push(format!("spec.ips[{i}]"), err.to_string()),
        }
    }
    errs.finish()?;
    Ok(IpSet::from_ranges(family, ranges))
}

/// Kubernetes object names (DNS-1123 subdomain): the API server enforces it, and store keys rely
/// on names holding no `/`.
fn check_name(errs: &mut Errors, name: &str) {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let ends_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() {
        errs.push("metadata.name", "must not be empty");
    } else if name.len() > 253
        || !name.chars().all(ok_char)
        || !ends_ok(name.chars().next())
        || !ends_ok(name.chars().last())
    {
        errs.push(
            "metadata.name",
            format!(
                "'{name}' is not a valid name: use lowercase letters, digits, '-' and '.', start and end with a letter or digit, at most 253 characters"
            ),
        );
    }
}

/// The checked parts pools and subnets share.
struct Common {
    family: IpFamily,
    subnet: IpNet,
    ips: IpSet,
    exclude: IpSet,
    gateway: Option<IpAddr>,
    routes: Vec<PoolRoute>,
}

/// Rules shared by pools and subnets. Pushes errors; returns the parts when the subnet parsed.
fn check_common(
    errs: &mut Errors,
    ip_version: Option<IpFamily>,
    subnet: &str,
    ips: &[String],
    exclude_ips: &[String],
    gateway: Option<&str>,
    routes: &[Route],
) -> Option<Common> {
    if subnet.is_empty() {
        errs.push("spec.subnet", "is required (a CIDR such as 10.6.0.0/16)");
        return None;
    }
    let net = match IpNet::from_str(subnet) {
        Ok(n) => n,
        Err(_) => {
            errs.push(
                "spec.subnet",
                format!("invalid subnet '{subnet}': want a CIDR such as 10.6.0.0/16"),
            );
            return None;
        }
    };
    if net.trunc() != net {
        errs.push(
            "spec.subnet",
            format!(
                "unformatted subnet {subnet}, please change it to {}",
                net.trunc()
            ),
        );
    }
    let net = net.trunc();
    let family = IpFamily::of(&net.network());
    if let Some(v) = ip_version {
        if v != family {
            errs.push(
                "spec.ipVersion",
                format!(
                    "ipVersion {} does not match subnet {net} ({family})",
                    v.version()
                ),
            );
        }
    }
    let subnet_range = IpRange::of_net(&net);
    let mut parse_list = |field: &str, list: &[String]| {
        let mut ranges = Vec::new();
        for (i, e) in list.iter().enumerate() {
            match IpRange::parse_family(e, family) {
                Ok(r) if r.start() < subnet_range.start() || r.end() > subnet_range.end() => {
                    errs.push(
                        format!("{field}[{i}]"),
                        format!("'{e}' is not inside subnet {net}"),
                    );
                }
                Ok(r) => ranges.push(r),
                Err(err) => errs.push(format!("{field}[{i}]"), err.to_string()),
            }
        }
        IpSet::from_ranges(family, ranges)
    };
    let ip_set = parse_list("spec.ips", ips);
    let exclude = parse_list("spec.excludeIPs", exclude_ips);
    let gw = gateway.and_then(|g| match g.parse::<IpAddr>() {
        Ok(ip) if !net.contains(&ip) => {
            errs.push(
                "spec.gateway",
                format!("gateway {ip} is not inside subnet {net}"),
            );
            None
        }
        Ok(ip) => {
            if ip_set.contains(ip) && !exclude.contains(ip) {
                errs.push(
                    "spec.gateway",
                    format!("gateway {ip} is inside spec.ips: add it to spec.excludeIPs too"),
                );
            }
            Some(ip)
        }
        Err(_) => {
            errs.push(
                "spec.gateway",
                format!("invalid gateway '{g}': not an IP address"),
            );
            None
        }
    });
    let mut out_routes = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, r) in routes.iter().enumerate() {
        let field = format!("spec.routes[{i}]");
        let dst = match IpNet::from_str(&r.dst) {
            Ok(d) if IpFamily::of(&d.network()) != family => {
                errs.push(
                    format!("{field}.dst"),
                    format!("route dst {} is not {family}", r.dst),
                );
                continue;
            }
            Ok(d) if d.prefix_len() == 0 => {
                errs.push(
                    format!("{field}.dst"),
                    format!(
                        "route dst {} is a default route: set spec.gateway instead",
                        r.dst
                    ),
                );
                continue;
            }
            Ok(d) => d.trunc(),
            Err(_) => {
                errs.push(
                    format!("{field}.dst"),
                    format!("invalid route dst '{}': want a CIDR", r.dst),
                );
                continue;
            }
        };
        if !seen.insert(dst) {
            errs.push(format!("{field}.dst"), format!("duplicate route dst {dst}"));
            continue;
        }
        match r.gw.parse::<IpAddr>() {
            Ok(g) if net.contains(&g) => out_routes.push(PoolRoute { dst, gw: g }),
            Ok(g) => errs.push(
                format!("{field}.gw"),
                format!("route gw {g} is not inside subnet {net}"),
            ),
            Err(_) => errs.push(
                format!("{field}.gw"),
                format!("invalid route gw '{}': not an IP address", r.gw),
            ),
        }
    }
    Some(Common {
        family,
        subnet: net,
        ips: ip_set,
        exclude,
        gateway: gw,
        routes: out_routes,
    })
}

struct Errors {
    object: String,
    errors: Vec<ValidationError>,
}

impl Errors {
    fn new(object: String) -> Self {
        Errors {
            object,
            errors: Vec::new(),
        }
    }
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ValidationError {
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        });
    }
    fn finish(&self) -> Result<(), Vec<ValidationError>> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors.clone())
        }
    }
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

    /// Checks every object on its own and the set as a whole; on success returns the set, with
    /// gateways and routes inherited from subnets. Objects of other kinds are ignored.
    pub fn build<'a, I: IntoIterator<Item = &'a Object>>(
        objects: I,
    ) -> Result<PoolSet, Vec<ValidationError>> {
        let mut errors = Vec::new();
        let mut set = PoolSet::default();
        let mut reserved = Vec::new();
        // Position of each pool and subnet in the input: earlier objects exist before later ones.
        let mut order: BTreeMap<(bool, String), usize> = BTreeMap::new();
        for (pos, obj) in objects.into_iter().enumerate() {
            match obj {
                Object::IpPool(p) => match Pool::from_spec(p) {
                    Ok(pool) => {
                        order.entry((true, pool.name.clone())).or_insert(pos);
                        if set.pools.contains_key(&pool.name) {
                            errors.push(ValidationError {
                                object: format!("SpiderIPPool/{}", pool.name),
                                field: "metadata.name".into(),
                                message: "defined more than once".into(),
                            });
                        } else {
                            set.pools.insert(pool.name.clone(), pool);
                        }
                    }
                    Err(e) => errors.extend(e),
                },
                Object::Subnet(s) => match Subnet::from_spec(s) {
                    Ok(sub) => {
                        order.entry((false, sub.name.clone())).or_insert(pos);
                        set.subnets.insert(sub.name.clone(), sub);
                    }
                    Err(e) => errors.extend(e),
                },
                Object::ReservedIp(r) => match reserved_ips(r) {
                    Ok(ips) => reserved.push(ips),
                    Err(e) => errors.extend(e),
                },
                _ => {}
            }
        }
        for ips in reserved {
            match ips.family() {
                IpFamily::V4 => set.reserved_v4 = set.reserved_v4.union(&ips),
                IpFamily::V6 => set.reserved_v6 = set.reserved_v6.union(&ips),
            }
        }
        errors.extend(set.cross_check());
        errors.extend(set.subnets_fit_pools(|pool, subnet| {
            order.get(&(true, pool.to_string())) > order.get(&(false, subnet.to_string()))
        }));
        if !errors.is_empty() {
            return Err(errors);
        }
        set.inherit_from_subnets();
        Ok(set)
    }

    /// The families served by cluster default pools (`spec.default: true`), or `None` when no pool
    /// is a default: a dual-stack cluster's defaults give both.
    pub fn default_families(&self) -> Option<crate::select::Families> {
        let has = |f: IpFamily| self.pools.values().any(|p| p.default && p.family == f);
        let (ipv4, ipv6) = (has(IpFamily::V4), has(IpFamily::V6));
        (ipv4 || ipv6).then_some(crate::select::Families { ipv4, ipv6 })
    }

    /// Things that are allowed but probably not meant, one [`ValidationError`]-shaped line each:
    /// today, IPv4 network and broadcast addresses listed in `ips` of a subnet shorter than /31.
    /// They are handed out, as Spiderpool does (some underlays route them), so this is a warning.
    pub fn warnings(&self) -> Vec<ValidationError> {
        let mut out = Vec::new();
        let edges = |net: &IpNet, total: &IpSet| -> Vec<(IpAddr, &'static str)> {
            if net.network().is_ipv6() || net.prefix_len() >= 31 {
                return Vec::new();
            }
            [(net.network(), "network"), (net.broadcast(), "broadcast")]
                .into_iter()
                .filter(|(ip, _)| total.contains(*ip))
                .collect()
        };
        let mut push = |object: String, net: &IpNet, total: &IpSet| {
            for (ip, what) in edges(net, total) {
                out.push(ValidationError {
                    object: object.clone(),
                    field: "spec.ips".into(),
                    message: format!(
                        "includes {ip}, the {what} address of {net}: it will be handed out to a pod; add it to spec.excludeIPs unless your network really uses it"
                    ),
                });
            }
        };
        for p in self.pools.values() {
            push(format!("SpiderIPPool/{}", p.name), &p.subnet, &p.total());
        }
        for sub in self.subnets.values() {
            push(
                format!("SpiderSubnet/{}", sub.name),
                &sub.subnet,
                &sub.total,
            );
        }
        out
    }

    /// A pool belongs to the SpiderSubnet with exactly its CIDR: a subnet and a pool whose CIDRs
    /// overlap without being identical are refused. The one created later is refused, naming the
    /// other (`pool_is_later(pool, subnet)` says which came later).
    pub fn subnets_fit_pools(
        &self,
        pool_is_later: impl Fn(&str, &str) -> bool,
    ) -> Vec<ValidationError> {
        let mut errors = Vec::new();
        for sub in self.subnets.values() {
            for pool in self.pools.values() {
                let (rs, rp) = (IpRange::of_net(&sub.subnet), IpRange::of_net(&pool.subnet));
                let overlap =
                    sub.family == pool.family && rs.start() <= rp.end() && rp.start() <= rs.end();
                if !overlap || sub.subnet == pool.subnet {
                    continue;
                }
                errors.push(if pool_is_later(&pool.name, &sub.name) {
                    ValidationError {
                        object: format!("SpiderIPPool/{}", pool.name),
                        field: "spec.subnet".into(),
                        message: format!(
                            "subnet {} overlaps SpiderSubnet {} ({}) without being identical: a pool in that range must use subnet {}",
                            pool.subnet, sub.name, sub.subnet, sub.subnet
                        ),
                    }
                } else {
                    ValidationError {
                        object: format!("SpiderSubnet/{}", sub.name),
                        field: "spec.subnet".into(),
                        message: format!(
                            "subnet {} overlaps subnet {} of SpiderIPPool {} without being identical: a SpiderSubnet must have exactly the subnet of the pools it holds",
                            sub.subnet, pool.subnet, pool.name
                        ),
                    }
                });
            }
        }
        errors
    }

    /// Rules across objects: pool subnets overlap only when identical, and then their effective
    /// ranges must be disjoint; subnets must not overlap; a pool inside a SpiderSubnet stays inside
    /// the subnet's addresses.
    pub fn cross_check(&self) -> Vec<ValidationError> {
        let mut errors = Vec::new();
        let pools: Vec<&Pool> = self.pools.values().collect();
        for (i, a) in pools.iter().enumerate() {
            for b in &pools[i + 1..] {
                if a.family != b.family {
                    continue;
                }
                let (ra, rb) = (IpRange::of_net(&a.subnet), IpRange::of_net(&b.subnet));
                let nets_overlap = ra.start() <= rb.end() && rb.start() <= ra.end();
                if !nets_overlap {
                    continue;
                }
                if a.subnet != b.subnet {
                    errors.push(ValidationError {
                        object: format!("SpiderIPPool/{}", b.name),
                        field: "spec.subnet".into(),
                        message: format!(
                            "subnet {} overlaps subnet {} of SpiderIPPool {}: pools may share a subnet only when it is identical",
                            b.subnet, a.subnet, a.name
                        ),
                    });
                    continue;
                }
                let shared = a.total().intersect(&b.total());
                if !shared.is_empty() {
                    errors.push(ValidationError {
                        object: format!("SpiderIPPool/{}", b.name),
                        field: "spec.ips".into(),
                        message: format!(
                            "IPs {} are also in SpiderIPPool {} (same subnet {}): pools must not share IPs",
                            shared, a.name, a.subnet
                        ),
                    });
                }
            }
        }
        let subnets: Vec<&Subnet> = self.subnets.values().collect();
        for (i, a) in subnets.iter().enumerate() {
            for b in &subnets[i + 1..] {
                let (ra, rb) = (IpRange::of_net(&a.subnet), IpRange::of_net(&b.subnet));
                if a.family == b.family && ra.start() <= rb.end() && rb.start() <= ra.end() {
                    errors.push(ValidationError {
                        object: format!("SpiderSubnet/{}", b.name),
                        field: "spec.subnet".into(),
                        message: format!(
                            "subnet {} overlaps subnet {} of SpiderSubnet {}",
                            b.subnet, a.subnet, a.name
                        ),
                    });
                }
            }
        }
        for pool in &pools {
            if let Some(sub) = subnets.iter().find(|s| s.subnet == pool.subnet) {
                let outside = pool.total().subtract(&sub.total);
                if !outside.is_empty() {
                    errors.push(ValidationError {
                        object: format!("SpiderIPPool/{}", pool.name),
                        field: "spec.ips".into(),
                        message: format!(
                            "IPs {outside} are not in SpiderSubnet {} ({}): add them to the subnet first",
                            sub.name, sub.subnet
                        ),
                    });
                }
            }
        }
        errors
    }

    fn inherit_from_subnets(&mut self) {
        for pool in self.pools.values_mut() {
            if let Some(sub) = self.subnets.values().find(|s| s.subnet == pool.subnet) {
                if pool.gateway.is_none() {
                    pool.gateway = sub.gateway;
                }
                if pool.routes.is_empty() {
                    pool.routes = sub.routes.clone();
                }
            }
        }
    }
}

/// Rules for changing a pool that is in use: `ipVersion` and `subnet` are fixed, and no address in
/// use may leave the pool (removed from `ips` or added to `excludeIPs`).
pub fn validate_update(
    old: &Pool,
    new: &SpiderIpPool,
    in_use: &IpSet,
) -> Result<Pool, Vec<ValidationError>> {
    let pool = Pool::from_spec(new)?;
    let object = format!("SpiderIPPool/{}", pool.name);
    let mut errors = Vec::new();
    if pool.family != old.family {
        errors.push(ValidationError {
            object: object.clone(),
            field: "spec.ipVersion".into(),
            message: "cannot be changed".into(),
        });
    }
    if pool.subnet != old.subnet {
        errors.push(ValidationError {
            object: object.clone(),
            field: "spec.subnet".into(),
            message: format!("cannot be changed (was {})", old.subnet),
        });
    }
    let lost = in_use.subtract(&pool.total());
    if !lost.is_empty() {
        errors.push(ValidationError {
            object,
            field: "spec.ips".into(),
            message: format!(
                "IPs {lost} are allocated: release them before removing or excluding them"
            ),
        });
    }
    if errors.is_empty() {
        Ok(pool)
    } else {
        Err(errors)
    }
}

/// Checks that a pool may be deleted: not while it holds allocations.
pub fn validate_delete(pool: &Pool, allocated: usize) -> Result<(), ValidationError> {
    if allocated > 0 {
        return Err(ValidationError {
            object: format!("SpiderIPPool/{}", pool.name),
            field: "status.allocatedIPs".into(),
            message: format!("{allocated} IPs are still allocated: cannot delete the pool"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::IpPoolSpec;

    fn pool(name: &str, subnet: &str, ips: &[&str]) -> SpiderIpPool {
        SpiderIpPool {
            metadata: crate::types::ObjectMeta {
                name: name.into(),
                ..Default::default()
            },
            spec: IpPoolSpec {
                subnet: subnet.into(),
                ips: ips.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn messages(r: Result<Pool, Vec<ValidationError>>) -> Vec<String> {
        r.err()
            .unwrap_or_default()
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn unformatted_subnet_message_matches_spiderpool() {
        let m = messages(Pool::from_spec(&pool("p", "10.6.168.1/24", &[])));
        assert_eq!(
            m,
            vec!["SpiderIPPool/p: spec.subnet: unformatted subnet 10.6.168.1/24, please change it to 10.6.168.0/24"]
        );
    }

    #[test]
    fn ips_outside_subnet_and_bad_ranges_are_named() {
        let m = messages(Pool::from_spec(&pool(
            "p",
            "10.6.0.0/16",
            &["10.7.0.1", "10.6.0.9-10.6.0.1", "fd00::1"],
        )));
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(m[0].contains("spec.ips[0]") && m[0].contains("not inside subnet 10.6.0.0/16"));
        assert!(m[1].contains("spec.ips[1]") && m[1].contains("start must not be greater"));
        assert!(m[2].contains("spec.ips[2]") && m[2].contains("is not IPv4"));
    }

    #[test]
    fn gateway_rules() {
        let mut p = pool("p", "10.6.0.0/16", &["10.6.0.1-10.6.0.10"]);
        p.spec.gateway = Some("10.6.0.1".into());
        let m = messages(Pool::from_spec(&p));
        assert!(m[0].contains("add it to spec.excludeIPs"), "{m:?}");
        p.spec.exclude_ips = vec!["10.6.0.1".into()];
        let ok = Pool::from_spec(&p).expect("valid once excluded");
        assert_eq!(ok.total().count(), 9);
        p.spec.gateway = Some("10.7.0.1".into());
        assert!(messages(Pool::from_spec(&p))[0].contains("not inside subnet"));
    }

    #[test]
    fn route_rules() {
        let mut p = pool("p", "10.6.0.0/16", &["10.6.0.10"]);
        p.spec.routes = vec![
            Route {
                dst: "0.0.0.0/0".into(),
                gw: "10.6.0.1".into(),
            },
            Route {
                dst: "10.8.0.0/16".into(),
                gw: "10.6.0.1".into(),
            },
            Route {
                dst: "10.8.0.0/16".into(),
                gw: "10.6.0.2".into(),
            },
            Route {
                dst: "10.9.0.0/16".into(),
                gw: "10.9.0.1".into(),
            },
            Route {
                dst: "nope".into(),
                gw: "10.6.0.1".into(),
            },
        ];
        let m = messages(Pool::from_spec(&p));
        assert_eq!(m.len(), 4, "{m:?}");
        assert!(m[0].contains("default route"));
        assert!(m[1].contains("duplicate route dst 10.8.0.0/16"));
        assert!(m[2].contains("routes[3].gw"));
        assert!(m[3].contains("want a CIDR"));
    }

    #[test]
    fn names_must_be_kubernetes_names() {
        for bad in ["", "Pool-A", "a/b", "-a", "a-", "a_b"] {
            let m = messages(Pool::from_spec(&pool(bad, "10.6.0.0/16", &["10.6.0.10"])));
            assert!(
                m.iter().any(|e| e.contains("metadata.name")),
                "{bad:?} accepted: {m:?}"
            );
        }
        assert!(Pool::from_spec(&pool("zone-a.v4", "10.6.0.0/16", &["10.6.0.10"])).is_ok());
    }

    #[test]
    fn empty_pod_affinity_is_refused() {
        let mut p = pool("p", "10.6.0.0/16", &["10.6.0.10"]);
        p.spec.pod_affinity = Some(LabelSelector::default());
        assert!(messages(Pool::from_spec(&p))[0].contains("spec.podAffinity: must not be empty"));
    }

    #[test]
    fn overlapping_pools_across_a_set() {
        let objs = vec![
            Object::IpPool(pool("a", "10.6.0.0/16", &["10.6.0.1-10.6.0.10"])),
            Object::IpPool(pool("b", "10.6.0.0/16", &["10.6.0.11-10.6.0.20"])),
            Object::IpPool(pool("c", "10.6.0.0/16", &["10.6.0.5-10.6.0.12"])),
            Object::IpPool(pool("d", "10.6.1.0/24", &["10.6.1.1"])),
        ];
        let errs = PoolSet::build(&objs).expect_err("overlaps");
        let m: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        // c overlaps a and b; d's /24 overlaps the /16 of a, b and c.
        assert_eq!(m.len(), 5, "{m:?}");
        assert!(m.iter().any(|e| e.contains("SpiderIPPool/c")
            && e.contains("10.6.0.5-10.6.0.10")
            && e.contains("SpiderIPPool a")));
        assert!(m
            .iter()
            .any(|e| e.contains("SpiderIPPool/d") && e.contains("identical")));
    }

    #[test]
    fn excluded_overlap_is_fine_and_subnet_gateway_is_inherited() {
        let mut a = pool("a", "10.6.0.0/16", &["10.6.0.1-10.6.0.10"]);
        a.spec.exclude_ips = vec!["10.6.0.10".into()];
        let b = pool("b", "10.6.0.0/16", &["10.6.0.10-10.6.0.20"]);
        let sub = SpiderSubnet {
            metadata: crate::types::ObjectMeta {
                name: "s".into(),
                ..Default::default()
            },
            spec: crate::types::SubnetSpec {
                subnet: "10.6.0.0/16".into(),
                ips: vec!["10.6.0.1-10.6.0.100".into()],
                gateway: Some("10.6.0.254".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let objs = vec![Object::IpPool(a), Object::IpPool(b), Object::Subnet(sub)];
        let set = PoolSet::build(&objs).expect("valid");
        assert_eq!(
            set.pools["a"].gateway,
            Some("10.6.0.254".parse().expect("ip"))
        );
    }

    fn subnet(name: &str, cidr: &str, ips: &[&str]) -> SpiderSubnet {
        SpiderSubnet {
            metadata: crate::types::ObjectMeta {
                name: name.into(),
                ..Default::default()
            },
            spec: crate::types::SubnetSpec {
                subnet: cidr.into(),
                ips: ips.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_subnet_overlapping_a_pool_without_being_identical_is_refused() {
        let p = pool("p", "10.6.0.0/24", &["10.6.0.1-10.6.0.10"]);
        let s = subnet("s", "10.6.0.0/16", &["10.6.0.1-10.6.0.100"]);
        // The pool exists first: the subnet is refused, naming the pool.
        let errs = PoolSet::build(&[Object::IpPool(p.clone()), Object::Subnet(s.clone())])
            .expect_err("overlap");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].object, "SpiderSubnet/s");
        assert_eq!(
            errs[0].message,
            "subnet 10.6.0.0/16 overlaps subnet 10.6.0.0/24 of SpiderIPPool p without being identical: a SpiderSubnet must have exactly the subnet of the pools it holds"
        );
        // The subnet exists first: the pool is refused, naming the subnet.
        let errs = PoolSet::build(&[Object::Subnet(s), Object::IpPool(p)]).expect_err("overlap");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].object, "SpiderIPPool/p");
        assert!(
            errs[0].message.contains("must use subnet 10.6.0.0/16"),
            "{errs:?}"
        );
        // Identical and disjoint CIDRs are fine.
        let ok = [
            Object::Subnet(subnet("s", "10.6.0.0/24", &["10.6.0.1-10.6.0.100"])),
            Object::IpPool(pool("p", "10.6.0.0/24", &["10.6.0.1-10.6.0.10"])),
            Object::IpPool(pool("q", "10.7.0.0/24", &["10.7.0.1"])),
        ];
        assert!(PoolSet::build(&ok).is_ok());
    }

    #[test]
    fn network_and_broadcast_addresses_are_allowed_with_a_warning() {
        let p = pool("p", "10.6.0.0/24", &["10.6.0.0-10.6.0.255"]);
        let set = PoolSet::build(&[Object::IpPool(p)]).expect("allowed");
        assert!(set.pools["p"]
            .allocatable(&IpSet::empty(IpFamily::V4))
            .contains("10.6.0.0".parse().expect("ip")));
        let w: Vec<String> = set.warnings().iter().map(|w| w.to_string()).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("10.6.0.0, the network address of 10.6.0.0/24"),
            "{w:?}"
        );
        assert!(w[1].contains("10.6.0.255, the broadcast address"), "{w:?}");
        // /31 and /32 have no such addresses; excluded ones draw no warning.
        let mut q = pool("q", "10.7.0.0/31", &["10.7.0.0-10.7.0.1"]);
        let mut r = pool("r", "10.8.0.0/24", &["10.8.0.0-10.8.0.255"]);
        r.spec.exclude_ips = vec!["10.8.0.0".into(), "10.8.0.255".into()];
        q.spec.gateway = None;
        let set = PoolSet::build(&[Object::IpPool(q), Object::IpPool(r)]).expect("valid");
        assert!(set.warnings().is_empty(), "{:?}", set.warnings());
    }

    #[test]
    fn updates_keep_used_ips() {
        let old = Pool::from_spec(&pool("p", "10.6.0.0/16", &["10.6.0.1-10.6.0.10"])).expect("ok");
        let used = IpSet::parse(IpFamily::V4, &["10.6.0.3"]).expect("ok");
        let mut new = pool("p", "10.6.0.0/16", &["10.6.0.1-10.6.0.10"]);
        new.spec.exclude_ips = vec!["10.6.0.3".into()];
        let errs = validate_update(&old, &new, &used).expect_err("in use");
        assert!(errs[0].message.contains("10.6.0.3 are allocated"));
        let moved = pool("p", "10.7.0.0/16", &["10.7.0.3"]);
        let errs = validate_update(&old, &moved, &IpSet::empty(IpFamily::V4)).expect_err("subnet");
        assert_eq!(errs[0].field, "spec.subnet");
        assert!(validate_delete(&old, 1).is_err());
        assert!(validate_delete(&old, 0).is_ok());
    }
}
