//! SpiderSubnet auto-pools: an application whose pods carry `ipam.spidernet.io/subnet` (or
//! `subnets`) gets a SpiderIPPool carved out of that SpiderSubnet for it alone.
//!
//! - **Named** `auto{4|6}-<app>-<nic>-<first 5 chars of the app's uid>`, labelled with the
//!   application (`ipam.spidernet.io/app-{api-group,api-version,kind,namespace,name}`, which are
//!   also its `podAffinity`), the subnet, the NIC and the family; found again by those labels, so a
//!   kept pool (`ipam.spidernet.io/ippool-reclaim: "false"`) goes back to a re-created application
//!   of the same kind, namespace and name.
//! - **Sized** by `ipam.spidernet.io/ippool-ip-number`: `"+N"` = replicas + N, `"N"` = N (default
//!   `+1`).
//! - **Carved** with a compare-and-swap on the subnet's `status.controlledIPPools` (Spiderpool's
//!   JSON: pool -> `{ips, application}`): the lowest addresses no pool of the subnet holds and no
//!   SpiderReservedIP reserves. The subnet's record is written first, then the pool; two
//!   applications never get one address, and a crash between the two writes leaves an entry the
//!   controller's reconcile completes or drops.
//! - **Made at the first ADD** by the agent (no pod waits for a controller), grown by the agent
//!   when a pod finds it too small, grown ahead and shrunk (by free addresses only) and reclaimed
//!   by the controller's reconcile.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use spiderpool_core::range::{IpFamily, IpSet};
use spiderpool_core::select::{ANNO_IPPOOL, ANNO_IPPOOLS, ANNO_SUBNET, ANNO_SUBNETS};
use spiderpool_core::types::{Object, OwnerReference};
use spiderpool_store::k8s::crd::{SpiderIPPool, SpiderReservedIP, SpiderSubnet};

/// Pod-template annotation: the pool's size.
pub const ANNO_IP_NUMBER: &str = "ipam.spidernet.io/ippool-ip-number";
/// Pod-template annotation: whether the pool goes with the application (default `true`).
pub const ANNO_RECLAIM: &str = "ipam.spidernet.io/ippool-reclaim";
/// Pool label: the subnet it was carved from (marks auto-pools).
pub const LABEL_SUBNET: &str = "ipam.spidernet.io/owner-spider-subnet";
/// Pool label: the NIC.
pub const LABEL_NIC: &str = "ipam.spidernet.io/interface";
/// Pool label: the family (`4`/`6`).
pub const LABEL_VERSION: &str = "ipam.spidernet.io/ip-version";
/// Pool label: reclaim with the application.
pub const LABEL_RECLAIM: &str = "ipam.spidernet.io/ippool-reclaim";
/// Pool label: the application's uid.
pub const LABEL_APP_UID: &str = "ipam.spidernet.io/app-uid";
const LABEL_APP_GROUP: &str = "ipam.spidernet.io/app-api-group";
const LABEL_APP_VERSION: &str = "ipam.spidernet.io/app-api-version";
const LABEL_APP_KIND: &str = "ipam.spidernet.io/app-kind";
const LABEL_APP_NS: &str = "ipam.spidernet.io/app-namespace";
const LABEL_APP_NAME: &str = "ipam.spidernet.io/app-name";

/// An application (the owner of pods an auto-pool serves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// API group (`apps`, `batch`).
    pub group: String,
    /// API version (`v1`).
    pub version: String,
    /// Kind (`Deployment`, `StatefulSet`, `DaemonSet`, `ReplicaSet`, `Job`, `CronJob`).
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Pods it wants (replicas; a DaemonSet's desired count; a Job's parallelism).
    pub replicas: i64,
    /// Its pod template's annotations.
    pub annotations: BTreeMap<String, String>,
}

fn label_value(s: &str) -> String {
    let mut v: String = s.chars().take(63).collect();
    while v.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.pop();
    }
    v
}

impl App {
    /// Spiderpool's `application` string: `group_version_Kind_namespace_name`.
    pub fn application(&self) -> String {
        format!(
            "{}_{}_{}_{}_{}",
            self.group, self.version, self.kind, self.namespace, self.name
        )
    }

