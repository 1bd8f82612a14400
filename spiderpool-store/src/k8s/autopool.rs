//! SpiderSubnet auto-pools, the Kubernetes side: reading applications, pools, subnets and
//! reserved IPs, and applying what `spiderpool_core::autopool` plans (the subnet's ledger by
//! compare-and-swap first, then the pool). Shared by the agent (pools made at a pod's first
//! ADD) and the controller (the reconcile).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde::Serialize;
use spiderpool_core::autopool::{
    desired, parse_controlled, plan_pool, pool_labels, pool_name, pool_object, pool_selector,
    reclaim, selection, wants, App, Controlled, PoolFacts, Want, ANNO_APPLICATION,
};
use spiderpool_core::range::{IpFamily, IpSet};
use spiderpool_core::select::{PoolsAnnotationEntry, ANNO_IPPOOL, ANNO_SUBNET};
use spiderpool_core::types::{Object, OwnerReference, SubnetStatus};

use super::crd::{SpiderIPPool, SpiderReservedIP, SpiderSubnet};

pub(crate) fn api_err(what: &str, e: kube::Error) -> String {
    format!("{what}: {e}")
}

async fn get_opt<K>(client: &kube::Client, ns: &str, name: &str) -> Result<Option<K>, String>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.get_opt(name)
        .await
        .map_err(|e| api_err(&format!("reading {} {ns}/{name}", K::kind(&())), e))
}

fn template_annotations(
    t: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>,
) -> BTreeMap<String, String> {
    t.and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default()
}

fn controller_of(
    refs: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>,
) -> Option<(String, String)> {
    refs?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.clone(), o.name.clone()))
}

/// The application `kind`/`namespace`/`name`, read now; `None` when it does not exist.
pub async fn fetch_app(
    client: &kube::Client,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<Option<App>, String> {
    let app = |group: &str, kind: &str, uid: Option<String>, replicas: i64, annos| App {
        group: group.into(),
        version: "v1".into(),
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.unwrap_or_default(),
        replicas,
        annotations: annos,
    };
    Ok(match kind {
        "Deployment" => get_opt::<Deployment>(client, namespace, name)
            .await?
            .map(|d| {
                let spec = d.spec.as_ref();
                app(
                    "apps",
                    kind,
                    d.metadata.uid.clone(),
                    i64::from(spec.and_then(|s| s.replicas).unwrap_or(1)),
                    template_annotations(spec.map(|s| &s.template)),
                )
            }),
        "ReplicaSet" => get_opt::<ReplicaSet>(client, namespace, name)
            .await?
            .map(|d| {
                let spec = d.spec.as_ref();
                app(
                    "apps",
                    kind,
                    d.metadata.uid.clone(),
                    i64::from(spec.and_then(|s| s.replicas).unwrap_or(1)),
                    template_annotations(spec.and_then(|s| s.template.as_ref())),
                )
            }),
        "StatefulSet" => get_opt::<StatefulSet>(client, namespace, name)
            .await?
            .map(|d| {
                let spec = d.spec.as_ref();
                app(
                    "apps",
                    kind,
                    d.metadata.uid.clone(),
                    i64::from(spec.and_then(|s| s.replicas).unwrap_or(1)),
                    template_annotations(spec.map(|s| &s.template)),
                )
            }),
        "DaemonSet" => get_opt::<DaemonSet>(client, namespace, name)
            .await?
            .map(|d| {
                let desired = d
                    .status
                    .as_ref()
                    .map(|s| s.desired_number_scheduled)
                    .unwrap_or(0);
                app(
                    "apps",
                    kind,
                    d.metadata.uid.clone(),
                    i64::from(desired.max(1)),
                    template_annotations(d.spec.as_ref().map(|s| &s.template)),
                )
            }),
        "Job" => get_opt::<Job>(client, namespace, name).await?.map(|d| {
            let spec = d.spec.as_ref();
            app(
                "batch",
                kind,
                d.metadata.uid.clone(),
                i64::from(spec.and_then(|s| s.parallelism).unwrap_or(1)),
                template_annotations(spec.map(|s| &s.template)),
            )
        }),
        "CronJob" => get_opt::<CronJob>(client, namespace, name).await?.map(|d| {
            let spec = d.spec.as_ref().map(|s| &s.job_template);
            let job = spec.and_then(|j| j.spec.as_ref());
            app(
                "batch",
                kind,
                d.metadata.uid.clone(),
                i64::from(job.and_then(|s| s.parallelism).unwrap_or(1)),
                template_annotations(job.map(|s| &s.template)),
            )
        }),
        _ => None,
    })
}

/// The application a pod belongs to (a ReplicaSet's Deployment, a Job's CronJob); `Ok(None)`
/// for a pod without a controller.
pub async fn app_of_pod(
    client: &kube::Client,
    namespace: &str,
    owners: &[OwnerReference],
) -> Result<Option<App>, String> {
    let Some(o) = owners.iter().find(|o| o.controller == Some(true)) else {
        return Ok(None);
    };
    let (mut kind, mut name) = (o.kind.clone(), o.name.clone());
    match kind.as_str() {
        "ReplicaSet" => {
            if let Some(rs) = get_opt::<ReplicaSet>(client, namespace, &name).await? {
                if let Some((k, n)) = controller_of(rs.metadata.owner_references.as_ref()) {
                    if k == "Deployment" {
                        (kind, name) = (k, n);
                    }
                }
            }
        }
        "Job" => {
            if let Some(job) = get_opt::<Job>(client, namespace, &name).await? {
                if let Some((k, n)) = controller_of(job.metadata.owner_references.as_ref()) {
                    if k == "CronJob" {
                        (kind, name) = (k, n);
                    }
                }
            }
        }
        _ => {}
    }
    fetch_app(client, &kind, namespace, &name).await
}

/// The auto-pool of `app` for `want`, if there is one (found by labels).
pub async fn find_pool(
    client: &kube::Client,
    app: &App,
    want: &Want,
) -> Result<Option<SpiderIPPool>, String> {
    let api: Api<SpiderIPPool> = Api::all(client.clone());
    let selector = pool_selector(app, want);
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| api_err("listing auto-pools", e))?;
    Ok(list
        .items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none()))
}

