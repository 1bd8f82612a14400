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
//! Only the leader ([`crate::leader`]) reconciles; every replica serves the webhooks. What a pool
//! should hold is decided by `spiderpool_core::autopool`; the writes are
//! `spiderpool_store::k8s::autopool`'s (the ledger by compare-and-swap, then the pool).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::ResourceExt;
use serde::Serialize;
use serde_json::Value;
use spiderpool_core::autopool::{
    self, label_value, ControlledPool, Want, LABEL_APP_UID, LABEL_NIC, LABEL_RECLAIM, LABEL_SUBNET,
    LABEL_VERSION,
};
use spiderpool_core::range::{IpFamily, IpSet};
use spiderpool_store::k8s::autopool as apply;
use spiderpool_store::k8s::crd::{SpiderIPBlock, SpiderIPPool, SpiderSubnet, FINALIZER};

use crate::leader::Elector;

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
    p.spec
        .0
        .addresses()
        .unwrap_or_else(|| IpSet::empty(family(p)))
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
    /// Subnet entries seen holding addresses their pool lacks, with the pool's resourceVersion
    /// and the entry then, and since when: shrunk only when unchanged for [`SHRINK_GRACE`] (an
    /// agent writes the ledger first and the pool right after: a pool read between the two is
    /// stale, and shrinking from it would free addresses the pool is about to hold; an agent
    /// killed between the two leaves the entry to be shrunk after the grace).
    shrinking: BTreeMap<(String, String), Sighting>,
    /// Pools above the NearlyExhausted threshold or exhausted (Events once per crossing).
    seen: crate::conditions::Seen,
    /// The NearlyExhausted threshold, percent allocated (0: [`NEARLY_EXHAUSTED_PERCENT`]).
    pub nearly_exhausted_percent: u8,
}

/// The default NearlyExhausted threshold, percent allocated.
pub const NEARLY_EXHAUSTED_PERCENT: u8 = 90;

/// A pool's resourceVersion, its ledger entry's addresses, and when they were first seen so.
type Sighting = (String, Vec<String>, std::time::Instant);

