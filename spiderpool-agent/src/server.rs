//! The agent's HTTP API (see [`spiderpool_core::api`] for the endpoints and bodies) and its
//! metrics endpoint, as `serve(listener, shutdown)` functions so tests run the daemon in process
//! as well as as a real process.

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use spiderpool_core::api::{
    AddRequest, ApiError, CheckRequest, DelRequest, DelResponse, EndpointRow, ErrorKind, GcRequest,
    PoolRow, Status, SubnetRow,
};
use spiderpool_core::engine::{Allocation, Engine, EngineError};
use spiderpool_core::select::SelectionInput;
use spiderpool_core::Families;
use spiderpool_core::store::{Filter, LeaseStore, StoreError};
use spiderpool_core::PoolSet;
use spiderpool_store::AnyStore;

use crate::metrics::{Metrics, PoolUsage};
use crate::view::ClusterView;

/// The agent: one node's engine over a store, a cluster view, and counters.
pub struct Agent {
    /// The node served.
    pub node: String,
    /// The engine.
    pub engine: Engine<AnyStore>,
    /// The cluster.
    pub view: Arc<dyn ClusterView>,
    /// Counters.
    pub metrics: Metrics,
}

impl Agent {
    /// An agent for `node`.
    pub fn new(node: String, store: AnyStore, view: Arc<dyn ClusterView>) -> Self {
        Agent {
            engine: Engine::new(store, node.clone()),
            node,
            view,
            metrics: Metrics::default(),
        }
    }
}

/// An API error as an HTTP answer.
struct Fail(ApiError);

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.kind.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<&EngineError> for Fail {
    fn from(e: &EngineError) -> Self {
        Fail(ApiError::from(e))
    }
}

/// Decodes a JSON body; a bad body is a `BadRequest` [`ApiError`] (the plugin maps it to code 7).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, Fail> {
    serde_json::from_slice(bytes).map_err(|e| {
        Fail(ApiError::new(
            ErrorKind::BadRequest,
            format!(
                "the agent cannot read the request: {e} (plugin and agent of different versions?)"
            ),
        ))
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The API routes.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/add", post(add))
        .route("/v1/del", post(del))
        .route("/v1/check", post(check))
        .route("/v1/gc", post(gc))
        .route("/v1/status", get(status))
        .route("/v1/ippools", get(ippools))
        .route("/v1/subnets", get(subnets))
        .route("/v1/endpoints", get(endpoints))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(agent)
}

/// The metrics route (served on `--metrics-addr`).
pub fn metrics_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(agent)
}

/// Keeps the engine's cache fresh from a store watch while `stop` is false (etcd only; other
/// stores have one writer, this agent). Claims and releases of other nodes reach the cache as
/// they happen, so agents sharing a pool rarely race for one address. When the watch breaks or
/// etcd compacted past it, the caches are dropped (changes may have been missed; the next ADD
/// re-reads its pools) and the watch starts again.
pub async fn follow_store(agent: Arc<Agent>, mut stop: tokio::sync::watch::Receiver<bool>) {
    #[cfg(feature = "etcd")]
    if let AnyStore::Etcd(etcd) = agent.engine.store().clone() {
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            let engine = &agent.engine;
            let started = std::time::Instant::now();
            let watch = etcd.watch_pools(0, |c| {
                engine.observe(&c.pool, c.ip, c.revision, c.held);
            });
            let end = tokio::select! {
                end = watch => end,
                _ = stop.changed() => return,
            };
            match end {
                Ok(e) => {
                    tracing::warn!(end = ?e, "store watch ended; caches dropped, watching again")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "store watch failed; caches dropped, watching again")
                }
            }
            agent.engine.invalidate(None);
            if started.elapsed() > std::time::Duration::from_secs(30) {
                backoff = std::time::Duration::from_millis(100);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
        }
    }
    let _ = stop.changed().await;
}