    /// The labels that identify it (a pool's `podAffinity`; added to its pods' labels when the
    /// agent selects).
    pub fn labels(&self) -> BTreeMap<String, String> {
        [
            (LABEL_APP_GROUP, self.group.as_str()),
            (LABEL_APP_VERSION, self.version.as_str()),
            (LABEL_APP_KIND, self.kind.as_str()),
            (LABEL_APP_NS, self.namespace.as_str()),
            (LABEL_APP_NAME, self.name.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), label_value(v)))
        .collect()
    }
}

/// One pool an application needs: a NIC, a family, the subnet to carve it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// The NIC.
    pub nic: String,
    /// The family.
    pub family: IpFamily,
    /// The SpiderSubnet.
    pub subnet: String,
}

#[derive(serde::Deserialize)]
struct Entry {
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    ipv4: Vec<String>,
    #[serde(default)]
    ipv6: Vec<String>,
}

/// The pools `annotations` ask for (`subnets` wins over `subnet`; the first subnet of each family
/// is used), or `None` when they ask for none.
pub fn wants(annotations: &BTreeMap<String, String>) -> Result<Option<Vec<Want>>, String> {
    let entries: Vec<Entry> = if let Some(v) = annotations.get(ANNO_SUBNETS) {
        serde_json::from_str(v).map_err(|e| format!("{ANNO_SUBNETS}: {e}"))?
    } else if let Some(v) = annotations.get(ANNO_SUBNET) {
        vec![serde_json::from_str(v).map_err(|e| format!("{ANNO_SUBNET}: {e}"))?]
    } else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let nic = e.interface.clone().unwrap_or_else(|| {
            if i == 0 {
                "eth0".into()
            } else {
                format!("net{i}")
            }
        });
        for (family, list) in [(IpFamily::V4, &e.ipv4), (IpFamily::V6, &e.ipv6)] {
            if let Some(subnet) = list.first() {
                out.push(Want {
                    nic: nic.clone(),
                    family,
                    subnet: subnet.clone(),
                });
            }
        }
    }
    if out.is_empty() {
        return Err(format!("{ANNO_SUBNET}: names no subnet"));
    }
    Ok(Some(out))
}

/// The pool size `ippool-ip-number` asks for, given the application's replicas.
pub fn desired(annotations: &BTreeMap<String, String>, replicas: i64) -> Result<u128, String> {
    let v = annotations
        .get(ANNO_IP_NUMBER)
        .map(String::as_str)
        .unwrap_or("+1");
    let bad = || format!("{ANNO_IP_NUMBER}: '{v}' is neither \"+N\" (replicas + N) nor \"N\"");
    let n = if let Some(plus) = v.strip_prefix('+') {
        replicas.max(0) + plus.trim().parse::<i64>().map_err(|_| bad())?
    } else {
        v.trim().parse::<i64>().map_err(|_| bad())?
    };
    u128::try_from(n.max(0)).map_err(|_| bad())
}

/// Whether the pool goes with the application (`ippool-reclaim`, default true).
pub fn reclaim(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(ANNO_RECLAIM)
        .map(|v| v.trim() != "false")
        .unwrap_or(true)
}

/// `auto{4|6}-<app>-<nic>-<first 5 chars of the app's uid>`, lowercased, within 253 characters.
pub fn pool_name(family: IpFamily, app: &App, nic: &str) -> String {
    let uid: String = app
        .uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(5)
        .collect();
    let mut name = app.name.to_ascii_lowercase();
    let fixed = 6 + 1 + nic.len() + 1 + uid.len();
    name.truncate(253usize.saturating_sub(fixed));
    format!(
        "auto{}-{name}-{}-{uid}",
        family.version(),
        nic.to_ascii_lowercase()
    )
}

/// The lowest `need` addresses of `subnet` not in `taken`; `Err` with how many are free.
pub fn carve(subnet: &IpSet, taken: &IpSet, need: u128) -> Result<IpSet, u128> {
    let free = subnet.subtract(taken);
    if free.count() < need {
        return Err(free.count());
    }
    if need == 0 {
        return Ok(IpSet::empty(subnet.family()));
    }
    let last = free.nth(need - 1).ok_or(free.count())?;
    let first = free.nth(0).ok_or(free.count())?;
    let span = spiderpool_core::range::IpRange::from_u128(subnet.family(), first, last)
        .ok_or(free.count())?;
    Ok(free.intersect(&IpSet::from_ranges(subnet.family(), [span])))
}

