//! `spiderctl check` and `spiderctl release` on the real API server: leaks made by deleting
//! pods while the node's agent is down are found (and nothing else is), an address of a live
//! pod is refused, a report older than a re-allocation releases nothing, and what is left
//! checks clean.

mod common;

use std::process::Command;
use std::time::Duration;

use common::kube::{lab, pod, wait_for};
use common::{cni, env_for, netconf, workspace_bin};
use serde_json::Value;
use spiderpool_store::testing::KubeServer;

fn spiderctl(s: &KubeServer, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_bin("spiderctl", "spiderpool-agent"))
        .args(args)
        .arg("--kubeconfig")
        .arg(s.kubeconfig())
        .output()
        .expect("spiderctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check_json(s: &KubeServer) -> (i32, Value, String) {
    let (code, out, err) = spiderctl(s, &["check", "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (code, v, out)
}

/// (kind, ip) of every finding.
fn findings(v: &Value) -> Vec<(String, String)> {
    v["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap_or_default().to_string(),
                f["ip"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn leaks_are_found_and_released_and_live_or_reallocated_addresses_are_not() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let mut agent = lab.agent("controller-node-1");
    let conf = netconf(
        "1.0.0",
        "macvlan-conf",
        &agent.sock(),
        serde_json::json!({}),
    );
    let add = |name: &str| {
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod(name, "controller-node-1"));
        assert!(ok, "{err}");
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}");
        let r = cni(
            &env_for("ADD", &format!("c-{name}"), "eth0", &args),
            conf.to_string().as_bytes(),
        );
        assert_eq!(r.code(), 0, "ADD {name}: {}", r.stdout);
        r.ip().split('/').next().unwrap_or_default().to_string()
    };
    let ips: Vec<String> = (0..6).map(|i| add(&format!("app-{i}"))).collect();
    let (code, v, out) = check_json(s);
    assert_eq!(code, 0, "a consistent cluster checks clean: {out}");
    assert_eq!(v["checked"]["records"], 6, "{out}");

    // The node's agent is down while three pods are deleted: nobody frees their addresses.
    agent.kill9();
    for i in 0..3 {
        let (ok, _, err) = s.kubectl(
            &[
                "delete",
                "pod",
                &format!("app-{i}"),
                "--grace-period=0",
                "--force",
            ],
            "",
        );
        assert!(ok, "{err}");
    }
    let (code, report, text) = check_json(s);
    assert_eq!(code, 1, "findings exit 1: {text}");
    let mut want: Vec<(String, String)> = ips[..3]
        .iter()
        .map(|ip| ("leak".to_string(), ip.clone()))
        .collect();
    want.sort();
    let mut got = findings(&report);
    got.sort();
    assert_eq!(got, want, "exactly the three leaks: {text}");
    let first = &report["findings"][0];
    assert_eq!(first["reason"], "pod_gone", "{text}");
    assert_eq!(first["node"], "controller-node-1", "{text}");
    assert!(first["containerID"]
        .as_str()
        .unwrap_or("")
        .starts_with("c-app-"));
    let (_, table, _) = spiderctl(s, &["check"]);
    assert!(
        table.contains("3 finding(s), 3 releasable") && table.contains("no longer exists"),
        "{table}"
    );

    // A live pod's address is refused, and says which pod holds it.
    let (code, _, err) = spiderctl(s, &["release", "--ip", &ips[4]]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("default/app-4") && err.contains("alive") && err.contains("refused"),
        "{err}"
    );
    assert_eq!(common::kube::records(s).len(), 6, "nothing freed");

    // One leak freed by address; the report is kept for later.
    let report_path = lab.dir.path().join("report.json");
    std::fs::write(&report_path, &text).expect("report");
    let leaked: Vec<String> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["ip"].as_str().unwrap_or_default().to_string())
        .collect();
    let (code, out, err) = spiderctl(s, &["release", "--ip", &leaked[0]]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("{}: released", leaked[0])), "{out}");
    assert_eq!(common::kube::records(s).len(), 5);

    // The agent comes back and fills the pool (10 addresses): the freed one is handed out again.
    agent.start_again();
    let fresh: Vec<String> = (0..5).map(|i| add(&format!("new-{i}"))).collect();
    assert!(fresh.contains(&leaked[0]), "{fresh:?} {leaked:?}");

    // The old report frees the two leaks it still names and leaves the re-allocated one alone.
    let (code, out, err) = spiderctl(
        s,
        &["release", "--from-report", &report_path.to_string_lossy()],
    );
    assert_eq!(code, 1, "one left alone: {out}{err}");
    assert!(
        err.contains(&format!("{}: re-allocated since the report", leaked[0])),
        "{err}"
    );
    for ip in &leaked[1..] {
        assert!(out.contains(&format!("{ip}: released")), "{out}");
    }
    let holders = common::kube::records(s);
    assert_eq!(holders.len(), 8, "{holders:?}");
    assert!(holders.iter().any(|(ip, r)| ip == &leaked[0]
        && r["containerID"]
            .as_str()
            .is_some_and(|c| c.starts_with("c-new-"))));

    // What is left checks clean (the agent deletes the gone pods' SpiderEndpoints).
    let last = std::cell::RefCell::new(String::new());
    wait_for(
        "a clean check",
        Duration::from_secs(20),
        || {
            let (code, _, out) = check_json(s);
            *last.borrow_mut() = out;
            code == 0
        },
        &|| last.borrow().clone(),
    );
}

