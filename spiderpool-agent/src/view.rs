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
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use spiderpool_core::types::{Namespace, Node, Object, Pod};
use spiderpool_core::PoolSet;

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

/// What [`ClusterView::auto_pools`] answers.
#[derive(Debug, Clone)]
pub struct AutoPools {
    /// The pod's annotations with `subnet(s)` replaced by `ippool(s)` naming the pools.
    pub annotations: BTreeMap<String, String>,
    /// The application's labels, added to the pod's (the pools' `podAffinity`).
    pub labels: BTreeMap<String, String>,
}

/// Where the agent learns about the cluster.
#[async_trait::async_trait]
pub trait ClusterView: Send + Sync {
    /// The current snapshot.
    fn snapshot(&self) -> Arc<Snapshot>;

    /// A pod the snapshot does not hold yet (a Kubernetes view fetches it once); the manifest
    /// view has nothing more to offer.
    async fn fetch_pod(&self, _namespace: &str, _name: &str) -> Option<Pod> {
        None
    }

    /// A short description for status and logs (`manifests: a.yaml, b/`).
    fn describe(&self) -> String;

    /// Whether the view knows pods and nodes as the cluster has them, so that garbage collection
    /// may free the addresses of pods that are gone (the Kubernetes view; manifests are not).
    fn tracks_pods(&self) -> bool {
        false
    }

    /// The pod as the cluster has it now, read past any cache: `Ok(None)` when it does not exist,
    /// `Err` when it cannot be read (then nothing is freed).
    async fn pod_now(&self, namespace: &str, name: &str) -> Result<Option<Pod>, String> {
        Ok(self
            .snapshot()
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .cloned())
    }

    /// Whether a StatefulSet wants the pod `name` (`<statefulset>-<ordinal>`) in `namespace`:
    /// `Some(true)` while the StatefulSet exists and the ordinal is below its `spec.replicas`
    /// (the pod keeps its address across restarts), `Some(false)` when it exists but was scaled
    /// below the ordinal, `None` when there is no such StatefulSet (or the view knows none).
    async fn statefulset_wants(
        &self,
        _namespace: &str,
        _name: &str,
    ) -> Result<Option<bool>, String> {
        Ok(None)
    }

    /// For a pod that asks for SpiderSubnet auto-pools (`ipam.spidernet.io/subnet(s)`): makes or
    /// grows its application's pools now and answers the annotations that name them
    /// (`ippool`/`ippools`) and the labels to add to the pod's for selection. `Ok(None)` when the
    /// pod asks for none or the view cannot make pools (manifests: selection then names the
    /// placeholder `auto4-<app>-<nic>-?????`); `Err` with a message for the runtime.
    async fn auto_pools(&self, _pod: &Pod) -> Result<Option<AutoPools>, String> {
        Ok(None)
    }

    /// Whether the node exists now, read past any cache.
    async fn node_exists_now(&self, name: &str) -> Result<bool, String> {
        Ok(self.snapshot().nodes.contains_key(name))
    }
}

/// The cluster from manifest files and directories (`*.yaml`, `*.yml`, `*.json` in a directory).
pub struct ManifestView {
    paths: Vec<PathBuf>,
    current: RwLock<Arc<Snapshot>>,
    stamp: RwLock<Vec<(PathBuf, Option<SystemTime>, u64)>>,
}

impl ManifestView {
    /// Loads `paths`; fails when they cannot be read or are invalid (the agent does not start on
    /// a broken view).
    pub fn load(paths: Vec<PathBuf>) -> Result<ManifestView, String> {
        let (objects, stamp) = read_all(&paths)?;
        let snap = Snapshot::build(&objects, 1).map_err(|e| e.join("\n"))?;
        Ok(ManifestView {
            paths,
            current: RwLock::new(Arc::new(snap)),
            stamp: RwLock::new(stamp),
        })
    }

