//! The rules pools and subnets share: subnet, `ips`, `excludeIPs`, gateway, routes.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use super::Errors;
use crate::model::PoolRoute;
use crate::range::{IpFamily, IpRange, IpSet};
use crate::types::Route;

/// The checked parts pools and subnets share.
pub(super) struct Common {
    pub(super) family: IpFamily,
    pub(super) subnet: IpNet,
    pub(super) ips: IpSet,
    pub(super) exclude: IpSet,
    pub(super) gateway: Option<IpAddr>,
    pub(super) routes: Vec<PoolRoute>,
}

/// Rules shared by pools and subnets. Pushes errors; returns the parts when the subnet parsed.
pub(super) fn check_common(
    errs: &mut Errors,
    ip_version: Option<IpFamily>,
    subnet: &str,
    ips: &[String],
    exclude_ips: &[String],
    gateway: Option<&str>,
    routes: &[Route],
) -> Option<Common> {
    let (net, family) = check_subnet(errs, ip_version, subnet)?;
    let ip_set = check_ranges(errs, "spec.ips", ips, net, family);
    let exclude = check_ranges(errs, "spec.excludeIPs", exclude_ips, net, family);
    let gw = gateway.and_then(|g| check_gateway(errs, g, net, &ip_set, &exclude));
    let out_routes = check_routes(errs, routes, net, family);
    Some(Common {
        family,
        subnet: net,
        ips: ip_set,
        exclude,
        gateway: gw,
        routes: out_routes,
    })
}

/// `spec.subnet` (required, a canonical CIDR) and `spec.ipVersion` (matches it): the subnet,
/// truncated, and its family; `None` when there is no subnet to check the rest against.
fn check_subnet(
    errs: &mut Errors,
    ip_version: Option<IpFamily>,
    subnet: &str,
) -> Option<(IpNet, IpFamily)> {
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
    Some((net, family))
}

/// `ips` or `excludeIPs` entries: each a range of the family inside the subnet.
fn check_ranges(
    errs: &mut Errors,
    field: &str,
    list: &[String],
    net: IpNet,
    family: IpFamily,
) -> IpSet {
    let subnet_range = IpRange::of_net(&net);
    {
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
    }
}

/// `spec.gateway`: an address inside the subnet, excluded when `ips` lists it.
fn check_gateway(
    errs: &mut Errors,
    g: &str,
    net: IpNet,
    ip_set: &IpSet,
    exclude: &IpSet,
) -> Option<IpAddr> {
    match g.parse::<IpAddr>() {
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
    }
}

/// `spec.routes`: non-default destinations of the family, each once, via a gateway in the subnet.
fn check_routes(
    errs: &mut Errors,
    routes: &[Route],
    net: IpNet,
    family: IpFamily,
) -> Vec<PoolRoute> {
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
    out_routes
}
