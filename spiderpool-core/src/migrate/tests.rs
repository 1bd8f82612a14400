use super::*;
use serde_json::json;

fn pool(name: &str, ips: &str, allocated: serde_json::Value) -> SpiderIpPool {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"subnet": "10.6.0.0/16", "ips": [ips]},
        "status": {"allocatedIPs": allocated.to_string(), "allocatedIPCount": 1}
    }))
    .expect("pool")
}

fn endpoint(ns: &str, name: &str, uid: &str, node: &str, ip: &str, pool: &str) -> SpiderEndpoint {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "status": {
            "current": {"uid": uid, "node": node, "ips": [
                {"interface": "eth0", "ipv4": format!("{ip}/16"), "ipv4Pool": pool,
                 "ipv4Gateway": "10.6.0.1", "cleanGateway": true, "vlan": 0}
            ]},
            "ownerControllerType": "ReplicaSet", "ownerControllerName": "app-5d8f"
        }
    }))
    .expect("endpoint")
}

fn facts(uid: &str, node: &str) -> PodFacts {
    PodFacts {
        uid: uid.into(),
        node: node.into(),
        finished: false,
    }
}

fn kinds(p: &ImportPlan) -> Vec<&str> {
    p.findings.iter().map(|f| f.kind.as_str()).collect()
}

#[test]
fn a_pool_record_and_its_endpoint_become_one_record_of_the_same_pod() {
    let c = Cluster {
        pools: vec![pool(
            "p6",
            "10.6.168.60-10.6.168.69",
            json!({"10.6.168.61": {"interface": "eth0", "pod": "default/app-1", "podUid": "u1"}}),
        )],
        endpoints: vec![endpoint(
            "default",
            "app-1",
            "u1",
            "node-a",
            "10.6.168.61",
            "p6",
        )],
        pods: HashMap::from([(("default".into(), "app-1".into()), facts("u1", "node-b"))]),
        ..Default::default()
    };
    let plan = plan_import(&c, 77);
    assert!(plan.findings.is_empty(), "{:?}", plan.findings);
    assert_eq!(plan.records.len(), 1);
    let r = &plan.records[0];
    assert_eq!(r.ip.to_string(), "10.6.168.61");
    assert_eq!(r.pool, "p6");
    assert_eq!(
        (r.owner.pod_namespace.as_str(), r.owner.pod_name.as_str()),
        ("default", "app-1")
    );
    assert_eq!(r.owner.pod_uid, "u1");
    assert_eq!(
        r.owner.node, "node-a",
        "the endpoint's node wins: it is where the IPAM ran"
    );
    assert_eq!(r.owner.ifname, "eth0");
    assert_eq!(r.owner.container_id, "spiderpool-import-u1");
    assert!(is_imported(r));
    assert!(r.clean_gateway);
    assert_eq!(r.owner.created, 77);
}

#[test]
fn an_address_in_two_pools_is_imported_once_for_the_pool_the_endpoint_names() {
    let c = Cluster {
        pools: vec![
            pool(
                "a",
                "10.6.1.1-10.6.1.9",
                json!({"10.6.1.5": {"interface": "eth0", "pod": "default/x", "podUid": "ux"}}),
            ),
            pool(
                "b",
                "10.6.1.1-10.6.1.9",
                json!({"10.6.1.5": {"interface": "eth0", "pod": "default/y", "podUid": "uy"}}),
            ),
        ],
        endpoints: vec![endpoint("default", "y", "uy", "n1", "10.6.1.5", "b")],
        pods: HashMap::from([
            (("default".into(), "x".into()), facts("ux", "n1")),
            (("default".into(), "y".into()), facts("uy", "n1")),
        ]),
        ..Default::default()
    };
    let plan = plan_import(&c, 0);
    assert_eq!(plan.records.len(), 1);
    assert_eq!(plan.records[0].pool, "b");
    assert_eq!(plan.records[0].owner.pod_name, "y");
    assert_eq!(kinds(&plan), ["address-in-two-pools"]);
    assert!(plan.findings[0]
        .detail
        .contains("a (pod default/x) and b (pod default/y)"));
}

#[test]
fn endpoints_without_a_pool_record_are_imported_only_while_their_pod_runs() {
    let c = Cluster {
        pools: vec![pool("p", "10.6.2.1-10.6.2.9", json!({}))],
        endpoints: vec![
            endpoint("default", "alive", "ua", "n1", "10.6.2.1", "p"),
            endpoint("default", "gone", "ug", "n1", "10.6.2.2", "p"),
        ],
        pods: HashMap::from([(("default".into(), "alive".into()), facts("ua", "n1"))]),
        ..Default::default()
    };
    let plan = plan_import(&c, 0);
    let ips: Vec<String> = plan.records.iter().map(|l| l.ip.to_string()).collect();
    assert_eq!(ips, ["10.6.2.1"]);
    assert_eq!(
        kinds(&plan),
        [
            "endpoint-without-pool-record",
            "endpoint-without-pool-record"
        ]
    );
    assert!(plan.findings[1].detail.contains("not imported"));
}

