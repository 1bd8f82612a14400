//! `spiderpool-agent`: the per-node IPAM daemon.
//!
//! ```text
//! spiderpool-agent --node-name NODE --store SPEC --manifests PATH [--manifests PATH ...]
//!                  --socket PATH [--metrics-addr HOST:PORT]
//! spiderpool-agent --node-name NODE --kube [--kubeconfig PATH] [--store kube|SPEC] ...
//! ```
//! SPEC: `embedded:PATH` (default `/var/lib/spiderpool/leases.redb`), `etcd:URL[,URL][#PREFIX]`,
//! `memory`, or `kube` (records in the API server; needs `--kube`). Logs go to stderr (`RUST_LOG` filters them, default `info`). SIGTERM or SIGINT stop
//! it gracefully: new connections are refused, in-flight requests finish.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use spiderpool_agent::server::{self, Agent};
use spiderpool_agent::view::{ClusterView, ManifestView};
use spiderpool_core::api::DEFAULT_SOCKET;
use spiderpool_store::{AnyStore, StoreConfig};

#[derive(Parser)]
#[command(
    name = "spiderpool-agent",
    version,
    about = "The spiderpool IPAM agent of one node"
)]
struct Args {
    /// This node's name (as in the Node objects and in the records it writes).
    #[arg(long)]
    node_name: String,
    /// Lease store: embedded:PATH, etcd:URL[,URL][#PREFIX] or memory.
    #[arg(long, default_value = "embedded:/var/lib/spiderpool/leases.redb")]
    store: String,
    /// Manifest files or directories (Node, Namespace, Pod, SpiderIPPool, SpiderSubnet,
    /// SpiderReservedIP as kubectl YAML); reloaded when they change.
    #[arg(long = "manifests", required_unless_present = "kube")]
    manifests: Vec<PathBuf>,
    /// Learn the cluster from the Kubernetes API server (watches) instead of manifests.
    #[cfg(feature = "kube")]
    #[arg(long, conflicts_with = "manifests")]
    kube: bool,
    /// The kubeconfig for --kube (default: in-cluster config, else $KUBECONFIG, ~/.kube/config).
    #[cfg(feature = "kube")]
    #[arg(long, requires = "kube")]
    kubeconfig: Option<PathBuf>,
    /// The unix socket the CNI plugin talks to (mode 0600).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Serve Prometheus metrics on HOST:PORT (/metrics). In a DaemonSet with hostNetwork, the
    /// node's own address (not 0.0.0.0, which serves every interface).
    #[arg(long)]
    metrics_addr: Option<String>,
    /// The agent reports itself unready (`/readyz`, `spiderctl health`) while a command has
    /// been running this long (the store does not answer in time).
    #[arg(long, default_value_t = 45)]
    ready_stuck_secs: u64,
    /// ... and not alive (`/livez`, `spiderctl health --live`) past this.
    #[arg(long, default_value_t = 120)]
    live_stuck_secs: u64,
    /// IP conflict detection for every ADD on this node (Spiderpool's
    /// `enableIPConflictDetection`): before answering, the plugin probes each address on the
    /// pod's interface (ARP, NDP duplicate address detection); one another host answers for is
    /// recorded as in conflict and replaced. A network config may switch it on for itself.
    #[arg(long)]
    ip_conflict_detection: bool,
    /// Gateway detection for every ADD on this node (`enableGatewayDetection`): ADD fails,
    /// retryably and with the address released, when the pool's gateway does not answer.
    #[arg(long)]
    gateway_detection: bool,
    /// Do not watch the store for other nodes' changes (etcd): for measuring what the watch saves.
    #[arg(long)]
    no_watch: bool,
    /// How often pod-lifecycle GC runs, in milliseconds (with --kube: frees the addresses of
    /// pods that are gone, finished, terminating past grace + margin, or replaced, and of nodes
    /// that are gone; each judged dead in two rounds in a row first).
    #[arg(long, default_value_t = 60_000)]
    gc_interval_ms: u64,
    /// Seconds a terminating pod keeps its address past its grace period.
    #[arg(long, default_value_t = 30)]
    gc_margin_secs: u64,
    /// Free the addresses of gone, replaced or terminating pods while this node is NotReady
    /// (Spiderpool keeps them too by default: a partitioned node may still run those containers,
    /// and freeing their addresses makes duplicates). Finished pods are freed either way.
    #[arg(long)]
    gc_free_on_not_ready_node: bool,
    /// GC only reports (log lines "GC dry run: would free", the
    /// `spiderpool_gc_leak_candidates` gauge) and frees nothing.
    #[arg(long)]
    gc_dry_run: bool,
    /// With `--store kube`: `owned` (default) gives each node blocks of its own (it allocates in
    /// them first, claims a free block when they are full, borrows single addresses in other
    /// nodes' blocks last); `shared` makes every block every node's (the store before
    /// node-affine blocks: more refused writes as nodes grow).
    #[arg(long, default_value = "owned", value_parser = ["owned", "shared"])]
    blocks: String,
    /// With `--blocks owned`: how long one of this node's blocks stays empty before it is
    /// given back so other nodes can own it, in seconds.
    #[arg(long, default_value_t = 60)]
    block_return_after_secs: u64,
    /// How often the manifests are checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    reload_interval_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    spiderpool_agent::daemon_main("spiderpool-agent", run(args))
}

