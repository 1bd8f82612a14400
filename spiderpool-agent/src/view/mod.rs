//! The agent's view of the cluster: nodes, namespaces, pods, pools, subnets, reserved IPs.
//!
//! One small interface, [`ClusterView`], so the source can change without the agent noticing:
//! [`ManifestView`] reads `kubectl`-style YAML files or directories and reloads them when they
//! change; the Kubernetes view (reflectors on the API server) implements the same trait.
//!
//! A view hands out immutable [`Snapshot`]s: one request sees one consistent cluster, and a reload
//! swaps the whole snapshot at once. An invalid reload is refused with a log line and the last
//! good snapshot stays in force.

use std::collections::BTreeMap;
use std::sync::Arc;

use spiderpool_core::types::{Namespace, Node, Object, Pod};
use spiderpool_core::PoolSet;

#[cfg(feature = "kube")]
pub mod events;
#[cfg(feature = "kube")]
pub mod kube;
pub mod manifest;

#[cfg(feature = "kube")]
pub use self::kube::KubeView;
pub use manifest::ManifestView;

/// Why the view could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// The source (the API server) could not be read now; nothing may be decided on it (GC
    /// keeps the addresses, ADD is retried).
    #[error("{0}")]
    Unavailable(String),
    /// The request cannot be served as asked (an auto-pool for a bare pod, an exhausted subnet,
    /// a missing SpiderSubnet): the message says why, for the runtime.
    #[error("{0}")]
    Refused(String),
}

/// One consistent view of the cluster.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Pools, subnets and reserved IPs, validated together.
    pub pools: PoolSet,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods by (namespace, name).
    pub pods: BTreeMap<(String, String), Pod>,
    /// Increases with every accepted reload.
    pub generation: u64,
}

impl Snapshot {
    /// Builds a snapshot from objects; fails with every validation problem.
    pub fn build(objects: &[Object], generation: u64) -> Result<Snapshot, Vec<String>> {
        let pools = PoolSet::build(objects)
            .map_err(|e| e.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
        let mut s = Snapshot {
            pools,
            generation,
            ..Default::default()
        };
        for o in objects {
            match o {
                Object::Node(n) => {
                    s.nodes.insert(n.metadata.name.clone(), n.clone());
                }
                Object::Namespace(n) => {
                    s.namespaces.insert(n.metadata.name.clone(), n.clone());
                }
                Object::Pod(p) => {
                    let ns = p
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".to_string());
                    s.pods.insert((ns, p.metadata.name.clone()), p.clone());
                }
                _ => {}
            }
        }
        Ok(s)
    }
}

pub use spiderpool_core::validate::LeftOut;

impl Snapshot {
    /// A snapshot of everything that can be used: pods, nodes and namespaces always; of the
    /// pools, subnets and reserved IPs, each one valid on its own, those `previous` served first,
    /// then oldest first (`creationTimestamp`, then kind and name), unless it conflicts with those
    /// taken before it (two overlapping pools the webhook could not both see: the newer one is
    /// left out, never one already serving). One bad object never freezes the rest of the view.
    pub fn build_leaving_out(
        objects: &[Object],
        previous: &Snapshot,
        generation: u64,
    ) -> (Snapshot, Vec<LeftOut>) {
        if let Ok(s) = Snapshot::build(objects, generation) {
            return (s, Vec::new());
        }
        let is_ipam = |o: &Object| {
            matches!(
                o,
                Object::IpPool(_) | Object::Subnet(_) | Object::ReservedIp(_)
            )
        };
        let served = |o: &Object| match o {
            Object::IpPool(p) => previous.pools.pools.contains_key(&p.metadata.name),
            Object::Subnet(p) => previous.pools.subnets.contains_key(&p.metadata.name),
            _ => false,
        };
        let (kept, left) = spiderpool_core::validate::usable(objects, served);
        match Snapshot::build(&kept, generation) {
            Ok(s) => (s, left),
            // Cannot happen (every kept object was validated with those before it); serve
            // pods, nodes and namespaces without pools rather than nothing.
            Err(_) => {
                let bare: Vec<Object> = kept.into_iter().filter(|o| !is_ipam(o)).collect();
                (Snapshot::build(&bare, generation).unwrap_or_default(), left)
            }
        }
    }
}

/// What [`ClusterView::auto_pools`] answers.
#[derive(Debug, Clone)]
pub struct AutoPools {
    /// The application's pools by NIC, for selection (in place of the `subnet(s)` annotation).
    pub selection: Vec<spiderpool_core::select::PoolsAnnotationEntry>,
    /// The application's labels, added to the pod's (the pools' `podAffinity`).
    pub labels: BTreeMap<String, String>,
}

/// Where the agent learns about the cluster.
#[async_trait::async_trait]
pub trait ClusterView: Send + Sync {
    /// The current snapshot.
    fn snapshot(&self) -> Arc<Snapshot>;