/// How long a ledger entry must hold addresses its pool lacks, unchanged, before it is shrunk.
pub const SHRINK_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// What one round saw of the subnets' ledgers, for the next.
#[derive(Default)]
struct LedgerSeen {
    missing: BTreeSet<(String, String)>,
    shrinking: BTreeMap<(String, String), Sighting>,
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

/// A merge patch of `metadata` and `spec` fields.
#[derive(Debug, Serialize)]
struct PoolPatch<M: Serialize, S: Serialize> {
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<M>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<S>,
}

#[derive(Debug, Serialize)]
struct Labels<'a> {
    labels: BTreeMap<&'a str, String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Finalizers<'a> {
    finalizers: Vec<&'a String>,
    resource_version: Option<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Version<'a> {
    resource_version: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct Ips {
    ips: Vec<String>,
}

async fn patch_pool<M: Serialize + std::fmt::Debug, S: Serialize + std::fmt::Debug>(
    api: &Api<SpiderIPPool>,
    name: &str,
    patch: PoolPatch<M, S>,
) -> Result<SpiderIPPool, kube::Error> {
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
}

impl Reconciler {
    /// One round: every auto-pool against its application, pools made ahead of pods, finalizers
    /// of emptied deleted pools, subnets' ledgers in line.
    pub async fn round(&mut self, client: &kube::Client) -> Result<Report, String> {
        let mut report = Report::default();
        let pools_api: Api<SpiderIPPool> = Api::all(client.clone());
        let auto: Vec<SpiderIPPool> = pools_api
            .list(&ListParams::default().labels(LABEL_SUBNET))
            .await
            .map_err(|e| format!("listing auto-pools: {e}"))?
            .items;
        for p in auto
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
        {
            // One pool that cannot be followed now does not stop the round for the others.
            if let Err(e) = follow_app(client, &pools_api, p, &mut report).await {
                tracing::warn!(pool = %p.name_any(), error = %e, "auto-pool not followed; next round");
            }
        }
        make_ahead(client, &mut report).await?;
        // Subnets first, pools after: a pool is never older than the ledger it is compared to.
        let subnets: Vec<SpiderSubnet> = Api::<SpiderSubnet>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing subnets: {e}"))?
            .items;
        let all_pools: Vec<SpiderIPPool> = pools_api
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing pools: {e}"))?
            .items;
        release_finalizers(client, &pools_api, &all_pools).await?;
        let by_name: BTreeMap<String, &SpiderIPPool> = all_pools
            .iter()
            .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
            .collect();
        let mut seen = LedgerSeen::default();
        for s in &subnets {
            self.sync_subnet(client, s, &by_name, &mut seen).await?;
        }
        self.missing = seen.missing;
        self.shrinking = seen.shrinking;
        let threshold = match self.nearly_exhausted_percent {
            0 => NEARLY_EXHAUSTED_PERCENT,
            t => t.min(100),
        };
        crate::conditions::sync(client, &all_pools, &subnets, threshold, &mut self.seen).await?;
        Ok(report)
    }

    async fn sync_subnet(
        &self,
        client: &kube::Client,
        s: &SpiderSubnet,
        pools: &BTreeMap<String, &SpiderIPPool>,
        seen: &mut LedgerSeen,
    ) -> Result<(), String> {
        let sname = s.metadata.name.clone().unwrap_or_default();
        let fam = apply::subnet_family(s);
        let current = apply::ledger(s);
        let mut next = current.clone();
        for (pool, entry) in &current {
            let key = (sname.clone(), pool.clone());
            let Some(p) = pools.get(pool) else {
                if self.missing.contains(&key) {
                    next.remove(pool);
                } else {
                    seen.missing.insert(key);
                }
                continue;
            };
            let spec = ips(p);
            let held = entry.addresses(fam).unwrap_or_else(|| IpSet::empty(fam));
            // Grown to the pool at once; shrunk only after SHRINK_GRACE unchanged.
            let mut target = spec.clone();
            if !held.subtract(&spec).is_empty() {
                let rv = p.metadata.resource_version.clone().unwrap_or_default();
                let since = match self.shrinking.get(&key) {
                    Some((r, e, t)) if *r == rv && *e == entry.ips => *t,
                    _ => std::time::Instant::now(),
                };
                if since.elapsed() < SHRINK_GRACE {
                    seen.shrinking.insert(key, (rv, entry.ips.clone(), since));
                    target = spec.union(&held);
                }
            }
            let want = ControlledPool {
                ips: target.to_strings(),
                application: entry.application.clone(),
            };
            if *entry != want {
                next.insert(pool.clone(), want);
            }
        }
        let alloc_i = autopool::ledger_count(&next, fam);
        let total = s.spec.0.addresses().map(|a| a.count_i64()).unwrap_or(0);
        let st = s.status.clone().unwrap_or_default();
        if next == current
            && st.allocated_ip_count == Some(alloc_i)
            && st.total_ip_count == Some(total)
        {
            return Ok(());
        }
        // Changed meanwhile (`false`): next round.
        apply::write_ledger(client, s, &next).await.map(|_| ())
    }
}

/// One auto-pool against its application: reclaimed with it, taken back by a re-created one
/// (kept pools), grown to or shrunk towards what it wants (shrinking by free addresses only).
async fn follow_app(
    client: &kube::Client,
    pools_api: &Api<SpiderIPPool>,
    p: &SpiderIPPool,
    report: &mut Report,
) -> Result<(), String> {
    let name = p.metadata.name.clone().unwrap_or_default();
    let l = |k: &str| label(p, k).to_string();
    // The application in full from the pool's annotation (labels are cut at 63 characters, so a
    // longer name would not be found, and the pool reclaimed at once); labels for older pools.
    let (kind, ns, app_name) = p
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(autopool::ANNO_APPLICATION))
        .and_then(|a| autopool::App::parse_application(a))
        .unwrap_or_else(|| {
            (
                l("ipam.spidernet.io/app-kind"),
                l("ipam.spidernet.io/app-namespace"),
                l("ipam.spidernet.io/app-name"),
            )
        });
    let reclaim = l(LABEL_RECLAIM) != "false";
    let app = apply::fetch_app(client, &kind, &ns, &app_name).await?;
    let uid_label = l(LABEL_APP_UID);
    let same = app
        .as_ref()
        .is_some_and(|a| !uid_label.is_empty() && a.uid.starts_with(&uid_label));
    let Some(app) = app.filter(|_| same || !reclaim) else {
        if reclaim {
            let _ = pools_api.delete(&name, &DeleteParams::default()).await;
            report.reclaimed.push(name);
        }
        return Ok(());
    };
    if !same {
        // Kept (reclaim false) and taken back by a re-created application.
        let patch: PoolPatch<Labels, ()> = PoolPatch {
            metadata: Some(Labels {
                labels: BTreeMap::from([(LABEL_APP_UID, label_value(&app.uid))]),
            }),
            spec: None,
        };
        let _ = patch_pool(pools_api, &name, patch).await;
    }
    let want = Want {
        nic: l(LABEL_NIC),
        family: family(p),
        subnet: l(LABEL_SUBNET),
    };
    let Ok(desired) = autopool::desired(&app.annotations, app.replicas) else {
        return Ok(());
    };
    let have = ips(p);
    if have.count() < desired {
        apply::ensure_pool(client, &app, &want, desired, reclaim).await?;
        report.grown.push(name);
    } else if have.count() > desired {
        let Some(used) = allocated(p) else {
            return Ok(());
        };
        let keep = autopool::shrink(&have, &used, desired);
        if keep != have {
            // Compare-and-swap on the pool as read (its status and spec of the same version).
            let patch: PoolPatch<Version, Ips> = PoolPatch {
                metadata: Some(Version {
                    resource_version: p.metadata.resource_version.as_deref(),
                }),
                spec: Some(Ips {
                    ips: keep.to_strings(),
                }),
            };
            match patch_pool(pools_api, &name, patch).await {
                Ok(_) => {
                    apply::set_total(client, &name, &keep).await;
                    report.shrunk.push(name)
                }
                // Changed meanwhile (409), or the webhook refused (an address was just
                // allocated): next round.
                Err(e) => tracing::info!(pool = %name, error = %e, "not shrunk now"),
            }
        }
    }
    Ok(())
}

/// Applications that ask for a pool and have none yet: made ahead of their pods.
async fn make_ahead(client: &kube::Client, report: &mut Report) -> Result<(), String> {
    for (kind, ns, name) in applications(client).await? {
        let Some(app) = apply::fetch_app(client, &kind, &ns, &name).await? else {
            continue;
        };
        let Ok(Some(wants)) = autopool::wants(&app.annotations) else {
            continue;
        };
        let Ok(desired) = autopool::desired(&app.annotations, app.replicas) else {
            continue;
        };
        for w in wants {
            let made = async {
                if apply::find_pool(client, &app, &w).await?.is_some() {
                    return Ok(None);
                }
                let reclaim = autopool::reclaim(&app.annotations);
                apply::ensure_pool(client, &app, &w, desired, reclaim)
                    .await
                    .map(Some)
            };
            match made.await {
                Ok(Some(p)) => report.grown.push(p.metadata.name.unwrap_or_default()),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(app = %format!("{kind} {ns}/{name}"), error = %e, "auto-pool not made; next round")
                }
            }
        }
    }
    Ok(())
}

