//! `spiderctl validate` and `explain` run as real processes on the seed and on tricky manifests.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn data(name: &str) -> String {
    let p: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "testdata", name]
        .iter()
        .collect();
    p.to_string_lossy().into_owned()
}

fn spiderctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spiderctl"))
        .args(args)
        .output()
        .expect("spiderctl runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `spiderctl explain` on testdata/tricky.yaml.
fn explain_tricky(node: &str, pod: &str, extra: &[&str]) -> Output {
    let tricky = data("tricky.yaml");
    let mut args = vec![
        "explain",
        "--manifests",
        &tricky,
        "--node",
        node,
        "--pod",
        pod,
    ];
    args.extend_from_slice(extra);
    spiderctl(&args)
}

/// `spiderctl explain` on the seed's pools and cluster.
fn explain_seed(node: &str, pod: &str, extra: &[&str]) -> Output {
    let (pools, cluster) = (data("seed-pools.yaml"), data("seed-cluster.yaml"));
    let mut args = vec![
        "explain",
        "--manifests",
        &pools,
        "--manifests",
        &cluster,
        "--node",
        node,
        "--pod",
        pod,
    ];
    args.extend_from_slice(extra);
    spiderctl(&args)
}

fn explain_json(pod: &str, extra: &[&str]) -> (i32, Value) {
    let mut extra = extra.to_vec();
    extra.extend_from_slice(&["-o", "json"]);
    let out = explain_tricky("n1", pod, &extra);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {} / {}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit code"), v)
}

fn pools_of(v: &Value, nic: usize, fam: &str) -> Vec<(String, bool)> {
    v["nics"][nic][fam]["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .map(|c| {
            (
                c["pool"].as_str().expect("pool").to_string(),
                c["eligible"].as_bool().expect("bool"),
            )
        })
        .collect()
}

#[test]
fn validate_accepts_the_seed() {
    let out = spiderctl(&["validate", &data("seed-pools.yaml")]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(stdout(&out).trim(), "valid: 2 SpiderIPPool");
}

#[test]
fn validate_reports_one_line_per_problem_naming_object_and_field() {
    let file = data("invalid-pools.yaml");
    let out = spiderctl(&["validate", &file]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let expected = [
        "SpiderIPPool/unformatted: spec.subnet: unformatted subnet 10.6.168.1/24, please change it to 10.6.168.0/24",
        "SpiderIPPool/bad-ranges: spec.ips[0]: invalid IP range '10.7.0.20-10.7.0.10': start must not be greater than end",
        "SpiderIPPool/bad-ranges: spec.ips[1]: '10.8.0.1' is not inside subnet 10.7.0.0/16",
        "SpiderIPPool/bad-ranges: spec.ips[2]: invalid IP range '10.7.0.1 - 10.7.0.2': must not contain spaces",
        "SpiderIPPool/bad-ranges: spec.excludeIPs[0]: invalid IP range '10.7.0.0/24': CIDR notation is not allowed",
        "SpiderIPPool/gw-in-ips: spec.gateway: gateway 10.10.0.1 is inside spec.ips: add it to spec.excludeIPs too",
        "SpiderReservedIP/bad-reserved: spec.ips[0]: IP range 'fd00::1' is not IPv4",
        "SpiderIPPool/overlap-b: spec.ips: IPs 10.9.0.40-10.9.0.50 are also in SpiderIPPool overlap-a",
    ];
    assert_eq!(lines.len(), expected.len(), "{text}");
    for want in expected {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("{file}: {want}"))),
            "missing line starting with {want:?} in:\n{text}"
        );
    }
}

