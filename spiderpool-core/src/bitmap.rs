//! Per-pool address allocator.
//!
//! # Order of handing out addresses: next-fit
//! Each allocator keeps a cursor. An allocation takes the first free address at or after the
//! cursor (wrapping at the end of the pool) and moves the cursor just past it. So a released
//! address is handed out again only after the cursor has gone round the whole pool: the longest
//! cool-down a pool of that size allows, which protects peers' stale ARP/neighbour caches (the
//! problem Calico solved with a time-based cooldown), at no cost per allocation. Different nodes
//! start their cursor at different points (a hash of the node name), so nodes sharing one pool
//! rarely race for the same address.
//!
//! # Cost
//! Addresses are indices into the pool's allocatable [`IpSet`] (O(log ranges) to convert).
//! Pools of up to 2^25 addresses use a hierarchical bitmap: one bit per address plus one summary
//! bit per 64-bit word at each level above, so "next free at or after i" touches at most two words
//! per level: O(log64 n), i.e. at most 5 levels for a /8 and flat in practice, whatever the fill.
//! Larger pools (big IPv6 ranges) keep the used addresses as merged runs in a `BTreeMap`
//! (O(log runs)), since a bitmap of 2^64 bits cannot exist.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::range::{ip_to_u128, IpFamily, IpSet};
use crate::store::{Affinity, Tier};

/// Pools with at most this many addresses use the dense bitmap.
pub const DENSE_LIMIT: u128 = 1 << 25;

/// A hierarchical bitmap: bit set = used.
#[derive(Debug, Clone)]
struct HierBitmap {
    /// `levels[0]` holds one bit per slot; `levels[k]` one bit per word of `levels[k-1]`,
    /// set when that word is full. Bits past the end are set, so they never look free.
    levels: Vec<Vec<u64>>,
}

impl HierBitmap {
    fn new(len: u64) -> Self {
        let mut levels = Vec::new();
        let mut bits = len.max(1);
        loop {
            let words = bits.div_ceil(64);
            let mut v = vec![0u64; words as usize];
            let tail = bits % 64;
            if tail != 0 {
                if let Some(last) = v.last_mut() {
                    *last = u64::MAX << tail;
                }
            }
            levels.push(v);
            if words <= 1 {
                break;
            }
            bits = words;
        }
        let mut bm = HierBitmap { levels };
        if len == 0 {
            bm.set(0);
        }
        bm
    }

    fn get(&self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        self.levels[0].get(w).is_some_and(|x| x >> b & 1 == 1)
    }

    fn set(&mut self, i: u64) {
        let mut pos = i;
        for level in 0..self.levels.len() {
            let (w, b) = ((pos / 64) as usize, pos % 64);
            let Some(word) = self.levels[level].get_mut(w) else {
                return;
            };
            *word |= 1 << b;
            if *word != u64::MAX {
                return;
            }
            pos = w as u64;
        }
    }

    fn clear(&mut self, i: u64) {
        let mut pos = i;
        for level in 0..self.levels.len() {
            let (w, b) = ((pos / 64) as usize, pos % 64);
            let Some(word) = self.levels[level].get_mut(w) else {
                return;
            };
            let was_full = *word == u64::MAX;
            *word &= !(1 << b);
            if !was_full {
                return;
            }
            pos = w as u64;
        }
    }

    /// First clear bit at or after `pos` on `level`.
    fn find_zero(&self, level: usize, pos: u64) -> Option<u64> {
        let words = &self.levels[level];
        let w = (pos / 64) as usize;
        let b = pos % 64;
        let word = *words.get(w)?;
        let m = !word & (u64::MAX << b);
        if m != 0 {
            return Some(w as u64 * 64 + m.trailing_zeros() as u64);
        }
        let next = if level + 1 < self.levels.len() {
            self.find_zero(level + 1, w as u64 + 1)?
        } else {
            return None; // top level has one word
        };
        let m = !*words.get(next as usize)?;
        (m != 0).then(|| next * 64 + m.trailing_zeros() as u64)
    }
}

