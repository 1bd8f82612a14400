//! A block's slots as the store edits them: records to and from leases, claims and releases
//! checked against what the block holds (an unreadable slot is taken: nothing claims or frees it).

use std::collections::BTreeMap;
use std::net::IpAddr;

use spiderpool_core::store::{Conflict, Lease, Owner, Release};

use crate::k8s::crd::{BlockRecord, Slot};

pub(super) fn to_record(l: &Lease) -> BlockRecord {
    BlockRecord {
        pool: l.pool.clone(),
        pod: format!("{}/{}", l.owner.pod_namespace, l.owner.pod_name),
        pod_uid: l.owner.pod_uid.clone(),
        container_id: l.owner.container_id.clone(),
        interface: l.owner.ifname.clone(),
        node: l.owner.node.clone(),
        network: l.owner.network.clone(),
        created: i64::try_from(l.owner.created).unwrap_or(i64::MAX),
        clean_gateway: l.clean_gateway,
    }
}

pub(super) fn from_record(ip: IpAddr, r: &BlockRecord, revision: u64) -> Lease {
    let (ns, name) = r.pod.split_once('/').unwrap_or(("", &r.pod));
    Lease {
        ip,
        pool: r.pool.clone(),
        owner: Owner {
            pod_namespace: ns.into(),
            pod_name: name.into(),
            pod_uid: r.pod_uid.clone(),
            container_id: r.container_id.clone(),
            ifname: r.interface.clone(),
            node: r.node.clone(),
            network: r.network.clone(),
            created: u64::try_from(r.created).unwrap_or(0),
        },
        clean_gateway: r.clean_gateway,
        revision,
    }
}

pub(super) fn same_record(a: &Lease, b: &Lease) -> bool {
    a.ip == b.ip && a.pool == b.pool && a.owner == b.owner && a.clean_gateway == b.clean_gateway
}

/// A stand-in lease for an unreadable slot, as the holder a refused claim reports.
pub(super) fn unreadable_holder(ip: IpAddr, slot: &Slot) -> Lease {
    let r = BlockRecord {
        pool: slot.pool().unwrap_or_default().to_string(),
        pod: "(unreadable record)/".into(),
        ..BlockRecord::default()
    };
    from_record(ip, &r, 0)
}

/// Adds `leases` to a block's slots unless one is held by another attachment (`movable` names
/// holders a move may replace); returns the records a move replaced.
pub(super) fn claim_into(
    recs: &mut BTreeMap<String, Slot>,
    leases: &[Lease],
    movable: &[Release],
) -> Result<Vec<Lease>, Vec<Conflict>> {
    // Checked first, applied after: a refused edit changes nothing (other edits of the same
    // batch share `recs`).
    let mut conflicts = Vec::new();
    let mut replaced = Vec::new();
    // A block with an unreadable slot cannot be written (the API server validates the whole
    // object): every address in it is taken.
    if let Some((_, slot)) = recs.iter().find(|(_, s)| s.record().is_none()) {
        return Err(leases
            .iter()
            .map(|l| Conflict::IpTaken(unreadable_holder(l.ip, slot)))
            .collect());
    }
    for l in leases {
        match recs.get(&l.ip.to_string()) {
            Some(Slot::Record(r))
                if r.container_id == l.owner.container_id && r.interface == l.owner.ifname => {}
            Some(Slot::Record(r))
                if movable.iter().any(|m| {
                    m.ip == l.ip && m.container_id == r.container_id && m.ifname == r.interface
                }) =>
            {
                replaced.push(from_record(l.ip, r, 0));
            }
            Some(Slot::Record(r)) => conflicts.push(Conflict::IpTaken(from_record(l.ip, r, 0))),
            Some(Slot::Unreadable(_)) | None => {}
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    for l in leases {
        let key = l.ip.to_string();
        let same = recs.get(&key).and_then(Slot::record).is_some_and(|r| {
            r.container_id == l.owner.container_id && r.interface == l.owner.ifname
        });
        if !same {
            recs.insert(key, Slot::Record(to_record(l)));
        }
    }
    Ok(replaced)
}

/// Removes the records still held as `rels` say; returns them.
pub(super) fn release_from(recs: &mut BTreeMap<String, Slot>, rels: &[Release]) -> Vec<Lease> {
    let mut gone = Vec::new();
    for r in rels {
        let key = r.ip.to_string();
        if recs
            .get(&key)
            .and_then(Slot::record)
            .is_some_and(|x| x.container_id == r.container_id && x.interface == r.ifname)
        {
            if let Some(Slot::Record(x)) = recs.remove(&key) {
                gone.push(from_record(r.ip, &x, 0));
            }
        }
    }
    gone
}