    /// A short description for status and logs (`manifests: a.yaml, b/`).
    fn describe(&self) -> String;

    /// Whether the view knows pods and nodes as the cluster has them, so that garbage collection
    /// may free the addresses of pods that are gone (the Kubernetes view; manifests are not).
    fn tracks_pods(&self) -> bool {
        false
    }

    /// The pod as the cluster has it now, read past any cache: `Ok(None)` when it does not exist,
    /// `Err` when it cannot be read (then nothing is freed).
    async fn pod_now(&self, namespace: &str, name: &str) -> Result<Option<Pod>, ViewError> {
        Ok(self
            .snapshot()
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .cloned())
    }

    /// Whether a StatefulSet wants the pod `name` (`<statefulset>-<ordinal>`) in `namespace`:
    /// `Some(true)` while the StatefulSet exists and wants the ordinal (from `spec.ordinals.start`,
    /// `spec.replicas` of them: the pod keeps its address across restarts), `Some(false)` when it
    /// exists but was scaled below the ordinal, `None` when there is no such StatefulSet (or the view knows none).
    async fn statefulset_wants(
        &self,
        _namespace: &str,
        _name: &str,
    ) -> Result<Option<bool>, ViewError> {
        Ok(None)
    }

    /// For a pod that asks for SpiderSubnet auto-pools (`ipam.spidernet.io/subnet(s)`): makes or
    /// grows its application's pools now and answers them by NIC, with the labels to add to the
    /// pod's for selection. `Ok(None)` when the
    /// pod asks for none or the view cannot make pools (manifests: selection then names the
    /// placeholder `auto4-<app>-<nic>-?????`); `Err` with a message for the runtime.
    async fn auto_pools(&self, _pod: &Pod) -> Result<Option<AutoPools>, ViewError> {
        Ok(None)
    }

    /// Whether the node exists now, read past any cache.
    async fn node_exists_now(&self, name: &str) -> Result<bool, ViewError> {
        Ok(self.snapshot().nodes.contains_key(name))
    }

    /// Tells the pod's users something through an Event (Kubernetes); best effort, rate
    /// limited, never waited for.
    fn pod_event(&self, _event: events::PodEvent) {}

    /// Whether the node's `Ready` condition is `True` now, read past any cache; `Ok(None)`
    /// when the view cannot say (no such node, no conditions, manifests).
    async fn node_ready_now(&self, _name: &str) -> Result<Option<bool>, ViewError> {
        Ok(None)
    }

    /// The cluster's `coordinator` defaults: the `SpiderCoordinator` named `default`, its `spec`
    /// with `status.serviceCIDR` as `serviceCIDR` when the spec names none (the keys the
    /// coordinator plugin reads). `Ok(None)` when there is none (or the view knows none:
    /// manifests, where the network configuration carries every key).
    async fn coordinator_defaults(&self) -> Result<Option<serde_json::Value>, ViewError> {
        Ok(None)
    }
}
