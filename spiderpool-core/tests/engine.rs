//! Engine behaviour over the in-memory store: the seed scenario, backup pools, dual-stack,
//! multi-NIC, idempotency, release, check and GC.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use futures::executor::block_on;
use spiderpool_core::engine::{Attachment, Engine, EngineError};
use spiderpool_core::manifest::pool_set;
use spiderpool_core::select::{CniDefaults, SelectionInput};
use spiderpool_core::store::{Filter, LeaseStore, MemoryStore};
use spiderpool_core::Families;
use spiderpool_core::PoolSet;

/// The seed's two SpiderIPPools, unchanged.
const SEED_POOLS: &str = include_str!("../../testdata/seed-pools.yaml");

fn pools(yaml: &str) -> PoolSet {
    pool_set(yaml).expect("valid pools")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

struct Pod {
    ns: String,
    name: String,
    annos: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    node: String,
    node_labels: BTreeMap<String, String>,
}

impl Pod {
    fn new(name: &str, node: &str, node_labels: &[(&str, &str)], annos: &[(&str, &str)]) -> Self {
        Pod {
            ns: "default".into(),
            name: name.into(),
            annos: labels(annos),
            labels: BTreeMap::new(),
            node: node.into(),
            node_labels: labels(node_labels),
        }
    }
    fn input(&self) -> SelectionInput<'_> {
        SelectionInput {
            pod_namespace: &self.ns,
            pod_name: &self.name,
            pod_labels: Some(&self.labels),
            pod_annotations: Some(&self.annos),
            node_name: &self.node,
            node_labels: Some(&self.node_labels),
            default_families: Families::default(),
            ..Default::default()
        }
    }
}

fn att(c: &str, i: &str) -> Attachment {
    Attachment {
        container_id: c.into(),
        ifname: i.into(),
    }
}

const BOTH: &str = r#"{"ipv4":["test-ippool-6","test-ippool-7"]}"#;

#[test]
fn seed_pods_get_addresses_of_their_own_zone() {
    let set = pools(SEED_POOLS);
    let store = Arc::new(MemoryStore::new());
    let e6 = Engine::new(store.clone(), "controller-node-1");
    let e7 = Engine::new(store.clone(), "worker-node-1");
    let p6 = Pod::new(
        "test-app-j9ftl",
        "controller-node-1",
        &[("node-subnet", "subnet-6")],
        &[("ipam.spidernet.io/ippool", BOTH)],
    );
    let p7 = Pod::new(
        "test-app-nkq5h",
        "worker-node-1",
        &[("node-subnet", "subnet-7")],
        &[("ipam.spidernet.io/ippool", BOTH)],
    );
    let a6 = block_on(e6.allocate(&set, &p6.input(), &att("c6", "eth0"), "u6", 1)).expect("zone 6");
    let a7 = block_on(e7.allocate(&set, &p7.input(), &att("c7", "eth0"), "u7", 1)).expect("zone 7");
    let n6 = a6.nic("eth0").and_then(|n| n.ipv4.clone()).expect("v4");
    let n7 = a7.nic("eth0").and_then(|n| n.ipv4.clone()).expect("v4");
    assert_eq!(n6.pool, "test-ippool-6");
    assert!(
        n6.address.to_string().starts_with("10.6.168.6"),
        "{}",
        n6.address
    );
    assert_eq!(n6.address.prefix_len(), 16);
    assert_eq!(
        n6.gateway.map(|g| g.to_string()).as_deref(),
        Some("10.6.0.1")
    );
    assert_eq!(n7.pool, "test-ippool-7");
    assert!(
        n7.address.to_string().starts_with("10.7.168.6"),
        "{}",
        n7.address
    );
}

#[test]
fn node_in_no_zone_gets_an_error_naming_every_pool() {
    let set = pools(SEED_POOLS);
    let e = Engine::new(MemoryStore::new(), "edge-1");
    let p = Pod::new(
        "x",
        "edge-1",
        &[("node-subnet", "subnet-9")],
        &[("ipam.spidernet.io/ippool", BOTH)],
    );
    let err = block_on(e.allocate(&set, &p.input(), &att("c", "eth0"), "u", 1)).expect_err("none");
    let msg = err.to_string();
    assert!(
        msg.starts_with("no IPPool available for eth0 IPv4 of pod default/x:"),
        "{msg}"
    );
    assert!(msg.contains("test-ippool-6 skipped (nodeAffinity node-subnet In [subnet-6] does not match node edge-1 labels {node-subnet=subnet-9})"), "{msg}");
    assert!(
        msg.contains("test-ippool-7 skipped (nodeAffinity node-subnet In [subnet-7]"),
        "{msg}"
    );
    assert!(!err.is_retryable());
}

