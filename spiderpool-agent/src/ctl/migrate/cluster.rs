//! What `spiderctl migrate` reads and changes in the cluster besides the records: whether
//! Spiderpool (or we) still run, the objects of the kinds both projects define, the CRDs,
//! Spiderpool's webhook configurations.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use serde_json::Value;

use crate::ctl::uninstall::api_for;

/// The kinds both projects define (ours replace Spiderpool's CRDs of these names):
/// (kind, plural, namespaced).
pub const SHARED: &[(&str, &str, bool)] = &[
    ("SpiderIPPool", "spiderippools", false),
    ("SpiderSubnet", "spidersubnets", false),
    ("SpiderReservedIP", "spiderreservedips", false),
    ("SpiderEndpoint", "spiderendpoints", true),
    ("SpiderCoordinator", "spidercoordinators", false),
];

/// The API group.
pub const GROUP: &str = "spiderpool.spidernet.io";

/// Which project a workload belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Project {
    /// Spiderpool (Go, `ghcr.io/spidernet-io/spiderpool/...` images).
    Spiderpool,
    /// This project (`spiderpool-rs` images).
    Ours,
}

fn project_of(spec: Option<&PodSpec>) -> Option<Project> {
    let images: Vec<&str> = spec
        .into_iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .filter_map(|c| c.image.as_deref())
        .collect();
    if images.iter().any(|i| i.contains("spidernet-io/spiderpool")) {
        Some(Project::Spiderpool)
    } else if images.iter().any(|i| i.contains("spiderpool-rs")) {
        Some(Project::Ours)
    } else {
        None
    }
}

/// The DaemonSets and Deployments of `project` that have ready pods, each as a line saying
/// what it is and how to stop it.
pub async fn running(client: &kube::Client, project: Project) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let ds: Api<DaemonSet> = Api::all(client.clone());
    let list = ds
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing DaemonSets: {e}"))?;
    for d in list.items {
        let spec = d.spec.as_ref().and_then(|s| s.template.spec.as_ref());
        let ready = d.status.as_ref().map(|s| s.number_ready).unwrap_or(0);
        if project_of(spec) == Some(project) && ready > 0 {
            let (ns, name) = (
                d.metadata.namespace.unwrap_or_default(),
                d.metadata.name.unwrap_or_default(),
            );
            out.push(format!(
                "DaemonSet {ns}/{name} has {ready} ready pods (stop it: kubectl -n {ns} delete daemonset {name})"
            ));
        }
    }
    let deps: Api<Deployment> = Api::all(client.clone());
    let list = deps
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing Deployments: {e}"))?;
    for d in list.items {
        let spec = d.spec.as_ref().and_then(|s| s.template.spec.as_ref());
        let ready = d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        if project_of(spec) == Some(project) && ready > 0 {
            let (ns, name) = (
                d.metadata.namespace.unwrap_or_default(),
                d.metadata.name.unwrap_or_default(),
            );
            out.push(format!(
                "Deployment {ns}/{name} has {ready} ready pods (stop it: kubectl -n {ns} scale deployment {name} --replicas=0)"
            ));
        }
    }
    Ok(out)
}

/// The API of one shared kind.
pub fn shared_api(client: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    api_for(client, (GROUP, "v2beta1", kind, plural), None)
}

/// Every object of the shared kinds, as the API server serves them now: kind -> objects.
pub async fn read_objects(client: &kube::Client) -> Result<BTreeMap<String, Vec<Value>>, String> {
    let mut out = BTreeMap::new();
    for (kind, plural, _) in SHARED {
        let api = shared_api(client, kind, plural);
        let items = match api.list(&ListParams::default()).await {
            Ok(l) => l.items,
            // Not installed (an older Spiderpool has no SpiderCoordinator).
            Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
            Err(e) => return Err(format!("listing {kind}s: {e}")),
        };
        let mut values = Vec::with_capacity(items.len());
        for o in items {
            values.push(serde_json::to_value(&o).map_err(|e| e.to_string())?);
        }
        out.insert(kind.to_string(), values);
    }
    Ok(out)
}

/// Each pool's `resourceVersion`, to see whether something still writes them.
pub async fn pool_versions(client: &kube::Client) -> Result<BTreeMap<String, String>, String> {
    let api = shared_api(client, "SpiderIPPool", "spiderippools");
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing SpiderIPPools: {e}"))?;
    Ok(list
        .items
        .into_iter()
        .map(|o| {
            (
                o.metadata.name.unwrap_or_default(),
                o.metadata.resource_version.unwrap_or_default(),
            )
        })
        .collect())
}

