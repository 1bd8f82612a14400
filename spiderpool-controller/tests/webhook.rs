//! `spiderpool-controller` against the real API server: `kubectl apply` of invalid pools is
//! refused with `spiderctl validate`'s messages, valid ones come back mutated, updates that would
//! strand allocated addresses are refused naming them, and the certificate survives a restart.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spiderpool_store::k8s::crd::crds_yaml;
use spiderpool_store::testing::KubeServer;

const SEED_POOLS: &str = include_str!("../../testdata/seed-pools.yaml");

struct Controller {
    child: Child,
    log: std::path::PathBuf,
}

impl Controller {
    fn start(s: &KubeServer, addr: &str, log: &std::path::Path) -> Controller {
        Self::start_as(&s.kubeconfig(), addr, log)
    }

    fn start_as(kubeconfig: &std::path::Path, addr: &str, log: &std::path::Path) -> Controller {
        Self::start_with(kubeconfig, addr, log, &["--reconcile-interval-ms", "300"])
    }

    fn start_with(
        kubeconfig: &std::path::Path,
        addr: &str,
        log: &std::path::Path,
        extra: &[&str],
    ) -> Controller {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_spiderpool-controller"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--webhook-addr", addr])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("controller starts");
        let c = Controller {
            child,
            log: log.to_path_buf(),
        };
        let t0 = Instant::now();
        while !c.log_text().contains("serving the admission webhooks") {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "controller not up:\n{}",
                c.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    l.local_addr().expect("addr").to_string()
}

fn pool(name: &str, subnet: &str, ips: &str) -> String {
    format!("apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {{name: {name}}}\nspec: {{subnet: {subnet}, ips: {ips}}}\n")
}

#[test]
fn the_webhook_refuses_invalid_pools_and_mutates_valid_ones() {
    let Some(s) = KubeServer::start() else { return };
    s.install_crds(&crds_yaml()).expect("CRDs");
    let dir = tempfile::tempdir().expect("tmp");
    let addr = free_addr();
    let mut c = Controller::start(&s, &addr, &dir.path().join("c.log"));

    // The seed's pools go in and come back the way Spiderpool's webhook leaves them.
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], SEED_POOLS);
    assert!(ok, "{err}\n{}", c.log_text());
    let (_, out, _) = s.kubectl(
        &[
            "get",
            "sp",
            "test-ippool-6",
            "-o",
            "jsonpath={.spec.ipVersion} {.metadata.finalizers}",
        ],
        "",
    );
    assert_eq!(out, r#"4 ["spiderpool.spidernet.io"]"#);

    // Merged and sorted addresses.
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &pool(
            "tidy",
            "10.8.0.0/16",
            "[10.8.0.20, 10.8.0.10-10.8.0.19, 10.8.0.2]",
        ),
    );
    assert!(ok, "{err}");
    let (_, out, _) = s.kubectl(&["get", "sp", "tidy", "-o", "jsonpath={.spec.ips}"], "");
    assert_eq!(out, r#"["10.8.0.2","10.8.0.10-10.8.0.20"]"#);

    // Refused, with spiderctl validate's messages.
    for (yaml, want) in [
        (
            pool("bad-subnet", "10.9.0.1/16", "[10.9.0.1]"),
            "please change it to 10.9.0.0/16",
        ),
        (
            pool("overlap", "10.6.0.0/16", "[10.6.168.65-10.6.168.80]"),
            "test-ippool-6",
        ),
        (pool("outside", "10.9.0.0/16", "[10.10.0.1]"), "10.10.0.1"),
    ] {
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &yaml);
        assert!(!ok, "accepted:\n{yaml}");
        assert!(
            err.contains("denied the request") && err.contains(want),
            "{want}: {err}"
        );
    }

    // An update that would strand an allocated address is refused, naming it.
    let block = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPBlock\nmetadata: {name: v4-10-6-168-64}\nspec:\n  base: 10.6.168.64\n  allocations:\n    10.6.168.66: {pool: test-ippool-6, pod: default/a, podUid: u, containerID: c, interface: eth0, node: node-a}\n";
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], block);
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl(
        &[
            "patch",
            "sp",
            "test-ippool-6",
            "--type=merge",
            "-p",
            r#"{"spec":{"ips":["10.6.168.60-10.6.168.64"]}}"#,
        ],
        "",
    );
    assert!(!ok && err.contains("10.6.168.66"), "{err}");
    let (ok, _, err) = s.kubectl(
        &[
            "patch",
            "sp",
            "test-ippool-6",
            "--type=merge",
            "-p",
            r#"{"spec":{"subnet":"10.16.0.0/16"}}"#,
        ],
        "",
    );
    assert!(!ok && err.contains("spec.subnet"), "{err}");
    // Growing it is fine.
    let (ok, _, err) = s.kubectl(
        &[
            "patch",
            "sp",
            "test-ippool-6",
            "--type=merge",
            "-p",
            r#"{"spec":{"ips":["10.6.168.60-10.6.168.79"]}}"#,
        ],
        "",
    );
    assert!(ok, "{err}");

    // The controller down: failurePolicy Fail refuses pool writes (nothing unchecked enters).
    let (_, ca_before, _) = s.kubectl(
        &[
            "get",
            "validatingwebhookconfiguration",
            "spiderpool-controller",
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ],
        "",
    );
    c.kill();
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &pool("while-down", "10.11.0.0/16", "[10.11.0.1]"),
    );
    assert!(!ok && err.contains("failed calling webhook"), "{err}");
    // Back: the same CA from the Secret, the same caBundle, writes accepted again.
    let _c2 = Controller::start(&s, &addr, &dir.path().join("c2.log"));
    let (_, ca_after, _) = s.kubectl(
        &[
            "get",
            "validatingwebhookconfiguration",
            "spiderpool-controller",
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ],
        "",
    );
    assert_eq!(ca_before, ca_after, "the CA changed across a restart");
    assert!(!ca_after.is_empty());
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &pool("while-down", "10.11.0.0/16", "[10.11.0.1]"),
    );
    assert!(ok, "{err}");
}

