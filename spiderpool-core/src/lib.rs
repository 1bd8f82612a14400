//! # spiderpool-core
//!
//! Everything Spiderpool's IPAM decides, with no I/O: other CNIs embed this crate, and the
//! `spiderpool-agent` daemon drives it over a real store.
//!
//! # Layout
//! Modules depend only on modules listed above them (no cycles; `scripts/check-structure.py`).
//! - [`range`]: `ips`/`excludeIPs` entries as intervals on `u128` ([`range::IpRange`],
//!   [`range::IpSet`]): parse, print, merge, subtract, count, index <-> address; [`IpFamily`] and
//!   [`Families`].
//! - [`selector`]: Kubernetes label selectors.
//! - [`types`]: SpiderIPPool, SpiderSubnet, SpiderReservedIP, SpiderEndpoint and the Node,
//!   Namespace, Pod fields IPAM reads, with Spiderpool's JSON field names; [`types::ObjectRef`].
//! - [`rfc3339`]: Kubernetes times.
//! - [`model`]: the checked form selection and allocation read ([`Pool`], [`PoolSet`]), and the
//!   address sets of specs not yet checked.
//! - [`validate`]: Spiderpool's webhook rules and messages; builds the [`model`] from [`types`].
//! - [`select`]: candidate pools per NIC and family from annotations, namespace, CNI config and
//!   cluster defaults (annotation parsers, eligibility with the reason each candidate was skipped).
//! - [`netconf`]: the CNI configuration's `ipam` keys, parsed once for the plugin and tools.
//! - [`autopool`]: SpiderSubnet auto-pool decisions (naming, sizing, carving, shrinking, the
//!   subnet's ledger, the pool object, what selection takes).
//! - [`lifecycle`]: when a pod's record may be garbage-collected (judge, observe-twice).
//! - [`bitmap`]: the per-pool allocator (next-fit over a hierarchical bitmap).
//! - [`store`]: the [`store::LeaseStore`] contract, [`store::LeaseTable`], [`store::MemoryStore`].
//! - [`conformance`] (feature `conformance`): the suite every store backend runs.
//! - [`engine`]: [`engine::Engine`]: allocate, release, check and GC through a store.
//! - [`usage`]: per-pool, per-subnet and per-address use, counted from a store.
//! - [`api`]: the agent API bodies shared by the CNI plugin and the agent; the table columns.
//! - [`manifest`]: multi-document YAML/JSON manifests to objects.
//!
//! # Example
//! ```
//! use std::collections::BTreeMap;
//! use spiderpool_core::engine::{Attachment, Engine};
//! use spiderpool_core::manifest::pool_set;
//! use spiderpool_core::select::SelectionInput;
//! use spiderpool_core::MemoryStore;
//!
//! let yaml = r#"
//! kind: SpiderIPPool
//! metadata: {name: zone-a}
//! spec:
//!   subnet: 10.6.0.0/16
//!   ips: [10.6.168.60-10.6.168.69]
//!   gateway: 10.6.0.1
//!   nodeAffinity: {matchLabels: {node-subnet: subnet-6}}
//! "#;
//! let pools = pool_set(yaml).unwrap();
//!
//! let engine = Engine::new(MemoryStore::new(), "node-1");
//! let node_labels = BTreeMap::from([("node-subnet".to_string(), "subnet-6".to_string())]);
//! let annotations = BTreeMap::from([(
//!     "ipam.spidernet.io/ippool".to_string(),
//!     r#"{"ipv4": ["zone-a"]}"#.to_string(),
//! )]);
//! let pod = SelectionInput {
//!     pod_namespace: "default",
//!     pod_name: "web-0",
//!     pod_annotations: Some(&annotations),
//!     node_name: "node-1",
//!     node_labels: Some(&node_labels),
//!     ..Default::default()
//! };
//! let att = Attachment { container_id: "c1".into(), ifname: "eth0".into() };
//! let got = futures::executor::block_on(engine.allocate(&pools, &pod, &att, "uid-1", 0)).unwrap();
//! let v4 = got.nic("eth0").and_then(|n| n.ipv4.as_ref()).unwrap();
//! assert_eq!(v4.pool, "zone-a");
//! assert!(v4.address.to_string().starts_with("10.6.168."));
//! assert_eq!(v4.gateway.unwrap().to_string(), "10.6.0.1");
//! ```

#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![warn(missing_docs)]

pub mod api;

/// FNV-1a (64 bits) of `bytes`: a hash that is the same in every build and on every platform,
/// for names derived from other names (allocator start hints, interface names, object names).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub mod audit;
pub mod autopool;
pub mod bitmap;
pub mod cache;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod engine;
pub mod exposition;
pub mod lifecycle;
pub mod manifest;
pub mod migrate;
pub mod model;
pub mod netconf;
pub mod range;
pub mod rfc3339;
pub mod select;
pub mod selector;
pub mod store;
pub mod types;
pub mod usage;
pub mod validate;

pub use engine::{Allocation, Attachment, Engine, EngineError};
pub use model::{Pool, PoolSet};
pub use range::Families;
pub use range::{IpFamily, IpRange, IpSet};
pub use store::{LeaseStore, MemoryStore, StoreError};
pub use validate::ValidationError;