/// Whether pools change between two reads `settle` apart: the names of those that did.
pub async fn changing_pools(
    client: &kube::Client,
    settle: Duration,
) -> Result<Vec<String>, String> {
    let before = pool_versions(client).await?;
    tokio::time::sleep(settle).await;
    let after = pool_versions(client).await?;
    let mut changed: Vec<String> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    changed.extend(before.keys().filter(|k| !after.contains_key(*k)).cloned());
    Ok(changed)
}

/// The CRDs of the shared kinds (and SpiderIPBlock) as they are now.
pub async fn read_crds(client: &kube::Client) -> Result<Vec<Value>, String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut out = Vec::new();
    for (_, plural, _) in SHARED {
        let name = format!("{plural}.{GROUP}");
        match api.get_opt(&name).await {
            Ok(Some(c)) => out.push(serde_json::to_value(&c).map_err(|e| e.to_string())?),
            Ok(None) => {}
            Err(e) => return Err(format!("reading CRD {name}: {e}")),
        }
    }
    Ok(out)
}

/// Puts `crd` in place of the CRD of its name (creates it when absent), then waits until the
/// API server serves it.
pub async fn put_crd(client: &kube::Client, crd: &CustomResourceDefinition) -> Result<(), String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().unwrap_or_default();
    let mut want = crd.clone();
    want.metadata.resource_version = None;
    want.metadata.uid = None;
    want.metadata.creation_timestamp = None;
    want.metadata.managed_fields = None;
    want.metadata.generation = None;
    want.status = None;
    for _ in 0..5 {
        let r = match api.get_opt(&name).await {
            Ok(Some(cur)) => {
                if cur.spec == want.spec && cur.metadata.annotations == want.metadata.annotations {
                    break;
                }
                let mut next = want.clone();
                next.metadata.resource_version = cur.metadata.resource_version.clone();
                api.replace(&name, &PostParams::default(), &next)
                    .await
                    .map(|_| ())
            }
            Ok(None) => api.create(&PostParams::default(), &want).await.map(|_| ()),
            Err(e) => return Err(format!("reading CRD {name}: {e}")),
        };
        match r {
            Ok(()) => break,
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(format!("writing CRD {name}: {e}")),
        }
    }
    wait_established(&api, &name).await
}

async fn wait_established(api: &Api<CustomResourceDefinition>, name: &str) -> Result<(), String> {
    for _ in 0..100 {
        let established = api.get_opt(name).await.ok().flatten().is_some_and(|c| {
            c.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("CRD {name} is not established after 10 s"))
}

/// The webhook configuration kinds: (kind, plural).
pub const WEBHOOK_KINDS: &[(&str, &str)] = &[
    (
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
    ),
    (
        "ValidatingWebhookConfiguration",
        "validatingwebhookconfigurations",
    ),
];

/// Our webhooks' names (deploy/kubernetes/controller.yaml): every other webhook on our API group
/// is Spiderpool's.
const OUR_WEBHOOKS: &[&str] = &[
    "mutate.spiderpool.spidernet.io",
    "validate.spiderpool.spidernet.io",
];

/// Spiderpool's webhook configurations (those with a webhook on `spiderpool.spidernet.io` that
/// is not ours): with its controller stopped, their `failurePolicy: Fail` refuses every write of
/// a pool. Each value carries its `kind`.
pub async fn spiderpool_webhooks(client: &kube::Client) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for (kind, plural) in WEBHOOK_KINDS {
        let api = api_for(
            client,
            ("admissionregistration.k8s.io", "v1", kind, plural),
            None,
        );
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing {kind}s: {e}"))?;
        for o in list.items {
            let mut v = serde_json::to_value(&o).map_err(|e| e.to_string())?;
            let hooks = v["webhooks"].as_array().cloned().unwrap_or_default();
            let theirs = hooks.iter().any(|h| {
                let name = h["name"].as_str().unwrap_or_default();
                let on_group = h["rules"].as_array().into_iter().flatten().any(|r| {
                    r["apiGroups"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|g| g.as_str() == Some(GROUP))
                });
                on_group && !OUR_WEBHOOKS.contains(&name)
            });
            if theirs {
                v["kind"] = Value::String(kind.to_string());
                v["apiVersion"] = Value::String("admissionregistration.k8s.io/v1".into());
                out.push(v);
            }
        }
    }
    Ok(out)
}

/// The API of a webhook configuration kind.
pub fn webhook_api(client: &kube::Client, kind: &str) -> Option<Api<DynamicObject>> {
    WEBHOOK_KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(k, p)| api_for(client, ("admissionregistration.k8s.io", "v1", k, p), None))
}

/// `v` without what the API server sets (for creating it again).
pub fn fresh(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "managedFields",
            "generation",
            "selfLink",
        ] {
            m.remove(k);
        }
    }
    v
}
