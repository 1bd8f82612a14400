//! The lease store contract and an in-memory implementation.
//!
//! A store keeps **allocation records** (leases). It never decides which address to hand out; it
//! only applies a transaction atomically, or refuses it and says what was in the way:
//! - a **claim** is create-if-absent on two keys: the address (unique cluster-wide) and the
//!   attachment slot `(container id, ifname, family)`. Re-claiming a record that already holds the
//!   same address for the same attachment is a no-op, so a retried request is harmless.
//! - a **release** is delete-if-owner: it removes the record only while the address is still held
//!   by that attachment; otherwise it does nothing (a late DEL of an old sandbox never frees the
//!   address of its successor). Releases never abort a transaction.
//!
//! All claims of one transaction commit together or not at all, so a dual-stack or multi-NIC
//! request never leaves half an allocation behind. Releases of up to [`ATOMIC_RELEASES`] records
//! commit atomically with the claims on every backend; a larger release (a big GC) may be applied
//! in parts by a backend with a transaction size limit (etcd): when a later part fails, the error
//! is [`StoreError::PartiallyReleased`] and carries the records that *were* released, so the
//! caller's cache never believes a freed address is still held.
//!
//! Every backend also keeps a **pool revision**: the store revision of the last change to a pool's
//! records ([`LeaseStore::pool_revision`], O(1)). The engine compares it with the revision of the
//! listing its cache was built from, so a pool that looks full is re-read only when it changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::range::IpFamily;

/// Boxed error source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Who holds an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    /// Pod namespace.
    pub pod_namespace: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Container (sandbox) ID.
    pub container_id: String,
    /// Interface inside the pod.
    pub ifname: String,
    /// Node that allocated it.
    pub node: String,
    /// The network (CNI config `name`) the address was allocated for; CNI GC of a network only
    /// considers that network's records. Empty when the caller named no network.
    #[serde(default)]
    pub network: String,
    /// Creation time, seconds since the Unix epoch (given by the caller; core reads no clock).
    pub created: u64,
}

impl Owner {
    /// Whether `other` is the same attachment `(container id, ifname)`.
    pub fn same_attachment(&self, other: &Owner) -> bool {
        self.container_id == other.container_id && self.ifname == other.ifname
    }
}

/// One allocation record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// The address (unique across the store).
    pub ip: IpAddr,
    /// Pool it came from.
    pub pool: String,
    /// Holder.
    pub owner: Owner,
    /// Whether the NIC's default route is suppressed (kept so a repeated ADD answers the same).
    #[serde(default)]
    pub clean_gateway: bool,
    /// Store revision that wrote the record (0 in a claim; set by the store).
    #[serde(default)]
    pub revision: u64,
}

impl Lease {
    /// The address family.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.ip)
    }
}

/// Remove `ip` if it is still held by `(container_id, ifname)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Release {
    /// The address.
    pub ip: IpAddr,
    /// Expected holder's container.
    pub container_id: String,
    /// Expected holder's interface.
    pub ifname: String,
}

impl From<&Lease> for Release {
    fn from(l: &Lease) -> Self {
        Release {
            ip: l.ip,
            container_id: l.owner.container_id.clone(),
            ifname: l.owner.ifname.clone(),
        }
    }
}

/// Claims and releases applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    /// Records to create.
    pub claims: Vec<Lease>,
    /// Records to delete (if still owned as stated).
    pub releases: Vec<Release>,
}

/// What stood in the way of a claim. One meaning per variant: the first two name a record that
/// is in the store; the third names a claim of the transaction itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Conflict {
    /// The address is held by another attachment (the current record).
    IpTaken(Lease),
    /// The attachment already holds another address of that family (the current record).
    AttachmentBound(Lease),
    /// The transaction claims this address, or this attachment slot, twice (the second claim).
    /// A caller bug, never a race: retrying the same transaction cannot succeed.
    DuplicateInTxn(Lease),
}

