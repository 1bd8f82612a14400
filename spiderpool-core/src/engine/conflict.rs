//! Addresses another host answers for (IP conflict detection): the attachment's record moves,
//! in one transaction, to a record owned by no pod, so the address is never handed out again
//! until an operator frees it (`spiderctl release`, or deleting the record).

use std::net::IpAddr;

use super::Engine;
use crate::store::{Filter, Lease, LeaseStore, Outcome, Owner, Release, StoreError, Txn};

use super::EngineError;

/// The network recorded for an address in conflict (no CNI network can be named so: a slash is
/// not allowed in a network name), so CNI GC of a network never frees it.
pub const CONFLICT_NETWORK: &str = "spiderpool.io/ip-conflict";
/// The container recorded for an address in conflict: `ip-conflict-<address>` (one attachment
/// per address: the store holds one record per attachment and family; no `/`, which the etcd
/// store's key layout refuses).
pub const CONFLICT_CONTAINER: &str = "ip-conflict";

/// Whether a record marks an address in conflict.
pub fn is_conflict(lease: &Lease) -> bool {
    lease.owner.network == CONFLICT_NETWORK
        && lease
            .owner
            .container_id
            .strip_prefix(CONFLICT_CONTAINER)
            .is_some_and(|rest| rest.starts_with('-'))
}

impl<S: LeaseStore> Engine<S> {
    /// Marks `ip`, which the attachment `(container_id, ifname)` holds, as in conflict with the
    /// host whose hardware address is `mac`: the attachment's record is replaced by a conflict
    /// record (interface field: the MAC that answered) in one commit. Returns the conflict record,
    /// or `None` when the attachment no longer holds `ip` (nothing changed).
    pub async fn quarantine(
        &self,
        container_id: &str,
        ifname: &str,
        ip: IpAddr,
        mac: &str,
        now: u64,
    ) -> Result<Option<Lease>, EngineError> {
        let listing = self.store.list(Filter::Container(container_id)).await?;
        let Some(held) = listing
            .leases
            .iter()
            .find(|l| l.ip == ip && l.owner.ifname == ifname)
        else {
            return Ok(None);
        };
        let marker = Lease {
            ip,
            pool: held.pool.clone(),
            owner: Owner {
                pod_namespace: String::new(),
                pod_name: String::new(),
                pod_uid: String::new(),
                container_id: format!("{CONFLICT_CONTAINER}-{ip}"),
                ifname: mac.to_string(),
                node: self.node.clone(),
                network: CONFLICT_NETWORK.to_string(),
                created: now,
            },
            clean_gateway: false,
            revision: 0,
        };
        let txn = Txn {
            claims: vec![marker.clone()],
            releases: vec![Release::from(held)],
        };
        match self.store.commit(txn).await? {
            Outcome::Committed { revision, .. } => {
                self.caches.learn(&marker.pool, ip, revision, true);
                Ok(Some(marker))
            }
            Outcome::Conflict(c) => Err(EngineError::Store(StoreError::Unavailable {
                message: format!("marking {ip} as in conflict raced with another change: {c:?}"),
                source: None,
            })),
        }
    }
}
