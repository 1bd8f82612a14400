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
    // does not accept the connection costs 5 s. Per-request deadlines are the callers' (a read
    // timeout here would also cut the long-lived watches).
    cfg.default_retry = false;
    cfg.connect_timeout = Some(std::time::Duration::from_secs(5));
    let server = cfg.cluster_url.to_string();
    let client = kube::Client::try_from(cfg).map_err(|e| format!("API server client: {e}"))?;
    Ok((client, server))
}
