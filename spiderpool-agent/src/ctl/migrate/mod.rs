//! `spiderctl migrate from-spiderpool` and `to-spiderpool`: a running Spiderpool's allocations
//! taken over in place (pods keep their addresses), and given back.
//!
//! From Spiderpool, in an order where a kill at any point and a rerun end in the same state:
//! 1. refuse while Spiderpool's agents or controller run, or its pools still change;
//! 2. the backup (see [`backup`]): Spiderpool's objects, CRDs and webhooks, verbatim; a rerun
//!    reads the backup instead of the (by then converted) cluster;
//! 3. Spiderpool's webhook configurations deleted (unserved, they refuse every pool write);
//! 4. our CRDs in place of Spiderpool's (same group, kinds and field names: the objects stay);
//! 5. auto-pools marked as our controller finds them, Spiderpool's finalizer off SpiderEndpoints;
//! 6. the records written to SpiderIPBlocks through the Kubernetes store (create-if-absent and
//!    compare-and-swap, as the agents write: a record already there for the same pod is kept);
//! 7. pool statuses projected; every imported address checked to be held by the same pod.
//!
//! To Spiderpool: pool statuses in Spiderpool's format from the blocks, Spiderpool's CRDs and
//! webhooks from the backup, auto-pool labels back, then the blocks and their CRD removed.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod as KubePod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{json, Value};
use spiderpool_core::migrate::{self, Cluster, Finding, ImportPlan, PodFacts};
use spiderpool_core::store::{Conflict, Filter, Lease, LeaseStore, Outcome, Txn};
use spiderpool_store::k8s::crd::crds;
use spiderpool_store::k8s::{block_of, KubeStore, KubeStoreOptions};

pub mod backup;
pub mod cluster;
mod rollback;

pub use rollback::to_spiderpool;

use backup::Snapshot;
use cluster::{Project, SHARED};

/// How a migration runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Print what would be done; change nothing.
    pub dry_run: bool,
    /// Go on although Spiderpool (or, for the rollback, we) still run or pools still change.
    pub force: bool,
    /// Where the backup ConfigMaps live.
    pub namespace: String,
    /// How long pools must stay unchanged before the import starts.
    pub settle: Duration,
    /// The API server, named in errors.
    pub server: String,
}

/// What a migration did or, with `--dry-run`, would do.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per step.
    pub done: Vec<String>,
    /// Inconsistencies found in the data (the run goes on: each says what it does).
    pub findings: Vec<Finding>,
    /// Records per pool.
    pub per_pool: BTreeMap<String, usize>,
    /// Addresses not imported (held by someone else in the blocks).
    pub refused: Vec<String>,
}

/// A test hook: `SPIDERCTL_MIGRATE_CRASH_AFTER=<step>` ends the process abruptly (as `kill -9`
/// would) right after that step, so the tests can prove that a rerun finishes the work.
fn crash_point(step: &str) {
    if std::env::var("SPIDERCTL_MIGRATE_CRASH_AFTER").is_ok_and(|s| s == step) {
        eprintln!("spiderctl: crash point after {step}");
        std::process::abort();
    }
}

fn parse<T: serde::de::DeserializeOwned>(kind: &str, v: &Value) -> Result<T, String> {
    serde_json::from_value(v.clone()).map_err(|e| {
        format!(
            "{kind} {} does not read as Spiderpool v1.x's {kind}: {e}",
            v["metadata"]["name"].as_str().unwrap_or("?")
        )
    })
}

fn objects<'a>(snap: &'a Snapshot, kind: &str) -> &'a [Value] {
    snap.objects
        .get(kind)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The snapshot as core's input, with the pods as the cluster has them now.
async fn cluster_of(client: &kube::Client, snap: &Snapshot) -> Result<Cluster, String> {
    let mut c = Cluster::default();
    for v in objects(snap, "SpiderIPPool") {
        c.pools.push(parse("SpiderIPPool", v)?);
    }
    for v in objects(snap, "SpiderEndpoint") {
        c.endpoints.push(parse("SpiderEndpoint", v)?);
    }
    for v in objects(snap, "SpiderSubnet") {
        c.subnets.push(parse("SpiderSubnet", v)?);
    }
    for v in objects(snap, "SpiderReservedIP") {
        c.reserved.push(parse("SpiderReservedIP", v)?);
    }
    let pods: Api<KubePod> = Api::all(client.clone());
    let list = pods
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing pods: {e}"))?;
    c.pods = list
        .items
        .into_iter()
        .map(|p| {
            let key = (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            );
            let phase = p.status.as_ref().and_then(|s| s.phase.clone());
            let facts = PodFacts {
                uid: p.metadata.uid.clone().unwrap_or_default(),
                node: p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
                finished: matches!(phase.as_deref(), Some("Succeeded" | "Failed")),
            };
            (key, facts)
        })
        .collect::<HashMap<_, _>>();
    Ok(c)
}

