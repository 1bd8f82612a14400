//! What the admission webhook decides, without I/O: Spiderpool's mutations of SpiderIPPool,
//! SpiderSubnet and SpiderReservedIP (infer `ipVersion`, merge and sort `ips`/`excludeIPs`, the
//! pool finalizer) and the checks of `spiderctl validate`, applied to one object against the
//! cluster's current objects, plus the update rules (fixed `ipVersion`/`subnet`, no allocated
//! address may leave a pool).

use serde_json::{json, Value};
use spiderpool_core::range::{IpFamily, IpSet};
use spiderpool_core::types::Object;
use spiderpool_core::validate::validate_update;
use spiderpool_core::{Pool, PoolSet};

/// The finalizer Spiderpool puts on pools.
pub const FINALIZER: &str = "spiderpool.spidernet.io";

fn family_of_subnet(subnet: &str) -> Option<IpFamily> {
    let addr = subnet.split('/').next()?.trim();
    addr.parse::<std::net::IpAddr>()
        .ok()
        .map(|a| IpFamily::of(&a))
}

fn family_of_entry(entry: &str) -> Option<IpFamily> {
    let first = entry.split('-').next()?.trim();
    first
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|a| IpFamily::of(&a))
}

/// Merged, sorted form of a list of addresses and ranges, when every entry parses.
fn merged(family: IpFamily, v: &Value) -> Option<Vec<String>> {
    let entries: Vec<&str> = v.as_array()?.iter().filter_map(Value::as_str).collect();
    if entries.is_empty() {
        return None;
    }
    IpSet::parse(family, &entries).ok().map(|s| s.to_strings())
}

