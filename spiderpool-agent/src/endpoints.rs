//! SpiderEndpoints (Kubernetes mode): one per pod with addresses on this node, in the pod's
//! namespace and under its name, with Spiderpool's `status.current` (UID, node, per NIC the
//! addresses with prefix length, pools, gateways, VLAN, routes) and the pod's controller. A
//! projection of the records, written in the background (at most once per interval per pod,
//! only when it changed) and deleted when the pod holds nothing here any more.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use spiderpool_core::store::{Filter, Lease, LeaseStore};
use spiderpool_core::types::{EndpointCurrent, EndpointIp, EndpointStatus, Route};
use spiderpool_store::k8s::crd::SpiderEndpoint;

use crate::server::Agent;

/// The status a pod's records amount to.
pub fn status_of(agent: &Agent, leases: &[Lease]) -> Option<EndpointStatus> {
    let first = leases.first()?;
    let snap = agent.view.snapshot();
    let alloc = agent.engine.describe(&snap.pools, leases);
    let ips = alloc
        .nics
        .iter()
        .map(|n| EndpointIp {
            interface: n.ifname.clone(),
            ipv4: n.ipv4.as_ref().map(|a| a.address.to_string()),
            ipv6: n.ipv6.as_ref().map(|a| a.address.to_string()),
            ipv4_pool: n.ipv4.as_ref().map(|a| a.pool.clone()),
            ipv6_pool: n.ipv6.as_ref().map(|a| a.pool.clone()),
            ipv4_gateway: n
                .ipv4
                .as_ref()
                .and_then(|a| a.gateway.map(|g| g.to_string())),
            ipv6_gateway: n
                .ipv6
                .as_ref()
                .and_then(|a| a.gateway.map(|g| g.to_string())),
            clean_gateway: Some(n.clean_gateway),
            routes: n
                .routes
                .iter()
                .map(|r| Route {
                    dst: r.dst.to_string(),
                    gw: r.gw.to_string(),
                })
                .collect(),
            vlan: n.ipv4.as_ref().or(n.ipv6.as_ref()).and_then(|a| a.vlan),
        })
        .collect();
    let key = (
        first.owner.pod_namespace.clone(),
        first.owner.pod_name.clone(),
    );
    let owner = snap.pods.get(&key).and_then(|p| {
        p.metadata
            .owner_references
            .iter()
            .find(|o| o.controller == Some(true))
            .cloned()
    });
    Some(EndpointStatus {
        current: EndpointCurrent {
            uid: first.owner.pod_uid.clone(),
            node: first.owner.node.clone(),
            ips,
        },
        owner_controller_type: owner.as_ref().map(|o| o.kind.clone()),
        owner_controller_name: owner.map(|o| o.name),
    })
}

type Key = (String, String);

/// This node's pods and their records (the latest sandbox of each pod).
async fn current(agent: &Agent) -> Result<BTreeMap<Key, Vec<Lease>>, String> {
    let leases = agent
        .engine
        .store()
        .list(Filter::Node(&agent.node))
        .await
        .map_err(|e| e.to_string())?
        .leases;
    let mut by_pod: BTreeMap<Key, Vec<Lease>> = BTreeMap::new();
    for l in leases {
        if l.owner.pod_namespace.is_empty() {
            continue;
        }
        by_pod
            .entry((l.owner.pod_namespace.clone(), l.owner.pod_name.clone()))
            .or_default()
            .push(l);
    }
    for v in by_pod.values_mut() {
        if let Some(latest) = v
            .iter()
            .max_by_key(|l| (l.owner.created, l.revision))
            .map(|l| l.owner.container_id.clone())
        {
            v.retain(|l| l.owner.container_id == latest);
        }
    }
    Ok(by_pod)
}

