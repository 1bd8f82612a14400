//! The cluster from the Kubernetes API server (feature `kube`): one watch per kind (kube-rs
//! watchers, re-listing after `410 Gone`), folded into the same immutable [`Snapshot`]s the
//! manifest view hands out.
//!
//! Watched: this node's Node, every Namespace, the Pods on this node (field selector
//! `spec.nodeName`), SpiderIPPools, SpiderSubnets, SpiderReservedIPs. A pod the snapshot does not
//! hold yet at ADD (the watch has not delivered it) is fetched directly, once.
//!
//! Objects the API server accepted can still be invalid for IPAM (the webhook was down, or two
//! overlapping pools were created at once): an object invalid on its own, or in conflict with
//! older ones, is left out with a warning, and everything else stays current
//! ([`Snapshot::build_leaving_out`]). A pool being deleted is served as
//! disabled: its records still answer, nothing new comes from it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Node as K8sNode, Pod as K8sPod};
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use spiderpool_core::types::{Object, Pod};
use spiderpool_store::k8s::crd::{SpiderCoordinator, SpiderIPPool, SpiderReservedIP, SpiderSubnet};

use super::{AutoPools, ClusterView, LeftOut, Snapshot, ViewError};

/// Objects by (kind, namespace, name).
type Key = (&'static str, String, String);

/// The cluster as the API server has it.
pub struct KubeView {
    server: String,
    pods: Api<K8sPod>,
    objects: RwLock<BTreeMap<Key, Object>>,
    current: RwLock<Arc<Snapshot>>,
    /// What the last rebuild left out (logged and reported as an Event once each).
    left_out: std::sync::Mutex<Vec<LeftOut>>,
    /// This node (the Events' source).
    node: String,
    /// Every Node's name (a metadata-only watch), once listed: GC asks the API server about a
    /// node only when it is missing here, so its reads do not grow with the cluster.
    node_names: RwLock<Option<BTreeSet<String>>>,
    /// The `SpiderCoordinator` defaults as last read, and when (read again after
    /// [`COORDINATOR_TTL`]: one GET per node per TTL, however many pods start).
    coordinator: tokio::sync::Mutex<Option<(std::time::Instant, Option<serde_json::Value>)>>,
    /// Pod Events per second ([`super::events::POD_EVENTS_PER_SEC`]).
    events: super::events::Limiter,
    /// Since when (the limiter's clock).
    started: std::time::Instant,
}

/// How long the agent serves the `SpiderCoordinator` defaults it read before reading again.
pub const COORDINATOR_TTL: Duration = Duration::from_secs(10);

fn convert<K: Serialize>(o: &K) -> Option<Object> {
    let v = serde_json::to_value(o).ok()?;
    match Object::from_value(v) {
        Ok(mut obj) => {
            if let Object::IpPool(p) = &mut obj {
                if p.metadata.deletion_timestamp.is_some() {
                    p.spec.disable = Some(true);
                }
            }
            Some(obj)
        }
        Err(e) => {
            tracing::warn!(error = %e, "object from the API server not understood: ignored");
            None
        }
    }
}

impl KubeView {
    /// Starts the watches (on `client`) and waits (up to `timeout`) until each has listed once;
    /// one-shot reads (a pod at ADD and GC, StatefulSets, auto-pools, nodes) go through
    /// `requests`, a client whose every call has a deadline
    /// ([`spiderpool_store::k8s::request_client`]).
    pub async fn start(
        client: Client,
        requests: Client,
        server: String,
        node: &str,
        timeout: Duration,
    ) -> Result<Arc<KubeView>, String> {
        let view = Arc::new(KubeView {
            server: server.clone(),
            pods: Api::all(requests),
            objects: RwLock::new(BTreeMap::new()),
            current: RwLock::new(Arc::new(Snapshot::default())),
            left_out: std::sync::Mutex::new(Vec::new()),
            node: node.to_string(),
            node_names: RwLock::new(None),
            coordinator: tokio::sync::Mutex::new(None),
            events: super::events::Limiter::default(),
            started: std::time::Instant::now(),
        });
        tokio::spawn(follow_node_names(view.clone(), Api::all(client.clone())));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<&'static str>(16);
        let node_cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
        let pod_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let all = watcher::Config::default();
        tokio::spawn(follow::<K8sNode>(
            view.clone(),
            Api::all(client.clone()),
            node_cfg,
            "Node",
            tx.clone(),
        ));
        tokio::spawn(follow::<K8sNamespace>(
            view.clone(),
            Api::all(client.clone()),
            all.clone(),
            "Namespace",
            tx.clone(),
        ));
        tokio::spawn(follow::<K8sPod>(
            view.clone(),
            Api::all(client.clone()),
            pod_cfg,
            "Pod",
            tx.clone(),
        ));
        tokio::spawn(follow::<SpiderIPPool>(
            view.clone(),
            Api::all(client.clone()),
            all.clone(),
            "SpiderIPPool",
            tx.clone(),
        ));
        tokio::spawn(follow::<SpiderSubnet>(
            view.clone(),
            Api::all(client.clone()),
            all.clone(),
            "SpiderSubnet",
            tx.clone(),
        ));
        tokio::spawn(follow::<SpiderReservedIP>(
            view.clone(),
            Api::all(client),
            all,
            "SpiderReservedIP",
            tx,
        ));
        let mut synced = BTreeSet::new();
        let wait = async {
            while synced.len() < 6 {
                match rx.recv().await {
                    Some(kind) => {
                        synced.insert(kind);
                    }
                    None => break,
                }
            }
        };
        if tokio::time::timeout(timeout, wait).await.is_err() {
            return Err(format!(
                "the API server {server} did not list every kind within {timeout:?} (is it reachable, are the CRDs installed: spiderctl crd | kubectl apply -f -?)"
            ));
        }
        view.rebuild();
        Ok(view)
    }

    fn rebuild(&self) {
        let objects: Vec<Object> = self
            .objects
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let previous = self.snapshot();
        let (snap, left) =
            Snapshot::build_leaving_out(&objects, &previous, previous.generation + 1);
        let mut reported = self.left_out.lock().unwrap_or_else(|p| p.into_inner());
        for l in left.iter().filter(|l| !reported.contains(l)) {
            tracing::warn!(object = %l.object, problems = %l.problems.join("; "), "invalid (alone or with older pools): left out of the view, the rest is used");
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(super::events::report(
                    self.pods.clone().into_client(),
                    self.node.clone(),
                    l.clone(),
                ));
            }
        }
        *reported = left;
        drop(reported);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
    }

    fn put(&self, kind: &'static str, o: Object) {
        let (ns, name) = match &o {
            Object::Pod(p) => (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone(),
            ),
            Object::Node(n) => (String::new(), n.metadata.name.clone()),
            Object::Namespace(n) => (String::new(), n.metadata.name.clone()),
            Object::IpPool(p) => (String::new(), p.metadata.name.clone()),
            Object::Subnet(p) => (String::new(), p.metadata.name.clone()),
            Object::ReservedIp(p) => (String::new(), p.metadata.name.clone()),
            Object::Endpoint(p) => (String::new(), p.metadata.name.clone()),
        };
        self.objects
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert((kind, ns, name), o);
    }

    fn remove(&self, kind: &'static str, ns: String, name: String) {
        self.objects
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(kind, ns, name));
    }

    fn retain_kind(&self, kind: &'static str, seen: &BTreeSet<(String, String)>) {
        self.objects
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(k, ns, n), _| *k != kind || seen.contains(&(ns.clone(), n.clone())));
    }
}