    /// Re-reads the files if any changed (modification time, size, or the set of files in a
    /// directory). Returns `Ok(true)` when a new snapshot was installed, `Ok(false)` when nothing
    /// changed, and `Err` (keeping the last good snapshot) when the new files are invalid.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = stamps(&self.paths);
        if *self.stamp.read().unwrap_or_else(|p| p.into_inner()) == now {
            return Ok(false);
        }
        // Remember the new stamp even when the content is refused: one log line per change.
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = now;
        let (objects, _) = read_all(&self.paths)?;
        let generation = self.snapshot().generation + 1;
        let snap = Snapshot::build(&objects, generation).map_err(|e| e.join("; "))?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
        Ok(true)
    }

    /// Polls for changes every `every` until `stop` resolves; logs accepted and refused reloads.
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            let view = self.clone();
            let out = tokio::task::spawn_blocking(move || view.reload_if_changed()).await;
            match out {
                Ok(Ok(true)) => tracing::info!(
                    generation = self.snapshot().generation,
                    pools = self.snapshot().pools.pools.len(),
                    "manifests reloaded"
                ),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::error!(
                    error = %e,
                    "manifests changed but are invalid; the last good view stays in force"
                ),
                Err(e) => tracing::error!(error = %e, "manifest reload task failed"),
            }
        }
    }
}

#[async_trait::async_trait]
impl ClusterView for ManifestView {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn describe(&self) -> String {
        let files: Vec<String> = self.paths.iter().map(|p| p.display().to_string()).collect();
        format!("manifests: {}", files.join(", "))
    }
}

/// The files behind `paths` (directories expanded, sorted).
fn files(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|f| {
                    f.is_file()
                        && matches!(
                            f.extension().and_then(|e| e.to_str()),
                            Some("yaml" | "yml" | "json")
                        )
                })
                .collect();
            inner.sort();
            out.extend(inner);
        } else {
            out.push(p.clone());
        }
    }
    out
}

fn stamps(paths: &[PathBuf]) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    files(paths)
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map(|m| m.len()).unwrap_or(0);
            (f, modified, len)
        })
        .collect()
}

type Stamps = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn read_all(paths: &[PathBuf]) -> Result<(Vec<Object>, Stamps), String> {
    let stamp = stamps(paths);
    for p in paths {
        if !p.exists() {
            return Err(format!("{}: no such file or directory", p.display()));
        }
    }
    let list = files(paths);
    let loaded = crate::ctl::load(&list);
    if !loaded.errors.is_empty() {
        return Err(loaded.errors.join("\n"));
    }
    Ok((loaded.objects.into_iter().map(|(_, o)| o).collect(), stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = "kind: SpiderIPPool\nmetadata: {name: a}\nspec: {subnet: 10.6.0.0/16, ips: [10.6.0.1-10.6.0.9]}\n";

    #[test]
    fn reloads_valid_changes_and_keeps_the_last_good_view() {
        let dir = tempfile::tempdir().expect("dir");
        let f = dir.path().join("pools.yaml");
        std::fs::write(&f, POOL).expect("write");
        let view = ManifestView::load(vec![dir.path().to_path_buf()]).expect("loads");
        assert_eq!(view.snapshot().pools.pools.len(), 1);
        assert_eq!(view.reload_if_changed(), Ok(false));
        // A second file appears in the directory.
        std::fs::write(
            dir.path().join("more.yml"),
            "kind: SpiderIPPool\nmetadata: {name: b}\nspec: {subnet: 10.7.0.0/16, ips: [10.7.0.1]}\n",
        )
        .expect("write");
        assert_eq!(view.reload_if_changed(), Ok(true));
        assert_eq!(view.snapshot().pools.pools.len(), 2);
        assert_eq!(view.snapshot().generation, 2);
        // An invalid change is refused; the view stays.
        std::fs::write(
            &f,
            "kind: SpiderIPPool\nmetadata: {name: a}\nspec: {subnet: 10.6.0.1/16}\n",
        )
        .expect("write");
        let err = view.reload_if_changed().expect_err("invalid");
        assert!(err.contains("unformatted subnet"), "{err}");
        assert_eq!(view.snapshot().pools.pools.len(), 2);
        assert_eq!(view.reload_if_changed(), Ok(false), "one error per change");
    }

    #[test]
    fn a_missing_path_stops_the_load() {
        let e = ManifestView::load(vec![PathBuf::from("/nonexistent/pools.yaml")])
            .err()
            .expect("missing");
        assert!(e.contains("/nonexistent/pools.yaml"), "{e}");
    }
}
