//! [`LeaseTable`]: the records of a single-node backend with their indexes, and the planning of
//! a transaction against them ([`Changes`], [`Batch`] for group commits).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::*;

mod index;
mod stored;
use index::*;
use stored::{Names, Stored, NAMESPACE, NODE, POOL};

/// The state every single-node backend keeps: records by address, indexed by container, pool and
/// node, so every [`Filter`] costs the records it returns. (An attachment slot is found through
/// its container's few records, so it needs no index of its own.) Shared by [`MemoryStore`] and
/// the embedded backend's in-memory table.
#[derive(Debug, Clone, Default)]
pub struct LeaseTable {
    /// Records by address: hashed (a B-tree's half-full nodes cost more memory than the records'
    /// own fields); the whole-table listing, rare, sorts.
    by_ip: HashMap<IpAddr, Stored, std::hash::BuildHasherDefault<AddrHasher>>,
    /// Names many records share (pools, nodes, networks, namespaces, interfaces), kept once.
    names: Names,
    /// Many keys (one per container), few addresses each: keyed by a hash of the container id
    /// (candidates, checked against the records), one address inline.
    by_container: HashMap<u64, Ips, std::hash::BuildHasherDefault<AddrHasher>>,
    /// The same for pods (namespace and name): a StatefulSet pod's earlier records at ADD.
    by_pod: HashMap<u64, Ips, std::hash::BuildHasherDefault<AddrHasher>>,
    /// Large sets (a pool or node can hold 65,000 records): hashed, so a commit costs O(1) here;
    /// the rare listing sorts what it returns.
    by_pool: BigIndex,
    by_node: BigIndex,
    /// Revision of the last change to each pool since `base_revision`.
    pool_changed: BTreeMap<String, u64>,
    /// Revision when the table was created or loaded: changes before it are not tracked per pool.
    base_revision: u64,
    revision: u64,
    /// Records examined by `list` (evidence for the index tests).
    visited: Counter,
}

