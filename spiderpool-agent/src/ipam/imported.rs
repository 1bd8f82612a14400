//! Records imported from Spiderpool (`spiderctl migrate from-spiderpool`): Spiderpool records no
//! container, so they name the pod and [`spiderpool_core::migrate::imported_container`] instead.
//! The runtime's commands for the pod's sandbox reach them by pod: DEL and CHECK of the pod's
//! interface, and an ADD of a new sandbox of the same pod (same UID) takes them over.

use spiderpool_core::api::PodRef;
use spiderpool_core::engine::Attachment;
use spiderpool_core::migrate::is_imported;
use spiderpool_core::select::SelectionInput;
use spiderpool_core::store::{Filter, Lease, LeaseStore};
use spiderpool_core::PoolSet;
use spiderpool_store::task::now_secs;

use crate::agent::Agent;

/// The imported records of `pod` for `ifname` (all of its NICs with `None`), when the UIDs
/// agree (either may be unknown).
pub async fn of_pod(a: &Agent, pod: &PodRef, ifname: Option<&str>) -> Vec<Lease> {
    let store = a.engine.store();
    let filter = if store.mirrors_all_nodes() {
        Filter::Pod(&pod.namespace, &pod.name)
    } else {
        Filter::Node(&a.node)
    };
    match store.list(filter).await {
        Ok(l) => l
            .leases
            .into_iter()
            .filter(|l| {
                is_imported(l)
                    && l.owner.pod_namespace == pod.namespace
                    && l.owner.pod_name == pod.name
                    && ifname.is_none_or(|i| l.owner.ifname == i)
                    && (pod.uid.is_empty()
                        || l.owner.pod_uid.is_empty()
                        || l.owner.pod_uid == pod.uid)
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the pod's imported records");
            Vec::new()
        }
    }
}

/// The container the imported records of `pod`'s interface `ifname` are filed under, if any.
pub async fn container(a: &Agent, pod: Option<&PodRef>, ifname: &str) -> Option<String> {
    let pod = pod?;
    of_pod(a, pod, Some(ifname))
        .await
        .first()
        .map(|l| l.owner.container_id.clone())
}

/// ADD of a sandbox of a pod that holds imported records (same UID): they move to the sandbox,
/// keeping their addresses, before anything is allocated.
pub async fn take_over(
    a: &Agent,
    pools: &PoolSet,
    input: &SelectionInput<'_>,
    att: &Attachment,
    uid: &str,
) {
    if uid.is_empty() {
        return;
    }
    let pod = PodRef {
        namespace: input.pod_namespace.to_string(),
        name: input.pod_name.to_string(),
        uid: uid.to_string(),
    };
    let previous: Vec<Lease> = of_pod(a, &pod, None)
        .await
        .into_iter()
        .filter(|l| l.owner.pod_uid == uid)
        .collect();
    if previous.is_empty() {
        return;
    }
    match a
        .engine
        .adopt(pools, input, &previous, att, uid, now_secs())
        .await
    {
        Ok(moved) if !moved.is_empty() => tracing::info!(
            pod = %format!("{}/{}", pod.namespace, pod.name), to = %att.container_id,
            addresses = ?moved.iter().map(|l| l.ip.to_string()).collect::<Vec<_>>(),
            "the pod's addresses imported from Spiderpool move to its sandbox"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "the pod's imported addresses could not move to its sandbox")
        }
    }
}
