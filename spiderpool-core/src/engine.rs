//! The IPAM engine: allocate, release, check and garbage-collect through a [`LeaseStore`].
//!
//! The engine keeps one [`Allocator`] per pool as a cache of the store, so choosing an address
//! costs no round trip; the store's conditional commit is the only authority. When the cache is
//! stale (another node took the address), the commit reports a conflict, the engine marks the
//! address used and picks again. When a pool looks exhausted the cache is rebuilt from the store
//! once before the pool is given up, so addresses freed elsewhere are found.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::bitmap::Allocator;
use crate::range::{IpFamily, IpSet};
use crate::select::{self, Plan, RouteRequest, SelectionError, SelectionInput};
use crate::store::{Conflict, Filter, Lease, LeaseStore, Outcome, Owner, Release, StoreError, Txn};
use crate::validate::{Pool, PoolSet};

/// How many times a request re-picks after losing races before giving up (retryable error).
pub const MAX_CONFLICT_ROUNDS: usize = 64;

/// The attachment an ADD/DEL/CHECK is about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// Container (sandbox) ID.
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
}

/// An allocated address with what the NIC needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressInfo {
    /// Address with the pool subnet's prefix length.
    pub address: IpNet,
    /// Pool.
    pub pool: String,
    /// Gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// VLAN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vlan: Option<i64>,
}

/// A route for a NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// Destination.
    pub dst: IpNet,
    /// Next hop.
    pub gw: IpAddr,
}

/// The addresses of one NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NicAllocation {
    /// Interface.
    pub ifname: String,
    /// IPv4 address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<AddressInfo>,
    /// IPv6 address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<AddressInfo>,
    /// Default route suppressed.
    pub clean_gateway: bool,
    /// Routes (pool routes and the pod's routes annotation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteInfo>,
}

/// Everything allocated to one container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Per NIC, sorted by interface name.
    pub nics: Vec<NicAllocation>,
}

impl Allocation {
    /// The NIC named `ifname`.
    pub fn nic(&self, ifname: &str) -> Option<&NicAllocation> {
        self.nics.iter().find(|n| n.ifname == ifname)
    }
}

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Pool selection failed (bad annotation, no source, unknown interface).
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// Every candidate was ineligible or exhausted.
    #[error("no IPPool available for {ifname} {family} of pod {pod}: {detail}")]
    NoAvailablePool {
        /// ns/name.
        pod: String,
        /// NIC.
        ifname: String,
        /// Family.
        family: IpFamily,
        /// Every candidate and why it failed.
        detail: String,
    },
    /// Nothing recorded for the attachment (CHECK).
    #[error("no IP is allocated to container {container_id} interface {ifname}")]
    NotFound {
        /// Container.
        container_id: String,
        /// NIC.
        ifname: String,
    },
    /// Lost the race for free addresses too often; retry later.
    #[error("gave up after {rounds} rounds of allocation conflicts with other nodes; try again")]
    TooManyConflicts {
        /// Rounds tried.
        rounds: usize,
    },
    /// The routes annotation names a gateway in no allocated subnet.
    #[error("pod {pod}: route {dst} via {gw} (annotation ipam.spidernet.io/routes): gateway is in none of the pod's subnets")]
    UnroutableRoute {
        /// ns/name.
        pod: String,
        /// Destination.
        dst: String,
        /// Gateway.
        gw: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EngineError {
    /// Whether the same request may succeed later without any change.
    pub fn is_retryable(&self) -> bool {
        match self {
            EngineError::Store(e) => e.is_retryable(),
            EngineError::TooManyConflicts { .. } => true,
            _ => false,
        }
    }
}

struct PoolCache {
    alloc: Allocator,
    /// Picked but not yet committed or given back: kept used across refreshes so concurrent
    /// requests of this engine never pick the same address.
    pending: HashSet<IpAddr>,
}

/// Tally kept by the engine for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    /// Successful allocations (new, not idempotent replays).
    pub allocations: u64,
    /// Idempotent replays.
    pub replays: u64,
    /// Claims refused by the store (lost races).
    pub conflicts: u64,
    /// Failed allocations.
    pub failures: u64,
    /// Released records.
    pub releases: u64,
}