/// Releases that every backend applies in one atomic transaction (etcd's 128-operation limit,
/// four keys per record and one pool-revision key per pool).
pub const ATOMIC_RELEASES: usize = 24;

/// Result of [`LeaseStore::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything applied; durable when the store is durable.
    Committed {
        /// Store revision after the transaction.
        revision: u64,
        /// The records the releases removed.
        released: Vec<Lease>,
    },
    /// Nothing applied.
    Conflict(Vec<Conflict>),
}

/// Which records to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter<'a> {
    /// Every record.
    All,
    /// Records of one pool.
    Pool(&'a str),
    /// Records of one container (sandbox).
    Container(&'a str),
    /// Records allocated by one node.
    Node(&'a str),
}

impl Filter<'_> {
    /// Whether `lease` passes the filter.
    pub fn matches(&self, lease: &Lease) -> bool {
        match self {
            Filter::All => true,
            Filter::Pool(p) => lease.pool == *p,
            Filter::Container(c) => lease.owner.container_id == *c,
            Filter::Node(n) => lease.owner.node == *n,
        }
    }
}

/// A consistent read: the records and the store revision they reflect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Store revision of the read.
    pub revision: u64,
    /// Records, sorted by address.
    pub leases: Vec<Lease>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or is overloaded now; the same request may succeed later
    /// (CNI error code 11). The transaction may or may not have been applied: claims are
    /// idempotent, so retrying is safe.
    #[error("lease store unavailable ({message}{}); try again", cause(source))]
    Unavailable {
        /// What happened.
        message: String,
        /// Cause.
        #[source]
        source: Option<BoxError>,
    },
    /// The store failed in a way retrying will not fix.
    #[error("lease store failed: {message}{}", cause(source))]
    Failed {
        /// What happened.
        message: String,
        /// Cause.
        #[source]
        source: Option<BoxError>,
    },
    /// A release too large for one transaction was applied in parts and a later part failed:
    /// `released` were freed (the caller must treat them as gone), the rest were not.
    #[error("released {} records, then: {source}", released.len())]
    PartiallyReleased {
        /// Records the applied parts removed.
        released: Vec<Lease>,
        /// Why the next part failed.
        #[source]
        source: Box<StoreError>,
    },
    /// A stored record cannot be decoded.
    #[error("lease store holds a corrupt record at {key}: {message}")]
    Corrupt {
        /// Key of the record.
        key: String,
        /// Decoding error.
        message: String,
    },
}

/// `: <cause>` for messages that must stand alone (CNI error strings, logs without chains).
fn cause(source: &Option<BoxError>) -> String {
    source
        .as_ref()
        .map(|s| format!(": {s}"))
        .unwrap_or_default()
}

