//! The agent's pod-lifecycle garbage collection (views that track pods: Kubernetes).
//!
//! Every interval: this node's records are judged against their pods
//! ([`spiderpool_core::lifecycle::judge`]): pods gone, Succeeded/Failed, terminating past their
//! grace period plus a margin, or replaced by a pod of the same name with another UID. A pod the
//! watch cache shows alive is alive; any other verdict is confirmed by reading the pod from the
//! API server. With a store every node shares, records of nodes that no longer exist are judged
//! too. Nothing is freed before it was judged dead in two rounds in a row
//! ([`spiderpool_core::lifecycle::Suspects`]), and a pod that cannot be read keeps its address.
//! Frees are conditional releases of exactly the record judged, so a record that changed hands
//! in between is left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use spiderpool_core::lifecycle::{judge, PodFacts, Reason, Suspects};
use spiderpool_core::store::{Filter, Lease, LeaseStore, Outcome, Release, Txn};
use spiderpool_core::types::Pod;

use crate::metrics::LIFECYCLE_REASONS;
use crate::server::Agent;

fn facts(pod: &Option<Pod>) -> PodFacts<'_> {
    match pod {
        None => PodFacts::Gone,
        Some(p) => PodFacts::Present {
            uid: p.metadata.uid.as_deref().unwrap_or(""),
            mirror_of: p
                .metadata
                .annotations
                .get(spiderpool_core::lifecycle::ANNO_CONFIG_MIRROR)
                .map(String::as_str),
            phase: p.status.as_ref().and_then(|s| s.phase.as_deref()),
            deletion: p
                .metadata
                .deletion_timestamp
                .as_deref()
                .and_then(spiderpool_core::rfc3339::parse),
        },
    }
}

/// What an operator steers GC by (the agent's `--gc-*` flags; docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Time between rounds.
    pub every: Duration,
    /// Seconds a terminating pod keeps its address past its grace period.
    pub margin: u64,
    /// Free the addresses of gone, replaced or terminating pods while this node is NotReady
    /// (default: keep them; a partitioned node may still run those containers, and freeing
    /// their addresses then makes duplicates). Finished pods are freed either way.
    pub free_on_not_ready_node: bool,
    /// Only report (log lines, the leak-candidates gauge) what would be freed.
    pub dry_run: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            every: Duration::from_secs(60),
            margin: 30,
            free_on_not_ready_node: false,
            dry_run: false,
        }
    }
}

/// Keeps, while this node is NotReady, every verdict but `PodFinished` (the kubelet reported
/// that phase: its containers are stopped).
async fn hold_on_not_ready(agent: &Agent, verdicts: &mut [(Lease, Option<Reason>)]) {
    if !verdicts
        .iter()
        .any(|(_, v)| v.is_some_and(|r| r != Reason::PodFinished))
    {
        return;
    }
    let ready = match agent.view.node_ready_now(&agent.node).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "GC: this node unreadable; addresses kept this round");
            Some(false)
        }
    };
    if ready == Some(false) {
        let mut kept = 0;
        for (_, v) in verdicts.iter_mut() {
            if v.is_some_and(|r| r != Reason::PodFinished) {
                *v = None;
                kept += 1;
            }
        }
        tracing::warn!(kept, node = %agent.node, "GC: node is NotReady, addresses of its gone or terminating pods kept (--gc-free-on-not-ready-node frees them)");
    }
}

