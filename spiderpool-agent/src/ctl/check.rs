//! `spiderctl check` (every record against the cluster, read-only) and `spiderctl release`
//! (frees exactly the records named, conditionally).
//!
//! Reads happen in the order that makes a leak certain: the records first (every SpiderIPBlock),
//! then the pools, subnets, SpiderEndpoints and StatefulSets, then the pods, from the API
//! server itself (a LIST without `resourceVersion` is a quorum read). A pod that holds a
//! record was created before the record, so a pod missing from the later read was deleted; a
//! leak reported is one GC would free ([`spiderpool_core::audit`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use spiderpool_core::audit::{self, Counts, Finding, GcTiming, PodState};
use spiderpool_core::store::{Filter, Lease, LeaseStore};
use spiderpool_core::types::{Object, SpiderEndpoint, SpiderIpPool, SpiderSubnet};

/// What `spiderctl check` prints with `-o json` (and `release --from-report` reads).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Where the records were read (`https://...` or the store spec).
    pub source: String,
    /// When, RFC 3339.
    pub read_at: String,
    /// What was read.
    pub checked: Counts,
    /// What was found.
    pub findings: Vec<Finding>,
}

/// The report as a table: one line per finding, then a summary.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    for f in &r.findings {
        let _ = writeln!(out, "{:<26} {}", f.kind.as_str(), f.detail);
    }
    let c = &r.checked;
    let _ = writeln!(
        out,
        "checked {} records, {} pools, {} subnets, {} endpoints, {} pods from {}: {}",
        c.records,
        c.pools,
        c.subnets,
        c.endpoints,
        c.pods,
        r.source,
        if r.findings.is_empty() {
            "no findings".to_string()
        } else {
            format!(
                "{} finding(s), {} releasable (spiderctl release --from-report)",
                r.findings.len(),
                r.findings.iter().filter(|f| f.releasable()).count()
            )
        }
    );
    out
}

fn now() -> u64 {
    spiderpool_store::task::now_secs()
}

/// `spiderctl check --store SPEC --manifests PATH`: records against the pools of the manifests
/// (no pods outside Kubernetes: leaks are CNI GC's to find).
pub fn check_store(spec: &str, manifests: &[std::path::PathBuf]) -> Result<Report, String> {
    let loaded = crate::view::manifest::load(manifests);
    if !loaded.errors.is_empty() {
        return Err(loaded.errors.join("\n"));
    }
    let mut pools = Vec::new();
    let mut subnets = Vec::new();
    for (_, o) in loaded.objects {
        match o {
            Object::IpPool(p) => pools.push(p),
            Object::Subnet(s) => subnets.push(s),
            _ => {}
        }
    }
    let cfg = spiderpool_store::StoreConfig::parse(spec)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let records = rt.block_on(async {
        let store = spiderpool_store::AnyStore::open(&cfg)
            .await
            .map_err(|e| format!("opening {spec}: {e}"))?;
        store
            .list(Filter::All)
            .await
            .map(|l| l.leases)
            .map_err(|e| format!("reading {spec}: {e}"))
    })?;
    let (checked, findings) = audit::audit(&audit::Input {
        records: &records,
        pools: &pools,
        subnets: &subnets,
        endpoints: &[],
        pods: None,
        statefulsets: &HashMap::new(),
        now: now(),
        gc: GcTiming::default(),
    });
    Ok(Report {
        source: spec.to_string(),
        read_at: spiderpool_core::rfc3339::format(now()),
        checked,
        findings,
    })
}

/// One record `release` is asked to free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The address.
    pub ip: IpAddr,
    /// From a report: the record must still be this one (container, interface, pod UID).
    pub expect: Option<(String, String, String)>,
}

/// The releasable findings of a `check -o json` report, as targets.
pub fn targets_from_report(text: &str) -> Result<Vec<Target>, String> {
    let r: Report = serde_json::from_str(text)
        .map_err(|e| format!("not a `spiderctl check -o json` report: {e}"))?;
    Ok(r.findings
        .iter()
        .filter(|f| f.releasable())
        .filter_map(|f| {
            Some(Target {
                ip: f.ip?,
                expect: Some((f.container_id.clone(), f.ifname.clone(), f.pod_uid.clone())),
            })
        })
        .collect())
}

/// What `release` did, one line per address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Released {
    /// Freed.
    pub released: Vec<String>,
    /// Not freed because its pod is alive (without `--force`).
    pub refused: Vec<String>,
    /// Not freed because nothing (or another record) holds it now.
    pub skipped: Vec<String>,
}

