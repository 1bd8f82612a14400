//! # spiderpool-controller
//!
//! The cluster-wide program beside the agents: the admission webhooks (Spiderpool's mutations
//! and `spiderctl validate`'s rules against the cluster, over its own TLS) that every replica
//! serves, and the SpiderSubnet auto-pool reconcile that the leader runs.
//!
//! # Layout
//! - [`admission`]: the admission decisions (pure: mutations, validation against the cluster's
//!   objects, update rules).
//! - [`tls`]: the webhook's own CA and serving certificate, kept in a Secret, renewed.
//! - [`webhook`]: the HTTPS server, the AdmissionReview plumbing, the webhook registration.
//! - [`leader`]: leadership by a `coordination.k8s.io` Lease.
//! - [`reconcile`]: auto-pools made ahead of pods, grown, shrunk, reclaimed; subnets' ledgers
//!   in line with their pools (decisions in `spiderpool_core::autopool`, Kubernetes writes in
//!   `spiderpool_store::k8s::autopool`).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod admission;
pub mod cache;
pub mod conditions;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod tls;
pub mod webhook;