/// Serves the API on a unix socket until `shutdown` resolves; in-flight requests finish.
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(agent))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn add(State(a): State<Arc<Agent>>, bytes: Bytes) -> Result<Json<Allocation>, Fail> {
    let t0 = Instant::now();
    a.metrics.allocations.fetch_add(1, Relaxed);
    let out = add_inner(&a, bytes).await;
    a.metrics.allocation_duration.observe(t0.elapsed());
    if let Err(Fail(e)) = &out {
        a.metrics.allocation_failures.fetch_add(1, Relaxed);
        match e.kind {
            ErrorKind::Exhausted => a.metrics.ip_used_out.fetch_add(1, Relaxed),
            ErrorKind::NoPool => a.metrics.no_available_pool.fetch_add(1, Relaxed),
            _ => 0,
        };
        tracing::warn!(error = %e.message, details = %e.details, "ADD failed");
    }
    out
}

async fn add_inner(a: &Agent, bytes: Bytes) -> Result<Json<Allocation>, Fail> {
    let req: AddRequest = body(&bytes)?;
    let snap = a.view.snapshot();
    let node = snap.nodes.get(&a.node);
    // A pod the view has not seen yet is fetched once (a Kubernetes view); without it the pod is
    // served as a pod without annotations or labels.
    let fetched = match &req.pod {
        Some(p)
            if !snap
                .pods
                .contains_key(&(p.namespace.clone(), p.name.clone())) =>
        {
            a.view.fetch_pod(&p.namespace, &p.name).await
        }
        _ => None,
    };
    let (ns, name, uid, pod, namespace) = match &req.pod {
        Some(p) => {
            let key = (p.namespace.clone(), p.name.clone());
            let pod = snap.pods.get(&key).or(fetched.as_ref());
            (
                p.namespace.as_str(),
                p.name.as_str(),
                p.uid.as_str(),
                pod,
                snap.namespaces.get(&p.namespace),
            )
        }
        // No Kubernetes identity: only the CNI config's default pools apply.
        None => ("", req.attachment.container_id.as_str(), "", None, None),
    };
    // SpiderSubnet auto-pools: made or grown now (the first pod of an application waits for
    // nothing but the API round trips), then selected like pools the pod names.
    let auto = match pod {
        Some(p) if a.view.tracks_pods() => a
            .view
            .auto_pools(p)
            .await
            .map_err(|m| Fail(ApiError::new(ErrorKind::NoPool, m)))?,
        _ => None,
    };
    let pools_snap = if auto.is_some() {
        a.view.snapshot()
    } else {
        snap.clone()
    };
    let auto_labels = auto.as_ref().map(|x| {
        let mut l = pod.map(|p| p.metadata.labels.clone()).unwrap_or_default();
        l.extend(x.labels.clone());
        l
    });
    let owner = pod.and_then(|p| {
        p.metadata
            .owner_references
            .iter()
            .find(|o| o.controller == Some(true))
            .map(|o| o.name.as_str())
    });
    let families = if req.pod.is_none() {
        Families {
            ipv4: false,
            ipv6: false,
        }
    } else {
        pools_snap.pools.default_families().unwrap_or_default()
    };
    let input = SelectionInput {
        pod_namespace: ns,
        pod_name: name,
        pod_labels: auto_labels.as_ref().or(pod.map(|p| &p.metadata.labels)),
        pod_annotations: auto
            .as_ref()
            .map(|x| &x.annotations)
            .or(pod.map(|p| &p.metadata.annotations)),
        namespace_labels: namespace.map(|n| &n.metadata.labels),
        namespace_annotations: namespace.map(|n| &n.metadata.annotations),
        node_name: &a.node,
        node_labels: node.map(|n| &n.metadata.labels),
        owner_name: owner,
        cni: Some(&req.cni),
        default_families: families,
    };
    let is_statefulset = pod.is_some_and(|p| {
        p.metadata
            .owner_references
            .iter()
            .any(|o| o.controller == Some(true) && o.kind == "StatefulSet")
    });
    if is_statefulset {
        keep_statefulset_address(a, &pools_snap.pools, &input, &req.attachment, uid).await;
    }
    match a
        .engine
        .allocate(&pools_snap.pools, &input, &req.attachment, uid, now())
        .await
    {
        Ok(alloc) => {
            tracing::info!(
                container = %req.attachment.container_id,
                ifname = %req.attachment.ifname,
                pod = %format!("{ns}/{name}"),
                addresses = ?alloc.nic(&req.attachment.ifname).map(|n| [&n.ipv4, &n.ipv6].into_iter().flatten().map(|x| x.address.to_string()).collect::<Vec<_>>()),
                "allocated"
            );
            Ok(Json(alloc))
        }
        Err(e) => {
            let mut fail = Fail::from(&e);
            if req.pod.is_none() && fail.0.kind == ErrorKind::NoPool {
                fail.0.message.push_str(
                    " (the runtime passed no Kubernetes pod in CNI_ARGS, so only the CNI config's default_ipv4_ippool/default_ipv6_ippool apply)",
                );
            }
            Err(fail)
        }
    }
}

