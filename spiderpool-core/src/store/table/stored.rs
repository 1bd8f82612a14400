//! How the table keeps one record: shared names by number ([`Names`]), the record's own strings
//! in one buffer ([`Stored`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;

use super::index::{container_key, AddrHasher};
use crate::store::{Lease, Owner};

/// Interned names: one allocation per distinct pool, node, network, namespace or interface name,
/// shared by every record that carries it, which holds the name's number (4 bytes, not a
/// 16-byte pointer per name). Bounded by the number of distinct names (never freed).
#[derive(Debug, Clone, Default)]
pub(super) struct Names {
    ids: HashMap<std::sync::Arc<str>, u32, std::hash::BuildHasherDefault<AddrHasher>>,
    by_id: Vec<std::sync::Arc<str>>,
}

impl Names {
    pub(super) fn intern(&mut self, s: &str) -> u32 {
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        let n: std::sync::Arc<str> = std::sync::Arc::from(s);
        // More than 4 billion distinct names cannot be held in memory anyway.
        let id = u32::try_from(self.by_id.len()).unwrap_or(u32::MAX);
        self.by_id.push(n.clone());
        self.ids.insert(n, id);
        id
    }

    pub(super) fn get(&self, id: u32) -> &std::sync::Arc<str> {
        &self.by_id[id as usize]
    }
}

/// A record as the table keeps it (the address is the key), 64 bytes plus one exactly sized
/// buffer: shared names by number; the pod name, pod UID and container id one after another,
/// the container id as bytes when it is lowercase hex (as container runtimes make them: 32
/// bytes instead of 64). At 65,000 records about half the memory of one allocation per field
/// (benchmarks.md).
#[derive(Debug, Clone)]
pub(super) struct Stored {
    /// Pool, namespace, interface, node, network ([`Names`] numbers).
    names: [u32; 5],
    /// Pod name, pod UID and container id (packed when `hex`), concatenated.
    own: Box<[u8]>,
    /// Byte lengths of the pod name and the pod UID in `own`.
    lens: [u32; 2],
    created: u64,
    revision: u64,
    clean_gateway: bool,
    /// The container id is lowercase hex, kept as the bytes it spells.
    hex: bool,
}

pub(super) const POOL: usize = 0;
pub(super) const NAMESPACE: usize = 1;
const IFNAME: usize = 2;
pub(super) const NODE: usize = 3;
const NETWORK: usize = 4;

