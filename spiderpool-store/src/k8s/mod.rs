//! Kubernetes (feature `kube`): Spiderpool's CRDs from the Rust types ([`crd`]) and the
//! [`KubeStore`], which keeps allocation records in the API server; the Kubernetes I/O the agent
//! and the controller share ([`autopool`], [`client`]).

pub mod autopool;
pub mod crd;
mod store;

pub use store::{block_of, KubeStore, KubeStoreOptions, ALLOCATED_IPS_LIMIT, BLOCK};

/// A client for the API server: from the kubeconfig at `path`, or (without one) in-cluster
/// config, else `$KUBECONFIG` or `~/.kube/config`. Returns the client and the server's address
/// (for error messages).
pub async fn client(path: Option<&std::path::Path>) -> Result<(kube::Client, String), String> {
    client_with(path, None).await
}

/// How long a request to the API server may take (connect, send, answer) in a client made by
/// [`request_client`], well below the plugin's 60 s.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A client for one-shot requests (GET, LIST, PATCH: no watches), every one of which fails after
/// [`REQUEST_TIMEOUT`] without an answer instead of waiting forever on a dropped connection.
pub async fn request_client(
    path: Option<&std::path::Path>,
) -> Result<(kube::Client, String), String> {
    client_with(path, Some(REQUEST_TIMEOUT)).await
}

async fn client_with(
    path: Option<&std::path::Path>,
    timeout: Option<std::time::Duration>,
) -> Result<(kube::Client, String), String> {
    let cfg = match path {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| format!("reading the kubeconfig {}: {e}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("the kubeconfig {}: {e}", p.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!("no Kubernetes configuration (not in a pod, no $KUBECONFIG, no ~/.kube/config; pass --kubeconfig): {e}")
        })?,
    };
    let mut cfg = cfg;
    // One retry layer: the callers' own (the store's block writes, the next GC or reconcile
    // round), not also kube's server-retry policy (15 tries, backoff up to 1,000 s). A peer that
    // does not accept the connection costs 5 s. A read timeout would also cut the long-lived
    // watches: watching clients have none, request clients (`request_client`) have one.
    cfg.default_retry = false;
    cfg.connect_timeout = Some(std::time::Duration::from_secs(5));
    if timeout.is_some() {
        cfg.read_timeout = timeout;
        cfg.write_timeout = timeout;
    }
    let server = cfg.cluster_url.to_string();
    let client = kube::Client::try_from(cfg).map_err(|e| format!("API server client: {e}"))?;
    Ok((client, server))
}