/// Used addresses of a pool too large for a bitmap: merged runs `start -> end` (inclusive).
#[derive(Debug, Clone, Default)]
struct Runs {
    runs: BTreeMap<u128, u128>,
}

impl Runs {
    fn get(&self, i: u128) -> bool {
        self.runs
            .range(..=i)
            .next_back()
            .is_some_and(|(_, &e)| e >= i)
    }

    fn set(&mut self, i: u128) {
        if self.get(i) {
            return;
        }
        let mut start = i;
        let mut end = i;
        if let Some((&s, &e)) = self.runs.range(..i).next_back() {
            if e.checked_add(1) == Some(i) {
                start = s;
            }
        }
        if let Some(next) = i.checked_add(1) {
            if let Some(e) = self.runs.remove(&next) {
                end = e;
            }
        }
        self.runs.insert(start, end);
    }

    fn clear(&mut self, i: u128) {
        let Some((&s, &e)) = self.runs.range(..=i).next_back() else {
            return;
        };
        if e < i {
            return;
        }
        self.runs.remove(&s);
        if s < i {
            self.runs.insert(s, i - 1);
        }
        if i < e {
            self.runs.insert(i + 1, e);
        }
    }

    /// First free index at or after `pos`, below `len`.
    fn find_zero(&self, pos: u128, len: u128) -> Option<u128> {
        let cand = match self.runs.range(..=pos).next_back() {
            Some((_, &e)) if e >= pos => e.checked_add(1)?,
            _ => pos,
        };
        (cand < len).then_some(cand)
    }
}

#[derive(Debug, Clone)]
enum Used {
    Dense(HierBitmap),
    Sparse(Runs),
}

/// Allocation state of one pool: which of its allocatable addresses are used, and where the next
/// search starts.
#[derive(Debug, Clone)]
pub struct Allocator {
    space: IpSet,
    len: u128,
    used: Used,
    used_count: u128,
    cursor: u128,
    /// The node's start hint, which also ranks the free blocks this node prefers.
    hint: u64,
}

impl Allocator {
    /// An allocator over `space` (the pool's allocatable addresses) whose first search starts at
    /// `start_hint` modulo the pool size.
    pub fn new(space: IpSet, start_hint: u64) -> Self {
        Self::with_dense_limit(space, start_hint, DENSE_LIMIT)
    }

    /// As [`Allocator::new`], choosing the sparse representation above `dense_limit` addresses
    /// (tests use this to exercise both).
    pub fn with_dense_limit(space: IpSet, start_hint: u64, dense_limit: u128) -> Self {
        let len = space.count();
        let used = if len <= dense_limit {
            Used::Dense(HierBitmap::new(len as u64))
        } else {
            Used::Sparse(Runs::default())
        };
        let cursor = if len == 0 {
            0
        } else {
            start_hint as u128 % len
        };
        Allocator {
            space,
            len,
            used,
            used_count: 0,
            cursor,
            hint: start_hint,
        }
    }

    /// A start hint derived from a node name (FNV-1a), so nodes start apart.
    pub fn hint_for(node: &str) -> u64 {
        crate::fnv1a(node.bytes())
    }

    /// The allocatable addresses.
    pub fn space(&self) -> &IpSet {
        &self.space
    }

    /// Number of allocatable addresses.
    pub fn capacity(&self) -> u128 {
        self.len
    }

    /// Number of used allocatable addresses.
    pub fn used(&self) -> u128 {
        self.used_count
    }

    /// Number of free addresses.
    pub fn free(&self) -> u128 {
        self.len - self.used_count
    }

    fn index(&self, ip: IpAddr) -> Option<u128> {
        if IpFamily::of(&ip) != self.space.family() {
            return None;
        }
        self.space.index_of(ip_to_u128(ip))
    }

