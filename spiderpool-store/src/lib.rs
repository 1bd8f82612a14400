//! # spiderpool-store
//!
//! [`LeaseStore`] backends for `spiderpool-core`. Backends store; the core decides.
//!
//! # Layout
//! - [`embedded`] (feature `embedded`, default): one redb file, durable on commit, group commit.
//! - [`etcd`] (feature `etcd`): one etcd shared by every node, one key per address.
//! - [`AnyStore`]: one type over every backend, chosen at run time from a [`StoreConfig`].
//! - `k8s` (feature `kube`): Spiderpool's CRDs from the Rust types, the `KubeStore` (records in
//!   SpiderIPBlocks, pool status projection), and the Kubernetes I/O the agent and the controller
//!   share (API client, auto-pools applied from core's plans).
//! - [`task`]: what the daemons share: their `main`, the clock, "sleep the interval, or stop".
//! - `testing` (feature `testing`): real etcd and kube-apiserver servers for tests, and the
//!   workspace's binaries for tests that run other packages' programs.
//!
//! The in-memory store lives in the core crate ([`MemoryStore`]) and is re-exported here.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![warn(missing_docs)]

#[cfg(feature = "embedded")]
pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "kube")]
pub mod k8s;
pub mod task;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;

pub use spiderpool_core::store::{
    Filter, LeaseStore, Listing, MemoryStore, Outcome, StoreError, Txn,
};

/// Which backend to open.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// In process memory (tests; nothing survives a restart).
    Memory,
    /// The embedded durable store in this file.
    #[cfg(feature = "embedded")]
    Embedded(std::path::PathBuf),
    /// etcd.
    #[cfg(feature = "etcd")]
    Etcd(etcd::EtcdConfig),
    /// The Kubernetes API server (`kube`): opened by the caller, who holds the client
    /// ([`k8s::KubeStore::connect`]), then wrapped in [`AnyStore::Kube`].
    #[cfg(feature = "kube")]
    Kube,
}

impl StoreConfig {
    /// Parses `memory`, `embedded:PATH` or `etcd:URL[,URL...][#PREFIX]`.
    ///
    /// ```
    /// use spiderpool_store::StoreConfig;
    /// assert!(matches!(StoreConfig::parse("memory"), Ok(StoreConfig::Memory)));
    /// let err = StoreConfig::parse("redis:x").unwrap_err();
    /// assert!(err.contains("use memory, embedded:PATH, etcd:URL"));
    /// ```
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "memory" {
            return Ok(StoreConfig::Memory);
        }
        if s == "kube" {
            #[cfg(feature = "kube")]
            return Ok(StoreConfig::Kube);
            #[cfg(not(feature = "kube"))]
            return Err("store 'kube': built without the kube feature".into());
        }
        if let Some(path) = s.strip_prefix("embedded:") {
            #[cfg(feature = "embedded")]
            return Ok(StoreConfig::Embedded(path.into()));
            #[cfg(not(feature = "embedded"))]
            return Err(format!(
                "store 'embedded:{path}': built without the embedded feature"
            ));
        }
        if let Some(rest) = s.strip_prefix("etcd:") {
            #[cfg(feature = "etcd")]
            {
                let (urls, prefix) = match rest.split_once('#') {
                    Some((u, p)) => (u, Some(p)),
                    None => (rest, None),
                };
                let mut cfg = etcd::EtcdConfig::new(
                    urls.split(',')
                        .filter(|u| !u.is_empty())
                        .map(str::to_string)
                        .collect(),
                );
                if let Some(p) = prefix {
                    cfg.prefix = p.to_string();
                }
                return Ok(StoreConfig::Etcd(cfg));
            }
            #[cfg(not(feature = "etcd"))]
            return Err(format!(
                "store 'etcd:{rest}': built without the etcd feature"
            ));
        }
        Err(format!(
            "unknown store '{s}': use memory, embedded:PATH, etcd:URL[,URL...][#PREFIX] or kube"
        ))
    }
}

/// Any backend, dispatched by an enum (no trait objects on the hot path). An agent holds one, so
/// the size difference between variants does not matter.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum AnyStore {
    /// In-memory.
    Memory(Arc<MemoryStore>),
    /// Embedded durable.
    #[cfg(feature = "embedded")]
    Embedded(embedded::EmbeddedStore),
    /// etcd.
    #[cfg(feature = "etcd")]
    Etcd(etcd::EtcdStore),
    /// The Kubernetes API server.
    #[cfg(feature = "kube")]
    Kube(k8s::KubeStore),
}