#[test]
fn check_says_when_it_cannot_check() {
    let dir = tempfile::tempdir().expect("tmp");
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\nusers: [{name: u, user: {token: x}}]\n",
    )
    .expect("kubeconfig");
    let out = Command::new(workspace_bin("spiderctl", "spiderpool-agent"))
        .args(["check", "--kubeconfig"])
        .arg(&kc)
        .output()
        .expect("spiderctl runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("could not check") && err.contains("127.0.0.1:1"),
        "{err}"
    );
    let out = Command::new(workspace_bin("spiderctl", "spiderpool-agent"))
        .args(["release", "--from-report", "/nonexistent/report.json"])
        .output()
        .expect("spiderctl runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("/nonexistent/report.json"), "{err}");
}

/// Every metric the shipped PrometheusRule and Grafana dashboard query is one the agent serves
/// (scraped from a real agent process in Kubernetes mode after an ADD and a DEL).
#[test]
fn every_metric_the_alerts_and_the_dashboard_query_is_served() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let agent = common::Agent::start(
        &lab.dir.path().join("m.sock"),
        &lab.dir.path().join("m.log"),
        &[
            "--node-name".into(),
            "controller-node-1".into(),
            "--kube".into(),
            "--kubeconfig".into(),
            s.kubeconfig().to_string_lossy().into_owned(),
            "--store".into(),
            "kube".into(),
            "--metrics-addr".into(),
            addr.clone(),
        ],
    );
    let conf = netconf(
        "1.0.0",
        "macvlan-conf",
        &agent.sock(),
        serde_json::json!({}),
    );
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod("m-0", "controller-node-1"));
    assert!(ok, "{err}");
    let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=m-0";
    let r = cni(
        &env_for("ADD", "c-m-0", "eth0", args),
        conf.to_string().as_bytes(),
    );
    assert_eq!(r.code(), 0, "{}", r.stdout);
    let r = cni(
        &env_for("DEL", "c-m-0", "eth0", args),
        conf.to_string().as_bytes(),
    );
    assert_eq!(r.code(), 0, "{}", r.stdout);
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{addr}/metrics")])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "scrape failed: {}", agent.log_text());
    let served: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    assert!(
        text.contains("spiderpool_ipam_allocation_counts_total 1\n"),
        "{text}"
    );
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/components/monitoring/"
    );
    let mut queried = std::collections::BTreeSet::new();
    for file in ["monitoring.yaml", "spiderpool-dashboard.json"] {
        let body = std::fs::read_to_string(format!("{dir}{file}")).expect(file);
        let mut rest = body.as_str();
        while let Some(i) = rest.find("spiderpool_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            queried.insert(name);
        }
    }
    assert!(queried.len() >= 12, "{queried:?}");
    // The controller's names are checked against a scrape of the controller in its own tests
    // (spiderpool-controller/tests/webhook.rs); the agent serves every other.
    let controller = include_str!("../../spiderpool-controller/src/metrics.rs");
    let missing: Vec<&String> = queried
        .iter()
        .filter(|q| !served.contains(q.as_str()))
        .filter(|q| !controller.contains(q.trim_end_matches("_total").trim_end_matches("_bucket")))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not served: {missing:?}\n{text}"
    );
}