    fn get(&self, i: u128) -> bool {
        match &self.used {
            Used::Dense(b) => b.get(i as u64),
            Used::Sparse(r) => r.get(i),
        }
    }

    /// Whether `ip` is an allocatable address that is in use.
    pub fn is_used(&self, ip: IpAddr) -> bool {
        self.index(ip).is_some_and(|i| self.get(i))
    }

    /// Marks `ip` used. Returns false when it is outside the allocatable space or already used.
    pub fn mark_used(&mut self, ip: IpAddr) -> bool {
        let Some(i) = self.index(ip) else {
            return false;
        };
        if self.get(i) {
            return false;
        }
        match &mut self.used {
            Used::Dense(b) => b.set(i as u64),
            Used::Sparse(r) => r.set(i),
        }
        self.used_count += 1;
        true
    }

    /// Marks `ip` free. Returns false when it was not used (or not in the space).
    pub fn release(&mut self, ip: IpAddr) -> bool {
        let Some(i) = self.index(ip) else {
            return false;
        };
        if !self.get(i) {
            return false;
        }
        match &mut self.used {
            Used::Dense(b) => b.clear(i as u64),
            Used::Sparse(r) => r.clear(i),
        }
        self.used_count -= 1;
        true
    }

    fn find_from(&self, pos: u128) -> Option<u128> {
        match &self.used {
            Used::Dense(b) => b
                .find_zero(0, pos as u64)
                .map(u128::from)
                .filter(|&i| i < self.len),
            Used::Sparse(r) => r.find_zero(pos, self.len),
        }
    }

    /// Index where the next search starts.
    pub fn cursor(&self) -> u128 {
        self.cursor
    }

    /// Moves the search start (modulo the pool size).
    pub fn set_cursor(&mut self, cursor: u128) {
        self.cursor = if self.len == 0 { 0 } else { cursor % self.len };
    }

    /// The next free address in next-fit order, without taking it.
    pub fn peek(&self) -> Option<IpAddr> {
        if self.used_count >= self.len {
            return None;
        }
        let i = self.find_from(self.cursor).or_else(|| self.find_from(0))?;
        self.space.nth_ip(i)
    }

    /// Takes the next free address in next-fit order and advances the cursor past it.
    pub fn take(&mut self) -> Option<IpAddr> {
        if self.used_count >= self.len {
            return None;
        }
        let i = self.find_from(self.cursor).or_else(|| self.find_from(0))?;
        self.take_index(i)
    }

    fn take_index(&mut self, i: u128) -> Option<IpAddr> {
        let ip = self.space.nth_ip(i)?;
        match &mut self.used {
            Used::Dense(b) => b.set(i as u64),
            Used::Sparse(r) => r.set(i),
        }
        self.used_count += 1;
        self.cursor = if i + 1 >= self.len { 0 } else { i + 1 };
        Some(ip)
    }

    /// Takes a free address preferring, in order, this node's blocks, blocks nobody owns and
    /// last other nodes' blocks ([`Affinity`]); next-fit within this node's blocks (from the
    /// cursor, wrapping), the block this node ranks first among the others. Costs O(own blocks)
    /// for the first tier and one pass over the pool's blocks for the other two, each step one
    /// bitmap search.
    pub fn take_affine(&mut self, aff: &Affinity) -> Option<(IpAddr, Tier)> {
        if self.used_count >= self.len || aff.block == 0 {
            return self.take().map(|ip| (ip, Tier::Free));
        }
        if let Some(i) = self.find_own(aff) {
            return self.take_index(i).map(|ip| (ip, Tier::Own));
        }
        // Then a free block, else borrowing; one pass over the pool's blocks finds both.
        if let Some((i, tier)) = self.find_ranked(aff) {
            return self.take_index(i).map(|ip| (ip, tier));
        }
        // Every free address is in one of the three tiers; plain next-fit only if the affinity
        // and the space ever disagree.
        self.take().map(|ip| (ip, Tier::Borrowed))
    }