/// The watching client, the request client (every call with a deadline) and the server's URL.
#[cfg(feature = "kube")]
type KubeClient = Option<(kube::Client, kube::Client, String)>;
#[cfg(not(feature = "kube"))]
type KubeClient = Option<()>;

/// The API server client (`--kube`), if any.
async fn kube_client(args: &Args) -> anyhow::Result<KubeClient> {
    #[cfg(feature = "kube")]
    if args.kube {
        let path = args.kubeconfig.as_deref();
        let (watch, server) = spiderpool_store::k8s::client(path)
            .await
            .map_err(anyhow::Error::msg)?;
        let (requests, _) = spiderpool_store::k8s::request_client(path)
            .await
            .map_err(anyhow::Error::msg)?;
        return Ok(Some((watch, requests, server)));
    }
    let _ = args;
    Ok(None)
}

/// The lease store `--store` names.
async fn open_store(args: &Args, kube: &KubeClient) -> anyhow::Result<AnyStore> {
    use anyhow::Context;
    let cfg = StoreConfig::parse(&args.store).map_err(anyhow::Error::msg)?;
    #[cfg(feature = "kube")]
    if let StoreConfig::Kube = cfg {
        let Some((client, _, server)) = kube.clone() else {
            anyhow::bail!("--store kube needs --kube (the API server the records live in)");
        };
        let opts = spiderpool_store::k8s::KubeStoreOptions {
            server,
            node: (args.blocks == "owned").then(|| args.node_name.clone()),
            return_after: Duration::from_secs(args.block_return_after_secs),
            ..Default::default()
        };
        return Ok(AnyStore::Kube(
            spiderpool_store::k8s::KubeStore::connect(client, opts)
                .await
                .with_context(|| format!("opening the lease store {}", args.store))?,
        ));
    }
    let _ = kube;
    AnyStore::open(&cfg)
        .await
        .with_context(|| format!("opening the lease store {}", args.store))
}

