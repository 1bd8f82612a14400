//! # spiderpool-core
//!
//! Everything Spiderpool's IPAM decides, with no I/O: other CNIs embed this crate, and the
//! `spiderpool-agent` daemon drives it over a real store.
//!
//! # Layout
//! - [`range`]: `ips`/`excludeIPs` entries as intervals on `u128` ([`range::IpRange`],
//!   [`range::IpSet`]): parse, print, merge, subtract, count, index <-> address.
//! - [`types`]: SpiderIPPool, SpiderSubnet, SpiderReservedIP, SpiderEndpoint and the Node,
//!   Namespace, Pod fields IPAM reads, with Spiderpool's JSON field names.
//! - [`selector`]: Kubernetes label selectors.
//! - [`validate`]: Spiderpool's webhook rules and messages; [`validate::PoolSet`] is the checked
//!   set of pools, subnets and reserved IPs.
//! - [`select`]: candidate pools per NIC and family from annotations, namespace, CNI config and
//!   cluster defaults, with the reason each candidate was skipped.
//! - [`bitmap`]: the per-pool allocator (next-fit over a hierarchical bitmap).
//! - [`store`]: the [`store::LeaseStore`] contract and [`store::MemoryStore`].
//! - [`conformance`] (feature `conformance`): the suite every store backend runs.
//! - [`engine`]: [`engine::Engine`]: allocate, release, check and GC through a store.
//! - [`manifest`]: multi-document YAML/JSON manifests to objects (used by `spiderctl`).
//! - [`table`]: `kubectl`-style aligned tables for tools and examples.

#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![warn(missing_docs)]

pub mod bitmap;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod engine;
pub mod manifest;
pub mod range;
pub mod select;
pub mod selector;
pub mod store;
pub mod table;
pub mod types;
pub mod validate;

pub use engine::{Allocation, Attachment, Engine, EngineError};
pub use range::{IpFamily, IpRange, IpSet};
pub use store::{LeaseStore, MemoryStore, StoreError};
pub use validate::{Pool, PoolSet, ValidationError};
