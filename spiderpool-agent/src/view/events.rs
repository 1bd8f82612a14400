//! Kubernetes Events for what the view leaves out: one `Warning` Event per left-out object and
//! set of problems, in the `default` namespace (the objects are cluster-scoped), so `kubectl get
//! events` and `kubectl describe` show why a pool is not served. Every agent sees the same
//! left-out object; the Event's name is derived from the object and its problems, so the first
//! agent's create wins and the others' are refused (409): one Event, however many nodes.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ObjectMeta, PostParams};

use super::LeftOut;

/// The Event's reason.
pub const REASON: &str = "LeftOutOfView";
/// Where the Events go (the objects are cluster-scoped).
pub const NAMESPACE: &str = "default";

/// The Event's name: the object's name, the reason and a hash of the problems.
pub fn event_name(l: &LeftOut) -> String {
    let name = l
        .object
        .split_once('/')
        .map_or(l.object.as_str(), |(_, n)| n);
    let problems = l.problems.join("\n");
    let h = spiderpool_core::fnv1a(l.object.bytes().chain(problems.bytes()));
    format!("{name}.leftoutofview.{:08x}", h & 0xffff_ffff)
}

/// Builds and posts one agent Event (best effort; 409: the same Event exists already, posted
/// by this agent earlier or by another one).
async fn post(
    client: kube::Client,
    node: String,
    name: String,
    namespace: &str,
    object: ObjectReference,
    (type_, reason, message): (&str, &str, String),
) {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let what = format!(
        "{}/{}",
        object.kind.as_deref().unwrap_or_default(),
        object.name.as_deref().unwrap_or_default()
    );
    let ev = Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        involved_object: object,
        reason: Some(reason.into()),
        message: Some(message),
        type_: Some(type_.into()),
        source: Some(EventSource {
            component: Some("spiderpool-agent".into()),
            host: Some(node.clone()),
        }),
        reporting_component: Some("spiderpool-agent".into()),
        reporting_instance: Some(node),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(client, namespace);
    match api.create(&PostParams::default(), &ev).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => tracing::warn!(object = %what, reason, error = %e, "cannot post the Event"),
    }
}

/// Posts the Event for `l` (best effort: a failure is logged, the log line already says it all).
pub async fn report(client: kube::Client, node: String, l: LeftOut) {
    let (kind, name) = l
        .object
        .split_once('/')
        .unwrap_or(("SpiderIPPool", &l.object));
    let object = ObjectReference {
        api_version: Some("spiderpool.spidernet.io/v2beta1".into()),
        kind: Some(kind.into()),
        name: Some(name.into()),
        ..Default::default()
    };
    let message = format!(
        "left out of every agent's view (the rest of the view is used): {}",
        l.problems.join("; ")
    );
    post(
        client,
        node,
        event_name(&l),
        NAMESPACE,
        object,
        ("Warning", REASON, message),
    )
    .await;
}

/// An Event about a pod (`NoEligiblePool`, `PoolExhausted`, `IPConflict`, `ReleasedByGC`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's UID (empty when unknown).
    pub uid: String,
    /// `Normal` or `Warning`.
    pub type_: &'static str,
    /// The reason.
    pub reason: &'static str,
    /// The message.
    pub message: String,
}

/// The Event's name: the pod, the reason and a hash of the message, so an ADD the runtime
/// retries with the same failure makes one Event, not one per retry.
pub fn pod_event_name(e: &PodEvent) -> String {
    let h = spiderpool_core::fnv1a(e.uid.bytes().chain(e.message.bytes()));
    format!(
        "{}.{}.{:08x}",
        e.name,
        e.reason.to_ascii_lowercase(),
        h & 0xffff_ffff
    )
}

/// At most this many pod Events per agent per second (an ADD storm on an exhausted pool must
/// not flood the API server); the rest are only logged.
pub const POD_EVENTS_PER_SEC: u32 = 5;

/// A one-second window counter for [`POD_EVENTS_PER_SEC`].
#[derive(Debug, Default)]
pub struct Limiter {
    window: std::sync::Mutex<(u64, u32)>,
}

impl Limiter {
    /// Whether one more Event may go out in the second `now` (monotonic seconds).
    pub fn admit(&self, now: u64) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.0 != now {
            *w = (now, 0);
        }
        if w.1 >= POD_EVENTS_PER_SEC {
            return false;
        }
        w.1 += 1;
        true
    }
}

/// Posts a pod Event (best effort; 409: the same Event exists already).
pub async fn report_pod(client: kube::Client, node: String, e: PodEvent) {
    let object = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(e.name.clone()),
        namespace: Some(e.namespace.clone()),
        uid: (!e.uid.is_empty()).then(|| e.uid.clone()),
        ..Default::default()
    };
    let name = pod_event_name(&e);
    post(
        client,
        node,
        name,
        &e.namespace,
        object,
        (e.type_, e.reason, e.message),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_events_are_named_once_per_message_and_limited() {
        let e = PodEvent {
            namespace: "default".into(),
            name: "app-1".into(),
            uid: "u1".into(),
            type_: "Warning",
            reason: "PoolExhausted",
            message: "all full".into(),
        };
        let mut other = e.clone();
        other.message = "another".into();
        assert!(pod_event_name(&e).starts_with("app-1.poolexhausted."));
        assert_eq!(pod_event_name(&e), pod_event_name(&e.clone()));
        assert_ne!(pod_event_name(&e), pod_event_name(&other));
        let l = Limiter::default();
        let admitted = (0..20).filter(|_| l.admit(7)).count();
        assert_eq!(admitted, POD_EVENTS_PER_SEC as usize);
        assert!(l.admit(8), "a new second");
    }

    #[test]
    fn one_name_per_object_and_problems() {
        let a = LeftOut {
            object: "SpiderIPPool/overlap-new".into(),
            problems: vec!["overlaps test-ippool-6".into()],
        };
        let mut b = a.clone();
        b.problems = vec!["another".into()];
        assert!(event_name(&a).starts_with("overlap-new.leftoutofview."));
        assert_eq!(event_name(&a), event_name(&a.clone()));
        assert_ne!(event_name(&a), event_name(&b));
    }
}