/// One round: judges, remembers suspects, frees what was dead twice. Returns what it freed
/// (in a dry run: what it would have freed).
pub async fn round(
    agent: &Agent,
    suspects: &mut Suspects,
    settings: &Settings,
) -> Result<Vec<(Lease, Reason)>, String> {
    let margin = settings.margin;
    let store = agent.engine.store();
    let mine = store
        .list(Filter::Node(&agent.node))
        .await
        .map_err(|e| e.to_string())?
        .leases;
    let mut by_pool: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for l in mine
        .iter()
        .filter(|l| spiderpool_core::engine::is_conflict(l))
    {
        by_pool.entry(l.pool.clone()).or_default().1 += 1;
    }
    let snap = agent.view.snapshot();
    let t = spiderpool_store::task::now_secs();
    let mut fresh: BTreeMap<(String, String), Option<Pod>> = BTreeMap::new();
    let mut verdicts = Vec::with_capacity(mine.len());
    for l in mine {
        let key = (l.owner.pod_namespace.clone(), l.owner.pod_name.clone());
        let cached = snap.pods.get(&key).cloned();
        let mut verdict = judge(&l, facts(&cached), t, margin);
        if verdict.is_some() {
            // The cache says dead: ask the API server (once per pod per round).
            if !fresh.contains_key(&key) {
                match agent.view.pod_now(&key.0, &key.1).await {
                    Ok(p) => {
                        fresh.insert(key.clone(), p);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "GC: pod unreadable; its addresses are kept");
                        verdicts.push((l, None));
                        continue;
                    }
                }
            }
            verdict = fresh.get(&key).and_then(|p| judge(&l, facts(p), t, margin));
            // A StatefulSet pod between two incarnations keeps its address while its ordinal
            // is wanted (its next sandbox takes the record over).
            if matches!(verdict, Some(Reason::PodGone | Reason::PodReplaced)) {
                match agent.view.statefulset_wants(&key.0, &key.1).await {
                    Ok(Some(true)) => verdict = None,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "GC: StatefulSet unreadable; addresses kept");
                        verdict = None;
                    }
                }
            }
        }
        verdicts.push((l, verdict));
    }
    // Records of nodes that are gone: only where every node's records are at hand (a store all
    // nodes share and this agent mirrors: kube).
    if !settings.free_on_not_ready_node {
        hold_on_not_ready(agent, &mut verdicts).await;
    }
    if store.mirrors_all_nodes() {
        verdicts.extend(node_gone(agent, &mut fresh, t, margin).await?);
        if !settings.dry_run {
            return_gone_blocks(agent).await;
        }
    }
    let candidates = verdicts.iter().filter(|(_, v)| v.is_some()).count();
    for (l, _) in verdicts.iter().filter(|(_, v)| v.is_some()) {
        by_pool.entry(l.pool.clone()).or_default().0 += 1;
    }
    *agent
        .metrics
        .gc_by_pool
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = by_pool;
    agent
        .metrics
        .gc_leak_candidates
        .store(u64::try_from(candidates).unwrap_or(u64::MAX), Relaxed);
    let due = suspects.round(verdicts);
    if settings.dry_run {
        for (lease, reason) in &due {
            tracing::info!(ip = %lease.ip, pod = %format!("{}/{}", lease.owner.pod_namespace, lease.owner.pod_name),
                container = %lease.owner.container_id, reason = reason.as_str(), "GC dry run: would free");
        }
        return Ok(due);
    }
    Ok(free(agent, due).await)
}

/// Gives back the blocks of nodes that are gone once they hold none of that node's records (a
/// store with node-affine blocks; their records were freed in an earlier round).
async fn return_gone_blocks(agent: &Agent) {
    let store = agent.engine.store();
    let mut gone = Vec::new();
    for n in store.idle_block_owners() {
        match agent.view.node_exists_now(&n).await {
            Ok(false) => gone.push(n),
            Ok(true) => {}
            Err(e) => tracing::warn!(error = %e, "GC: node unreadable; its blocks are kept"),
        }
    }
    if gone.is_empty() {
        return;
    }
    match store.return_blocks(&gone).await {
        Ok(n) if n > 0 => {
            tracing::info!(blocks = n, nodes = ?gone, "GC gave back the blocks of nodes that are gone")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "GC: giving back blocks failed; next round"),
    }
}

