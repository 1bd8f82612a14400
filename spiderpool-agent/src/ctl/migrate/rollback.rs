//! `spiderctl migrate to-spiderpool`: the records written back in Spiderpool's format, so an
//! operator can roll back. Order (each step idempotent, a rerun finishes a killed one): pool
//! statuses from the SpiderIPBlocks (every record: Spiderpool keeps them all in
//! `allocatedIPs`), Spiderpool's CRDs from the backup, auto-pools' `ip-version` back to
//! `IPv4`/`IPv6`, a check that every record is in its pool's status, the blocks and the
//! SpiderIPBlock CRD removed, and last Spiderpool's webhooks from the backup (unserved until its
//! controller starts, they would refuse the writes before them).

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use spiderpool_core::migrate::{
    format_allocated_ips, parse_allocated_ips, spiderpool_version_label,
};
use spiderpool_core::store::{Filter, Lease, LeaseStore};
use spiderpool_store::k8s::crd::{SpiderIPBlock, SpiderIPPool};
use spiderpool_store::k8s::{KubeStore, KubeStoreOptions};

use super::backup::{self, Snapshot};
use super::cluster::{self, Project};
use super::{crash_point, refuse_while_running, Options, Report};

/// `spiderctl migrate to-spiderpool` (see the module docs). `keep_crds`: Spiderpool's CRDs are
/// installed already (no backup to take them from).
pub async fn to_spiderpool(
    client: kube::Client,
    opts: &Options,
    keep_crds: bool,
) -> Result<Report, String> {
    let mut report = Report::default();
    refuse_while_running(&client, Project::Ours, opts.force, &mut report).await?;
    let state = backup::state(&client, &opts.namespace).await?;
    let snap = match &state {
        Some(st) => backup::read(&client, &opts.namespace, st).await?,
        None if keep_crds => Snapshot::default(),
        None => {
            return Err(format!(
                "no migration backup in namespace {} (ConfigMap {}): Spiderpool's CRDs cannot be restored from it. Install them from Spiderpool's chart (kubectl apply -f charts/spiderpool/crds/) and run again with --keep-crds",
                opts.namespace,
                backup::STATE
            ))
        }
    };
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
    let listing = store.list(Filter::All).await.map_err(|e| e.to_string())?;
    let mut by_pool: BTreeMap<String, Vec<Lease>> = BTreeMap::new();
    for l in listing.leases {
        by_pool.entry(l.pool.clone()).or_default().push(l);
    }
    for (pool, recs) in &by_pool {
        report.per_pool.insert(pool.clone(), recs.len());
    }
    if opts.dry_run {
        report.done.push(format!(
            "would write {} records into {} pools' status.allocatedIPs, restore {} CRDs and {} webhook configurations, and delete the SpiderIPBlocks",
            by_pool.values().map(Vec::len).sum::<usize>(),
            by_pool.len(),
            snap.crds.len(),
            snap.webhooks.len()
        ));
        return Ok(report);
    }
    write_statuses(&client, &by_pool, &mut report).await?;
    crash_point("statuses");
    drop(store);
    for v in &snap.crds {
        let crd: CustomResourceDefinition =
            serde_json::from_value(cluster::fresh(v)).map_err(|e| e.to_string())?;
        cluster::put_crd(&client, &crd).await?;
    }
    if !snap.crds.is_empty() {
        report.done.push(format!(
            "restored Spiderpool's {} CRDs from the backup",
            snap.crds.len()
        ));
    }
    crash_point("crds");
    relabel(&client, &mut report).await?;
    check_statuses(&client, &by_pool).await?;
    report.done.push(format!(
        "checked: every record ({}) is in its pool's status.allocatedIPs for the same pod",
        by_pool.values().map(Vec::len).sum::<usize>()
    ));
    remove_blocks(&client, &mut report).await?;
    // Last: unserved until Spiderpool's controller starts, they refuse every pool write.
    restore_webhooks(&client, &snap, &mut report).await?;
    if let Some(mut st) = state {
        st.phase = "rolled-back".into();
        backup::set_state(&client, &opts.namespace, &st).await?;
    }
    Ok(report)
}

