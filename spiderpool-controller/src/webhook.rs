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
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::ByteString;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::Value;
use spiderpool_core::range::{IpFamily, IpSet};
use spiderpool_store::k8s::crd::SpiderIPBlock;

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

fn client_config(ep: &Endpoint, path: &str, ca: &str) -> WebhookClientConfig {
    let ca_bundle = Some(ByteString(ca.as_bytes().to_vec()));
    match ep {
        Endpoint::Url(u) => WebhookClientConfig {
            url: Some(format!("{u}{path}")),
            ca_bundle,
            service: None,
        },
        Endpoint::Service(ns, name, port) => WebhookClientConfig {
            service: Some(ServiceReference {
                namespace: ns.clone(),
                name: name.clone(),
                port: Some(i32::from(*port)),
                path: Some(path.to_string()),
            }),
            ca_bundle,
            url: None,
        },
    }
}

/// What both webhooks watch: creates and updates of pools, subnets and reserved IPs.
fn rules() -> Vec<RuleWithOperations> {
    vec![RuleWithOperations {
        api_groups: Some(vec!["spiderpool.spidernet.io".into()]),
        api_versions: Some(vec!["v2beta1".into()]),
        operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
        resources: Some(vec![
            "spiderippools".into(),
            "spidersubnets".into(),
            "spiderreservedips".into(),
        ]),
        scope: Some("Cluster".into()),
    }]
}

fn meta() -> kube::core::ObjectMeta {
    kube::core::ObjectMeta {
        name: Some(CONFIG_NAME.to_string()),
        ..Default::default()
    }
}

/// Points the shipped mutating and validating webhook configurations at this controller, with
/// `ca` as their `caBundle` (they must exist: deploy/kubernetes/controller.yaml ships them).
pub async fn register(client: &kube::Client, ep: &Endpoint, ca: &str) -> Result<(), String> {
    // A merge patch replaces the `webhooks` list whole: the endpoint the controller serves (URL
    // or Service) replaces the shipped one instead of being merged into it. It needs only the
    // `patch` right on these two objects, which the manifests ship.
    let pp = PatchParams::default();
    // The two configurations differ only in their type, name and path.
    macro_rules! webhook {
        ($ty:ident, $name:expr, $path:expr) => {
            $ty {
                name: $name.into(),
                client_config: client_config(ep, $path, ca),
                rules: Some(rules()),
                side_effects: "None".into(),
                admission_review_versions: vec!["v1".into()],
                failure_policy: Some("Fail".into()),
                timeout_seconds: Some(5),
                ..Default::default()
            }
        };
    }
    let m = MutatingWebhookConfiguration {
        metadata: meta(),
        webhooks: Some(vec![webhook!(
            MutatingWebhook,
            "mutate.spiderpool.spidernet.io",
            "/mutate"
        )]),
    };
    let v = ValidatingWebhookConfiguration {
        metadata: meta(),
        webhooks: Some(vec![webhook!(
            ValidatingWebhook,
            "validate.spiderpool.spidernet.io",
            "/validate"
        )]),
    };
    put(
        Api::all(client.clone()),
        &pp,
        &m,
        "MutatingWebhookConfiguration",
    )
    .await?;
    put(
        Api::all(client.clone()),
        &pp,
        &v,
        "ValidatingWebhookConfiguration",
    )
    .await
}

/// Patches the configuration `CONFIG_NAME`; creates it when it is missing (outside the shipped
/// manifests, with rights to create).
async fn put<K>(api: Api<K>, pp: &PatchParams, obj: &K, kind: &str) -> Result<(), String>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.patch(CONFIG_NAME, pp, &Patch::Merge(obj)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            match api.create(&kube::api::PostParams::default(), obj).await {
                Ok(_) => Ok(()),
                // Another replica created it meanwhile: patch it as if it had been there.
                Err(kube::Error::Api(e)) if e.code == 409 => api
                    .patch(CONFIG_NAME, pp, &Patch::Merge(obj))
                    .await
                    .map(|_| ())
                    .map_err(|e| register_error(kind, e)),
                Err(e) => Err(register_error(kind, e)),
            }
        }
        Err(e) => Err(register_error(kind, e)),
    }
}

/// Why a webhook configuration could not be patched, with what to do about it.
fn register_error(kind: &str, e: kube::Error) -> String {
    match &e {
        kube::Error::Api(a) if a.code == 403 || a.code == 404 => format!(
            "patching the {kind} {CONFIG_NAME}: {} ({}); the controller may only patch it, not create it: apply deploy/kubernetes/controller.yaml, which ships it",
            a.reason, a.message
        ),
        _ => format!("patching the {kind} {CONFIG_NAME}: {e}"),
    }
}

type Review = AdmissionReview<DynamicObject>;

/// The request of a review, or the answer refusing an unreadable one.
fn request(review: Review) -> Result<AdmissionRequest<DynamicObject>, Box<Json<Review>>> {
    review.try_into().map_err(|e| {
        Box::new(Json(
            AdmissionResponse::invalid(format!("{e}")).into_review(),
        ))
    })
}

fn to_value(o: Option<&DynamicObject>) -> Value {
    o.and_then(|o| serde_json::to_value(o).ok())
        .unwrap_or(Value::Null)
}

/// Refuses with `message` (status code 422, reason `Invalid`, as Spiderpool's webhook does).
fn refuse(req: &AdmissionRequest<DynamicObject>, message: String) -> Json<Review> {
    let mut r = AdmissionResponse::from(req).deny(message);
    r.result.code = 422;
    r.result.reason = "Invalid".into();
    Json(r.into_review())
}

