//! The auto-pool reconcile (run by the leader): every interval it
//! - makes the pools of applications that ask for one and have none yet (ahead of their pods),
//! - grows a pool whose application wants more, shrinks one that holds more than it wants (its
//!   highest free addresses; the webhook refuses any change that would strand an allocated one),
//! - reclaims the pool of an application that is gone (or was re-created under the same name)
//!   when `ipam.spidernet.io/ippool-reclaim` allows: the pool is deleted, its finalizer keeps it
//!   until its last address is freed, and the subnet then forgets it; a kept pool goes back to a
//!   re-created application of the same kind, namespace and name,
//! - brings each subnet's `controlledIPPools` and counts in line with its pools (an entry whose
//!   pool stays missing for two rounds is dropped: an agent killed between its two writes).
//!
//! Leadership is a `coordination.k8s.io` Lease: only one replica reconciles; every replica serves
//! the webhooks.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::{json, Value};
use spiderpool_core::range::{IpFamily, IpSet};
use spiderpool_store::k8s::crd::{SpiderIPBlock, SpiderIPPool, SpiderSubnet, FINALIZER};

use crate::autopool::{
    self, Want, LABEL_APP_UID, LABEL_NIC, LABEL_RECLAIM, LABEL_SUBNET, LABEL_VERSION,
};

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 UTC with microseconds, as Lease times are written.
fn micro_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000000Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Takes or keeps the Lease `namespace/name` for `identity`; whether this replica leads.
pub async fn lead(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    identity: &str,
    duration: u64,
) -> Result<bool, String> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let now = now_secs();
    let mine = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "holderIdentity": identity,
            "leaseDurationSeconds": duration,
            "renewTime": micro_time(now),
            "acquireTime": micro_time(now),
        }
    });
    let current = api
        .get_opt(name)
        .await
        .map_err(|e| format!("reading Lease {namespace}/{name}: {e}"))?;
    let Some(current) = current else {
        let lease: Lease = serde_json::from_value(mine).map_err(|e| e.to_string())?;
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(format!("creating Lease {namespace}/{name}: {e}")),
        };
    };
    let v = serde_json::to_value(&current).unwrap_or_default();
    let holder = v["spec"]["holderIdentity"].as_str().unwrap_or_default();
    let renewed = v["spec"]["renewTime"]
        .as_str()
        .and_then(crate::gc::parse_time)
        .unwrap_or(0);
    let held_for = v["spec"]["leaseDurationSeconds"]
        .as_u64()
        .unwrap_or(duration);
    if holder != identity && renewed + held_for > now {
        return Ok(false);
    }
    let mut next = mine;
    next["metadata"]["resourceVersion"] = v["metadata"]["resourceVersion"].clone();
    if holder == identity {
        next["spec"]["acquireTime"] = v["spec"]["acquireTime"].clone();
    }
    let lease: Lease = serde_json::from_value(next).map_err(|e| e.to_string())?;
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(format!("renewing Lease {namespace}/{name}: {e}")),
    }
}

fn label<'a>(p: &'a SpiderIPPool, k: &str) -> &'a str {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(k))
        .map(String::as_str)
        .unwrap_or("")
}

fn family(p: &SpiderIPPool) -> IpFamily {
    if label(p, LABEL_VERSION) == "6" || p.spec.0.subnet.contains(':') {
        IpFamily::V6
    } else {
        IpFamily::V4
    }
}

fn ips(p: &SpiderIPPool) -> IpSet {
    autopool::pool_set(p).unwrap_or_else(|| IpSet::empty(family(p)))
}