#[test]
fn validate_checks_across_files_and_reports_unreadable_input() {
    let out = spiderctl(&[
        "validate",
        &data("seed-pools.yaml"),
        &data("seed-pools.yaml"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("SpiderIPPool/test-ippool-6: metadata.name: defined more than once")
    );
    let out = spiderctl(&["validate", "/nonexistent/pools.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("/nonexistent/pools.yaml: cannot read"));
}

#[test]
fn explain_seed_picks_each_nodes_own_zone() {
    for (node, pod, want) in [
        (
            "controller-node-1",
            "default/test-app-j9ftl",
            "test-ippool-6",
        ),
        ("worker-node-1", "default/test-app-nkq5h", "test-ippool-7"),
    ] {
        let out = explain_seed(node, pod, &["-o", "json"]);
        assert_eq!(out.status.code(), Some(0));
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["pod"], pod);
        assert_eq!(v["node"], node);
        assert_eq!(v["nics"][0]["ifname"], "eth0");
        assert_eq!(
            v["nics"][0]["source"],
            "pod annotation ipam.spidernet.io/ippool"
        );
        assert_eq!(v["nics"][0]["ipv4"]["selected"], want);
        assert_eq!(v["nics"][0]["ipv6"], Value::Null);
        let skipped = v["nics"][0]["ipv4"]["candidates"]
            .as_array()
            .expect("list")
            .iter()
            .find(|c| c["eligible"] == false)
            .expect("the other zone's pool is skipped");
        assert!(skipped["reason"]
            .as_str()
            .expect("reason")
            .starts_with("nodeAffinity node-subnet In ["));
    }
    // The table form shows the same choice.
    let out = explain_seed("worker-node-1", "default/test-app-nkq5h", &[]);
    let t = stdout(&out);
    assert!(
        t.lines()
            .any(|l| l.contains("test-ippool-7") && l.contains("yes (selected)")),
        "{t}"
    );
}

#[test]
fn explain_keeps_backup_order_after_skips() {
    let (code, v) = explain_json("plain/backup-order", &[]);
    assert_eq!(code, 0);
    assert_eq!(
        pools_of(&v, 0, "ipv4"),
        vec![
            ("disabled".into(), false),
            ("c-v4".into(), true),
            ("a-v4".into(), true),
            ("b-v4".into(), true)
        ]
    );
    assert_eq!(v["nics"][0]["ipv4"]["selected"], "c-v4");
}

#[test]
fn explain_dual_stack_and_multi_nic() {
    let (code, v) = explain_json("plain/dual", &[]);
    assert_eq!(code, 0);
    assert_eq!(v["nics"][0]["ipv4"]["selected"], "a-v4");
    assert_eq!(v["nics"][0]["ipv6"]["selected"], "a-v6");

    let (code, v) = explain_json("plain/multi-nic", &["--ifname", "net1"]);
    assert_eq!(code, 0);
    let nics = v["nics"].as_array().expect("nics");
    assert_eq!(nics.len(), 2);
    assert_eq!(nics[0]["ifname"], "eth0");
    assert_eq!(nics[0]["ipv6"]["selected"], "a-v6");
    assert_eq!(nics[1]["ifname"], "net1");
    assert_eq!(nics[1]["ipv4"]["selected"], "b-v4");
    assert_eq!(nics[1]["ipv6"], Value::Null);
    assert_eq!(nics[1]["cleanGateway"], true);
    // An interface the annotation does not list is an error (exit 1).
    let out = explain_tricky("n1", "plain/multi-nic", &["--ifname", "net2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("interface net2 is not listed"));
}

#[test]
fn explain_expands_wildcards_in_place_sorted_by_name() {
    let (code, v) = explain_json("plain/wildcard", &[]);
    assert_eq!(code, 0);
    let names: Vec<String> = pools_of(&v, 0, "ipv4").into_iter().map(|p| p.0).collect();
    assert_eq!(names, vec!["b-v4", "c-v4", "nope-*", "a-v4", "a-v6"]);
    assert_eq!(
        v["nics"][0]["ipv4"]["candidates"][2]["reason"],
        "wildcard matches no pool"
    );
    assert_eq!(
        v["nics"][0]["ipv4"]["candidates"][4]["reason"],
        "pool is IPv6, wanted IPv4"
    );
}

#[test]
fn explain_all_filtered_exits_1_with_every_reason() {
    let (code, v) = explain_json("plain/all-filtered", &[]);
    assert_eq!(code, 1);
    assert_eq!(v["nics"][0]["ipv4"]["selected"], Value::Null);
    let reasons: Vec<String> = v["nics"][0]["ipv4"]["candidates"]
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["reason"].as_str().expect("reason").to_string())
        .collect();
    assert_eq!(
        reasons,
        vec![
            "pool is disabled",
            "nodeName [n2] does not include node n1",
            "namespaceAffinity tier=gold does not match namespace plain labels {}",
            "podAffinity app In [web] does not match pod plain/all-filtered labels {app=db}",
            "multusName [kube-system/macvlan-conf] does not include network kube-system/ipvlan-conf of eth0",
            "pool is IPv6, wanted IPv4",
            "pool not found",
        ]
    );
}

#[test]
fn explain_default_sources_in_precedence_order() {
    let (_, v) = explain_json("team/ns-defaults", &[]);
    assert_eq!(
        v["nics"][0]["source"],
        "namespace annotation ipam.spidernet.io/default-ipv4|6-ippool"
    );
    assert_eq!(v["nics"][0]["ipv4"]["selected"], "ns-default");
    let cni = data("cni-macvlan.conflist");
    let (_, v) = explain_json("plain/no-annotation", &["--cni-config", &cni]);
    assert_eq!(v["nics"][0]["source"], "cni config default_ipv4|6_ippool");
    assert_eq!(v["nics"][0]["ipv4"]["selected"], "cni-default");
    assert_eq!(v["nics"][0]["cleanGateway"], true);
    let (_, v) = explain_json("plain/no-annotation", &[]);
    assert_eq!(
        v["nics"][0]["source"],
        "cluster default pools (spec.default: true)"
    );
    assert_eq!(v["nics"][0]["ipv4"]["selected"], "cluster-default");
    // IPv6-only cluster defaults, but no IPv6 default pool: nothing to choose from (exit 1).
    let out = explain_tricky("n1", "plain/no-annotation", &["--default-families", "v6"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pool is configured for eth0"));
}

#[test]
fn explain_bad_input_is_exit_2_and_bad_annotation_exit_1() {
    let out = explain_tricky("n9", "plain/dual", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node n9 is not in the manifests"));
    let out = explain_tricky("n1", "dual", &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = explain_tricky("n1", "plain/bad-annotation", &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("annotation ipam.spidernet.io/ippools is invalid: set \"interface\" on every entry or on none"),
        "{err}"
    );
}

#[test]
fn explain_asks_every_family_that_has_a_cluster_default_pool_and_says_so() {
    let dual = data("dual-defaults.yaml");
    let base = [
        "explain",
        "--manifests",
        &dual,
        "--node",
        "n1",
        "--pod",
        "default/plain",
    ];
    let mut args = base.to_vec();
    args.extend(["-o", "json"]);
    let out = spiderctl(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["nics"][0]["ipv4"]["selected"], "default-v4");
    assert_eq!(v["nics"][0]["ipv6"]["selected"], "default-v6");
    assert_eq!(v["defaultFamilies"]["ipv4"], true);
    assert_eq!(v["defaultFamilies"]["ipv6"], true);
    assert_eq!(
        v["defaultFamilies"]["from"],
        "pools with spec.default: true"
    );
    let table = stdout(&spiderctl(&base));
    assert!(
        table.contains("eth0: families IPv4+IPv6 (pools with spec.default: true)"),
        "{table}"
    );
    // An explicit choice wins, and the output says where it came from.
    let mut args = base.to_vec();
    args.extend(["--default-families", "v4", "-o", "json"]);
    let v: Value = serde_json::from_str(&stdout(&spiderctl(&args))).expect("json");
    assert!(v["nics"][0]["ipv6"].is_null(), "{v}");
    assert_eq!(v["defaultFamilies"]["from"], "--default-families");
}

#[test]
fn validate_warns_about_network_and_broadcast_addresses_and_exits_0() {
    let out = spiderctl(&["validate", &data("dual-defaults.yaml")]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(
        text.contains("warning: ")
            && text.contains("SpiderIPPool/default-v4: spec.ips: includes 10.20.0.0, the network address of 10.20.0.0/24"),
        "{text}"
    );
    assert!(
        text.contains("10.20.0.255, the broadcast address"),
        "{text}"
    );
    assert!(text.contains("valid: "), "{text}");
}
