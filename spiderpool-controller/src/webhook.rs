//! The webhook server: `POST /mutate` and `POST /validate` take `admission.k8s.io/v1`
//! AdmissionReviews, over TLS with the controller's own certificate (renewed in place, without a
//! restart), and the webhook configurations that point the API server at it.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{json, Value};
use spiderpool_core::range::{IpFamily, IpSet};
use spiderpool_core::types::Object;
use spiderpool_store::k8s::crd::{SpiderIPBlock, SpiderIPPool, SpiderReservedIP, SpiderSubnet};

use super::admission;
use super::tls::{self, Certs};

/// The name of both webhook configurations.
pub const CONFIG_NAME: &str = "spiderpool-controller";

/// Where the API server reaches the webhook.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// By URL (`--webhook-addr`: the controller outside the cluster, tests).
    Url(String),
    /// By Service (in a cluster): namespace, name, port.
    Service(String, String, u16),
}

fn client_config(ep: &Endpoint, path: &str, ca: &str) -> Value {
    let ca = spiderpool_store::base64(ca.as_bytes());
    match ep {
        Endpoint::Url(u) => json!({"url": format!("{u}{path}"), "caBundle": ca}),
        Endpoint::Service(ns, name, port) => json!({
            "service": {"namespace": ns, "name": name, "port": port, "path": path},
            "caBundle": ca
        }),
    }
}

fn webhook(name: &str, ep: &Endpoint, path: &str, ca: &str) -> Value {
    json!({
        "name": name,
        "clientConfig": client_config(ep, path, ca),
        "rules": [{
            "apiGroups": ["spiderpool.spidernet.io"],
            "apiVersions": ["v2beta1"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["spiderippools", "spidersubnets", "spiderreservedips"],
            "scope": "Cluster"
        }],
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "failurePolicy": "Fail",
        "timeoutSeconds": 5
    })
}

/// Creates or updates the mutating and validating webhook configurations (server-side apply),
/// with `ca` as their `caBundle`.
pub async fn register(client: &kube::Client, ep: &Endpoint, ca: &str) -> Result<(), String> {
    let pp = PatchParams::apply("spiderpool-controller").force();
    let m = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIG_NAME},
        "webhooks": [webhook("mutate.spiderpool.spidernet.io", ep, "/mutate", ca)]
    });
    let v = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": CONFIG_NAME},
        "webhooks": [webhook("validate.spiderpool.spidernet.io", ep, "/validate", ca)]
    });
    let mapi: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    mapi.patch(CONFIG_NAME, &pp, &Patch::Apply(&m))
        .await
        .map_err(|e| format!("registering the mutating webhook: {e}"))?;
    let vapi: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    vapi.patch(CONFIG_NAME, &pp, &Patch::Apply(&v))
        .await
        .map_err(|e| format!("registering the validating webhook: {e}"))?;
    Ok(())
}

fn answer(
    uid: &Value,
    allowed: bool,
    message: Option<String>,
    patch: Option<Vec<Value>>,
) -> Json<Value> {
    let mut response = json!({"uid": uid, "allowed": allowed});
    if let Some(m) = message {
        response["status"] = json!({"code": 422, "reason": "Invalid", "message": m});
    }
    if let Some(p) = patch.filter(|p| !p.is_empty()) {
        let bytes = serde_json::to_vec(&p).unwrap_or_default();
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(spiderpool_store::base64(&bytes));
    }
    Json(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response
    }))
}

async fn mutate(Json(review): Json<Value>) -> Json<Value> {
    let req = &review["request"];
    let kind = req["kind"]["kind"].as_str().unwrap_or_default();
    let ops = admission::mutate(kind, &req["object"]);
    answer(&req["uid"], true, None, Some(ops))
}

/// The cluster's pools, subnets and reserved IPs, as core objects, without `skip` (kind, name).
async fn cluster(client: &kube::Client, skip: (&str, &str)) -> Result<Vec<Object>, String> {
    async fn all<K>(client: &kube::Client) -> Result<Vec<Value>, String>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
        K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>,
    {
        let api: Api<K> = Api::all(client.clone());
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        Ok(list
            .items
            .iter()
            .filter_map(|o| serde_json::to_value(o).ok())
            .collect())
    }
    let mut values = all::<SpiderSubnet>(client).await?;
    values.extend(all::<SpiderIPPool>(client).await?);
    values.extend(all::<SpiderReservedIP>(client).await?);
    Ok(values
        .into_iter()
        .filter(|v| !(v["kind"] == skip.0 && v["metadata"]["name"] == skip.1))
        .filter_map(|v| Object::from_value(v).ok())
        .collect())
}