/// The addresses a pool holds, from its status (`None`: unknown, e.g. too many to list there).
fn allocated(p: &SpiderIPPool) -> Option<IpSet> {
    let st = p.status.as_ref();
    let count = st.and_then(|s| s.allocated_ip_count).unwrap_or(0);
    let map: BTreeMap<String, Value> = match st.and_then(|s| s.allocated_ips.as_deref()) {
        Some(j) => serde_json::from_str(j).ok()?,
        None if count == 0 => BTreeMap::new(),
        None => return None,
    };
    let keys: Vec<String> = map.into_keys().collect();
    IpSet::parse(family(p), &keys).ok()
}

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Pools made or grown.
    pub grown: Vec<String>,
    /// Pools shrunk.
    pub shrunk: Vec<String>,
    /// Pools deleted (reclaimed).
    pub reclaimed: Vec<String>,
}

/// The reconcile's memory between rounds.
#[derive(Debug, Default)]
pub struct Reconciler {
    /// Subnet entries seen without their pool last round.
    missing: BTreeSet<(String, String)>,
}

async fn list<K>(client: &kube::Client) -> Result<Vec<K>, String>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|e| format!("listing {}: {e}", K::plural(&())))
}

fn owned_by(
    refs: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>,
    kind: &str,
) -> bool {
    refs.is_some_and(|r| {
        r.iter()
            .any(|o| o.controller == Some(true) && o.kind == kind)
    })
}

