//! Status conditions on SpiderIPPools (`Valid`, `Exhausted`) and SpiderSubnets (`Valid`),
//! written by the leader each reconcile round, and Events on pools (`Exhausted`,
//! `NearlyExhausted` at a threshold) when they cross. `Valid` is decided as the agents decide
//! which objects they serve ([`spiderpool_core::validate::usable`]): a pool the agents leave out
//! says why in its condition. Only a changed condition is written (a merge patch of
//! `status.conditions`: the counts the agents write stay as they are).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use spiderpool_core::types::{Condition, Object};
use spiderpool_store::k8s::crd::{SpiderIPPool, SpiderReservedIP, SpiderSubnet};

use crate::metrics::METRICS;

/// Where pool Events go (the pools are cluster-scoped), as the agents' `LeftOutOfView`.
pub const EVENT_NAMESPACE: &str = "default";

/// The conditions a pool should have; `problems` are the validation problems when the agents
/// leave it out.
pub fn pool_conditions(
    allocated: i64,
    total: i64,
    problems: Option<&[String]>,
) -> Vec<(String, String, String, String)> {
    let valid = match problems {
        None => ("Valid", "True", "Valid", "served by the agents".to_string()),
        Some(p) => ("Valid", "False", "Invalid", p.join("; ")),
    };
    let exhausted = if total > 0 && allocated >= total {
        (
            "Exhausted",
            "True",
            "Exhausted",
            format!("all {total} addresses are allocated"),
        )
    } else {
        (
            "Exhausted",
            "False",
            "Available",
            "addresses are free".to_string(),
        )
    };
    [valid, exhausted]
        .into_iter()
        .map(|(a, b, c, d)| (a.into(), b.into(), c.into(), d))
        .collect()
}

/// `want` as conditions, keeping `lastTransitionTime` of those whose status did not change;
/// `None` when nothing changed.
pub fn merge(
    have: &[Condition],
    want: &[(String, String, String, String)],
    now: &str,
) -> Option<Vec<Condition>> {
    let next: Vec<Condition> = want
        .iter()
        .map(|(t, s, r, m)| {
            let old = have.iter().find(|c| &c.type_ == t);
            Condition {
                type_: t.clone(),
                status: s.clone(),
                reason: r.clone(),
                message: m.clone(),
                last_transition_time: match old {
                    Some(o) if &o.status == s => o.last_transition_time.clone(),
                    _ => now.to_string(),
                },
            }
        })
        .collect();
    (next != have).then_some(next)
}

fn to_object<K: serde::Serialize>(o: &K) -> Option<Object> {
    Object::from_value(serde_json::to_value(o).ok()?).ok()
}

/// What the conditions pass remembers between rounds: pools above the threshold.
#[derive(Debug, Default)]
pub struct Seen {
    nearly: BTreeSet<String>,
    exhausted: BTreeSet<String>,
}

async fn patch_conditions<K>(api: &Api<K>, name: &str, conditions: &[Condition]) -> bool
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({"status": {"conditions": conditions}});
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(%name, error = %e, "conditions not written; next round");
            false
        }
    }
}

