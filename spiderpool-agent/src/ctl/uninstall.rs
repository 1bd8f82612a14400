//! `spiderctl uninstall`: the way off a cluster, in the order that never blocks on itself. With
//! `failurePolicy: Fail` webhooks and our finalizers, deleting the controller first would leave
//! every pool write (and the CRDs' deletion) waiting for a webhook nobody serves:
//! 1. the webhook configurations;
//! 2. the agents and the controller, and everything else the manifests install by name
//!    (RBAC, Service, Secret, Lease, PodDisruptionBudget);
//! 3. our finalizer on every pool that holds no address (a pool still holding one keeps it unless
//!    `--force`, and is named in the report with how many);
//! 4. with `--delete-crds` (and nothing refused, or `--force`), the CRDs, which deletes every
//!    object of their kinds.

use std::collections::BTreeMap;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use spiderpool_store::k8s::crd::{crds, SpiderIPBlock, SpiderIPPool, FINALIZER};

/// What was done and what was refused.
#[derive(Debug, Default)]
pub struct UninstallReport {
    /// One line per step taken.
    pub done: Vec<String>,
    /// Pools whose finalizer stays: (pool, addresses it holds).
    pub refused: Vec<(String, usize)>,
}

/// One object the manifests install: (group, version, kind, plural, namespace, name).
type Installed = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
);

/// The objects our manifests install by name (the test checks nothing of the base is left).
const INSTALLED: &[Installed] = &[
    (
        "admissionregistration.k8s.io",
        "v1",
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
        None,
        "spiderpool-controller",
    ),
    (
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingWebhookConfiguration",
        "validatingwebhookconfigurations",
        None,
        "spiderpool-controller",
    ),
    (
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        Some("kube-system"),
        "spiderpool-agent",
    ),
    (
        "apps",
        "v1",
        "Deployment",
        "deployments",
        Some("kube-system"),
        "spiderpool-controller",
    ),
    (
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        Some("kube-system"),
        "spiderpool-controller",
    ),
    (
        "",
        "v1",
        "Service",
        "services",
        Some("kube-system"),
        "spiderpool-controller",
    ),
    (
        "",
        "v1",
        "Secret",
        "secrets",
        Some("kube-system"),
        "spiderpool-controller-webhook",
    ),
    (
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        Some("kube-system"),
        "spiderpool-controller",
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        Some("kube-system"),
        "spiderpool-controller",
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        Some("default"),
        "spiderpool-controller-events",
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        Some("default"),
        "spiderpool-controller-events",
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        Some("kube-system"),
        "spiderpool-controller",
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        None,
        "spiderpool-controller",
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        None,
        "spiderpool-controller",
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        None,
        "spiderpool-agent",
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        None,
        "spiderpool-agent",
    ),
    (
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        Some("kube-system"),
        "spiderpool-controller",
    ),
    (
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        Some("kube-system"),
        "spiderpool-agent",
    ),
];

pub(crate) fn api_for(
    client: &kube::Client,
    gvk: (&str, &str, &str, &str),
    ns: Option<&str>,
) -> Api<DynamicObject> {
    let (group, version, kind, plural) = gvk;
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    match ns {
        Some(n) => Api::namespaced_with(client.clone(), n, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

/// Deletes one object; gone already is fine.
pub(crate) async fn delete(api: &Api<DynamicObject>, name: &str) -> Result<bool, String> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(format!("deleting {name}: {e}")),
    }
}

/// Addresses held per pool, from the SpiderIPBlocks; `None` when a block holds a record that
/// cannot be read (its pool is unknown: every pool counts as holding).
async fn held_per_pool(client: &kube::Client) -> Result<Option<BTreeMap<String, usize>>, String> {
    let blocks: Api<SpiderIPBlock> = Api::all(client.clone());
    let list = match blocks.list(&ListParams::default()).await {
        Ok(l) => l,
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Some(BTreeMap::new())),
        Err(e) => return Err(format!("listing SpiderIPBlocks: {e}")),
    };
    let mut held = BTreeMap::new();
    for b in list.items {
        for slot in b.spec.allocations.values() {
            match slot.record() {
                Some(r) => *held.entry(r.pool.clone()).or_insert(0) += 1,
                None => return Ok(None),
            }
        }
    }
    Ok(Some(held))
}

/// Removes our finalizer from the pools that hold nothing (all of them with `force`).
async fn release_finalizers(
    client: &kube::Client,
    force: bool,
    report: &mut UninstallReport,
) -> Result<(), String> {
    let held = held_per_pool(client).await?;
    let pools: Api<SpiderIPPool> = Api::all(client.clone());
    let list = match pools.list(&ListParams::default()).await {
        Ok(l) => l,
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(format!("listing SpiderIPPools: {e}")),
    };
    for p in list.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let fins = p.metadata.finalizers.clone().unwrap_or_default();
        if !fins.iter().any(|f| f == FINALIZER) {
            continue;
        }
        let holding = match &held {
            Some(h) => h.get(&name).copied().unwrap_or(0),
            None => usize::MAX,
        };
        if holding > 0 && !force {
            report.refused.push((name, holding));
            continue;
        }
        let keep: Vec<String> = fins.into_iter().filter(|f| f != FINALIZER).collect();
        let patch = serde_json::json!({"metadata": {
            "finalizers": keep,
            "resourceVersion": p.metadata.resource_version,
        }});
        pools
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| format!("removing the finalizer of SpiderIPPool {name}: {e}"))?;
        report
            .done
            .push(format!("finalizer removed: SpiderIPPool {name}"));
    }
    Ok(())
}

/// Runs the uninstall (see the module's steps).
pub async fn uninstall(
    client: kube::Client,
    delete_crds: bool,
    force: bool,
) -> Result<UninstallReport, String> {
    let mut report = UninstallReport::default();
    for (group, version, kind, plural, ns, name) in INSTALLED {
        let api = api_for(&client, (group, version, kind, plural), *ns);
        if delete(&api, name).await? {
            report.done.push(format!("deleted {kind} {name}"));
        }
    }
    release_finalizers(&client, force, &mut report).await?;
    if delete_crds {
        if !report.refused.is_empty() && !force {
            report.done.push(
                "CRDs kept: pools still hold addresses (--force deletes them, and every record)"
                    .into(),
            );
            return Ok(report);
        }
        let api = api_for(
            &client,
            (
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
                "customresourcedefinitions",
            ),
            None,
        );
        for crd in crds() {
            let name = crd.metadata.name.unwrap_or_default();
            if delete(&api, &name).await? {
                report
                    .done
                    .push(format!("deleted CustomResourceDefinition {name}"));
            }
        }
    }
    Ok(report)
}