/// Allocates for one node through a store.
pub struct Engine<S> {
    store: S,
    node: String,
    caches: Mutex<HashMap<String, PoolCache>>,
    stats: Mutex<EngineStats>,
}

struct Pick {
    nic: usize,
    pool: String,
    ip: IpAddr,
}

impl<S: LeaseStore> Engine<S> {
    /// An engine for `node` over `store`.
    pub fn new(store: S, node: impl Into<String>) -> Self {
        Engine {
            store,
            node: node.into(),
            caches: Mutex::new(HashMap::new()),
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

    fn caches(&self) -> std::sync::MutexGuard<'_, HashMap<String, PoolCache>> {
        // Allocator updates cannot be left half-done by a panic elsewhere.
        self.caches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets cached pool state (e.g. after the agent saw changes made by other nodes).
    pub fn invalidate(&self, pool: Option<&str>) {
        let mut c = self.caches();
        match pool {
            Some(p) => {
                c.remove(p);
            }
            None => c.clear(),
        }
    }

    /// Used/total of a pool as the engine sees it (after a refresh from the store).
    pub async fn usage(
        &self,
        pools: &PoolSet,
        pool: &str,
    ) -> Result<Option<(u128, u128)>, EngineError> {
        let Some(p) = pools.pools.get(pool) else {
            return Ok(None);
        };
        self.refresh(p, pools).await?;
        Ok(self
            .caches()
            .get(pool)
            .map(|c| (c.alloc.used(), c.alloc.capacity())))
    }

    async fn refresh(&self, pool: &Pool, pools: &PoolSet) -> Result<(), EngineError> {
        let space = pool.allocatable(pools.reserved(pool.family));
        let listing = self.store.list(Filter::Pool(&pool.name)).await?;
        let mut alloc = Allocator::new(space, Allocator::hint_for(&self.node));
        for l in &listing.leases {
            alloc.mark_used(l.ip);
        }
        let mut caches = self.caches();
        let mut pending = HashSet::new();
        if let Some(old) = caches.remove(&pool.name) {
            // Keep the cursor so next-fit order survives a refresh, and the in-flight picks.
            if old.alloc.space() == alloc.space() {
                alloc.set_cursor(old.alloc.cursor());
            }
            for ip in &old.pending {
                if alloc.mark_used(*ip) || alloc.is_used(*ip) {
                    pending.insert(*ip);
                }
            }
        }
        caches.insert(pool.name.clone(), PoolCache { alloc, pending });
        Ok(())
    }

    /// Takes a candidate address from the cache; builds the cache on first use.
    async fn pick(&self, pool: &Pool, pools: &PoolSet) -> Result<Option<IpAddr>, EngineError> {
        let space = pool.allocatable(pools.reserved(pool.family));
        let fresh = self
            .caches()
            .get(&pool.name)
            .is_some_and(|c| *c.alloc.space() == space);
        if !fresh {
            self.refresh(pool, pools).await?;
        }
        if let Some(ip) = self.take_cached(&pool.name) {
            return Ok(Some(ip));
        }
        // Looks exhausted: others may have released addresses; look at the store once.
        self.refresh(pool, pools).await?;
        Ok(self.take_cached(&pool.name))
    }

    fn take_cached(&self, pool: &str) -> Option<IpAddr> {
        let mut caches = self.caches();
        let c = caches.get_mut(pool)?;
        let ip = c.alloc.take()?;
        c.pending.insert(ip);
        Some(ip)
    }

    /// Gives a pick back (not committed, or released).
    fn uncache(&self, pool: &str, ip: IpAddr) {
        if let Some(c) = self.caches().get_mut(pool) {
            c.pending.remove(&ip);
            c.alloc.release(ip);
        }
    }

    /// Records that `ip` is held in the store (committed by us, or taken by someone else).
    fn mark_cached(&self, pool: &str, ip: IpAddr) {
        if let Some(c) = self.caches().get_mut(pool) {
            c.pending.remove(&ip);
            c.alloc.mark_used(ip);
        }
    }

    /// Gives back the picks of a request that failed before (or without knowing whether) they were
    /// committed, counts the failure, and passes the error on. (If a commit was applied but its
    /// answer lost, the cache learns the truth at the next conflict or refresh.)
    fn abandon(&self, picks: &[Pick], e: EngineError) -> EngineError {
        for p in picks {
            self.uncache(&p.pool, p.ip);
        }
        self.bump(|s| s.failures += 1);
        e
    }

    /// Allocates addresses for the NIC `att.ifname` of a pod (and, with the `ippools` annotation,
    /// for every NIC it lists). Idempotent per `(container id, ifname)`: a repeated call returns
    /// what was recorded. Either every address of the request is committed, or none.
    pub async fn allocate(
        &self,
        pools: &PoolSet,
        input: &SelectionInput<'_>,
        att: &Attachment,
        pod_uid: &str,
        now: u64,
    ) -> Result<Allocation, EngineError> {
        let pod = format!("{}/{}", input.pod_namespace, input.pod_name);
        for round in 0..MAX_CONFLICT_ROUNDS {
            let existing = self
                .store
                .list(Filter::Container(&att.container_id))
                .await?;
            if existing.leases.iter().any(|l| l.owner.ifname == att.ifname) {
                self.bump(|s| s.replays += 1);
                // A replay after a lost answer: make sure the cache knows these are held.
                for l in &existing.leases {
                    self.mark_cached(&l.pool, l.ip);
                }
                let routes = select::pod_routes(input)?;
                let described = self.describe(pools, &existing.leases);
                return attach_routes(&routes, described, &pod);
            }
            let plan = select::resolve(pools, input, &att.ifname)?;
            let done: HashSet<&str> = existing
                .leases
                .iter()
                .map(|l| l.owner.ifname.as_str())
                .collect();
            let mut picks: Vec<Pick> = Vec::new();
            let result = self.pick_all(pools, &plan, &done, &pod, &mut picks).await;
            if let Err(e) = result {
                return Err(self.abandon(&picks, e));
            }
            let claims: Vec<Lease> = picks
                .iter()
                .map(|p| Lease {
                    ip: p.ip,
                    pool: p.pool.clone(),
                    owner: Owner {
                        pod_namespace: input.pod_namespace.to_string(),
                        pod_name: input.pod_name.to_string(),
                        pod_uid: pod_uid.to_string(),
                        container_id: att.container_id.clone(),
                        ifname: plan.nics[p.nic].ifname.clone(),
                        node: self.node.clone(),
                        created: now,
                    },
                    clean_gateway: plan.nics[p.nic].clean_gateway,
                    revision: 0,
                })
                .collect();
            // Check routes before committing anything.
            let mut all = existing.leases.clone();
            all.extend(claims.iter().cloned());
            let described = self.describe(pools, &all);
            let answer = match attach_routes(&plan.routes, described, &pod) {
                Ok(a) => a,
                Err(e) => return Err(self.abandon(&picks, e)),
            };
            let outcome = match self
                .store
                .commit(Txn {
                    claims,
                    releases: Vec::new(),
                })
                .await
            {
                Ok(o) => o,
                Err(e) => return Err(self.abandon(&picks, e.into())),
            };
            match outcome {
                Outcome::Committed { .. } => {
                    for p in &picks {
                        self.mark_cached(&p.pool, p.ip);
                    }
                    self.bump(|s| s.allocations += 1);
                    return Ok(answer);
                }
                Outcome::Conflict(conflicts) => {
                    self.bump(|s| s.conflicts += conflicts.len() as u64);
                    let taken: HashSet<IpAddr> = conflicts
                        .iter()
                        .filter_map(|c| match c {
                            Conflict::IpTaken(l) => Some(l.ip),
                            Conflict::AttachmentBound(_) => None,
                        })
                        .collect();
                    for p in &picks {
                        if !taken.contains(&p.ip) {
                            self.uncache(&p.pool, p.ip);
                        }
                    }
                    for c in &conflicts {
                        if let Conflict::IpTaken(l) = c {
                            self.mark_cached(&l.pool, l.ip);
                        }
                    }
                    // Lost twice in a row: other nodes are busy in the same part of the pool and
                    // our cache is stale there. One read of the pool learns all their claims.
                    if round >= 1 {
                        let stale: HashSet<&str> = conflicts
                            .iter()
                            .filter_map(|c| match c {
                                Conflict::IpTaken(l) => Some(l.pool.as_str()),
                                Conflict::AttachmentBound(_) => None,
                            })
                            .collect();
                        for name in stale {
                            if let Some(pool) = pools.pools.get(name) {
                                self.refresh(pool, pools).await?;
                            }
                        }
                    }
                    // AttachmentBound: a concurrent request for the same attachment won; the next
                    // round finds its record and returns it.
                }
            }
        }
        self.bump(|s| s.failures += 1);
        Err(EngineError::TooManyConflicts {
            rounds: MAX_CONFLICT_ROUNDS,
        })
    }

    async fn pick_all(
        &self,
        pools: &PoolSet,
        plan: &Plan,
        done: &HashSet<&str>,
        pod: &str,
        picks: &mut Vec<Pick>,
    ) -> Result<(), EngineError> {
        for (i, nic) in plan.nics.iter().enumerate() {
            if done.contains(nic.ifname.as_str()) {
                continue;
            }
            for family in [IpFamily::V4, IpFamily::V6] {
                let Some(fp) = nic.family(family) else {
                    continue;
                };
                let mut report = fp.clone();
                let mut got = None;
                for cand in report.candidates.iter_mut() {
                    if !cand.eligible {
                        continue;
                    }
                    let Some(pool) = pools.pools.get(&cand.pool) else {
                        continue;
                    };
                    match self.pick(pool, pools).await? {
                        Some(ip) => {
                            got = Some((pool.name.clone(), ip));
                            break;
                        }
                        None => {
                            let (used, cap) = self
                                .caches()
                                .get(&pool.name)
                                .map(|c| (c.alloc.used(), c.alloc.capacity()))
                                .unwrap_or((0, 0));
                            cand.eligible = false;
                            cand.reason = Some(format!("exhausted ({used}/{cap} allocated)"));
                        }
                    }
                }
                match got {
                    Some((pool, ip)) => picks.push(Pick { nic: i, pool, ip }),
                    None => {
                        return Err(EngineError::NoAvailablePool {
                            pod: pod.to_string(),
                            ifname: nic.ifname.clone(),
                            family,
                            detail: report.explain_skips(),
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Turns records into per-NIC answers using the pools' current gateways and routes.
    fn describe(&self, pools: &PoolSet, leases: &[Lease]) -> Allocation {
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
        match self.store.commit(txn).await? {
            Outcome::Committed { released, .. } => {
                for l in &released {
                    self.uncache(&l.pool, l.ip);
                }
                self.bump(|s| s.releases += released.len() as u64);
                Ok(released)
            }
            // Releases never conflict; a store that says otherwise changed nothing.
            Outcome::Conflict(_) => Ok(Vec::new()),
        }
    }

    /// CNI GC: frees every record of this node whose attachment is not in `valid`.
    pub async fn gc(&self, valid: &[Attachment]) -> Result<Vec<Lease>, EngineError> {
        let keep: HashSet<(&str, &str)> = valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        self.gc_where(Filter::Node(&self.node), |l| {
            !keep.contains(&(l.owner.container_id.as_str(), l.owner.ifname.as_str()))
        })
        .await
    }

    /// Frees every record passing `filter` for which `is_garbage` holds (e.g. pods that are gone).
    pub async fn gc_where(
        &self,
        filter: Filter<'_>,
        is_garbage: impl Fn(&Lease) -> bool,
    ) -> Result<Vec<Lease>, EngineError> {
        let listing = self.store.list(filter).await?;
        let victims: Vec<Lease> = listing
            .leases
            .into_iter()
            .filter(|l| is_garbage(l))
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

/// All allocatable addresses of a pool (for tests and tools).
pub fn allocatable(pool: &Pool, pools: &PoolSet) -> IpSet {
    pool.allocatable(pools.reserved(pool.family))
}
