//! The pool status projection: each pool's object kept in line with the records the store holds
//! (finalizer, inferred `ipVersion`, `status.allocatedIPCount`/`allocatedIPs`/`totalIPCount`),
//! written in the background, at most once per interval per pool, forward only
//! (`status.allocatedRevision`).

use std::collections::HashMap;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::ResourceExt;
use serde::Serialize;
use spiderpool_core::store::Filter;
use spiderpool_core::types::IpPoolStatus;

use super::{api_code, within, Inner, ALLOCATED_IPS_LIMIT};
use crate::k8s::crd::{SpiderIPPool, FINALIZER};
use spiderpool_core::store::StoreError;

pub(super) async fn project_statuses(inner: std::sync::Weak<Inner>, every: Duration) {
    let mut done: HashMap<String, u64> = HashMap::new();
    // Each pool's `allocatedRevision` as this projector last saw or wrote it.
    let mut seen: HashMap<String, Option<i64>> = HashMap::new();
    // A pool another agent is projecting is looked at again only after a few intervals.
    let mut resting: HashMap<String, std::time::Instant> = HashMap::new();
    loop {
        // Jitter: agents that changed the same pool do not all write its status together.
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::from(d.subsec_nanos()) % (every.as_millis() as u64 / 2 + 1))
            .unwrap_or(0);
        tokio::time::sleep(every + Duration::from_millis(jitter)).await;
        let Some(inner) = inner.upgrade() else { return };
        // Only what this store changed, once per revision reached.
        let dirty: Vec<(String, u64)> = {
            let touched =
                std::mem::take(&mut *inner.touched.lock().unwrap_or_else(|p| p.into_inner()));
            let m = inner.lock();
            touched
                .into_iter()
                .map(|p| {
                    let r = m.table.pool_revision(&p);
                    (p, r)
                })
                .filter(|(p, r)| done.get(p) != Some(r))
                .collect()
        };
        for (pool, rev) in dirty {
            if resting.get(&pool).is_some_and(|t| t.elapsed() < every * 3) {
                inner.retouch(pool);
                continue;
            }
            resting.remove(&pool);
            match inner.project(&pool, Some(&mut seen)).await {
                Ok(true) => {
                    done.insert(pool, rev);
                }
                Ok(false) => {
                    resting.insert(pool.clone(), std::time::Instant::now());
                    inner.retouch(pool)
                }
                Err(e) => {
                    tracing::warn!(pool = %pool, error = %e, "pool status not written; next time");
                    inner.retouch(pool);
                }
            }
        }
        if done.len() > 4096 {
            done.clear();
            seen.clear();
            resting.clear();
        }
    }
}