/// Records that `pool` changed at `rev`, allocating its name only the first time.
fn mark_changed(changed: &mut BTreeMap<String, u64>, pool: &str, rev: u64) {
    match changed.get_mut(pool) {
        Some(r) => *r = (*r).max(rev),
        None => {
            changed.insert(pool.to_string(), rev);
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

    /// The pools that hold at least one record.
    pub fn pool_names(&self) -> std::collections::BTreeSet<String> {
        self.by_pool
            .iter()
            .filter(|(_, ips)| !ips.is_empty())
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// How many records `pool` holds (no copy of them).
    pub fn pool_len(&self, pool: &str) -> usize {
        self.by_pool.get(pool).map_or(0, |ips| ips.len())
    }

    /// The addresses of `pool` (see [`LeaseStore::pool_addresses`]).
    pub fn pool_addresses(&self, pool: &str) -> PoolAddresses {
        let ips: Vec<IpAddr> = self
            .by_pool
            .get(pool)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        self.visited.add(ips.len() as u64);
        PoolAddresses {
            revision: self.revision,
            ips,
        }
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
        self.insert(lease);
    }

    /// Stores and indexes a record.
    fn insert(&mut self, l: Lease) {
        match self
            .by_container
            .get_mut(&container_key(&l.owner.container_id))
        {
            Some(ips) => ips.put(l.ip),
            None => {
                self.by_container
                    .insert(container_key(&l.owner.container_id), Ips::One(l.ip));
            }
        }
        let pod = pod_key(&l.owner.pod_namespace, &l.owner.pod_name);
        match self.by_pod.get_mut(&pod) {
            Some(ips) => ips.put(l.ip),
            None => {
                self.by_pod.insert(pod, Ips::One(l.ip));
            }
        }
        index_insert(&mut self.by_pool, &l.pool, l.ip);
        index_insert(&mut self.by_node, &l.owner.node, l.ip);
        let ip = l.ip;
        let stored = Stored::new(l, &mut self.names);
        self.by_ip.insert(ip, stored);
    }

    /// Removes and unindexes the record at `ip`; returns its pool.
    fn remove(&mut self, ip: &IpAddr) -> Option<std::sync::Arc<str>> {
        let old = self.by_ip.remove(ip)?;
        let key = old.container_key();
        if self
            .by_container
            .get_mut(&key)
            .is_some_and(|ips| ips.take(ip))
        {
            self.by_container.remove(&key);
        }
        let pod = pod_key(old.name(&self.names, NAMESPACE), old.pod_name());
        if self.by_pod.get_mut(&pod).is_some_and(|ips| ips.take(ip)) {
            self.by_pod.remove(&pod);
        }
        // Pools and nodes are few and long-lived: their (possibly empty) sets stay, so a pool that
        // empties and fills again does not reallocate its entry on every commit.
        let (pool, node) = (old.name(&self.names, POOL), old.name(&self.names, NODE));
        if let Some(set) = self.by_pool.get_mut(&**pool) {
            set.remove(ip);
        }
        if let Some(set) = self.by_node.get_mut(&**node) {
            set.remove(ip);
        }
        Some(pool.clone())
    }

    /// Reads records, sorted by address; costs the records returned (every filter is indexed).
    pub fn list(&self, filter: Filter<'_>) -> Listing {
        let get = |ip: &IpAddr| self.by_ip.get(ip).map(|s| s.lease(*ip, &self.names));
        let leases: Vec<Lease> = match filter {
            Filter::All => {
                let mut all: Vec<Lease> = self
                    .by_ip
                    .iter()
                    .map(|(ip, s)| s.lease(*ip, &self.names))
                    .collect();
                all.sort_unstable_by_key(|l| l.ip);
                all
            }
            Filter::Container(c) => {
                let mut ips: Vec<&IpAddr> = self
                    .by_container
                    .get(&container_key(c))
                    .map(Ips::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter(|ip| self.by_ip.get(*ip).is_some_and(|s| s.container_is(c)))
                    .collect();
                ips.sort_unstable();
                ips.into_iter().filter_map(get).collect()
            }
            Filter::Pod(ns, name) => {
                let mut ips: Vec<&IpAddr> = self
                    .by_pod
                    .get(&pod_key(ns, name))
                    .map(Ips::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter(|ip| {
                        self.by_ip.get(*ip).is_some_and(|s| {
                            &**s.name(&self.names, NAMESPACE) == ns && s.pod_name() == name
                        })
                    })
                    .collect();
                ips.sort_unstable();
                ips.into_iter().filter_map(get).collect()
            }
            Filter::Pool(p) => sorted(self.by_pool.get(p), get),
            Filter::Node(n) => sorted(self.by_node.get(n), get),
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
        self.plan_in(txn, &self.begin_batch())
    }

    /// A batch of changes planned on top of this table (a group commit), empty.
    pub fn begin_batch(&self) -> Batch {
        Batch {
            records: HashMap::new(),
            revision: self.revision,
        }
    }

    /// The record at `ip` as the table plus `batch` have it.
    fn current<'a>(&'a self, batch: &'a Batch, ip: &IpAddr) -> Option<Cow<'a, Lease>> {
        match batch.records.get(ip) {
            Some(planned) => planned.as_ref().map(Cow::Borrowed),
            None => self
                .by_ip
                .get(ip)
                .map(|s| Cow::Owned(s.lease(*ip, &self.names))),
        }
    }

    /// The record holding the slot `(container, ifname, family)`, as the table plus `batch` have
    /// it: one of the container's few records.
    fn slot_holder<'a>(&'a self, batch: &'a Batch, claim: &Lease) -> Option<Cow<'a, Lease>> {
        let o = &claim.owner;
        let fam = claim.family();
        let in_table = self
            .by_container
            .get(&container_key(&o.container_id))
            .map(Ips::as_slice)
            .unwrap_or_default()
            .iter();
        let in_batch = batch
            .records
            .iter()
            .filter(|(_, l)| {
                l.as_ref()
                    .is_some_and(|l| l.owner.container_id == o.container_id)
            })
            .map(|(ip, _)| ip);
        in_table
            .chain(in_batch)
            .filter_map(|ip| self.current(batch, ip))
            .find(|l| {
                l.owner.container_id == o.container_id
                    && l.owner.ifname == o.ifname
                    && l.family() == fam
            })
    }

    /// Checks `txn` against the table with `batch` (changes accepted earlier in the same group
    /// commit, not yet applied) on top.
    pub fn plan_in(&self, txn: &Txn, batch: &Batch) -> Result<Changes, Vec<Conflict>> {
        let next = batch.revision + 1;
        let mut conflicts = Vec::new();
        let mut writes = Vec::new();
        // A claim may take an address that a release of the same transaction frees (a move: a
        // StatefulSet pod's address passing to its new sandbox).
        let released_here = |ip: &IpAddr, holder: &Lease| {
            txn.releases.iter().any(|r| {
                r.ip == *ip
                    && r.container_id == holder.owner.container_id
                    && r.ifname == holder.owner.ifname
            })
        };
        let mut seen_ips = BTreeSet::new();
        let mut seen_slots: BTreeSet<(&str, &str, IpFamily)> = BTreeSet::new();
        for c in &txn.claims {
            let fresh_slot = seen_slots.insert((
                c.owner.container_id.as_str(),
                c.owner.ifname.as_str(),
                c.family(),
            ));
            if !seen_ips.insert(c.ip) || !fresh_slot {
                // Two claims in one transaction for one address or slot: refuse the second.
                conflicts.push(Conflict::DuplicateInTxn(c.clone()));
                continue;
            }
            if let Some(cur) = self.current(batch, &c.ip) {
                if cur.owner.same_attachment(&c.owner) {
                    continue; // same attachment: idempotent no-op
                }
                if !released_here(&c.ip, &cur) {
                    conflicts.push(Conflict::IpTaken(cur.into_owned()));
                    continue;
                }
            }
            if let Some(cur) = self.slot_holder(batch, c) {
                conflicts.push(Conflict::AttachmentBound(cur.into_owned()));
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
            if let Some(cur) = self.current(batch, &r.ip) {
                if cur.owner.container_id == r.container_id && cur.owner.ifname == r.ifname {
                    del.insert(cur.ip, cur.into_owned());
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
        self.apply_parts(changes.writes.iter().cloned(), &changes.deletes)
    }

    fn apply_parts(
        &mut self,
        writes: impl ExactSizeIterator<Item = Lease>,
        deletes: &[Lease],
    ) -> u64 {
        if writes.len() == 0 && deletes.is_empty() {
            return self.revision;
        }
        self.revision += 1;
        let rev = self.revision;
        for d in deletes {
            if let Some(pool) = self.remove(&d.ip) {
                mark_changed(&mut self.pool_changed, &pool, rev);
            }
        }
        for w in writes {
            mark_changed(&mut self.pool_changed, &w.pool, rev);
            self.insert(w);
        }
        self.revision
    }

    /// Mirrors changes made elsewhere, at a revision assigned elsewhere (a store whose revisions
    /// come from its server, such as the API server's `resourceVersion`): removes the records at
    /// `removed`, then inserts or replaces `upserts`. The pools of the records touched change at
    /// `revision`; the table's revision becomes at least `revision`. Callers pass real changes
    /// only (a record rewritten unchanged would move its pool's revision).
    pub fn mirror(&mut self, removed: &[IpAddr], upserts: Vec<Lease>, revision: u64) {
        self.revision = self.revision.max(revision);
        for ip in removed {
            if let Some(pool) = self.remove(ip) {
                mark_changed(&mut self.pool_changed, &pool, revision);
            }
        }
        for mut l in upserts {
            if let Some(pool) = self.remove(&l.ip) {
                mark_changed(&mut self.pool_changed, &pool, revision);
            }
            mark_changed(&mut self.pool_changed, &l.pool, revision);
            l.revision = l.revision.max(1);
            self.insert(l);
        }
    }

    /// The record at `ip`.
    pub fn get(&self, ip: &IpAddr) -> Option<Lease> {
        self.by_ip.get(ip).map(|s| s.lease(*ip, &self.names))
    }

    /// Plans and applies `txn`.
    pub fn commit(&mut self, txn: &Txn) -> Outcome {
        match self.plan(txn) {
            Ok(changes) => {
                let revision = self.apply_parts(changes.writes.into_iter(), &changes.deletes);
                Outcome::Committed {
                    revision,
                    released: changes.deletes,
                }
            }
            Err(c) => Outcome::Conflict(c),
        }
    }
}

/// Changes accepted in a group commit and not yet applied to the table: later transactions of
/// the batch are planned against the table with these on top ([`LeaseTable::plan_in`]), so the
/// table itself (which readers see) changes only once the batch is durable.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Address -> record written (`Some`) or deleted (`None`) by the batch so far.
    records: HashMap<IpAddr, Option<Lease>>,
    /// The revision of the batch's last accepted change.
    revision: u64,
}

impl Batch {
    /// Adds an accepted transaction's changes; returns the revision it commits at.
    pub fn add(&mut self, changes: &Changes) -> u64 {
        if changes.is_empty() {
            return self.revision;
        }
        self.revision += 1;
        for d in &changes.deletes {
            self.records.insert(d.ip, None);
        }
        for w in &changes.writes {
            self.records.insert(w.ip, Some(w.clone()));
        }
        self.revision
    }

    /// The revision after the batch.
    pub fn revision(&self) -> u64 {
        self.revision
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
    fn a_batch_sees_its_own_earlier_changes_before_they_are_applied() {
        let mut t = LeaseTable::new(0);
        let held = lease(1, "p", "n");
        t.commit(&Txn {
            claims: vec![held.clone()],
            releases: vec![],
        });
        let mut batch = t.begin_batch();
        // 1. Another container claims a free address.
        let a = lease(2, "p", "n");
        let c1 = t
            .plan_in(
                &Txn {
                    claims: vec![a.clone()],
                    releases: vec![],
                },
                &batch,
            )
            .expect("free");
        assert_eq!(batch.add(&c1), 2);
        // 2. The same address for someone else, in the same batch: taken by (1).
        let mut b = lease(2, "p", "n");
        b.owner.container_id = "other".into();
        match t.plan_in(
            &Txn {
                claims: vec![b],
                releases: vec![],
            },
            &batch,
        ) {
            Err(c) => assert!(
                matches!(&c[0], Conflict::IpTaken(l) if l.owner.container_id == a.owner.container_id)
            ),
            Ok(x) => panic!("claimed twice in one batch: {x:?}"),
        }
        // 3. (1)'s slot with another address: bound by (1).
        let mut slot = lease(3, "p", "n");
        slot.owner.container_id = a.owner.container_id.clone();
        assert!(matches!(
            t.plan_in(&Txn { claims: vec![slot.clone()], releases: vec![] }, &batch),
            Err(c) if matches!(&c[0], Conflict::AttachmentBound(_))
        ));
        // 4. Release of the old record, then its address for a new container, in the batch.
        let c4 = t
            .plan_in(
                &Txn {
                    claims: vec![],
                    releases: vec![Release::from(&held)],
                },
                &batch,
            )
            .expect("release");
        assert_eq!(c4.deletes.len(), 1);
        assert_eq!(batch.add(&c4), 3);
        let mut reuse = lease(1, "p", "n");
        reuse.owner.container_id = "new".into();
        let c5 = t
            .plan_in(
                &Txn {
                    claims: vec![reuse],
                    releases: vec![],
                },
                &batch,
            )
            .expect("freed in the batch");
        assert_eq!(c5.writes[0].revision, 4);
        // The table itself has not changed: readers see only what is durable.
        assert_eq!(t.len(), 1);
        assert_eq!(t.revision(), 1);
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
