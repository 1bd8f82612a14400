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
//! All claims and releases of one transaction commit together or not at all, so a dual-stack or
//! multi-NIC request never leaves half an allocation behind.

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

/// What stood in the way of a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Conflict {
    /// The address is held by another attachment (the current record).
    IpTaken(Lease),
    /// The attachment already holds another address of that family (the current record).
    AttachmentBound(Lease),
}

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
        matches!(self, StoreError::Unavailable { .. })
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
}

/// The state every single-node backend keeps: records by address plus an attachment index.
/// Shared by [`MemoryStore`] and the embedded backend's in-memory mirror.
#[derive(Debug, Clone, Default)]
pub struct LeaseTable {
    by_ip: BTreeMap<IpAddr, Lease>,
    by_attachment: HashMap<(String, String, IpFamily), IpAddr>,
    by_container: HashMap<String, BTreeSet<IpAddr>>,
    revision: u64,
}

impl LeaseTable {
    /// An empty table at revision `revision`.
    pub fn new(revision: u64) -> Self {
        LeaseTable {
            revision,
            ..Default::default()
        }
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
        self.by_container
            .entry(l.owner.container_id.clone())
            .or_default()
            .insert(l.ip);
    }

    fn unindex(&mut self, l: &Lease) {
        self.by_attachment.remove(&(
            l.owner.container_id.clone(),
            l.owner.ifname.clone(),
            l.family(),
        ));
        if let Some(set) = self.by_container.get_mut(&l.owner.container_id) {
            set.remove(&l.ip);
            if set.is_empty() {
                self.by_container.remove(&l.owner.container_id);
            }
        }
    }

    /// Reads records.
    pub fn list(&self, filter: Filter<'_>) -> Listing {
        let leases = match filter {
            Filter::Container(c) => self
                .by_container
                .get(c)
                .into_iter()
                .flatten()
                .filter_map(|ip| self.by_ip.get(ip).cloned())
                .collect(),
            f => self
                .by_ip
                .values()
                .filter(|l| f.matches(l))
                .cloned()
                .collect(),
        };
        Listing {
            revision: self.revision,
            leases,
        }
    }

    /// Checks `txn` without applying it: the conflicts, and the changes it would make
    /// (records to write, records to delete), with revisions assigned.
    pub fn plan(&self, txn: &Txn) -> Result<(Vec<Lease>, Vec<Lease>), Vec<Conflict>> {
        let next = self.revision + 1;
        let mut conflicts = Vec::new();
        let mut writes = Vec::new();
        let mut seen_ips = BTreeSet::new();
        let mut seen_slots = BTreeSet::new();
        for c in &txn.claims {
            if let Some(cur) = self.by_ip.get(&c.ip) {
                if !cur.owner.same_attachment(&c.owner) {
                    conflicts.push(Conflict::IpTaken(cur.clone()));
                }
                continue; // same attachment: idempotent no-op
            }
            let slot = (
                c.owner.container_id.clone(),
                c.owner.ifname.clone(),
                c.family(),
            );
            if let Some(ip) = self.by_attachment.get(&slot) {
                if let Some(cur) = self.by_ip.get(ip) {
                    conflicts.push(Conflict::AttachmentBound(cur.clone()));
                }
                continue;
            }
            if !seen_ips.insert(c.ip) || !seen_slots.insert(slot) {
                // Two claims in one transaction for one address or slot: refuse the second.
                conflicts.push(Conflict::IpTaken(c.clone()));
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
        Ok((writes, del.into_values().collect()))
    }

    /// Applies changes produced by [`LeaseTable::plan`]; returns the new revision.
    pub fn apply(&mut self, writes: Vec<Lease>, deletes: &[Lease]) -> u64 {
        if writes.is_empty() && deletes.is_empty() {
            return self.revision;
        }
        self.revision += 1;
        for d in deletes {
            if let Some(old) = self.by_ip.remove(&d.ip) {
                self.unindex(&old);
            }
        }
        for w in writes {
            self.index(&w);
            self.by_ip.insert(w.ip, w);
        }
        self.revision
    }

    /// Plans and applies `txn`.
    pub fn commit(&mut self, txn: &Txn) -> Outcome {
        match self.plan(txn) {
            Ok((writes, deletes)) => {
                let revision = self.apply(writes, &deletes);
                Outcome::Committed {
                    revision,
                    released: deletes,
                }
            }
            Err(c) => Outcome::Conflict(c),
        }
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
}
