//! Unit tests of pool selection.

use super::eligibility::multus_matches;
use super::*;

#[test]
fn wildcards() {
    assert!(wildcard_match("test-*", "test-ippool-6"));
    assert!(wildcard_match("test-ippool-?", "test-ippool-6"));
    assert!(!wildcard_match("test-ippool-?", "test-ippool-66"));
    assert!(wildcard_match("test-ippool-[67]", "test-ippool-7"));
    assert!(!wildcard_match("test-ippool-[!67]", "test-ippool-7"));
    assert!(wildcard_match("pool-[a-c]*", "pool-b-x"));
    assert!(wildcard_match("*", ""));
    assert!(wildcard_match("a*b*c", "axxbyyc"));
    assert!(!wildcard_match("a*b*c", "axxbyy"));
    assert!(wildcard_match("a[", "a["));
}

#[test]
fn ippools_interfaces_all_or_none() {
    let ok = parse_ippools_annotation(r#"[{"ipv4":["a"]},{"ipv4":["b"]}]"#).expect("ok");
    assert_eq!(ok[0].interface, "eth0");
    assert_eq!(ok[1].interface, "net1");
    assert!(
        parse_ippools_annotation(r#"[{"interface":"eth0","ipv4":["a"]},{"ipv4":["b"]}]"#)
            .expect_err("mixed")
            .contains("every entry or on none")
    );
    assert!(parse_ippools_annotation(
        r#"[{"interface":"eth0","ipv4":["a"]},{"interface":"eth0","ipv4":["b"]}]"#
    )
    .expect_err("dup")
    .contains("listed twice"));
    assert!(parse_ippools_annotation(r#"[{"interface":"eth0"}]"#)
        .expect_err("no pool")
        .contains("names no pool"));
    assert!(parse_ippools_annotation("not json").is_err());
}

#[test]
fn multus_positional_and_json() {
    let mut annos = BTreeMap::new();
    annos.insert(
        ANNO_MULTUS_NETWORKS.to_string(),
        "kube-system/a, b@net5".to_string(),
    );
    let input = SelectionInput {
        pod_namespace: "ns",
        pod_annotations: Some(&annos),
        ..Default::default()
    };
    assert_eq!(
        multus_network(&input, "net1").as_deref(),
        Some("kube-system/a")
    );
    assert_eq!(multus_network(&input, "net5").as_deref(), Some("b"));
    assert!(multus_matches("ns/b", "b", "ns"));
    assert!(multus_matches("b", "other/b", "ns"));
    assert!(!multus_matches("x/b", "b", "ns"));
    annos.insert(
        ANNO_MULTUS_NETWORKS.to_string(),
        r#"[{"name":"c","namespace":"z","interface":"net2"}]"#.to_string(),
    );
    let input = SelectionInput {
        pod_namespace: "ns",
        pod_annotations: Some(&annos),
        ..Default::default()
    };
    assert_eq!(multus_network(&input, "net2").as_deref(), Some("z/c"));
}