/// A subnet's ledger (`status.controlledIPPools`).
pub fn ledger(s: &SpiderSubnet) -> Controlled {
    parse_controlled(
        s.status
            .as_ref()
            .and_then(|st| st.controlled_ip_pools.as_deref()),
    )
}

/// A subnet's family: `ipVersion`, else its CIDR's (IPv4 when unreadable).
pub fn subnet_family(s: &SpiderSubnet) -> IpFamily {
    s.spec.0.family().unwrap_or(IpFamily::V4)
}

/// A merge patch of an object's status, conditional on the resourceVersion read.
#[derive(Debug, Serialize)]
struct StatusPatch<'a, S> {
    metadata: VersionOnly<'a>,
    status: S,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct VersionOnly<'a> {
    resource_version: Option<&'a str>,
}

/// Writes `ledger` as the subnet's controlled pools, with the counts (`allocatedIPCount` the sum
/// of the entries, `totalIPCount` the subnet's addresses), compare-and-swap on the subnet's
/// resourceVersion; `Ok(false)` when someone else wrote first. The one writer of a subnet's
/// status, for the agent and the controller.
pub async fn write_ledger(
    client: &kube::Client,
    subnet: &SpiderSubnet,
    ledger: &Controlled,
) -> Result<bool, String> {
    let name = subnet.metadata.name.clone().unwrap_or_default();
    let family = subnet_family(subnet);
    let patch = StatusPatch {
        metadata: VersionOnly {
            resource_version: subnet.metadata.resource_version.as_deref(),
        },
        status: SubnetStatus {
            controlled_ip_pools: Some(serde_json::to_string(ledger).unwrap_or_default()),
            allocated_ip_count: Some(spiderpool_core::autopool::ledger_count(ledger, family)),
            total_ip_count: Some(
                subnet
                    .spec
                    .0
                    .addresses()
                    .map(|s| s.count_i64())
                    .unwrap_or(0),
            ),
            // The controller's; a merge patch leaves them as they are.
            conditions: Vec::new(),
        },
    };
    let api: Api<SpiderSubnet> = Api::all(client.clone());
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(api_err(
            &format!("writing the status of SpiderSubnet {name}"),
            e,
        )),
    }
}

#[derive(Debug, Serialize)]
struct TotalOnly {
    #[serde(rename = "totalIPCount")]
    total_ip_count: i64,
}

/// Sets a pool's `status.totalIPCount` after its addresses changed (agents count allocations;
/// the size changes here). Best effort: the agents' next status write has it too.
pub async fn set_total(client: &kube::Client, pool: &str, ips: &IpSet) {
    let api: Api<SpiderIPPool> = Api::all(client.clone());
    #[derive(Debug, Serialize)]
    struct P {
        status: TotalOnly,
    }
    let patch = P {
        status: TotalOnly {
            total_ip_count: ips.count_i64(),
        },
    };
    if let Err(e) = api
        .patch_status(pool, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::debug!(pool, error = %e, "totalIPCount not written");
    }
}

