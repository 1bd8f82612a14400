//! What the agent decides for each CNI command (Spiderpool's `pkg/ipam`): [`add`], [`del`],
//! [`check`], [`gc`] over the agent's engine and view, returning typed [`ApiError`]s. The HTTP
//! layer (`crate::server`) only decodes, calls and encodes.
//!
//! ADD in phases: the pod as the cluster has it, its auto-pools, the selection
//! input, a StatefulSet pod's earlier addresses ([`statefulset`]), then the engine's allocation.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use spiderpool_core::api::{
    AddRequest, ApiError, CheckRequest, ConflictRequest, DelRequest, DelResponse, ErrorKind,
    GcRequest,
};
use spiderpool_core::engine::{Allocation, Attachment, EngineError};
use spiderpool_core::select::SelectionInput;
use spiderpool_core::store::{Filter, LeaseStore};
use spiderpool_core::types::{Namespace, Node, Pod};
use spiderpool_core::Families;
use spiderpool_store::task::now_secs;

use crate::agent::Agent;
use crate::view::{AutoPools, Snapshot};

pub mod imported;
pub mod statefulset;

/// The pod an ADD serves, as the view has it (or fetched once when the view has not seen it).
struct PodContext {
    namespace: String,
    name: String,
    uid: String,
    pod: Option<Pod>,
    ns: Option<Namespace>,
    node: Option<Node>,
    /// Whether the runtime named a Kubernetes pod at all.
    kubernetes: bool,
}

impl PodContext {
    /// The pod the runtime names, as the view has it. In Kubernetes mode a pod the view has not
    /// seen, or has under another UID than the runtime's (a pod recreated under its name), is
    /// read fresh from the API server; one that does not exist there is refused, retryably (it
    /// may be seconds old), as Spiderpool refuses it. The recorded UID is the runtime's, else the
    /// pod's as read.
    async fn read(a: &Agent, req: &AddRequest, snap: &Snapshot) -> Result<PodContext, ApiError> {
        let node = snap.nodes.get(&a.node).cloned();
        let Some(p) = &req.pod else {
            // No Kubernetes identity: only the CNI config's default pools apply.
            return Ok(PodContext {
                namespace: String::new(),
                name: req.attachment.container_id.clone(),
                uid: String::new(),
                pod: None,
                ns: None,
                node,
                kubernetes: false,
            });
        };
        let key = (p.namespace.clone(), p.name.clone());
        let cached = snap
            .pods
            .get(&key)
            .filter(|c| p.uid.is_empty() || c.metadata.uid.as_deref().is_none_or(|u| u == p.uid));
        let pod = match cached {
            Some(pod) => Some(pod.clone()),
            None if a.view.tracks_pods() => match a.view.pod_now(&p.namespace, &p.name).await {
                Ok(Some(pod)) => Some(pod),
                Ok(None) => {
                    return Err(ApiError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "pod {}/{} does not exist in the API server (yet): the agent reads a pod's annotations and labels before it chooses a pool; the runtime retries",
                            p.namespace, p.name
                        ),
                    ))
                }
                Err(e) => return Err(ApiError::new(ErrorKind::Unavailable, e.to_string())),
            },
            // Manifests: a pod they do not list is served without labels or annotations.
            None => None,
        };
        let uid = if p.uid.is_empty() {
            pod.as_ref()
                .and_then(|x| x.metadata.uid.clone())
                .unwrap_or_default()
        } else {
            p.uid.clone()
        };
        Ok(PodContext {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            uid,
            pod,
            ns: snap.namespaces.get(&p.namespace).cloned(),
            node,
            kubernetes: true,
        })
    }

    fn owner(&self, kind: Option<&str>) -> Option<&str> {
        self.pod.as_ref().and_then(|p| {
            p.metadata
                .owner_references
                .iter()
                .find(|o| o.controller == Some(true) && kind.is_none_or(|k| o.kind == k))
                .map(|o| o.name.as_str())
        })
    }
}