/// Every pool's `status.allocatedIPs` and `allocatedIPCount` from the records (none: emptied).
async fn write_statuses(
    client: &kube::Client,
    by_pool: &BTreeMap<String, Vec<Lease>>,
    report: &mut Report,
) -> Result<(), String> {
    let pools: Api<SpiderIPPool> = Api::all(client.clone());
    let list = pools
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing SpiderIPPools: {e}"))?;
    for p in &list.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let recs = by_pool.get(&name).map(Vec::as_slice).unwrap_or_default();
        let ips = (!recs.is_empty()).then(|| format_allocated_ips(recs));
        let patch = json!({"status": {
            "allocatedIPs": ips,
            "allocatedIPCount": recs.len(),
            "allocatedRevision": Value::Null,
        }});
        pools
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| format!("writing SpiderIPPool {name}'s status: {e}"))?;
    }
    for (pool, recs) in by_pool {
        if !list
            .items
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(pool))
        {
            report.refused.push(format!(
                "{} records name pool {pool}, which does not exist: Spiderpool cannot hold them",
                recs.len()
            ));
        }
    }
    report.done.push(format!(
        "wrote {} pools' status.allocatedIPs in Spiderpool's format",
        list.items.len()
    ));
    Ok(())
}

/// Every record is in its pool's status, for the same pod.
async fn check_statuses(
    client: &kube::Client,
    by_pool: &BTreeMap<String, Vec<Lease>>,
) -> Result<(), String> {
    let api = cluster::shared_api(client, "SpiderIPPool", "spiderippools");
    for (pool, recs) in by_pool {
        let Some(p) = api.get_opt(pool).await.map_err(|e| e.to_string())? else {
            continue;
        };
        let v = serde_json::to_value(&p).map_err(|e| e.to_string())?;
        let got = parse_allocated_ips(v["status"]["allocatedIPs"].as_str().unwrap_or_default())?;
        for r in recs {
            let ok = got.get(&r.ip.to_string()).is_some_and(|e| {
                e.pod == format!("{}/{}", r.owner.pod_namespace, r.owner.pod_name)
                    && e.pod_uid == r.owner.pod_uid
            });
            if !ok {
                return Err(format!(
                    "pool {pool}'s status.allocatedIPs does not hold {} for pod {}/{}",
                    r.ip, r.owner.pod_namespace, r.owner.pod_name
                ));
            }
        }
    }
    Ok(())
}

async fn restore_webhooks(
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
        let obj: kube::api::DynamicObject =
            serde_json::from_value(cluster::fresh(w)).map_err(|e| e.to_string())?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => report
                .done
                .push(format!("restored Spiderpool's {kind} {name}")),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(format!("restoring {kind} {name}: {e}")),
        }
    }
    Ok(())
}

/// Auto-pools' `ip-version` label back to Spiderpool's `IPv4`/`IPv6`.
async fn relabel(client: &kube::Client, report: &mut Report) -> Result<(), String> {
    let pools: Api<SpiderIPPool> = Api::all(client.clone());
    let list = pools
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing SpiderIPPools: {e}"))?;
    for p in list.items {
        let labels = p.metadata.labels.clone().unwrap_or_default();
        if let Some(v) = spiderpool_version_label(&labels) {
            let name = p.metadata.name.clone().unwrap_or_default();
            let patch = json!({"metadata": {"labels": {"ipam.spidernet.io/ip-version": v}}});
            pools
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| format!("relabelling {name}: {e}"))?;
            report
                .done
                .push(format!("auto-pool {name}: ip-version {v} again"));
        }
    }
    Ok(())
}

/// The SpiderIPBlocks and their CRD (Spiderpool does not know them).
async fn remove_blocks(client: &kube::Client, report: &mut Report) -> Result<(), String> {
    let blocks: Api<SpiderIPBlock> = Api::all(client.clone());
    match blocks
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(format!("deleting SpiderIPBlocks: {e}")),
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds
        .delete(
            "spideripblocks.spiderpool.spidernet.io",
            &DeleteParams::default(),
        )
        .await
    {
        Ok(_) => report
            .done
            .push("deleted the SpiderIPBlocks and their CRD".into()),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(format!("deleting the SpiderIPBlock CRD: {e}")),
    }
    Ok(())
}