    /// The first free index in one of this node's blocks, next-fit from the cursor.
    fn find_own(&self, aff: &Affinity) -> Option<u128> {
        let family = self.space.family();
        // (first index of the block in the space, last address of the block)
        let blocks: Vec<(u128, u128)> = aff
            .own
            .iter()
            .filter(|b| IpFamily::of(b) == family)
            .filter_map(|b| {
                let end = aff.block_end(*b);
                let lo = self.space.index_at_or_after(ip_to_u128(*b))?;
                (self.space.nth(lo)? <= end).then_some((lo, end))
            })
            .collect();
        if blocks.is_empty() {
            return None;
        }
        let in_block = |from: u128, end: u128| {
            self.find_from(from)
                .filter(|&i| self.space.nth(i).is_some_and(|n| n <= end))
        };
        // Blocks that reach the cursor or beyond first (from the cursor), then all from their
        // start (the wrap).
        let cur = self.space.nth(self.cursor).unwrap_or(0);
        blocks
            .iter()
            .filter(|&&(_, end)| end >= cur)
            .find_map(|&(lo, end)| in_block(lo.max(self.cursor), end))
            .or_else(|| blocks.iter().find_map(|&(lo, end)| in_block(lo, end)))
    }

    /// The first free index of the block, among those with a free address and not this node's,
    /// that this node ranks first: a block nobody owns ([`Tier::Free`]) before one another node
    /// owns ([`Tier::Borrowed`]). Each node ranks the blocks by a hash of its hint and the block
    /// (rendezvous hashing), so nodes whose own blocks fill at the same moment claim (or borrow
    /// in) different blocks instead of all racing for the one after their cursors; a borrower
    /// then races only that block's owner, not every other borrower too.
    fn find_ranked(&self, aff: &Affinity) -> Option<(u128, Tier)> {
        // (tier order, rank, index)
        let mut best: Option<(u8, u64, u128)> = None;
        let mut pos = 0;
        while let Some(i) = self.find_from(pos) {
            let base = aff.base_of(self.space.nth_ip(i)?);
            let order = if aff.own.contains(&base) {
                None
            } else if aff.foreign.contains(&base) {
                Some(1)
            } else {
                Some(0)
            };
            if let Some(order) = order {
                let rank = crate::fnv1a(
                    self.hint
                        .to_le_bytes()
                        .into_iter()
                        .chain(ip_to_u128(base).to_le_bytes()),
                );
                if best.is_none_or(|b| (order, rank) < (b.0, b.1)) {
                    best = Some((order, rank, i));
                }
            }
            // The rest of that block.
            pos = self
                .space
                .index_at_or_after(aff.block_end(base).saturating_add(1))
                .unwrap_or(self.len);
        }
        best.map(|(order, _, i)| {
            (
                i,
                if order == 0 {
                    Tier::Free
                } else {
                    Tier::Borrowed
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(entries: &[&str]) -> IpSet {
        IpSet::parse(IpFamily::V4, entries).expect("valid")
    }

    #[test]
    fn next_fit_does_not_reuse_a_just_released_ip() {
        let mut a = Allocator::new(space(&["10.0.0.1-10.0.0.4"]), 0);
        let first = a.take().expect("free");
        assert_eq!(first.to_string(), "10.0.0.1");
        assert!(a.release(first));
        assert_eq!(a.take().map(|i| i.to_string()).as_deref(), Some("10.0.0.2"));
        assert_eq!(a.take().map(|i| i.to_string()).as_deref(), Some("10.0.0.3"));
        assert_eq!(a.take().map(|i| i.to_string()).as_deref(), Some("10.0.0.4"));
        // Only after wrapping does .1 come back.
        assert_eq!(a.take().map(|i| i.to_string()).as_deref(), Some("10.0.0.1"));
        assert_eq!(a.take(), None);
        assert_eq!(a.free(), 0);
    }

    fn affinity(own: &[&str], foreign: &[&str]) -> Affinity {
        let ips =
            |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|s| s.parse().expect("ip")).collect() };
        Affinity {
            block: 16,
            own: std::sync::Arc::new(ips(own).into_iter().collect()),
            foreign: std::sync::Arc::new(ips(foreign).into_iter().collect()),
        }
    }

    #[test]
    fn affine_takes_own_blocks_then_free_ones_then_borrows() {
        // 10.0.0.8-10.0.0.39: the tail of block .0 (8 addresses), all of .16, half of .32.
        let mut a = Allocator::new(space(&["10.0.0.8-10.0.0.39"]), 0);
        let aff = affinity(&["10.0.0.16"], &["10.0.0.0"]);
        let mut got = Vec::new();
        for _ in 0..16 {
            let (ip, tier) = a.take_affine(&aff).expect("free");
            assert_eq!(tier, Tier::Own, "{ip}");
            got.push(ip.to_string());
        }
        assert_eq!(got.first().map(String::as_str), Some("10.0.0.16"));
        assert_eq!(got.last().map(String::as_str), Some("10.0.0.31"));
        // Own block full: the free block .32 (8 addresses), then borrow in .0.
        for i in 0..8 {
            let (ip, tier) = a.take_affine(&aff).expect("free");
            assert_eq!(
                (ip.to_string(), tier),
                (format!("10.0.0.{}", 32 + i), Tier::Free)
            );
        }
        let (ip, tier) = a.take_affine(&aff).expect("free");
        assert_eq!(
            (ip.to_string().as_str(), tier),
            ("10.0.0.8", Tier::Borrowed)
        );
    }

    #[test]
    fn affine_is_next_fit_within_own_blocks_and_skips_foreign_ones() {
        let mut a = Allocator::new(space(&["10.0.0.0-10.0.0.63"]), 0);
        let aff = affinity(&["10.0.0.16", "10.0.0.48"], &["10.0.0.0", "10.0.0.32"]);
        let first = a.take_affine(&aff).expect("free").0;
        assert_eq!(first.to_string(), "10.0.0.16");
        assert!(a.release(first));
        // The released address comes back only after the cursor has gone round the own blocks.
        let next = a.take_affine(&aff).expect("free").0;
        assert_eq!(next.to_string(), "10.0.0.17");
        for _ in 0..30 {
            assert_eq!(a.take_affine(&aff).expect("free").1, Tier::Own);
        }
        assert_eq!(
            a.take_affine(&aff).map(|(ip, t)| (ip.to_string(), t)),
            Some(("10.0.0.16".into(), Tier::Own))
        );
        // No free block (both others are foreign): borrowing, in the foreign block this node
        // ranks first, until it is full.
        let (ip, tier) = a.take_affine(&aff).expect("free");
        assert_eq!(tier, Tier::Borrowed);
        let borrowed = aff.base_of(ip);
        assert!(aff.foreign.contains(&borrowed), "{ip}");
        for _ in 0..15 {
            let (next, tier) = a.take_affine(&aff).expect("free");
            assert_eq!((aff.base_of(next), tier), (borrowed, Tier::Borrowed));
        }
        let (next, _) = a.take_affine(&aff).expect("free");
        assert_ne!(aff.base_of(next), borrowed, "the first block is full");
        // Nodes that borrow at once spread over the foreign blocks.
        let all: Vec<String> = (0..16)
            .map(|k| format!("10.2.{}.{}", k / 16, (k % 16) * 16))
            .collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let foreign = affinity(&[], &all);
        let borrowed: std::collections::HashSet<IpAddr> = (0..20)
            .map(|n| {
                let mut a = Allocator::new(
                    space(&["10.2.0.0-10.2.0.255"]),
                    Allocator::hint_for(&format!("node-{n}")),
                );
                foreign.base_of(a.take_affine(&foreign).expect("free").0)
            })
            .collect();
        assert!(
            borrowed.len() >= 8,
            "20 nodes borrowed in only {} blocks",
            borrowed.len()
        );
        // Free blocks are ranked per node: one of the free ones, wherever the cursor is.
        let mut b = Allocator::new(space(&["10.0.0.0-10.0.0.63"]), 40);
        let aff = affinity(&[], &["10.0.0.32", "10.0.0.48"]);
        let (ip, tier) = b.take_affine(&aff).expect("free");
        assert_eq!(tier, Tier::Free);
        assert!(
            ip.to_string() == "10.0.0.0" || ip.to_string() == "10.0.0.16",
            "{ip}"
        );
        // Nodes whose blocks fill at once spread over the free blocks instead of all taking the
        // same one.
        let firsts: std::collections::HashSet<IpAddr> = (0..20)
            .map(|n| {
                let mut a = Allocator::new(
                    space(&["10.1.0.0-10.1.3.255"]),
                    Allocator::hint_for(&format!("node-{n}")),
                );
                a.take_affine(&affinity(&[], &[])).expect("free").0
            })
            .collect();
        assert!(
            firsts.len() >= 12,
            "20 nodes chose only {} blocks",
            firsts.len()
        );
        let v6 = IpSet::parse(IpFamily::V6, &["fd00::-fd00::3f"]).expect("ok");
        let mut c = Allocator::new(v6, 0);
        let aff = affinity(&["fd00::20"], &[]);
        assert_eq!(
            c.take_affine(&aff).map(|(ip, t)| (ip.to_string(), t)),
            Some(("fd00::20".into(), Tier::Own))
        );
    }

    #[test]
    fn skips_holes_between_ranges() {
        let mut a = Allocator::new(space(&["10.0.0.1", "10.0.0.10"]), 1);
        assert_eq!(
            a.take().map(|i| i.to_string()).as_deref(),
            Some("10.0.0.10")
        );
        assert_eq!(a.take().map(|i| i.to_string()).as_deref(), Some("10.0.0.1"));
        assert!(!a.mark_used("10.0.0.5".parse().expect("ip")));
    }

    #[test]
    fn dense_bitmap_crosses_levels() {
        // 64^2 + 5 slots: three levels; fill all but the last and find it.
        let n = 64 * 64 + 5;
        let mut bm = HierBitmap::new(n);
        for i in 0..n - 1 {
            bm.set(i);
        }
        assert_eq!(bm.find_zero(0, 0), Some(n - 1));
        bm.set(n - 1);
        assert_eq!(bm.find_zero(0, 0), None);
        bm.clear(70);
        assert_eq!(bm.find_zero(0, 0), Some(70));
        assert_eq!(bm.find_zero(0, 71), None);
    }

    #[test]
    fn sparse_runs_merge_and_split() {
        let mut r = Runs::default();
        r.set(5);
        r.set(7);
        r.set(6);
        assert_eq!(r.runs.len(), 1);
        assert_eq!(r.find_zero(5, 100), Some(8));
        r.clear(6);
        assert_eq!(r.runs.len(), 2);
        assert_eq!(r.find_zero(5, 100), Some(6));
        assert_eq!(r.find_zero(99, 100), Some(99));
        r.set(99);
        assert_eq!(r.find_zero(99, 100), None);
    }

    #[test]
    fn huge_v6_pool_uses_runs() {
        let s = IpSet::parse(IpFamily::V6, &["fd00::-fd00::ffff:ffff:ffff:ffff"]).expect("ok");
        let mut a = Allocator::new(s, Allocator::hint_for("node-1"));
        let x = a.take().expect("free");
        let y = a.take().expect("free");
        assert_ne!(x, y);
        assert!(a.is_used(x) && a.is_used(y));
        assert_eq!(a.used(), 2);
    }
}