fn gc_agent(lab: &common::kube::Lab, name: &str, extra: &[&str]) -> common::Agent {
    let mut args: Vec<String> = [
        "--node-name",
        "controller-node-1",
        "--kube",
        "--kubeconfig",
        &lab.server.kubeconfig().to_string_lossy(),
        "--store",
        "kube",
        "--gc-interval-ms",
        "300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    common::Agent::start(
        &lab.dir.path().join(format!("{name}.sock")),
        &lab.dir.path().join(format!("{name}.log")),
        &args,
    )
}

fn set_ready(s: &KubeServer, ready: bool) {
    let body = serde_json::json!({"status": {"conditions": [{
        "type": "Ready", "status": if ready { "True" } else { "False" },
        "reason": "Test", "lastHeartbeatTime": "2026-12-01T00:00:00Z",
        "lastTransitionTime": "2026-12-01T00:00:00Z"}]}});
    let (ok, _, err) = s.kubectl(
        &[
            "patch",
            "node",
            "controller-node-1",
            "--subresource=status",
            "--type=merge",
            "-p",
            &body.to_string(),
        ],
        "",
    );
    assert!(ok, "{err}");
}

/// GC that an operator steers: a dry run only reports; on a NotReady node a gone pod's address
/// is kept (its containers may still run); once the node is Ready GC frees it and says so in an
/// Event on the pod. A full pool makes a PoolExhausted Event on the pod that got nothing.
#[test]
fn gc_dry_run_and_not_ready_nodes_keep_addresses_and_events_tell_the_pod() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let mut agent = gc_agent(&lab, "dry", &["--gc-dry-run"]);
    let conf =
        |a: &common::Agent| netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let add = |a: &common::Agent, name: &str| {
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod(name, "controller-node-1"));
        assert!(ok, "{err}");
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}");
        cni(
            &env_for("ADD", &format!("c-{name}"), "eth0", &args),
            conf(a).to_string().as_bytes(),
        )
    };
    assert_eq!(add(&agent, "gone").code(), 0);
    let (ok, _, err) = s.kubectl(
        &["delete", "pod", "gone", "--grace-period=0", "--force"],
        "",
    );
    assert!(ok, "{err}");
    wait_for(
        "the dry run to report",
        Duration::from_secs(15),
        || agent.log_text().contains("GC dry run: would free"),
        &|| agent.log_text(),
    );
    assert_eq!(common::kube::records(s).len(), 1, "a dry run frees nothing");
    agent.kill9();

    set_ready(s, false);
    let agent = gc_agent(&lab, "notready", &[]);
    wait_for(
        "GC to keep the address on a NotReady node",
        Duration::from_secs(15),
        || agent.log_text().contains("node is NotReady"),
        &|| agent.log_text(),
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(common::kube::records(s).len(), 1, "kept while NotReady");

    set_ready(s, true);
    wait_for(
        "GC to free it once the node is Ready",
        Duration::from_secs(15),
        || common::kube::records(s).is_empty(),
        &|| agent.log_text(),
    );
    let events = |reason: &str| {
        s.kubectl(
            &[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                &format!("reason={reason}"),
                "-o",
                "jsonpath={.items[*].involvedObject.name} {.items[*].message}",
            ],
            "",
        )
        .1
    };
    wait_for(
        "the ReleasedByGC Event",
        Duration::from_secs(10),
        || {
            events("ReleasedByGC").starts_with("gone ")
                && events("ReleasedByGC").contains("pod_gone")
        },
        &|| events("ReleasedByGC"),
    );

    // Fill the seed pool (10 addresses); the eleventh pod gets a PoolExhausted Event.
    for i in 0..10 {
        let r = add(&agent, &format!("fill-{i}"));
        assert_eq!(r.code(), 0, "{}", r.stdout);
    }
    let r = add(&agent, "over");
    assert_ne!(r.code(), 0, "{}", r.stdout);
    wait_for(
        "the PoolExhausted Event",
        Duration::from_secs(10),
        || {
            events("PoolExhausted").starts_with("over ")
                && events("PoolExhausted").contains("test-ippool-6")
        },
        &|| events("PoolExhausted"),
    );
}
