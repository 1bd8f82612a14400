//! Taking over a running Spiderpool's allocations, and giving them back: the decisions of
//! `spiderctl migrate` (the Kubernetes reads and writes are the agent crate's `ctl::migrate`).
//!
//! Spiderpool v0.9-v1.x keeps its records in two places: `SpiderIPPool.status.allocatedIPs` (a
//! JSON string, address -> `{interface, pod, podUid}`) and one SpiderEndpoint per pod
//! (`status.current`: UID, node, per NIC the addresses with prefix length, pools, gateways). It
//! records no container (sandbox) ID. [`plan_import`] turns both into this project's records:
//! the pool's status is the truth for who holds an address (as it is for Spiderpool), the
//! endpoint adds the node and `cleanGateway`, and every disagreement becomes a [`Finding`].
//!
//! An imported record's container is [`imported_container`] (`spiderpool-import-<pod uid>`):
//! no runtime ever names it, so the agent serves such records by pod instead (DEL and CHECK
//! of any sandbox of the pod, with the interface; an ADD of a new sandbox of the same pod takes
//! them over), CNI GC never frees them (no runtime lists them), and pod-lifecycle GC frees them
//! when their pod is gone, as any other record.
//!
//! Records are imported rather than dropped whenever in doubt (a pod that is gone, an address
//! outside its pool): holding an address one GC round too long costs an address; dropping a
//! live pod's record hands its address out twice.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::autopool::{self, LABEL_APP_UID, LABEL_SUBNET, LABEL_VERSION};
use crate::range::IpSet;
use crate::store::{Lease, Owner};
use crate::types::{Pod, SpiderEndpoint, SpiderIpPool, SpiderReservedIp, SpiderSubnet};

/// What every imported record's container ID starts with.
pub const IMPORTED_PREFIX: &str = "spiderpool-import-";

/// The container ID of a pod's imported records: one per pod (by UID, else by name), so the
/// records of one pod are one attachment group, as a sandbox's are.
pub fn imported_container(pod_uid: &str, namespace: &str, name: &str) -> String {
    if pod_uid.is_empty() {
        let h = crate::fnv1a(format!("{namespace}/{name}").into_bytes());
        format!("{IMPORTED_PREFIX}{h:016x}")
    } else {
        format!("{IMPORTED_PREFIX}{pod_uid}")
    }
}

/// Whether a record was imported from Spiderpool (no runtime names its container).
pub fn is_imported(lease: &Lease) -> bool {
    lease.owner.container_id.starts_with(IMPORTED_PREFIX)
}

/// One entry of Spiderpool's `status.allocatedIPs` (v0.9-v1.x, `PoolIPAllocation`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpiderpoolAllocation {
    /// The NIC in the pod.
    #[serde(default)]
    pub interface: String,
    /// `namespace/name`.
    pub pod: String,
    /// The pod's UID.
    #[serde(rename = "podUid", default)]
    pub pod_uid: String,
}

/// Reads `status.allocatedIPs` as Spiderpool v0.9-v1.x writes it. Earlier releases (an object
/// with `containerID`, `namespace`, `node` per address) are refused with what to do.
pub fn parse_allocated_ips(json: &str) -> Result<BTreeMap<String, SpiderpoolAllocation>, String> {
    if json.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    serde_json::from_str(json).map_err(|e| {
        format!(
            "status.allocatedIPs is not Spiderpool v0.9-v1.x's format (address -> {{interface, pod, podUid}}): {e}; upgrade Spiderpool to v1.x first (its own upgrade converts the records), then migrate"
        )
    })
}

/// `records` (one pool's) as Spiderpool's `status.allocatedIPs` JSON string: what
/// Spiderpool's IPAM reads back after a rollback.
pub fn format_allocated_ips(records: &[Lease]) -> String {
    let map: BTreeMap<String, SpiderpoolAllocation> = records
        .iter()
        .map(|l| {
            (
                l.ip.to_string(),
                SpiderpoolAllocation {
                    interface: l.owner.ifname.clone(),
                    pod: format!("{}/{}", l.owner.pod_namespace, l.owner.pod_name),
                    pod_uid: l.owner.pod_uid.clone(),
                },
            )
        })
        .collect();
    serde_json::to_string(&map).unwrap_or_default()
}