/// What a pool holding `have` keeps when it should hold `desired`: it gives back its highest
/// free addresses, never one in `allocated`, never below what is allocated.
pub fn shrink(have: &IpSet, allocated: &IpSet, desired: u128) -> IpSet {
    let keep = desired.max(allocated.count());
    if have.count() <= keep {
        return have.clone();
    }
    let mut give = have.count() - keep;
    let free = have.subtract(allocated);
    let mut drop = Vec::new();
    let n = free.count();
    let mut i = n;
    while give > 0 && i > 0 {
        i -= 1;
        if let Some(x) = free.nth(i) {
            drop.push(x);
            give -= 1;
        }
    }
    let gone = IpSet::from_ranges(
        have.family(),
        drop.into_iter()
            .filter_map(|x| spiderpool_core::range::IpRange::from_u128(have.family(), x, x)),
    );
    have.subtract(&gone)
}

/// The pod's annotations with `subnet`/`subnets` replaced by `ippool`/`ippools` naming the
/// application's pools (`pools`: NIC, family, pool), so selection takes them like any other.
pub fn rewrite(
    annotations: &BTreeMap<String, String>,
    pools: &[(String, IpFamily, String)],
) -> BTreeMap<String, String> {
    let mut out = annotations.clone();
    let multi = out.remove(ANNO_SUBNETS).is_some();
    out.remove(ANNO_SUBNET);
    let mut nics: Vec<String> = Vec::new();
    for (nic, _, _) in pools {
        if !nics.contains(nic) {
            nics.push(nic.clone());
        }
    }
    let entry = |nic: &str| {
        let of = |f: IpFamily| -> Vec<&str> {
            pools
                .iter()
                .filter(|(n, fam, _)| n == nic && *fam == f)
                .map(|(_, _, p)| p.as_str())
                .collect()
        };
        json!({"interface": nic, "ipv4": of(IpFamily::V4), "ipv6": of(IpFamily::V6)})
    };
    if multi || nics.len() > 1 {
        out.remove(ANNO_IPPOOL);
        let list: Vec<Value> = nics.iter().map(|n| entry(n)).collect();
        out.insert(ANNO_IPPOOLS.into(), Value::Array(list).to_string());
    } else if let Some(nic) = nics.first() {
        let mut e = entry(nic);
        if let Some(m) = e.as_object_mut() {
            m.remove("interface");
        }
        out.remove(ANNO_IPPOOLS);
        out.insert(ANNO_IPPOOL.into(), e.to_string());
    }
    out
}

fn api_err(what: &str, e: kube::Error) -> String {
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

/// The addresses a pool serves (`ips` minus `excludeIPs`), when its spec parses.
pub fn pool_set(p: &SpiderIPPool) -> Option<IpSet> {
    let family = match p.spec.0.ip_version {
        Some(f) => f,
        None => {
            let a: IpAddr = p.spec.0.subnet.split('/').next()?.parse().ok()?;
            IpFamily::of(&a)
        }
    };
    let ips = IpSet::parse(family, &p.spec.0.ips).ok()?;
    let ex = IpSet::parse(family, &p.spec.0.exclude_ips).ok()?;
    Some(ips.subtract(&ex))
}

/// The auto-pool of `app` for `want`, if there is one (found by labels).
pub async fn find_pool(
    client: &kube::Client,
    app: &App,
    want: &Want,
) -> Result<Option<SpiderIPPool>, String> {
    let api: Api<SpiderIPPool> = Api::all(client.clone());
    let l = app.labels();
    let selector = format!(
        "{LABEL_SUBNET},{LABEL_APP_KIND}={},{LABEL_APP_NS}={},{LABEL_APP_NAME}={},{LABEL_NIC}={},{LABEL_VERSION}={}",
        l[LABEL_APP_KIND], l[LABEL_APP_NS], l[LABEL_APP_NAME], label_value(&want.nic), want.family.version()
    );
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| api_err("listing auto-pools", e))?;
    Ok(list
        .items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none()))
}