/// One pass over every pool and subnet (the leader's, each reconcile round).
pub async fn sync(
    client: &kube::Client,
    pools: &[SpiderIPPool],
    subnets: &[SpiderSubnet],
    threshold: u8,
    seen: &mut Seen,
) -> Result<(), String> {
    let reserved: Vec<SpiderReservedIP> = Api::<SpiderReservedIP>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing reserved IPs: {e}"))?
        .items;
    let objects: Vec<Object> = pools
        .iter()
        .filter_map(to_object)
        .chain(subnets.iter().filter_map(to_object))
        .chain(reserved.iter().filter_map(to_object))
        .collect();
    let (_, left) = spiderpool_core::validate::usable(&objects, |_| false);
    let problems = |kind: &str, name: &str| {
        left.iter()
            .find(|l| l.object == format!("{kind}/{name}"))
            .map(|l| l.problems.clone())
    };
    let now = spiderpool_core::rfc3339::format(spiderpool_store::task::now_secs());
    let pools_api: Api<SpiderIPPool> = Api::all(client.clone());
    let (mut invalid, mut exhausted) = (0, 0);
    for p in pools
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let name = p.metadata.name.clone().unwrap_or_default();
        let status = p.status.clone().unwrap_or_default();
        let allocated = status.allocated_ip_count.unwrap_or(0);
        let total = p
            .spec
            .0
            .addresses()
            .map(|a| a.count_i64())
            .or(status.total_ip_count)
            .unwrap_or(0);
        let bad = problems("SpiderIPPool", &name);
        invalid += i64::from(bad.is_some());
        exhausted += i64::from(total > 0 && allocated >= total);
        let want = pool_conditions(allocated, total, bad.as_deref());
        if let Some(next) = merge(&status.conditions, &want, &now) {
            patch_conditions(&pools_api, &name, &next).await;
        }
        pool_events(client, &name, allocated, total, threshold, seen).await;
    }
    let subnets_api: Api<SpiderSubnet> = Api::all(client.clone());
    for s in subnets {
        let name = s.metadata.name.clone().unwrap_or_default();
        let have = s
            .status
            .as_ref()
            .map(|x| x.conditions.clone())
            .unwrap_or_default();
        let want = vec![match problems("SpiderSubnet", &name) {
            None => (
                "Valid".into(),
                "True".into(),
                "Valid".into(),
                "served by the agents".into(),
            ),
            Some(p) => (
                "Valid".into(),
                "False".into(),
                "Invalid".into(),
                p.join("; "),
            ),
        }];
        if let Some(next) = merge(&have, &want, &now) {
            patch_conditions(&subnets_api, &name, &next).await;
        }
    }
    METRICS
        .pools
        .store(i64::try_from(pools.len()).unwrap_or(i64::MAX), Relaxed);
    METRICS
        .subnets
        .store(i64::try_from(subnets.len()).unwrap_or(i64::MAX), Relaxed);
    METRICS.invalid_pools.store(invalid, Relaxed);
    METRICS.exhausted_pools.store(exhausted, Relaxed);
    Ok(())
}

/// `Exhausted` and `NearlyExhausted` Warning Events, once per crossing.
async fn pool_events(
    client: &kube::Client,
    name: &str,
    allocated: i64,
    total: i64,
    threshold: u8,
    seen: &mut Seen,
) {
    let full = total > 0 && allocated >= total;
    let nearly = total > 0 && allocated * 100 >= total * i64::from(threshold) && !full;
    let mut post = Vec::new();
    if full && seen.exhausted.insert(name.to_string()) {
        post.push((
            "Exhausted",
            format!("all {total} addresses are allocated: new pods get none from this pool (grow spec.ips, add a pool, or find leaks with spiderctl check)"),
        ));
    } else if !full {
        seen.exhausted.remove(name);
    }
    if nearly && seen.nearly.insert(name.to_string()) {
        post.push((
            "NearlyExhausted",
            format!("{allocated} of {total} addresses are allocated (at least {threshold} %)"),
        ));
    } else if !nearly {
        seen.nearly.remove(name);
    }
    for (reason, message) in post {
        post_event(client, name, reason, message).await;
    }
}

async fn post_event(client: &kube::Client, pool: &str, reason: &str, message: String) {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let ev = Event {
        metadata: ObjectMeta {
            name: Some(format!("{pool}.{:x}", stamp)),
            namespace: Some(EVENT_NAMESPACE.into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("spiderpool.spidernet.io/v2beta1".into()),
            kind: Some("SpiderIPPool".into()),
            name: Some(pool.into()),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some("spiderpool-controller".into()),
            host: None,
        }),
        reporting_component: Some("spiderpool-controller".into()),
        reporting_instance: Some("spiderpool-controller".into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    };
    match Api::<Event>::namespaced(client.clone(), EVENT_NAMESPACE)
        .create(&PostParams::default(), &ev)
        .await
    {
        Ok(_) => {
            METRICS.pool_events.fetch_add(1, Relaxed);
        }
        Err(e) => tracing::warn!(%pool, reason, error = %e, "cannot post the Event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_change_only_when_the_pool_does() {
        let want = pool_conditions(3, 10, None);
        let first = merge(&[], &want, "t1").expect("new");
        assert_eq!(first[0].status, "True");
        assert_eq!(first[1].reason, "Available");
        assert_eq!(
            merge(&first, &pool_conditions(7, 10, None), "t2"),
            None,
            "counts alone change nothing"
        );
        let full = merge(&first, &pool_conditions(10, 10, None), "t3").expect("exhausted");
        assert_eq!(
            (
                full[1].status.as_str(),
                full[1].last_transition_time.as_str()
            ),
            ("True", "t3")
        );
        assert_eq!(full[0].last_transition_time, "t1", "Valid did not change");
        let bad = vec!["overlaps test-ippool-6".to_string()];
        let invalid = merge(&full, &pool_conditions(10, 10, Some(&bad)), "t4").expect("invalid");
        assert_eq!(
            (invalid[0].status.as_str(), invalid[0].message.as_str()),
            ("False", "overlaps test-ippool-6")
        );
    }
}