/// SpiderSubnet auto-pools: made or grown now (the first pod of an application waits for
/// nothing but the API round trips), then selected like pools the pod names.
async fn auto_pools(a: &Agent, ctx: &PodContext) -> Result<Option<AutoPools>, ApiError> {
    match &ctx.pod {
        Some(p) if a.view.tracks_pods() => a
            .view
            .auto_pools(p)
            .await
            .map_err(|e| ApiError::new(ErrorKind::NoPool, e.to_string())),
        _ => Ok(None),
    }
}

/// ADD: the pod's addresses for the attachment.
pub async fn add(a: &Agent, req: &AddRequest) -> Result<Allocation, ApiError> {
    let snap = a.view.snapshot();
    let ctx = PodContext::read(a, req, &snap).await?;
    let auto = auto_pools(a, &ctx).await?;
    // Pools just made are in a newer snapshot.
    let snap = if auto.is_some() {
        a.view.snapshot()
    } else {
        snap
    };
    let labels: Option<BTreeMap<String, String>> = auto.as_ref().map(|x| {
        let mut l = ctx
            .pod
            .as_ref()
            .map(|p| p.metadata.labels.clone())
            .unwrap_or_default();
        l.extend(x.labels.clone());
        l
    });
    let families = if ctx.kubernetes {
        snap.pools.default_families().unwrap_or_default()
    } else {
        Families {
            ipv4: false,
            ipv6: false,
        }
    };
    let input = SelectionInput {
        pod_namespace: &ctx.namespace,
        pod_name: &ctx.name,
        pod_labels: labels
            .as_ref()
            .or(ctx.pod.as_ref().map(|p| &p.metadata.labels)),
        pod_annotations: ctx.pod.as_ref().map(|p| &p.metadata.annotations),
        namespace_labels: ctx.ns.as_ref().map(|n| &n.metadata.labels),
        namespace_annotations: ctx.ns.as_ref().map(|n| &n.metadata.annotations),
        node_name: &a.node,
        node_labels: ctx.node.as_ref().map(|n| &n.metadata.labels),
        owner_name: ctx.owner(None),
        cni: Some(&req.cni),
        default_families: families,
        auto_pools: auto.as_ref().map(|x| x.selection.as_slice()),
    };
    let statefulset = ctx.owner(Some("StatefulSet")).is_some();
    if statefulset {
        statefulset::keep_address(a, &snap.pools, &input, &req.attachment, &ctx.uid).await;
    } else if ctx.kubernetes {
        imported::take_over(a, &snap.pools, &input, &req.attachment, &ctx.uid).await;
    }
    let out = a
        .engine
        .allocate(&snap.pools, &input, &req.attachment, &ctx.uid, now_secs())
        .await;
    match out {
        Ok(mut alloc) => {
            alloc.detect = a.detect;
            if statefulset {
                statefulset::free_unadoptable(a, &ctx.namespace, &ctx.name, &req.attachment).await;
            }
            tracing::info!(
                container = %req.attachment.container_id,
                ifname = %req.attachment.ifname,
                pod = %format!("{}/{}", ctx.namespace, ctx.name),
                addresses = ?alloc.nic(&req.attachment.ifname).map(|n| [&n.ipv4, &n.ipv6].into_iter().flatten().map(|x| x.address.to_string()).collect::<Vec<_>>()),
                "allocated"
            );
            Ok(alloc)
        }
        Err(e) => {
            let mut err = ApiError::from(&e);
            if !ctx.kubernetes && err.kind == ErrorKind::NoPool {
                err.message.push_str(
                    " (the runtime passed no Kubernetes pod in CNI_ARGS, so only the CNI config's default_ipv4_ippool/default_ipv6_ippool apply)",
                );
            }
            Err(err)
        }
    }
}

