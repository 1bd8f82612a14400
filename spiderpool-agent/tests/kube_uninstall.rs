//! `spiderctl uninstall` on the real API server: the whole base installed with `kubectl apply -k`
//! (its `failurePolicy: Fail` webhooks then block every pool write, no controller serving them),
//! a pool holding an address, another not. Uninstall removes the webhooks first (pool writes work
//! again), every object the base installs, the finalizer of the empty pool, and keeps the one of
//! the pool in use (exit 1, naming it); `--force --delete-crds` then finishes, and the CRDs go.

mod common;

use std::process::Command;
use std::time::Duration;

use common::kube::{lab, pod, wait_for};
use common::{cni, env_for, netconf, workspace_bin};

fn spiderctl_uninstall(kubeconfig: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_bin("spiderctl", "spiderpool-agent"))
        .arg("uninstall")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(extra)
        .output()
        .expect("spiderctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn uninstall_never_blocks_on_its_own_webhooks_and_keeps_pools_in_use() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let mut a = lab.agent("controller-node-1");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod("held", "controller-node-1"));
    assert!(ok, "{err}");
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let add = cni(
        &env_for(
            "ADD",
            "c-held",
            "eth0",
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=held",
        ),
        conf.to_string().as_bytes(),
    );
    assert_eq!(add.code(), 0, "{}\n{}", add.stdout, a.log_text());
    let finalizers = |pool: &str| {
        s.kubectl(
            &["get", "sp", pool, "-o", "jsonpath={.metadata.finalizers}"],
            "",
        )
        .1
    };
    wait_for(
        "the finalizer on the pool in use",
        Duration::from_secs(15),
        || finalizers("test-ippool-6").contains("spiderpool.spidernet.io"),
        &|| finalizers("test-ippool-6"),
    );
    assert!(a.terminate().success());
    // The empty pool carries the finalizer too (as the webhook adds it at create).
    let (ok, _, err) = s.kubectl(
        &[
            "patch",
            "sp",
            "test-ippool-7",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":["spiderpool.spidernet.io"]}}"#,
        ],
        "",
    );
    assert!(ok, "{err}");
    let base = [env!("CARGO_MANIFEST_DIR"), "..", "deploy", "kubernetes"]
        .iter()
        .collect::<std::path::PathBuf>();
    let (ok, _, err) = s.kubectl(&["apply", "-k", &base.to_string_lossy()], "");
    assert!(ok, "kubectl apply -k: {err}");
    // Nobody serves the webhooks: every pool write is refused now.
    let label = || s.kubectl(&["label", "--overwrite", "sp", "test-ippool-7", "x=y"], "");
    let (ok, _, err) = label();
    assert!(
        !ok && err.contains("webhook"),
        "a pool write passed the unserved webhook: {err}"
    );
    let kc = s.kubeconfig();
    let (code, out, err) = spiderctl_uninstall(&kc, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("SpiderIPPool test-ippool-6 holds 1 addresses"),
        "{err}"
    );
    assert!(
        out.contains("deleted ValidatingWebhookConfiguration spiderpool-controller"),
        "{out}"
    );
    assert!(
        out.contains("finalizer removed: SpiderIPPool test-ippool-7"),
        "{out}"
    );
    assert!(finalizers("test-ippool-6").contains("spiderpool.spidernet.io"));
    assert!(!finalizers("test-ippool-7").contains("spiderpool.spidernet.io"));
    let (ok, _, err) = label();
    assert!(ok, "pool writes still blocked after uninstall: {err}");
    // Nothing the base installs is left but the CRDs (and the pools' objects).
    let rendered = Command::new("kubectl")
        .args(["kustomize", &base.to_string_lossy()])
        .output()
        .expect("kubectl kustomize");
    let docs = String::from_utf8_lossy(&rendered.stdout).into_owned();
    let (_, left, _) = s.kubectl(
        &["get", "-f", "-", "--ignore-not-found", "-o", "name"],
        &docs,
    );
    let left: Vec<&str> = left
        .lines()
        .filter(|l| !l.starts_with("customresourcedefinition"))
        .collect();
    assert!(left.is_empty(), "left after uninstall: {left:?}");
    // Finish: force, and the CRDs.
    let (code, out, err) = spiderctl_uninstall(&kc, &["--force", "--delete-crds"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("finalizer removed: SpiderIPPool test-ippool-6"),
        "{out}"
    );
    let ours = || {
        s.kubectl(&["get", "crd", "-o", "name"], "")
            .1
            .lines()
            .filter(|l| l.contains("spiderpool.spidernet.io"))
            .count()
    };
    wait_for(
        "the CRDs deleted (nothing holds them)",
        Duration::from_secs(30),
        || ours() == 0,
        &|| format!("{} of our CRDs left", ours()),
    );
}
