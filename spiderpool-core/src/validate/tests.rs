//! Unit tests of the validation rules.

use super::*;
use crate::types::{IpPoolSpec, Route};

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
    assert_eq!(errs[0].object.to_string(), "SpiderSubnet/s");
    assert_eq!(
        errs[0].message,
        "subnet 10.6.0.0/16 overlaps subnet 10.6.0.0/24 of SpiderIPPool p without being identical: a SpiderSubnet must have exactly the subnet of the pools it holds"
    );
    // The subnet exists first: the pool is refused, naming the subnet.
    let errs = PoolSet::build(&[Object::Subnet(s), Object::IpPool(p)]).expect_err("overlap");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].object.to_string(), "SpiderIPPool/p");
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
