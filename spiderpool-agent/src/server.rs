//! The agent's HTTP API (see [`spiderpool_core::api`] for the endpoints and bodies) and its
//! metrics endpoint, as `serve(listener, shutdown)` functions so tests run the daemon in process
//! as well as as a real process.

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use spiderpool_core::api::{
    AddRequest, ApiError, ConflictRequest, DelRequest, DelResponse, EndpointRow, ErrorKind,
    PoolRow, Status, SubnetRow,
};
use spiderpool_core::engine::Allocation;
use spiderpool_core::store::{Filter, LeaseStore};
use spiderpool_core::usage::{endpoint_rows, pool_rows, subnet_rows};

pub use crate::agent::{follow_store, Agent, WEDGED_LIVE, WEDGED_READY};
use crate::ipam;
use crate::metrics::PoolUsage;

/// An API error as an HTTP answer.
struct Fail(ApiError);

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.kind.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
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

/// The API routes.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/add", post(add))
        .route("/v1/del", post(del))
        .route("/v1/check", post(check))
        .route("/v1/conflict", post(conflict))
        .route("/v1/coordinator", get(coordinator))
        .route("/v1/gc", post(gc))
        .route("/v1/status", get(status))
        .route("/v1/ippools", get(ippools))
        .route("/v1/subnets", get(subnets))
        .route("/v1/endpoints", get(endpoints))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/livez", get(live))
        .with_state(agent)
}

/// The metrics route (served on `--metrics-addr`).
pub fn metrics_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(agent)
}

/// Serves the API on a unix socket until `shutdown` resolves; in-flight requests finish, and so
/// do commands whose client already left (up to 30 s).
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let served = axum::serve(listener, router(agent.clone()))
        .with_graceful_shutdown(shutdown)
        .await;
    let left = agent
        .inflight
        .drain(std::time::Duration::from_secs(30))
        .await;
    if left > 0 {
        tracing::warn!(
            commands = left,
            "stopping with commands still running; their containers' DEL or GC frees what they wrote"
        );
    }
    served
}

async fn add(State(a): State<Arc<Agent>>, bytes: Bytes) -> Result<Json<Allocation>, Fail> {
    let t0 = Instant::now();
    a.metrics.allocations.fetch_add(1, Relaxed);
    let mut pod = None;
    let out = match body::<AddRequest>(&bytes) {
        Ok(req) => {
            pod = req.pod.clone();
            let agent = a.clone();
            let container = req.attachment.container_id.clone();
            a.inflight
                .run(&container, async move { ipam::add(&agent, &req).await })
                .await
                .map_err(Fail)
        }
        Err(f) => Err(f),
    };
    a.metrics.allocation_duration.observe(t0.elapsed());
    if let Err(Fail(e)) = &out {
        a.metrics.allocation_failures.fetch_add(1, Relaxed);
        let reason = match e.kind {
            ErrorKind::Exhausted => {
                a.metrics.ip_used_out.fetch_add(1, Relaxed);
                Some("PoolExhausted")
            }
            ErrorKind::NoPool => {
                a.metrics.no_available_pool.fetch_add(1, Relaxed);
                Some("NoEligiblePool")
            }
            _ => None,
        };
        tracing::warn!(error = %e.message, details = %e.details, "ADD failed");
        if let (Some(reason), Some(p)) = (reason, pod) {
            a.view.pod_event(crate::view::events::PodEvent {
                namespace: p.namespace,
                name: p.name,
                uid: p.uid,
                type_: "Warning",
                reason,
                message: if e.details.is_empty() {
                    e.message.clone()
                } else {
                    format!("{}: {}", e.message, e.details)
                },
            });
        }
    }
    out.map(Json)
}

async fn coordinator(State(a): State<Arc<Agent>>) -> Result<Json<serde_json::Value>, Fail> {
    match a.view.coordinator_defaults().await {
        Ok(Some(v)) => Ok(Json(v)),
        Ok(None) => Err(Fail(ApiError::new(
            ErrorKind::NotFound,
            "the cluster has no SpiderCoordinator 'default': the coordinator uses its built-in defaults",
        ))),
        Err(e) => Err(Fail(ApiError::new(ErrorKind::Unavailable, e.to_string()))),
    }
}

