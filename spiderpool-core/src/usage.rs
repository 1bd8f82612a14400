//! What `spiderctl get` and the metrics show: each pool's, subnet's and address's use, counted
//! from a store (the engine's counting, read-only).

use crate::api::{EndpointRow, PoolRow, SubnetRow};
use crate::model::PoolSet;
use crate::store::{Filter, LeaseStore, StoreError};

/// `spiderctl get ippools` rows: every pool of `pools` with its allocated count from `store`.
pub async fn pool_rows<S: LeaseStore>(
    pools: &PoolSet,
    store: &S,
) -> Result<Vec<PoolRow>, StoreError> {
    let mut rows = Vec::new();
    for p in pools.pools.values() {
        // Addresses only: on etcd a keys-only read, not every record of the pool. Counted within
        // the pool's ranges (a store may report an address it cannot attribute in every pool).
        let n = store
            .pool_addresses(&p.name)
            .await?
            .ips
            .iter()
            .filter(|ip| p.ips.contains(**ip))
            .count() as u64;
        rows.push(PoolRow {
            name: p.name.clone(),
            version: p.family.version(),
            subnet: p.subnet.to_string(),
            allocated_ip_count: n,
            total_ip_count: p.total().count_i64(),
            default: p.default,
            disable: p.disable,
        });
    }
    Ok(rows)
}

/// `spiderctl get subnets` rows: allocated = the sum over the pools of the subnet's CIDR.
pub fn subnet_rows(pools: &PoolSet, pool_rows: &[PoolRow]) -> Vec<SubnetRow> {
    pools
        .subnets
        .values()
        .map(|s| SubnetRow {
            name: s.name.clone(),
            version: s.family.version(),
            subnet: s.subnet.to_string(),
            allocated_ip_count: pool_rows
                .iter()
                .filter(|r| r.subnet == s.subnet.to_string())
                .map(|r| r.allocated_ip_count)
                .sum(),
            total_ip_count: s.total.count_i64(),
        })
        .collect()
}

/// `spiderctl get endpoints` rows: one per allocated address.
pub async fn endpoint_rows<S: LeaseStore>(store: &S) -> Result<Vec<EndpointRow>, StoreError> {
    Ok(store
        .list(Filter::All)
        .await?
        .leases
        .into_iter()
        .map(|l| EndpointRow {
            pod: if l.owner.pod_namespace.is_empty() {
                String::new()
            } else {
                format!("{}/{}", l.owner.pod_namespace, l.owner.pod_name)
            },
            container_id: l.owner.container_id,
            node: l.owner.node,
            interface: l.owner.ifname,
            address: l.ip.to_string(),
            pool: l.pool,
            network: l.owner.network,
        })
        .collect())
}