impl StoreError {
    /// Whether retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Unavailable { .. } => true,
            StoreError::PartiallyReleased { source, .. } => source.is_retryable(),
            _ => false,
        }
    }

    /// Records a failed release removed before it failed (see [`StoreError::PartiallyReleased`]).
    pub fn released(&self) -> &[Lease] {
        match self {
            StoreError::PartiallyReleased { released, .. } => released,
            _ => &[],
        }
    }

    /// A retryable error.
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A non-retryable error.
    pub fn failed(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Failed {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

/// Versioned reads and atomic conditional writes of allocation records.
#[async_trait::async_trait]
pub trait LeaseStore: Send + Sync {
    /// Short backend name for messages and metrics (`memory`, `embedded`, `etcd`, ...).
    fn backend(&self) -> &'static str;

    /// Reads the records that pass `filter`, consistently, with the store revision.
    async fn list(&self, filter: Filter<'_>) -> Result<Listing, StoreError>;

    /// Applies `txn` atomically (see the module docs for the conditions).
    async fn commit(&self, txn: Txn) -> Result<Outcome, StoreError>;

    /// The store revision of the last change to `pool`'s records, in the revision space of
    /// [`Listing::revision`]; at most the current revision, and never below that of a change
    /// made to the pool. Costs O(1) records (one small read on network stores).
    async fn pool_revision(&self, pool: &str) -> Result<u64, StoreError>;
}

#[async_trait::async_trait]
impl<S: LeaseStore + ?Sized> LeaseStore for std::sync::Arc<S> {
    fn backend(&self) -> &'static str {
        (**self).backend()
    }
    async fn list(&self, filter: Filter<'_>) -> Result<Listing, StoreError> {
        (**self).list(filter).await
    }
    async fn commit(&self, txn: Txn) -> Result<Outcome, StoreError> {
        (**self).commit(txn).await
    }
    async fn pool_revision(&self, pool: &str) -> Result<u64, StoreError> {
        (**self).pool_revision(pool).await
    }
}

/// The state every single-node backend keeps: records by address, indexed by attachment slot,
/// container, pool and node, so every [`Filter`] costs the records it returns. Shared by
/// [`MemoryStore`] and the embedded backend's in-memory mirror.
#[derive(Debug, Clone, Default)]
pub struct LeaseTable {
    by_ip: BTreeMap<IpAddr, Lease>,
    by_attachment: HashMap<(String, String, IpFamily), IpAddr>,
    by_container: HashMap<String, BTreeSet<IpAddr>>,
    by_pool: HashMap<String, BTreeSet<IpAddr>>,
    by_node: HashMap<String, BTreeSet<IpAddr>>,
    /// Revision of the last change to each pool since `base_revision`.
    pool_changed: HashMap<String, u64>,
    /// Revision when the table was created or loaded: changes before it are not tracked per pool.
    base_revision: u64,
    revision: u64,
    /// Records examined by `list` (evidence for the index tests).
    visited: Counter,
}

/// A relaxed atomic counter that clones by value.
#[derive(Debug, Default)]
struct Counter(std::sync::atomic::AtomicU64);

impl Clone for Counter {
    fn clone(&self) -> Self {
        Counter(std::sync::atomic::AtomicU64::new(self.get()))
    }
}

impl Counter {
    fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn add(&self, n: u64) {
        self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Adds `ip` to the set of `key` in `index`.
fn index_insert(index: &mut HashMap<String, BTreeSet<IpAddr>>, key: &str, ip: IpAddr) {
    index.entry(key.to_string()).or_default().insert(ip);
}

/// Removes `ip` from the set of `key` in `index`, dropping empty sets.
fn index_remove(index: &mut HashMap<String, BTreeSet<IpAddr>>, key: &str, ip: &IpAddr) {
    if let Some(set) = index.get_mut(key) {
        set.remove(ip);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

impl LeaseTable {
    /// An empty table at revision `revision`.
    pub fn new(revision: u64) -> Self {
        LeaseTable {
            revision,
            base_revision: revision,
            ..Default::default()
        }
    }

    /// Marks the end of loading: changes from now on are tracked per pool, and every pool counts
    /// as changed at the current revision (what happened before the load is unknown).
    pub fn loaded(&mut self) {
        self.base_revision = self.revision;
        self.pool_changed.clear();
    }

    /// The revision of the last change to `pool` (see [`LeaseStore::pool_revision`]).
    pub fn pool_revision(&self, pool: &str) -> u64 {
        self.pool_changed
            .get(pool)
            .copied()
            .unwrap_or(self.base_revision)
    }

    /// Records examined by [`LeaseTable::list`] since the table was made.
    pub fn records_visited(&self) -> u64 {
        self.visited.get()
    }

    /// Current revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// Whether there is no record.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// Inserts a record as loaded from durable storage (no conditions checked).
    pub fn load(&mut self, lease: Lease) {
        self.revision = self.revision.max(lease.revision);
        self.index(&lease);
        self.by_ip.insert(lease.ip, lease);
    }

    fn index(&mut self, l: &Lease) {
        self.by_attachment.insert(
            (
                l.owner.container_id.clone(),
                l.owner.ifname.clone(),
                l.family(),
            ),
            l.ip,
        );
        index_insert(&mut self.by_container, &l.owner.container_id, l.ip);
        index_insert(&mut self.by_pool, &l.pool, l.ip);
        index_insert(&mut self.by_node, &l.owner.node, l.ip);
    }

    fn unindex(&mut self, l: &Lease) {
        self.by_attachment.remove(&(
            l.owner.container_id.clone(),
            l.owner.ifname.clone(),
            l.family(),
        ));
        index_remove(&mut self.by_container, &l.owner.container_id, &l.ip);
        index_remove(&mut self.by_pool, &l.pool, &l.ip);
        index_remove(&mut self.by_node, &l.owner.node, &l.ip);
    }

    /// Reads records, sorted by address; costs the records returned (every filter is indexed).
    pub fn list(&self, filter: Filter<'_>) -> Listing {
        let index = match filter {
            Filter::All => None,
            Filter::Container(c) => Some(self.by_container.get(c)),
            Filter::Pool(p) => Some(self.by_pool.get(p)),
            Filter::Node(n) => Some(self.by_node.get(n)),
        };
        let leases: Vec<Lease> = match index {
            None => self.by_ip.values().cloned().collect(),
            Some(ips) => ips
                .into_iter()
                .flatten()
                .filter_map(|ip| self.by_ip.get(ip).cloned())
                .collect(),
        };
        self.visited.add(leases.len() as u64);
        Listing {
            revision: self.revision,
            leases,
        }
    }

    /// Checks `txn` without applying it: the conflicts, or the changes it would make, with
    /// revisions assigned.
    pub fn plan(&self, txn: &Txn) -> Result<Changes, Vec<Conflict>> {
        let next = self.revision + 1;
        let mut conflicts = Vec::new();
        let mut writes = Vec::new();
        let mut seen_ips = BTreeSet::new();
        let mut seen_slots = BTreeSet::new();
        for c in &txn.claims {
            let slot = (
                c.owner.container_id.clone(),
                c.owner.ifname.clone(),
                c.family(),
            );
            if !seen_ips.insert(c.ip) || !seen_slots.insert(slot.clone()) {
                // Two claims in one transaction for one address or slot: refuse the second.
                conflicts.push(Conflict::DuplicateInTxn(c.clone()));
                continue;
            }
            if let Some(cur) = self.by_ip.get(&c.ip) {
                if !cur.owner.same_attachment(&c.owner) {
                    conflicts.push(Conflict::IpTaken(cur.clone()));
                }
                continue; // same attachment: idempotent no-op
            }
            if let Some(ip) = self.by_attachment.get(&slot) {
                if let Some(cur) = self.by_ip.get(ip) {
                    conflicts.push(Conflict::AttachmentBound(cur.clone()));
                }
                continue;
            }
            let mut l = c.clone();
            l.revision = next;
            writes.push(l);
        }
        if !conflicts.is_empty() {
            return Err(conflicts);
        }
        let mut del: BTreeMap<IpAddr, Lease> = BTreeMap::new();
        for r in &txn.releases {
            if let Some(cur) = self.by_ip.get(&r.ip) {
                if cur.owner.container_id == r.container_id && cur.owner.ifname == r.ifname {
                    del.insert(cur.ip, cur.clone());
                }
            }
        }
        Ok(Changes {
            writes,
            deletes: del.into_values().collect(),
        })
    }

    /// Applies changes produced by [`LeaseTable::plan`]; returns the new revision.
    pub fn apply(&mut self, changes: &Changes) -> u64 {
        if changes.is_empty() {
            return self.revision;
        }
        self.revision += 1;
        let rev = self.revision;
        for d in &changes.deletes {
            if let Some(old) = self.by_ip.remove(&d.ip) {
                self.unindex(&old);
                self.pool_changed.insert(old.pool, rev);
            }
        }
        for w in &changes.writes {
            self.index(w);
            self.pool_changed.insert(w.pool.clone(), rev);
            self.by_ip.insert(w.ip, w.clone());
        }
        self.revision
    }

    /// Plans and applies `txn`.
    pub fn commit(&mut self, txn: &Txn) -> Outcome {
        match self.plan(txn) {
            Ok(changes) => {
                let revision = self.apply(&changes);
                Outcome::Committed {
                    revision,
                    released: changes.deletes,
                }
            }
            Err(c) => Outcome::Conflict(c),
        }
    }
}

/// What an accepted transaction changes (from [`LeaseTable::plan`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Records to create, with their new revision.
    pub writes: Vec<Lease>,
    /// Records to delete, as they are now.
    pub deletes: Vec<Lease>,
}

impl Changes {
    /// Whether nothing changes (an idempotent re-claim, a release of nothing).
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.deletes.is_empty()
    }
}

/// A store in process memory: for tests and for embedding where persistence lives elsewhere.
#[derive(Debug, Default)]
pub struct MemoryStore {
    table: Mutex<LeaseTable>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseTable> {
        // A panic while holding the lock cannot leave the table half-updated (apply is
        // infallible), so a poisoned lock is still safe to use.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl LeaseStore for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn list(&self, filter: Filter<'_>) -> Result<Listing, StoreError> {
        Ok(self.lock().list(filter))
    }

    async fn commit(&self, txn: Txn) -> Result<Outcome, StoreError> {
        Ok(self.lock().commit(&txn))
    }

    async fn pool_revision(&self, pool: &str) -> Result<u64, StoreError> {
        Ok(self.lock().pool_revision(pool))
    }
}

impl MemoryStore {
    /// Records examined by listings so far (the cost of reads, for tests).
    pub fn records_visited(&self) -> u64 {
        self.lock().records_visited()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(n: u32, pool: &str, node: &str) -> Lease {
        Lease {
            ip: IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n)),
            pool: pool.into(),
            owner: Owner {
                pod_namespace: "ns".into(),
                pod_name: format!("p{n}"),
                pod_uid: "u".into(),
                container_id: format!("c{n}"),
                ifname: "eth0".into(),
                node: node.into(),
                network: "net".into(),
                created: 0,
            },
            clean_gateway: false,
            revision: 0,
        }
    }

    #[test]
    fn pool_and_node_listings_cost_their_own_records() {
        let mut t = LeaseTable::new(0);
        let mut claims: Vec<Lease> = (0..10_000).map(|n| lease(n, "big", "n1")).collect();
        claims.extend((10_000..10_003).map(|n| lease(n, "small", "n2")));
        assert!(matches!(
            t.commit(&Txn {
                claims,
                releases: vec![]
            }),
            Outcome::Committed { .. }
        ));
        let before = t.records_visited();
        assert_eq!(t.list(Filter::Pool("small")).leases.len(), 3);
        assert_eq!(t.list(Filter::Node("n2")).leases.len(), 3);
        assert_eq!(t.list(Filter::Pool("none")).leases.len(), 0);
        assert_eq!(
            t.records_visited() - before,
            6,
            "a pool or node listing walked other pools' records"
        );
        // The indexes follow releases.
        t.commit(&Txn {
            claims: vec![],
            releases: vec![Release::from(&lease(10_001, "small", "n2"))],
        });
        let ips: Vec<String> = t
            .list(Filter::Pool("small"))
            .leases
            .iter()
            .map(|l| l.ip.to_string())
            .collect();
        assert_eq!(ips, ["10.0.39.16", "10.0.39.18"]);
        assert_eq!(t.list(Filter::Node("n2")).leases.len(), 2);
    }

    #[test]
    fn pool_revision_starts_at_the_load_revision() {
        let mut t = LeaseTable::new(0);
        let mut l = lease(1, "p", "n");
        l.revision = 41;
        t.load(l);
        t.loaded();
        assert_eq!(t.pool_revision("p"), 41);
        assert_eq!(t.pool_revision("never-seen"), 41);
    }
}
