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

mod affinity;
mod memory;
mod table;

pub use affinity::{Affinity, Tier};
pub use memory::MemoryStore;
pub use table::{Batch, Changes, LeaseTable};

use std::net::IpAddr;

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
    /// Records of one pod (namespace, name): indexed by the single-node backends and the
    /// Kubernetes store's mirror; etcd reads every record for it.
    Pod(&'a str, &'a str),
}

impl Filter<'_> {
    /// Whether `lease` passes the filter.
    pub fn matches(&self, lease: &Lease) -> bool {
        match self {
            Filter::All => true,
            Filter::Pool(p) => lease.pool == *p,
            Filter::Container(c) => lease.owner.container_id == *c,
            Filter::Node(n) => lease.owner.node == *n,
            Filter::Pod(ns, name) => {
                lease.owner.pod_namespace == *ns && lease.owner.pod_name == *name
            }
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

/// The addresses a pool holds at one store revision (what a cache rebuild needs: no records).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolAddresses {
    /// Store revision of the read.
    pub revision: u64,
    /// Held addresses, in no particular order.
    pub ips: Vec<IpAddr>,
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

    /// Whether this store holds every node's records in this process, kept current (a shared
    /// store mirrored locally: Kubernetes blocks), so that a listing of all nodes' records is a
    /// memory read. The agent then finds a rescheduled StatefulSet pod's records on other nodes
    /// and collects the records of nodes that are gone. Default: no.
    fn mirrors_all_nodes(&self) -> bool {
        false
    }

    /// Which address blocks this node owns and which other nodes own, for a store whose records
    /// live in node-affine blocks (Kubernetes): the engine then allocates in this node's blocks
    /// first, then in free ones, and borrows in other nodes' blocks last ([`Affinity`]).
    /// Ownership is a preference only: uniqueness is still the store's conditional commit.
    /// Default: none (every address is as good as any other).
    fn affinity(&self) -> Option<Affinity> {
        None
    }

    /// The nodes other than this one that own blocks holding no records: the agent's GC asks
    /// which of them are gone and gives their blocks back ([`LeaseStore::return_blocks`]).
    fn idle_block_owners(&self) -> Vec<String> {
        Vec::new()
    }

    /// Gives back the empty blocks owned by `gone` nodes (conditionally: a block written
    /// meanwhile is kept), so other nodes can own them. Returns how many went back.
    async fn return_blocks(&self, gone: &[String]) -> Result<usize, StoreError> {
        let _ = gone;
        Ok(0)
    }

    /// Reads the records that pass `filter`, consistently, with the store revision.
    async fn list(&self, filter: Filter<'_>) -> Result<Listing, StoreError>;

    /// Applies `txn` atomically (see the module docs for the conditions).
    async fn commit(&self, txn: Txn) -> Result<Outcome, StoreError>;

    /// The addresses `pool` holds, consistently, with the store revision: what the engine reads
    /// to build a pool's cache. The default reads the records; backends override it to skip them
    /// (a 100,000-record pool is 100,000 records to copy, but only 100,000 addresses).
    async fn pool_addresses(&self, pool: &str) -> Result<PoolAddresses, StoreError> {
        let l = self.list(Filter::Pool(pool)).await?;
        Ok(PoolAddresses {
            revision: l.revision,
            ips: l.leases.into_iter().map(|l| l.ip).collect(),
        })
    }

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

    fn mirrors_all_nodes(&self) -> bool {
        (**self).mirrors_all_nodes()
    }
    fn affinity(&self) -> Option<Affinity> {
        (**self).affinity()
    }
    fn idle_block_owners(&self) -> Vec<String> {
        (**self).idle_block_owners()
    }
    async fn return_blocks(&self, gone: &[String]) -> Result<usize, StoreError> {
        (**self).return_blocks(gone).await
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
    async fn pool_addresses(&self, pool: &str) -> Result<PoolAddresses, StoreError> {
        (**self).pool_addresses(pool).await
    }
}
