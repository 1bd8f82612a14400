use super::*;
use crate::store::Owner;
use serde_json::json;

fn pool(name: &str, ips: &str) -> SpiderIpPool {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"subnet": "10.6.0.0/16", "ips": [ips]}
    }))
    .expect("pool")
}

fn rec(ip: &str, pool: &str, pod: &str, uid: &str) -> Lease {
    Lease {
        ip: ip.parse().expect("ip"),
        pool: pool.into(),
        owner: Owner {
            pod_namespace: "default".into(),
            pod_name: pod.into(),
            pod_uid: uid.into(),
            container_id: format!("c-{pod}"),
            ifname: "eth0".into(),
            node: "node-a".into(),
            network: "net".into(),
            created: 1,
        },
        clean_gateway: false,
        revision: 3,
    }
}

fn running(uid: &str, ips: &[&str]) -> PodState {
    PodState {
        uid: uid.into(),
        phase: Some("Running".into()),
        ips: ips.iter().map(|i| i.parse().expect("ip")).collect(),
        ..Default::default()
    }
}

fn key(name: &str) -> (String, String) {
    ("default".into(), name.into())
}

fn run(
    records: &[Lease],
    pools: &[SpiderIpPool],
    pods: &HashMap<(String, String), PodState>,
    sts: &HashMap<(String, String), (i64, i64)>,
) -> Vec<Finding> {
    audit(&Input {
        records,
        pools,
        subnets: &[],
        endpoints: &[],
        pods: Some(pods),
        statefulsets: sts,
        now: 1_000,
        gc: GcTiming {
            interval: 10,
            margin: 30,
        },
    })
    .1
}

fn kinds(f: &[Finding]) -> Vec<(Kind, String)> {
    f.iter()
        .map(|f| (f.kind, f.ip.map(|i| i.to_string()).unwrap_or_default()))
        .collect()
}

#[test]
fn a_consistent_cluster_has_no_findings() {
    let pools = [pool("p", "10.6.168.60-10.6.168.69")];
    let records = [rec("10.6.168.60", "p", "a", "u1")];
    let pods = HashMap::from([(key("a"), running("u1", &["10.6.168.60"]))]);
    assert_eq!(run(&records, &pools, &pods, &HashMap::new()), vec![]);
}

#[test]
fn leaks_are_judged_as_gc_judges_them() {
    let pools = [pool("p", "10.6.168.60-10.6.168.69")];
    let records = [
        rec("10.6.168.60", "p", "gone", "u1"),
        rec("10.6.168.61", "p", "done", "u2"),
        rec("10.6.168.62", "p", "new", "old-uid"),
        rec("10.6.168.63", "p", "db-1", "u4"),
        rec("10.6.168.64", "p", "db-5", "u5"),
        rec("10.6.168.65", "p", "mirror", "config-hash"),
    ];
    let mut finished = running("u2", &[]);
    finished.phase = Some("Succeeded".into());
    let mut mirror = running("mirror-uid", &["10.6.168.65"]);
    mirror.mirror_of = Some("config-hash".into());
    let pods = HashMap::from([
        (key("done"), finished),
        (key("new"), running("new-uid", &[])),
        (key("mirror"), mirror),
    ]);
    // db-1 is wanted (replicas 3), db-5 is not.
    let sts = HashMap::from([(key("db"), (0, 3))]);
    let f = run(&records, &pools, &pods, &sts);
    let leaks: Vec<(String, Option<String>)> = f
        .iter()
        .filter(|f| f.kind == Kind::Leak)
        .map(|f| (f.ip.expect("ip").to_string(), f.reason.clone()))
        .collect();
    assert_eq!(
        leaks,
        vec![
            ("10.6.168.60".into(), Some("pod_gone".into())),
            ("10.6.168.61".into(), Some("pod_finished".into())),
            ("10.6.168.62".into(), Some("pod_replaced".into())),
            ("10.6.168.64".into(), Some("pod_gone".into())),
        ]
    );
    assert!(f.iter().all(Finding::releasable));
    assert_eq!(f[0].gc_within_secs, Some(20));
    assert_eq!(f[0].container_id, "c-gone");
    assert!(f[0].detail.contains("spiderctl release --ip 10.6.168.60"));
}

#[test]
fn records_outside_their_pool_or_of_a_missing_pool_are_found() {
    let pools = [pool("p", "10.6.168.60-10.6.168.62")];
    let records = [
        rec("10.6.168.69", "p", "a", "u1"),
        rec("10.7.0.1", "gone-pool", "b", "u2"),
    ];
    let pods = HashMap::from([
        (key("a"), running("u1", &["10.6.168.69"])),
        (key("b"), running("u2", &[])),
    ]);
    let f = run(&records, &pools, &pods, &HashMap::new());
    assert_eq!(
        kinds(&f),
        vec![
            (Kind::PoolMissing, "10.7.0.1".into()),
            (Kind::OutsidePool, "10.6.168.69".into()),
        ]
    );
}