/// One writer per pool in this process (an application's pods ADD together); other processes
/// are met by the compare-and-swaps.
fn pool_lock(app: &App, want: &Want) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    type Locks = BTreeMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>;
    static LOCKS: std::sync::OnceLock<std::sync::Mutex<Locks>> = std::sync::OnceLock::new();
    let key = format!(
        "{}/{}/{}/{}/{}",
        app.kind,
        app.namespace,
        app.name,
        want.nic,
        want.family.version()
    );
    let mut m = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if m.len() > 1024 {
        m.retain(|_, l| std::sync::Arc::strong_count(l) > 1);
    }
    m.entry(key).or_default().clone()
}

/// Addresses the subnet's pools other than `name` hold, and every reserved address.
async fn taken(
    client: &kube::Client,
    subnet: &SpiderSubnet,
    name: &str,
    family: IpFamily,
) -> Result<IpSet, String> {
    let pools: Api<SpiderIPPool> = Api::all(client.clone());
    let mut taken = IpSet::empty(family);
    for p in pools
        .list(&ListParams::default())
        .await
        .map_err(|e| api_err("listing pools", e))?
        .items
    {
        // Compared as networks, not strings: a manual pool may write `10.16.0.1/16`.
        if spiderpool_core::autopool::same_network(&p.spec.0.subnet, &subnet.spec.0.subnet)
            && p.metadata.name.as_deref() != Some(name)
        {
            if let Some(s) = p.spec.0.addresses() {
                taken = taken.union(&s);
            }
        }
    }
    let reserved: Api<SpiderReservedIP> = Api::all(client.clone());
    for r in reserved
        .list(&ListParams::default())
        .await
        .map_err(|e| api_err("listing reserved IPs", e))?
        .items
    {
        if let Ok(s) = IpSet::parse(family, &r.spec.0.ips) {
            taken = taken.union(&s);
        }
    }
    Ok(taken)
}

#[derive(Debug, Serialize)]
struct GrowPatch<'a> {
    metadata: GrowMeta<'a>,
    spec: GrowSpec,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GrowMeta<'a> {
    labels: &'a BTreeMap<String, String>,
    annotations: BTreeMap<&'static str, String>,
    /// Compare-and-swap: the pool as read when the growth was planned.
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_version: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct GrowSpec {
    ips: Vec<String>,
}

/// Makes sure `app` has its pool for `want` holding at least `desired` addresses (creating it,
/// or growing it from the subnet); returns the pool as the API server has it. Each attempt reads
/// the cluster, plans ([`plan_pool`]) and applies: the subnet's ledger first (compare-and-swap),
/// then the pool.
pub async fn ensure_pool(
    client: &kube::Client,
    app: &App,
    want: &Want,
    desired: u128,
    reclaim: bool,
) -> Result<SpiderIPPool, String> {
    let lock = pool_lock(app, want);
    let _guard = lock.lock().await;
    for attempt in 0..20u32 {
        let existing = find_pool(client, app, want).await?;
        let have = existing
            .as_ref()
            .and_then(|p| p.spec.0.addresses())
            .unwrap_or_else(|| IpSet::empty(want.family));
        if let Some(p) = &existing {
            if have.count() >= desired {
                return Ok(p.clone());
            }
        }
        let name = existing
            .as_ref()
            .and_then(|p| p.metadata.name.clone())
            .unwrap_or_else(|| pool_name(want.family, app, &want.nic));
        let subnet = read_subnet(client, &want.subnet).await?;
        let ledger = ledger(&subnet);
        let facts = PoolFacts {
            name: &name,
            have,
            subnet: subnet
                .spec
                .0
                .addresses()
                .ok_or_else(|| format!("SpiderSubnet {}: unreadable ips", want.subnet))?,
            taken: taken(client, &subnet, &name, want.family).await?,
            ledger: &ledger,
        };
        let plan = plan_pool(&facts, app, desired).map_err(|free| {
            format!(
                "SpiderSubnet {} has {free} free addresses; {} {}/{} needs {} more for NIC {}",
                want.subnet,
                app.kind,
                app.namespace,
                app.name,
                desired.saturating_sub(facts.have.count()),
                want.nic
            )
        })?;
        if let Some(next) = &plan.ledger {
            if !write_ledger(client, &subnet, next).await? {
                tokio::time::sleep(std::time::Duration::from_millis(5 * u64::from(attempt + 1)))
                    .await;
                continue; // another application carved meanwhile: look again
            }
        }
        // The subnet promised these addresses to the pool; now the pool itself.
        match write_pool(
            client,
            existing.as_ref(),
            &name,
            app,
            want,
            &subnet,
            &plan.ips,
            reclaim,
        )
        .await?
        {
            Some(written) => {
                set_total(client, &name, &plan.ips).await;
                return Ok(written);
            }
            None => continue, // another agent created it meanwhile: look again
        }
    }
    Err(format!(
        "SpiderSubnet {}: too many concurrent changes",
        want.subnet
    ))
}

