//! Property tests: range arithmetic and the allocator against `BTreeSet` models, the engine
//! against a model of who holds what, and parsers against arbitrary input.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures::executor::block_on;
use proptest::prelude::*;
use spiderpool_core::bitmap::Allocator;
use spiderpool_core::engine::{Attachment, Engine};
use spiderpool_core::manifest::{parse_documents, pool_set};
use spiderpool_core::range::{ip_to_u128, IpFamily, IpRange, IpSet};
use spiderpool_core::select::{self, SelectionInput};
use spiderpool_core::store::{Filter, LeaseStore, MemoryStore};
use spiderpool_core::PoolSet;

const BASE: u32 = 0x0a00_0000; // 10.0.0.0

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(BASE + n))
}

fn range_strategy(universe: u32) -> impl Strategy<Value = (u32, u32)> {
    (0..universe, 0..12u32).prop_map(move |(s, len)| (s, (s + len).min(universe - 1)))
}

fn set_of(ranges: &[(u32, u32)]) -> IpSet {
    IpSet::from_ranges(
        IpFamily::V4,
        ranges
            .iter()
            .filter_map(|&(s, e)| IpRange::new(ip(s), ip(e))),
    )
}

fn model_of(ranges: &[(u32, u32)]) -> BTreeSet<u32> {
    ranges.iter().flat_map(|&(s, e)| s..=e).collect()
}

fn members(set: &IpSet) -> BTreeSet<u32> {
    set.ranges()
        .flat_map(|r| (r.start() as u32 - BASE)..=(r.end() as u32 - BASE))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn range_print_parse_round_trip(a in any::<u32>(), b in any::<u32>(), v6 in any::<bool>(), hi in any::<u128>()) {
        let (s, e) = (a.min(b), a.max(b));
        let r = if v6 {
            let s6 = hi.saturating_sub(e as u128 - s as u128);
            IpRange::from_u128(IpFamily::V6, s6, hi).expect("valid")
        } else {
            IpRange::new(IpAddr::V4(Ipv4Addr::from(s)), IpAddr::V4(Ipv4Addr::from(e))).expect("valid")
        };
        let printed = r.to_string();
        let back: IpRange = printed.parse().expect("parses");
        prop_assert_eq!(back, r);
    }

    #[test]
    fn set_ops_match_btreeset(a in prop::collection::vec(range_strategy(200), 0..8),
                              b in prop::collection::vec(range_strategy(200), 0..8)) {
        let (sa, sb) = (set_of(&a), set_of(&b));
        let (ma, mb) = (model_of(&a), model_of(&b));
        prop_assert_eq!(members(&sa), ma.clone());
        prop_assert_eq!(sa.count(), ma.len() as u128);
        prop_assert_eq!(members(&sa.union(&sb)), ma.union(&mb).copied().collect::<BTreeSet<_>>());
        prop_assert_eq!(members(&sa.subtract(&sb)), ma.difference(&mb).copied().collect::<BTreeSet<_>>());
        prop_assert_eq!(members(&sa.intersect(&sb)), ma.intersection(&mb).copied().collect::<BTreeSet<_>>());
        prop_assert_eq!(sa.overlaps(&sb), !ma.is_disjoint(&mb));
        // merged form: no two intervals touch
        let rs: Vec<_> = sa.ranges().collect();
        for w in rs.windows(2) {
            prop_assert!(w[0].end() + 1 < w[1].start());
        }
        // printing the set and parsing it again gives the same set
        prop_assert_eq!(IpSet::parse(IpFamily::V4, &sa.to_strings()).expect("parses"), sa.clone());
        // index <-> address follows sorted order
        for (i, m) in ma.iter().enumerate() {
            prop_assert_eq!(sa.nth(i as u128), Some((BASE + m) as u128));
            prop_assert_eq!(sa.index_of((BASE + m) as u128), Some(i as u128));
        }
        prop_assert_eq!(sa.nth(ma.len() as u128), None);
    }

    #[test]
    fn allocator_matches_model(space in prop::collection::vec(range_strategy(300), 1..6),
                               ops in prop::collection::vec((0..3u8, 0..300u32), 1..200),
                               hint in any::<u64>(), sparse in any::<bool>()) {
        let set = set_of(&space);
        let model_space = model_of(&space);
        let limit = if sparse { 0 } else { u128::MAX };
        let mut alloc = Allocator::with_dense_limit(set, hint, limit);
        let mut used: BTreeSet<u32> = BTreeSet::new();
        for (op, x) in ops {
            match op {
                0 => {
                    let got = alloc.take();
                    let free = model_space.difference(&used).count();
                    match got {
                        Some(g) => {
                            let n = (ip_to_u128(g) as u32) - BASE;
                            prop_assert!(model_space.contains(&n), "outside the space: {g}");
                            prop_assert!(used.insert(n), "handed out twice: {g}");
                        }
                        None => prop_assert_eq!(free, 0, "a free address existed"),
                    }
                }
                1 => {
                    let was = used.remove(&x);
                    prop_assert_eq!(alloc.release(ip(x)), was);
                }
                _ => {
                    let fresh = model_space.contains(&x) && !used.contains(&x);
                    prop_assert_eq!(alloc.mark_used(ip(x)), fresh);
                    if fresh { used.insert(x); }
                }
            }
            prop_assert_eq!(alloc.used(), used.len() as u128);
        }
    }

    #[test]
    fn allocator_next_fit_never_returns_just_released_while_others_free(n in 3u32..64, hint in any::<u64>()) {
        let set = set_of(&[(0, n - 1)]);
        let mut alloc = Allocator::new(set, hint);
        let first = alloc.take().expect("free");
        prop_assert!(alloc.release(first));
        // n-1 further allocations must all differ from the released address.
        for _ in 0..n - 1 {
            prop_assert_ne!(alloc.take(), Some(first));
        }
    }

    #[test]
    fn parsers_never_panic(s in ".{0,200}") {
        let _ = s.parse::<IpRange>();
        let _ = IpSet::parse(IpFamily::V6, &s.split(',').collect::<Vec<_>>());
        let _ = select::parse_ippools_annotation(&s);
        let _ = select::parse_ippool_annotation(&s);
        let _ = select::parse_routes_annotation(&s);
        let _ = select::wildcard_match(&s, "pool-a");
        if let Ok(docs) = parse_documents(&s) {
            let objs: Vec<_> = docs.into_iter().filter_map(|d| d.object.ok()).collect();
            let _ = PoolSet::build(&objs);
        }
    }

    #[test]
    fn json_shaped_annotations_never_panic(v4 in prop::collection::vec("[a-z*?\\[\\]!-]{0,8}", 0..4),
                                            iface in prop::option::of("[a-z0-9]{0,5}"),
                                            cg in any::<bool>()) {
        let entry = serde_json::json!({"interface": iface, "ipv4": v4, "cleangateway": cg});
        let text = serde_json::to_string(&vec![entry.clone(), entry]).expect("json");
        let annos: BTreeMap<String, String> = [(select::ANNO_IPPOOLS.to_string(), text)].into();
        let input = SelectionInput { pod_namespace: "ns", pod_name: "p", pod_annotations: Some(&annos), node_name: "n", ..Default::default() };
        let _ = select::resolve(&PoolSet::default(), &input, "eth0");
    }
}