/// Frees each record judged dead twice (a conditional release of exactly that record).
async fn free(agent: &Agent, due: Vec<(Lease, Reason)>) -> Vec<(Lease, Reason)> {
    let store = agent.engine.store();
    let mut freed = Vec::new();
    for (lease, reason) in due {
        let txn = Txn {
            claims: Vec::new(),
            releases: vec![Release::from(&lease)],
        };
        match store.commit(txn).await {
            Ok(Outcome::Committed { released, revision }) if !released.is_empty() => {
                if let Some(i) = LIFECYCLE_REASONS.iter().position(|r| *r == reason) {
                    agent.metrics.lifecycle_released[i].fetch_add(1, Relaxed);
                }
                agent.engine.observe(&lease.pool, lease.ip, revision, false);
                tracing::info!(ip = %lease.ip, pod = %format!("{}/{}", lease.owner.pod_namespace, lease.owner.pod_name),
                    container = %lease.owner.container_id, node = %lease.owner.node, reason = reason.as_str(), "GC freed");
                if !lease.owner.pod_namespace.is_empty() {
                    agent.view.pod_event(crate::view::events::PodEvent {
                        namespace: lease.owner.pod_namespace.clone(),
                        name: lease.owner.pod_name.clone(),
                        uid: lease.owner.pod_uid.clone(),
                        type_: "Normal",
                        reason: "ReleasedByGC",
                        message: format!(
                            "{} of pool {} freed by GC on {} ({}; container {})",
                            lease.ip,
                            lease.pool,
                            agent.node,
                            reason.as_str(),
                            lease.owner.container_id
                        ),
                    });
                }
                freed.push((lease, reason));
            }
            Ok(_) => {}
            Err(e) => {
                agent.metrics.gc_failures.fetch_add(1, Relaxed);
                tracing::warn!(ip = %lease.ip, error = %e, "GC: release failed; next round");
            }
        }
    }
    freed
}

/// Verdicts for the records of other nodes whose Node object is gone (read twice, fresh).
async fn node_gone(
    agent: &Agent,
    fresh: &mut BTreeMap<(String, String), Option<Pod>>,
    t: u64,
    margin: u64,
) -> Result<Vec<(Lease, Option<Reason>)>, String> {
    let store = agent.engine.store();
    let mut out = Vec::new();
    let all = store
        .list(Filter::All)
        .await
        .map_err(|e| e.to_string())?
        .leases;
    let nodes: BTreeSet<&str> = all
        .iter()
        .map(|l| l.owner.node.as_str())
        .filter(|n| *n != agent.node && !n.is_empty())
        .collect();
    // A record that names no node (imported from Spiderpool for a pod no endpoint or pod
    // placed) is judged by its pod alone, as a gone node's are.
    let mut gone: BTreeSet<String> = all
        .iter()
        .any(|l| l.owner.node.is_empty())
        .then(String::new)
        .into_iter()
        .collect();
    for n in nodes {
        match agent.view.node_exists_now(n).await {
            Ok(false) => {
                gone.insert(n.to_string());
            }
            Ok(true) => {}
            Err(e) => tracing::warn!(error = %e, "GC: node unreadable; its addresses are kept"),
        }
    }
    for l in all {
        if !gone.contains(&l.owner.node) {
            continue;
        }
        // A Node object can be deleted while its pods still run (maintenance, a cloud
        // controller during a partition): only a record whose pod is also gone or finished,
        // read fresh, is freed for it.
        let key = (l.owner.pod_namespace.clone(), l.owner.pod_name.clone());
        if !fresh.contains_key(&key) {
            match agent.view.pod_now(&key.0, &key.1).await {
                Ok(p) => {
                    fresh.insert(key.clone(), p);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "GC: pod of a gone node unreadable; kept");
                    continue;
                }
            }
        }
        let pod_done = match fresh.get(&key) {
            Some(None) => true,
            Some(Some(p)) => matches!(
                judge(&l, facts(&Some(p.clone())), t, margin),
                Some(Reason::PodFinished | Reason::PodReplaced)
            ),
            None => false,
        };
        if pod_done && !l.owner.pod_namespace.is_empty() {
            out.push((l, Some(Reason::NodeGone)));
        }
    }
    Ok(out)
}

/// Runs [`round`] every `every` until `stop` changes (only for views that track pods).
pub async fn run(
    agent: Arc<Agent>,
    settings: Settings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if !agent.view.tracks_pods() {
        return;
    }
    let mut suspects = Suspects::default();
    loop {
        if !spiderpool_store::task::sleep_or_stop(settings.every, &mut stop).await {
            return;
        }
        if let Err(e) = round(&agent, &mut suspects, &settings).await {
            tracing::warn!(error = %e, "GC round failed");
        }
    }
}
