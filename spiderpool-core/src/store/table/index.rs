//! The table's index machinery: hashed address sets, the hasher they use, the small inline set
//! of one container's addresses, and a counter that clones by value.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::store::Lease;

/// A relaxed atomic counter that clones by value.
#[derive(Debug, Default)]
pub(super) struct Counter(std::sync::atomic::AtomicU64);

impl Clone for Counter {
    fn clone(&self) -> Self {
        Counter(std::sync::atomic::AtomicU64::new(self.get()))
    }
}

impl Counter {
    pub(super) fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
    pub(super) fn add(&self, n: u64) {
        self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Addresses by a name with few distinct values and large sets (pool, node): a B-tree of names
/// (string comparisons on a handful of names beat hashing each one), hashed sets (a commit costs
/// O(1) in a 65,000-record pool; the rare listing sorts what it returns).
pub(super) type BigIndex = BTreeMap<String, AddrHashSet>;

/// A hash set of addresses with a cheap well-mixing hasher: addresses are chosen by the
/// engine, not by a client, so SipHash's flooding resistance buys nothing here and costs a third
/// of a commit's index work.
pub(super) type AddrHashSet =
    std::collections::HashSet<IpAddr, std::hash::BuildHasherDefault<AddrHasher>>;

/// FxHash's mixing step over the written words, then murmur3's 64-bit finaliser: addresses of one
/// pool differ only in their high bytes as the hasher sees them, and the hash table indexes by the
/// low bits, so every bit must depend on every input bit. Also used for names and container ids:
/// a table holds few distinct names, and container-id collisions only cost a check.
#[derive(Default)]
pub(super) struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_isize(&mut self, n: isize) {
        self.write_u64(n as u64);
    }
}

/// The addresses of one container-index entry: almost always one, kept inline (24 bytes: the
/// rare list is boxed, so it does not make every entry as large as a `Vec`).
#[derive(Debug, Clone)]
#[allow(clippy::box_collection)]
pub(super) enum Ips {
    /// One address, inline.
    One(IpAddr),
    /// Several.
    Many(Box<Vec<IpAddr>>),
}

impl Ips {
    pub(super) fn put(&mut self, ip: IpAddr) {
        match self {
            Ips::One(x) if *x == ip => {}
            Ips::One(x) => *self = Ips::Many(Box::new(vec![*x, ip])),
            Ips::Many(v) if v.is_empty() => *self = Ips::One(ip),
            Ips::Many(v) => {
                if !v.contains(&ip) {
                    v.push(ip);
                }
            }
        }
    }

    /// Removes `ip`; returns whether the entry is now empty.
    pub(super) fn take(&mut self, ip: &IpAddr) -> bool {
        match self {
            Ips::One(x) => x == ip,
            Ips::Many(v) => {
                v.retain(|x| x != ip);
                v.is_empty()
            }
        }
    }

    pub(super) fn as_slice(&self) -> &[IpAddr] {
        match self {
            Ips::One(x) => std::slice::from_ref(x),
            Ips::Many(v) => v.as_slice(),
        }
    }
}

/// The container index key: a hash of the id (collisions only add candidates, which every
/// lookup checks against the record's container id).
pub(super) fn container_key(container_id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = AddrHasher::default();
    container_id.hash(&mut h);
    h.finish()
}

/// The pod index key: a hash of namespace and name (collisions only add candidates).
pub(super) fn pod_key(namespace: &str, name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = AddrHasher::default();
    namespace.hash(&mut h);
    name.hash(&mut h);
    h.finish()
}

/// Adds `ip` to the set of `key` in `index`; the key's String is allocated only for a new key.
pub(super) fn index_insert(index: &mut BigIndex, key: &str, ip: IpAddr) {
    match index.get_mut(key) {
        Some(set) => {
            set.insert(ip);
        }
        None => {
            let mut set = AddrHashSet::default();
            set.insert(ip);
            index.insert(key.to_string(), set);
        }
    }
}

/// The records of a hashed index entry, sorted by address.
pub(super) fn sorted(
    set: Option<&AddrHashSet>,
    get: impl Fn(&IpAddr) -> Option<Lease>,
) -> Vec<Lease> {
    let mut ips: Vec<&IpAddr> = set.into_iter().flatten().collect();
    ips.sort_unstable();
    ips.into_iter().filter_map(get).collect()
}