#[cfg(feature = "kube")]
pub use kube_mode::{check_kube, release_kube};

#[cfg(feature = "kube")]
mod kube_mode {
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::Pod as KubePod;
    use kube::api::{Api, ListParams};
    use spiderpool_core::lifecycle::{self, PodFacts};
    use spiderpool_core::store::{Outcome, Release, Txn};
    use spiderpool_store::k8s::{KubeStore, KubeStoreOptions};

    use crate::ctl::migrate::cluster::shared_api;

    async fn objects<T: serde::de::DeserializeOwned>(
        client: &kube::Client,
        kind: &str,
        plural: &str,
    ) -> Result<Vec<T>, String> {
        let list = shared_api(client, kind, plural)
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing {kind}s: {e}"))?;
        let mut out = Vec::with_capacity(list.items.len());
        for o in list.items {
            let name = o.metadata.name.clone().unwrap_or_default();
            let v = serde_json::to_value(&o).map_err(|e| e.to_string())?;
            match serde_json::from_value(v) {
                Ok(t) => out.push(t),
                Err(e) => tracing::warn!(%kind, %name, error = %e, "unreadable; left out"),
            }
        }
        Ok(out)
    }

    fn pod_state(p: &KubePod) -> PodState {
        let status = p.status.as_ref();
        PodState {
            uid: p.metadata.uid.clone().unwrap_or_default(),
            mirror_of: p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(lifecycle::ANNO_CONFIG_MIRROR).cloned()),
            phase: status.and_then(|s| s.phase.clone()),
            deletion: p.metadata.deletion_timestamp.as_ref().and_then(|t| {
                let v = serde_json::to_value(t).ok()?;
                spiderpool_core::rfc3339::parse(v.as_str()?)
            }),
            ips: status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.parse().ok())
                .collect(),
            host_network: p
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false),
        }
    }

    async fn pods(client: &kube::Client) -> Result<HashMap<(String, String), PodState>, String> {
        let list = Api::<KubePod>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing pods: {e}"))?;
        Ok(list
            .items
            .iter()
            .map(|p| {
                let key = (
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.metadata.name.clone().unwrap_or_default(),
                );
                (key, pod_state(p))
            })
            .collect())
    }

    async fn statefulsets(
        client: &kube::Client,
    ) -> Result<HashMap<(String, String), (i64, i64)>, String> {
        let list = Api::<StatefulSet>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing StatefulSets: {e}"))?;
        Ok(list
            .items
            .into_iter()
            .map(|s| {
                let spec = s.spec.as_ref();
                let start = spec
                    .and_then(|x| x.ordinals.as_ref())
                    .and_then(|o| o.start)
                    .unwrap_or(0);
                let replicas = spec.and_then(|x| x.replicas).unwrap_or(1);
                (
                    (
                        s.metadata.namespace.unwrap_or_default(),
                        s.metadata.name.unwrap_or_default(),
                    ),
                    (i64::from(start), i64::from(replicas)),
                )
            })
            .collect())
    }

    async fn store(client: &kube::Client, server: &str) -> Result<KubeStore, String> {
        KubeStore::connect(
            client.clone(),
            KubeStoreOptions {
                server: server.to_string(),
                status_interval: None,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("reading the SpiderIPBlocks from {server}: {e}"))
    }

    /// `spiderctl check --kubeconfig PATH`.
    pub async fn check_kube(
        client: kube::Client,
        server: &str,
        gc: GcTiming,
    ) -> Result<Report, String> {
        let read_at = spiderpool_core::rfc3339::format(now());
        let records = store(&client, server)
            .await?
            .list(Filter::All)
            .await
            .map_err(|e| e.to_string())?
            .leases;
        let pools: Vec<SpiderIpPool> = objects(&client, "SpiderIPPool", "spiderippools").await?;
        let subnets: Vec<SpiderSubnet> = objects(&client, "SpiderSubnet", "spidersubnets").await?;
        let endpoints: Vec<SpiderEndpoint> =
            objects(&client, "SpiderEndpoint", "spiderendpoints").await?;
        let sts = statefulsets(&client).await?;
        // Last: the pods (see the module docs).
        let pods = pods(&client).await?;
        let (checked, findings) = audit::audit(&audit::Input {
            records: &records,
            pools: &pools,
            subnets: &subnets,
            endpoints: &endpoints,
            pods: Some(&pods),
            statefulsets: &sts,
            now: now(),
            gc,
        });
        Ok(Report {
            source: server.to_string(),
            read_at,
            checked,
            findings,
        })
    }

    /// Whether the pod of `l` still needs it (read fresh): alive, or a StatefulSet pod whose
    /// ordinal is wanted. `Some(why)` when it does.
    async fn needed(client: &kube::Client, l: &Lease) -> Result<Option<String>, String> {
        if l.owner.pod_namespace.is_empty() {
            return Ok(None);
        }
        let (ns, name) = (&l.owner.pod_namespace, &l.owner.pod_name);
        let pod = Api::<KubePod>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(|e| format!("reading pod {ns}/{name}: {e}"))?;
        let state = pod.as_ref().map(pod_state);
        let facts = state
            .as_ref()
            .map_or(PodFacts::Gone, |s| PodFacts::Present {
                uid: &s.uid,
                mirror_of: s.mirror_of.as_deref(),
                phase: s.phase.as_deref(),
                deletion: s.deletion,
            });
        if lifecycle::judge(l, facts, now(), 0).is_none() {
            return Ok(Some(format!(
                "pod {ns}/{name} (UID {}) is alive and holds it",
                state.map(|s| s.uid).unwrap_or_default()
            )));
        }
        if pod.is_none() {
            if let Some((base, ordinal)) = lifecycle::statefulset_ordinal(name) {
                let sts = Api::<StatefulSet>::namespaced(client.clone(), ns)
                    .get_opt(base)
                    .await
                    .map_err(|e| format!("reading StatefulSet {ns}/{base}: {e}"))?;
                if let Some(spec) = sts.and_then(|s| s.spec) {
                    let start = spec.ordinals.and_then(|o| o.start).unwrap_or(0);
                    let replicas = spec.replicas.unwrap_or(1);
                    if lifecycle::statefulset_wants_ordinal(
                        ordinal,
                        i64::from(start),
                        i64::from(replicas),
                    ) {
                        return Ok(Some(format!(
                            "StatefulSet {ns}/{base} still wants pod {name}: its next pod takes this address back"
                        )));
                    }
                }
            }
        }
        Ok(None)
    }

    /// `spiderctl release --kubeconfig PATH`: frees each target's record, conditionally on
    /// the record still being the one named (and, without `force`, on its pod being done).
    pub async fn release_kube(
        client: kube::Client,
        server: &str,
        targets: &[Target],
        force: bool,
    ) -> Result<Released, String> {
        let store = store(&client, server).await?;
        let records: HashMap<IpAddr, Lease> = store
            .list(Filter::All)
            .await
            .map_err(|e| e.to_string())?
            .leases
            .into_iter()
            .map(|l| (l.ip, l))
            .collect();
        let mut out = Released::default();
        let mut pools = std::collections::BTreeSet::new();
        for t in targets {
            let Some(l) = records.get(&t.ip) else {
                out.skipped
                    .push(format!("{}: not held by any record", t.ip));
                continue;
            };
            if let Some((c, i, u)) = &t.expect {
                if (&l.owner.container_id, &l.owner.ifname, &l.owner.pod_uid) != (c, i, u) {
                    out.skipped.push(format!(
                        "{}: re-allocated since the report (now container {} of pod {}/{}): left alone",
                        t.ip, l.owner.container_id, l.owner.pod_namespace, l.owner.pod_name
                    ));
                    continue;
                }
            }
            if let Some(why) = needed(&client, l).await? {
                if !force {
                    out.refused.push(format!(
                        "{}: {why}; refused (--force frees it anyway, and the address may then be handed out twice)",
                        t.ip
                    ));
                    continue;
                }
            }
            let txn = Txn {
                claims: Vec::new(),
                releases: vec![Release::from(l)],
            };
            match store.commit(txn).await.map_err(|e| e.to_string())? {
                Outcome::Committed { released, .. } if !released.is_empty() => {
                    pools.insert(l.pool.clone());
                    out.released.push(format!(
                        "{}: released (pool {}, was container {} of {})",
                        t.ip,
                        l.pool,
                        l.owner.container_id,
                        if l.owner.pod_namespace.is_empty() {
                            "no pod".to_string()
                        } else {
                            format!("pod {}/{}", l.owner.pod_namespace, l.owner.pod_name)
                        }
                    ));
                }
                _ => out
                    .skipped
                    .push(format!("{}: changed hands meanwhile: left alone", t.ip)),
            }
        }
        for p in pools {
            if let Err(e) = store.write_status(&p).await {
                tracing::warn!(pool = %p, error = %e, "status not updated (the agents update it)");
            }
        }
        Ok(out)
    }
}