/// The value of a lowercase hex digit (uppercase is not packed: it would come back lowercase).
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// `id` as the bytes its lowercase hex spells, when it is that (non-empty, even length).
fn pack_hex(id: &str) -> Option<Vec<u8>> {
    let b = id.as_bytes();
    if b.is_empty() || b.len() % 2 != 0 {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// The lowercase hex digits of `bytes`.
fn hex_digits(bytes: &[u8]) -> impl Iterator<Item = u8> + '_ {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]])
}

fn unpack_hex(bytes: &[u8]) -> String {
    hex_digits(bytes).map(char::from).collect()
}

impl Stored {
    pub(super) fn new(l: Lease, names: &mut Names) -> Stored {
        let o = &l.owner;
        let len = |s: &str| u32::try_from(s.len()).unwrap_or(u32::MAX);
        let packed = pack_hex(&o.container_id);
        let mut own = Vec::with_capacity(
            o.pod_name.len()
                + o.pod_uid.len()
                + packed.as_ref().map_or(o.container_id.len(), Vec::len),
        );
        own.extend_from_slice(o.pod_name.as_bytes());
        own.extend_from_slice(o.pod_uid.as_bytes());
        match &packed {
            Some(p) => own.extend_from_slice(p),
            None => own.extend_from_slice(o.container_id.as_bytes()),
        }
        Stored {
            names: [
                names.intern(&l.pool),
                names.intern(&o.pod_namespace),
                names.intern(&o.ifname),
                names.intern(&o.node),
                names.intern(&o.network),
            ],
            own: own.into_boxed_slice(),
            lens: [len(&o.pod_name), len(&o.pod_uid)],
            created: o.created,
            revision: l.revision,
            clean_gateway: l.clean_gateway,
            hex: packed.is_some(),
        }
    }

    /// The three parts of `own`: pod name, pod UID (text) and the container id as stored.
    fn parts(&self) -> (&str, &str, &[u8]) {
        let (a, b) = (self.lens[0] as usize, self.lens[1] as usize);
        let (name, rest) = self.own.split_at(a.min(self.own.len()));
        let (uid, container) = rest.split_at(b.min(rest.len()));
        // Both were whole `str`s when stored (a lengths cut on their boundaries): valid UTF-8.
        (
            std::str::from_utf8(name).unwrap_or_default(),
            std::str::from_utf8(uid).unwrap_or_default(),
            container,
        )
    }

    pub(super) fn pod_name(&self) -> &str {
        self.parts().0
    }

    fn container_id(&self) -> Cow<'_, str> {
        let c = self.parts().2;
        if self.hex {
            Cow::Owned(unpack_hex(c))
        } else {
            Cow::Borrowed(std::str::from_utf8(c).unwrap_or_default())
        }
    }

    /// The container-index key of the record's container id: a packed id of up to 64 bytes is
    /// spelled out on the stack (a release costs no allocation for it).
    pub(super) fn container_key(&self) -> u64 {
        let c = self.parts().2;
        let mut buf = [0u8; 128];
        if !self.hex || c.len() * 2 > buf.len() {
            return container_key(&self.container_id());
        }
        for (slot, d) in buf.iter_mut().zip(hex_digits(c)) {
            *slot = d;
        }
        container_key(std::str::from_utf8(&buf[..c.len() * 2]).unwrap_or_default())
    }

    /// Whether the record's container id is `id` (without unpacking it).
    pub(super) fn container_is(&self, id: &str) -> bool {
        let c = self.parts().2;
        if self.hex {
            pack_hex(id).is_some_and(|p| p == c)
        } else {
            c == id.as_bytes()
        }
    }

    pub(super) fn name<'a>(&self, names: &'a Names, which: usize) -> &'a std::sync::Arc<str> {
        names.get(self.names[which])
    }

    pub(super) fn lease(&self, ip: IpAddr, names: &Names) -> Lease {
        let (pod_name, pod_uid, _) = self.parts();
        let name = |which| self.name(names, which).to_string();
        Lease {
            ip,
            pool: name(POOL),
            owner: Owner {
                pod_namespace: name(NAMESPACE),
                pod_name: pod_name.to_string(),
                pod_uid: pod_uid.to_string(),
                container_id: self.container_id().into_owned(),
                ifname: name(IFNAME),
                node: name(NODE),
                network: name(NETWORK),
                created: self.created,
            },
            clean_gateway: self.clean_gateway,
            revision: self.revision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, uid: &str, container: &str) -> Lease {
        Lease {
            ip: "10.0.0.1".parse().expect("ip"),
            pool: "p".into(),
            owner: Owner {
                pod_namespace: "ns".into(),
                pod_name: name.into(),
                pod_uid: uid.into(),
                container_id: container.into(),
                ifname: "eth0".into(),
                node: "n1".into(),
                network: "net".into(),
                created: 7,
            },
            clean_gateway: true,
            revision: 3,
        }
    }

    #[test]
    fn every_record_comes_back_as_it_went_in() {
        let hex64 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let cases = [
            ("web-0", "6a1c3c5e-0b1d-4a7e-9f2d-3c4b5a697887", hex64),
            ("web-0", "", "ABCDEF"),       // uppercase hex: kept as text
            ("ünïcödé-pod", "uid", "abc"), // odd length
            ("", "", ""),
            ("p", "u", "not hex at all"),
            ("p", "u", "0a"),
        ];
        let mut names = Names::default();
        for (name, uid, container) in cases {
            let l = lease(name, uid, container);
            let s = Stored::new(l.clone(), &mut names);
            assert_eq!(s.lease(l.ip, &names), l, "{container:?}");
            assert!(s.container_is(container));
            assert_eq!(s.container_key(), container_key(container));
            assert!(!s.container_is(&format!("{container}0")));
            assert_eq!(s.pod_name(), name);
        }
        let packed = Stored::new(lease("a", "b", hex64), &mut names);
        assert!(packed.hex);
        assert_eq!(
            packed.own.len(),
            2 + 32,
            "a 64-hex container id takes 32 bytes"
        );
        assert!(!Stored::new(lease("a", "b", "ABCDEF"), &mut names).hex);
        assert!(!packed.container_is(&hex64.to_uppercase()));
    }

    #[test]
    fn names_are_kept_once() {
        let mut names = Names::default();
        let a = names.intern("pool-a");
        assert_eq!(names.intern("pool-b"), a + 1);
        assert_eq!(names.intern("pool-a"), a);
        assert_eq!(&**names.get(a), "pool-a");
    }
}
