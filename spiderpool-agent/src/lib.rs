//! # spiderpool-agent
//!
//! The per-node daemon (`spiderpool-agent`) and `spiderctl`, the operator CLI. `spiderctl` lives
//! here because it shares the agent's client code: it reads a running agent's API, the same
//! manifests through the same loader, and the same stores.
//!
//! # Layout
//! - [`agent`]: [`agent::Agent`], the state the daemon serves from; the store watch.
//! - [`ipam`]: what ADD, DEL, CHECK and GC do (pod context, auto-pools, selection input,
//!   StatefulSet adoption), with typed errors; no HTTP.
//! - [`server`]: the HTTP API on the unix socket (decode, call [`ipam`], encode) and metrics.
//! - [`view`]: the cluster view behind one trait ([`view::ClusterView`], typed
//!   [`view::ViewError`]): manifests ([`view::ManifestView`], and the manifest loader) or, with
//!   feature `kube`, the API server (`view::KubeView`).
//! - [`gc`]: pod-lifecycle garbage collection (Kubernetes view).
//! - `endpoints` (feature `kube`): SpiderEndpoints of the node's pods.
//! - [`metrics`]: Prometheus counters and histograms with Spiderpool's names.
//! - [`ctl`]: `spiderctl`'s subcommands (`validate`, `explain`, `get`) and its tables.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod agent;
pub mod ctl;
#[cfg(feature = "kube")]
pub mod endpoints;
pub mod gc;
pub mod inflight;
pub mod ipam;
pub mod metrics;
pub mod server;
pub mod view;

pub use spiderpool_store::task::daemon_main;