async fn mutate_inner(Json(review): Json<Review>) -> Json<Review> {
    let req = match request(review) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    let ops = admission::mutate(&req.kind.kind, &to_value(req.object.as_ref()));
    let allowed = AdmissionResponse::from(&req);
    if ops.is_empty() {
        return Json(allowed.into_review());
    }
    match serde_json::from_value::<json_patch::Patch>(Value::Array(ops))
        .map_err(|e| e.to_string())
        .and_then(|p| allowed.with_patch(p).map_err(|e| e.to_string()))
    {
        Ok(r) => Json(r.into_review()),
        Err(e) => refuse(&req, format!("the webhook could not encode its patch: {e}")),
    }
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
        // An unreadable slot that names no pool counts as held in every pool it lies in.
        .filter(|(ip, r)| {
            r.pool().is_none_or(|p| p == name)
                && ip
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_ipv6() == (family == IpFamily::V6))
        })
        .map(|(ip, _)| ip.clone())
        .collect();
    IpSet::parse(family, &ips).map_err(|e| e.to_string())
}

/// The family of a pool as written (`ipVersion`, else its subnet's).
fn family_of(o: &Value) -> IpFamily {
    match o["spec"]["ipVersion"].as_i64() {
        Some(6) => IpFamily::V6,
        _ if o["spec"]["subnet"]
            .as_str()
            .is_some_and(|s| s.contains(':')) =>
        {
            IpFamily::V6
        }
        _ => IpFamily::V4,
    }
}

/// What the webhook handlers read: the watched objects, and the API server for a pool's
/// allocations.
#[derive(Clone)]
pub struct Served {
    /// The API server (request client).
    pub client: kube::Client,
    /// Pools, subnets, reserved IPs, watched.
    pub cache: crate::cache::Cache,
    /// The agents' user name (their service account): what they may write is narrower than
    /// their role ([`admission::agent_may`]).
    pub agent_user: String,
}

async fn validate_inner(State(st): State<Served>, Json(review): Json<Review>) -> Json<Review> {
    let client = &st.client;
    let req = match request(review) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    let kind = req.kind.kind.as_str();
    let object = to_value(req.object.as_ref());
    let name = if req.name.is_empty() {
        object["metadata"]["name"].as_str().unwrap_or_default()
    } else {
        req.name.as_str()
    };
    let old_value = to_value(req.old_object.as_ref());
    let old = old_value.is_object().then_some(&old_value);
    if req.user_info.username.as_deref() == Some(st.agent_user.as_str()) {
        if let Err(e) = admission::agent_may(kind, old, &object) {
            tracing::warn!(kind, name, user = %st.agent_user, "refused: {e}");
            return refuse(&req, e);
        }
    }
    let others = st.cache.objects((kind, name));
    let used = match (kind, old) {
        // The blocks are read (fresh) only when the update takes addresses away.
        ("SpiderIPPool", Some(o)) if removes_addresses(o, &object) => {
            match in_use(client, name, family_of(o)).await {
                Ok(s) => Some(s),
                Err(e) => {
                    return refuse(
                        &req,
                        format!("the webhook cannot read the pool's allocations: {e}"),
                    )
                }
            }
        }
        _ => None,
    };
    match admission::validate(kind, name, old, &object, &others, used.as_ref()) {
        Ok(()) => Json(AdmissionResponse::from(&req).into_review()),
        Err(problems) => {
            tracing::info!(kind, name, problems = %problems.join("; "), "refused");
            refuse(&req, problems.join("; "))
        }
    }
}

/// Whether a pool update leaves out addresses the old pool had (only then can it strand an
/// allocation; unreadable either way counts as yes).
fn removes_addresses(old: &Value, new: &Value) -> bool {
    let parse = |o: &Value| {
        serde_json::from_value::<spiderpool_core::types::IpPoolSpec>(o["spec"].clone())
            .ok()
            .and_then(|s| s.addresses())
    };
    match (parse(old), parse(new)) {
        (Some(a), Some(b)) => !a.subtract(&b).is_empty(),
        _ => true,
    }
}

/// Counts a review's answer and its latency.
fn measured(t0: std::time::Instant, answer: Json<Review>) -> Json<Review> {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &crate::metrics::METRICS;
    m.webhook_duration.observe(t0.elapsed());
    if answer.0.response.as_ref().is_some_and(|r| r.allowed) {
        m.webhook_allowed.fetch_add(1, Relaxed);
    } else {
        m.webhook_refused.fetch_add(1, Relaxed);
    }
    answer
}

async fn mutate(review: Json<Review>) -> Json<Review> {
    let t0 = std::time::Instant::now();
    measured(t0, mutate_inner(review).await)
}

async fn validate(st: State<Served>, review: Json<Review>) -> Json<Review> {
    let t0 = std::time::Instant::now();
    measured(t0, validate_inner(st, review).await)
}

/// The webhook routes.
pub fn router(served: Served) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(served)
}

/// Connections served at once; more wait for a free slot (the API server retries a review that
/// times out, and a flood from a hostile in-cluster client cannot exhaust the controller).
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send a request's headers (also the idle time between
/// requests), and to live in all (the API server opens a new one).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// Serves `router` over TLS on `listener` with the certificates in `config` (swapped in place on
/// renewal) until `stop` changes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Arc<RwLock<Arc<tokio_rustls::rustls::ServerConfig>>>,
    router: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
        tokio::spawn(async move {
            let _slot = slot;
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
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "webhook connection ended"),
                Ok(Ok(())) => {}
                Err(_) => tracing::debug!(%peer, "webhook connection closed after its lifetime"),
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
        if !spiderpool_store::task::sleep_or_stop(every, &mut stop).await {
            return;
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
                if certs.ca_bundle() != current.ca_bundle() {
                    if let Err(e) = register(&r.client, &r.endpoint, &certs.ca_bundle()).await {
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