/// The addresses the pool `name` holds, read from the SpiderIPBlocks now.
async fn in_use(client: &kube::Client, name: &str, family: IpFamily) -> Result<IpSet, String> {
    let api: Api<SpiderIPBlock> = Api::all(client.clone());
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    let ips: Vec<String> = list
        .items
        .iter()
        .flat_map(|b| b.spec.allocations.iter())
        .filter(|(_, r)| r.pool == name)
        .map(|(ip, _)| ip.clone())
        .collect();
    IpSet::parse(family, &ips).map_err(|e| e.to_string())
}

async fn validate(State(client): State<kube::Client>, Json(review): Json<Value>) -> Json<Value> {
    let req = &review["request"];
    let uid = &req["uid"];
    let kind = req["kind"]["kind"].as_str().unwrap_or_default();
    let name = req["name"]
        .as_str()
        .or_else(|| req["object"]["metadata"]["name"].as_str())
        .unwrap_or_default();
    let old = req["oldObject"].is_object().then_some(&req["oldObject"]);
    let others = match cluster(&client, (kind, name)).await {
        Ok(o) => o,
        Err(e) => {
            return answer(
                uid,
                false,
                Some(format!("the webhook cannot read the cluster's pools: {e}")),
                None,
            )
        }
    };
    let used = match (kind, old) {
        ("SpiderIPPool", Some(o)) => {
            let family = match o["spec"]["ipVersion"].as_i64() {
                Some(6) => IpFamily::V6,
                _ if o["spec"]["subnet"]
                    .as_str()
                    .is_some_and(|s| s.contains(':')) =>
                {
                    IpFamily::V6
                }
                _ => IpFamily::V4,
            };
            match in_use(&client, name, family).await {
                Ok(s) => Some(s),
                Err(e) => {
                    return answer(
                        uid,
                        false,
                        Some(format!(
                            "the webhook cannot read the pool's allocations: {e}"
                        )),
                        None,
                    )
                }
            }
        }
        _ => None,
    };
    match admission::validate(kind, name, old, &req["object"], &others, used.as_ref()) {
        Ok(()) => answer(uid, true, None, None),
        Err(problems) => {
            tracing::info!(kind, name, problems = %problems.join("; "), "refused");
            answer(uid, false, Some(problems.join("; ")), None)
        }
    }
}

/// The webhook routes.
pub fn router(client: kube::Client) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(client)
}

/// Serves `router` over TLS on `listener` with the certificates in `config` (swapped in place on
/// renewal) until `stop` changes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Arc<RwLock<Arc<tokio_rustls::rustls::ServerConfig>>>,
    router: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let cfg = config.read().unwrap_or_else(|p| p.into_inner()).clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let router = router.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let service = hyper_util::service::TowerToHyperService::new(router);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
}

/// What certificate renewal needs to know: where the Secret is, what the certificate is for,
/// and where the webhook configurations point.
#[derive(Clone)]
pub struct Renewal {
    /// The API server.
    pub client: kube::Client,
    /// Namespace of the Secret.
    pub namespace: String,
    /// Name of the Secret.
    pub secret: String,
    /// Names and addresses the serving certificate is for.
    pub hosts: Vec<String>,
    /// Where the API server reaches the webhook.
    pub endpoint: Endpoint,
}

/// Keeps the certificates current: every `every`, renews what is due, swaps the server's
/// configuration and re-registers the `caBundle` when it changed.
pub async fn rotate(
    r: Renewal,
    mut current: Certs,
    config: Arc<RwLock<Arc<tokio_rustls::rustls::ServerConfig>>>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        match tls::ensure(&r.client, &r.namespace, &r.secret, &r.hosts).await {
            Ok(certs) if certs != current => {
                match tls::server_config(&certs) {
                    Ok(c) => *config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "renewed certificate unusable");
                        continue;
                    }
                }
                if certs.ca_pem != current.ca_pem {
                    if let Err(e) = register(&r.client, &r.endpoint, &certs.ca_pem).await {
                        tracing::warn!(error = %e, "caBundle not updated; next time");
                        continue;
                    }
                }
                tracing::info!(not_after = certs.not_after, "webhook certificate renewed");
                current = certs;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "certificate renewal failed; next time"),
        }
    }
}
