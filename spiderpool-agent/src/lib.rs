//! # spiderpool-agent
//!
//! The per-node daemon and `spiderctl`, the operator CLI.
//!
//! # Layout
//! - [`ctl`]: offline `spiderctl` subcommands (`validate`, `explain`) over manifests.
//! - [`view`]: the cluster view behind one trait ([`view::ClusterView`]): manifests
//!   ([`view::ManifestView`]) or, with feature `kube`, the API server (`kube_view::KubeView`).
//! - [`server`]: the HTTP API on the unix socket and the metrics endpoint.
//! - [`metrics`]: Prometheus counters and histograms with Spiderpool's names.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod agent;
pub mod ctl;
#[cfg(feature = "kube")]
pub mod endpoints;
pub mod gc;
pub mod ipam;
pub mod metrics;
pub mod server;
pub mod view;

pub use spiderpool_store::task::daemon_main;