/// `spiderctl validate`'s cases, one `kubectl apply` each, refused by the webhook with the same
/// messages (a valid document is accepted, and then counts against the next one).
#[test]
fn the_webhook_refuses_what_spiderctl_validate_refuses() {
    let Some(s) = KubeServer::start() else { return };
    s.install_crds(&crds_yaml()).expect("CRDs");
    let dir = tempfile::tempdir().expect("tmp");
    let _c = Controller::start(&s, &free_addr(), &dir.path().join("c.log"));
    let text = include_str!("../../testdata/invalid-pools.yaml");
    let cases: [(&str, &[&str]); 6] = [
        ("unformatted", &["spec.subnet: unformatted subnet 10.6.168.1/24, please change it to 10.6.168.0/24"]),
        ("bad-ranges", &[
            "spec.ips[0]: invalid IP range '10.7.0.20-10.7.0.10': start must not be greater than end",
            "spec.ips[1]: '10.8.0.1' is not inside subnet 10.7.0.0/16",
            "spec.ips[2]: invalid IP range '10.7.0.1 - 10.7.0.2': must not contain spaces",
            "spec.excludeIPs[0]: invalid IP range '10.7.0.0/24': CIDR notation is not allowed",
        ]),
        ("overlap-a", &[]),
        ("overlap-b", &["spec.ips: IPs 10.9.0.40-10.9.0.50 are also in SpiderIPPool overlap-a"]),
        ("gw-in-ips", &["spec.gateway: gateway 10.10.0.1 is inside spec.ips: add it to spec.excludeIPs too"]),
        ("bad-reserved", &["spec.ips[0]: IP range 'fd00::1' is not IPv4"]),
    ];
    let mut checked = 0;
    for doc in text.split("\n---\n") {
        let Some((name, wants)) = cases
            .iter()
            .find(|(n, _)| doc.contains(&format!("name: {n}}}")))
        else {
            continue;
        };
        checked += 1;
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], doc);
        if wants.is_empty() {
            assert!(ok, "{name} refused: {err}");
            continue;
        }
        assert!(!ok, "{name} accepted");
        for w in *wants {
            assert!(err.contains(w), "{name}: missing {w:?} in {err}");
        }
    }
    assert_eq!(
        checked,
        cases.len(),
        "cases not found in testdata/invalid-pools.yaml"
    );
}