/// Something the import found inconsistent; what it did about it is in `detail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// A short kebab-case name (`address-in-two-pools`, `endpoint-without-pool-record`,
    /// `pod-gone`, ...).
    pub kind: String,
    /// What was found and what the import does with it.
    pub detail: String,
}

impl Finding {
    fn new(kind: &str, detail: String) -> Finding {
        Finding {
            kind: kind.to_string(),
            detail,
        }
    }
}

/// What the cluster says of one pod (for [`plan_import`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.nodeName`.
    pub node: String,
    /// `Succeeded` / `Failed` pods hold nothing any more.
    pub finished: bool,
}

impl PodFacts {
    /// The facts of `pod`.
    pub fn of(pod: &Pod) -> PodFacts {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        PodFacts {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node: pod.spec.node_name.clone().unwrap_or_default(),
            finished: matches!(phase, Some("Succeeded" | "Failed")),
        }
    }
}

/// Everything [`plan_import`] reads.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// SpiderIPPools (with status).
    pub pools: Vec<SpiderIpPool>,
    /// SpiderEndpoints.
    pub endpoints: Vec<SpiderEndpoint>,
    /// SpiderSubnets.
    pub subnets: Vec<SpiderSubnet>,
    /// SpiderReservedIPs.
    pub reserved: Vec<SpiderReservedIp>,
    /// Pods by (namespace, name).
    pub pods: HashMap<(String, String), PodFacts>,
}

/// What to write: the records, and what was found on the way.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportPlan {
    /// One record per address, sorted by address.
    pub records: Vec<Lease>,
    /// Inconsistencies, in the order found.
    pub findings: Vec<Finding>,
    /// Auto-pools whose Spiderpool labels our controller does not read: pool -> what to add.
    pub relabel: BTreeMap<String, Marks>,
}

/// Endpoint facts for one address.
struct EndpointAddr<'a> {
    ep: &'a SpiderEndpoint,
    ifname: &'a str,
    pool: Option<&'a str>,
    clean_gateway: bool,
}

fn bare(addr: &str) -> Option<IpAddr> {
    addr.split('/').next().and_then(|a| a.parse().ok())
}

/// Every address the endpoints name, with the endpoint and NIC naming it.
fn endpoint_addresses(endpoints: &[SpiderEndpoint]) -> BTreeMap<IpAddr, Vec<EndpointAddr<'_>>> {
    let mut out: BTreeMap<IpAddr, Vec<EndpointAddr<'_>>> = BTreeMap::new();
    for ep in endpoints {
        let Some(st) = &ep.status else { continue };
        for nic in &st.current.ips {
            for (addr, pool) in [
                (&nic.ipv4, nic.ipv4_pool.as_deref()),
                (&nic.ipv6, nic.ipv6_pool.as_deref()),
            ] {
                if let Some(ip) = addr.as_deref().and_then(bare) {
                    out.entry(ip).or_default().push(EndpointAddr {
                        ep,
                        ifname: &nic.interface,
                        pool,
                        clean_gateway: nic.clean_gateway.unwrap_or(false),
                    });
                }
            }
        }
    }
    out
}

/// One address as a pool's status records it.
struct PoolClaim<'a> {
    pool: &'a SpiderIpPool,
    entry: SpiderpoolAllocation,
}

/// Plans the import of `cluster`'s allocations (see the module docs); `now` stamps the records.
pub fn plan_import(cluster: &Cluster, now: u64) -> ImportPlan {
    let mut plan = ImportPlan::default();
    let mut pools: Vec<&SpiderIpPool> = cluster.pools.iter().collect();
    pools.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut claims: BTreeMap<IpAddr, Vec<PoolClaim<'_>>> = BTreeMap::new();
    for pool in &pools {
        let json = pool
            .status
            .as_ref()
            .and_then(|s| s.allocated_ips.as_deref());
        let entries = match json.map(parse_allocated_ips).transpose() {
            Ok(e) => e.unwrap_or_default(),
            Err(e) => {
                plan.findings.push(Finding::new(
                    "unreadable-allocated-ips",
                    format!("pool {}: {e}", pool.metadata.name),
                ));
                continue;
            }
        };
        for (ip, entry) in entries {
            match ip.parse::<IpAddr>() {
                Ok(ip) => claims
                    .entry(ip)
                    .or_default()
                    .push(PoolClaim { pool, entry }),
                Err(_) => plan.findings.push(Finding::new(
                    "bad-address",
                    format!(
                        "pool {}: allocatedIPs key '{ip}' is not an address; skipped",
                        pool.metadata.name
                    ),
                )),
            }
        }
    }
    let by_ep = endpoint_addresses(&cluster.endpoints);
    let reserved = reserved_set(&cluster.reserved);
    for (ip, list) in &claims {
        let eps = by_ep.get(ip).map(Vec::as_slice).unwrap_or_default();
        let chosen = choose_claim(*ip, list, eps, &mut plan.findings);
        let lease = record_from_pool(*ip, chosen, eps, cluster, now, &mut plan.findings);
        check_record(&lease, chosen.pool, &reserved, &mut plan.findings);
        plan.records.push(lease);
    }
    for (ip, eps) in &by_ep {
        if claims.contains_key(ip) {
            continue;
        }
        if let Some(lease) = record_from_endpoint(*ip, eps, &pools, cluster, now, &mut plan) {
            plan.records.push(lease);
        }
    }
    plan.records.sort_by_key(|l| l.ip);
    check_subnets(cluster, &mut plan.findings);
    for pool in &pools {
        if let Some(m) = autopool_marks(&pool.metadata.labels, &pool.metadata.annotations) {
            plan.relabel.insert(pool.metadata.name.clone(), m);
        }
    }
    plan
}

