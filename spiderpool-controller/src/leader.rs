//! Leadership of the auto-pool reconcile: a `coordination.k8s.io` Lease, taken when free or
//! expired and renewed by its holder. Only the leader reconciles; every replica serves the
//! webhooks.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::core::ObjectMeta;
use std::time::{Duration, Instant};

use spiderpool_store::task::now_secs;

fn micro_time(secs: u64) -> MicroTime {
    MicroTime(
        Timestamp::from_second(i64::try_from(secs).unwrap_or(0)).unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

#[cfg(test)]
fn seconds(t: &MicroTime) -> u64 {
    u64::try_from(t.0.as_second()).unwrap_or(0)
}

/// What one Lease record says, as last seen: another holder's lease is judged expired by how long
/// *this* replica has seen the same record (client-go's observed time), never by comparing the
/// holder's `renewTime` with the local clock (clocks differ between nodes).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: String,
    renew: Option<String>,
    duration: u64,
}

/// Leadership by a `coordination.k8s.io` Lease, as client-go's leader election does it.
pub struct Elector {
    client: kube::Client,
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
    observed: Option<(Record, Instant)>,
    renewed: Option<Instant>,
}

impl Elector {
    /// An elector for the Lease `namespace/name` as `identity`, holding it for `duration`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Elector {
            client,
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: None,
            renewed: None,
        }
    }

    /// How long after its last successful renewal this replica still acts: two thirds of the
    /// lease (client-go's renew deadline), so it stops before any other replica, which waits the
    /// whole lease after it last saw a change, can take over.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// The time this replica may still act as leader (zero when it does not lead).
    pub fn remaining(&self) -> Duration {
        self.renewed
            .map(|t| self.renew_deadline().saturating_sub(t.elapsed()))
            .unwrap_or_default()
    }

    /// One attempt to take or renew the Lease; whether this replica leads now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, String> {
        let (ns, name) = (self.namespace.clone(), self.name.clone());
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &ns);
        let limit = self.renew_deadline().max(Duration::from_secs(1));
        let current = tokio::time::timeout(limit, api.get_opt(&name))
            .await
            .map_err(|_| format!("reading Lease {ns}/{name}: no answer"))?
            .map_err(|e| format!("reading Lease {ns}/{name}: {e}"))?;
        let now = now_secs();
        let Some(current) = current else {
            let lease = self.lease(now, None, None);
            return self.write(&api, lease, true, limit).await;
        };
        let spec = current.spec.clone().unwrap_or_default();
        let record = Record {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            renew: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            duration: spec
                .lease_duration_seconds
                .and_then(|d| u64::try_from(d).ok())
                .unwrap_or(self.duration.as_secs()),
        };
        if self.observed.as_ref().map(|(r, _)| r) != Some(&record) {
            self.observed = Some((record.clone(), Instant::now()));
        }
        let seen_for = self
            .observed
            .as_ref()
            .map(|(_, t)| t.elapsed())
            .unwrap_or_default();
        let mine = record.holder == self.identity;
        if !mine && !record.holder.is_empty() && seen_for < Duration::from_secs(record.duration) {
            self.renewed = None;
            return Ok(false);
        }
        let acquired = if mine {
            spec.acquire_time.clone()
        } else {
            None
        };
        let lease = self.lease(now, acquired, current.metadata.resource_version.clone());
        self.write(&api, lease, false, limit).await
    }

    fn lease(&self, now: u64, acquired: Option<MicroTime>, rv: Option<String>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: rv,
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(
                    i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX),
                ),
                renew_time: Some(micro_time(now)),
                acquire_time: acquired.or_else(|| Some(micro_time(now))),
                ..Default::default()
            }),
        }
    }

    async fn write(
        &mut self,
        api: &Api<Lease>,
        lease: Lease,
        create: bool,
        limit: Duration,
    ) -> Result<bool, String> {
        let (ns, name) = (&self.namespace, &self.name);
        let pp = PostParams::default();
        let res = if create {
            tokio::time::timeout(limit, api.create(&pp, &lease)).await
        } else {
            tokio::time::timeout(limit, api.replace(name, &pp, &lease)).await
        };
        match res {
            Ok(Ok(_)) => {
                self.renewed = Some(Instant::now());
                Ok(true)
            }
            Ok(Err(kube::Error::Api(e))) if e.code == 409 => {
                self.renewed = None;
                Ok(false)
            }
            Ok(Err(kube::Error::Api(e))) if e.code == 403 => {
                self.renewed = None;
                Err(format!(
                    "writing Lease {ns}/{name}: forbidden ({}); the controller may only update this Lease, by name: apply deploy/kubernetes/controller.yaml, which ships it",
                    e.message
                ))
            }
            Ok(Err(e)) => {
                self.renewed = None;
                Err(format!("writing Lease {ns}/{name}: {e}"))
            }
            Err(_) => {
                self.renewed = None;
                Err(format!("writing Lease {ns}/{name}: no answer"))
            }
        }
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