#[derive(Debug, Clone)]
enum Op {
    Add { container: u8, node: u8 },
    Del { container: u8 },
    Gc { node: u8, keep_mask: u16 },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..16u8, 0..2u8).prop_map(|(container, node)| Op::Add { container, node }),
        2 => (0..16u8).prop_map(|container| Op::Del { container }),
        1 => (0..2u8, any::<u16>()).prop_map(|(node, keep_mask)| Op::Gc { node, keep_mask }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The engine against a model: `container -> (node, ip)`. Two engines (nodes) share a store
    /// and a pool of 6 plus a backup of 2; invariants: no IP twice, ADD succeeds iff the model has
    /// room (or already holds it), idempotent ADD, DEL and GC free exactly what the model says.
    #[test]
    fn engine_matches_model(ops in prop::collection::vec(op_strategy(), 1..60)) {
        let yaml = r#"
kind: SpiderIPPool
metadata: {name: main}
spec: {subnet: 10.0.0.0/16, ips: [10.0.0.1-10.0.0.6]}
---
kind: SpiderIPPool
metadata: {name: backup}
spec: {subnet: 10.0.0.0/16, ips: [10.0.1.1-10.0.1.2]}
"#;
        let set = pool_set(yaml).expect("valid");
        let store = Arc::new(MemoryStore::new());
        let engines = [Engine::new(store.clone(), "n0"), Engine::new(store.clone(), "n1")];
        let annos: BTreeMap<String, String> = [(select::ANNO_IPPOOL.to_string(), r#"{"ipv4":["main","backup"]}"#.to_string())].into();
        let mut model: BTreeMap<u8, (u8, IpAddr)> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Add { container, node } => {
                    let input = SelectionInput { pod_namespace: "ns", pod_name: "p", pod_annotations: Some(&annos), node_name: "n", ..Default::default() };
                    let att = Attachment { container_id: format!("c{container}"), ifname: "eth0".into() };
                    let r = block_on(engines[node as usize].allocate(&set, &input, &att, "uid", 0));
                    match (r, model.get(&container)) {
                        (Ok(a), Some((_, held))) => {
                            prop_assert_eq!(a.nics[0].ipv4.as_ref().map(|x| x.address.addr()), Some(*held), "idempotent");
                        }
                        (Ok(a), None) => {
                            let got = a.nics[0].ipv4.as_ref().map(|x| x.address.addr()).expect("v4");
                            prop_assert!(model.values().all(|(_, h)| *h != got), "duplicate {got}");
                            model.insert(container, (node, got));
                        }
                        (Err(e), held) => {
                            prop_assert!(held.is_none(), "replay failed: {e}");
                            prop_assert_eq!(model.len(), 8, "refused with room left: {}", e);
                        }
                    }
                }
                Op::Del { container } => {
                    let freed = block_on(engines[0].release(&format!("c{container}"), Some("eth0"))).expect("del");
                    prop_assert_eq!(freed.len(), usize::from(model.remove(&container).is_some()));
                }
                Op::Gc { node, keep_mask } => {
                    let valid: Vec<Attachment> = (0..16u8).filter(|c| keep_mask >> c & 1 == 1)
                        .map(|c| Attachment { container_id: format!("c{c}"), ifname: "eth0".into() }).collect();
                    let freed = block_on(engines[node as usize].gc("", &valid)).expect("gc");
                    let expect: BTreeSet<u8> = model.iter().filter(|(c, (n, _))| *n == node && keep_mask >> **c & 1 == 0).map(|(c, _)| *c).collect();
                    let got: BTreeSet<u8> = freed.iter().map(|l| l.owner.container_id[1..].parse().expect("num")).collect();
                    prop_assert_eq!(&got, &expect);
                    for c in expect { model.remove(&c); }
                }
            }
            let stored = block_on(store.list(Filter::All)).expect("list").leases;
            prop_assert_eq!(stored.len(), model.len());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A pool built from random `ips`, `excludeIPs`, reserved IPs and gateway hands out exactly the
    /// addresses of ips minus excludeIPs minus reserved minus gateway, each once, never another.
    #[test]
    fn pool_never_hands_out_excluded_reserved_or_gateway(
        ips in prop::collection::vec(range_strategy(250), 1..5),
        excl in prop::collection::vec(range_strategy(250), 0..4),
        reserved in prop::collection::vec(range_strategy(250), 0..3),
        gw in 0..250u32,
        hint in any::<u64>(),
    ) {
        use spiderpool_core::types::{IpPoolSpec, ObjectMeta, SpiderIpPool};
        use spiderpool_core::validate::Pool;
        let fmt = |v: &[(u32, u32)]| v.iter().map(|&(s, e)| format!("{}-{}", ip(s), ip(e))).collect::<Vec<_>>();
        let mut exclude = fmt(&excl);
        // A gateway inside ips must be excluded (Spiderpool's rule): keep the spec valid.
        if model_of(&ips).contains(&gw) {
            exclude.push(ip(gw).to_string());
        }
        let spec = SpiderIpPool {
            metadata: ObjectMeta { name: "p".into(), ..Default::default() },
            spec: IpPoolSpec {
                subnet: "10.0.0.0/24".into(),
                ips: fmt(&ips),
                exclude_ips: exclude,
                gateway: Some(ip(gw).to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let pool = Pool::from_spec(&spec).expect("valid pool");
        let reserved_set = set_of(&reserved);
        let mut expected = model_of(&ips);
        for x in model_of(&excl).union(&model_of(&reserved)) {
            expected.remove(x);
        }
        expected.remove(&gw);
        let mut alloc = Allocator::new(pool.allocatable(&reserved_set), hint);
        let mut got = BTreeSet::new();
        while let Some(a) = alloc.take() {
            let n = (ip_to_u128(a) as u32) - BASE;
            prop_assert!(expected.contains(&n), "handed out {} (excluded, reserved, gateway or outside ips)", a);
            prop_assert!(got.insert(n), "{} twice", a);
        }
        prop_assert_eq!(got, expected, "every allowed address is found");
        // totalIPCount counts ips minus excludeIPs, as Spiderpool does.
        let mut total = model_of(&ips);
        for x in model_of(&excl) { total.remove(&x); }
        if model_of(&ips).contains(&gw) { total.remove(&gw); }
        prop_assert_eq!(pool.total().count(), total.len() as u128);
    }
}