/// Applications (kind, namespace, name) whose pod template asks for an auto-pool.
async fn applications(client: &kube::Client) -> Result<Vec<(String, String, String)>, String> {
    fn asks(t: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>) -> bool {
        t.and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .is_some_and(|a| {
                a.contains_key(spiderpool_core::select::ANNO_SUBNET)
                    || a.contains_key(spiderpool_core::select::ANNO_SUBNETS)
            })
    }
    let mut out = Vec::new();
    let id = |m: &kube::core::ObjectMeta| {
        (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    };
    for d in list::<Deployment>(client).await? {
        if asks(d.spec.as_ref().map(|s| &s.template)) {
            let (ns, n) = id(&d.metadata);
            out.push(("Deployment".into(), ns, n));
        }
    }
    for d in list::<StatefulSet>(client).await? {
        if asks(d.spec.as_ref().map(|s| &s.template)) {
            let (ns, n) = id(&d.metadata);
            out.push(("StatefulSet".into(), ns, n));
        }
    }
    for d in list::<DaemonSet>(client).await? {
        if asks(d.spec.as_ref().map(|s| &s.template)) {
            let (ns, n) = id(&d.metadata);
            out.push(("DaemonSet".into(), ns, n));
        }
    }
    for d in list::<ReplicaSet>(client).await? {
        if !owned_by(d.metadata.owner_references.as_ref(), "Deployment")
            && asks(d.spec.as_ref().and_then(|s| s.template.as_ref()))
        {
            let (ns, n) = id(&d.metadata);
            out.push(("ReplicaSet".into(), ns, n));
        }
    }
    for d in list::<Job>(client).await? {
        if !owned_by(d.metadata.owner_references.as_ref(), "CronJob")
            && asks(d.spec.as_ref().map(|s| &s.template))
        {
            let (ns, n) = id(&d.metadata);
            out.push(("Job".into(), ns, n));
        }
    }
    for d in list::<CronJob>(client).await? {
        let t = d
            .spec
            .as_ref()
            .and_then(|s| s.job_template.spec.as_ref())
            .map(|s| &s.template);
        if asks(t) {
            let (ns, n) = id(&d.metadata);
            out.push(("CronJob".into(), ns, n));
        }
    }
    Ok(out)
}

impl Reconciler {
    /// One round.
    pub async fn round(&mut self, client: &kube::Client) -> Result<Report, String> {
        let mut report = Report::default();
        let pools_api: Api<SpiderIPPool> = Api::all(client.clone());
        let auto: Vec<SpiderIPPool> = pools_api
            .list(&ListParams::default().labels(LABEL_SUBNET))
            .await
            .map_err(|e| format!("listing auto-pools: {e}"))?
            .items;
        // 1. Every auto-pool against its application.
        for p in &auto {
            let name = p.metadata.name.clone().unwrap_or_default();
            if p.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let l = |k: &str| label(p, k).to_string();
            let kind = l("ipam.spidernet.io/app-kind");
            let ns = l("ipam.spidernet.io/app-namespace");
            let app_name = l("ipam.spidernet.io/app-name");
            let reclaim = l(LABEL_RECLAIM) != "false";
            let app = autopool::fetch_app(client, &kind, &ns, &app_name).await?;
            let uid_label = l(LABEL_APP_UID);
            let same = app
                .as_ref()
                .is_some_and(|a| !uid_label.is_empty() && a.uid.starts_with(&uid_label));
            let Some(app) = app.filter(|_| same || !reclaim) else {
                if reclaim {
                    let _ = pools_api.delete(&name, &DeleteParams::default()).await;
                    report.reclaimed.push(name);
                }
                continue;
            };
            if !same {
                // Kept (reclaim false) and taken back by a re-created application.
                let patch = json!({"metadata": {"labels": {LABEL_APP_UID: app.uid.chars().take(63).collect::<String>()}}});
                let _ = pools_api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            }
            let want = Want {
                nic: l(LABEL_NIC),
                family: family(p),
                subnet: l(LABEL_SUBNET),
            };
            let Ok(desired) = autopool::desired(&app.annotations, app.replicas) else {
                continue;
            };
            let have = ips(p);
            if have.count() < desired {
                autopool::ensure_pool(client, &app, &want, desired, reclaim).await?;
                report.grown.push(name);
            } else if have.count() > desired {
                let Some(used) = allocated(p) else { continue };
                let keep = autopool::shrink(&have, &used, desired);
                if keep != have {
                    let patch = json!({"spec": {"ips": keep.to_strings()}});
                    match pools_api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(_) => {
                            autopool::set_total(client, &name, &keep).await;
                            report.shrunk.push(name)
                        }
                        // The webhook refused (an address was just allocated): next round.
                        Err(e) => tracing::info!(pool = %name, error = %e, "not shrunk now"),
                    }
                }
            }
        }
        // 2. Applications that ask for a pool and have none yet: made ahead of their pods.
        for (kind, ns, name) in applications(client).await? {
            let Some(app) = autopool::fetch_app(client, &kind, &ns, &name).await? else {
                continue;
            };
            let pod_annos = app.annotations.clone();
            let Ok(Some(wants)) = autopool::wants(&pod_annos) else {
                continue;
            };
            let Ok(desired) = autopool::desired(&app.annotations, app.replicas) else {
                continue;
            };
            for w in wants {
                if autopool::find_pool(client, &app, &w).await?.is_none() {
                    let p = autopool::ensure_pool(
                        client,
                        &app,
                        &w,
                        desired,
                        autopool::reclaim(&app.annotations),
                    )
                    .await?;
                    report.grown.push(p.metadata.name.unwrap_or_default());
                }
            }
        }
        // 3. Pools being deleted that hold nothing: their finalizer goes (agents remove it from
        //    pools they allocated from; a pool nobody allocated from is left to this).
        let all_pools: Vec<SpiderIPPool> = pools_api
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing pools: {e}"))?
            .items;
        let deleting: Vec<&SpiderIPPool> = all_pools
            .iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_some()
                    && p.finalizers().iter().any(|f| f == FINALIZER)
            })
            .collect();
        if !deleting.is_empty() {
            let blocks: Api<SpiderIPBlock> = Api::all(client.clone());
            let held: BTreeSet<String> = blocks
                .list(&ListParams::default())
                .await
                .map_err(|e| format!("listing SpiderIPBlocks: {e}"))?
                .items
                .iter()
                .flat_map(|b| b.spec.allocations.values().map(|r| r.pool.clone()))
                .collect();
            for p in deleting {
                let name = p.metadata.name.clone().unwrap_or_default();
                if !held.contains(&name) {
                    let fins: Vec<&String> =
                        p.finalizers().iter().filter(|f| *f != FINALIZER).collect();
                    let patch = json!({"metadata": {"finalizers": fins, "resourceVersion": p.metadata.resource_version}});
                    let _ = pools_api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await;
                }
            }
        }
        // 4. Subnets in line with their pools.
        let by_name: BTreeMap<String, &SpiderIPPool> = all_pools
            .iter()
            .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
            .collect();
        let subnets: Api<SpiderSubnet> = Api::all(client.clone());
        let mut missing_now = BTreeSet::new();
        for s in subnets
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing subnets: {e}"))?
            .items
        {
            self.sync_subnet(client, &s, &by_name, &mut missing_now)
                .await?;
        }
        self.missing = missing_now;
        Ok(report)
    }

    async fn sync_subnet(
        &self,
        client: &kube::Client,
        s: &SpiderSubnet,
        pools: &BTreeMap<String, &SpiderIPPool>,
        missing_now: &mut BTreeSet<(String, String)>,
    ) -> Result<(), String> {
        let sname = s.metadata.name.clone().unwrap_or_default();
        let fam = s
            .spec
            .0
            .ip_version
            .unwrap_or(if s.spec.0.subnet.contains(':') {
                IpFamily::V6
            } else {
                IpFamily::V4
            });
        let current: BTreeMap<String, Value> = s
            .status
            .as_ref()
            .and_then(|st| st.controlled_ip_pools.as_deref())
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        let mut next = current.clone();
        for (pool, entry) in &current {
            match pools.get(pool) {
                Some(p) => {
                    let want =
                        json!({"ips": ips(p).to_strings(), "application": entry["application"]});
                    if *entry != want {
                        next.insert(pool.clone(), want);
                    }
                }
                None => {
                    let key = (sname.clone(), pool.clone());
                    if self.missing.contains(&key) {
                        next.remove(pool);
                    } else {
                        missing_now.insert(key);
                    }
                }
            }
        }
        let (alloc_i, total) = autopool::subnet_counts(s, &next, fam);
        let total = total.unwrap_or(0);
        let st = s.status.clone().unwrap_or_default();
        if next == current
            && st.allocated_ip_count == Some(alloc_i)
            && st.total_ip_count == Some(total)
        {
            return Ok(());
        }
        let patch = json!({
            "metadata": {"resourceVersion": s.metadata.resource_version},
            "status": {
                "controlledIPPools": serde_json::to_string(&next).unwrap_or_default(),
                "allocatedIPCount": alloc_i,
                "totalIPCount": total,
            }
        });
        let api: Api<SpiderSubnet> = Api::all(client.clone());
        match api
            .patch_status(&sname, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()), // changed meanwhile: next round
            Err(e) => Err(format!("writing the status of SpiderSubnet {sname}: {e}")),
        }
    }
}

/// Leads (Lease) and reconciles every `every` until `stop`.
pub async fn run(
    client: kube::Client,
    namespace: String,
    identity: String,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut r = Reconciler::default();
    let mut leading = false;
    loop {
        match lead(&client, &namespace, "spiderpool-controller", &identity, 15).await {
            Ok(now) => {
                if now != leading {
                    tracing::info!(identity = %identity, leading = now, "leadership");
                }
                leading = now;
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader election failed");
                leading = false;
            }
        }
        if leading {
            match r.round(&client).await {
                Ok(rep) if rep != Report::default() => {
                    tracing::info!(grown = ?rep.grown, shrunk = ?rep.shrunk, reclaimed = ?rep.reclaimed, "auto-pools reconciled")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "auto-pool reconcile failed; next round"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_times() {
        assert_eq!(micro_time(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(micro_time(1_795_792_807), "2026-11-27T15:20:07.000000Z");
        assert_eq!(
            crate::gc::parse_time(&micro_time(951_825_600)),
            Some(951_825_600)
        );
    }
}
