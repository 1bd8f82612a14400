//! The CRDs generated from the Rust types, against the real API server (envtest's
//! kube-apiserver): they install, the seed's pools apply unchanged with `kubectl`, and the table
//! API prints Spiderpool's columns.
#![cfg(all(feature = "kube", feature = "testing"))]

use spiderpool_store::k8s::crd::crds_yaml;
use spiderpool_store::testing::KubeServer;

const SEED_POOLS: &str = include_str!("../../testdata/seed-pools.yaml");

#[test]
fn crds_install_and_the_seed_pools_print_spiderpools_columns() {
    let Some(server) = KubeServer::start() else {
        return;
    };
    server.install_crds(&crds_yaml()).expect("CRDs installed");
    let (ok, out, err) = server.kubectl(&["apply", "-f", "-"], SEED_POOLS);
    assert!(ok, "kubectl apply of the seed pools: {err}");
    assert!(
        out.contains("spiderippool.spiderpool.spidernet.io/test-ippool-6 created"),
        "{out}"
    );

    // The table API, as kubectl reads it.
    let table = server.get_raw(
        "/apis/spiderpool.spidernet.io/v2beta1/spiderippools",
        "application/json;as=Table;v=v1;g=meta.k8s.io",
    );
    let v: serde_json::Value = serde_json::from_str(&table).expect("table JSON");
    assert_eq!(v["kind"], "Table", "{table}");
    let cols: Vec<&str> = v["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        cols,
        [
            "Name",
            "VERSION",
            "SUBNET",
            "ALLOCATED-IP-COUNT",
            "TOTAL-IP-COUNT",
            "DEFAULT",
            "DISABLE"
        ]
    );
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    let first = &rows[0]["cells"];
    assert_eq!(first[0], "test-ippool-6");
    assert_eq!(first[2], "10.6.0.0/16");
    // `default` and `disable` default to false, as the seed's output shows.
    assert_eq!(first[5], false, "{first}");
    assert_eq!(first[6], false, "{first}");

    // Short names and the namespaced SpiderEndpoint.
    let (ok, out, err) = server.kubectl(&["get", "sp", "-o", "name"], "");
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    let (ok, _, err) = server.kubectl(&["get", "se", "-n", "default"], "");
    assert!(ok, "{err}");
    // A pool the schema refuses: ips must be a list of strings.
    let bad = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: bad}\nspec: {subnet: 10.9.0.0/16, ips: 5}\n";
    let (ok, _, err) = server.kubectl(&["apply", "-f", "-"], bad);
    assert!(!ok && err.contains("spec.ips"), "{err}");
}
