//! SpiderSubnet auto-pools, the decisions (the Kubernetes reads and writes that apply them are
//! `spiderpool_store::k8s::autopool`): an application whose pods carry `ipam.spidernet.io/subnet` (or
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

use serde::{Deserialize, Serialize};

use crate::range::{IpFamily, IpRange, IpSet};
use crate::select::{
    parse_subnet_annotation, parse_subnets_annotation, PoolsAnnotationEntry, ANNO_SUBNET,
    ANNO_SUBNETS,
};
use crate::selector::LabelSelector;
use crate::types::{IpPoolSpec, ObjectMeta, SpiderIpPool, API_VERSION};

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
/// Pool annotation: the application in full (`group_version_Kind_namespace_name`, Spiderpool's
/// `application` string): labels hold at most 63 characters, names up to 253.
pub const ANNO_APPLICATION: &str = "ipam.spidernet.io/application";
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

/// `s` as a label value: at most 63 characters, ending in a letter or digit.
pub fn label_value(s: &str) -> String {
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

    /// Kind, namespace and name from an [`App::application`] string.
    pub fn parse_application(s: &str) -> Option<(String, String, String)> {
        let parts: Vec<&str> = s.splitn(5, '_').collect();
        match parts.as_slice() {
            [_, _, kind, ns, name] if !kind.is_empty() && !ns.is_empty() && !name.is_empty() => {
                Some((kind.to_string(), ns.to_string(), name.to_string()))
            }
            _ => None,
        }
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

/// The pools `annotations` ask for (`subnets` wins over `subnet`; the first subnet of each family
/// is used), or `None` when they ask for none. Read by the same parsers as selection.
pub fn wants(annotations: &BTreeMap<String, String>) -> Result<Option<Vec<Want>>, String> {
    let entries = if let Some(v) = annotations.get(ANNO_SUBNETS) {
        parse_subnets_annotation(v).map_err(|e| format!("{ANNO_SUBNETS}: {e}"))?
    } else if let Some(v) = annotations.get(ANNO_SUBNET) {
        vec![parse_subnet_annotation(v, "eth0").map_err(|e| format!("{ANNO_SUBNET}: {e}"))?]
    } else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for e in &entries {
        for (family, list) in [(IpFamily::V4, &e.ipv4), (IpFamily::V6, &e.ipv6)] {
            if let Some(subnet) = list.first() {
                out.push(Want {
                    nic: e.interface.clone(),
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

/// Whether two CIDRs name the same network (`10.16.0.1/16` is `10.16.0.0/16`).
pub fn same_network(a: &str, b: &str) -> bool {
    match (a.parse::<ipnet::IpNet>(), b.parse::<ipnet::IpNet>()) {
        (Ok(x), Ok(y)) => x.trunc() == y.trunc(),
        _ => a == b,
    }
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
    let span = IpRange::from_u128(subnet.family(), first, last).ok_or(free.count())?;
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
            .filter_map(|x| IpRange::from_u128(have.family(), x, x)),
    );
    have.subtract(&gone)
}

/// One entry of a subnet's `status.controlledIPPools` (Spiderpool's JSON): the addresses the
/// subnet promised to the pool, and the application it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlledPool {
    /// The addresses, as `ips` entries.
    #[serde(default)]
    pub ips: Vec<String>,
    /// `group_version_Kind_namespace_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<String>,
}

impl ControlledPool {
    /// The addresses, when they parse as `family`.
    pub fn addresses(&self, family: IpFamily) -> Option<IpSet> {
        IpSet::parse(family, &self.ips).ok()
    }
}

/// Subnet `status.controlledIPPools`: pool name -> entry.
pub type Controlled = BTreeMap<String, ControlledPool>;

/// Reads `status.controlledIPPools` (a JSON string); unreadable is empty.
pub fn parse_controlled(json: Option<&str>) -> Controlled {
    json.and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default()
}

/// The addresses of every entry of `ledger`, summed: the subnet's `allocatedIPCount`.
pub fn ledger_count(ledger: &Controlled, family: IpFamily) -> i64 {
    let n: u128 = ledger
        .values()
        .filter_map(|v| v.addresses(family))
        .map(|s| s.count())
        .sum();
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A subnet ledger entry that disagrees with the pools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerProblem {
    /// The subnet.
    pub subnet: String,
    /// The pool its ledger names.
    pub pool: String,
    /// What the ledger promises the pool.
    pub promised: Vec<String>,
    /// What the pool has (`None`: it does not exist).
    pub has: Option<Vec<String>>,
}

impl std::fmt::Display for LedgerProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.has {
            None => write!(
                f,
                "subnet {} promises {:?} to pool {}, which does not exist (the controller's reconcile drops the entry)",
                self.subnet, self.promised, self.pool
            ),
            Some(has) => write!(
                f,
                "subnet {} promises {:?} to pool {}, which has {:?} (the controller's reconcile brings them in line)",
                self.subnet, self.promised, self.pool, has
            ),
        }
    }
}

/// Subnets whose ledger (`controlledIPPools`) names a pool that does not exist, or promises it
/// other addresses than it has (compared as address sets, not strings).
pub fn ledger_problems(
    subnets: &[crate::types::SpiderSubnet],
    pools: &[SpiderIpPool],
) -> Vec<LedgerProblem> {
    let mut out = Vec::new();
    for s in subnets {
        let ledger = parse_controlled(
            s.status
                .as_ref()
                .and_then(|x| x.controlled_ip_pools.as_deref()),
        );
        for (pool, entry) in &ledger {
            let problem = |has| LedgerProblem {
                subnet: s.metadata.name.clone(),
                pool: pool.clone(),
                promised: entry.ips.clone(),
                has,
            };
            let Some(p) = pools.iter().find(|p| &p.metadata.name == pool) else {
                out.push(problem(None));
                continue;
            };
            let fam = p.spec.family();
            let promised = fam.and_then(|f| entry.addresses(f));
            let has = fam.and_then(|f| IpSet::parse(f, &p.spec.ips).ok());
            if promised.is_some() && promised != has {
                out.push(problem(Some(p.spec.ips.clone())));
            }
        }
    }
    out
}

/// What one round of making or growing an auto-pool must find out from the cluster.
#[derive(Debug, Clone)]
pub struct PoolFacts<'a> {
    /// The pool's name (existing, or [`pool_name`]).
    pub name: &'a str,
    /// What the pool holds now (empty when it does not exist).
    pub have: IpSet,
    /// The subnet's addresses.
    pub subnet: IpSet,
    /// Addresses held by the subnet's other pools and by reserved IPs.
    pub taken: IpSet,
    /// The subnet's ledger as read.
    pub ledger: &'a Controlled,
}

/// What to write for an auto-pool: its addresses and, when the ledger must change first, the
/// new ledger (written with a compare-and-swap before the pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPlan {
    /// The pool's addresses.
    pub ips: IpSet,
    /// The subnet's new ledger, when it differs from the one read.
    pub ledger: Option<Controlled>,
}

/// Plans a pool of `app` holding at least `desired` addresses: what the ledger already promised
/// to this pool is its own, other entries are taken, and the rest comes lowest-free from the
/// subnet. `Err` says how many addresses are free.
pub fn plan_pool(facts: &PoolFacts<'_>, app: &App, desired: u128) -> Result<PoolPlan, u128> {
    let family = facts.subnet.family();
    let mut have = facts.have.clone();
    let mut taken = facts.taken.clone();
    for (pool, entry) in facts.ledger {
        let Some(s) = entry.addresses(family) else {
            continue;
        };
        if pool == facts.name {
            // Promised to this pool already (by another agent that has not written the pool
            // yet, or before a crash): those addresses are this pool's.
            have = have.union(&s);
        } else {
            taken = taken.union(&s);
        }
    }
    let need = desired.saturating_sub(have.count());
    let extra = carve(&facts.subnet.subtract(&have), &taken, need)?;
    let ips = have.union(&extra);
    let entry = ControlledPool {
        ips: ips.to_strings(),
        application: Some(app.application()),
    };
    let ledger = (facts.ledger.get(facts.name) != Some(&entry)).then(|| {
        let mut l = facts.ledger.clone();
        l.insert(facts.name.to_string(), entry);
        l
    });
    Ok(PoolPlan { ips, ledger })
}

/// The labels of `app`'s pool for `want`.
pub fn pool_labels(app: &App, want: &Want, reclaim: bool) -> BTreeMap<String, String> {
    let mut labels = app.labels();
    labels.insert(LABEL_SUBNET.into(), label_value(&want.subnet));
    labels.insert(LABEL_NIC.into(), label_value(&want.nic));
    labels.insert(LABEL_VERSION.into(), want.family.version().to_string());
    labels.insert(LABEL_RECLAIM.into(), reclaim.to_string());
    labels.insert(LABEL_APP_UID.into(), label_value(&app.uid));
    labels
}

/// The label selector that finds `app`'s pool for `want`.
pub fn pool_selector(app: &App, want: &Want) -> String {
    let l = app.labels();
    format!(
        "{LABEL_SUBNET},{LABEL_APP_KIND}={},{LABEL_APP_NS}={},{LABEL_APP_NAME}={},{LABEL_NIC}={},{LABEL_VERSION}={}",
        l[LABEL_APP_KIND], l[LABEL_APP_NS], l[LABEL_APP_NAME], label_value(&want.nic), want.family.version()
    )
}

/// The SpiderIPPool to create: `ips` from the plan, `podAffinity` the application's labels.
pub fn pool_object(
    name: &str,
    app: &App,
    want: &Want,
    cidr: &str,
    ips: &IpSet,
    reclaim: bool,
) -> SpiderIpPool {
    SpiderIpPool {
        api_version: API_VERSION.to_string(),
        kind: "SpiderIPPool".to_string(),
        metadata: ObjectMeta {
            name: name.to_string(),
            labels: pool_labels(app, want, reclaim),
            annotations: BTreeMap::from([(ANNO_APPLICATION.to_string(), app.application())]),
            ..Default::default()
        },
        spec: IpPoolSpec {
            ip_version: Some(want.family),
            subnet: cidr.to_string(),
            ips: ips.to_strings(),
            pod_affinity: Some(LabelSelector {
                match_labels: app.labels(),
                ..Default::default()
            }),
            ..Default::default()
        },
        status: None,
    }
}

/// What selection takes for a pod whose application has `pools` (NIC, family, pool name): the
/// pools per NIC, in the order the NICs first appear.
pub fn selection(pools: &[(String, IpFamily, String)]) -> Vec<PoolsAnnotationEntry> {
    let mut out: Vec<PoolsAnnotationEntry> = Vec::new();
    for (nic, family, pool) in pools {
        let i = match out.iter().position(|e| &e.interface == nic) {
            Some(i) => i,
            None => {
                out.push(PoolsAnnotationEntry {
                    interface: nic.clone(),
                    ipv4: Vec::new(),
                    ipv6: Vec::new(),
                    clean_gateway: None,
                });
                out.len() - 1
            }
        };
        match family {
            IpFamily::V4 => out[i].ipv4.push(pool.clone()),
            IpFamily::V6 => out[i].ipv6.push(pool.clone()),
        }
    }
    out
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
        assert_eq!(
            App::parse_application("apps_v1_Deployment_default_Web"),
            Some(("Deployment".into(), "default".into(), "Web".into()))
        );
        assert_eq!(App::parse_application("apps_v1_Deployment"), None);
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
        let sel = selection(&[
            ("eth0".into(), IpFamily::V4, "auto4-web-eth0-1b2c3".into()),
            ("net1".into(), IpFamily::V6, "auto6-web-net1-1b2c3".into()),
            ("eth0".into(), IpFamily::V6, "auto6-web-eth0-1b2c3".into()),
        ]);
        assert_eq!(sel.len(), 2);
        assert_eq!(sel[0].interface, "eth0");
        assert_eq!(sel[0].ipv4, ["auto4-web-eth0-1b2c3"]);
        assert_eq!(sel[0].ipv6, ["auto6-web-eth0-1b2c3"]);
        assert_eq!(sel[1].ipv6, ["auto6-web-net1-1b2c3"]);
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

    #[test]
    fn a_plan_keeps_what_the_ledger_promised_and_takes_the_lowest_free() {
        let subnet = set(&["10.6.0.1-10.6.0.20"]);
        let mut ledger = Controlled::new();
        ledger.insert(
            "other".into(),
            ControlledPool {
                ips: vec!["10.6.0.1-10.6.0.2".into()],
                application: None,
            },
        );
        ledger.insert(
            "mine".into(),
            ControlledPool {
                ips: vec!["10.6.0.5".into()],
                application: Some(app().application()),
            },
        );
        let facts = PoolFacts {
            name: "mine",
            have: IpSet::empty(IpFamily::V4),
            subnet,
            taken: set(&["10.6.0.3"]),
            ledger: &ledger,
        };
        let plan = plan_pool(&facts, &app(), 3).expect("fits");
        assert_eq!(plan.ips.to_strings(), ["10.6.0.4-10.6.0.6"]);
        let new = plan.ledger.expect("the ledger grows first");
        assert_eq!(new["mine"].ips, ["10.6.0.4-10.6.0.6"]);
        assert_eq!(new["other"], ledger["other"]);
        assert_eq!(ledger_count(&new, IpFamily::V4), 5);
        // Already promised and written: nothing to change in the ledger.
        let again = PoolFacts {
            ledger: &new,
            ..facts.clone()
        };
        assert_eq!(plan_pool(&again, &app(), 3).expect("fits").ledger, None);
        assert_eq!(plan_pool(&facts, &app(), 30), Err(16));
    }
}