/// The cluster view: the API server (`--kube`) or the manifests (watched for changes).
async fn open_view(
    args: &Args,
    kube: KubeClient,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Arc<dyn ClusterView>> {
    use anyhow::Context;
    #[cfg(feature = "kube")]
    if let Some((client, requests, server)) = kube {
        let v = spiderpool_agent::view::KubeView::start(
            client,
            requests,
            server,
            &args.node_name,
            Duration::from_secs(60),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        return Ok(v);
    }
    let _ = kube;
    let v = Arc::new(
        ManifestView::load(args.manifests.clone())
            .map_err(anyhow::Error::msg)
            .context("loading the manifests")?,
    );
    tokio::spawn(v.clone().watch(
        Duration::from_millis(args.reload_interval_ms.max(50)),
        stop.clone(),
    ));
    Ok(v)
}

/// The agent's background tasks: SpiderEndpoints, GC, the store watch, the metrics endpoint.
async fn spawn_tasks(
    args: &Args,
    agent: &Arc<Agent>,
    kube: &KubeClient,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    #[cfg(feature = "kube")]
    if let Some((_, requests, _)) = kube {
        tokio::spawn(spiderpool_agent::endpoints::run(
            agent.clone(),
            requests.clone(),
            Duration::from_millis(1000),
            stop.clone(),
        ));
    }
    let _ = kube;
    tokio::spawn(spiderpool_agent::gc::run(
        agent.clone(),
        spiderpool_agent::gc::Settings {
            every: Duration::from_millis(args.gc_interval_ms.max(100)),
            margin: args.gc_margin_secs,
            free_on_not_ready_node: args.gc_free_on_not_ready_node,
            dry_run: args.gc_dry_run,
        },
        stop.clone(),
    ));
    if !args.no_watch {
        tokio::spawn(server::follow_store(agent.clone(), stop.clone()));
    }
    if let Some(addr) = &args.metrics_addr {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-addr {addr}"))?;
        let app = server::metrics_router(agent.clone());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(tcp, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.changed().await;
                })
                .await;
        });
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT, after telling the background tasks to stop.
async fn shutdown_signal(stop_tx: tokio::sync::watch::Sender<bool>) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing in-flight requests"),
    }
    let _ = stop_tx.send(true);
}

async fn run(args: Args) -> anyhow::Result<()> {
    use anyhow::Context;
    let t0 = std::time::Instant::now();
    let kube = kube_client(&args).await?;
    let store = open_store(&args, &kube).await?;
    let store_ms = t0.elapsed().as_millis() as u64;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let view = open_view(&args, kube.clone(), &stop_rx).await?;
    let view_ms = t0.elapsed().as_millis() as u64 - store_ms;
    if !view.snapshot().nodes.contains_key(&args.node_name) {
        tracing::warn!(node = %args.node_name, "this node is not in the view: pools with nodeAffinity will not match it");
    }
    let mut agent = Agent::new(args.node_name.clone(), store, view.clone());
    agent.stuck_ready = Duration::from_secs(args.ready_stuck_secs.max(1));
    agent.stuck_live = Duration::from_secs(args.live_stuck_secs.max(1));
    agent.detect = spiderpool_core::engine::Detect {
        ip_conflict: args.ip_conflict_detection,
        gateway: args.gateway_detection,
    };
    let agent = Arc::new(agent);
    let listener = bind(&args.socket)?;
    spawn_tasks(&args, &agent, &kube, &stop_rx).await?;
    tracing::info!(
        node = %args.node_name,
        store = %args.store,
        socket = %args.socket.display(),
        view = %view.describe(),
        pools = view.snapshot().pools.pools.len(),
        startup_ms = t0.elapsed().as_millis() as u64,
        store_ms,
        view_ms,
        "serving"
    );
    server::serve(agent, listener, shutdown_signal(stop_tx))
        .await
        .context("serving the API")?;
    // The socket file stays: an agent is installed on this node and will be back (a DaemonSet
    // rollout), so a DEL meanwhile fails with code 11 and is retried, instead of "succeeding"
    // without freeing anything. The next agent replaces the stale file.
    tracing::info!("stopped");
    Ok(())
}

/// Binds the socket (mode 0600). A stale socket file of a dead agent is replaced; a live agent on
/// the same path is an error.
fn bind(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another agent is already serving {}: stop it first, or choose another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    // Bound inside a fresh directory only the owner may enter (mode 0700), made 0600 there,
    // then renamed into place: no moment where another user can connect, without touching the
    // process umask (which needs unsafe code and is process-wide).
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let private = dir.join(format!(".spiderpool-agent-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("creating {}", private.display()))?;
    let staged = private.join("sock");
    let bound = tokio::net::UnixListener::bind(&staged)
        .with_context(|| format!("binding the socket {}", path.display()));
    let placed = bound.and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("setting mode 0600 on {}", staged.display()))?;
        std::fs::rename(&staged, path)
            .with_context(|| format!("moving the socket to {}", path.display()))?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&private);
    let listener = placed?;
    Ok(listener)
}