/// Keeps [`KubeView::node_names`]: names only (`PartialObjectMeta`), re-listed after a break.
async fn follow_node_names(view: Arc<KubeView>, api: Api<kube::core::PartialObjectMeta<K8sNode>>) {
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut listing: Option<BTreeSet<String>> = None;
    while let Some(ev) = stream.next().await {
        let set = |f: &mut dyn FnMut(&mut BTreeSet<String>)| {
            if let Some(names) = view
                .node_names
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                f(names);
            }
        };
        match ev {
            Ok(watcher::Event::Init) => listing = Some(BTreeSet::new()),
            Ok(watcher::Event::InitApply(o)) => {
                if let Some(l) = listing.as_mut() {
                    l.insert(o.name_any());
                }
            }
            Ok(watcher::Event::InitDone) => {
                *view.node_names.write().unwrap_or_else(|p| p.into_inner()) = listing.take();
            }
            Ok(watcher::Event::Apply(o)) => set(&mut |n| {
                n.insert(o.name_any());
            }),
            Ok(watcher::Event::Delete(o)) => set(&mut |n| {
                n.remove(&o.name_any());
            }),
            Err(e) => tracing::warn!(error = %e, "node name watch failed; retrying"),
        }
    }
}

async fn follow<K>(
    view: Arc<KubeView>,
    api: Api<K>,
    cfg: watcher::Config,
    kind: &'static str,
    synced: tokio::sync::mpsc::Sender<&'static str>,
) where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let stream = watcher(api, cfg).default_backoff();
    futures::pin_mut!(stream);
    let mut relist: Option<BTreeSet<(String, String)>> = None;
    let mut first = true;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => relist = Some(BTreeSet::new()),
            Ok(watcher::Event::InitApply(o)) => {
                if let Some(seen) = relist.as_mut() {
                    seen.insert((o.namespace().unwrap_or_default(), o.name_any()));
                }
                if let Some(obj) = convert(&o) {
                    view.put(kind, obj);
                }
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(seen) = relist.take() {
                    view.retain_kind(kind, &seen);
                }
                view.rebuild();
                if first {
                    first = false;
                    let _ = synced.send(kind).await;
                }
            }
            Ok(watcher::Event::Apply(o)) => {
                if let Some(obj) = convert(&o) {
                    view.put(kind, obj);
                    view.rebuild();
                }
            }
            Ok(watcher::Event::Delete(o)) => {
                view.remove(kind, o.namespace().unwrap_or_default(), o.name_any());
                view.rebuild();
            }
            Err(e) => tracing::warn!(kind, error = %e, "watch failed; retrying"),
        }
    }
}

