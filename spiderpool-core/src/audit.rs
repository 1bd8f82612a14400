//! `spiderctl check`: every allocation record judged against the cluster, without I/O.
//!
//! The caller reads the records first and the pods afterwards (a pod that holds a record was
//! created before it, so a pod missing from the later read is really gone), then asks
//! [`audit`]. A leak is judged exactly as GC judges it ([`crate::lifecycle::judge`], the
//! StatefulSet exemption included), so what `check` calls a leak is what GC will free, and the
//! finding says how long GC will still wait. [`Finding::releasable`] says which findings
//! `spiderctl release --from-report` acts on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::autopool;
use crate::engine::is_conflict;
use crate::lifecycle::{self, PodFacts, Reason};
use crate::range::IpSet;
use crate::store::Lease;
use crate::types::{SpiderEndpoint, SpiderIpPool, SpiderSubnet};

/// What the cluster says of one pod, read after the records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodState {
    /// `metadata.uid`.
    pub uid: String,
    /// A mirror pod's `kubernetes.io/config.mirror` annotation.
    pub mirror_of: Option<String>,
    /// `status.phase`.
    pub phase: Option<String>,
    /// `metadata.deletionTimestamp`, seconds since the epoch.
    pub deletion: Option<u64>,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork` (its addresses are the node's, never ours).
    pub host_network: bool,
}

impl PodState {
    fn facts(&self) -> PodFacts<'_> {
        PodFacts::Present {
            uid: &self.uid,
            mirror_of: self.mirror_of.as_deref(),
            phase: self.phase.as_deref(),
            deletion: self.deletion,
        }
    }
}

/// How GC is set up (to say when it frees a leak).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcTiming {
    /// Seconds between GC rounds.
    pub interval: u64,
    /// Seconds past a terminating pod's grace period before GC frees its address.
    pub margin: u64,
}

impl Default for GcTiming {
    fn default() -> Self {
        GcTiming {
            interval: 10,
            margin: 30,
        }
    }
}

/// What [`audit`] reads.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Every record.
    pub records: &'a [Lease],
    /// Every SpiderIPPool.
    pub pools: &'a [SpiderIpPool],
    /// Every SpiderSubnet.
    pub subnets: &'a [SpiderSubnet],
    /// Every SpiderEndpoint.
    pub endpoints: &'a [SpiderEndpoint],
    /// Every pod, by (namespace, name); `None` outside Kubernetes (no leak can be judged).
    pub pods: Option<&'a HashMap<(String, String), PodState>>,
    /// StatefulSets by (namespace, name): (`spec.ordinals.start`, `spec.replicas`).
    pub statefulsets: &'a HashMap<(String, String), (i64, i64)>,
    /// Now, seconds since the epoch.
    pub now: u64,
    /// GC's settings.
    pub gc: GcTiming,
}

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A record whose pod is gone, finished, past its grace period or replaced.
    Leak,
    /// A record of a pool that no longer exists.
    PoolMissing,
    /// A record of an address its pool no longer contains.
    OutsidePool,
    /// A record marking an address in conflict (another host answered for it).
    Conflict,
    /// A pod's `status.podIPs` names an address of our pools that no record holds.
    PodIpNotHeld,
    /// A pod's `status.podIPs` names an address held for another pod.
    PodIpHeldByOther,
    /// A SpiderEndpoint whose addresses are not the records of its pod.
    EndpointDisagrees,
    /// A subnet's `controlledIPPools` names a pool that does not exist.
    LedgerNamesMissingPool,
    /// A subnet's `controlledIPPools` promises a pool other addresses than it has.
    LedgerDisagrees,
}

impl Kind {
    /// The kebab-case name (as in the JSON report).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Leak => "leak",
            Kind::PoolMissing => "pool-missing",
            Kind::OutsidePool => "outside-pool",
            Kind::Conflict => "conflict",
            Kind::PodIpNotHeld => "pod-ip-not-held",
            Kind::PodIpHeldByOther => "pod-ip-held-by-other",
            Kind::EndpointDisagrees => "endpoint-disagrees",
            Kind::LedgerNamesMissingPool => "ledger-names-missing-pool",
            Kind::LedgerDisagrees => "ledger-disagrees",
        }
    }
}

/// One thing `check` found. For findings about a record, the record's identity (`ip`,
/// `containerID`, `ifname`, `podUID`) is what `release --from-report` frees conditionally on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// What it is.
    pub kind: Kind,
    /// The address, when the finding is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    /// The pool (of the record, or of the address).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pool: String,
    /// `namespace/name` of the pod concerned.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
    /// The record's pod UID.
    #[serde(default, rename = "podUID", skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
    /// The record's container.
    #[serde(
        default,
        rename = "containerID",
        skip_serializing_if = "String::is_empty"
    )]
    pub container_id: String,
    /// The record's interface.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ifname: String,
    /// The record's node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// For a leak: why (`pod_gone`, `pod_finished`, `pod_terminating`, `pod_replaced`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a leak: at most this many seconds until GC frees it (if the node's agent runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc_within_secs: Option<u64>,
    /// What was found, in words, and what to do about it.
    pub detail: String,
}

impl Finding {
    /// Whether `release --from-report` frees it: a record nobody should hold.
    pub fn releasable(&self) -> bool {
        matches!(
            self.kind,
            Kind::Leak | Kind::PoolMissing | Kind::OutsidePool | Kind::Conflict
        ) && self.ip.is_some()
    }

    fn of_record(kind: Kind, l: &Lease, detail: String) -> Finding {
        Finding {
            kind,
            ip: Some(l.ip),
            pool: l.pool.clone(),
            pod: pod_name(l),
            pod_uid: l.owner.pod_uid.clone(),
            container_id: l.owner.container_id.clone(),
            ifname: l.owner.ifname.clone(),
            node: l.owner.node.clone(),
            reason: None,
            gc_within_secs: None,
            detail,
        }
    }

    fn plain(kind: Kind, detail: String) -> Finding {
        Finding {
            kind,
            ip: None,
            pool: String::new(),
            pod: String::new(),
            pod_uid: String::new(),
            container_id: String::new(),
            ifname: String::new(),
            node: String::new(),
            reason: None,
            gc_within_secs: None,
            detail,
        }
    }
}

fn pod_name(l: &Lease) -> String {
    if l.owner.pod_namespace.is_empty() {
        String::new()
    } else {
        format!("{}/{}", l.owner.pod_namespace, l.owner.pod_name)
    }
}

/// What a check counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Records.
    pub records: usize,
    /// Pools.
    pub pools: usize,
    /// Pods (none outside Kubernetes).
    pub pods: usize,
    /// SpiderEndpoints.
    pub endpoints: usize,
    /// SpiderSubnets.
    pub subnets: usize,
}

/// Every finding, ordered by kind, then address.
pub fn audit(input: &Input<'_>) -> (Counts, Vec<Finding>) {
    let mut out = Vec::new();
    let pools: BTreeMap<&str, Option<IpSet>> = input
        .pools
        .iter()
        .map(|p| (p.metadata.name.as_str(), p.spec.addresses()))
        .collect();
    for l in input.records {
        check_record(input, &pools, l, &mut out);
    }
    if let Some(pods) = input.pods {
        check_pods(input, pods, &pools, &mut out);
    }
    check_endpoints(input, &mut out);
    for p in autopool::ledger_problems(input.subnets, input.pools) {
        let kind = if p.has.is_none() {
            Kind::LedgerNamesMissingPool
        } else {
            Kind::LedgerDisagrees
        };
        let mut f = Finding::plain(kind, p.to_string());
        f.pool = p.pool.clone();
        out.push(f);
    }
    out.sort_by(|a, b| (a.kind, a.ip, &a.pod).cmp(&(b.kind, b.ip, &b.pod)));
    let counts = Counts {
        records: input.records.len(),
        pools: input.pools.len(),
        pods: input.pods.map_or(0, HashMap::len),
        endpoints: input.endpoints.len(),
        subnets: input.subnets.len(),
    };
    (counts, out)
}

fn check_record(
    input: &Input<'_>,
    pools: &BTreeMap<&str, Option<IpSet>>,
    l: &Lease,
    out: &mut Vec<Finding>,
) {
    if is_conflict(l) {
        out.push(Finding::of_record(
            Kind::Conflict,
            l,
            format!(
                "{} is marked in conflict (host {} answered for it): never handed out; once that host is gone, `spiderctl release --ip {}`",
                l.ip, l.owner.ifname, l.ip
            ),
        ));
        return;
    }
    match pools.get(l.pool.as_str()) {
        None => out.push(Finding::of_record(
            Kind::PoolMissing,
            l,
            format!(
                "{} is held for {} in pool {}, which no longer exists",
                l.ip,
                who(l),
                l.pool
            ),
        )),
        Some(Some(addrs)) if !addrs.contains(l.ip) => out.push(Finding::of_record(
            Kind::OutsidePool,
            l,
            format!(
                "{} is held for {} in pool {}, which no longer contains it (ips or excludeIPs changed)",
                l.ip,
                who(l),
                l.pool
            ),
        )),
        _ => {}
    }
    let Some(pods) = input.pods else { return };
    if let Some(f) = leak(input, pods, l) {
        out.push(f);
    }
}

fn who(l: &Lease) -> String {
    if l.owner.pod_namespace.is_empty() {
        format!("container {}", l.owner.container_id)
    } else {
        format!("pod {}", pod_name(l))
    }
}

/// A leak finding for `l`, when GC would free it.
fn leak(
    input: &Input<'_>,
    pods: &HashMap<(String, String), PodState>,
    l: &Lease,
) -> Option<Finding> {
    let key = (l.owner.pod_namespace.clone(), l.owner.pod_name.clone());
    let pod = pods.get(&key);
    let facts = pod.map_or(PodFacts::Gone, PodState::facts);
    let reason = lifecycle::judge(l, facts, input.now, input.gc.margin)?;
    if matches!(reason, Reason::PodGone | Reason::PodReplaced) {
        if let Some((base, ordinal)) = lifecycle::statefulset_ordinal(&l.owner.pod_name) {
            let sts = (l.owner.pod_namespace.clone(), base.to_string());
            if let Some((start, replicas)) = input.statefulsets.get(&sts) {
                if lifecycle::statefulset_wants_ordinal(ordinal, *start, *replicas) {
                    return None;
                }
            }
        }
    }
    let what = match reason {
        Reason::PodGone => "no longer exists".to_string(),
        Reason::PodFinished => format!(
            "has finished ({})",
            pod.and_then(|p| p.phase.as_deref()).unwrap_or("?")
        ),
        Reason::PodTerminating => "is past its grace period".to_string(),
        Reason::PodReplaced => format!(
            "was replaced by a pod of UID {}",
            pod.map_or("?", |p| p.uid.as_str())
        ),
        Reason::NodeGone => "is on a node that is gone".to_string(),
    };
    // Two rounds judge it dead before it is freed.
    let within = 2 * input.gc.interval.max(1);
    let mut f = Finding::of_record(
        Kind::Leak,
        l,
        format!(
            "{} is held for pod {} (UID {}), which {what}: GC on node {} frees it within {within} s; `spiderctl release --ip {}` frees it now",
            l.ip,
            pod_name(l),
            if l.owner.pod_uid.is_empty() { "?" } else { &l.owner.pod_uid },
            if l.owner.node.is_empty() { "?" } else { &l.owner.node },
            l.ip
        ),
    );
    f.reason = Some(reason.as_str().to_string());
    f.gc_within_secs = Some(within);
    Some(f)
}

/// Pods whose `status.podIPs` name an address of our pools that is not held for them.
fn check_pods(
    input: &Input<'_>,
    pods: &HashMap<(String, String), PodState>,
    pools: &BTreeMap<&str, Option<IpSet>>,
    out: &mut Vec<Finding>,
) {
    let by_ip: HashMap<IpAddr, &Lease> = input.records.iter().map(|l| (l.ip, l)).collect();
    let mut keys: Vec<&(String, String)> = pods.keys().collect();
    keys.sort();
    for key in keys {
        let p = &pods[key];
        if p.host_network || matches!(p.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        let name = format!("{}/{}", key.0, key.1);
        for ip in &p.ips {
            let Some(pool) = pools
                .iter()
                .find(|(_, a)| a.as_ref().is_some_and(|a| a.contains(*ip)))
                .map(|(n, _)| n.to_string())
            else {
                continue; // not one of ours (another network)
            };
            match by_ip.get(ip) {
                None => {
                    let mut f = Finding::plain(
                        Kind::PodIpNotHeld,
                        format!(
                            "pod {name} uses {ip} (status.podIPs) of pool {pool}, but no record holds it: it can be handed out again; delete the pod so it gets a tracked address"
                        ),
                    );
                    f.ip = Some(*ip);
                    f.pool = pool;
                    f.pod = name.clone();
                    out.push(f);
                }
                Some(l)
                    if l.owner.pod_namespace != key.0
                        || l.owner.pod_name != key.1
                        || (!l.owner.pod_uid.is_empty()
                            && l.owner.pod_uid != p.uid
                            && p.mirror_of.as_deref() != Some(l.owner.pod_uid.as_str())) =>
                {
                    let mut f = Finding::plain(
                        Kind::PodIpHeldByOther,
                        format!(
                            "pod {name} uses {ip} (status.podIPs), but it is held for {} (UID {}): two pods may use one address",
                            who(l),
                            l.owner.pod_uid
                        ),
                    );
                    f.ip = Some(*ip);
                    f.pool = l.pool.clone();
                    f.pod = name.clone();
                    out.push(f);
                }
                Some(_) => {}
            }
        }
    }
}

/// SpiderEndpoints whose addresses differ from their pod's records.
fn check_endpoints(input: &Input<'_>, out: &mut Vec<Finding>) {
    let mut held: HashMap<(&str, &str), BTreeSet<IpAddr>> = HashMap::new();
    for l in input.records {
        held.entry((&l.owner.pod_namespace, &l.owner.pod_name))
            .or_default()
            .insert(l.ip);
    }
    for e in input.endpoints {
        let Some(st) = &e.status else { continue };
        let ns = e.metadata.namespace.as_deref().unwrap_or("default");
        let shown: BTreeSet<IpAddr> = st
            .current
            .ips
            .iter()
            .flat_map(|i| [i.ipv4.as_deref(), i.ipv6.as_deref()])
            .flatten()
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect();
        let has = held
            .get(&(ns, e.metadata.name.as_str()))
            .cloned()
            .unwrap_or_default();
        if shown != has {
            let mut f = Finding::plain(
                Kind::EndpointDisagrees,
                format!(
                    "SpiderEndpoint {ns}/{} shows {} but the records hold {} for that pod: the agent of node {} rewrites it (or deletes it once the pod is gone)",
                    e.metadata.name,
                    list(&shown),
                    list(&has),
                    if st.current.node.is_empty() { "?" } else { &st.current.node }
                ),
            );
            f.pod = format!("{ns}/{}", e.metadata.name);
            f.node = st.current.node.clone();
            out.push(f);
        }
    }
}

fn list(s: &BTreeSet<IpAddr>) -> String {
    if s.is_empty() {
        return "nothing".into();
    }
    s.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
