//! Kubernetes (feature `kube`): Spiderpool's CRDs from the Rust types ([`crd`]) and the
//! [`KubeStore`], which keeps allocation records in the API server.

pub mod crd;
mod store;

pub use store::{block_of, KubeStore, KubeStoreOptions, ALLOCATED_IPS_LIMIT, BLOCK};
