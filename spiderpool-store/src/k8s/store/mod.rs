//! The Kubernetes store: allocation records in the API server, in [`SpiderIPBlock`] objects.
//!
//! # Layout
//! Every address belongs to one aligned block of [`BLOCK`] addresses (`10.6.168.64-79` is the
//! object `v4-10-6-168-64`), whatever pool it came from: address uniqueness across the cluster is
//! a compare-and-swap (`resourceVersion`) on that one object, and no object ever holds more than
//! [`BLOCK`] records, however large the pool. Store revisions are the API server's
//! `resourceVersion`s (etcd revisions), so listings and pool revisions share one space.
//!
//! # Reads
//! One watch over the blocks keeps a mirror ([`LeaseTable`]) with every index the engine needs;
//! reads cost no round trip. The mirror may lag other writers by the watch delay: a stale read
//! costs one refused write (409), after which only the block that changed is read again.
//!
//! # Writes, and what a crash leaves
//! The API server has no multi-object transaction. A transaction is planned against the mirror
//! (conflicts refuse it before anything is written), then written block by block in address
//! order: first every block that gains records (claims), then every block that loses records
//! (releases). Each block write re-checks its own records, so a race lost to another writer is
//! found there; the blocks already written for the transaction are then rolled back and the
//! transaction answers `Conflict` with the holder. Every record names its attachment
//! (container, interface), so a writer killed between two block writes leaves only records that
//! look exactly like an ADD the runtime never saw answered: a retried ADD completes them (the
//! engine claims only what is missing), the DEL the runtime sends after a failed ADD frees them,
//! and GC frees them once the pod is gone. A release cut short is finished by the next DEL.
//! Claims of one container are serialized in this process (one node's agent owns a container),
//! which keeps "one address per NIC and family" across blocks.
//!
//! The pool's status (`allocatedIPCount`, `allocatedIPs`, `totalIPCount`) is a projection the
//! store writes in the background, at most once per interval, and only forward
//! (`status.allocatedRevision`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, PostParams};
use kube::Client;
use spiderpool_core::store::{
    Affinity, Conflict, Filter, Lease, LeaseStore, Listing, Outcome, PoolAddresses, Release,
    StoreError, Txn,
};

mod affinity;
mod mirror;
mod records;
mod status;
mod watch;

pub use mirror::block_of;

use super::crd::{Slot, SpiderIPBlock, SpiderIPBlockSpec, SpiderIPPool};
use mirror::{rv_of, Mirror};
use records::{claim_into, release_from, to_record};
use status::project_statuses;
use watch::watch_blocks;

/// Addresses per block object. Smaller blocks are cheaper writes for the API server (it decodes,
/// stores and sends every watcher the whole object): 16 cost 6.5x less API server + etcd CPU per
/// allocation than Spiderpool's loop at 4 agents, 64 only 3.3x (docs/benchmarks.md).
pub const BLOCK: u128 = 16;
/// `allocatedIPs` is written while a pool holds at most this many records (about 400 KiB);
/// above, it is left out and `allocatedIPCount` alone tells (the records are in the blocks).
pub const ALLOCATED_IPS_LIMIT: usize = 4096;
/// Attempts of one block write before the store reports itself unavailable.
const WRITE_ATTEMPTS: u32 = 12;

/// How the store runs.
#[derive(Debug, Clone)]
pub struct KubeStoreOptions {
    /// The API server's address, named in errors.
    pub server: String,
    /// How often pool statuses are brought up to date (`None`: never, for tools and tests that
    /// only read).
    pub status_interval: Option<Duration>,
    /// The longest one request to the API server may take: a connection that silently stops
    /// answering costs this, not the kernel's TCP timeout (about 15 minutes).
    pub request_timeout: Duration,
    /// The longest one block write may take, retries included; well below the CNI plugin's
    /// 60 s, so an ADD answers "unavailable, try again" (code 11) instead of timing out.
    pub write_deadline: Duration,
    /// The node this store allocates for, when blocks are node-affine: a block nobody owns
    /// becomes this node's when this store writes a record into it, and the engine allocates in
    /// this node's blocks first ([`spiderpool_core::store::Affinity`]). None: blocks are
    /// neither claimed nor preferred (tools, and the store before node-affine blocks).
    pub node: Option<String>,
    /// How long one of this node's blocks stays empty before it is given back (deleted, so
    /// another node can own it).
    pub return_after: Duration,
}

