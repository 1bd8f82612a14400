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
    let server = cfg.cluster_url.to_string();
    let client = kube::Client::try_from(cfg).map_err(|e| format!("API server client: {e}"))?;
    Ok((client, server))
}