/// Refuses (unless `force`) while `project` runs.
async fn refuse_while_running(
    client: &kube::Client,
    project: Project,
    force: bool,
    report: &mut Report,
) -> Result<(), String> {
    let running = cluster::running(client, project).await?;
    if running.is_empty() {
        return Ok(());
    }
    let who = match project {
        Project::Spiderpool => "Spiderpool's agents or controller still run",
        Project::Ours => "spiderpool-rs's agents or controller still run",
    };
    if force {
        report
            .done
            .push(format!("--force: {who}: {}", running.join("; ")));
        return Ok(());
    }
    Err(format!(
        "{who}, and would change allocations under the migration: {}. Stop them (their CRDs and objects stay), or pass --force",
        running.join("; ")
    ))
}

/// The snapshot: from a complete backup when there is one (a rerun), else read from the
/// cluster once its pools have stopped changing.
async fn snapshot(
    client: &kube::Client,
    opts: &Options,
    report: &mut Report,
) -> Result<(Snapshot, Option<backup::State>), String> {
    if let Some(st) = backup::state(client, &opts.namespace).await? {
        let snap = backup::read(client, &opts.namespace, &st).await?;
        report.done.push(format!(
            "backup found in {}/{} (phase {}): the migration goes on from it",
            opts.namespace,
            backup::STATE,
            st.phase
        ));
        return Ok((snap, Some(st)));
    }
    let changing = cluster::changing_pools(client, opts.settle).await?;
    if !changing.is_empty() && !opts.force {
        return Err(format!(
            "allocations are changing: SpiderIPPool {} changed within {} ms; something still writes them (Spiderpool's agents?). Stop it, or pass --force",
            changing.join(", "),
            opts.settle.as_millis()
        ));
    }
    let snap = Snapshot {
        crds: cluster::read_crds(client).await?,
        objects: cluster::read_objects(client).await?,
        webhooks: cluster::spiderpool_webhooks(client).await?,
    };
    Ok((snap, None))
}