/// The JSON patch (RFC 6902 operations) Spiderpool's mutating webhook would apply to `obj` of
/// `kind`. Fields that do not parse are left alone: validation then refuses them with a message.
pub fn mutate(kind: &str, obj: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    let spec = &obj["spec"];
    let family = match spec["ipVersion"].as_i64() {
        Some(4) => Some(IpFamily::V4),
        Some(6) => Some(IpFamily::V6),
        Some(_) => None,
        None => {
            let inferred = match kind {
                "SpiderReservedIP" => spec["ips"]
                    .as_array()
                    .and_then(|a| a.first())
                    .and_then(Value::as_str)
                    .and_then(family_of_entry),
                _ => spec["subnet"].as_str().and_then(family_of_subnet),
            };
            if let Some(f) = inferred {
                ops.push(json!({"op": "add", "path": "/spec/ipVersion", "value": f.version()}));
            }
            inferred
        }
    };
    if let Some(f) = family {
        for field in ["ips", "excludeIPs"] {
            if let Some(m) = merged(f, &spec[field]) {
                if spec[field].as_array().map(|a| a.len()) != Some(m.len())
                    || spec[field]
                        .as_array()
                        .is_some_and(|a| a.iter().zip(&m).any(|(x, y)| x.as_str() != Some(y)))
                {
                    ops.push(json!({"op": "add", "path": format!("/spec/{field}"), "value": m}));
                }
            }
        }
    }
    if kind == "SpiderIPPool" && obj["metadata"]["deletionTimestamp"].is_null() {
        match obj["metadata"]["finalizers"].as_array() {
            None => {
                ops.push(json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}))
            }
            Some(f) if !f.iter().any(|x| x == FINALIZER) => {
                ops.push(json!({"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}))
            }
            Some(_) => {}
        }
    }
    ops
}

/// Checks `new` (of `kind`, named `name`) against the cluster's other objects `cluster` (the old
/// version of `new` excluded), and, for an update of a pool, against `old` and the addresses the
/// pool holds (`in_use`). `Err` carries one line per problem, as `spiderctl validate` prints them.
/// What an agent may write to pools (its role allows `create` and `patch` of every SpiderIPPool,
/// since Kubernetes cannot narrow them by name): an application's auto-pool (carrying
/// [`spiderpool_core::autopool::LABEL_SUBNET`]) made or grown, and on any other pool only its
/// metadata (the finalizer) and an `ipVersion` it did not have. A compromised node cannot
/// rewrite the addresses of pools operators made.
pub fn agent_may(kind: &str, old: Option<&Value>, new: &Value) -> Result<(), String> {
    let auto = |o: &Value| {
        o["metadata"]["labels"]
            .get(spiderpool_core::autopool::LABEL_SUBNET)
            .is_some()
    };
    if kind != "SpiderIPPool" {
        return Err(format!(
            "the spiderpool agent may not write {kind}s (only auto-pools and pool finalizers)"
        ));
    }
    let Some(old) = old else {
        return if auto(new) {
            Ok(())
        } else {
            Err(format!(
                "the spiderpool agent may create only auto-pools (labelled {})",
                spiderpool_core::autopool::LABEL_SUBNET
            ))
        };
    };
    if auto(old) && auto(new) {
        return Ok(());
    }
    let without_version = |o: &Value| {
        let mut spec = o["spec"].clone();
        if let Some(m) = spec.as_object_mut() {
            m.remove("ipVersion");
        }
        spec
    };
    let version_kept =
        old["spec"]["ipVersion"].is_null() || old["spec"]["ipVersion"] == new["spec"]["ipVersion"];
    if without_version(old) == without_version(new) && version_kept && auto(old) == auto(new) {
        Ok(())
    } else {
        Err("the spiderpool agent may change only the finalizer and a missing ipVersion of a pool that is not an auto-pool".into())
    }
}

pub fn validate(
    kind: &str,
    name: &str,
    old: Option<&Value>,
    new: &Value,
    cluster: &[Object],
    in_use: Option<&IpSet>,
) -> Result<(), Vec<String>> {
    // Fixed fields first: a changed subnet makes every address look invalid, which would bury
    // the one message that matters.
    if let (Some(old), "SpiderIPPool" | "SpiderSubnet") = (old, kind) {
        let mut fixed = Vec::new();
        for field in ["subnet", "ipVersion"] {
            let (was, now) = (&old["spec"][field], &new["spec"][field]);
            if !was.is_null() && !now.is_null() && was != now {
                fixed.push(format!(
                    "{kind}/{name}: spec.{field}: cannot be changed (was {was})"
                ));
            }
        }
        if !fixed.is_empty() {
            return Err(fixed);
        }
    }
    let object = Object::from_value(new.clone()).map_err(|e| vec![e.to_string()])?;
    let mut all: Vec<Object> = cluster.to_vec();
    all.push(object.clone());
    let me = object.reference();
    let mut problems: Vec<String> = match PoolSet::build(&all) {
        Ok(_) => Vec::new(),
        Err(errors) => errors
            .into_iter()
            .filter(|e| e.object == me || e.related.as_ref() == Some(&me))
            .map(|e| e.to_string())
            .collect(),
    };
    if let (Some(old), Object::IpPool(new_pool)) = (old, &object) {
        if let Ok(Object::IpPool(old_pool)) = Object::from_value(old.clone()) {
            if let Ok(old_checked) = Pool::from_spec(&old_pool) {
                let empty = IpSet::empty(old_checked.family);
                let used = in_use.unwrap_or(&empty);
                if let Err(errors) = validate_update(&old_checked, new_pool, used) {
                    for e in errors {
                        let line = e.to_string();
                        if !problems.contains(&line) {
                            problems.push(line);
                        }
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_may_grow_auto_pools_and_mark_others_only() {
        let manual = json!({"metadata": {"name": "p"}, "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.0.1"]}});
        let auto = json!({"metadata": {"name": "a", "labels": {"ipam.spidernet.io/owner-spider-subnet": "s"}}, "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.0.2"]}});
        assert!(agent_may("SpiderIPPool", None, &auto).is_ok());
        assert!(agent_may("SpiderIPPool", None, &manual).is_err());
        let mut grown = auto.clone();
        grown["spec"]["ips"] = json!(["10.6.0.2-10.6.0.9"]);
        assert!(agent_may("SpiderIPPool", Some(&auto), &grown).is_ok());
        let mut marked = manual.clone();
        marked["metadata"]["finalizers"] = json!(["spiderpool.spidernet.io"]);
        marked["spec"]["ipVersion"] = json!(4);
        assert!(agent_may("SpiderIPPool", Some(&manual), &marked).is_ok());
        let mut rewritten = manual.clone();
        rewritten["spec"]["ips"] = json!(["10.6.0.1-10.6.0.200"]);
        assert!(agent_may("SpiderIPPool", Some(&manual), &rewritten).is_err());
        let mut relabelled = rewritten.clone();
        relabelled["metadata"]["labels"] = json!({"ipam.spidernet.io/owner-spider-subnet": "s"});
        assert!(
            agent_may("SpiderIPPool", Some(&manual), &relabelled).is_err(),
            "made an auto-pool to rewrite it"
        );
        let mut flipped = marked.clone();
        flipped["spec"]["ipVersion"] = json!(6);
        assert!(agent_may("SpiderIPPool", Some(&marked), &flipped).is_err());
        assert!(agent_may("SpiderSubnet", None, &manual).is_err());
    }

    fn pool(name: &str, subnet: &str, ips: &[&str]) -> Value {
        json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
               "metadata": {"name": name}, "spec": {"subnet": subnet, "ips": ips}})
    }

    #[test]
    fn mutations_are_spiderpools() {
        let p = pool(
            "a",
            "10.6.0.0/16",
            &["10.6.0.20", "10.6.0.10-10.6.0.19", "10.6.0.5"],
        );
        let ops = mutate("SpiderIPPool", &p);
        assert_eq!(
            ops,
            vec![
                json!({"op": "add", "path": "/spec/ipVersion", "value": 4}),
                json!({"op": "add", "path": "/spec/ips", "value": ["10.6.0.5", "10.6.0.10-10.6.0.20"]}),
                json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}),
            ]
        );
        // Already in shape: nothing to do but the finalizer.
        let done = json!({"kind": "SpiderIPPool", "metadata": {"name": "a", "finalizers": [FINALIZER]},
                          "spec": {"ipVersion": 4, "subnet": "10.6.0.0/16", "ips": ["10.6.0.5"]}});
        assert!(mutate("SpiderIPPool", &done).is_empty());
        // Unparseable entries are left for validation to refuse.
        let bad = pool("b", "10.6.0.0/16", &["10.6.0.x"]);
        assert_eq!(
            mutate("SpiderIPPool", &bad).len(),
            2,
            "ipVersion and finalizer only"
        );
        let r = json!({"kind": "SpiderReservedIP", "metadata": {"name": "r"}, "spec": {"ips": ["fd00::2", "fd00::1"]}});
        assert_eq!(
            mutate("SpiderReservedIP", &r),
            vec![
                json!({"op": "add", "path": "/spec/ipVersion", "value": 6}),
                json!({"op": "add", "path": "/spec/ips", "value": ["fd00::1-fd00::2"]}),
            ]
        );
    }

    #[test]
    fn validation_names_the_problem_and_only_this_objects() {
        let existing =
            Object::from_value(pool("old", "10.6.0.0/16", &["10.6.0.1-10.6.0.9"])).expect("pool");
        // Overlap with an existing pool.
        let over = pool("new", "10.6.0.0/16", &["10.6.0.5-10.6.0.20"]);
        let e = validate(
            "SpiderIPPool",
            "new",
            None,
            &over,
            std::slice::from_ref(&existing),
            None,
        )
        .expect_err("overlap");
        assert!(e.iter().any(|l| l.contains("old")), "{e:?}");
        // An unformatted subnet: Spiderpool's message.
        let bad = pool("bad", "10.7.0.1/16", &["10.7.0.1"]);
        let e = validate("SpiderIPPool", "bad", None, &bad, &[], None).expect_err("subnet");
        assert!(e[0].contains("please change it to 10.7.0.0/16"), "{e:?}");
        // A valid one passes even when another object in the cluster is invalid.
        let broken =
            Object::from_value(pool("broken", "10.9.0.1/16", &["10.9.0.1"])).expect("decodes");
        let ok = pool("fine", "10.8.0.0/16", &["10.8.0.1"]);
        assert!(validate("SpiderIPPool", "fine", None, &ok, &[broken], None).is_ok());
    }

    #[test]
    fn updates_may_not_strand_allocated_addresses() {
        let old = pool("p", "10.6.0.0/16", &["10.6.0.1-10.6.0.10"]);
        let used = IpSet::parse(IpFamily::V4, &["10.6.0.9"]).expect("set");
        let shrunk = pool("p", "10.6.0.0/16", &["10.6.0.1-10.6.0.5"]);
        let e = validate("SpiderIPPool", "p", Some(&old), &shrunk, &[], Some(&used))
            .expect_err("strand");
        assert!(e.iter().any(|l| l.contains("10.6.0.9")), "{e:?}");
        let moved = pool("p", "10.7.0.0/16", &["10.7.0.1"]);
        let e = validate("SpiderIPPool", "p", Some(&old), &moved, &[], None).expect_err("subnet");
        assert!(e.iter().any(|l| l.contains("spec.subnet")), "{e:?}");
        let grown = pool("p", "10.6.0.0/16", &["10.6.0.1-10.6.0.20"]);
        assert!(validate("SpiderIPPool", "p", Some(&old), &grown, &[], Some(&used)).is_ok());
    }
}