fn reserved_set(reserved: &[SpiderReservedIp]) -> Vec<IpSet> {
    reserved
        .iter()
        .filter_map(|r| {
            let fam = r.spec.ip_version.or_else(|| {
                r.spec
                    .ips
                    .first()
                    .map(|s| s.split('-').next().unwrap_or(s))
                    .and_then(|s| s.parse::<IpAddr>().ok())
                    .map(|ip| crate::range::IpFamily::of(&ip))
            })?;
            IpSet::parse(fam, &r.spec.ips).ok()
        })
        .collect()
}

/// Of the pools whose status names `ip`, the one to keep: the one the pod's endpoint names,
/// else the first by name.
fn choose_claim<'a>(
    ip: IpAddr,
    list: &'a [PoolClaim<'a>],
    eps: &[EndpointAddr<'_>],
    findings: &mut Vec<Finding>,
) -> &'a PoolClaim<'a> {
    let first = &list[0];
    if list.len() == 1 {
        return first;
    }
    let named = list.iter().find(|c| {
        eps.iter()
            .any(|e| e.pool == Some(c.pool.metadata.name.as_str()))
    });
    let chosen = named.unwrap_or(first);
    let names: Vec<String> = list
        .iter()
        .map(|c| format!("{} (pod {})", c.pool.metadata.name, c.entry.pod))
        .collect();
    findings.push(Finding::new(
        "address-in-two-pools",
        format!(
            "{ip} is in the allocatedIPs of {}: imported once, for pool {} (pod {}){}",
            names.join(" and "),
            chosen.pool.metadata.name,
            chosen.entry.pod,
            if named.is_some() {
                ", the pool its SpiderEndpoint names"
            } else {
                ""
            }
        ),
    ));
    chosen
}

fn split_pod(pod: &str) -> (String, String) {
    match pod.split_once('/') {
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => (String::new(), pod.to_string()),
    }
}

fn lease(ip: IpAddr, pool: &str, ns: String, name: String, uid: String, ifname: String) -> Lease {
    let container_id = imported_container(&uid, &ns, &name);
    Lease {
        ip,
        pool: pool.to_string(),
        owner: Owner {
            pod_namespace: ns,
            pod_name: name,
            pod_uid: uid,
            container_id,
            ifname,
            node: String::new(),
            network: String::new(),
            created: 0,
        },
        clean_gateway: false,
        revision: 0,
    }
}

