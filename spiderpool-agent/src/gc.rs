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

/// One round: judges, remembers suspects, frees what was dead twice. Returns what it freed.
pub async fn round(
    agent: &Agent,
    suspects: &mut Suspects,
    margin: u64,
) -> Result<Vec<(Lease, Reason)>, String> {
    let store = agent.engine.store();
    let mine = store
        .list(Filter::Node(&agent.node))
        .await
        .map_err(|e| e.to_string())?
        .leases;
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
    if store.mirrors_all_nodes() {
        verdicts.extend(node_gone(agent, &mut fresh, t, margin).await?);
    }
    let mut freed = Vec::new();
    for (lease, reason) in suspects.round(verdicts) {
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
                freed.push((lease, reason));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(ip = %lease.ip, error = %e, "GC: release failed; next round"),
        }
    }
    Ok(freed)
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
    every: Duration,
    margin: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if !agent.view.tracks_pods() {
        return;
    }
    let mut suspects = Suspects::default();
    loop {
        if !spiderpool_store::task::sleep_or_stop(every, &mut stop).await {
            return;
        }
        if let Err(e) = round(&agent, &mut suspects, margin).await {
            tracing::warn!(error = %e, "GC round failed");
        }
    }
}