/// Where a StatefulSet pod's earlier records may be: anywhere with a store every node shares and
/// this agent mirrors (kube: the pod may have been rescheduled to another node of its zone),
/// else on this node.
async fn records_of_pod(
    a: &Agent,
    namespace: &str,
    name: &str,
) -> Vec<spiderpool_core::store::Lease> {
    let store = a.engine.store();
    let filter = if store.backend() == "kube" {
        Filter::All
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
async fn keep_statefulset_address(
    a: &Agent,
    pools: &PoolSet,
    input: &SelectionInput<'_>,
    att: &spiderpool_core::engine::Attachment,
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
        .adopt(pools, input, &previous, att, uid, now())
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

/// Whether DEL keeps `container`'s records: they belong to a StatefulSet pod whose ordinal is
/// still wanted (the pod's next sandbox takes them over). A pod that still exists must be owned
/// by a StatefulSet; one that is gone is judged by the StatefulSet alone.
async fn kept_for_statefulset(a: &Agent, container: &str) -> bool {
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

async fn del(State(a): State<Arc<Agent>>, bytes: Bytes) -> Result<Json<DelResponse>, Fail> {
    let t0 = Instant::now();
    a.metrics.releases.fetch_add(1, Relaxed);
    let out = async {
        let req: DelRequest = body(&bytes)?;
        if kept_for_statefulset(&a, &req.attachment.container_id).await {
            tracing::info!(container = %req.attachment.container_id, "DEL: addresses kept for the StatefulSet pod's next sandbox");
            return Ok(Json(DelResponse { released: Vec::new() }));
        }
        let freed = a
            .engine
            .release(&req.attachment.container_id, Some(&req.attachment.ifname))
            .await
            .map_err(|e| Fail::from(&e))?;
        if !freed.is_empty() {
            tracing::info!(container = %req.attachment.container_id, ifname = %req.attachment.ifname,
                released = ?freed.iter().map(|l| l.ip.to_string()).collect::<Vec<_>>(), "released");
        }
        Ok(Json(DelResponse {
            released: freed.iter().map(|l| l.ip.to_string()).collect(),
        }))
    }
    .await;
    a.metrics.release_duration.observe(t0.elapsed());
    if let Err(Fail(e)) = &out {
        a.metrics.release_failures.fetch_add(1, Relaxed);
        tracing::warn!(error = %e.message, "DEL failed");
    }
    out
}

async fn check(State(a): State<Arc<Agent>>, bytes: Bytes) -> Result<Json<Allocation>, Fail> {
    let req: CheckRequest = body(&bytes)?;
    let snap = a.view.snapshot();
    a.engine
        .check(&snap.pools, &req.attachment)
        .await
        .map(Json)
        .map_err(|e| Fail::from(&e))
}

async fn gc(State(a): State<Arc<Agent>>, bytes: Bytes) -> Result<Json<DelResponse>, Fail> {
    let req: GcRequest = body(&bytes)?;
    if req.network.is_empty() {
        return Err(Fail(ApiError::new(
            ErrorKind::InvalidConfig,
            "GC needs the network's name (the CNI config's \"name\")",
        )));
    }
    let freed = a
        .engine
        .gc(&req.network, &req.valid)
        .await
        .map_err(|e| Fail::from(&e))?;
    a.metrics.gc_released.fetch_add(freed.len() as u64, Relaxed);
    tracing::info!(network = %req.network, released = freed.len(), "GC");
    Ok(Json(DelResponse {
        released: freed.iter().map(|l| l.ip.to_string()).collect(),
    }))
}

/// Whether ADD can be served: the store answers a read.
async fn probe(a: &Agent) -> Result<Status, Fail> {
    a.engine
        .store()
        .list(Filter::Container("\u{0}status-probe"))
        .await
        .map_err(|e| Fail(ApiError::new(ErrorKind::Unavailable, e.to_string())))?;
    let snap = a.view.snapshot();
    Ok(Status {
        node: a.node.clone(),
        store: a.engine.store().backend().to_string(),
        pools: snap.pools.pools.len(),
        view: a.view.describe(),
    })
}

async fn status(State(a): State<Arc<Agent>>) -> Result<Json<Status>, Fail> {
    probe(&a).await.map(Json)
}

async fn ready(State(a): State<Arc<Agent>>) -> Response {
    match probe(&a).await {
        Ok(_) => "ok".into_response(),
        Err(f) => (StatusCode::SERVICE_UNAVAILABLE, f.0.message).into_response(),
    }
}

fn unavailable(e: impl std::fmt::Display) -> Fail {
    Fail(ApiError::new(ErrorKind::Unavailable, e.to_string()))
}

/// `spiderctl get ippools` rows: every pool of `pools` with its allocated count from `store`.
pub async fn pool_rows<S: LeaseStore>(
    pools: &PoolSet,
    store: &S,
) -> Result<Vec<PoolRow>, StoreError> {
    let mut rows = Vec::new();
    for p in pools.pools.values() {
        // Addresses only: on etcd a keys-only read, not every record of the pool.
        let n = store.pool_addresses(&p.name).await?.ips.len() as u64;
        rows.push(PoolRow {
            name: p.name.clone(),
            version: p.family.version(),
            subnet: p.subnet.to_string(),
            allocated_ip_count: n,
            total_ip_count: p.total().count_i64(),
            default: p.default,
            disable: p.disable,
        });
    }
    Ok(rows)
}

/// `spiderctl get subnets` rows: allocated = the sum over the pools of the subnet's CIDR.
pub fn subnet_rows(pools: &PoolSet, pool_rows: &[PoolRow]) -> Vec<SubnetRow> {
    pools
        .subnets
        .values()
        .map(|s| SubnetRow {
            name: s.name.clone(),
            version: s.family.version(),
            subnet: s.subnet.to_string(),
            allocated_ip_count: pool_rows
                .iter()
                .filter(|r| r.subnet == s.subnet.to_string())
                .map(|r| r.allocated_ip_count)
                .sum(),
            total_ip_count: s.total.count_i64(),
        })
        .collect()
}

/// `spiderctl get endpoints` rows: one per allocated address.
pub async fn endpoint_rows<S: LeaseStore>(store: &S) -> Result<Vec<EndpointRow>, StoreError> {
    Ok(store
        .list(Filter::All)
        .await?
        .leases
        .into_iter()
        .map(|l| EndpointRow {
            pod: if l.owner.pod_namespace.is_empty() {
                String::new()
            } else {
                format!("{}/{}", l.owner.pod_namespace, l.owner.pod_name)
            },
            container_id: l.owner.container_id,
            node: l.owner.node,
            interface: l.owner.ifname,
            address: l.ip.to_string(),
            pool: l.pool,
            network: l.owner.network,
        })
        .collect())
}

async fn ippools(State(a): State<Arc<Agent>>) -> Result<Json<Vec<PoolRow>>, Fail> {
    let snap = a.view.snapshot();
    pool_rows(&snap.pools, a.engine.store())
        .await
        .map(Json)
        .map_err(unavailable)
}

async fn subnets(State(a): State<Arc<Agent>>) -> Result<Json<Vec<SubnetRow>>, Fail> {
    let snap = a.view.snapshot();
    let rows = pool_rows(&snap.pools, a.engine.store())
        .await
        .map_err(unavailable)?;
    Ok(Json(subnet_rows(&snap.pools, &rows)))
}

async fn endpoints(State(a): State<Arc<Agent>>) -> Result<Json<Vec<EndpointRow>>, Fail> {
    endpoint_rows(a.engine.store())
        .await
        .map(Json)
        .map_err(unavailable)
}

async fn metrics(State(a): State<Arc<Agent>>) -> Response {
    let snap = a.view.snapshot();
    let pools = match pool_rows(&snap.pools, a.engine.store()).await {
        Ok(rows) => rows
            .into_iter()
            .map(|r| PoolUsage {
                pool: r.name,
                allocated: r.allocated_ip_count,
                total: r.total_ip_count,
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    (
        [("content-type", "text/plain; version=0.0.4")],
        a.metrics.render(a.engine.stats().conflicts, &pools),
    )
        .into_response()
}