#[test]
fn a_gone_or_replaced_pod_is_reported_and_still_imported_for_gc_to_free() {
    let c = Cluster {
        pools: vec![pool(
            "p",
            "10.6.3.1-10.6.3.9",
            json!({
                "10.6.3.1": {"interface": "eth0", "pod": "default/gone", "podUid": "g"},
                "10.6.3.2": {"interface": "eth0", "pod": "default/new", "podUid": "old"},
                "10.6.3.20": {"interface": "net1", "pod": "default/new", "podUid": "old"}
            }),
        )],
        pods: HashMap::from([(("default".into(), "new".into()), facts("fresh", "n2"))]),
        ..Default::default()
    };
    let plan = plan_import(&c, 0);
    assert_eq!(plan.records.len(), 3);
    let k = kinds(&plan);
    assert!(
        k.contains(&"pod-gone") && k.contains(&"pod-replaced"),
        "{k:?}"
    );
    assert!(k.contains(&"address-outside-pool"), "{k:?}");
    assert!(k.contains(&"pool-record-without-endpoint"), "{k:?}");
    // The replaced pod's record keeps the UID it was allocated for, so GC sees the mismatch.
    let r = plan
        .records
        .iter()
        .find(|l| l.ip.to_string() == "10.6.3.2")
        .expect("rec");
    assert_eq!(r.owner.pod_uid, "old");
    assert_eq!(
        r.owner.node, "",
        "no node from a pod that is not the record's"
    );
}

#[test]
fn the_old_allocated_ips_format_is_refused_with_what_to_do() {
    let e = parse_allocated_ips(r#"{"10.6.0.5": {"containerID": "abc", "node": "n"}}"#)
        .expect_err("no pod");
    assert!(e.contains("upgrade Spiderpool to v1.x first"), "{e}");
    let c = Cluster {
        pools: vec![serde_json::from_value(json!({
            "metadata": {"name": "old"}, "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.0.5"]},
            "status": {"allocatedIPs": "{\"10.6.0.5\": {\"containerID\": \"abc\"}}"}
        }))
        .expect("pool")],
        ..Default::default()
    };
    assert_eq!(kinds(&plan_import(&c, 0)), ["unreadable-allocated-ips"]);
}

#[test]
fn records_format_back_as_spiderpool_reads_them() {
    let c = Cluster {
        pools: vec![pool(
            "p",
            "10.6.168.60-10.6.168.69",
            json!({"10.6.168.61": {"interface": "eth0", "pod": "default/app-1", "podUid": "u1"},
                   "10.6.168.62": {"interface": "net1", "pod": "ns2/app-2", "podUid": "u2"}}),
        )],
        ..Default::default()
    };
    let plan = plan_import(&c, 0);
    let back = format_allocated_ips(&plan.records);
    let again = parse_allocated_ips(&back).expect("parses");
    assert_eq!(
        again,
        parse_allocated_ips(
            c.pools[0]
                .status
                .as_ref()
                .and_then(|s| s.allocated_ips.as_deref())
                .unwrap_or_default()
        )
        .expect("orig")
    );
}

#[test]
fn spiderpool_auto_pools_get_the_marks_our_controller_finds_them_by() {
    let labels: BTreeMap<String, String> = [
        ("ipam.spidernet.io/owner-spider-subnet", "subnet-v4"),
        ("ipam.spidernet.io/owner-application-gv", "apps_v1"),
        ("ipam.spidernet.io/owner-application-kind", "Deployment"),
        ("ipam.spidernet.io/owner-application-namespace", "default"),
        ("ipam.spidernet.io/owner-application-name", "demo"),
        ("ipam.spidernet.io/owner-application-uid", "bea129aa-acf5"),
        ("ipam.spidernet.io/ip-version", "IPv4"),
        ("ipam.spidernet.io/interface", "eth0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let m = autopool_marks(&labels, &BTreeMap::new()).expect("marks");
    assert_eq!(m.labels["ipam.spidernet.io/app-kind"], "Deployment");
    assert_eq!(m.labels["ipam.spidernet.io/app-api-group"], "apps");
    assert_eq!(m.labels["ipam.spidernet.io/app-uid"], "bea129aa-acf5");
    assert_eq!(m.labels["ipam.spidernet.io/ip-version"], "4");
    assert_eq!(
        m.annotations["ipam.spidernet.io/application"],
        "apps_v1_Deployment_default_demo"
    );
    let mut marked = labels.clone();
    marked.extend(m.labels.clone());
    assert_eq!(
        autopool_marks(&marked, &m.annotations),
        None,
        "marking twice adds nothing"
    );
    assert_eq!(spiderpool_version_label(&marked), Some("IPv4"));
    let plain = BTreeMap::from([("app".to_string(), "x".to_string())]);
    assert_eq!(autopool_marks(&plain, &BTreeMap::new()), None);
}
