//! The cluster from manifest files and directories, reloaded when they change, and the
//! manifest loader `spiderctl` uses too.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use spiderpool_core::manifest::parse_documents;
use spiderpool_core::types::Object;

use super::{ClusterView, Snapshot};

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
            if !spiderpool_store::task::sleep_or_stop(every, &mut stop).await {
                return;
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

/// Objects read from manifest files, each remembered with the file it came from.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every object, with its source file.
    pub objects: Vec<(PathBuf, Object)>,
    /// File-level and document-level errors.
    pub errors: Vec<String>,
}

/// Reads manifest files. Unreadable files, non-YAML text and undecodable documents become errors.
pub fn load(paths: &[PathBuf]) -> Loaded {
    let mut out = Loaded::default();
    for path in paths {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                out.errors
                    .push(format!("{}: cannot read: {e}", path.display()));
                continue;
            }
        };
        match parse_documents(&text) {
            Ok(docs) => {
                for d in docs {
                    match d.object {
                        Ok(o) => out.objects.push((path.clone(), o)),
                        Err(e) => out.errors.push(format!(
                            "{}: document {}: {e}",
                            path.display(),
                            d.index
                        )),
                    }
                }
            }
            Err(e) => out.errors.push(format!("{}: {e}", path.display())),
        }
    }
    out
}

fn read_all(paths: &[PathBuf]) -> Result<(Vec<Object>, Stamps), String> {
    let stamp = stamps(paths);
    for p in paths {
        if !p.exists() {
            return Err(format!("{}: no such file or directory", p.display()));
        }
    }
    let list = files(paths);
    let loaded = load(&list);
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
