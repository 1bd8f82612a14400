//! Per-allocation cost in a /16 and a /8 pool at 0 %, 50 % and 99 % fill: our next-fit bitmap
//! against a baseline that does what Spiderpool does for every allocation (expand the pool's
//! `ips`, `excludeIPs` and reserved ranges into address lists, collect the used addresses, scan
//! for the first free one). Both run in the same process, on the same fill pattern.
//!
//! Run: `cargo bench -p spiderpool-core --bench allocator`
//! (set `BENCH_QUICK=1` to skip the /8 baseline, which takes seconds per iteration).

use std::collections::HashSet;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use futures::executor::block_on;
use spiderpool_core::bitmap::Allocator;
use spiderpool_core::engine::{Attachment, Engine};
use spiderpool_core::range::{IpFamily, IpRange, IpSet};
use spiderpool_core::select::{SelectionInput, ANNO_IPPOOL};
use spiderpool_core::store::{Lease, LeaseStore, MemoryStore, Owner, Txn};
use spiderpool_core::types::{IpPoolSpec, Object, ObjectMeta, SpiderIpPool};
use spiderpool_core::PoolSet;

/// Deterministic pseudo-random choice of which addresses are used, for a fill in per mille.
fn is_used(i: u32, fill_permille: u32) -> bool {
    let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    (h % 1000) < fill_permille as u64
}

struct Pool {
    label: &'static str,
    first: u32,
    last: u32,
    /// A few excluded and reserved ranges, as real pools have.
    excluded: Vec<(u32, u32)>,
    reserved: Vec<(u32, u32)>,
}

fn pools() -> Vec<Pool> {
    let mk = |label, base: u32, bits: u32| {
        let last = base + ((1u32 << bits) - 1);
        Pool {
            label,
            first: base + 2,
            last: last - 1,
            excluded: vec![(base + 2, base + 20), (base + 1000, base + 1010)],
            reserved: vec![(base + 30, base + 40)],
        }
    };
    vec![mk("/16", 0x0a06_0000, 16), mk("/8", 0x0b00_0000, 24)]
}

fn set(ranges: &[(u32, u32)]) -> IpSet {
    IpSet::from_ranges(
        IpFamily::V4,
        ranges.iter().filter_map(|&(a, b)| {
            IpRange::new(IpAddr::V4(Ipv4Addr::from(a)), IpAddr::V4(Ipv4Addr::from(b)))
        }),
    )
}

/// Spiderpool's per-allocation work (IPAM `genRandomIP` in v1.2): expand every range into a list
/// of addresses, put excluded, reserved and used addresses into sets, return the lowest free one.
fn baseline_allocate(p: &Pool, used: &[u32]) -> Option<u32> {
    let all: Vec<u32> = (p.first..=p.last).collect();
    let excluded: HashSet<u32> = p.excluded.iter().flat_map(|&(a, b)| a..=b).collect();
    let reserved: HashSet<u32> = p.reserved.iter().flat_map(|&(a, b)| a..=b).collect();
    let used: HashSet<u32> = used.iter().copied().collect();
    all.into_iter()
        .find(|ip| !excluded.contains(ip) && !reserved.contains(ip) && !used.contains(ip))
}

fn bench_allocator(c: &mut Criterion) {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let mut group = c.benchmark_group("allocate+release");
    for p in pools() {
        let space = set(&[(p.first, p.last)])
            .subtract(&set(&p.excluded))
            .subtract(&set(&p.reserved));
        for fill in [0u32, 500, 990] {
            let id = format!("{} {}%", p.label, fill / 10);
            let mut alloc = Allocator::new(space.clone(), 12345);
            let mut used_list = Vec::new();
            for i in 0..space.count() as u32 {
                if is_used(i, fill) {
                    if let Some(ip) = space.nth_ip(i as u128) {
                        alloc.mark_used(ip);
                        if let IpAddr::V4(v4) = ip {
                            used_list.push(u32::from(v4));
                        }
                    }
                }
            }
            group.sample_size(100);
            group.measurement_time(Duration::from_secs(3));
            group.warm_up_time(Duration::from_secs(1));
            group.bench_function(BenchmarkId::new("bitmap", &id), |b| {
                b.iter(|| {
                    let ip = alloc.take();
                    if let Some(ip) = ip {
                        alloc.release(black_box(ip));
                    }
                    ip
                })
            });
            if quick && p.label == "/8" {
                continue;
            }
            group.sample_size(10);
            group.warm_up_time(Duration::from_millis(1));
            group.measurement_time(Duration::from_secs(if p.label == "/8" { 20 } else { 3 }));
            group.bench_function(BenchmarkId::new("spiderpool-baseline", &id), |b| {
                b.iter(|| baseline_allocate(black_box(&p), black_box(&used_list)))
            });
        }
    }
    group.finish();
}