async fn conflict(State(a): State<Arc<Agent>>, bytes: Bytes) -> Result<Json<Allocation>, Fail> {
    let req = body::<ConflictRequest>(&bytes)?;
    let agent = a.clone();
    let container = req.add.attachment.container_id.clone();
    a.inflight
        .run(
            &container,
            async move { ipam::conflict(&agent, &req).await },
        )
        .await
        .map(Json)
        .map_err(Fail)
}

async fn del(State(a): State<Arc<Agent>>, bytes: Bytes) -> Result<Json<DelResponse>, Fail> {
    let t0 = Instant::now();
    a.metrics.releases.fetch_add(1, Relaxed);
    let out = match body::<DelRequest>(&bytes) {
        Ok(req) => {
            let agent = a.clone();
            let container = req.attachment.container_id.clone();
            a.inflight
                .run(&container, async move { ipam::del(&agent, &req).await })
                .await
                .map_err(Fail)
        }
        Err(f) => Err(f),
    };
    a.metrics.release_duration.observe(t0.elapsed());
    if let Err(Fail(e)) = &out {
        a.metrics.release_failures.fetch_add(1, Relaxed);
        tracing::warn!(error = %e.message, "DEL failed");
    }
    out.map(Json)
}

async fn check(State(a): State<Arc<Agent>>, bytes: Bytes) -> Result<Json<Allocation>, Fail> {
    let req = body(&bytes)?;
    ipam::check(&a, &req).await.map(Json).map_err(Fail)
}

async fn gc(State(a): State<Arc<Agent>>, bytes: Bytes) -> Result<Json<DelResponse>, Fail> {
    let req = body(&bytes)?;
    let out = ipam::gc(&a, &req).await.map_err(Fail)?;
    a.metrics
        .gc_released
        .fetch_add(out.released.len() as u64, Relaxed);
    Ok(Json(out))
}

/// Whether commands are stuck: the oldest running one, if older than `limit`.
fn stuck(a: &Agent, limit: Duration) -> Result<(), Fail> {
    match a.inflight.oldest() {
        Some((container, age)) if age > limit => Err(Fail(ApiError::new(
            ErrorKind::Unavailable,
            format!(
                "a command for container {container} has been running for {}s (the store does not answer in time)",
                age.as_secs()
            ),
        ))),
        _ => Ok(()),
    }
}

/// Whether ADD can be served: the store answers a read within 5 s and no command is stuck.
async fn probe(a: &Agent) -> Result<Status, Fail> {
    stuck(a, a.stuck_ready)?;
    let read = a
        .engine
        .store()
        .list(Filter::Container("\u{0}status-probe"));
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| {
            Fail(ApiError::new(
                ErrorKind::Unavailable,
                "the lease store did not answer a read within 5 s",
            ))
        })?
        .map_err(|e| Fail(ApiError::new(ErrorKind::Unavailable, e.to_string())))?;
    let snap = a.view.snapshot();
    Ok(Status {
        node: a.node.clone(),
        store: a.engine.store().backend().to_string(),
        pools: snap.pools.pools.len(),
        view: a.view.describe(),
        version: env!("CARGO_PKG_VERSION").to_string(),
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

/// Liveness: the process serves and no command has been stuck past [`WEDGED_LIVE`].
async fn live(State(a): State<Arc<Agent>>) -> Response {
    match stuck(&a, a.stuck_live) {
        Ok(()) => "ok".into_response(),
        Err(f) => (StatusCode::SERVICE_UNAVAILABLE, f.0.message).into_response(),
    }
}

fn unavailable(e: impl std::fmt::Display) -> Fail {
    Fail(ApiError::new(ErrorKind::Unavailable, e.to_string()))
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
