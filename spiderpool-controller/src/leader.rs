//! Leadership of the auto-pool reconcile: a `coordination.k8s.io` Lease, taken when free or
//! expired and renewed by its holder. Only the leader reconciles; every replica serves the
//! webhooks.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::core::ObjectMeta;
use spiderpool_store::task::now_secs;

fn micro_time(secs: u64) -> MicroTime {
    MicroTime(
        Timestamp::from_second(i64::try_from(secs).unwrap_or(0)).unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

fn seconds(t: &MicroTime) -> u64 {
    u64::try_from(t.0.as_second()).unwrap_or(0)
}

/// Takes or keeps the Lease `namespace/name` for `identity`; whether this replica leads.
pub async fn lead(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    identity: &str,
    duration: u64,
) -> Result<bool, String> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let now = now_secs();
    let mut mine = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(identity.to_string()),
            lease_duration_seconds: Some(i32::try_from(duration).unwrap_or(i32::MAX)),
            renew_time: Some(micro_time(now)),
            acquire_time: Some(micro_time(now)),
            ..Default::default()
        }),
    };
    let current = api
        .get_opt(name)
        .await
        .map_err(|e| format!("reading Lease {namespace}/{name}: {e}"))?;
    let Some(current) = current else {
        return match api.create(&PostParams::default(), &mine).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(format!("creating Lease {namespace}/{name}: {e}")),
        };
    };
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    let renewed = spec.renew_time.as_ref().map(seconds).unwrap_or(0);
    let held_for = spec
        .lease_duration_seconds
        .and_then(|d| u64::try_from(d).ok())
        .unwrap_or(duration);
    if holder != identity && renewed + held_for > now {
        return Ok(false);
    }
    mine.metadata.resource_version = current.metadata.resource_version.clone();
    if holder == identity {
        if let Some(s) = mine.spec.as_mut() {
            s.acquire_time = spec.acquire_time.clone();
        }
    }
    match api.replace(name, &PostParams::default(), &mine).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(format!("renewing Lease {namespace}/{name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_times_round_trip() {
        assert_eq!(seconds(&micro_time(0)), 0);
        assert_eq!(seconds(&micro_time(1_795_792_807)), 1_795_792_807);
        let json = serde_json::to_string(&micro_time(1_795_792_807)).expect("json");
        assert!(json.starts_with("\"2026-11-27T15:20:07"), "{json}");
    }
}
