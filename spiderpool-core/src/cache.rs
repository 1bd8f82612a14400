//! The engine's cache of the store: one [`Allocator`] per pool, and every rule that keeps it
//! honest in one place.
//!
//! # What the cache promises
//! The store is the only authority (its conditional commit refuses a taken address), so a wrong
//! cache can never hand out an address twice; it can only waste work (a lost race) or, if it
//! believed a free address held, refuse an allocation that would have fit. The rules below keep
//! both rare and make the cache **converge** to the store:
//!
//! 1. **Picks are reserved.** An address handed to a request is *pending* until the request
//!    commits it (`Caches::learn` with `held`) or gives it back (`Caches::give_back`). Pending
//!    addresses stay used through rebuilds, so two requests of one engine never pick the same one.
//! 2. **Give back only what is still ours.** If the cache learns, while a pick is pending, that the
//!    store holds that address for someone else (a lost race, a rebuild that shows it held), the
//!    pick stops being pending and giving it back leaves it used.
//! 3. **A rebuild never undoes a newer change.** A rebuild reads the pool at store revision `R`
//!    without holding the cache lock. Every change the engine learns while a read of that pool is
//!    in flight is journalled with its store revision; the rebuild replays the changes newer than
//!    `R` over the listing. A listing older than the one the cache already holds is dropped. The
//!    journal exists only while a read is in flight (a `ReadTicket` is alive), so it stays small.
//! 4. **A full pool is re-read only when the store changed it.** The cache remembers the revision
//!    and the time of the listing it was built from; the engine compares that revision with the
//!    store's [`pool revision`](crate::store::LeaseStore::pool_revision) (one O(1) read) and
//!    re-reads at most once per second per pool, unless it is the request's last candidate.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use crate::bitmap::Allocator;
use crate::range::IpSet;
use crate::store::{Affinity, PoolAddresses, Tier};

/// One pool's cached state.
struct PoolCache {
    alloc: Allocator,
    /// Picked by a request and neither committed nor given back (rule 1).
    pending: HashSet<IpAddr>,
    /// Store revision of the listing the bitmap was built from.
    read_revision: u64,
    /// The caller's clock (seconds) at that listing.
    read_at: u64,
}

/// A change the engine learnt while a read of the pool was in flight (rule 3).
#[derive(Debug, Clone, Copy)]
struct Change {
    revision: u64,
    ip: IpAddr,
    held: bool,
}

#[derive(Default)]
struct InFlight {
    readers: usize,
    changes: Vec<Change>,
}

#[derive(Default)]
struct State {
    pools: HashMap<String, PoolCache>,
    reads: HashMap<String, InFlight>,
}

/// Used and capacity of a cached pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Addresses the cache counts as used (held or pending).
    pub used: u128,
    /// Allocatable addresses.
    pub capacity: u128,
}

/// When a cached pool was last read from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadMark {
    pub revision: u64,
    pub at: u64,
}

/// The per-pool caches of one engine.
pub(crate) struct Caches {
    state: Mutex<State>,
    hint: u64,
}

/// A read of one pool in flight. Changes learnt while it lives are journalled; dropping it
/// without [`Caches::install`] (a failed or cancelled read) ends the journalling.
pub(crate) struct ReadTicket<'a> {
    caches: &'a Caches,
    pool: String,
    open: bool,
}

impl Drop for ReadTicket<'_> {
    fn drop(&mut self) {
        if self.open {
            self.caches.end_read(&mut self.caches.lock(), &self.pool);
        }
    }
}

