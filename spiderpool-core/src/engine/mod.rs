//! The IPAM engine: allocate, release, check and garbage-collect through a [`LeaseStore`].
//!
//! The engine keeps one [`Allocator`] per pool as a cache of the store, so choosing an address
//! costs no round trip; the store's conditional commit is the only authority. When the cache is
//! stale (another node took the address), the commit reports a conflict, the engine marks the
//! address used and picks again. When a pool looks exhausted the cache is rebuilt from the store
//! before the pool is given up, but only if the store changed the pool since the cache's listing
//! (see [`crate::cache`] for every cache rule).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;

use ipnet::IpNet;

use crate::bitmap::Allocator;
use crate::cache::Caches;
pub use crate::cache::Usage;
use crate::model::{Pool, PoolSet};
use crate::range::{IpFamily, IpSet};
use crate::select::{self, Plan, RouteRequest, SelectionInput};
use crate::store::{
    Conflict, Filter, Lease, LeaseStore, Listing, Outcome, Owner, Release, StoreError, Tier, Txn,
};

mod conflict;
mod outcome;

pub use conflict::{is_conflict, CONFLICT_CONTAINER, CONFLICT_NETWORK};

pub use outcome::{
    AddressInfo, Allocation, Attachment, Detect, EngineError, EngineStats, NicAllocation, RouteInfo,
};

/// How many times a request re-picks after losing races before giving up (retryable error).
pub const MAX_CONFLICT_ROUNDS: usize = 64;

/// Allocates for one node through a store.
pub struct Engine<S> {
    store: S,
    node: String,
    caches: Caches,
    stats: Mutex<EngineStats>,
}

struct Pick {
    nic: usize,
    pool: String,
    ip: IpAddr,
}

/// What one ADD asks for, besides the pod's selection input.
struct Request<'a> {
    input: &'a SelectionInput<'a>,
    att: &'a Attachment,
    pod_uid: &'a str,
    now: u64,
    pod: String,
}

