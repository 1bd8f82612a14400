//! Which pools, subnets and reserved IPs of a cluster can be used when not all of them can:
//! one bad object (invalid alone, or overlapping another the webhook could not see at the same
//! time) is left out, never the rest. The agents' view and the controller's `Valid` condition
//! decide the same way.

use crate::model::PoolSet;
use crate::types::Object;

/// One object left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    /// `Kind/name`.
    pub object: String,
    /// The validation problems.
    pub problems: Vec<String>,
}

/// Splits `objects` into those that can be used and those left out: everything that is not a
/// pool, subnet or reserved IP is kept; of those, each one valid on its own is taken in order
/// (`first` ones first, then oldest by `creationTimestamp`, then kind and name) unless it
/// conflicts with those taken before it. When everything is valid together nothing is left out.
pub fn usable(objects: &[Object], first: impl Fn(&Object) -> bool) -> (Vec<Object>, Vec<LeftOut>) {
    let is_ipam = |o: &&Object| {
        matches!(
            o,
            Object::IpPool(_) | Object::Subnet(_) | Object::ReservedIp(_)
        )
    };
    let mut ipam: Vec<&Object> = objects.iter().filter(is_ipam).collect();
    if PoolSet::build(ipam.iter().copied()).is_ok() {
        return (objects.to_vec(), Vec::new());
    }
    ipam.sort_by_key(|o| {
        let r = o.reference();
        (
            !first(o),
            o.metadata().creation_timestamp.clone(),
            r.kind,
            r.name,
        )
    });
    let mut kept: Vec<Object> = objects.iter().filter(|o| !is_ipam(o)).cloned().collect();
    let others = kept.len();
    let mut left = Vec::new();
    for o in ipam {
        let alone = PoolSet::build(std::slice::from_ref(o));
        kept.push(o.clone());
        let together = match alone {
            Ok(_) => PoolSet::build(&kept[others..]).map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = together {
            kept.pop();
            left.push(LeftOut {
                object: o.describe(),
                problems: e.iter().map(|e| e.to_string()).collect(),
            });
        }
    }
    (kept, left)
}