/// The controller works with its least-privilege roles (deploy/kubernetes/controller.yaml):
/// certificate Secret, Lease, webhook registration, validation, auto-pools made and reclaimed;
/// and is refused anything else.
#[test]
fn the_controller_works_with_its_roles_and_nothing_more() {
    let user = spiderpool_store::testing::KubeUser {
        token: "controller-token-0123456789".into(),
        name: "controller-user".into(),
        groups: String::new(),
    };
    let Some(s) = KubeServer::start_with_users(std::slice::from_ref(&user)) else {
        return;
    };
    s.install_crds(&crds_yaml()).expect("CRDs");
    let deploy = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/controller.yaml"
    ))
    .expect("controller.yaml");
    // Everything but the Deployment and its Service: roles, and the objects the controller may
    // only update (it cannot create them).
    let rbac: Vec<&str> = deploy
        .split("\n---\n")
        .filter(|d| !d.contains("kind: Deployment") && !d.contains("kind: Service\n"))
        .collect();
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &rbac.join("\n---\n"));
    assert!(ok, "{err}");
    let binds = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: controller-user}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: spiderpool-controller}\nsubjects: [{kind: User, name: controller-user, apiGroup: rbac.authorization.k8s.io}]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: controller-user, namespace: kube-system}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: spiderpool-controller}\nsubjects: [{kind: User, name: controller-user, apiGroup: rbac.authorization.k8s.io}]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: controller-user-events, namespace: default}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: spiderpool-controller-events}\nsubjects: [{kind: User, name: controller-user, apiGroup: rbac.authorization.k8s.io}]\n";
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], binds);
    assert!(ok, "{err}");
    let kc = s
        .write_kubeconfig("controller.kubeconfig", &user.token)
        .expect("kubeconfig");
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start_as(&kc, &free_addr(), &dir.path().join("c.log"));
    // Validation through the webhook (it reads pools, subnets, reserved IPs, blocks).
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &pool("bad", "10.9.0.1/16", "[10.9.0.1]"),
    );
    assert!(!ok && err.contains("please change it to"), "{err}");
    // An auto-pool made ahead of the pods and reclaimed with its application.
    let subnet = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderSubnet\nmetadata: {name: subnet-16}\nspec: {subnet: 10.16.0.0/16, ips: [10.16.0.10-10.16.0.109]}\n";
    let dep = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: default}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata:\n      labels: {app: web}\n      annotations: {ipam.spidernet.io/subnet: '{\"ipv4\": [\"subnet-16\"]}'}\n    spec: {containers: [{name: app, image: busybox}]}\n";
    for y in [subnet, dep] {
        let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], y);
        assert!(ok, "{err}");
    }
    let count = || {
        s.kubectl(
            &[
                "get",
                "sp",
                "-l",
                "ipam.spidernet.io/app-name=web",
                "-o",
                "name",
            ],
            "",
        )
        .1
        .lines()
        .count()
    };
    let t0 = Instant::now();
    while count() != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no pool:\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _, err) = s.kubectl(&["delete", "deployment", "web"], "");
    assert!(ok, "{err}");
    let t0 = Instant::now();
    while count() != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "not reclaimed:\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!c.log_text().contains("forbidden"), "{}", c.log_text());
    // Nothing more.
    let other = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: other, namespace: default}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: other}}\n  template:\n    metadata: {labels: {app: other}}\n    spec: {containers: [{name: app, image: busybox}]}\n";
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], other);
    assert!(ok, "{err}");
    // By name only: its own Secret, Lease and webhook configurations, nothing of the kind else
    // (kube-scheduler's Lease, other Secrets, other webhooks).
    for (verb, what, ns, allowed) in [
        (
            "patch",
            "validatingwebhookconfigurations/spiderpool-controller",
            "",
            true,
        ),
        (
            "patch",
            "mutatingwebhookconfigurations/spiderpool-controller",
            "",
            true,
        ),
        (
            "update",
            "secrets/spiderpool-controller-webhook",
            "kube-system",
            true,
        ),
        (
            "update",
            "leases/spiderpool-controller",
            "kube-system",
            true,
        ),
        ("create", "validatingwebhookconfigurations", "", false),
        (
            "patch",
            "validatingwebhookconfigurations/other-webhook",
            "",
            false,
        ),
        (
            "patch",
            "mutatingwebhookconfigurations/other-webhook",
            "",
            false,
        ),
        (
            "get",
            "secrets/bootstrap-token-abcdef",
            "kube-system",
            false,
        ),
        ("create", "secrets", "kube-system", false),
        ("update", "leases/kube-scheduler", "kube-system", false),
        (
            "get",
            "leases/kube-controller-manager",
            "kube-system",
            false,
        ),
        ("create", "leases", "kube-system", false),
        ("create", "events", "default", true),
        ("create", "events", "kube-system", false),
        ("patch", "spiderippools/status", "", true),
    ] {
        let mut args = vec!["auth", "can-i", verb, what];
        if !ns.is_empty() {
            args.extend(["-n", ns]);
        }
        let (ok, out, err) = s.kubectl_as(&kc, &args, "");
        assert_eq!(ok, allowed, "can-i {verb} {what}: {}{err}", out.trim());
    }
    for args in [
        vec!["create", "configmap", "x", "-n", "default"],
        vec!["delete", "node", "any"],
        vec!["create", "secret", "generic", "x", "-n", "default"],
        vec!["delete", "spidersubnet", "subnet-16"],
        vec![
            "scale",
            "deployment",
            "other",
            "--replicas=3",
            "-n",
            "default",
        ],
    ] {
        let (ok, _, err) = s.kubectl_as(&kc, &args, "");
        assert!(
            !ok && err.contains("forbidden"),
            "{args:?} was allowed: {err}"
        );
    }
}

