//! Kubernetes (feature `kube`): Spiderpool's CRDs from the Rust types ([`crd`]).

pub mod crd;