/// Writes the pod's SpiderEndpoint: a merge patch of its status when this agent wrote the
/// endpoint before (`known`), else (or when it is gone meanwhile) a create carrying the status
/// (the CRD has no status subresource, as Spiderpool's). No read: one request per new pod or
/// change; a create that finds the endpoint there (another node wrote it, or an earlier try)
/// patches it.
async fn upsert(
    client: &kube::Client,
    key: &Key,
    status: &EndpointStatus,
    known: bool,
) -> Result<(), kube::Error> {
    #[derive(Debug, serde::Serialize)]
    struct StatusOnly<'a> {
        status: &'a EndpointStatus,
    }
    let api: Api<SpiderEndpoint> = Api::namespaced(client.clone(), &key.0);
    let patch = Patch::Merge(StatusOnly { status });
    let pp = PatchParams::default();
    let write = || api.patch(&key.1, &pp, &patch);
    if known {
        match write().await {
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            other => return other.map(|_| ()),
        }
    }
    let mut obj = SpiderEndpoint::new(&key.0, &key.1);
    obj.status = Some(status.clone());
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => write().await.map(|_| ()),
        Err(e) => Err(e),
    }
}

/// Deletes the pod's SpiderEndpoint if it is still this node's, conditional on the version read
/// (a pod that moved has an endpoint its new node wrote: that one stays). Whether the endpoint
/// is no longer this node's to remember.
async fn delete_if_mine(client: &kube::Client, key: &Key, node: &str) -> bool {
    let api: Api<SpiderEndpoint> = Api::namespaced(client.clone(), &key.0);
    let pod = format!("{}/{}", key.0, key.1);
    let current = match api.get_opt(&key.1).await {
        Ok(Some(e)) => e,
        Ok(None) => return true,
        Err(e) => {
            tracing::warn!(pod = %pod, error = %e, "SpiderEndpoint not read; next time");
            return false;
        }
    };
    if current.status.as_ref().map(|s| s.current.node.as_str()) != Some(node) {
        return true; // another node's now
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: current.metadata.resource_version.clone(),
            uid: current.metadata.uid.clone(),
        }),
        ..Default::default()
    };
    match api.delete(&key.1, &dp).await {
        Ok(_) => true,
        Err(kube::Error::Api(e)) if e.code == 404 => true,
        // Changed meanwhile (409): looked at again next round.
        Err(e) => {
            tracing::warn!(pod = %pod, error = %e, "SpiderEndpoint not deleted; next time");
            false
        }
    }
}

/// Keeps this node's SpiderEndpoints in step with its records, every `every`, until `stop`.
pub async fn run(
    agent: Arc<Agent>,
    client: kube::Client,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // What is there already (an agent restarted): this node's endpoints.
    let mut written: HashMap<Key, EndpointStatus> = HashMap::new();
    let all: Api<SpiderEndpoint> = Api::all(client.clone());
    match all.list(&ListParams::default()).await {
        Ok(list) => {
            for e in list.items {
                if let (Some(ns), Some(name), Some(st)) =
                    (e.metadata.namespace, e.metadata.name, e.status)
                {
                    if st.current.node == agent.node {
                        written.insert((ns, name), st);
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list SpiderEndpoints; they are rewritten"),
    }
    loop {
        let pods = match current(&agent).await {
            Ok(p) => p,
            Err(e) => {
                // Unreadable records say nothing about which pods are gone: change nothing.
                tracing::warn!(error = %e, "SpiderEndpoints: records unreadable; next time");
                if !spiderpool_store::task::sleep_or_stop(every, &mut stop).await {
                    return;
                }
                continue;
            }
        };
        for (key, leases) in &pods {
            let Some(status) = status_of(&agent, leases) else {
                continue;
            };
            if written.get(key) == Some(&status) {
                continue;
            }
            match upsert(&client, key, &status, written.contains_key(key)).await {
                Ok(()) => {
                    written.insert(key.clone(), status);
                }
                Err(e) => {
                    tracing::warn!(pod = %format!("{}/{}", key.0, key.1), error = %e, "SpiderEndpoint not written; next time")
                }
            }
        }
        let gone: Vec<Key> = written
            .keys()
            .filter(|k| !pods.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if delete_if_mine(&client, &key, &agent.node).await {
                written.remove(&key);
            }
        }
        if !spiderpool_store::task::sleep_or_stop(every, &mut stop).await {
            return;
        }
    }
}