/// The record for an address a pool's status holds; node and `cleanGateway` from the pod's
/// endpoint, else the node from the pod.
fn record_from_pool(
    ip: IpAddr,
    claim: &PoolClaim<'_>,
    eps: &[EndpointAddr<'_>],
    cluster: &Cluster,
    now: u64,
    findings: &mut Vec<Finding>,
) -> Lease {
    let (ns, name) = split_pod(&claim.entry.pod);
    let ifname = if claim.entry.interface.is_empty() {
        eps.first().map(|e| e.ifname).unwrap_or("eth0").to_string()
    } else {
        claim.entry.interface.clone()
    };
    let mut l = lease(
        ip,
        &claim.pool.metadata.name,
        ns.clone(),
        name.clone(),
        claim.entry.pod_uid.clone(),
        ifname,
    );
    l.owner.created = now;
    // The pod's endpoint: by name (Spiderpool names it after the pod), else by UID (KubeVirt
    // endpoints are named after the VM).
    let ep = eps.iter().find(|e| {
        let m = &e.ep.metadata;
        let uid = e.ep.status.as_ref().map(|s| s.current.uid.as_str());
        (m.namespace.as_deref() == Some(ns.as_str()) && m.name == name)
            || (!l.owner.pod_uid.is_empty() && uid == Some(l.owner.pod_uid.as_str()))
    });
    match ep {
        Some(e) => {
            l.owner.node =
                e.ep.status
                    .as_ref()
                    .map(|s| s.current.node.clone())
                    .unwrap_or_default();
            l.clean_gateway = e.clean_gateway;
        }
        None => {
            let other = eps.first().map(|e| {
                format!(
                    "; the SpiderEndpoint {}/{} names it instead (kept for the pool's pod)",
                    e.ep.metadata.namespace.as_deref().unwrap_or_default(),
                    e.ep.metadata.name
                )
            });
            findings.push(Finding::new(
                "pool-record-without-endpoint",
                format!(
                    "{ip} (pool {}) is held by pod {}/{} but no SpiderEndpoint of that pod names it{}",
                    l.pool,
                    ns,
                    name,
                    other.unwrap_or_default()
                ),
            ));
        }
    }
    pod_facts(&mut l, cluster, findings);
    l
}

/// Checks the record's pod and fills in its node from the pod when the endpoint did not.
fn pod_facts(l: &mut Lease, cluster: &Cluster, findings: &mut Vec<Finding>) {
    let key = (l.owner.pod_namespace.clone(), l.owner.pod_name.clone());
    let pod = format!("{}/{}", key.0, key.1);
    match cluster.pods.get(&key) {
        None => findings.push(Finding::new(
            "pod-gone",
            format!(
                "{} (pool {}) is held by pod {pod}, which no longer exists: imported, and freed by the agents' GC",
                l.ip, l.pool
            ),
        )),
        Some(p) if !l.owner.pod_uid.is_empty() && !p.uid.is_empty() && p.uid != l.owner.pod_uid => {
            findings.push(Finding::new(
                "pod-replaced",
                format!(
                    "{} (pool {}) is held by pod {pod} UID {}, but the pod of that name now has UID {}: imported, and freed by the agents' GC",
                    l.ip, l.pool, l.owner.pod_uid, p.uid
                ),
            ))
        }
        Some(p) => {
            if p.finished {
                findings.push(Finding::new(
                    "pod-finished",
                    format!(
                        "{} (pool {}) is held by pod {pod}, which has finished: imported, and freed by the agents' GC",
                        l.ip, l.pool
                    ),
                ));
            }
            if l.owner.pod_uid.is_empty() {
                l.owner.pod_uid = p.uid.clone();
            }
            if l.owner.node.is_empty() {
                l.owner.node = p.node.clone();
            }
        }
    }
}

fn check_record(l: &Lease, pool: &SpiderIpPool, reserved: &[IpSet], findings: &mut Vec<Finding>) {
    if !pool.spec.addresses().is_some_and(|s| s.contains(l.ip)) {
        findings.push(Finding::new(
            "address-outside-pool",
            format!(
                "{} is recorded in pool {} but is not one of its addresses (ips minus excludeIPs): imported (its pod keeps it), never handed out by that pool",
                l.ip, l.pool
            ),
        ));
    }
    if reserved.iter().any(|r| r.contains(l.ip)) {
        findings.push(Finding::new(
            "reserved-address-allocated",
            format!(
                "{} (pool {}, pod {}/{}) is a SpiderReservedIP: imported (its pod keeps it); never handed out again once freed",
                l.ip, l.pool, l.owner.pod_namespace, l.owner.pod_name
            ),
        ));
    }
}

/// An address only an endpoint names (Spiderpool wrote the endpoint, not the pool's status: a
/// crash between its two writes). Imported when its pod still runs with that UID, since the pod
/// may be using it; else reported and left free.
fn record_from_endpoint(
    ip: IpAddr,
    eps: &[EndpointAddr<'_>],
    pools: &[&SpiderIpPool],
    cluster: &Cluster,
    now: u64,
    plan: &mut ImportPlan,
) -> Option<Lease> {
    let e = eps.first()?;
    let ns = e.ep.metadata.namespace.clone().unwrap_or_default();
    let name = e.ep.metadata.name.clone();
    let st = e.ep.status.as_ref()?;
    let alive = cluster
        .pods
        .get(&(ns.clone(), name.clone()))
        .is_some_and(|p| !p.finished && (p.uid.is_empty() || p.uid == st.current.uid));
    let pool = e
        .pool
        .and_then(|p| pools.iter().find(|x| x.metadata.name == p));
    let (Some(pool), true) = (pool, alive) else {
        plan.findings.push(Finding::new(
            "endpoint-without-pool-record",
            format!(
                "{ip} is named by SpiderEndpoint {ns}/{name} (pool {}) but no pool's allocatedIPs holds it; {}: not imported",
                e.pool.unwrap_or("none"),
                if alive { "the pool does not exist" } else { "its pod is gone" }
            ),
        ));
        return None;
    };
    plan.findings.push(Finding::new(
        "endpoint-without-pool-record",
        format!(
            "{ip} is named by SpiderEndpoint {ns}/{name} (pool {}) but no pool's allocatedIPs holds it; its pod runs: imported",
            pool.metadata.name
        ),
    ));
    let mut l = lease(
        ip,
        &pool.metadata.name,
        ns,
        name,
        st.current.uid.clone(),
        e.ifname.to_string(),
    );
    l.owner.node = st.current.node.clone();
    l.owner.created = now;
    l.clean_gateway = e.clean_gateway;
    Some(l)
}

/// Subnets whose ledger (`controlledIPPools`) names a pool that does not exist, or promises it
/// other addresses than it has: kept as they are (the controller's reconcile mends them).
fn check_subnets(cluster: &Cluster, findings: &mut Vec<Finding>) {
    for p in autopool::ledger_problems(&cluster.subnets, &cluster.pools) {
        let kind = if p.has.is_none() {
            "ledger-names-missing-pool"
        } else {
            "ledger-disagrees"
        };
        findings.push(Finding::new(kind, format!("{p}: kept")));
    }
}

/// Labels and annotations to add to a pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks {
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

/// Spiderpool v1.x's auto-pool labels (`ipam.spidernet.io/owner-application-*`, `ip-version:
/// IPv4`) as the labels and annotation our controller finds an auto-pool and its application
/// by (without them its reconcile would take the pool for an orphan and reclaim it); `None`
/// when there is nothing to add (not an auto-pool, or marked already).
pub fn autopool_marks(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Option<Marks> {
    labels.get(LABEL_SUBNET)?;
    let get = |k: &str| labels.get(&format!("ipam.spidernet.io/owner-application-{k}"));
    let (gv, kind, ns, name) = (get("gv")?, get("kind")?, get("namespace")?, get("name")?);
    let (group, version) = match gv.split_once('_') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), gv.clone()),
    };
    let app = autopool::App {
        group,
        version,
        kind: kind.clone(),
        namespace: ns.clone(),
        name: name.clone(),
        uid: get("uid").cloned().unwrap_or_default(),
        replicas: 0,
        annotations: BTreeMap::new(),
    };
    let mut want = app.labels();
    want.insert(LABEL_APP_UID.into(), autopool::label_value(&app.uid));
    let version = match labels.get(LABEL_VERSION).map(String::as_str) {
        Some("IPv4") => Some("4"),
        Some("IPv6") => Some("6"),
        _ => None,
    };
    if let Some(v) = version {
        want.insert(LABEL_VERSION.into(), v.into());
    }
    want.retain(|k, v| labels.get(k) != Some(v));
    let mut annos = BTreeMap::from([(autopool::ANNO_APPLICATION.to_string(), app.application())]);
    annos.retain(|k, v| annotations.get(k) != Some(v));
    (!want.is_empty() || !annos.is_empty()).then_some(Marks {
        labels: want,
        annotations: annos,
    })
}

/// The reverse of [`autopool_marks`] for Spiderpool after a rollback: `ip-version` back to
/// `IPv4`/`IPv6` (its controller lists auto-pools by that value).
pub fn spiderpool_version_label(labels: &BTreeMap<String, String>) -> Option<&'static str> {
    labels.get(LABEL_SUBNET)?;
    match labels.get(LABEL_VERSION).map(String::as_str) {
        Some("4") => Some("IPv4"),
        Some("6") => Some("IPv6"),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