#[test]
fn pod_addresses_without_a_record_or_held_for_another_pod_are_found() {
    let pools = [pool("p", "10.6.168.60-10.6.168.69")];
    let records = [rec("10.6.168.61", "p", "owner", "u1")];
    let mut host = running("u9", &["10.6.168.66"]);
    host.host_network = true;
    let pods = HashMap::from([
        (key("owner"), running("u1", &["10.6.168.61"])),
        (
            key("untracked"),
            running("u2", &["10.6.168.60", "192.0.2.1"]),
        ),
        (key("thief"), running("u3", &["10.6.168.61"])),
        (key("host"), host),
    ]);
    let f = run(&records, &pools, &pods, &HashMap::new());
    assert_eq!(
        kinds(&f),
        vec![
            (Kind::PodIpNotHeld, "10.6.168.60".into()),
            (Kind::PodIpHeldByOther, "10.6.168.61".into()),
        ]
    );
    assert!(f.iter().all(|f| !f.releasable()), "never freed by a report");
    assert_eq!(f[1].pod, "default/thief");
    assert!(f[1].detail.contains("default/owner"), "{}", f[1].detail);
}

#[test]
fn conflicts_endpoints_and_ledgers_are_reported() {
    let pools = [pool("p", "10.6.168.60-10.6.168.69")];
    let mut conflict = rec("10.6.168.62", "p", "", "");
    conflict.owner.pod_namespace.clear();
    conflict.owner.network = crate::engine::CONFLICT_NETWORK.into();
    conflict.owner.container_id = format!("{}-10.6.168.62", crate::engine::CONFLICT_CONTAINER);
    conflict.owner.ifname = "aa:bb:cc:dd:ee:ff".into();
    let records = [rec("10.6.168.61", "p", "a", "u1"), conflict];
    let endpoint: SpiderEndpoint = serde_json::from_value(json!({
        "metadata": {"name": "a", "namespace": "default"},
        "status": {"current": {"uid": "u1", "node": "node-a", "ips": [
            {"interface": "eth0", "ipv4": "10.6.168.67/16", "ipv4Pool": "p"}]}}
    }))
    .expect("endpoint");
    let subnet: SpiderSubnet = serde_json::from_value(json!({
        "metadata": {"name": "s"},
        "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.0.1-10.6.255.254"]},
        "status": {"controlledIPPools": json!({
            "p": {"ips": ["10.6.168.60-10.6.168.68"]},
            "nope": {"ips": ["10.6.1.1"]}
        }).to_string()}
    }))
    .expect("subnet");
    let pods = HashMap::from([(key("a"), running("u1", &["10.6.168.61"]))]);
    let (counts, f) = audit(&Input {
        records: &records,
        pools: &pools,
        subnets: std::slice::from_ref(&subnet),
        endpoints: std::slice::from_ref(&endpoint),
        pods: Some(&pods),
        statefulsets: &HashMap::new(),
        now: 1_000,
        gc: GcTiming::default(),
    });
    assert_eq!(counts.records, 2);
    let k: Vec<Kind> = f.iter().map(|f| f.kind).collect();
    assert_eq!(
        k,
        vec![
            Kind::Conflict,
            Kind::EndpointDisagrees,
            Kind::LedgerNamesMissingPool,
            Kind::LedgerDisagrees
        ]
    );
    assert!(f[0].releasable());
    assert!(f[1].detail.contains("10.6.168.67") && f[1].detail.contains("10.6.168.61"));
}

#[test]
fn outside_kubernetes_only_the_pools_are_checked() {
    let pools = [pool("p", "10.6.168.60-10.6.168.62")];
    let records = [rec("10.6.168.61", "p", "a", "u1")];
    let (counts, f) = audit(&Input {
        records: &records,
        pools: &pools,
        subnets: &[],
        endpoints: &[],
        pods: None,
        statefulsets: &HashMap::new(),
        now: 0,
        gc: GcTiming::default(),
    });
    assert_eq!((counts.pods, f.len()), (0, 0));
}

#[test]
fn a_report_reads_back_with_the_record_identity() {
    let pools = [pool("p", "10.6.168.60-10.6.168.69")];
    let records = [rec("10.6.168.60", "p", "gone", "u1")];
    let f = run(&records, &pools, &HashMap::new(), &HashMap::new());
    let text = serde_json::to_string(&f).expect("json");
    assert!(text.contains("\"containerID\":\"c-gone\""), "{text}");
    assert!(text.contains("\"podUID\":\"u1\"") && text.contains("\"kind\":\"leak\""));
    let back: Vec<Finding> = serde_json::from_str(&text).expect("reads back");
    assert_eq!(back, f);
}