#[test]
fn exhaustion_falls_through_to_backup_pool_in_user_order() {
    let yaml = r#"
kind: SpiderIPPool
metadata: {name: small}
spec: {subnet: 10.6.0.0/16, ips: [10.6.0.10-10.6.0.11]}
---
kind: SpiderIPPool
metadata: {name: backup}
spec: {subnet: 10.6.0.0/16, ips: [10.6.1.10-10.6.1.10]}
"#;
    let set = pools(yaml);
    let e = Engine::new(MemoryStore::new(), "n1");
    let annos = [("ipam.spidernet.io/ippool", r#"{"ipv4":["small","backup"]}"#)];
    let mut got = Vec::new();
    for i in 0..3 {
        let p = Pod::new(&format!("p{i}"), "n1", &[], &annos);
        let a = block_on(e.allocate(&set, &p.input(), &att(&format!("c{i}"), "eth0"), "u", 1))
            .expect("allocated");
        got.push(a.nics[0].ipv4.clone().expect("v4").pool);
    }
    assert_eq!(got, vec!["small", "small", "backup"]);
    let p = Pod::new("p9", "n1", &[], &annos);
    let err = block_on(e.allocate(&set, &p.input(), &att("c9", "eth0"), "u", 1)).expect_err("full");
    let msg = err.to_string();
    assert!(
        msg.contains("small skipped (exhausted (2/2 allocated))"),
        "{msg}"
    );
    assert!(
        msg.contains("backup skipped (exhausted (1/1 allocated))"),
        "{msg}"
    );
    // Freeing one makes room again.
    block_on(e.release("c0", None)).expect("release");
    let a = block_on(e.allocate(&set, &p.input(), &att("c9", "eth0"), "u", 1)).expect("room");
    assert_eq!(
        a.nics[0].ipv4.as_ref().map(|x| x.pool.as_str()),
        Some("small")
    );
}

#[test]
fn repeated_add_is_idempotent_and_del_is_too() {
    let set = pools(SEED_POOLS);
    let store = Arc::new(MemoryStore::new());
    let e = Engine::new(store.clone(), "n6");
    let p = Pod::new(
        "p",
        "n6",
        &[("node-subnet", "subnet-6")],
        &[("ipam.spidernet.io/ippool", BOTH)],
    );
    let a = block_on(e.allocate(&set, &p.input(), &att("c", "eth0"), "u", 1)).expect("first");
    let b = block_on(e.allocate(&set, &p.input(), &att("c", "eth0"), "u", 2)).expect("again");
    assert_eq!(a, b);
    assert_eq!(
        block_on(store.list(Filter::All))
            .expect("list")
            .leases
            .len(),
        1
    );
    assert_eq!(
        block_on(e.check(&set, &att("c", "eth0"))).expect("check"),
        a
    );
    assert_eq!(
        block_on(e.release("c", Some("eth0"))).expect("del").len(),
        1
    );
    assert_eq!(
        block_on(e.release("c", Some("eth0")))
            .expect("del again")
            .len(),
        0
    );
    assert!(matches!(
        block_on(e.check(&set, &att("c", "eth0"))),
        Err(EngineError::NotFound { .. })
    ));
}

const DUAL: &str = r#"
kind: SpiderIPPool
metadata: {name: v4}
spec: {subnet: 10.6.0.0/16, ips: [10.6.0.10-10.6.0.20], gateway: 10.6.0.1}
---
kind: SpiderIPPool
metadata: {name: v6}
spec: {subnet: "fd00:6::/64", ips: ["fd00:6::10-fd00:6::10"], gateway: "fd00:6::1"}
---
kind: SpiderIPPool
metadata: {name: net1-v4}
spec:
  subnet: 10.8.0.0/16
  ips: [10.8.0.10-10.8.0.20]
  gateway: 10.8.0.1
  routes: [{dst: 10.9.0.0/16, gw: 10.8.0.254}]
"#;

#[test]
fn dual_stack_half_success_is_rolled_back() {
    let set = pools(DUAL);
    let store = Arc::new(MemoryStore::new());
    let e = Engine::new(store.clone(), "n1");
    let annos = [(
        "ipam.spidernet.io/ippool",
        r#"{"ipv4":["v4"],"ipv6":["v6"]}"#,
    )];
    let p = Pod::new("a", "n1", &[], &annos);
    let a = block_on(e.allocate(&set, &p.input(), &att("ca", "eth0"), "u", 1)).expect("dual");
    let nic = a.nic("eth0").expect("eth0");
    assert!(nic.ipv4.is_some() && nic.ipv6.is_some());
    assert_eq!(
        nic.ipv6.as_ref().map(|x| x.address.to_string()).as_deref(),
        Some("fd00:6::10/64")
    );
    // v6 pool now full: the next dual-stack request must fail and leave no IPv4 behind.
    let q = Pod::new("b", "n1", &[], &annos);
    let err =
        block_on(e.allocate(&set, &q.input(), &att("cb", "eth0"), "u", 1)).expect_err("v6 full");
    assert!(err.to_string().contains("eth0 IPv6"), "{err}");
    let left = block_on(store.list(Filter::All)).expect("list").leases;
    assert_eq!(left.len(), 2, "only pod a's two records: {left:?}");
    // And the IPv4 the failed request had picked is not lost: 10 more fit.
    for i in 0..10 {
        let r = Pod::new(
            &format!("r{i}"),
            "n1",
            &[],
            &[("ipam.spidernet.io/ippool", r#"{"ipv4":["v4"]}"#)],
        );
        block_on(e.allocate(&set, &r.input(), &att(&format!("r{i}"), "eth0"), "u", 1))
            .expect("fits");
    }
}

#[test]
fn ippools_allocates_every_nic_on_first_add_and_replays_later() {
    let set = pools(DUAL);
    let store = Arc::new(MemoryStore::new());
    let e = Engine::new(store.clone(), "n1");
    let annos = [
        (
            "ipam.spidernet.io/ippools",
            r#"[{"interface":"eth0","ipv4":["v4"],"ipv6":["v6"]},{"interface":"net1","ipv4":["net1-v4"],"cleangateway":true}]"#,
        ),
        (
            "ipam.spidernet.io/routes",
            r#"[{"dst":"172.16.0.0/16","gw":"10.8.0.1"}]"#,
        ),
    ];
    let p = Pod::new("m", "n1", &[], &annos);
    let first = block_on(e.allocate(&set, &p.input(), &att("c", "eth0"), "u", 1)).expect("eth0");
    assert_eq!(first.nics.len(), 2);
    assert_eq!(
        block_on(store.list(Filter::All))
            .expect("list")
            .leases
            .len(),
        3
    );
    let second = block_on(e.allocate(&set, &p.input(), &att("c", "net1"), "u", 1)).expect("net1");
    assert_eq!(first, second, "net1's ADD returns what eth0's ADD recorded");
    let net1 = second.nic("net1").expect("net1");
    assert!(net1.clean_gateway);
    let routes: Vec<String> = net1
        .routes
        .iter()
        .map(|r| format!("{} via {}", r.dst, r.gw))
        .collect();
    assert_eq!(
        routes,
        vec!["10.9.0.0/16 via 10.8.0.254", "172.16.0.0/16 via 10.8.0.1"]
    );
    assert!(!second.nic("eth0").expect("eth0").clean_gateway);
    // An interface not in the annotation is an error.
    let err = block_on(e.allocate(&set, &p.input(), &att("c2", "net7"), "u", 1)).expect_err("net7");
    assert!(
        err.to_string().contains("interface net7 is not listed"),
        "{err}"
    );
}

#[test]
fn route_to_unknown_subnet_is_refused_before_anything_is_kept() {
    let set = pools(DUAL);
    let store = Arc::new(MemoryStore::new());
    let e = Engine::new(store.clone(), "n1");
    let annos = [
        ("ipam.spidernet.io/ippool", r#"{"ipv4":["v4"]}"#),
        (
            "ipam.spidernet.io/routes",
            r#"[{"dst":"172.16.0.0/16","gw":"10.99.0.1"}]"#,
        ),
    ];
    let p = Pod::new("m", "n1", &[], &annos);
    let err = block_on(e.allocate(&set, &p.input(), &att("c", "eth0"), "u", 1)).expect_err("route");
    assert!(matches!(err, EngineError::UnroutableRoute { .. }), "{err}");
    assert!(block_on(store.list(Filter::All))
        .expect("list")
        .leases
        .is_empty());
}

#[test]
fn cni_and_cluster_defaults_apply_in_order() {
    let yaml = r#"
kind: SpiderIPPool
metadata: {name: cluster-default}
spec: {subnet: 10.6.0.0/16, ips: [10.6.0.10], default: true}
---
kind: SpiderIPPool
metadata: {name: from-cni}
spec: {subnet: 10.6.0.0/16, ips: [10.6.0.20]}
"#;
    let set = pools(yaml);
    let e = Engine::new(MemoryStore::new(), "n1");
    let p = Pod::new("a", "n1", &[], &[]);
    let cni = CniDefaults {
        default_ipv4_ippool: vec!["from-*".into()],
        clean_gateway: true,
        ..Default::default()
    };
    let mut input = p.input();
    input.cni = Some(&cni);
    let a = block_on(e.allocate(&set, &input, &att("c1", "eth0"), "u", 1)).expect("cni default");
    assert_eq!(
        a.nics[0].ipv4.as_ref().map(|x| x.pool.as_str()),
        Some("from-cni")
    );
    assert!(a.nics[0].clean_gateway);
    let b = block_on(e.allocate(&set, &p.input(), &att("c2", "eth0"), "u", 1))
        .expect("cluster default");
    assert_eq!(
        b.nics[0].ipv4.as_ref().map(|x| x.pool.as_str()),
        Some("cluster-default")
    );
}

#[test]
fn gc_frees_exactly_the_attachments_not_listed_on_this_node() {
    let set = pools(SEED_POOLS);
    let store = Arc::new(MemoryStore::new());
    let e6 = Engine::new(store.clone(), "n6");
    let e7 = Engine::new(store.clone(), "n7");
    let annos = [("ipam.spidernet.io/ippool", BOTH)];
    for i in 0..4 {
        let p = Pod::new(
            &format!("a{i}"),
            "n6",
            &[("node-subnet", "subnet-6")],
            &annos,
        );
        block_on(e6.allocate(&set, &p.input(), &att(&format!("c{i}"), "eth0"), "u", 1))
            .expect("ok");
    }
    let q = Pod::new("b", "n7", &[("node-subnet", "subnet-7")], &annos);
    block_on(e7.allocate(&set, &q.input(), &att("other", "eth0"), "u", 1)).expect("ok");
    let freed = block_on(e6.gc("", &[att("c1", "eth0"), att("c3", "eth0")])).expect("gc");
    let mut freed: Vec<String> = freed.into_iter().map(|l| l.owner.container_id).collect();
    freed.sort();
    assert_eq!(freed, vec!["c0", "c2"]);
    let left: HashSet<String> = block_on(store.list(Filter::All))
        .expect("list")
        .leases
        .into_iter()
        .map(|l| l.owner.container_id)
        .collect();
    assert_eq!(
        left,
        ["c1", "c3", "other"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
}

#[test]
fn two_nodes_sharing_one_pool_never_hand_out_one_ip_twice() {
    let yaml = r#"
kind: SpiderIPPool
metadata: {name: shared}
spec: {subnet: 10.6.0.0/16, ips: [10.6.0.1-10.6.0.50]}
"#;
    let set = pools(yaml);
    let store = Arc::new(MemoryStore::new());
    let engines: Vec<Engine<Arc<MemoryStore>>> = (0..4)
        .map(|i| Engine::new(store.clone(), format!("node-{i}")))
        .collect();
    let annos = [("ipam.spidernet.io/ippool", r#"{"ipv4":["shared"]}"#)];
    let pods: Vec<Pod> = (0..60)
        .map(|i| Pod::new(&format!("p{i}"), "n", &[], &annos))
        .collect();
    let futs = pods.iter().enumerate().map(|(i, p)| {
        let e = &engines[i % 4];
        let set = &set;
        async move {
            e.allocate(set, &p.input(), &att(&format!("c{i}"), "eth0"), "u", 1)
                .await
        }
    });
    let results = block_on(futures::future::join_all(futs));
    let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 50, "exactly the pool's size succeeds");
    let ips: HashSet<String> = ok
        .iter()
        .map(|a| {
            a.nics[0]
                .ipv4
                .as_ref()
                .map(|x| x.address.to_string())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(ips.len(), 50, "no duplicate");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(r.to_string().contains("exhausted (50/50 allocated)"), "{r}");
    }
}

/// A store without multi-object transactions (the Kubernetes store) can be cut between two
/// writes: the IPv4 record of a dual-stack ADD is stored, the IPv6 one is not. The retried ADD
/// keeps the IPv4 address and claims only the missing IPv6 one.
#[test]
fn retried_add_completes_an_allocation_cut_short() {
    use spiderpool_core::store::{Lease, Owner, Txn};
    let set = pools(DUAL);
    let store = Arc::new(MemoryStore::new());
    let e = Engine::new(store.clone(), "n1");
    let annos = [(
        "ipam.spidernet.io/ippool",
        r#"{"ipv4":["v4"],"ipv6":["v6"]}"#,
    )];
    let half = Lease {
        ip: "10.6.0.15".parse().expect("ip"),
        pool: "v4".into(),
        owner: Owner {
            pod_namespace: "default".into(),
            pod_name: "a".into(),
            pod_uid: "u".into(),
            container_id: "ca".into(),
            ifname: "eth0".into(),
            node: "n1".into(),
            network: String::new(),
            created: 1,
        },
        clean_gateway: false,
        revision: 0,
    };
    block_on(store.commit(Txn {
        claims: vec![half],
        releases: vec![],
    }))
    .expect("half written");
    let p = Pod::new("a", "n1", &[], &annos);
    let a = block_on(e.allocate(&set, &p.input(), &att("ca", "eth0"), "u", 2)).expect("completed");
    let nic = a.nic("eth0").expect("eth0");
    assert_eq!(
        nic.ipv4.as_ref().map(|x| x.address.to_string()).as_deref(),
        Some("10.6.0.15/16"),
        "the stored IPv4 address is kept"
    );
    assert_eq!(
        nic.ipv6.as_ref().map(|x| x.address.to_string()).as_deref(),
        Some("fd00:6::10/64")
    );
    assert_eq!(
        block_on(store.list(Filter::Container("ca")))
            .expect("list")
            .leases
            .len(),
        2
    );
    // Complete now: the next ADD is a pure replay.
    let again = block_on(e.allocate(&set, &p.input(), &att("ca", "eth0"), "u", 3)).expect("replay");
    assert_eq!(again, a);
}

/// `adopt` moves an earlier sandbox's addresses to the new one when the pool is still the pod's
/// here, and leaves them when it is not (a node of another zone).
#[test]
fn adopt_moves_addresses_only_within_the_pods_pools() {
    let set = pools(SEED_POOLS);
    let store = Arc::new(MemoryStore::new());
    let annos = [("ipam.spidernet.io/ippool", BOTH)];
    let e6 = Engine::new(store.clone(), "controller-node-1");
    let p = Pod::new(
        "web-0",
        "controller-node-1",
        &[("node-subnet", "subnet-6")],
        &annos,
    );
    let first = block_on(e6.allocate(&set, &p.input(), &att("old", "eth0"), "u1", 1)).expect("add");
    let old = block_on(store.list(Filter::Container("old")))
        .expect("list")
        .leases;
    // Another node of the same zone adopts: same address, old sandbox holds nothing.
    let e6b = Engine::new(store.clone(), "controller-node-2");
    let q = Pod::new(
        "web-0",
        "controller-node-2",
        &[("node-subnet", "subnet-6")],
        &annos,
    );
    let moved =
        block_on(e6b.adopt(&set, &q.input(), &old, &att("new", "eth0"), "u2", 2)).expect("adopt");
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].ip, old[0].ip);
    assert_eq!(moved[0].owner.node, "controller-node-2");
    assert!(block_on(store.list(Filter::Container("old")))
        .expect("list")
        .leases
        .is_empty());
    let again =
        block_on(e6b.allocate(&set, &q.input(), &att("new", "eth0"), "u2", 2)).expect("replay");
    assert_eq!(
        again.nic("eth0").map(|n| &n.ipv4),
        first.nic("eth0").map(|n| &n.ipv4)
    );
    // A node of the other zone cannot use test-ippool-6: nothing moves.
    let now = block_on(store.list(Filter::Container("new")))
        .expect("list")
        .leases;
    let e7 = Engine::new(store.clone(), "worker-node-1");
    let r = Pod::new(
        "web-0",
        "worker-node-1",
        &[("node-subnet", "subnet-7")],
        &annos,
    );
    let none =
        block_on(e7.adopt(&set, &r.input(), &now, &att("third", "eth0"), "u3", 3)).expect("adopt");
    assert!(none.is_empty(), "{none:?}");
    assert_eq!(
        block_on(store.list(Filter::Container("new")))
            .expect("list")
            .leases
            .len(),
        1
    );
}
