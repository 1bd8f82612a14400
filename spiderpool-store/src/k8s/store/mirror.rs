//! The store's mirror of the blocks: every record, and which node owns which block.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use kube::ResourceExt;
use spiderpool_core::store::{Affinity, LeaseTable};

use super::records::{from_record, same_record, to_record};
use super::BLOCK;
use crate::k8s::crd::{Slot, SpiderIPBlock};

/// One block as the mirror has it.
#[derive(Debug, Clone, Default)]
pub(super) struct BlockState {
    /// The object's resourceVersion.
    pub rv: u64,
    /// The addresses it holds records for.
    pub ips: BTreeSet<IpAddr>,
    /// The node that owns it.
    pub owner: Option<String>,
}

#[derive(Default)]
pub(super) struct Mirror {
    pub table: LeaseTable,
    /// Block name -> what it holds.
    pub blocks: HashMap<String, BlockState>,
    /// Block name -> the slots it holds that are not records (kept as they are, taken).
    pub unreadable: HashMap<String, BTreeMap<String, serde_json::Value>>,
    /// This agent's node, when it owns blocks (node-affine mode).
    pub node: Option<String>,
    /// First addresses of this node's blocks and of the blocks other nodes own.
    pub own: Arc<BTreeSet<IpAddr>>,
    pub foreign: Arc<HashSet<IpAddr>>,
    /// This node's blocks that hold no record, since when (given back after a delay).
    pub idle_since: HashMap<String, Instant>,
}

/// The block an address belongs to: its name and first address.
pub fn block_of(ip: IpAddr) -> (String, IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let base = u32::from(v4) & !(BLOCK as u32 - 1);
            let b = std::net::Ipv4Addr::from(base);
            let o = b.octets();
            (
                format!("v4-{}-{}-{}-{}", o[0], o[1], o[2], o[3]),
                IpAddr::V4(b),
            )
        }
        IpAddr::V6(v6) => {
            let base = u128::from(v6) & !(BLOCK - 1);
            (
                format!("v6-{base:032x}"),
                IpAddr::V6(std::net::Ipv6Addr::from(base)),
            )
        }
    }
}

/// The first address of block `name` (as [`block_of`] names it).
pub(super) fn base_of_name(name: &str) -> Option<IpAddr> {
    if let Some(v4) = name.strip_prefix("v4-") {
        v4.replace('-', ".").parse().ok()
    } else if let Some(v6) = name.strip_prefix("v6-") {
        u128::from_str_radix(v6, 16)
            .ok()
            .map(|n| IpAddr::V6(std::net::Ipv6Addr::from(n)))
    } else {
        None
    }
}