/// LIST requests the API server has served for `resource`, from its own /metrics.
fn lists_of(s: &KubeServer, resource: &str) -> u64 {
    s.get_raw("/metrics", "text/plain")
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains(&format!("resource=\"{resource}\""))
                && l.contains("verb=\"LIST\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Admission reads a watched cache: twenty reviews (ten pools created, each reviewed by both
/// webhooks) cost the API server no LIST of pools, subnets or reserved IPs (before, every review
/// listed all three, and anyone in the cluster can POST a review).
#[test]
fn admission_reviews_cost_the_api_server_no_list() {
    let Some(s) = KubeServer::start() else { return };
    s.install_crds(&crds_yaml()).expect("CRDs");
    let dir = tempfile::tempdir().expect("tmp");
    // Reconcile rounds far apart (a round runs at least every third of the lease's renew
    // deadline), so only reviews could list.
    let c = Controller::start_with(
        &s.kubeconfig(),
        &free_addr(),
        &dir.path().join("c.log"),
        &[
            "--reconcile-interval-ms",
            "600000",
            "--lease-duration-secs",
            "600",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<u64> = ["spiderippools", "spidersubnets", "spiderreservedips"]
        .iter()
        .map(|r| lists_of(&s, r))
        .collect();
    assert!(before[0] > 0, "the metric is not read: {before:?}");
    for i in 0..10 {
        let (ok, _, err) = s.kubectl(
            &["apply", "-f", "-"],
            &pool(
                &format!("cached-{i}"),
                "10.30.0.0/16",
                &format!("[10.30.{i}.1]"),
            ),
        );
        assert!(ok, "{err}\n{}", c.log_text());
    }
    // The cache still refuses what conflicts with what it has seen.
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &pool("cached-dup", "10.30.0.0/16", "[10.30.3.1]"),
    );
    assert!(!ok, "an overlapping pool was admitted");
    assert!(err.contains("cached-3"), "{err}");
    let after: Vec<u64> = ["spiderippools", "spidersubnets", "spiderreservedips"]
        .iter()
        .map(|r| lists_of(&s, r))
        .collect();
    assert_eq!(before, after, "reviews listed objects");
}

/// The agent's role allows patching every pool (Kubernetes cannot narrow `patch` by name or
/// field), but the webhook lets the agents' service account change only auto-pools and the
/// metadata of others: a compromised node cannot rewrite the addresses of an operator's pool.
#[test]
fn the_agent_may_not_rewrite_an_operators_pool() {
    let Some(s) = KubeServer::start() else { return };
    s.install_crds(&crds_yaml()).expect("CRDs");
    let rbac = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/agent-rbac.yaml"
    ))
    .expect("agent-rbac.yaml");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &rbac);
    assert!(ok, "{err}");
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(&s, &free_addr(), &dir.path().join("c.log"));
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], SEED_POOLS);
    assert!(ok, "{err}\n{}", c.log_text());
    let agent = "--as=system:serviceaccount:kube-system:spiderpool-agent";
    let (ok, _, err) = s.kubectl(
        &[
            agent,
            "patch",
            "sp",
            "test-ippool-6",
            "--type=merge",
            "-p",
            r#"{"spec":{"ips":["10.6.168.60-10.6.168.99"]}}"#,
        ],
        "",
    );
    assert!(!ok, "the agent rewrote an operator's pool");
    assert!(err.contains("may change only the finalizer"), "{err}");
    // Its metadata (what the agent's finalizer handling does) is still allowed.
    let (ok, _, err) = s.kubectl(&[agent, "label", "sp", "test-ippool-6", "touched=yes"], "");
    assert!(ok, "{err}");
    // Creating an operator-style pool: refused; an auto-pool: allowed.
    let (ok, _, err) = s.kubectl(
        &[agent, "apply", "-f", "-"],
        &pool("sneaky", "10.9.0.0/16", "[10.9.0.1]"),
    );
    assert!(!ok && err.contains("only auto-pools"), "{err}");
    let auto = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: auto4-web-eth0-abcde, labels: {ipam.spidernet.io/owner-spider-subnet: s}}\nspec: {subnet: 10.9.0.0/16, ips: [10.9.0.2]}\n";
    let (ok, _, err) = s.kubectl(&[agent, "create", "-f", "-"], auto);
    assert!(ok, "{err}\n{}", c.log_text());
    // The operator still may.
    let (ok, _, err) = s.kubectl(
        &[
            "patch",
            "sp",
            "test-ippool-6",
            "--type=merge",
            "-p",
            r#"{"spec":{"ips":["10.6.168.60-10.6.168.99"]}}"#,
        ],
        "",
    );
    assert!(ok, "{err}");
}

