//! StatefulSet pods keep their addresses across restarts and reschedules within the zone: ADD
//! moves the latest earlier sandbox's records to the new one; DEL keeps a wanted ordinal's
//! records for the next sandbox.

use spiderpool_core::engine::Attachment;
use spiderpool_core::select::SelectionInput;
use spiderpool_core::store::{Filter, Lease, LeaseStore};
use spiderpool_core::PoolSet;
use spiderpool_store::task::now_secs;

use crate::agent::Agent;

/// Where a StatefulSet pod's earlier records may be: anywhere with a store every node shares and
/// this agent mirrors (kube: the pod may have been rescheduled to another node of its zone; the
/// mirror's pod index costs the pod's own records), else on this node.
async fn records_of_pod(a: &Agent, namespace: &str, name: &str) -> Vec<Lease> {
    let store = a.engine.store();
    let filter = if store.mirrors_all_nodes() {
        Filter::Pod(namespace, name)
    } else {
        Filter::Node(&a.node)
    };
    match store.list(filter).await {
        Ok(l) => l
            .leases
            .into_iter()
            .filter(|l| l.owner.pod_namespace == namespace && l.owner.pod_name == name)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the pod's earlier records");
            Vec::new()
        }
    }
}

/// A StatefulSet pod whose ordinal its StatefulSet still wants takes over the addresses of its
/// latest earlier sandbox (a restart, or a reschedule within the zone), before allocating.
pub async fn keep_address(
    a: &Agent,
    pools: &PoolSet,
    input: &SelectionInput<'_>,
    att: &Attachment,
    uid: &str,
) {
    if a.view
        .statefulset_wants(input.pod_namespace, input.pod_name)
        .await
        != Ok(Some(true))
    {
        return;
    }
    let mut previous = records_of_pod(a, input.pod_namespace, input.pod_name).await;
    previous.retain(|l| l.owner.container_id != att.container_id);
    let Some(latest) = previous
        .iter()
        .max_by_key(|l| (l.owner.created, l.revision))
        .map(|l| l.owner.container_id.clone())
    else {
        return;
    };
    previous.retain(|l| l.owner.container_id == latest);
    match a
        .engine
        .adopt(pools, input, &previous, att, uid, now_secs())
        .await
    {
        Ok(moved) if !moved.is_empty() => tracing::info!(
            pod = %format!("{}/{}", input.pod_namespace, input.pod_name),
            from = %latest, to = %att.container_id,
            addresses = ?moved.iter().map(|l| l.ip.to_string()).collect::<Vec<_>>(),
            "StatefulSet pod keeps its addresses"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "StatefulSet pod could not keep its addresses"),
    }
}

/// After a StatefulSet pod's new sandbox got its addresses for `att.ifname`: the records that
/// earlier sandboxes of the pod still hold for that interface can never be taken over any more
/// (the pod moved to another zone, its pool annotation changed, or it kept them already: the
/// adopted ones are gone from the old sandbox). GC keeps a wanted ordinal's records for its next
/// sandbox, so they would leak for the StatefulSet's lifetime: they are freed here.
pub async fn free_unadoptable(a: &Agent, namespace: &str, name: &str, att: &Attachment) {
    let mut stale: Vec<String> = records_of_pod(a, namespace, name)
        .await
        .into_iter()
        .filter(|l| l.owner.container_id != att.container_id && l.owner.ifname == att.ifname)
        .map(|l| l.owner.container_id)
        .collect();
    stale.sort();
    stale.dedup();
    for container in stale {
        match a.engine.release(&container, Some(&att.ifname)).await {
            Ok(freed) if !freed.is_empty() => tracing::info!(
                pod = %format!("{namespace}/{name}"), from = %container, to = %att.container_id,
                released = ?freed.iter().map(|l| l.ip.to_string()).collect::<Vec<_>>(),
                "StatefulSet pod's earlier addresses cannot be taken over (other zone or pools): released"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, from = %container,
                "could not release a StatefulSet pod's earlier addresses; GC retries when its ordinal is no longer wanted"),
        }
    }
}

/// Whether DEL keeps `container`'s records: they belong to a StatefulSet pod whose ordinal is
/// still wanted (the pod's next sandbox takes them over). A pod that still exists must be owned
/// by a StatefulSet; one that is gone is judged by the StatefulSet alone.
pub async fn kept_on_del(a: &Agent, container: &str) -> bool {
    if !a.view.tracks_pods() {
        return false;
    }
    let Ok(listing) = a.engine.store().list(Filter::Container(container)).await else {
        return false;
    };
    let Some(l) = listing.leases.first() else {
        return false;
    };
    let (ns, name) = (&l.owner.pod_namespace, &l.owner.pod_name);
    // Only a pod named `<statefulset>-<ordinal>` can be one: every other DEL costs no API read.
    if spiderpool_core::lifecycle::statefulset_ordinal(name).is_none() {
        return false;
    }
    let owned = match a.view.pod_now(ns, name).await {
        Ok(Some(p)) => p
            .metadata
            .owner_references
            .iter()
            .any(|o| o.controller == Some(true) && o.kind == "StatefulSet"),
        Ok(None) => true,
        Err(_) => false,
    };
    owned && a.view.statefulset_wants(ns, name).await == Ok(Some(true))
}