#[async_trait::async_trait]
impl ClusterView for KubeView {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn describe(&self) -> String {
        format!("kubernetes: {}", self.server)
    }

    fn tracks_pods(&self) -> bool {
        true
    }

    async fn pod_now(&self, namespace: &str, name: &str) -> Result<Option<Pod>, ViewError> {
        let api: Api<K8sPod> = Api::namespaced(self.pods.clone().into_client(), namespace);
        match api.get_opt(name).await {
            Ok(Some(p)) => match convert(&p) {
                Some(Object::Pod(p)) => Ok(Some(p)),
                _ => Err(ViewError::Unavailable(format!(
                    "pod {namespace}/{name} not understood"
                ))),
            },
            Ok(None) => Ok(None),
            Err(e) => Err(ViewError::Unavailable(format!(
                "reading pod {namespace}/{name} from {}: {e}",
                self.server
            ))),
        }
    }

    async fn coordinator_defaults(&self) -> Result<Option<serde_json::Value>, ViewError> {
        let mut cached = self.coordinator.lock().await;
        if let Some((at, v)) = cached.as_ref() {
            if at.elapsed() < COORDINATOR_TTL {
                return Ok(v.clone());
            }
        }
        let api: Api<SpiderCoordinator> = Api::all(self.pods.clone().into_client());
        let read = match api.get_opt("default").await {
            Ok(o) => o,
            // No such resource (Spiderpool's CRD not installed, nor ours): no defaults.
            Err(kube::Error::Api(e)) if e.code == 404 => None,
            Err(e) => {
                return Err(ViewError::Unavailable(format!(
                    "reading SpiderCoordinator default from {}: {e}",
                    self.server
                )))
            }
        };
        let v = read.map(|c| {
            let mut spec = serde_json::to_value(&c.spec).unwrap_or_default();
            let services = c.status.map(|s| s.service_cidr).unwrap_or_default();
            if spec.get("serviceCIDR").is_none() && !services.is_empty() {
                spec["serviceCIDR"] = serde_json::json!(services);
            }
            spec
        });
        *cached = Some((std::time::Instant::now(), v.clone()));
        Ok(v)
    }