/// Pools being deleted that hold nothing: their finalizer goes (agents remove it from pools
/// they allocated from; a pool nobody allocated from is left to this).
async fn release_finalizers(
    client: &kube::Client,
    pools_api: &Api<SpiderIPPool>,
    all_pools: &[SpiderIPPool],
) -> Result<(), String> {
    let deleting: Vec<&SpiderIPPool> = all_pools
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_some() && p.finalizers().iter().any(|f| f == FINALIZER)
        })
        .collect();
    if deleting.is_empty() {
        return Ok(());
    }
    let blocks: Api<SpiderIPBlock> = Api::all(client.clone());
    let held: BTreeSet<String> = blocks
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing SpiderIPBlocks: {e}"))?
        .items
        .iter()
        .flat_map(|b| {
            b.spec
                .allocations
                .values()
                .filter_map(|r| r.pool().map(str::to_string))
        })
        .collect();
    for p in deleting {
        let name = p.metadata.name.clone().unwrap_or_default();
        if !held.contains(&name) {
            let patch: PoolPatch<Finalizers, ()> = PoolPatch {
                metadata: Some(Finalizers {
                    finalizers: p.finalizers().iter().filter(|f| *f != FINALIZER).collect(),
                    resource_version: p.metadata.resource_version.as_deref(),
                }),
                spec: None,
            };
            let _ = patch_pool(pools_api, &name, patch).await;
        }
    }
    Ok(())
}