fn scrape(addr: &str) -> String {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{addr}/metrics")])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn conditions(s: &KubeServer, pool: &str) -> serde_json::Value {
    let (_, out, _) = s.kubectl(&["get", "spiderippool", pool, "-o", "json"], "");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v["status"]["conditions"].clone()
}

fn condition(s: &KubeServer, pool: &str, t: &str) -> (String, String) {
    let c = conditions(s, pool);
    let c = c
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == t))
        .cloned()
        .unwrap_or_default();
    (
        c["status"].as_str().unwrap_or_default().to_string(),
        c["message"].as_str().unwrap_or_default().to_string(),
    )
}

fn wait(what: &str, mut f: impl FnMut() -> bool, log: &dyn Fn() -> String) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(20), "{what}\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The leader writes `Valid` and `Exhausted` conditions (an overlapping pool that got in before
/// the webhook says why the agents leave it out), posts NearlyExhausted and Exhausted Events
/// once per crossing, and serves the metrics the shipped dashboard and alerts query.
#[test]
fn pools_carry_conditions_and_events_and_the_controller_serves_its_metrics() {
    let Some(s) = KubeServer::start() else { return };
    s.install_crds(&crds_yaml()).expect("CRDs");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], SEED_POOLS);
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_millis(1100));
    // No webhook yet: an overlapping pool gets in, as two creates at once would.
    let (ok, _, err) = s.kubectl(
        &["apply", "-f", "-"],
        &pool("overlap-new", "10.6.0.0/16", "['10.6.168.65-10.6.168.70']"),
    );
    assert!(ok, "{err}");
    let dir = tempfile::tempdir().expect("tmp");
    let metrics = free_addr();
    let c = Controller::start_with(
        &s.kubeconfig(),
        &free_addr(),
        &dir.path().join("c.log"),
        &[
            "--reconcile-interval-ms",
            "300",
            "--metrics-addr",
            &metrics,
            "--nearly-exhausted-percent",
            "80",
        ],
    );
    let log = || c.log_text();
    wait(
        "Valid conditions",
        || condition(&s, "overlap-new", "Valid").0 == "False",
        &log,
    );
    let (_, why) = condition(&s, "overlap-new", "Valid");
    assert!(why.contains("test-ippool-6"), "{why}");
    assert_eq!(condition(&s, "test-ippool-6", "Valid").0, "True");
    assert_eq!(condition(&s, "test-ippool-6", "Exhausted").0, "False");

    // The agents' counts (written here by hand): 8 of 10, then 10 of 10.
    let counts = |n: i64| {
        let body = serde_json::json!({"status": {"allocatedIPCount": n, "totalIPCount": 10}});
        let (ok, _, err) = s.kubectl(
            &[
                "patch",
                "spiderippool",
                "test-ippool-6",
                "--subresource=status",
                "--type=merge",
                "-p",
                &body.to_string(),
            ],
            "",
        );
        assert!(ok, "{err}");
    };
    let events = |reason: &str| {
        s.kubectl(
            &[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                &format!("involvedObject.name=test-ippool-6,reason={reason}"),
                "-o",
                "jsonpath={.items[*].message}",
            ],
            "",
        )
        .1
    };
    counts(8);
    wait(
        "the NearlyExhausted Event",
        || events("NearlyExhausted").contains("8 of 10"),
        &log,
    );
    counts(10);
    wait(
        "the Exhausted condition",
        || condition(&s, "test-ippool-6", "Exhausted").0 == "True",
        &log,
    );
    wait(
        "the Exhausted Event",
        || events("Exhausted").contains("all 10 addresses"),
        &log,
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        events("Exhausted").matches("all 10").count(),
        1,
        "one Event per crossing"
    );

    // One refused review, then the scrape.
    let (ok, _, _) = s.kubectl(
        &["apply", "-f", "-"],
        &pool("bad", "10.9.0.0/16", "['10.8.0.1']"),
    );
    assert!(!ok, "the webhook refuses an address outside the subnet");
    let text = scrape(&metrics);
    for want in [
        "spiderpool_total_ippool_counts 3\n",
        "spiderpool_invalid_ippool_counts 1\n",
        "spiderpool_exhausted_ippool_counts 1\n",
        "spiderpool_controller_leader 1\n",
        "spiderpool_webhook_refused_counts_total 1\n",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    // Every name the dashboard and alerts query that the agent does not serve is served here.
    let served: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let agent = include_str!("../../spiderpool-agent/src/metrics.rs");
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/components/monitoring/"
    );
    for file in ["monitoring.yaml", "spiderpool-dashboard.json"] {
        let body = std::fs::read_to_string(format!("{dir}{file}")).expect(file);
        for (i, _) in body.match_indices("spiderpool_") {
            let name: String = body[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = name.trim_end_matches("_total").trim_end_matches("_bucket");
            if agent.contains(base) {
                continue;
            }
            assert!(
                served.contains(name.as_str()),
                "{file} queries {name}, served by neither: {text}"
            );
        }
    }
}