/// Subnet `status.controlledIPPools`: pool -> `{ips, application}`.
pub type Controlled = BTreeMap<String, Value>;

fn controlled(s: &SpiderSubnet) -> Controlled {
    s.status
        .as_ref()
        .and_then(|st| st.controlled_ip_pools.as_deref())
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default()
}

/// The addresses of one `controlledIPPools` entry.
pub fn entry_ips(entry: &Value, family: IpFamily) -> Option<IpSet> {
    let ips: Vec<String> = serde_json::from_value(entry["ips"].clone()).ok()?;
    IpSet::parse(family, &ips).ok()
}

/// A subnet's addresses (`ips` minus `excludeIPs`).
pub fn subnet_set(subnet: &SpiderSubnet, family: IpFamily) -> Result<IpSet, String> {
    let name = subnet.metadata.name.as_deref().unwrap_or_default();
    let ips = IpSet::parse(family, &subnet.spec.0.ips)
        .map_err(|e| format!("SpiderSubnet {name}: {e}"))?;
    let ex = IpSet::parse(family, &subnet.spec.0.exclude_ips)
        .map_err(|e| format!("SpiderSubnet {name}: {e}"))?;
    Ok(ips.subtract(&ex))
}

/// A subnet's `allocatedIPCount` (the sum of its controlled pools) and `totalIPCount`.
pub fn subnet_counts(
    subnet: &SpiderSubnet,
    pools: &Controlled,
    family: IpFamily,
) -> (i64, Option<i64>) {
    let allocated: u128 = pools
        .values()
        .filter_map(|v| entry_ips(v, family))
        .map(|s| s.count())
        .sum();
    let total = subnet_set(subnet, family).ok().map(|s| s.count_i64());
    (i64::try_from(allocated).unwrap_or(i64::MAX), total)
}

