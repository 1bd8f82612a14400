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
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The allocator against a model on pools of up to ~300,000 addresses, so the hierarchical
    /// bitmap has 3 and 4 levels (64, 4,096 and 262,144 addresses per summary bit) and runs of
    /// takes fill whole words and whole summary blocks.
    #[test]
    fn allocator_matches_model_over_three_and_more_bitmap_levels(
        space in prop::collection::vec((0..300_000u32, 1..120_000u32), 1..4),
        ops in prop::collection::vec((0..4u8, 0..300_000u32, 1..9_000u32), 1..30),
        hint in any::<u64>(),
    ) {
        let ranges: Vec<(u32, u32)> = space.iter().map(|&(s, len)| (s, (s + len).min(299_999))).collect();
        let set = set_of(&ranges);
        let model_space = model_of(&ranges);
        let mut alloc = Allocator::new(set, hint);
        prop_assert_eq!(alloc.capacity(), model_space.len() as u128);
        let mut used: BTreeSet<u32> = BTreeSet::new();
        for (op, x, k) in ops {
            match op {
                // A run of takes (fills words and summary blocks).
                0 | 3 => {
                    let k = if op == 3 { 1 } else { k };
                    for _ in 0..k {
                        match alloc.take() {
                            Some(g) => {
                                let n = (ip_to_u128(g) as u32) - BASE;
                                prop_assert!(model_space.contains(&n), "outside the space: {}", g);
                                prop_assert!(used.insert(n), "handed out twice: {}", g);
                            }
                            None => {
                                prop_assert_eq!(used.len(), model_space.len(), "a free address existed");
                                break;
                            }
                        }
                    }
                }
                // Release a block of up to 9,000 consecutive addresses.
                1 => {
                    for y in x..x.saturating_add(k).min(300_000) {
                        let was = used.remove(&y);
                        prop_assert_eq!(alloc.release(ip(y)), was);
                    }
                }
                _ => {
                    let fresh = model_space.contains(&x) && !used.contains(&x);
                    prop_assert_eq!(alloc.mark_used(ip(x)), fresh);
                    if fresh { used.insert(x); }
                }
            }
            prop_assert_eq!(alloc.used(), used.len() as u128);
        }
        // Whatever is left is found, exactly once each.
        let mut rest = BTreeSet::new();
        while let Some(g) = alloc.take() {
            let n = (ip_to_u128(g) as u32) - BASE;
            prop_assert!(rest.insert(n) && !used.contains(&n), "{} handed out twice", g);
        }
        let free: BTreeSet<u32> = model_space.difference(&used).copied().collect();
        prop_assert_eq!(rest, free);
    }
}