impl Default for KubeStoreOptions {
    fn default() -> Self {
        KubeStoreOptions {
            server: "the API server".into(),
            status_interval: Some(Duration::from_secs(1)),
            request_timeout: Duration::from_secs(10),
            write_deadline: Duration::from_secs(30),
            node: None,
            return_after: Duration::from_secs(60),
        }
    }
}

/// Allocation records in the API server (see the module docs).
#[derive(Clone)]
pub struct KubeStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("server", &self.inner.opts.server)
            .field("records", &self.inner.lock().table.len())
            .finish()
    }
}

struct Inner {
    blocks: Api<SpiderIPBlock>,
    pools: Api<SpiderIPPool>,
    opts: KubeStoreOptions,
    mirror: Mutex<Mirror>,
    containers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Changes waiting for each block: concurrent transactions of this agent that touch one
    /// block are written together, in one compare-and-swap.
    queues: Mutex<HashMap<String, BlockQueue>>,
    /// Refused block writes (409), for benchmarks and metrics.
    conflicts: AtomicU64,
    /// Block writes that reached the server.
    writes: AtomicU64,
    /// Pools this store changed (or tried to) since their status was last projected: each
    /// agent projects only its own changes, so the API load of status writes does not grow with
    /// the number of agents.
    touched: Mutex<BTreeSet<String>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// One transaction's change to one block.
enum Edit {
    /// Records to add; a record of another holder refuses all, unless one of the releases
    /// names that holder (a move: the record is replaced).
    Claim(Vec<Lease>, Vec<Release>),
    Release(Vec<Release>),
    /// Undoes a claim: removes the claimed records, puts back those it replaced.
    Undo(Vec<Release>, Vec<Lease>),
}

/// What an edit did.
enum Done {
    /// Claimed; the records a move replaced.
    Claimed(Vec<Lease>),
    Released(Vec<Lease>),
}

type Reply = Result<Result<(u64, Done), Vec<Conflict>>, StoreError>;

#[derive(Default)]
struct BlockQueue {
    busy: bool,
    waiting: Vec<(Edit, tokio::sync::oneshot::Sender<Reply>)>,
}

/// A call to the API server that gives up after `limit` (a retryable error, as a refused
/// connection is).
pub(crate) async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r,
        Err(_) => Err(kube::Error::Service(
            format!("no answer within {} ms", limit.as_millis()).into(),
        )),
    }
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl KubeStore {
    /// Reads every block (a consistent list), starts the watch that keeps the mirror current
    /// and, with `status_interval`, the pool-status writer.
    pub async fn connect(client: Client, opts: KubeStoreOptions) -> Result<KubeStore, StoreError> {
        let inner = Arc::new(Inner {
            blocks: Api::all(client.clone()),
            pools: Api::all(client),
            opts: opts.clone(),
            mirror: Mutex::new(Mirror::new(opts.node.clone())),
            containers: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            conflicts: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            touched: Mutex::new(BTreeSet::new()),
            tasks: Mutex::new(Vec::new()),
        });
        let rv = inner.load().await?;
        // Once after a start: a change this agent made just before it died is projected too.
        let pools: BTreeSet<String> = inner.lock().table.pool_names();
        *inner.touched.lock().unwrap_or_else(|p| p.into_inner()) = pools;
        let store = KubeStore { inner };
        let w = Arc::downgrade(&store.inner);
        let watch = tokio::spawn(watch_blocks(w, rv));
        let mut tasks = vec![watch];
        if let Some(every) = store.inner.opts.status_interval {
            tasks.push(tokio::spawn(project_statuses(
                Arc::downgrade(&store.inner),
                every,
            )));
        }
        if store.inner.opts.node.is_some() {
            tasks.push(tokio::spawn(affinity::return_idle(Arc::downgrade(
                &store.inner,
            ))));
        }
        store.inner.lock_tasks().extend(tasks);
        Ok(store)
    }

    /// Block writes refused with 409 since the store was opened (lost races).
    pub fn conflicts(&self) -> u64 {
        self.inner.conflicts.load(Ordering::Relaxed)
    }

    /// Block writes sent since the store was opened.
    pub fn writes(&self) -> u64 {
        self.inner.writes.load(Ordering::Relaxed)
    }

    /// Brings the status of `pool` up to date now (tests and tools; the store does it in the
    /// background).
    pub async fn write_status(&self, pool: &str) -> Result<bool, StoreError> {
        self.inner.project(pool, None).await
    }

    /// Tests: a second watch of the blocks from resourceVersion `rv` (an expired one makes it
    /// list again, as after a long disconnection).
    #[cfg(feature = "testing")]
    pub fn watch_from(&self, rv: &str) {
        let w = Arc::downgrade(&self.inner);
        let t = tokio::spawn(watch_blocks(w, rv.to_string()));
        self.inner.lock_tasks().push(t);
    }

    /// Tests: takes `block` into the mirror as if it had been read from the server.
    #[cfg(feature = "testing")]
    pub fn absorb(&self, block: &SpiderIPBlock) {
        self.inner.lock().absorb(block);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self.lock_tasks().drain(..) {
            t.abort();
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Mirror> {
        self.mirror.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Vec<tokio::task::JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unavailable(&self, what: &str, e: kube::Error) -> StoreError {
        StoreError::unavailable(format!("{what} at {}", self.opts.server), e)
    }

    /// The first read: every block into a fresh mirror; returns the listing's resourceVersion,
    /// where the watch starts.
    async fn load(&self) -> Result<String, StoreError> {
        let mut mirror = Mirror::new(self.opts.node.clone());
        let rv = watch::list_blocks(self, |page| {
            for o in page {
                mirror.absorb(o);
            }
        })
        .await?;
        mirror
            .table
            .mirror(&[], Vec::new(), rv.parse::<u64>().unwrap_or(0));
        mirror.table.loaded();
        *self.lock() = mirror;
        Ok(rv)
    }

    async fn container_lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.containers.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 4096 {
                map.retain(|_, m| Arc::strong_count(m) > 1);
            }
            map.entry(id.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }

    /// Reads one block from the server into the mirror (after a refused write).
    async fn refresh(&self, name: &str) -> Result<(), StoreError> {
        match within(self.opts.request_timeout, self.blocks.get_opt(name)).await {
            Ok(Some(o)) => self.lock().absorb(&o),
            Ok(None) => {
                let rv = self.lock().table.revision();
                self.lock().forget(name, rv);
            }
            Err(e) => return Err(self.unavailable(&format!("reading SpiderIPBlock {name}"), e)),
        }
        Ok(())
    }

    /// Changes one block with `edit` (which sees the block's current records and says what it
    /// changed), by compare-and-swap, re-reading the block after a lost race. `edit` returns
    /// `Err` to abandon (a conflict it found).
    async fn write_block<T>(
        &self,
        name: &str,
        base: IpAddr,
        mut edit: impl FnMut(&mut BTreeMap<String, Slot>) -> Result<T, Vec<Conflict>>,
    ) -> Result<Result<(u64, T), Vec<Conflict>>, StoreError> {
        let started = std::time::Instant::now();
        for attempt in 0..WRITE_ATTEMPTS {
            if started.elapsed() > self.opts.write_deadline {
                return Err(StoreError::unavailable(
                    format!(
                        "writing SpiderIPBlock {name} at {}: no success within {} s",
                        self.opts.server,
                        self.opts.write_deadline.as_secs()
                    ),
                    "deadline",
                ));
            }
            let current = self.lock().slots(name);
            let (rv, mut records, owner) = current.unwrap_or((0, BTreeMap::new(), None));
            let before = records.clone();
            let out = match edit(&mut records) {
                Ok(out) => out,
                Err(c) => return Ok(Err(c)),
            };
            if records == before {
                return Ok(Ok((rv, out)));
            }
            // A block nobody owns becomes this node's when this node adds a record to it.
            let gained = records.keys().any(|k| !before.contains_key(k));
            let owner = owner.or_else(|| self.opts.node.clone().filter(|_| gained));
            if let Some((key, _)) = records.iter().find(|(_, s)| s.record().is_none()) {
                return Err(StoreError::failed(
                    format!(
                        "SpiderIPBlock {name} holds a slot that is not an allocation record ({key}): fix or remove it (kubectl edit spideripblock {name}); until then the block's records cannot change"
                    ),
                    "unreadable record",
                ));
            }
            let mut obj = SpiderIPBlock::new(
                name,
                SpiderIPBlockSpec {
                    base: base.to_string(),
                    owner,
                    allocations: records,
                },
            );
            self.writes.fetch_add(1, Ordering::Relaxed);
            let limit = self.opts.request_timeout;
            let res = if rv == 0 {
                within(limit, self.blocks.create(&PostParams::default(), &obj)).await
            } else {
                obj.metadata.resource_version = Some(rv.to_string());
                within(
                    limit,
                    self.blocks.replace(name, &PostParams::default(), &obj),
                )
                .await
            };
            match res {
                Ok(o) => {
                    let new_rv = rv_of(&o);
                    self.lock().absorb(&o);
                    return Ok(Ok((new_rv, out)));
                }
                Err(e) => match api_code(&e) {
                    Some(409) | Some(404) => {
                        self.conflicts.fetch_add(1, Ordering::Relaxed);
                        self.refresh(name).await?;
                    }
                    Some(429) | Some(500..=599) | None if attempt + 1 < WRITE_ATTEMPTS => {
                        tracing::debug!(block = name, error = %e, "block write failed; retrying");
                        backoff(attempt).await;
                    }
                    Some(code) if (400..500).contains(&code) && code != 429 => {
                        return Err(StoreError::failed(
                            format!("writing SpiderIPBlock {name} at {}", self.opts.server),
                            e,
                        ))
                    }
                    _ => return Err(self.unavailable(&format!("writing SpiderIPBlock {name}"), e)),
                },
            }
            if attempt >= 2 {
                backoff(attempt - 2).await;
            }
        }
        Err(StoreError::unavailable(
            format!(
                "SpiderIPBlock {name} at {}: {WRITE_ATTEMPTS} writes lost to other writers",
                self.opts.server
            ),
            "too much contention",
        ))
    }

    /// Queues `edit` for block `name`; the first caller of a burst writes for all (in a task
    /// of its own, so a caller that goes away does not strand the others).
    async fn submit(self: &Arc<Self>, name: &str, base: IpAddr, edit: Edit) -> Reply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lead = {
            let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            let e = q.entry(name.to_string()).or_default();
            e.waiting.push((edit, tx));
            !std::mem::replace(&mut e.busy, true)
        };
        if lead {
            tokio::spawn(self.clone().drain(name.to_string(), base));
        }
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::unavailable(
                format!("writing SpiderIPBlock {name}: the writer stopped"),
                "cancelled",
            ))
        })
    }

    /// Writes the queued edits of one block, a batch per compare-and-swap, until none wait.
    async fn drain(self: Arc<Self>, name: String, base: IpAddr) {
        loop {
            let batch = {
                let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                let Some(e) = q.get_mut(&name) else { return };
                let batch = std::mem::take(&mut e.waiting);
                if batch.is_empty() {
                    q.remove(&name);
                    return;
                }
                batch
            };
            let (edits, replies): (Vec<Edit>, Vec<_>) = batch.into_iter().unzip();
            let res = self
                .write_block(&name, base, |recs| {
                    Ok(edits
                        .iter()
                        .map(|e| match e {
                            Edit::Claim(l, movable) => {
                                claim_into(recs, l, movable).map(Done::Claimed)
                            }
                            Edit::Release(r) => Ok(Done::Released(release_from(recs, r))),
                            Edit::Undo(r, back) => {
                                release_from(recs, r);
                                for l in back {
                                    recs.entry(l.ip.to_string())
                                        .or_insert_with(|| Slot::Record(to_record(l)));
                                }
                                Ok(Done::Released(Vec::new()))
                            }
                        })
                        .collect::<Vec<_>>())
                })
                .await;
            match res {
                Ok(Ok((rv, outs))) => {
                    for (tx, out) in replies.into_iter().zip(outs) {
                        let _ = tx.send(Ok(out.map(|d| (rv, d))));
                    }
                }
                Ok(Err(_)) => {}
                Err(e) => {
                    let msg = e.to_string();
                    let retry = e.is_retryable();
                    for tx in replies {
                        let err = if retry {
                            StoreError::unavailable(msg.clone(), "block write failed")
                        } else {
                            StoreError::failed(msg.clone(), "block write failed")
                        };
                        let _ = tx.send(Err(err));
                    }
                }
            }
        }
    }

    /// Plans `txn` against the mirror; the pools it would change are marked for the status
    /// projector.
    fn plan(&self, txn: &Txn) -> Result<spiderpool_core::store::Changes, Vec<Conflict>> {
        let m = self.lock();
        let planned = m.table.plan(txn);
        if planned.as_ref().is_ok_and(|c| !c.is_empty()) {
            let pools = txn.claims.iter().map(|c| c.pool.clone()).chain(
                txn.releases
                    .iter()
                    .filter_map(|r| m.table.get(&r.ip).map(|l| l.pool)),
            );
            self.touched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(pools);
        }
        planned
    }

    async fn commit(self: &Arc<Self>, txn: Txn) -> Result<Outcome, StoreError> {
        // One container's claims at a time in this process: "one address per NIC and family"
        // spans blocks, so it is checked here, not by the server.
        let mut ids: Vec<&str> = txn
            .claims
            .iter()
            .map(|c| c.owner.container_id.as_str())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut guards = Vec::with_capacity(ids.len());
        for id in ids {
            guards.push(self.container_lock(id).await);
        }
        let changes = match self.plan(&txn) {
            Ok(c) => c,
            Err(conflicts) => return Ok(Outcome::Conflict(conflicts)),
        };
        if changes.is_empty() {
            let revision = self.lock().table.revision();
            return Ok(Outcome::Committed {
                revision,
                released: Vec::new(),
            });
        }
        let mut claims: BTreeMap<String, (IpAddr, Vec<Lease>)> = BTreeMap::new();
        for w in changes.writes {
            let (name, base) = block_of(w.ip);
            claims.entry(name).or_insert((base, Vec::new())).1.push(w);
        }
        let mut releases: BTreeMap<String, (IpAddr, Vec<Release>)> = BTreeMap::new();
        for d in &txn.releases {
            let (name, base) = block_of(d.ip);
            releases
                .entry(name)
                .or_insert((base, Vec::new()))
                .1
                .push(d.clone());
        }
        let mut revision = 0;
        let mut released = Vec::new();
        let mut written: Vec<(String, IpAddr, Vec<Lease>, Vec<Lease>)> = Vec::new();
        for (name, (base, leases)) in claims {
            let movable: Vec<Release> = txn
                .releases
                .iter()
                .filter(|r| leases.iter().any(|l| l.ip == r.ip))
                .cloned()
                .collect();
            let res = self
                .submit(&name, base, Edit::Claim(leases.clone(), movable))
                .await;
            match res {
                Ok(Ok((rv, done))) => {
                    revision = revision.max(rv);
                    let replaced = match done {
                        Done::Claimed(r) => r,
                        Done::Released(_) => Vec::new(),
                    };
                    released.extend(replaced.iter().cloned());
                    written.push((name, base, leases, replaced));
                    crash_point("after-claim-block");
                }
                Ok(Err(conflicts)) => {
                    self.roll_back(&written).await;
                    return Ok(Outcome::Conflict(conflicts));
                }
                Err(e) => {
                    self.roll_back(&written).await;
                    return Err(e);
                }
            }
        }
        for (name, (base, rels)) in releases {
            let res = self.submit(&name, base, Edit::Release(rels)).await;
            match res {
                Ok(Ok((rv, done))) => {
                    revision = revision.max(rv);
                    if let Done::Released(gone) = done {
                        released.extend(gone);
                    }
                    crash_point("after-release-block");
                }
                Ok(Err(_)) => {}
                Err(source) if released.is_empty() => return Err(source),
                Err(source) => {
                    return Err(StoreError::PartiallyReleased {
                        released,
                        source: Box::new(source),
                    })
                }
            }
        }
        drop(guards);
        released.sort_by_key(|l| l.ip);
        Ok(Outcome::Committed { revision, released })
    }

    /// Removes the claims a refused transaction had written (best effort: what a failure here
    /// leaves is what a crash leaves, and is cleaned up the same way).
    async fn roll_back(self: &Arc<Self>, written: &[(String, IpAddr, Vec<Lease>, Vec<Lease>)]) {
        for (name, base, leases, replaced) in written {
            let rels: Vec<Release> = leases.iter().map(Release::from).collect();
            if let Err(e) = self
                .submit(name, *base, Edit::Undo(rels, replaced.clone()))
                .await
            {
                tracing::warn!(block = %name, error = %e, "rolling back a refused transaction failed; DEL or GC frees the records");
            }
        }
    }
}