/// `spiderctl migrate from-spiderpool` (see the module docs).
pub async fn from_spiderpool(client: kube::Client, opts: &Options) -> Result<Report, String> {
    let mut report = Report::default();
    refuse_while_running(&client, Project::Spiderpool, opts.force, &mut report).await?;
    let (snap, state) = snapshot(&client, opts, &mut report).await?;
    let cluster = cluster_of(&client, &snap).await?;
    let plan = migrate::plan_import(&cluster, spiderpool_store::task::now_secs());
    for r in &plan.records {
        *report.per_pool.entry(r.pool.clone()).or_insert(0) += 1;
    }
    report.findings = plan.findings.clone();
    if opts.dry_run {
        describe_plan(&snap, &plan, &mut report);
        return Ok(report);
    }
    let mut st = match state {
        Some(st) => st,
        None => {
            let st = backup::write(&client, &opts.namespace, &snap).await?;
            report.done.push(format!(
                "backed up {} objects, {} CRDs and {} webhook configurations in {} ConfigMaps in {}",
                snap.objects.values().map(Vec::len).sum::<usize>(),
                snap.crds.len(),
                snap.webhooks.len(),
                st.chunks,
                opts.namespace
            ));
            st
        }
    };
    crash_point("backup");
    remove_webhooks(&client, &snap, &mut report).await?;
    crash_point("webhooks");
    for crd in crds() {
        cluster::put_crd(&client, &crd).await?;
    }
    report
        .done
        .push("our CRDs replace Spiderpool's (objects kept)".into());
    crash_point("crds");
    mark_objects(&client, &snap, &plan, &mut report).await?;
    crash_point("marks");
    let store = KubeStore::connect(
        client.clone(),
        KubeStoreOptions {
            server: opts.server.clone(),
            status_interval: None,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    import(&store, &plan, &mut report).await?;
    for pool in report.per_pool.keys() {
        store.write_status(pool).await.map_err(|e| e.to_string())?;
    }
    crash_point("import");
    verify(&store, &plan, &mut report).await?;
    st.phase = "migrated".into();
    backup::set_state(&client, &opts.namespace, &st).await?;
    Ok(report)
}

fn describe_plan(snap: &Snapshot, plan: &ImportPlan, report: &mut Report) {
    report.done.push(format!(
        "would back up {} objects, {} CRDs, {} webhook configurations",
        snap.objects.values().map(Vec::len).sum::<usize>(),
        snap.crds.len(),
        snap.webhooks.len()
    ));
    for w in &snap.webhooks {
        report.done.push(format!(
            "would delete Spiderpool's {} {}",
            w["kind"].as_str().unwrap_or_default(),
            w["metadata"]["name"].as_str().unwrap_or_default()
        ));
    }
    report
        .done
        .push(format!("would replace {} CRDs with ours", crds().len()));
    for pool in plan.relabel.keys() {
        report
            .done
            .push(format!("would mark auto-pool {pool} for our controller"));
    }
    report.done.push(format!(
        "would import {} addresses into SpiderIPBlocks",
        plan.records.len()
    ));
}

async fn remove_webhooks(
    client: &kube::Client,
    snap: &Snapshot,
    report: &mut Report,
) -> Result<(), String> {
    for w in &snap.webhooks {
        let kind = w["kind"].as_str().unwrap_or_default();
        let name = w["metadata"]["name"].as_str().unwrap_or_default();
        let Some(api) = cluster::webhook_api(client, kind) else {
            continue;
        };
        if crate::ctl::uninstall::delete(&api, name).await? {
            report.done.push(format!(
                "deleted Spiderpool's {kind} {name} (kept in the backup)"
            ));
        }
    }
    Ok(())
}

/// Auto-pools marked for our controller; Spiderpool's finalizer off the SpiderEndpoints (ours
/// are projections, deleted with their pod: a finalizer nobody removes would keep them).
async fn mark_objects(
    client: &kube::Client,
    snap: &Snapshot,
    plan: &ImportPlan,
    report: &mut Report,
) -> Result<(), String> {
    let pools = cluster::shared_api(client, "SpiderIPPool", "spiderippools");
    for (pool, marks) in &plan.relabel {
        let patch = json!({"metadata": {"labels": marks.labels, "annotations": marks.annotations}});
        match pools
            .patch(pool, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => report
                .done
                .push(format!("marked auto-pool {pool} for our controller")),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(format!("marking auto-pool {pool}: {e}")),
        }
    }
    let mut stripped = 0;
    for v in objects(snap, "SpiderEndpoint") {
        let fins: Vec<&str> = v["metadata"]["finalizers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !fins.contains(&spiderpool_store::k8s::crd::FINALIZER) {
            continue;
        }
        let ns = v["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = v["metadata"]["name"].as_str().unwrap_or_default();
        let (_, plural, _) = SHARED[3];
        let api = crate::ctl::uninstall::api_for(
            client,
            (cluster::GROUP, "v2beta1", "SpiderEndpoint", plural),
            Some(ns),
        );
        let keep: Vec<&str> = fins
            .into_iter()
            .filter(|f| *f != spiderpool_store::k8s::crd::FINALIZER)
            .collect();
        let patch = json!({"metadata": {"finalizers": keep}});
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => stripped += 1,
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(format!("SpiderEndpoint {ns}/{name}: {e}")),
        }
    }
    if stripped > 0 {
        report.done.push(format!(
            "removed Spiderpool's finalizer from {stripped} SpiderEndpoints"
        ));
    }
    Ok(())
}

/// Whether `holder` is the record `want` (the same pod and NIC), whatever its container: written
/// by an earlier run, or taken over by the pod's sandbox since.
fn same_holder(want: &Lease, holder: &Lease) -> bool {
    holder.ip == want.ip
        && holder.owner.pod_namespace == want.owner.pod_namespace
        && holder.owner.pod_name == want.owner.pod_name
        && holder.owner.ifname == want.owner.ifname
        && (want.owner.pod_uid.is_empty() || holder.owner.pod_uid == want.owner.pod_uid)
}

/// Writes the plan's records, one transaction per block, eight blocks at a time.
async fn import(store: &KubeStore, plan: &ImportPlan, report: &mut Report) -> Result<(), String> {
    let mut by_block: BTreeMap<String, Vec<Lease>> = BTreeMap::new();
    for r in &plan.records {
        by_block
            .entry(block_of(r.ip).0)
            .or_default()
            .push(r.clone());
    }
    let groups: Vec<Vec<Lease>> = by_block.into_values().collect();
    let half = groups.len().div_ceil(2);
    let (mut written, mut blocks_done) = (0usize, 0usize);
    for batch in groups.chunks(8) {
        let mut set = tokio::task::JoinSet::new();
        for g in batch {
            let (store, g) = (store.clone(), g.clone());
            set.spawn(async move { import_block(&store, g).await });
        }
        while let Some(r) = set.join_next().await {
            let (n, refused) = r.map_err(|e| e.to_string())??;
            written += n;
            report.refused.extend(refused);
        }
        let before = blocks_done;
        blocks_done += batch.len();
        if before < half && blocks_done >= half {
            crash_point("import-half");
        }
    }
    report.done.push(format!(
        "imported {} addresses ({} written now, the rest there already)",
        plan.records.len() - report.refused.len(),
        written
    ));
    Ok(())
}

/// One block's records: claimed until every one is written, there already, or refused.
async fn import_block(
    store: &KubeStore,
    mut want: Vec<Lease>,
) -> Result<(usize, Vec<String>), String> {
    let mut refused = Vec::new();
    for _ in 0..8 {
        if want.is_empty() {
            return Ok((0, refused));
        }
        let txn = Txn {
            claims: want.clone(),
            releases: Vec::new(),
        };
        match store.commit(txn).await.map_err(|e| e.to_string())? {
            Outcome::Committed { .. } => return Ok((want.len(), refused)),
            Outcome::Conflict(conflicts) => {
                for c in conflicts {
                    let (Conflict::IpTaken(h)
                    | Conflict::AttachmentBound(h)
                    | Conflict::DuplicateInTxn(h)) = &c;
                    let Some(i) = want.iter().position(|w| {
                        w.ip == h.ip
                            || (w.owner.container_id == h.owner.container_id
                                && w.owner.ifname == h.owner.ifname
                                && w.family() == h.family())
                    }) else {
                        continue;
                    };
                    let w = want.remove(i);
                    if !same_holder(&w, h) {
                        refused.push(format!(
                            "{} (pool {}, pod {}/{}): the SpiderIPBlocks hold it for pod {}/{} (container {}): not imported",
                            w.ip, w.pool, w.owner.pod_namespace, w.owner.pod_name,
                            h.owner.pod_namespace, h.owner.pod_name, h.owner.container_id
                        ));
                    }
                }
            }
        }
    }
    Err("the SpiderIPBlocks kept changing under the import; run it again".into())
}

/// Every imported address is held by the same pod, once.
async fn verify(store: &KubeStore, plan: &ImportPlan, report: &mut Report) -> Result<(), String> {
    let listing = store.list(Filter::All).await.map_err(|e| e.to_string())?;
    let held: HashMap<std::net::IpAddr, &Lease> =
        listing.leases.iter().map(|l| (l.ip, l)).collect();
    if held.len() != listing.leases.len() {
        return Err("an address is recorded twice in the SpiderIPBlocks".into());
    }
    let refused: Vec<&str> = report.refused.iter().map(String::as_str).collect();
    let mut wrong = Vec::new();
    for r in &plan.records {
        let ok = held
            .get(&r.ip)
            .is_some_and(|h| same_holder(r, h) && h.pool == r.pool);
        if !ok && !refused.iter().any(|x| x.starts_with(&format!("{} ", r.ip))) {
            wrong.push(r.ip.to_string());
        }
    }
    if !wrong.is_empty() {
        return Err(format!(
            "after the import these addresses are not held by their pod: {}",
            wrong.join(", ")
        ));
    }
    report.done.push(format!(
        "checked: every imported address ({}) is held by the same pod, each once",
        plan.records.len() - report.refused.len()
    ));
    Ok(())
}

/// The report as JSON (`-o json`).
pub fn report_json(r: &Report) -> String {
    serde_json::to_string_pretty(&json!({
        "done": r.done,
        "addressesPerPool": r.per_pool,
        "findings": r.findings,
        "notImported": r.refused,
    }))
    .unwrap_or_default()
}

/// The report as text: steps, addresses per pool, findings.
pub fn report_text(r: &Report, dry_run: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for d in &r.done {
        let _ = writeln!(out, "{d}");
    }
    let total: usize = r.per_pool.values().sum();
    let verb = if dry_run { "to import" } else { "addresses" };
    let _ = writeln!(out, "{total} {verb} in {} pools:", r.per_pool.len());
    for (pool, n) in &r.per_pool {
        let _ = writeln!(out, "  {pool}: {n}");
    }
    if !r.findings.is_empty() {
        let _ = writeln!(out, "{} findings:", r.findings.len());
        for f in &r.findings {
            let _ = writeln!(out, "  [{}] {}", f.kind, f.detail);
        }
    }
    for x in &r.refused {
        let _ = writeln!(out, "NOT IMPORTED: {x}");
    }
    out
}