/// A memory store whose `pool` holds `ips`, each for a filler container of another node.
fn filled_store(pool: &str, ips: impl Iterator<Item = IpAddr>) -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    let claims: Vec<Lease> = ips
        .enumerate()
        .map(|(n, ip)| Lease {
            ip,
            pool: pool.into(),
            owner: Owner {
                pod_namespace: "ns".into(),
                pod_name: format!("filler-{n}"),
                pod_uid: "u".into(),
                container_id: format!("filler-{n}"),
                ifname: "eth0".into(),
                node: "other".into(),
                network: "net".into(),
                created: 0,
            },
            clean_gateway: false,
            revision: 0,
        })
        .collect();
    block_on(store.commit(Txn {
        claims,
        releases: vec![],
    }))
    .expect("fill");
    store
}

/// The whole engine path (selection, cache pick, store claim, release) over the memory store.
fn bench_engine(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine allocate+release (memory store)");
    let pool = SpiderIpPool {
        metadata: ObjectMeta {
            name: "p16".into(),
            ..Default::default()
        },
        spec: IpPoolSpec {
            subnet: "10.6.0.0/16".into(),
            ips: vec!["10.6.0.2-10.6.255.254".into()],
            gateway: Some("10.6.0.1".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let pools = PoolSet::build(&[Object::IpPool(pool)]).expect("valid pool");
    let space = pools.pools["p16"].allocatable(pools.reserved(IpFamily::V4));
    for fill in [0u32, 500, 990] {
        let store = filled_store(
            "p16",
            (0..space.count() as u32)
                .filter(|&i| is_used(i, fill))
                .filter_map(|i| space.nth_ip(i as u128)),
        );
        let engine = Engine::new(store, "node-1");
        let annos = [(ANNO_IPPOOL.to_string(), r#"{"ipv4":["p16"]}"#.to_string())].into();
        let input = SelectionInput {
            pod_namespace: "ns",
            pod_name: "bench",
            pod_annotations: Some(&annos),
            node_name: "node-1",
            ..Default::default()
        };
        let att = Attachment {
            container_id: "bench".into(),
            ifname: "eth0".into(),
        };
        group.bench_function(
            BenchmarkId::new("engine", format!("/16 {}%", fill / 10)),
            |b| {
                b.iter(|| {
                    block_on(engine.allocate(&pools, &input, &att, "u", 0)).expect("allocated");
                    block_on(engine.release("bench", Some("eth0"))).expect("released");
                })
            },
        );
    }
    group.finish();
}

/// The backup-pool path: every request names a full 1,000-address primary before an empty backup.
/// `re-read only when changed` is the engine as it is; the baseline forgets the primary's cache
/// before each ADD, which costs what the engine did before pool revisions (one listing of the
/// whole primary per ADD). Also prints pool listings per ADD for both.
fn bench_backup_path(c: &mut Criterion) {
    let yaml = r#"
kind: SpiderIPPool
metadata: {name: primary}
spec: {subnet: 10.33.0.0/16, ips: [10.33.0.1-10.33.3.232]}
---
kind: SpiderIPPool
metadata: {name: backup}
spec: {subnet: 10.6.0.0/16, ips: [10.6.0.2-10.6.255.254]}
"#;
    let pools = spiderpool_core::manifest::pool_set(yaml).expect("valid pools");
    let space = pools.pools["primary"].allocatable(pools.reserved(IpFamily::V4));
    let mut group = c.benchmark_group("engine backup path (memory store)");
    for baseline in [false, true] {
        let store = filled_store(
            "primary",
            (0..space.count()).filter_map(|i| space.nth_ip(i)),
        );
        let engine = Engine::new(store, "node-1");
        let annos = [(
            ANNO_IPPOOL.to_string(),
            r#"{"ipv4":["primary","backup"]}"#.to_string(),
        )]
        .into();
        let input = SelectionInput {
            pod_namespace: "ns",
            pod_name: "bench",
            pod_annotations: Some(&annos),
            node_name: "node-1",
            ..Default::default()
        };
        let att = Attachment {
            container_id: "bench".into(),
            ifname: "eth0".into(),
        };
        let add_del = || {
            if baseline {
                engine.invalidate(Some("primary"));
            }
            let a = block_on(engine.allocate(&pools, &input, &att, "u", 0)).expect("allocated");
            debug_assert_eq!(
                a.nics[0].ipv4.as_ref().map(|x| x.pool.as_str()),
                Some("backup")
            );
            block_on(engine.release("bench", Some("eth0"))).expect("released");
        };
        // Listings per ADD, counted by the engine.
        let before = engine.stats().pool_reads;
        for _ in 0..1000 {
            add_del();
        }
        let per_add = (engine.stats().pool_reads - before) as f64 / 1000.0;
        let label = if baseline {
            "baseline: re-list per ADD"
        } else {
            "re-read only when changed"
        };
        eprintln!("backup path, {label}: {per_add:.3} pool listings per ADD");
        group.bench_function(BenchmarkId::new("allocate+release", label), |b| {
            b.iter(add_del)
        });
    }
    group.finish();
}

criterion_group!(benches, bench_allocator, bench_engine, bench_backup_path);
criterion_main!(benches);