/// A pool or subnet document with fields drawn from small, mostly plausible alphabets, so that
/// `PoolSet::build` is reached with overlapping, nested, reserved and inherited objects.
fn structured_object() -> impl Strategy<Value = serde_json::Value> {
    let addr = prop_oneof![
        (0..3u8, 0..256u16).prop_map(|(c, d)| format!("10.{c}.0.{d}")),
        (0..64u16).prop_map(|d| format!("fd00::{d:x}")),
        "[0-9a-f:.]{0,10}",
    ];
    let range = prop_oneof![
        addr.clone(),
        (addr.clone(), addr.clone()).prop_map(|(a, b)| format!("{a}-{b}")),
    ];
    let cidr = prop_oneof![
        (
            0..3u8,
            prop_oneof![Just(16u8), Just(24), Just(31), Just(32), 8..33u8]
        )
            .prop_map(|(c, l)| format!("10.{c}.0.0/{l}")),
        Just("fd00::/120".to_string()),
        Just("10.0.0.0/24".to_string()),
        "[0-9./]{0,12}",
    ];
    (
        0..3u8,
        "[a-c]{1,2}",
        cidr,
        prop::collection::vec(range.clone(), 0..3),
        prop::collection::vec(range, 0..2),
        prop::option::of(addr),
        any::<bool>(),
    )
        .prop_map(|(kind, name, subnet, ips, excl, gw, default)| {
            let kind = ["SpiderIPPool", "SpiderSubnet", "SpiderReservedIP"][kind as usize];
            let mut spec = serde_json::json!({"subnet": subnet, "ips": ips, "excludeIPs": excl, "default": default});
            if let Some(g) = gw {
                spec["gateway"] = serde_json::Value::String(g);
            }
            if kind == "SpiderReservedIP" {
                spec = serde_json::json!({"ips": spec["ips"].clone()});
            }
            serde_json::json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": kind, "metadata": {"name": name}, "spec": spec})
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Structured manifests reach `PoolSet::build` (nearly every case) and never panic; a set
    /// that builds hands out only addresses of a pool's ips, outside excludeIPs, reserved IPs and
    /// its (own or inherited) gateway.
    #[test]
    fn structured_pools_never_panic_and_built_sets_hold(objs in prop::collection::vec(structured_object(), 1..6)) {
        let text = objs.iter().map(|o| serde_json::to_string(o).expect("json")).collect::<Vec<_>>().join("\n---\n");
        let docs = parse_documents(&text).expect("JSON documents parse as YAML");
        let objects: Vec<_> = docs.into_iter().filter_map(|d| d.object.ok()).collect();
        prop_assert_eq!(objects.len(), objs.len(), "every document decodes to an object");
        if let Ok(set) = PoolSet::build(&objects) {
            for pool in set.pools.values() {
                let space = pool.allocatable(set.reserved(pool.family));
                let mut alloc = Allocator::new(space, 7);
                for _ in 0..64 {
                    let Some(a) = alloc.take() else { break };
                    prop_assert!(pool.ips.contains(a), "{} outside ips of {}", a, pool.name);
                    prop_assert!(!pool.exclude.contains(a), "{} excluded in {}", a, pool.name);
                    prop_assert!(!set.reserved(pool.family).contains(a), "{} reserved", a);
                    prop_assert!(pool.gateway != Some(a), "gateway {} handed out by {}", a, pool.name);
                }
            }
        }
    }
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
    /// The gateway comes four ways: the pool's own, excluded when inside ips (Spiderpool's rule);
    /// the pool's own inside ips and not excluded (refused, naming the fix); inherited from the
    /// SpiderSubnet of the same subnet (the subnet excludes it, so a pool whose ips hold it is
    /// refused as outside the subnet); or set on a checked `Pool` inside its ips and not excluded
    /// (as an embedder may build one), where only gateway subtraction keeps it from being handed
    /// out.
    #[test]
    fn pool_never_hands_out_excluded_reserved_or_gateway(
        ips in prop::collection::vec(range_strategy(250), 1..5),
        excl in prop::collection::vec(range_strategy(250), 0..4),
        reserved in prop::collection::vec(range_strategy(250), 0..3),
        gw in 0..250u32,
        how in 0..4u8,
        hint in any::<u64>(),
    ) {
        let fmt = |v: &[(u32, u32)]| v.iter().map(|&(s, e)| format!("{}-{}", ip(s), ip(e))).collect::<Vec<_>>();
        let gw_in_ips = model_of(&ips).contains(&gw);
        let gw_usable = gw_in_ips && !model_of(&excl).contains(&gw);
        let mut exclude = fmt(&excl);
        let mut docs = Vec::new();
        let inherited = how == 2;
        if how == 0 && gw_in_ips {
            exclude.push(ip(gw).to_string());
        }
        let mut spec = serde_json::json!({"subnet": "10.0.0.0/24", "ips": fmt(&ips), "excludeIPs": exclude});
        if inherited {
            docs.push(serde_json::json!({"kind": "SpiderSubnet", "metadata": {"name": "s"},
                "spec": {"subnet": "10.0.0.0/24", "ips": ["10.0.0.0-10.0.0.255"], "excludeIPs": [ip(gw).to_string()], "gateway": ip(gw).to_string()}}));
        } else if how < 2 {
            spec["gateway"] = serde_json::Value::String(ip(gw).to_string());
        }
        docs.push(serde_json::json!({"kind": "SpiderIPPool", "metadata": {"name": "p"}, "spec": spec}));
        if !reserved.is_empty() {
            docs.push(serde_json::json!({"kind": "SpiderReservedIP", "metadata": {"name": "r"}, "spec": {"ips": fmt(&reserved)}}));
        }
        let text = docs.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n---\n");
        let built = pool_set(&text);
        if how == 1 && gw_usable {
            let errs = built.expect_err("a gateway inside ips and not excluded must be refused");
            let text = format!("{errs:?}");
            prop_assert!(text.contains("is inside spec.ips: add it to spec.excludeIPs too"), "{}", text);
            return Ok(());
        }
        if inherited && gw_usable {
            let errs = built.expect_err("a pool holding its subnet's excluded gateway must be refused");
            let text = format!("{errs:?}");
            prop_assert!(text.contains("are not in SpiderSubnet s"), "{}", text);
            return Ok(());
        }
        let set = built.expect("valid set");
        let mut pool = set.pools["p"].clone();
        if how == 3 {
            prop_assert_eq!(pool.gateway, None);
            pool.gateway = Some(ip(gw));
        }
        prop_assert_eq!(pool.gateway, Some(ip(gw)), "gateway (inherited: {})", inherited);
        let mut expected = model_of(&ips);
        for x in model_of(&excl).union(&model_of(&reserved)) {
            expected.remove(x);
        }
        expected.remove(&gw);
        let mut alloc = Allocator::new(pool.allocatable(set.reserved(IpFamily::V4)), hint);
        let mut got = BTreeSet::new();
        while let Some(a) = alloc.take() {
            let n = (ip_to_u128(a) as u32) - BASE;
            prop_assert!(expected.contains(&n), "handed out {} (excluded, reserved, gateway or outside ips)", a);
            prop_assert!(got.insert(n), "{} twice", a);
        }
        prop_assert_eq!(got, expected, "every allowed address is found");
        // totalIPCount counts ips minus excludeIPs, as Spiderpool does (an inherited gateway is
        // not in excludeIPs, so it counts).
        let mut total = model_of(&ips);
        for x in model_of(&excl) { total.remove(&x); }
        if how == 0 && gw_in_ips { total.remove(&gw); }
        prop_assert_eq!(pool.total().count(), total.len() as u128);
    }
}