pub(super) fn rv_of(o: &SpiderIPBlock) -> u64 {
    o.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Mirror {
    /// An empty mirror for an agent on `node` (None: blocks are not claimed).
    pub fn new(node: Option<String>) -> Self {
        Mirror {
            node,
            ..Mirror::default()
        }
    }

    /// Ownership as the engine reads it (None when this store claims no blocks).
    pub fn affinity(&self) -> Option<Affinity> {
        self.node.as_ref()?;
        Some(Affinity {
            block: BLOCK,
            own: self.own.clone(),
            foreign: self.foreign.clone(),
        })
    }

    /// Takes in a block as the server has it at its resourceVersion (older versions are ignored).
    pub fn absorb(&mut self, o: &SpiderIPBlock) {
        let name = o.name_any();
        let rv = rv_of(o);
        let (old, old_owner) = match self.blocks.get(&name) {
            Some(b) if b.rv >= rv => return,
            Some(b) => (b.ips.clone(), b.owner.clone()),
            None => (BTreeSet::new(), None),
        };
        let mut new = BTreeSet::new();
        let mut upserts = Vec::new();
        let mut unreadable = BTreeMap::new();
        for (k, slot) in &o.spec.allocations {
            let (Ok(ip), Slot::Record(r)) = (k.parse::<IpAddr>(), slot) else {
                let value = serde_json::to_value(slot).unwrap_or_default();
                if self.unreadable.get(&name).and_then(|u| u.get(k)) != Some(&value) {
                    tracing::error!(block = %name, key = %k, record = %value,
                        "SpiderIPBlock slot that is not an allocation record (edited by hand?): its address counts as taken until the slot is fixed or removed");
                }
                unreadable.insert(k.clone(), value);
                continue;
            };
            let lease = from_record(ip, r, rv);
            if !self
                .table
                .get(&ip)
                .is_some_and(|cur| same_record(&cur, &lease))
            {
                upserts.push(lease);
            }
            new.insert(ip);
        }
        if unreadable.is_empty() {
            self.unreadable.remove(&name);
        } else {
            self.unreadable.insert(name.clone(), unreadable);
        }
        let removed: Vec<IpAddr> = old.difference(&new).copied().collect();
        self.table.mirror(&removed, upserts, rv);
        let owner = o.spec.owner.clone().filter(|n| !n.is_empty());
        self.set_owner(&name, old_owner.as_deref(), owner.as_deref());
        let idle = owner.is_some() && owner == self.node && new.is_empty();
        if !idle {
            self.idle_since.remove(&name);
        } else {
            self.idle_since
                .entry(name.clone())
                .or_insert_with(Instant::now);
        }
        self.blocks.insert(
            name,
            BlockState {
                rv,
                ips: new,
                owner,
            },
        );
    }

    fn set_owner(&mut self, name: &str, old: Option<&str>, new: Option<&str>) {
        if old == new {
            return;
        }
        let Some(base) = base_of_name(name) else {
            return;
        };
        let mine = self.node.as_deref();
        if old.is_some() {
            if old == mine {
                Arc::make_mut(&mut self.own).remove(&base);
            } else {
                Arc::make_mut(&mut self.foreign).remove(&base);
            }
        }
        if new.is_some() {
            if new == mine {
                Arc::make_mut(&mut self.own).insert(base);
            } else {
                Arc::make_mut(&mut self.foreign).insert(base);
            }
        }
    }

    /// Block `name` as the mirror has it: its resourceVersion, slots (records and the
    /// unreadable ones, kept as they are) and owner.
    pub fn slots(&self, name: &str) -> Option<(u64, BTreeMap<String, Slot>, Option<String>)> {
        self.blocks.get(name).map(|b| {
            let mut recs: BTreeMap<String, Slot> = b
                .ips
                .iter()
                .filter_map(|ip| {
                    self.table
                        .get(ip)
                        .map(|l| (ip.to_string(), Slot::Record(to_record(&l))))
                })
                .collect();
            for (k, v) in self.unreadable.get(name).into_iter().flatten() {
                recs.insert(k.clone(), Slot::Unreadable(v.clone()));
            }
            (b.rv, recs, b.owner.clone())
        })
    }

    /// Every address of block `name` (from its name, as [`block_of`] makes it).
    pub fn block_addresses(&self, name: &str) -> Vec<IpAddr> {
        let Some(base) = base_of_name(name) else {
            return Vec::new();
        };
        (0..BLOCK)
            .filter_map(|i| match base {
                IpAddr::V4(b) => u32::try_from(i)
                    .ok()
                    .and_then(|i| u32::from(b).checked_add(i))
                    .map(|n| IpAddr::V4(n.into())),
                IpAddr::V6(b) => u128::from(b).checked_add(i).map(|n| IpAddr::V6(n.into())),
            })
            .collect()
    }

    /// Drops block `name`, deleted at `rv` (unless the mirror has a newer object of that name:
    /// a block given back and created again).
    pub fn forget(&mut self, name: &str, rv: u64) {
        if self.blocks.get(name).is_some_and(|b| b.rv > rv) {
            return;
        }
        self.unreadable.remove(name);
        self.idle_since.remove(name);
        if let Some(b) = self.blocks.remove(name) {
            self.set_owner(name, b.owner.as_deref(), None);
            let removed: Vec<IpAddr> = b.ips.into_iter().collect();
            self.table.mirror(&removed, Vec::new(), rv);
        }
    }
}
