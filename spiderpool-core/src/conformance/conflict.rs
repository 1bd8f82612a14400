//! Conformance: addresses recorded as in conflict (IP conflict detection).

use crate::engine::{is_conflict, Attachment, Engine, CONFLICT_NETWORK};
use crate::manifest::pool_set;
use crate::select::SelectionInput;
use crate::store::{Filter, LeaseStore};

use super::network;

const SMALL: &str = r#"
kind: SpiderIPPool
metadata: {name: small}
spec: {subnet: 10.11.0.0/24, ips: [10.11.0.1-10.11.0.3]}
"#;

/// An address quarantined for an attachment moves to a conflict record in one commit: the
/// attachment's next ADD gets another address, no DEL, CNI GC (of any network) or release of
/// the container frees the conflict record, and quarantining an address the attachment does
/// not hold changes nothing.
pub async fn quarantine_keeps_the_address_out<S: LeaseStore>(s: S) {
    let b = s.backend();
    let pools = pool_set(SMALL).unwrap_or_else(|e| panic!("{e:?}"));
    let engine = Engine::new(s, "node-a");
    let mut cni = network("net-a");
    cni.default_ipv4_ippool = vec!["small".into()];
    let input = SelectionInput {
        pod_namespace: "ns",
        pod_name: "p",
        node_name: "node-a",
        cni: Some(&cni),
        ..Default::default()
    };
    let att = Attachment {
        container_id: "c1".into(),
        ifname: "eth0".into(),
    };
    let first = engine
        .allocate(&pools, &input, &att, "u", 0)
        .await
        .unwrap_or_else(|e| panic!("{b}: allocate: {e}"));
    let ip = first.nics[0]
        .ipv4
        .as_ref()
        .map(|a| a.address.addr())
        .unwrap_or_else(|| panic!("{b}: no address"));
    let marked = engine
        .quarantine("c1", "eth0", ip, "0e:00:00:00:00:09", 1)
        .await
        .unwrap_or_else(|e| panic!("{b}: quarantine: {e}"))
        .unwrap_or_else(|| panic!("{b}: nothing quarantined"));
    assert!(is_conflict(&marked), "{b}: {marked:?}");
    assert_eq!(marked.owner.ifname, "0e:00:00:00:00:09", "{b}");
    let again = engine
        .allocate(&pools, &input, &att, "u", 2)
        .await
        .unwrap_or_else(|e| panic!("{b}: allocate again: {e}"));
    let ip2 = again.nics[0].ipv4.as_ref().map(|a| a.address.addr());
    assert!(
        ip2.is_some() && ip2 != Some(ip),
        "{b}: {ip2:?} after quarantining {ip}"
    );
    // Nothing held for the attachment at the quarantined address: a second call is a no-op.
    assert!(engine
        .quarantine("c1", "eth0", ip, "0e:00:00:00:00:09", 3)
        .await
        .unwrap_or_else(|e| panic!("{b}: {e}"))
        .is_none());
    engine
        .release("c1", None)
        .await
        .unwrap_or_else(|e| panic!("{b}: release: {e}"));
    for net in ["net-a", CONFLICT_NETWORK] {
        let _ = engine.gc(net, &[]).await;
    }
    let left = engine
        .store()
        .list(Filter::All)
        .await
        .unwrap_or_else(|e| panic!("{b}: list: {e}"))
        .leases;
    let conflicts: Vec<_> = left
        .iter()
        .filter(|l| is_conflict(l))
        .map(|l| l.ip)
        .collect();
    assert_eq!(
        conflicts,
        vec![ip],
        "{b}: the conflict record survives DEL and GC: {left:?}"
    );
}