async fn read_subnet(client: &kube::Client, name: &str) -> Result<SpiderSubnet, String> {
    let subnets: Api<SpiderSubnet> = Api::all(client.clone());
    subnets
        .get_opt(name)
        .await
        .map_err(|e| api_err(&format!("reading SpiderSubnet {name}"), e))?
        .ok_or_else(|| {
            format!(
                "SpiderSubnet {name} (named by the pod's {ANNO_SUBNET} annotation) does not exist"
            )
        })
}

/// Creates the pool or grows it to `ips` (compare-and-swap on the pool as read); `Ok(None)` when
/// another writer created or changed it first.
#[allow(clippy::too_many_arguments)]
async fn write_pool(
    client: &kube::Client,
    existing: Option<&SpiderIPPool>,
    name: &str,
    app: &App,
    want: &Want,
    subnet: &SpiderSubnet,
    ips: &IpSet,
    reclaim: bool,
) -> Result<Option<SpiderIPPool>, String> {
    let pools: Api<SpiderIPPool> = Api::all(client.clone());
    let written = match existing {
        None => {
            let obj = pool_object(name, app, want, &subnet.spec.0.subnet, ips, reclaim);
            let p: SpiderIPPool = serde_json::to_value(&obj)
                .and_then(serde_json::from_value)
                .map_err(|e| e.to_string())?;
            pools.create(&PostParams::default(), &p).await
        }
        Some(current) => {
            let labels = pool_labels(app, want, reclaim);
            let patch = GrowPatch {
                metadata: GrowMeta {
                    labels: &labels,
                    annotations: BTreeMap::from([(ANNO_APPLICATION, app.application())]),
                    resource_version: current.metadata.resource_version.as_deref(),
                },
                spec: GrowSpec {
                    ips: ips.to_strings(),
                },
            };
            pools
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        }
    };
    match written {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        w => w
            .map(Some)
            .map_err(|e| api_err(&format!("writing auto-pool {name}"), e)),
    }
}

/// What a pod's ADD selects from when it asks for auto-pools.
#[derive(Debug, Clone)]
pub struct PodPools {
    /// The application's pools by NIC (selection takes them for the `subnet(s)` annotation).
    pub selection: Vec<PoolsAnnotationEntry>,
    /// The application's labels, added to the pod's (the pools' `podAffinity`).
    pub labels: BTreeMap<String, String>,
    /// The pools as written (so the view has them before its watch does).
    pub objects: Vec<Object>,
}

/// The pools a pod's ADD uses, made or grown now when needed: `Ok(None)` when the pod asks for
/// no auto-pool; `Err` with a clear message for a bare pod or an exhausted subnet.
pub async fn for_pod(
    client: &kube::Client,
    namespace: &str,
    pod_name: &str,
    annotations: &BTreeMap<String, String>,
    owners: &[OwnerReference],
) -> Result<Option<PodPools>, String> {
    let Some(want) = wants(annotations)? else {
        return Ok(None);
    };
    let Some(app) = app_of_pod(client, namespace, owners).await? else {
        return Err(format!(
            "pod {namespace}/{pod_name} asks for an auto-pool ({ANNO_SUBNET}) but has no controller: auto-pools belong to applications (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob); give a bare pod {ANNO_IPPOOL} instead"
        ));
    };
    // The application's template says how big; the pod's own annotations say which subnets.
    let size =
        desired(&app.annotations, app.replicas).or_else(|_| desired(annotations, app.replicas))?;
    let keep = !reclaim(&app.annotations) || !reclaim(annotations);
    let mut names = Vec::new();
    let mut objects = Vec::new();
    for w in &want {
        let p = ensure_pool(client, &app, w, size, !keep).await?;
        names.push((
            w.nic.clone(),
            w.family,
            p.metadata.name.clone().unwrap_or_default(),
        ));
        if let Ok(o) = serde_json::to_value(&p)
            .map_err(|e| e.to_string())
            .and_then(|v| Object::from_value(v).map_err(|e| e.to_string()))
        {
            objects.push(o);
        }
    }
    Ok(Some(PodPools {
        selection: selection(&names),
        labels: app.labels(),
        objects,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_use_spiderpools_field_names() {
        let p = serde_json::to_value(TotalOnly { total_ip_count: 3 }).expect("json");
        assert_eq!(p, serde_json::json!({"totalIPCount": 3}));
        let v = serde_json::to_value(VersionOnly {
            resource_version: Some("7"),
        })
        .expect("json");
        assert_eq!(v, serde_json::json!({"resourceVersion": "7"}));
    }
}