/// IP conflict detection found `req.address` answered for by another host: the address is
/// recorded as in conflict (never handed out again; `spiderctl get endpoints` shows it with the
/// MAC that answered) and the ADD is served again, with another address.
pub async fn conflict(a: &Agent, req: &ConflictRequest) -> Result<Allocation, ApiError> {
    let att = &req.add.attachment;
    let marked = a
        .engine
        .quarantine(
            &att.container_id,
            &att.ifname,
            req.address,
            &req.mac,
            now_secs(),
        )
        .await
        .map_err(|e| ApiError::from(&e))?;
    if let Some(m) = &marked {
        a.metrics.ip_conflicts.fetch_add(1, Relaxed);
        if let Some(p) = &req.add.pod {
            a.view.pod_event(crate::view::events::PodEvent {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
                type_: "Warning",
                reason: "IPConflict",
                message: format!(
                    "{} of pool {} is answered for by another host ({}): kept out of the pool, the pod gets another address",
                    req.address, m.pool, req.mac
                ),
            });
        }
        tracing::warn!(
            address = %req.address,
            mac = %req.mac,
            pool = %m.pool,
            container = %att.container_id,
            ifname = %att.ifname,
            "IP conflict: another host answers for this address; it is kept out of the pool (free it with spiderctl once that host is gone) and the pod gets another"
        );
    }
    add(a, &req.add).await
}

/// DEL: frees the attachment's addresses, unless a StatefulSet pod's next sandbox takes them.
pub async fn del(a: &Agent, req: &DelRequest) -> Result<DelResponse, ApiError> {
    let mut container = req.attachment.container_id.clone();
    let own = a
        .engine
        .store()
        .list(Filter::Container(&container))
        .await
        .map_err(|e| ApiError::from(&EngineError::from(e)))?;
    if !own
        .leases
        .iter()
        .any(|l| l.owner.ifname == req.attachment.ifname)
    {
        // Nothing under the sandbox: the pod's records imported from Spiderpool, if any.
        if let Some(c) = imported::container(a, req.pod.as_ref(), &req.attachment.ifname).await {
            container = c;
        }
    }
    if statefulset::kept_on_del(a, &container).await {
        tracing::info!(container = %container, "DEL: addresses kept for the StatefulSet pod's next sandbox");
        return Ok(DelResponse {
            released: Vec::new(),
        });
    }
    let freed = a
        .engine
        .release(&container, Some(&req.attachment.ifname))
        .await
        .map_err(|e| ApiError::from(&e))?;
    if !freed.is_empty() {
        tracing::info!(container = %req.attachment.container_id, ifname = %req.attachment.ifname,
            released = ?freed.iter().map(|l| l.ip.to_string()).collect::<Vec<_>>(), "released");
    }
    Ok(DelResponse {
        released: freed.iter().map(|l| l.ip.to_string()).collect(),
    })
}

/// CHECK: the attachment still holds what ADD gave it.
pub async fn check(a: &Agent, req: &CheckRequest) -> Result<Allocation, ApiError> {
    let snap = a.view.snapshot();
    match a.engine.check(&snap.pools, &req.attachment).await {
        Err(EngineError::NotFound { .. }) if req.pod.is_some() => {
            // The pod's records imported from Spiderpool answer for its sandbox.
            let Some(c) = imported::container(a, req.pod.as_ref(), &req.attachment.ifname).await
            else {
                return Err(ApiError::from(&EngineError::NotFound {
                    container_id: req.attachment.container_id.clone(),
                    ifname: req.attachment.ifname.clone(),
                }));
            };
            let att = Attachment {
                container_id: c,
                ifname: req.attachment.ifname.clone(),
            };
            a.engine
                .check(&snap.pools, &att)
                .await
                .map_err(|e| ApiError::from(&e))
        }
        out => out.map_err(|e| ApiError::from(&e)),
    }
}

/// GC: frees the network's records of attachments the runtime no longer has.
pub async fn gc(a: &Agent, req: &GcRequest) -> Result<DelResponse, ApiError> {
    if req.network.is_empty() {
        return Err(ApiError::new(
            ErrorKind::InvalidConfig,
            "GC needs the network's name (the CNI config's \"name\")",
        ));
    }
    let freed = a
        .engine
        .gc(&req.network, &req.valid)
        .await
        .map_err(|e| ApiError::from(&e))?;
    tracing::info!(network = %req.network, released = freed.len(), "GC");
    Ok(DelResponse {
        released: freed.iter().map(|l| l.ip.to_string()).collect(),
    })
}