/// Writes `pools` as the subnet's controlled pools (with the counts), compare-and-swap on
/// `subnet`'s resourceVersion; `Ok(false)` when someone else wrote first.
async fn write_controlled(
    client: &kube::Client,
    subnet: &SpiderSubnet,
    pools: &Controlled,
    family: IpFamily,
) -> Result<bool, String> {
    let name = subnet.metadata.name.clone().unwrap_or_default();
    let (allocated, total) = subnet_counts(subnet, pools, family);
    let patch = json!({
        "metadata": {"resourceVersion": subnet.metadata.resource_version},
        "status": {
            "controlledIPPools": serde_json::to_string(pools).unwrap_or_default(),
            "allocatedIPCount": allocated,
            "totalIPCount": total,
        }
    });
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

/// Sets a pool's `status.totalIPCount` after its addresses changed (agents count allocations;
/// the size changes here). Best effort: the agents' next status write has it too.
pub async fn set_total(client: &kube::Client, pool: &str, ips: &IpSet) {
    let api: Api<SpiderIPPool> = Api::all(client.clone());
    let patch = json!({"status": {"totalIPCount": ips.count_i64()}});
    if let Err(e) = api
        .patch_status(pool, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::debug!(pool, error = %e, "totalIPCount not written");
    }
}

/// Makes sure `app` has its pool for `want` holding at least `desired` addresses (creating it,
/// or growing it from the subnet); returns the pool as the API server has it.
pub async fn ensure_pool(
    client: &kube::Client,
    app: &App,
    want: &Want,
    desired: u128,
    reclaim: bool,
) -> Result<SpiderIPPool, String> {
    let pools: Api<SpiderIPPool> = Api::all(client.clone());
    let subnets: Api<SpiderSubnet> = Api::all(client.clone());
    // One writer per pool in this process (an application's pods ADD together); other
    // processes are met by the compare-and-swaps below.
    let key = format!(
        "{}/{}/{}/{}/{}",
        app.kind,
        app.namespace,
        app.name,
        want.nic,
        want.family.version()
    );
    let lock = {
        type Locks = BTreeMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>;
        static LOCKS: std::sync::OnceLock<std::sync::Mutex<Locks>> = std::sync::OnceLock::new();
        let mut m = LOCKS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if m.len() > 1024 {
            m.retain(|_, l| std::sync::Arc::strong_count(l) > 1);
        }
        m.entry(key).or_default().clone()
    };
    let _guard = lock.lock().await;
    for attempt in 0..20u32 {
        let existing = find_pool(client, app, want).await?;
        let mut have = existing
            .as_ref()
            .and_then(pool_set)
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
        let Some(subnet) = subnets
            .get_opt(&want.subnet)
            .await
            .map_err(|e| api_err(&format!("reading SpiderSubnet {}", want.subnet), e))?
        else {
            return Err(format!(
                "SpiderSubnet {} (named by the pod's {ANNO_SUBNET} annotation) does not exist",
                want.subnet
            ));
        };
        let fam = want.family;
        let whole = subnet_set(&subnet, fam)?;
        // Taken: every pool of the subnet (auto or not), every reserved address, and what the
        // subnet has promised to pools that may not exist yet.
        let mut taken = IpSet::empty(fam);
        for p in pools
            .list(&ListParams::default())
            .await
            .map_err(|e| api_err("listing pools", e))?
            .items
        {
            if p.spec.0.subnet == subnet.spec.0.subnet
                && p.metadata.name.as_deref() != Some(name.as_str())
            {
                if let Some(s) = pool_set(&p) {
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
            if let Ok(s) = IpSet::parse(fam, &r.spec.0.ips) {
                taken = taken.union(&s);
            }
        }
        let mut ctl = controlled(&subnet);
        for (pool, v) in &ctl {
            let Some(s) = entry_ips(v, fam) else {
                continue;
            };
            if *pool == name {
                // Promised to this pool already (by another agent that has not written the
                // pool yet, or before a crash): those addresses are this pool's.
                have = have.union(&s);
            } else {
                taken = taken.union(&s);
            }
        }
        let need = desired.saturating_sub(have.count());
        let extra = carve(&whole.subtract(&have), &taken, need).map_err(|free| {
            format!(
                "SpiderSubnet {} has {free} free addresses; {} {}/{} needs {need} more for NIC {}",
                want.subnet, app.kind, app.namespace, app.name, want.nic
            )
        })?;
        let total = have.union(&extra);
        let entry = json!({"ips": total.to_strings(), "application": app.application()});
        if ctl.get(&name) != Some(&entry) {
            ctl.insert(name.clone(), entry);
            if !write_controlled(client, &subnet, &ctl, fam).await? {
                tokio::time::sleep(std::time::Duration::from_millis(5 * u64::from(attempt + 1)))
                    .await;
                continue; // another application carved meanwhile: look again
            }
        }
        // The subnet promised these addresses to the pool; now the pool itself.
        let mut labels = app.labels();
        labels.insert(LABEL_SUBNET.into(), label_value(&want.subnet));
        labels.insert(LABEL_NIC.into(), label_value(&want.nic));
        labels.insert(LABEL_VERSION.into(), fam.version().to_string());
        labels.insert(LABEL_RECLAIM.into(), reclaim.to_string());
        labels.insert(LABEL_APP_UID.into(), label_value(&app.uid));
        let spec = json!({
            "ipVersion": fam.version(),
            "subnet": subnet.spec.0.subnet,
            "ips": total.to_strings(),
            "podAffinity": {"matchLabels": app.labels()},
        });
        let obj = json!({
            "apiVersion": "spiderpool.spidernet.io/v2beta1",
            "kind": "SpiderIPPool",
            "metadata": {"name": name, "labels": labels},
            "spec": spec,
        });
        let written = match &existing {
            None => {
                let p: SpiderIPPool = serde_json::from_value(obj).map_err(|e| e.to_string())?;
                pools.create(&PostParams::default(), &p).await
            }
            Some(_) => {
                let patch =
                    json!({"metadata": {"labels": labels}, "spec": {"ips": total.to_strings()}});
                pools
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
            }
        };
        let written = match written {
            // Another agent created it meanwhile: look again.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            w => w.map_err(|e| api_err(&format!("writing auto-pool {name}"), e))?,
        };
        set_total(client, &name, &total).await;
        return Ok(written);
    }
    Err(format!(
        "SpiderSubnet {}: too many concurrent changes",
        want.subnet
    ))
}

/// The pools a pod's ADD uses, made or grown now when needed: `Ok(None)` when the pod asks for
/// no auto-pool; `Err` with a clear message for a bare pod or an exhausted subnet. Returns the
/// rewritten annotations, the application's labels (added to the pod's for selection) and the
/// pools written.
pub async fn for_pod(
    client: &kube::Client,
    namespace: &str,
    pod_name: &str,
    annotations: &BTreeMap<String, String>,
    owners: &[OwnerReference],
) -> Result<
    Option<(
        BTreeMap<String, String>,
        BTreeMap<String, String>,
        Vec<Object>,
    )>,
    String,
> {
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
    Ok(Some((rewrite(annotations, &names), app.labels(), objects)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &[&str]) -> IpSet {
        IpSet::parse(IpFamily::V4, s).expect("set")
    }

    fn app() -> App {
        App {
            group: "apps".into(),
            version: "v1".into(),
            kind: "Deployment".into(),
            namespace: "default".into(),
            name: "Web".into(),
            uid: "1b2c3d4e-0000".into(),
            replicas: 3,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn names_sizes_and_annotations() {
        assert_eq!(
            pool_name(IpFamily::V4, &app(), "eth0"),
            "auto4-web-eth0-1b2c3"
        );
        assert_eq!(app().application(), "apps_v1_Deployment_default_Web");
        let a = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(desired(&BTreeMap::new(), 3), Ok(4));
        assert_eq!(desired(&a(ANNO_IP_NUMBER, "+2"), 3), Ok(5));
        assert_eq!(desired(&a(ANNO_IP_NUMBER, "7"), 3), Ok(7));
        assert!(desired(&a(ANNO_IP_NUMBER, "lots"), 3)
            .unwrap_err()
            .contains("lots"));
        assert!(reclaim(&BTreeMap::new()));
        assert!(!reclaim(&a(ANNO_RECLAIM, "false")));
        let w = wants(&a(ANNO_SUBNET, r#"{"ipv4":["subnet-6"],"ipv6":["s6"]}"#))
            .expect("ok")
            .expect("some");
        assert_eq!(w.len(), 2);
        assert_eq!(
            (w[0].nic.as_str(), w[0].subnet.as_str()),
            ("eth0", "subnet-6")
        );
        let multi = wants(&a(
            ANNO_SUBNETS,
            r#"[{"interface":"eth0","ipv4":["a"]},{"interface":"net1","ipv4":["b"]}]"#,
        ))
        .expect("ok")
        .expect("some");
        assert_eq!(multi[1].nic, "net1");
        assert!(wants(&BTreeMap::new()).expect("ok").is_none());
        let r = rewrite(
            &a(ANNO_SUBNET, "{}"),
            &[("eth0".into(), IpFamily::V4, "auto4-web-eth0-1b2c3".into())],
        );
        assert_eq!(
            r[ANNO_IPPOOL],
            r#"{"ipv4":["auto4-web-eth0-1b2c3"],"ipv6":[]}"#
        );
        assert!(!r.contains_key(ANNO_SUBNET));
    }

    #[test]
    fn carving_takes_the_lowest_free_and_shrinking_only_free_ones() {
        let subnet = set(&["10.6.0.1-10.6.0.20"]);
        let taken = set(&["10.6.0.1-10.6.0.3", "10.6.0.6"]);
        assert_eq!(
            carve(&subnet, &taken, 4).expect("fits").to_strings(),
            ["10.6.0.4-10.6.0.5", "10.6.0.7-10.6.0.8"]
        );
        assert_eq!(carve(&subnet, &taken, 17), Err(16));
        let have = set(&["10.6.0.10-10.6.0.19"]);
        let allocated = set(&["10.6.0.12", "10.6.0.18"]);
        // Down to 3: the two allocated stay, plus the lowest free.
        assert_eq!(
            shrink(&have, &allocated, 3).to_strings(),
            ["10.6.0.10", "10.6.0.12", "10.6.0.18"]
        );
        // Never below what is allocated.
        assert_eq!(
            shrink(&have, &allocated, 0).to_strings(),
            ["10.6.0.12", "10.6.0.18"]
        );
        assert_eq!(shrink(&have, &allocated, 20), have);
    }
}