impl<S: LeaseStore> Engine<S> {
    /// An engine for `node` over `store`.
    pub fn new(store: S, node: impl Into<String>) -> Self {
        let node = node.into();
        Engine {
            store,
            caches: Caches::new(Allocator::hint_for(&node)),
            node,
            stats: Mutex::new(EngineStats::default()),
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The node this engine allocates for.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Counters since start.
    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self, f: impl FnOnce(&mut EngineStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Tells the cache about a change another node made (a store watch): `ip` of `pool` was
    /// claimed (`held`) or released at store `revision`. Keeps the cache fresh so this engine
    /// rarely picks an address another node just took.
    pub fn observe(&self, pool: &str, ip: IpAddr, revision: u64, held: bool) {
        self.caches.learn(pool, ip, revision, held);
    }

    /// Forgets cached pool state (e.g. after the agent saw changes made by other nodes).
    pub fn invalidate(&self, pool: Option<&str>) {
        self.caches.invalidate(pool);
    }

    /// Used/total of a pool as the engine sees it (after a refresh from the store).
    pub async fn usage(&self, pools: &PoolSet, pool: &str) -> Result<Option<Usage>, EngineError> {
        let Some(p) = pools.pools.get(pool) else {
            return Ok(None);
        };
        self.refresh(p, pools, 0).await?;
        Ok(self.caches.usage(pool))
    }

    /// Rebuilds a pool's cache from one listing (see [`crate::cache`] for the rules).
    async fn refresh(&self, pool: &Pool, pools: &PoolSet, now: u64) -> Result<(), EngineError> {
        let space = pool.allocatable(pools.reserved(pool.family));
        let ticket = self.caches.begin_read(&pool.name);
        let listing = self.store.pool_addresses(&pool.name).await?;
        self.bump(|s| s.pool_reads += 1);
        self.caches.install(ticket, space, &listing, now);
        Ok(())
    }

    /// Takes a candidate address from the cache; builds the cache on first use. A pool that looks
    /// full is re-read only when the store changed it since the cache's listing, and (unless
    /// `force`) at most once a second (`now`).
    async fn pick(
        &self,
        pool: &Pool,
        pools: &PoolSet,
        now: u64,
        force: bool,
    ) -> Result<Option<IpAddr>, EngineError> {
        let space = pool.allocatable(pools.reserved(pool.family));
        if !self.caches.is_current(&pool.name, &space) {
            self.refresh(pool, pools, now).await?;
        }
        if let Some(ip) = self.take(&pool.name) {
            return Ok(Some(ip));
        }
        let Some(mark) = self.caches.read_mark(&pool.name) else {
            return Ok(None);
        };
        if now <= mark.at && !force {
            return Ok(None);
        }
        if self.store.pool_revision(&pool.name).await? <= mark.revision {
            return Ok(None);
        }
        self.refresh(pool, pools, now).await?;
        Ok(self.take(&pool.name))
    }

    /// Takes from the cache, in this node's blocks first when the store keeps node-affine blocks.
    fn take(&self, pool: &str) -> Option<IpAddr> {
        let affinity = self.store.affinity();
        let (ip, tier) = self.caches.take(pool, affinity.as_ref())?;
        if affinity.is_some() {
            self.bump(|s| match tier {
                Tier::Own => s.own_block_picks += 1,
                Tier::Free => s.free_block_picks += 1,
                Tier::Borrowed => s.borrowed_picks += 1,
            });
        }
        Some(ip)
    }

    /// Gives back the picks of a request that failed before (or without knowing whether) they were
    /// committed, counts the failure, and passes the error on. (If a commit was applied but its
    /// answer lost, the cache learns the truth at the next conflict or refresh.)
    fn abandon(&self, picks: &[Pick], e: EngineError) -> EngineError {
        for p in picks {
            self.caches.give_back(&p.pool, p.ip);
        }
        self.bump(|s| s.failures += 1);
        e
    }

    /// Allocates addresses for the NIC `att.ifname` of a pod (and, with the `ippools` annotation,
    /// for every NIC it lists). Idempotent per `(container id, ifname)`: a repeated call returns
    /// what was recorded. Either every address of the request is committed, or none. The records
    /// carry the network of `input.cni` (the CNI config `name`), which scopes [`Engine::gc`].
    /// `now` is the caller's clock in seconds (record times, cache re-read rate).
    pub async fn allocate(
        &self,
        pools: &PoolSet,
        input: &SelectionInput<'_>,
        att: &Attachment,
        pod_uid: &str,
        now: u64,
    ) -> Result<Allocation, EngineError> {
        let req = Request {
            input,
            att,
            pod_uid,
            now,
            pod: format!("{}/{}", input.pod_namespace, input.pod_name),
        };
        for round in 0..MAX_CONFLICT_ROUNDS {
            let existing = self
                .store
                .list(Filter::Container(&att.container_id))
                .await?;
            let done: HashSet<(&str, IpFamily)> = existing
                .leases
                .iter()
                .map(|l| (l.owner.ifname.as_str(), l.family()))
                .collect();
            let plan = if existing.leases.iter().any(|l| l.owner.ifname == att.ifname) {
                // A repeated ADD. Normally complete: answer what was recorded. Incomplete only
                // when a multi-record commit was cut short (a store without multi-object
                // transactions, a writer killed between two writes): claim what is missing. When
                // the pools no longer resolve, the records still answer.
                match select::resolve(pools, input, &att.ifname) {
                    Ok(plan) if !plan_is_done(&plan, &done) => plan,
                    _ => return self.replay(pools, &req, &existing),
                }
            } else {
                select::resolve(pools, input, &att.ifname)?
            };
            let mut picks: Vec<Pick> = Vec::new();
            let result = self.pick_all(pools, &plan, &done, &req, &mut picks).await;
            if let Err(e) = result {
                return Err(self.abandon(&picks, e));
            }
            let claims = self.claims(&req, &plan, &picks);
            // Check routes before committing anything.
            let mut all = existing.leases.clone();
            all.extend(claims.iter().cloned());
            let answer = match attach_routes(&plan.routes, self.describe(pools, &all), &req.pod) {
                Ok(a) => a,
                Err(e) => return Err(self.abandon(&picks, e)),
            };
            let txn = Txn {
                claims,
                releases: Vec::new(),
            };
            match self.store.commit(txn).await {
                Err(e) => return Err(self.abandon(&picks, e.into())),
                Ok(Outcome::Committed { revision, .. }) => {
                    for p in &picks {
                        self.caches.learn(&p.pool, p.ip, revision, true);
                    }
                    self.bump(|s| s.allocations += 1);
                    return Ok(answer);
                }
                Ok(Outcome::Conflict(conflicts)) => {
                    self.lost_race(pools, &picks, &conflicts, round, now)
                        .await?;
                }
            }
        }
        self.bump(|s| s.failures += 1);
        Err(EngineError::TooManyConflicts {
            rounds: MAX_CONFLICT_ROUNDS,
        })
    }

    /// Moves the records an earlier sandbox of the same pod holds (`previous`) to the
    /// attachment `att`, keeping their addresses: a StatefulSet pod keeps its address across
    /// restarts and rescheduling within its zone. Only records whose pool the pod may still use
    /// here (eligible for this NIC and family on this node) move, in one transaction (a release
    /// of the old record and a claim of the same address for `att`); a later DEL of the old
    /// sandbox then frees nothing. Returns the records moved (empty when nothing could move:
    /// the caller then allocates as usual).
    pub async fn adopt(
        &self,
        pools: &PoolSet,
        input: &SelectionInput<'_>,
        previous: &[Lease],
        att: &Attachment,
        pod_uid: &str,
        now: u64,
    ) -> Result<Vec<Lease>, EngineError> {
        let Ok(plan) = select::resolve(pools, input, &att.ifname) else {
            return Ok(Vec::new());
        };
        let already = self
            .store
            .list(Filter::Container(&att.container_id))
            .await?;
        let mut claims = Vec::new();
        let mut releases = Vec::new();
        for old in previous {
            if old.owner.container_id == att.container_id
                || already
                    .leases
                    .iter()
                    .any(|l| l.owner.ifname == old.owner.ifname && l.family() == old.family())
            {
                continue;
            }
            let eligible = plan.nics.iter().any(|nic| {
                nic.ifname == old.owner.ifname
                    && nic
                        .family(old.family())
                        .is_some_and(|fp| fp.eligible().any(|p| p == old.pool))
            });
            if !eligible {
                continue;
            }
            let mut new = old.clone();
            new.owner.container_id = att.container_id.clone();
            new.owner.node = self.node.clone();
            new.owner.pod_uid = pod_uid.to_string();
            new.owner.created = now;
            new.revision = 0;
            claims.push(new);
            releases.push(Release::from(old));
        }
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        match self
            .store
            .commit(Txn {
                claims: claims.clone(),
                releases,
            })
            .await?
        {
            Outcome::Committed { revision, .. } => {
                for c in &claims {
                    self.caches.learn(&c.pool, c.ip, revision, true);
                }
                Ok(claims)
            }
            // Someone else moved or freed them meanwhile: allocate as usual.
            Outcome::Conflict(_) => Ok(Vec::new()),
        }
    }

    /// The answer to a repeated ADD: what the store recorded.
    fn replay(
        &self,
        pools: &PoolSet,
        req: &Request<'_>,
        existing: &Listing,
    ) -> Result<Allocation, EngineError> {
        self.bump(|s| s.replays += 1);
        // A replay after a lost answer: make sure the cache knows these are held.
        for l in &existing.leases {
            self.caches.learn(&l.pool, l.ip, l.revision, true);
        }
        let routes = select::pod_routes(req.input)?;
        attach_routes(&routes, self.describe(pools, &existing.leases), &req.pod)
    }

    /// The records a request claims for its picks.
    fn claims(&self, req: &Request<'_>, plan: &Plan, picks: &[Pick]) -> Vec<Lease> {
        let network = req
            .input
            .cni
            .and_then(|c| c.network_name.clone())
            .unwrap_or_default();
        picks
            .iter()
            .map(|p| Lease {
                ip: p.ip,
                pool: p.pool.clone(),
                owner: Owner {
                    pod_namespace: req.input.pod_namespace.to_string(),
                    pod_name: req.input.pod_name.to_string(),
                    pod_uid: req.pod_uid.to_string(),
                    container_id: req.att.container_id.clone(),
                    ifname: plan.nics[p.nic].ifname.clone(),
                    node: self.node.clone(),
                    network: network.clone(),
                    created: req.now,
                },
                clean_gateway: plan.nics[p.nic].clean_gateway,
                revision: 0,
            })
            .collect()
    }

    /// Learns from a refused claim: every address the store named as taken is held (in the pool
    /// of our pick and in the pool the holder's record names, which differ after a pool change);
    /// the other picks go back. After two lost races in a row the pools lost in are re-read: other
    /// nodes are busy in the same part of the pool, and one read learns all their claims.
    async fn lost_race(
        &self,
        pools: &PoolSet,
        picks: &[Pick],
        conflicts: &[Conflict],
        round: usize,
        now: u64,
    ) -> Result<(), EngineError> {
        self.bump(|s| s.conflicts += conflicts.len() as u64);
        let mut taken: HashMap<IpAddr, &Lease> = HashMap::new();
        for c in conflicts {
            match c {
                Conflict::IpTaken(holder) => {
                    taken.insert(holder.ip, holder);
                }
                // A concurrent request for the same attachment won; the next round finds its
                // record and returns it.
                Conflict::AttachmentBound(_) => {}
                Conflict::DuplicateInTxn(l) => {
                    let e = StoreError::Failed {
                        message: format!(
                            "the engine claimed {} twice in one transaction (a bug; please report)",
                            l.ip
                        ),
                        source: None,
                    };
                    return Err(self.abandon(picks, e.into()));
                }
            }
        }
        for p in picks {
            match taken.get(&p.ip) {
                Some(holder) => self.caches.learn(&p.pool, p.ip, holder.revision, true),
                None => self.caches.give_back(&p.pool, p.ip),
            }
        }
        for holder in taken.values() {
            self.caches
                .learn(&holder.pool, holder.ip, holder.revision, true);
        }
        if round >= 1 {
            let stale: HashSet<&str> = picks
                .iter()
                .filter(|p| taken.contains_key(&p.ip))
                .map(|p| p.pool.as_str())
                .collect();
            for name in stale {
                if let Some(pool) = pools.pools.get(name) {
                    self.refresh(pool, pools, now).await?;
                }
            }
        }
        Ok(())
    }

    async fn pick_all(
        &self,
        pools: &PoolSet,
        plan: &Plan,
        done: &HashSet<(&str, IpFamily)>,
        req: &Request<'_>,
        picks: &mut Vec<Pick>,
    ) -> Result<(), EngineError> {
        for (i, nic) in plan.nics.iter().enumerate() {
            for family in [IpFamily::V4, IpFamily::V6] {
                let Some(fp) = nic.family(family) else {
                    continue;
                };
                if done.contains(&(nic.ifname.as_str(), family)) {
                    continue;
                }
                let mut report = fp.clone();
                let got = self
                    .pick_from_candidates(pools, &mut report, req.now)
                    .await?;
                match got {
                    Some((pool, ip)) => picks.push(Pick { nic: i, pool, ip }),
                    None => {
                        let exhausted = report
                            .candidates
                            .iter()
                            .zip(&fp.candidates)
                            .any(|(now, before)| before.eligible && !now.eligible);
                        return Err(EngineError::NoAvailablePool {
                            pod: req.pod.clone(),
                            ifname: nic.ifname.clone(),
                            family,
                            detail: report.explain_skips(),
                            exhausted,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The first eligible candidate with a free address, in the user's order; marks the exhausted
    /// ones in `report`. The first pass re-reads a full pool at most once a second, so spilling
    /// into a backup pool costs no listing of the full primary; only when every candidate looks
    /// full does a second pass re-read each one the store changed, so a request never fails while
    /// an address freed elsewhere waits unseen.
    async fn pick_from_candidates(
        &self,
        pools: &PoolSet,
        report: &mut select::FamilyPlan,
        now: u64,
    ) -> Result<Option<(String, IpAddr)>, EngineError> {
        let mut full: Vec<usize> = Vec::new();
        for (idx, cand) in report.candidates.iter().enumerate() {
            if !cand.eligible {
                continue;
            }
            let Some(pool) = pools.pools.get(&cand.pool) else {
                continue;
            };
            if let Some(ip) = self.pick(pool, pools, now, false).await? {
                return Ok(Some((pool.name.clone(), ip)));
            }
            full.push(idx);
        }
        for &idx in &full {
            let cand = &mut report.candidates[idx];
            let Some(pool) = pools.pools.get(&cand.pool) else {
                continue;
            };
            if let Some(ip) = self.pick(pool, pools, now, true).await? {
                return Ok(Some((pool.name.clone(), ip)));
            }
            let u = self.caches.usage(&pool.name).unwrap_or(Usage {
                used: 0,
                capacity: 0,
            });
            cand.eligible = false;
            cand.reason = Some(format!("exhausted ({}/{} allocated)", u.used, u.capacity));
        }
        Ok(None)
    }

    /// Turns records (one container's) into per-NIC answers using the pools' current prefix
    /// lengths, gateways and routes.
    pub fn describe(&self, pools: &PoolSet, leases: &[Lease]) -> Allocation {
        let mut nics: BTreeMap<String, NicAllocation> = BTreeMap::new();
        for l in leases {
            let nic = nics
                .entry(l.owner.ifname.clone())
                .or_insert_with(|| NicAllocation {
                    ifname: l.owner.ifname.clone(),
                    ipv4: None,
                    ipv6: None,
                    clean_gateway: l.clean_gateway,
                    routes: Vec::new(),
                });
            let pool = pools.pools.get(&l.pool);
            let prefix = pool
                .map(|p| p.subnet.prefix_len())
                .unwrap_or(l.family().bits());
            let info = AddressInfo {
                address: IpNet::new(l.ip, prefix).unwrap_or_else(|_| IpNet::from(l.ip)),
                pool: l.pool.clone(),
                gateway: pool.and_then(|p| p.gateway),
                vlan: pool.and_then(|p| p.vlan),
            };
            if let Some(p) = pool {
                for r in &p.routes {
                    nic.routes.push(RouteInfo {
                        dst: r.dst,
                        gw: r.gw,
                    });
                }
            }
            match l.family() {
                IpFamily::V4 => nic.ipv4 = Some(info),
                IpFamily::V6 => nic.ipv6 = Some(info),
            }
        }
        Allocation {
            nics: nics.into_values().collect(),
            detect: Detect::default(),
        }
    }

    /// What is recorded for an attachment (CNI CHECK). Errors when nothing is.
    pub async fn check(
        &self,
        pools: &PoolSet,
        att: &Attachment,
    ) -> Result<Allocation, EngineError> {
        let listing = self
            .store
            .list(Filter::Container(&att.container_id))
            .await?;
        if !listing.leases.iter().any(|l| l.owner.ifname == att.ifname) {
            return Err(EngineError::NotFound {
                container_id: att.container_id.clone(),
                ifname: att.ifname.clone(),
            });
        }
        Ok(self.describe(pools, &listing.leases))
    }

    /// Frees what an attachment holds (CNI DEL). `ifname: None` frees every NIC of the container.
    /// Idempotent: freeing nothing succeeds. Returns the released records.
    pub async fn release(
        &self,
        container_id: &str,
        ifname: Option<&str>,
    ) -> Result<Vec<Lease>, EngineError> {
        let listing = self.store.list(Filter::Container(container_id)).await?;
        let victims: Vec<Lease> = listing
            .leases
            .into_iter()
            .filter(|l| ifname.is_none_or(|i| l.owner.ifname == i))
            .collect();
        self.release_leases(&victims).await
    }

    async fn release_leases(&self, victims: &[Lease]) -> Result<Vec<Lease>, EngineError> {
        if victims.is_empty() {
            return Ok(Vec::new());
        }
        let txn = Txn {
            claims: Vec::new(),
            releases: victims.iter().map(Release::from).collect(),
        };
        match self.store.commit(txn).await {
            Ok(Outcome::Committed { released, revision }) => {
                self.released(&released, Some(revision));
                Ok(released)
            }
            // Releases never conflict; a store that says otherwise changed nothing.
            Ok(Outcome::Conflict(_)) => Ok(Vec::new()),
            Err(e) => {
                // A large release applied in parts: what was freed is freed.
                self.released(e.released(), None);
                Err(e.into())
            }
        }
    }

    /// Tells the cache that `leases` are free. Without the store revision of the release (a
    /// partial release) the record's own revision is used: a listing newer than that may still
    /// show the address held, which errs on the safe side (a wasted address until the next read).
    fn released(&self, leases: &[Lease], revision: Option<u64>) {
        for l in leases {
            self.caches
                .learn(&l.pool, l.ip, revision.unwrap_or(l.revision), false);
        }
        self.bump(|s| s.releases += leases.len() as u64);
    }

    /// CNI GC of one network: frees this node's records of `network` whose container is not in
    /// `valid`. A record is live while its container id is listed with any interface (under
    /// Multus the runtime lists a sandbox once, while its first ADD may have allocated several
    /// NICs); records of other networks and other nodes are never touched, nor records imported
    /// from Spiderpool (no runtime lists their container: pod-lifecycle GC judges them).
    pub async fn gc(&self, network: &str, valid: &[Attachment]) -> Result<Vec<Lease>, EngineError> {
        let live: HashSet<&str> = valid.iter().map(|a| a.container_id.as_str()).collect();
        self.gc_where(Filter::Node(&self.node), |l| {
            l.owner.network == network
                && !live.contains(l.owner.container_id.as_str())
                && !crate::migrate::is_imported(l)
        })
        .await
    }

    /// Frees every record passing `filter` for which `is_garbage` holds (e.g. pods that are gone).
    /// Records of addresses in conflict ([`is_conflict`]) are never garbage: only an explicit
    /// release (DEL of their attachment) frees them.
    pub async fn gc_where(
        &self,
        filter: Filter<'_>,
        is_garbage: impl Fn(&Lease) -> bool,
    ) -> Result<Vec<Lease>, EngineError> {
        let listing = self.store.list(filter).await?;
        let victims: Vec<Lease> = listing
            .leases
            .into_iter()
            .filter(|l| !is_conflict(l) && is_garbage(l))
            .collect();
        self.release_leases(&victims).await
    }
}

/// Adds the pod's annotation routes to the NIC whose subnet holds the gateway.
fn attach_routes(
    routes: &[RouteRequest],
    mut alloc: Allocation,
    pod: &str,
) -> Result<Allocation, EngineError> {
    for r in routes {
        let (Ok(dst), Ok(gw)) = (r.dst.parse::<IpNet>(), r.gw.parse::<IpAddr>()) else {
            continue; // validated when the annotation was parsed
        };
        let nic = alloc.nics.iter_mut().find(|n| {
            [&n.ipv4, &n.ipv6]
                .into_iter()
                .flatten()
                .any(|a| a.address.trunc().contains(&gw))
        });
        match nic {
            Some(n) => n.routes.push(RouteInfo {
                dst: dst.trunc(),
                gw,
            }),
            None => {
                return Err(EngineError::UnroutableRoute {
                    pod: pod.to_string(),
                    dst: r.dst.clone(),
                    gw: r.gw.clone(),
                })
            }
        }
    }
    Ok(alloc)
}

/// Used addresses per pool from a listing: for `ALLOCATED-IP-COUNT`.
pub fn count_by_pool(leases: &[Lease]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for l in leases {
        *m.entry(l.pool.clone()).or_insert(0) += 1;
    }
    m
}

/// The `totalIPCount` of a pool (ips minus excludeIPs), as Spiderpool reports it.
pub fn total_ip_count(pool: &Pool) -> i64 {
    pool.total().count_i64()
}

/// Whether the records `done` (NIC, family) cover every address `plan` asks for.
fn plan_is_done(plan: &Plan, done: &HashSet<(&str, IpFamily)>) -> bool {
    plan.nics.iter().all(|nic| {
        [IpFamily::V4, IpFamily::V6]
            .into_iter()
            .all(|f| nic.family(f).is_none() || done.contains(&(nic.ifname.as_str(), f)))
    })
}

/// All allocatable addresses of a pool (for tests and tools).
pub fn allocatable(pool: &Pool, pools: &PoolSet) -> IpSet {
    pool.allocatable(pools.reserved(pool.family))
}
