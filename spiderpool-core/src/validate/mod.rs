//! Validation with Spiderpool's rules and messages, for one object and across a set of objects:
//! builds the checked form ([`crate::model`]) from the objects ([`crate::types`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Pool, PoolSet, Subnet};
use crate::range::{IpFamily, IpRange, IpSet};
use crate::selector::LabelSelector;
use crate::types::{Object, ObjectRef, SpiderIpPool, SpiderReservedIp, SpiderSubnet};

mod common;
mod usable;
pub use usable::{usable, LeftOut};
#[cfg(test)]
mod tests;

use common::{check_common, Common};

/// One problem with one field of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// The object with the problem.
    pub object: ObjectRef,
    /// Another object the problem involves (the pool it overlaps, the subnet it must fit), so a
    /// caller checking one object finds the problems its change causes for others.
    pub related: Option<ObjectRef>,
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

impl Pool {
    /// Checks and converts a SpiderIPPool.
    pub fn from_spec(obj: &SpiderIpPool) -> Result<Pool, Vec<ValidationError>> {
        let mut errs = Errors::new(ObjectRef::pool(&obj.metadata.name));
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

impl Subnet {
    /// Checks and converts a SpiderSubnet.
    pub fn from_spec(obj: &SpiderSubnet) -> Result<Subnet, Vec<ValidationError>> {
        let mut errs = Errors::new(ObjectRef::subnet(&obj.metadata.name));
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
    let mut errs = Errors::new(ObjectRef::reserved_ip(&obj.metadata.name));
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

struct Errors {
    object: ObjectRef,
    errors: Vec<ValidationError>,
}

impl Errors {
    fn new(object: ObjectRef) -> Self {
        Errors {
            object,
            errors: Vec::new(),
        }
    }
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ValidationError {
            object: self.object.clone(),
            related: None,
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

impl PoolSet {
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
                                object: ObjectRef::pool(&pool.name),
                                related: None,
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
        let mut push = |object: ObjectRef, net: &IpNet, total: &IpSet| {
            for (ip, what) in edges(net, total) {
                out.push(ValidationError {
                    object: object.clone(),
                    related: None,
                    field: "spec.ips".into(),
                    message: format!(
                        "includes {ip}, the {what} address of {net}: it will be handed out to a pod; add it to spec.excludeIPs unless your network really uses it"
                    ),
                });
            }
        };
        for p in self.pools.values() {
            push(ObjectRef::pool(&p.name), &p.subnet, &p.total());
        }
        for sub in self.subnets.values() {
            push(ObjectRef::subnet(&sub.name), &sub.subnet, &sub.total);
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
                        object: ObjectRef::pool(&pool.name),
                        related: Some(ObjectRef::subnet(&sub.name)),
                        field: "spec.subnet".into(),
                        message: format!(
                            "subnet {} overlaps SpiderSubnet {} ({}) without being identical: a pool in that range must use subnet {}",
                            pool.subnet, sub.name, sub.subnet, sub.subnet
                        ),
                    }
                } else {
                    ValidationError {
                        object: ObjectRef::subnet(&sub.name),
                        related: Some(ObjectRef::pool(&pool.name)),
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
                        object: ObjectRef::pool(&b.name),
                        related: Some(ObjectRef::pool(&a.name)),
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
                        object: ObjectRef::pool(&b.name),
                        related: Some(ObjectRef::pool(&a.name)),
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
                        object: ObjectRef::subnet(&b.name),
                        related: Some(ObjectRef::subnet(&a.name)),
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
                        object: ObjectRef::pool(&pool.name),
                        related: Some(ObjectRef::subnet(&sub.name)),
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
    let object = ObjectRef::pool(&pool.name);
    let mut errors = Vec::new();
    if pool.family != old.family {
        errors.push(ValidationError {
            object: object.clone(),
            related: None,
            field: "spec.ipVersion".into(),
            message: "cannot be changed".into(),
        });
    }
    if pool.subnet != old.subnet {
        errors.push(ValidationError {
            object: object.clone(),
            related: None,
            field: "spec.subnet".into(),
            message: format!("cannot be changed (was {})", old.subnet),
        });
    }
    let lost = in_use.subtract(&pool.total());
    if !lost.is_empty() {
        errors.push(ValidationError {
            object,
            related: None,
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
pub fn validate_delete(pool: &Pool, allocated: usize) -> Result<(), Box<ValidationError>> {
    if allocated > 0 {
        return Err(Box::new(ValidationError {
            object: ObjectRef::pool(&pool.name),
            related: None,
            field: "status.allocatedIPs".into(),
            message: format!("{allocated} IPs are still allocated: cannot delete the pool"),
        }));
    }
    Ok(())
}