    async fn statefulset_wants(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<bool>, ViewError> {
        let Some((base, ordinal)) = spiderpool_core::lifecycle::statefulset_ordinal(name) else {
            return Ok(None);
        };
        let api: Api<k8s_openapi::api::apps::v1::StatefulSet> =
            Api::namespaced(self.pods.clone().into_client(), namespace);
        match api.get_opt(base).await {
            Ok(Some(sts)) => {
                let spec = sts.spec.as_ref();
                let replicas = spec.and_then(|s| s.replicas).unwrap_or(1);
                let start = spec
                    .and_then(|s| s.ordinals.as_ref())
                    .and_then(|o| o.start)
                    .unwrap_or(0);
                Ok(Some(spiderpool_core::lifecycle::statefulset_wants_ordinal(
                    ordinal,
                    i64::from(start),
                    i64::from(replicas),
                )))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(ViewError::Unavailable(format!(
                "reading StatefulSet {namespace}/{base} from {}: {e}",
                self.server
            ))),
        }
    }

    async fn auto_pools(&self, pod: &Pod) -> Result<Option<AutoPools>, ViewError> {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let client = self.pods.clone().into_client();
        let Some(made) = spiderpool_store::k8s::autopool::for_pod(
            &client,
            &ns,
            &pod.metadata.name,
            &pod.metadata.annotations,
            &pod.metadata.owner_references,
        )
        .await
        .map_err(ViewError::Refused)?
        else {
            return Ok(None);
        };
        // The pools as written, in the view now: the ADD that made them uses them at once.
        for p in made.objects {
            self.put("SpiderIPPool", p);
        }
        self.rebuild();
        Ok(Some(AutoPools {
            selection: made.selection,
            labels: made.labels,
        }))
    }

    async fn node_exists_now(&self, name: &str) -> Result<bool, ViewError> {
        let watched = self
            .node_names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|n| n.contains(name));
        if watched == Some(true) {
            return Ok(true);
        }
        // Not (yet) seen by the watch: the API server says, fresh.
        let api: Api<K8sNode> = Api::all(self.pods.clone().into_client());
        api.get_opt(name).await.map(|n| n.is_some()).map_err(|e| {
            ViewError::Unavailable(format!("reading node {name} from {}: {e}", self.server))
        })
    }

    fn pod_event(&self, event: super::events::PodEvent) {
        if !self.events.admit(self.started.elapsed().as_secs()) {
            tracing::debug!(pod = %event.name, reason = event.reason, "Event not posted (rate limit)");
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(super::events::report_pod(
                self.pods.clone().into_client(),
                self.node.clone(),
                event,
            ));
        }
    }

    async fn node_ready_now(&self, name: &str) -> Result<Option<bool>, ViewError> {
        let api: Api<K8sNode> = Api::all(self.pods.clone().into_client());
        let node = api.get_opt(name).await.map_err(|e| {
            ViewError::Unavailable(format!("reading node {name} from {}: {e}", self.server))
        })?;
        Ok(node
            .and_then(|n| n.status)
            .and_then(|s| s.conditions)
            .and_then(|c| c.into_iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status == "True"))
    }
}
