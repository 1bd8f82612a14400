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

/// Posts the Event for `l` (best effort: a failure is logged, the log line already says it all).
pub async fn report(client: kube::Client, node: String, l: LeftOut) {
    let (kind, name) = l
        .object
        .split_once('/')
        .unwrap_or(("SpiderIPPool", &l.object));
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let ev = Event {
        metadata: ObjectMeta {
            name: Some(event_name(&l)),
            namespace: Some(NAMESPACE.into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("spiderpool.spidernet.io/v2beta1".into()),
            kind: Some(kind.into()),
            name: Some(name.into()),
            ..Default::default()
        },
        reason: Some(REASON.into()),
        message: Some(format!(
            "left out of every agent's view (the rest of the view is used): {}",
            l.problems.join("; ")
        )),
        type_: Some("Warning".into()),
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
    let api: Api<Event> = Api::namespaced(client, NAMESPACE);
    match api.create(&PostParams::default(), &ev).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {} // another agent reported it
        Err(e) => tracing::warn!(object = %l.object, error = %e, "cannot post the Event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
