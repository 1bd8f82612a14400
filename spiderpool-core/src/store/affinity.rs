//! Node-affine blocks, as the engine sees them.
//!
//! A store may keep its records in aligned blocks of addresses, each owned by one node (the
//! Kubernetes store: one object per block, written mostly by its owner's agent, so agents do not
//! collide on one object). The store reports ownership ([`Affinity`]); the engine decides where
//! to allocate ([`crate::bitmap::Allocator::take_affine`]): in this node's blocks first, then in a
//! block nobody owns (which the store's write makes this node's), and only when neither has a
//! free address in a block another node owns (borrowing). Ownership never decides uniqueness:
//! the store's conditional commit does, so a stale [`Affinity`] costs a refused write at most.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::range::ip_to_u128;

/// Which blocks this node owns and which other nodes own, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Affinity {
    /// Addresses per block: a power of two; a block starts at a multiple of it.
    pub block: u128,
    /// First addresses of this node's blocks.
    pub own: Arc<BTreeSet<IpAddr>>,
    /// First addresses of the blocks other nodes own.
    pub foreign: Arc<HashSet<IpAddr>>,
}

impl Affinity {
    /// The first address of the block `ip` belongs to.
    pub fn base_of(&self, ip: IpAddr) -> IpAddr {
        let mask = !(self.block.max(1) - 1);
        match ip {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & mask as u32).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & mask).into()),
        }
    }

    /// Where an allocation of `ip` lands.
    pub fn tier(&self, ip: IpAddr) -> Tier {
        let base = self.base_of(ip);
        if self.own.contains(&base) {
            Tier::Own
        } else if self.foreign.contains(&base) {
            Tier::Borrowed
        } else {
            Tier::Free
        }
    }

    /// The last address of the block starting at `base`, as a number.
    pub(crate) fn block_end(&self, base: IpAddr) -> u128 {
        ip_to_u128(base).saturating_add(self.block.max(1) - 1)
    }
}

/// Where an allocation landed relative to this node's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// In a block this node owns (no other writer).
    Own,
    /// In a block nobody owned: the write makes it this node's.
    Free,
    /// In a block another node owns (a compare-and-swap that may race its owner).
    Borrowed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_follow_the_block_of_the_address() {
        let a = Affinity {
            block: 16,
            own: Arc::new(["10.0.0.16".parse().expect("ip")].into()),
            foreign: Arc::new(["10.0.0.32".parse().expect("ip")].into()),
        };
        assert_eq!(a.tier("10.0.0.31".parse().expect("ip")), Tier::Own);
        assert_eq!(a.tier("10.0.0.33".parse().expect("ip")), Tier::Borrowed);
        assert_eq!(a.tier("10.0.0.1".parse().expect("ip")), Tier::Free);
        assert_eq!(
            a.base_of("fd00::1f".parse().expect("ip")),
            "fd00::10".parse::<IpAddr>().expect("ip")
        );
    }
}