impl Caches {
    /// Caches whose allocators start at `hint` (the node's start point).
    pub fn new(hint: u64) -> Self {
        Caches {
            state: Mutex::new(State::default()),
            hint,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update below leaves the state consistent before it can panic (allocator calls do
        // not panic on addresses outside their space), so a poisoned lock is safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `pool` is cached for exactly `space` (a changed pool definition needs a rebuild).
    pub fn is_current(&self, pool: &str, space: &IpSet) -> bool {
        self.lock()
            .pools
            .get(pool)
            .is_some_and(|c| c.alloc.space() == space)
    }

    /// Starts a read of `pool` from the store (rule 3).
    pub fn begin_read(&self, pool: &str) -> ReadTicket<'_> {
        self.lock()
            .reads
            .entry(pool.to_string())
            .or_default()
            .readers += 1;
        ReadTicket {
            caches: self,
            pool: pool.to_string(),
            open: true,
        }
    }

    /// Ends a read; returns the changes learnt during it.
    fn end_read(&self, state: &mut State, pool: &str) -> Vec<Change> {
        let Some(f) = state.reads.get_mut(pool) else {
            return Vec::new();
        };
        f.readers = f.readers.saturating_sub(1);
        if f.readers == 0 {
            state
                .reads
                .remove(pool)
                .map(|f| f.changes)
                .unwrap_or_default()
        } else {
            f.changes.clone()
        }
    }

    /// Rebuilds a pool's cache from `listing` (read under `ticket`), keeping the cursor, the
    /// pending picks and every change newer than the listing.
    pub fn install(
        &self,
        mut ticket: ReadTicket<'_>,
        space: IpSet,
        listing: &PoolAddresses,
        now: u64,
    ) {
        ticket.open = false;
        let mut state = self.lock();
        let changes = self.end_read(&mut state, &ticket.pool);
        let old = state.pools.remove(&ticket.pool);
        if let Some(old) = old {
            if old.read_revision > listing.revision && *old.alloc.space() == space {
                // A newer listing is installed already (and has seen these changes).
                state.pools.insert(ticket.pool.clone(), old);
                return;
            }
            let fresh = self.build(space, listing, now, Some(old), &changes);
            state.pools.insert(ticket.pool.clone(), fresh);
        } else {
            let fresh = self.build(space, listing, now, None, &changes);
            state.pools.insert(ticket.pool.clone(), fresh);
        }
    }

    fn build(
        &self,
        space: IpSet,
        listing: &PoolAddresses,
        now: u64,
        old: Option<PoolCache>,
        changes: &[Change],
    ) -> PoolCache {
        let mut alloc = Allocator::new(space, self.hint);
        let mut held = HashSet::with_capacity(listing.ips.len());
        for ip in &listing.ips {
            alloc.mark_used(*ip);
            held.insert(*ip);
        }
        let mut pending = HashSet::new();
        if let Some(old) = old {
            if old.alloc.space() == alloc.space() {
                // Next-fit order survives a rebuild.
                alloc.set_cursor(old.alloc.cursor());
            }
            for ip in old.pending {
                // Rule 2: a pick the store shows held is no longer ours to give back.
                if !held.contains(&ip) && alloc.mark_used(ip) {
                    pending.insert(ip);
                }
            }
        }
        for c in changes.iter().filter(|c| c.revision > listing.revision) {
            if c.held {
                pending.remove(&c.ip);
                alloc.mark_used(c.ip);
            } else if !pending.contains(&c.ip) {
                alloc.release(c.ip);
            }
        }
        PoolCache {
            alloc,
            pending,
            read_revision: listing.revision,
            read_at: now,
        }
    }

    /// Picks the next free address of `pool` (next-fit; with `affinity`, in this node's blocks
    /// first: [`Allocator::take_affine`]) and reserves it (rule 1).
    pub fn take(&self, pool: &str, affinity: Option<&Affinity>) -> Option<(IpAddr, Tier)> {
        let mut state = self.lock();
        let c = state.pools.get_mut(pool)?;
        let (ip, tier) = match affinity {
            Some(a) => c.alloc.take_affine(a)?,
            None => (c.alloc.take()?, Tier::Free),
        };
        c.pending.insert(ip);
        Some((ip, tier))
    }

    /// Returns a pick that was not committed. Leaves it used if the cache has learnt meanwhile
    /// that the store holds it (rule 2).
    pub fn give_back(&self, pool: &str, ip: IpAddr) {
        if let Some(c) = self.lock().pools.get_mut(pool) {
            if c.pending.remove(&ip) {
                c.alloc.release(ip);
            }
        }
    }

    /// Records what the store said at `revision`: `ip` is held (committed by this engine, or
    /// found taken by someone else) or free (released).
    pub fn learn(&self, pool: &str, ip: IpAddr, revision: u64, held: bool) {
        let mut state = self.lock();
        if !state.reads.is_empty() {
            if let Some(f) = state.reads.get_mut(pool) {
                f.changes.push(Change { revision, ip, held });
            }
        }
        if let Some(c) = state.pools.get_mut(pool) {
            if held {
                c.pending.remove(&ip);
                c.alloc.mark_used(ip);
            } else if !c.pending.contains(&ip) {
                c.alloc.release(ip);
            }
        }
    }

    /// When `pool` was last read, if cached.
    pub fn read_mark(&self, pool: &str) -> Option<ReadMark> {
        self.lock().pools.get(pool).map(|c| ReadMark {
            revision: c.read_revision,
            at: c.read_at,
        })
    }

    /// Used and capacity of a cached pool.
    pub fn usage(&self, pool: &str) -> Option<Usage> {
        self.lock().pools.get(pool).map(|c| Usage {
            used: c.alloc.used(),
            capacity: c.alloc.capacity(),
        })
    }

    /// Whether `ip` is pending in `pool` (for tests of the rules).
    #[cfg(test)]
    fn is_pending(&self, pool: &str, ip: IpAddr) -> bool {
        self.lock()
            .pools
            .get(pool)
            .is_some_and(|c| c.pending.contains(&ip))
    }

    /// Whether the cache counts `ip` of `pool` as used.
    #[cfg(test)]
    fn is_used(&self, pool: &str, ip: IpAddr) -> bool {
        self.lock()
            .pools
            .get(pool)
            .is_some_and(|c| c.alloc.is_used(ip))
    }

    /// Forgets one pool, or all.
    pub fn invalidate(&self, pool: Option<&str>) {
        let mut state = self.lock();
        match pool {
            Some(p) => {
                state.pools.remove(p);
            }
            None => state.pools.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::IpFamily;
    use crate::store::{Lease, Owner};

    fn space() -> IpSet {
        IpSet::parse(IpFamily::V4, &["10.0.0.1-10.0.0.4"]).expect("range")
    }

    fn lease_at(addr: &str, revision: u64) -> Lease {
        Lease {
            ip: ip(addr),
            pool: "p".into(),
            owner: Owner {
                pod_namespace: "ns".into(),
                pod_name: "pod".into(),
                pod_uid: "uid".into(),
                container_id: format!("c-{addr}"),
                ifname: "eth0".into(),
                node: "n".into(),
                network: "net".into(),
                created: 0,
            },
            clean_gateway: false,
            revision,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn listing(revision: u64, held: &[&str]) -> PoolAddresses {
        PoolAddresses {
            revision,
            ips: held.iter().map(|a| lease_at(a, revision).ip).collect(),
        }
    }

    #[test]
    fn a_rebuild_does_not_undo_a_release_newer_than_its_read() {
        let c = Caches::new(0);
        c.install(c.begin_read("p"), space(), &listing(5, &["10.0.0.1"]), 0);
        // A rebuild reads at revision 6 (10.0.0.2 held) ...
        let t = c.begin_read("p");
        let stale = listing(6, &["10.0.0.1", "10.0.0.2"]);
        // ... while this engine releases 10.0.0.2 at revision 7 and commits 10.0.0.3 at 8.
        c.learn("p", ip("10.0.0.2"), 7, false);
        c.learn("p", ip("10.0.0.3"), 8, true);
        c.install(t, space(), &stale, 1);
        assert!(
            !c.is_used("p", ip("10.0.0.2")),
            "release undone by a stale read"
        );
        assert!(
            c.is_used("p", ip("10.0.0.3")),
            "commit undone by a stale read"
        );
    }

    #[test]
    fn an_older_listing_never_replaces_a_newer_one() {
        let c = Caches::new(0);
        let slow = c.begin_read("p");
        let fast = c.begin_read("p");
        c.install(fast, space(), &listing(9, &["10.0.0.1", "10.0.0.2"]), 0);
        c.install(slow, space(), &listing(3, &[]), 0);
        assert!(c.is_used("p", ip("10.0.0.2")));
        assert_eq!(c.read_mark("p").map(|m| m.revision), Some(9));
    }

    #[test]
    fn a_lost_pick_held_by_another_stays_used_when_given_back() {
        let c = Caches::new(0);
        c.install(c.begin_read("p"), space(), &listing(1, &[]), 0);
        let pick = c.take("p", None).expect("free").0;
        assert!(c.is_pending("p", pick));
        // The commit lost: the store names another holder.
        c.learn("p", pick, 2, true);
        c.give_back("p", pick);
        assert!(!c.is_pending("p", pick), "pick left pending for good");
        assert!(c.is_used("p", pick), "a held address looks free");
    }

    #[test]
    fn a_pending_pick_survives_a_rebuild_and_a_held_one_is_dropped() {
        let c = Caches::new(0);
        c.install(c.begin_read("p"), space(), &listing(1, &[]), 0);
        let a = c.take("p", None).expect("a").0;
        let b = c.take("p", None).expect("b").0;
        let t = c.begin_read("p");
        c.install(t, space(), &listing(2, &[&b.to_string()]), 0);
        assert!(c.is_pending("p", a) && c.is_used("p", a));
        assert!(!c.is_pending("p", b) && c.is_used("p", b));
        c.give_back("p", b);
        assert!(
            c.is_used("p", b),
            "held by the store: giving back must not free it"
        );
        c.give_back("p", a);
        assert!(!c.is_used("p", a));
    }

    #[test]
    fn journalling_ends_with_the_last_read_even_when_a_read_fails() {
        let c = Caches::new(0);
        {
            let _failed = c.begin_read("p");
        }
        c.learn("p", ip("10.0.0.1"), 1, true);
        assert!(
            c.lock().reads.is_empty(),
            "journal kept without a read in flight"
        );
    }
}