impl AnyStore {
    /// Opens the configured backend.
    pub async fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        match cfg {
            StoreConfig::Memory => Ok(AnyStore::Memory(Arc::new(MemoryStore::new()))),
            #[cfg(feature = "embedded")]
            StoreConfig::Embedded(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || embedded::EmbeddedStore::open(path))
                    .await
                    .map_err(|e| StoreError::failed("opening the embedded store panicked", e))?
                    .map(AnyStore::Embedded)
            }
            #[cfg(feature = "etcd")]
            StoreConfig::Etcd(c) => etcd::EtcdStore::connect(c.clone())
                .await
                .map(AnyStore::Etcd),
            #[cfg(feature = "kube")]
            StoreConfig::Kube => Err(StoreError::failed(
                "the kube store needs an API server client: open it with KubeStore::connect",
                "no client",
            )),
        }
    }
}

#[async_trait::async_trait]
impl LeaseStore for AnyStore {
    fn backend(&self) -> &'static str {
        match self {
            AnyStore::Memory(s) => s.backend(),
            #[cfg(feature = "embedded")]
            AnyStore::Embedded(s) => s.backend(),
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(s) => s.backend(),
            #[cfg(feature = "kube")]
            AnyStore::Kube(s) => s.backend(),
        }
    }

    fn mirrors_all_nodes(&self) -> bool {
        match self {
            AnyStore::Memory(s) => s.mirrors_all_nodes(),
            #[cfg(feature = "embedded")]
            AnyStore::Embedded(s) => s.mirrors_all_nodes(),
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(s) => s.mirrors_all_nodes(),
            #[cfg(feature = "kube")]
            AnyStore::Kube(s) => s.mirrors_all_nodes(),
        }
    }

    fn affinity(&self) -> Option<spiderpool_core::store::Affinity> {
        match self {
            #[cfg(feature = "kube")]
            AnyStore::Kube(s) => s.affinity(),
            _ => None,
        }
    }

    fn idle_block_owners(&self) -> Vec<String> {
        match self {
            #[cfg(feature = "kube")]
            AnyStore::Kube(s) => s.idle_block_owners(),
            _ => Vec::new(),
        }
    }

    async fn return_blocks(&self, gone: &[String]) -> Result<usize, StoreError> {
        match self {
            #[cfg(feature = "kube")]
            AnyStore::Kube(s) => s.return_blocks(gone).await,
            _ => {
                let _ = gone;
                Ok(0)
            }
        }
    }

    async fn list(&self, filter: Filter<'_>) -> Result<Listing, StoreError> {
        match self {
            AnyStore::Memory(s) => s.list(filter).await,
            #[cfg(feature = "embedded")]
            AnyStore::Embedded(s) => s.list(filter).await,
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(s) => s.list(filter).await,
            #[cfg(feature = "kube")]
            AnyStore::Kube(s) => s.list(filter).await,
        }
    }

    async fn commit(&self, txn: Txn) -> Result<Outcome, StoreError> {
        match self {
            AnyStore::Memory(s) => s.commit(txn).await,
            #[cfg(feature = "embedded")]
            AnyStore::Embedded(s) => s.commit(txn).await,
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(s) => s.commit(txn).await,
            #[cfg(feature = "kube")]
            AnyStore::Kube(s) => s.commit(txn).await,
        }
    }

    async fn pool_addresses(
        &self,
        pool: &str,
    ) -> Result<spiderpool_core::store::PoolAddresses, StoreError> {
        match self {
            AnyStore::Memory(s) => s.pool_addresses(pool).await,
            #[cfg(feature = "embedded")]
            AnyStore::Embedded(s) => s.pool_addresses(pool).await,
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(s) => s.pool_addresses(pool).await,
            #[cfg(feature = "kube")]
            AnyStore::Kube(s) => s.pool_addresses(pool).await,
        }
    }

    async fn pool_revision(&self, pool: &str) -> Result<u64, StoreError> {
        match self {
            AnyStore::Memory(s) => s.pool_revision(pool).await,
            #[cfg(feature = "embedded")]
            AnyStore::Embedded(s) => s.pool_revision(pool).await,
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(s) => s.pool_revision(pool).await,
            #[cfg(feature = "kube")]
            AnyStore::Kube(s) => s.pool_revision(pool).await,
        }
    }
}

/// Standard base64 with padding (certificates in kubeconfigs and webhook `caBundle`s; JSON
/// patches in admission answers).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
