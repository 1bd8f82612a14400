//! The webhook's view of the pools, subnets and reserved IPs: watched (kube-rs reflectors), so an
//! admission review costs no LIST. Any in-cluster client can POST a review to the webhook; with
//! the cache it makes the controller read memory, not the API server.

use std::time::Duration;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use serde_json::Value;
use spiderpool_core::types::Object;
use spiderpool_store::k8s::crd::{SpiderIPPool, SpiderReservedIP, SpiderSubnet};

/// Watched copies of the IPAM objects the webhook validates against.
#[derive(Clone)]
pub struct Cache {
    subnets: Store<SpiderSubnet>,
    pools: Store<SpiderIPPool>,
    reserved: Store<SpiderReservedIP>,
}

fn follow<K>(client: &kube::Client) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + kube::Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<K>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .applied_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::warn!(error = %e, "webhook cache watch failed; retrying");
            }
        }
    });
    reader
}

impl Cache {
    /// Starts the watches (on a client without a read timeout) and waits up to `limit` until
    /// each has listed once.
    pub async fn start(client: &kube::Client, limit: Duration) -> Result<Cache, String> {
        let c = Cache {
            subnets: follow(client),
            pools: follow(client),
            reserved: follow(client),
        };
        let ready = async {
            c.subnets
                .wait_until_ready()
                .await
                .map_err(|e| e.to_string())?;
            c.pools
                .wait_until_ready()
                .await
                .map_err(|e| e.to_string())?;
            c.reserved
                .wait_until_ready()
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(limit, ready).await {
            Ok(Ok(())) => Ok(c),
            Ok(Err(e)) => Err(format!("the webhook cache: {e}")),
            Err(_) => Err(format!(
                "the webhook cache did not list pools, subnets and reserved IPs within {limit:?} (are the CRDs installed?)"
            )),
        }
    }

    /// Every pool, subnet and reserved IP but `skip` (kind, name): the object under review.
    pub fn objects(&self, skip: (&str, &str)) -> Vec<Object> {
        fn values<K: serde::Serialize + kube::Resource<DynamicType = ()> + Clone>(
            s: &Store<K>,
        ) -> Vec<Value> {
            s.state()
                .iter()
                .filter_map(|o| serde_json::to_value(o.as_ref()).ok())
                .collect()
        }
        let mut v = values(&self.subnets);
        v.extend(values(&self.pools));
        v.extend(values(&self.reserved));
        v.into_iter()
            .filter(|v| !(v["kind"] == skip.0 && v["metadata"]["name"] == skip.1))
            .filter_map(|v| Object::from_value(v).ok())
            .collect()
    }
}
