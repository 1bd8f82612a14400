//! [`Agent`]: the state one node's daemon serves from (engine over a store, cluster view,
//! counters), shared by the HTTP API, GC and the background tasks.

use std::sync::Arc;

use spiderpool_core::engine::Engine;
use spiderpool_store::AnyStore;

use crate::inflight::InFlight;
use crate::metrics::Metrics;
use crate::view::ClusterView;

/// By default, a command running longer than this is past every store deadline (30 s a block write, 10 s a
/// request): the store or the agent is wedged, and readiness says so.
pub const WEDGED_READY: std::time::Duration = std::time::Duration::from_secs(45);
/// By default, past this liveness fails too (the kubelet restarts the agent; records survive it).
pub const WEDGED_LIVE: std::time::Duration = std::time::Duration::from_secs(120);

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
    /// ADDs and DELs running, one at a time per container, each to its end.
    pub inflight: Arc<InFlight>,
    /// A command running longer than this makes the agent unready (`/readyz`).
    pub stuck_ready: std::time::Duration,
    /// ... and this, not alive (`/livez`).
    pub stuck_live: std::time::Duration,
    /// The probes every ADD's plugin makes (`--ip-conflict-detection`, `--gateway-detection`).
    pub detect: spiderpool_core::engine::Detect,
}

impl Agent {
    /// An agent for `node`.
    pub fn new(node: String, store: AnyStore, view: Arc<dyn ClusterView>) -> Self {
        Agent {
            engine: Engine::new(store, node.clone()),
            node,
            view,
            metrics: Metrics::default(),
            inflight: Arc::new(InFlight::default()),
            stuck_ready: WEDGED_READY,
            stuck_live: WEDGED_LIVE,
            detect: Default::default(),
        }
    }
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
            if !spiderpool_store::task::sleep_or_stop(backoff, &mut stop).await {
                return;
            }
            backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
        }
    }
    #[cfg(not(feature = "etcd"))]
    let _ = agent;
    let _ = stop.changed().await;
}