/// Leads (the Lease `namespace/spiderpool-controller`, held `lease`) and reconciles every
/// `every` until `stop`. A round runs only while this replica leads and is cut at the renew
/// deadline, so a replica paused or partitioned in the middle of a round never acts after
/// another has taken over.
pub async fn run(
    client: kube::Client,
    namespace: String,
    identity: String,
    every: Duration,
    lease: Duration,
    nearly_exhausted_percent: u8,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &crate::metrics::METRICS;
    let mut r = Reconciler {
        nearly_exhausted_percent,
        ..Default::default()
    };
    let mut elector = Elector::new(
        client.clone(),
        &namespace,
        "spiderpool-controller",
        &identity,
        lease,
    );
    let mut leading = false;
    loop {
        let now = match elector.try_acquire_or_renew().await {
            Ok(now) => now,
            Err(e) => {
                tracing::warn!(error = %e, "leader election failed");
                false
            }
        };
        if now != leading {
            tracing::info!(identity = %identity, leading = now, "leadership");
        }
        leading = now;
        m.leader.store(i64::from(leading), Relaxed);
        if leading {
            match tokio::time::timeout(elector.remaining(), r.round(&client)).await {
                Ok(Ok(rep)) => {
                    let n = |v: &Vec<String>| u64::try_from(v.len()).unwrap_or(u64::MAX);
                    m.autopool_grown.fetch_add(n(&rep.grown), Relaxed);
                    m.autopool_shrunk.fetch_add(n(&rep.shrunk), Relaxed);
                    m.autopool_reclaimed.fetch_add(n(&rep.reclaimed), Relaxed);
                    if rep != Report::default() {
                        tracing::info!(grown = ?rep.grown, shrunk = ?rep.shrunk, reclaimed = ?rep.reclaimed, "auto-pools reconciled")
                    }
                }
                Ok(Err(e)) => {
                    m.reconcile_failures.fetch_add(1, Relaxed);
                    tracing::warn!(error = %e, "auto-pool reconcile failed; next round")
                }
                Err(_) => {
                    m.reconcile_failures.fetch_add(1, Relaxed);
                    tracing::warn!(
                        "auto-pool reconcile cut at the lease's renew deadline; renewing first"
                    )
                }
            }
        }
        let pause = if leading {
            every.min(elector.renew_deadline() / 3)
        } else {
            every.min(Duration::from_secs(2))
        };
        if !spiderpool_store::task::sleep_or_stop(pause, &mut stop).await {
            return;
        }
    }
}