impl Inner {
    /// Projects `pool` again next time.
    fn retouch(&self, pool: String) {
        self.touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pool);
    }

    /// Brings one pool's object in line with its records: the finalizer (and an inferred
    /// `ipVersion`) while it exists, the finalizer gone once it is deleted and empty, the
    /// status (counts, `allocatedIPs`) written forward only. `Ok(false)`: refused (409), retry.
    ///
    /// With `seen` (the background projector): when another agent wrote the status since this
    /// one last looked, someone is projecting the pool now: this agent yields for a round
    /// (`Ok(false)`) instead of racing it. The content is the same from every agent (each mirrors
    /// every record), so one writer per pool at a time is enough, and status writes (each sent
    /// to every agent's pool watch) do not grow with the number of agents changing the pool.
    pub(super) async fn project(
        &self,
        pool: &str,
        seen: Option<&mut HashMap<String, Option<i64>>>,
    ) -> Result<bool, StoreError> {
        let limit = self.opts.request_timeout;
        let Some(obj) = within(limit, self.pools.get_opt(pool))
            .await
            .map_err(|e| self.unavailable(&format!("reading SpiderIPPool {pool}"), e))?
        else {
            return Ok(true);
        };
        // Spiderpool's `allocatedIPs` only up to ALLOCATED_IPS_LIMIT records; a count otherwise
        // (a 65,000-record pool is not copied out of the mirror once per projection).
        let (revision, count, listed) = {
            let m = self.lock();
            let count = m.table.pool_len(pool);
            let listed =
                (count <= ALLOCATED_IPS_LIMIT).then(|| m.table.list(Filter::Pool(pool)).leases);
            (m.table.pool_revision(pool), count, listed)
        };
        let deleting = obj.metadata.deletion_timestamp.is_some();
        let has_finalizer = obj.finalizers().iter().any(|f| f == FINALIZER);
        if deleting && has_finalizer && count == 0 {
            self.drop_finalizer(&obj).await;
            return Ok(true);
        }
        let resource_version = if deleting {
            obj.resource_version()
        } else {
            match self.mark(&obj, has_finalizer).await {
                Ok(rv) => rv,
                Err(()) => return Ok(false),
            }
        };
        let current = obj.status.clone().unwrap_or_default();
        let rev = i64::try_from(revision).unwrap_or(i64::MAX);
        if current.allocated_revision.is_some_and(|r| r >= rev) {
            return Ok(true);
        }
        let mut seen = seen;
        if let Some(seen) = seen.as_deref_mut() {
            let before = seen.insert(pool.to_string(), current.allocated_revision);
            if before.is_some_and(|b| b != current.allocated_revision) {
                return Ok(false);
            }
        }
        let total = obj.spec.0.addresses().map(|a| a.count_i64());
        let status = IpPoolStatus {
            allocated_ips: listed
                .as_deref()
                .map(spiderpool_core::migrate::format_allocated_ips),
            allocated_ip_count: Some(count as i64),
            total_ip_count: total.or(current.total_ip_count),
            allocated_revision: Some(rev),
            // The controller's; a merge patch leaves them as they are.
            conditions: Vec::new(),
        };
        let written = self
            .write_status_patch(pool, resource_version, status)
            .await?;
        if let (true, Some(seen)) = (written, seen) {
            seen.insert(pool.to_string(), Some(rev));
        }
        Ok(written)
    }

    /// Spiderpool's mutations an agent can make late: the finalizer, and `ipVersion` inferred
    /// from the subnet when the pool does not say (its VERSION column). Returns the
    /// resourceVersion the status write must name; `Err` on a conflict.
    async fn mark(&self, obj: &SpiderIPPool, has_finalizer: bool) -> Result<Option<String>, ()> {
        let pool = obj.name_any();
        let inferred = obj
            .spec
            .0
            .ip_version
            .is_none()
            .then(|| obj.spec.0.family().map(|f| f.version()))
            .flatten();
        if has_finalizer && inferred.is_none() {
            return Ok(obj.resource_version());
        }
        let mut fins = obj.finalizers().to_vec();
        if !has_finalizer {
            fins.push(FINALIZER.to_string());
        }
        let patch = MarkPatch {
            metadata: FinalizersMeta {
                finalizers: fins,
                resource_version: obj.resource_version(),
            },
            spec: inferred.map(|v| VersionSpec { ip_version: v }),
        };
        let limit = self.opts.request_timeout;
        let (pp, merge) = (PatchParams::default(), Patch::Merge(&patch));
        match within(limit, self.pools.patch(&pool, &pp, &merge)).await {
            // The status write must name the version the finalizer made.
            Ok(o) => Ok(o.resource_version()),
            Err(e) if api_code(&e) == Some(409) => Err(()),
            Err(e) => {
                tracing::warn!(pool, error = %e, "adding the finalizer failed; next time");
                Ok(obj.resource_version())
            }
        }
    }

    /// Removes our finalizer from a deleted pool that holds nothing.
    async fn drop_finalizer(&self, obj: &SpiderIPPool) {
        let patch = MarkPatch {
            metadata: FinalizersMeta {
                finalizers: obj
                    .finalizers()
                    .iter()
                    .filter(|f| *f != FINALIZER)
                    .cloned()
                    .collect(),
                resource_version: obj.resource_version(),
            },
            spec: None,
        };
        let name = obj.name_any();
        let (pp, merge) = (PatchParams::default(), Patch::Merge(&patch));
        let _ = within(
            self.opts.request_timeout,
            self.pools.patch(&name, &pp, &merge),
        )
        .await;
    }

    async fn write_status_patch(
        &self,
        pool: &str,
        resource_version: Option<String>,
        status: IpPoolStatus,
    ) -> Result<bool, StoreError> {
        let mut patch = serde_json::json!({
            "metadata": {"resourceVersion": resource_version},
            "status": status,
        });
        // `allocatedIPs` must go when the pool outgrows it: a merge patch drops a null field.
        if status.allocated_ips.is_none() {
            patch["status"]["allocatedIPs"] = serde_json::Value::Null;
        }
        let (pp, merge) = (PatchParams::default(), Patch::Merge(&patch));
        let call = self.pools.patch_status(pool, &pp, &merge);
        match within(self.opts.request_timeout, call).await {
            Ok(_) => Ok(true),
            Err(e) if api_code(&e) == Some(409) => Ok(false),
            Err(e) => {
                Err(self.unavailable(&format!("writing the status of SpiderIPPool {pool}"), e))
            }
        }
    }
}

#[derive(Debug, Serialize)]
struct MarkPatch {
    metadata: FinalizersMeta,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<VersionSpec>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FinalizersMeta {
    finalizers: Vec<String>,
    resource_version: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct VersionSpec {
    ip_version: u8,
}