/// Adds `leases` to a block's records; a record held by another attachment refuses all, unless
/// `movable` releases it (then it is replaced, and returned).
/// Test hook: `SPIDERPOOL_CRASH_AT=<point>` aborts the process there (the crash-point tests kill
/// a writer between two block writes this way).
fn crash_point(point: &str) {
    if std::env::var("SPIDERPOOL_CRASH_AT").is_ok_and(|p| p == point) {
        tracing::error!(point, "SPIDERPOOL_CRASH_AT: aborting");
        std::process::abort();
    }
}

/// Jittered exponential backoff: up to 5 ms << attempt, capped at 1 s.
async fn backoff(attempt: u32) {
    let cap = (5u64 << attempt.min(8)).min(1000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let ms = cap / 2 + (nanos ^ (nanos >> 7)) % (cap / 2 + 1);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[async_trait::async_trait]
impl LeaseStore for KubeStore {
    fn backend(&self) -> &'static str {
        "kube"
    }

    fn mirrors_all_nodes(&self) -> bool {
        true
    }

    fn affinity(&self) -> Option<Affinity> {
        self.inner.lock().affinity()
    }

    fn idle_block_owners(&self) -> Vec<String> {
        self.inner.idle_block_owners()
    }

    async fn return_blocks(&self, gone: &[String]) -> Result<usize, StoreError> {
        self.inner.return_blocks_of(gone).await
    }

    async fn list(&self, filter: Filter<'_>) -> Result<Listing, StoreError> {
        Ok(self.inner.lock().table.list(filter))
    }

    async fn commit(&self, txn: Txn) -> Result<Outcome, StoreError> {
        self.inner.commit(txn).await
    }

    async fn pool_revision(&self, pool: &str) -> Result<u64, StoreError> {
        Ok(self.inner.lock().table.pool_revision(pool))
    }

    async fn pool_addresses(&self, pool: &str) -> Result<PoolAddresses, StoreError> {
        let m = self.inner.lock();
        let mut out = m.table.pool_addresses(pool);
        // A block with an unreadable slot cannot be written: all its addresses are taken, in
        // every pool (the engine and the counts ignore addresses outside a pool's ranges).
        // (Nothing to do, and no sorting on this path of every ADD, while no block is unreadable.)
        if !m.unreadable.is_empty() {
            for name in m.unreadable.keys() {
                out.ips.extend(m.block_addresses(name));
            }
            out.ips.sort_unstable();
            out.ips.dedup();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
