//! The node path with real processes: `spiderpool-agent` on a real embedded store, and the
//! `spiderpool` CNI plugin binary called exactly as a runtime calls it (CNI_* environment, the
//! whole network configuration on stdin). No netns here: these run as any user; the netns
//! end-to-end tests with macvlan and bridge are in `netns.rs`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The seed's pod on worker-node-1 (annotation: test-ippool-6, test-ippool-7).
const POD_ARGS: &str =
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=test-app-nkq5h;K8S_POD_UID=uid-1";
/// A pod the view does not know: served as a pod without annotations (CNI defaults apply).
const PLAIN_ARGS: &str =
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=plain;K8S_POD_UID=uid-2";

struct Lab {
    dir: tempfile::TempDir,
    agent: Agent,
}

impl Lab {
    /// An agent of node `worker-node-1` (zone subnet-7) on an embedded store, with the seed's
    /// pools and cluster plus `extra` manifests (a file in a watched directory).
    fn start(extra: &str) -> Lab {
        let dir = tempfile::tempdir().expect("dir");
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).expect("mkdir");
        for f in ["seed-pools.yaml", "seed-cluster.yaml"] {
            std::fs::copy(testdata(f), manifests.join(f)).expect("copy");
        }
        std::fs::write(manifests.join("extra.yaml"), extra).expect("write");
        let store = format!("embedded:{}", dir.path().join("leases.redb").display());
        let args: Vec<String> = [
            "--node-name",
            "worker-node-1",
            "--store",
            &store,
            "--manifests",
            &manifests.to_string_lossy(),
            "--reload-interval-ms",
            "100",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let agent = Agent::start(
            &dir.path().join("agent.sock"),
            &dir.path().join("agent.log"),
            &args,
        );
        Lab { dir, agent }
    }

    fn conf(&self, version: &str, name: &str, ipam: Value) -> Vec<u8> {
        netconf(version, name, &self.agent.sock(), ipam)
            .to_string()
            .into_bytes()
    }

    fn extra(&self) -> std::path::PathBuf {
        self.dir.path().join("manifests").join("extra.yaml")
    }
}

#[test]
fn every_cni_version_add_check_del_and_version() {
    let lab = Lab::start("");
    let mut seen = std::collections::BTreeSet::new();
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let conf = lab.conf(version, "macvlan-zone", json!({}));
        let cid = format!("c-{i}");
        let add = cni(&env_for("ADD", &cid, "eth0", POD_ARGS), &conf);
        assert_eq!(add.status, 0, "{version}: {}", add.stdout);
        assert_eq!(add.json["cniVersion"], *version);
        let ip = add.ip();
        assert!(ip.starts_with("10.7.168."), "zone 7 address: {ip}");
        assert!(seen.insert(ip.clone()), "{ip} twice");
        assert_eq!(add.json["ips"][0]["gateway"], "10.7.0.1");
        assert_eq!(
            add.json["routes"][0],
            json!({"dst": "0.0.0.0/0", "gw": "10.7.0.1"})
        );
        let legacy = version.starts_with("0.");
        assert_eq!(
            add.json["ips"][0].get("version").is_some(),
            legacy,
            "{version}: {}",
            add.stdout
        );
        // ADD again (a runtime retry) answers the same address.
        let again = cni(&env_for("ADD", &cid, "eth0", POD_ARGS), &conf);
        assert_eq!(again.ip(), ip, "{version}: idempotent ADD");
        if *version >= "0.4.0" {
            let mut with_prev: Value = serde_json::from_slice(&conf).expect("json");
            with_prev["prevResult"] = add.json.clone();
            let check = cni(
                &env_for("CHECK", &cid, "eth0", POD_ARGS),
                with_prev.to_string().as_bytes(),
            );
            assert_eq!(check.status, 0, "{version}: CHECK {}", check.stdout);
        }
        let del = cni(&env_for("DEL", &cid, "eth0", POD_ARGS), &conf);
        assert_eq!((del.status, del.stdout.as_str()), (0, ""), "{version}: DEL");
        let del2 = cni(&env_for("DEL", &cid, "eth0", POD_ARGS), &conf);
        assert_eq!(del2.status, 0, "{version}: repeated DEL");
        if *version >= "0.4.0" {
            let check = cni(&env_for("CHECK", &cid, "eth0", POD_ARGS), &conf);
            assert_eq!(
                check.code(),
                102,
                "{version}: CHECK after DEL: {}",
                check.stdout
            );
            assert!(check.json["msg"]
                .as_str()
                .unwrap_or("")
                .contains("no IP is allocated"));
        }
        let v = cni(&[("CNI_COMMAND", "VERSION")], &conf);
        assert_eq!(v.json["cniVersion"], *version);
        assert_eq!(
            v.json["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
    assert!(
        endpoints(&lab.agent.sock()).is_empty(),
        "everything released"
    );
}

/// Pools for the GC tests: one per network, no affinity.
const NETS: &str = r#"
kind: SpiderIPPool
metadata: {name: net-a-pool}
spec: {subnet: 10.20.0.0/24, ips: [10.20.0.10-10.20.0.20]}
---
kind: SpiderIPPool
metadata: {name: net-b-pool}
spec: {subnet: 10.21.0.0/24, ips: [10.21.0.10-10.21.0.20]}
"#;

#[test]
fn gc_keeps_both_nics_of_a_pod_on_two_networks_and_frees_only_its_network() {
    let lab = Lab::start(NETS);
    let a = lab.conf(
        "1.1.0",
        "net-a",
        json!({"default_ipv4_ippool": ["net-a-pool"]}),
    );
    let b = lab.conf(
        "1.1.0",
        "net-b",
        json!({"default_ipv4_ippool": ["net-b-pool"]}),
    );
    // Pod p: eth0 on network A, net1 on network B (Multus). Pod q: eth0 on network A only.
    assert_eq!(cni(&env_for("ADD", "p", "eth0", PLAIN_ARGS), &a).status, 0);
    assert_eq!(cni(&env_for("ADD", "p", "net1", PLAIN_ARGS), &b).status, 0);
    assert_eq!(cni(&env_for("ADD", "q", "eth0", PLAIN_ARGS), &a).status, 0);
    let gc = |conf: &[u8], valid: Value| {
        let mut c: Value = serde_json::from_slice(conf).expect("json");
        c["cni.dev/valid-attachments"] = valid;
        let out = cni(
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
            c.to_string().as_bytes(),
        );
        assert_eq!(out.status, 0, "GC: {}", out.stdout);
    };
    let before = endpoints(&lab.agent.sock());
    assert_eq!(before.len(), 3);
    // The runtime garbage-collects each network with what it knows is valid there.
    gc(
        &a,
        json!([{"containerID": "p", "ifname": "eth0"}, {"containerID": "q", "ifname": "eth0"}]),
    );
    gc(&b, json!([{"containerID": "p", "ifname": "net1"}]));
    assert_eq!(endpoints(&lab.agent.sock()), before, "GC freed a live NIC");
    // q is gone: GC of network A frees q's address and nothing of network B.
    gc(&a, json!([{"containerID": "p", "ifname": "eth0"}]));
    let after = endpoints(&lab.agent.sock());
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.iter().all(|r| r.0.ends_with("#p")), "{after:?}");
    // The older key is accepted too; an empty list for B frees p's net1 only.
    let mut c: Value = serde_json::from_slice(&b).expect("json");
    c["cni.dev/attachments"] = json!([]);
    assert_eq!(
        cni(&[("CNI_COMMAND", "GC")], c.to_string().as_bytes()).status,
        0
    );
    let left = endpoints(&lab.agent.sock());
    assert_eq!(left.len(), 1);
    assert_eq!((left[0].1.as_str(), left[0].4.as_str()), ("eth0", "net-a"));
}

#[test]
fn gc_of_one_network_keeps_nics_the_first_add_allocated_from_ippools() {
    // eth0's ADD allocates net1 too (ippools annotation); the runtime lists only eth0.
    let pod = r#"
apiVersion: v1
kind: Pod
metadata:
  name: multi
  namespace: default
  annotations:
    ipam.spidernet.io/ippools: '[{"interface":"eth0","ipv4":["net-a-pool"]},{"interface":"net1","ipv4":["net-b-pool"]}]'
"#;
    let lab = Lab::start(&format!("{NETS}\n---\n{pod}"));
    let a = lab.conf("1.1.0", "net-a", json!({}));
    let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=multi;K8S_POD_UID=u";
    assert_eq!(cni(&env_for("ADD", "m", "eth0", args), &a).status, 0);
    assert_eq!(
        endpoints(&lab.agent.sock()).len(),
        2,
        "eth0 and net1 on the first ADD"
    );
    let mut c: Value = serde_json::from_slice(&a).expect("json");
    c["cni.dev/valid-attachments"] = json!([{"containerID": "m", "ifname": "eth0"}]);
    assert_eq!(
        cni(&[("CNI_COMMAND", "GC")], c.to_string().as_bytes()).status,
        0
    );
    assert_eq!(
        endpoints(&lab.agent.sock()).len(),
        2,
        "GC freed c/net1 while the pod runs"
    );
}

#[test]
fn bad_input_gets_its_code_an_actionable_message_and_changes_nothing() {
    let lab = Lab::start(NETS);
    let good = lab.conf("1.0.0", "n", json!({}));
    assert_eq!(
        cni(&env_for("ADD", "keep", "eth0", POD_ARGS), &good).status,
        0
    );
    let state = endpoints(&lab.agent.sock());
    let dead = lab.dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).expect("bind")); // a socket file nobody serves
    let cases: Vec<BadCase> = vec![
        (
            "malformed JSON",
            env_for("ADD", "x", "eth0", POD_ARGS),
            b"{\"cniVersion\": ".to_vec(),
            6,
            "not JSON",
        ),
        (
            "missing CNI_IFNAME",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "x"),
                ("CNI_NETNS", "/n"),
            ],
            good.clone(),
            4,
            "CNI_IFNAME is not set",
        ),
        (
            "missing CNI_COMMAND",
            vec![],
            good.clone(),
            4,
            "CNI_COMMAND is not set",
        ),
        (
            "unsupported version",
            env_for("ADD", "x", "eth0", POD_ARGS),
            lab.conf("0.2.0", "n", json!({})),
            1,
            "incompatible CNI version 0.2.0",
        ),
        (
            "wrong key type",
            env_for("ADD", "x", "eth0", POD_ARGS),
            lab.conf("1.0.0", "n", json!({"default_ipv4_ippool": "net-a-pool"})),
            7,
            "must be a list",
        ),
        (
            "unknown pool",
            env_for("ADD", "x", "eth0", "IgnoreUnknown=1"),
            lab.conf(
                "1.0.0",
                "n",
                json!({"default_ipv4_ippool": ["no-such-pool"]}),
            ),
            100,
            "no-such-pool",
        ),
        (
            "pool of the wrong family",
            env_for("ADD", "x", "eth0", "IgnoreUnknown=1"),
            lab.conf("1.0.0", "n", json!({"default_ipv6_ippool": ["net-a-pool"]})),
            100,
            "net-a-pool",
        ),
        (
            "no pool for a non-Kubernetes container",
            env_for("ADD", "x", "eth0", "IgnoreUnknown=1"),
            good.clone(),
            100,
            "only the CNI config's default_ipv4_ippool",
        ),
        (
            "missing socket",
            env_for("ADD", "x", "eth0", POD_ARGS),
            netconf("1.0.0", "n", "/nonexistent/agent.sock", json!({}))
                .to_string()
                .into_bytes(),
            11,
            "does not exist: is spiderpool-agent running",
        ),
        (
            "socket of a dead agent",
            env_for("ADD", "x", "eth0", POD_ARGS),
            netconf("1.0.0", "n", &dead.to_string_lossy(), json!({}))
                .to_string()
                .into_bytes(),
            11,
            "cannot reach spiderpool-agent",
        ),
        (
            "huge stdin",
            env_for("ADD", "x", "eth0", POD_ARGS),
            vec![b' '; 2 << 20],
            6,
            "larger than",
        ),
    ];
    for (what, env, stdin, code, text) in cases {
        let out = cni(&env, &stdin);
        assert_eq!(out.code(), code, "{what}: {}", out.stdout);
        assert_eq!(out.status as u64, code, "{what}: exit status");
        let msg = format!(
            "{} {}",
            out.json["msg"].as_str().unwrap_or(""),
            out.json["details"].as_str().unwrap_or("")
        );
        assert!(msg.contains(text), "{what}: message {msg:?} lacks {text:?}");
        assert_eq!(
            endpoints(&lab.agent.sock()),
            state,
            "{what} changed the store"
        );
    }
    // DEL with a dead agent is retryable (the runtime retries); without any agent it succeeds.
    let del_dead = cni(
        &env_for("DEL", "keep", "eth0", POD_ARGS),
        netconf("1.0.0", "n", &dead.to_string_lossy(), json!({}))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(del_dead.code(), 11, "{}", del_dead.stdout);
    let del_none = cni(
        &env_for("DEL", "keep", "eth0", POD_ARGS),
        netconf("1.0.0", "n", "/nonexistent/agent.sock", json!({}))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(del_none.status, 0, "{}", del_none.stdout);
    assert_eq!(endpoints(&lab.agent.sock()), state);
}

#[test]
fn exhaustion_and_fifty_parallel_adds_into_a_pool_of_exactly_fifty() {
    let pool = "kind: SpiderIPPool\nmetadata: {name: fifty}\nspec: {subnet: 10.30.0.0/24, ips: [10.30.0.1-10.30.0.50]}\n";
    let lab = Lab::start(pool);
    let conf = lab.conf("1.0.0", "n", json!({"default_ipv4_ippool": ["fifty"]}));
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let conf = conf.clone();
            std::thread::spawn(move || {
                let cid = format!("par-{i}");
                cni(&env_for("ADD", &cid, "eth0", PLAIN_ARGS), &conf)
            })
        })
        .collect();
    let mut ips = std::collections::BTreeSet::new();
    for h in handles {
        let out = h.join().expect("thread");
        assert_eq!(out.status, 0, "{}", out.stdout);
        assert!(ips.insert(out.ip()), "{} twice", out.ip());
    }
    assert_eq!(ips.len(), 50);
    let more = cni(&env_for("ADD", "one-more", "eth0", PLAIN_ARGS), &conf);
    assert_eq!(more.code(), 101, "{}", more.stdout);
    assert!(
        more.json["details"]
            .as_str()
            .unwrap_or("")
            .contains("fifty skipped (exhausted (50/50 allocated))"),
        "{}",
        more.stdout
    );
    // Runtimes print "msg; details": each pool's reason appears once in the two.
    let shown = format!(
        "{}; {}",
        more.json["msg"].as_str().unwrap_or(""),
        more.json["details"].as_str().unwrap_or("")
    );
    assert_eq!(shown.matches("fifty skipped").count(), 1, "{shown}");
    assert!(shown.contains("exhausted"), "{shown}");
    let rows = spiderctl(&[
        "get",
        "ippools",
        "--socket",
        &lab.agent.sock(),
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_slice(&rows.stdout).expect("json");
    let fifty = v
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "fifty"))
        .cloned()
        .expect("row");
    assert_eq!(
        (
            fifty["allocatedIPCount"].as_u64(),
            fifty["totalIPCount"].as_i64()
        ),
        (Some(50), Some(50))
    );
}

/// While the agent restarts (SIGTERM, a DaemonSet rollout) STATUS is 50 and a DEL fails with 11,
/// so the runtime retries it: the address is freed by that DEL once the agent is back, not left
/// to GC by a DEL that "succeeded" against no agent.
#[test]
fn status_is_0_with_the_agent_and_50_without_and_del_waits_for_its_restart() {
    let mut lab = Lab::start("");
    let conf = lab.conf(
        "1.1.0",
        "n",
        json!({"default_ipv4_ippool": ["test-ippool-7"]}),
    );
    let up = cni(&[("CNI_COMMAND", "STATUS")], &conf);
    assert_eq!((up.status, up.stdout.as_str()), (0, ""));
    let add = cni(&env_for("ADD", "rollout", "eth0", "IgnoreUnknown=1"), &conf);
    assert_eq!(add.code(), 0, "{}", add.stdout);
    assert_eq!(
        lab.agent.terminate().code(),
        Some(0),
        "SIGTERM exits cleanly"
    );
    assert!(
        lab.agent.socket.exists(),
        "the socket stays for the next agent"
    );
    let down = cni(&[("CNI_COMMAND", "STATUS")], &conf);
    assert_eq!(down.code(), 50, "{}", down.stdout);
    assert!(down.json["msg"]
        .as_str()
        .unwrap_or("")
        .contains("cannot serve ADD"));
    let del = cni(&env_for("DEL", "rollout", "eth0", "IgnoreUnknown=1"), &conf);
    assert_eq!(
        del.code(),
        11,
        "a DEL during the restart is retried: {}",
        del.stdout
    );
    lab.agent.start_again();
    let del = cni(&env_for("DEL", "rollout", "eth0", "IgnoreUnknown=1"), &conf);
    assert_eq!(del.code(), 0, "{}", del.stdout);
    let eps = endpoints(&lab.agent.sock());
    assert!(eps.is_empty(), "the retried DEL freed the address: {eps:?}");
}

#[test]
fn socket_is_private_and_manifests_reload_keeping_the_last_good_view() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::start("");
    let mode = std::fs::metadata(&lab.agent.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    // The socket was bound in a private directory and moved into place; nothing is left of it.
    let dir = lab.agent.socket.parent().expect("socket dir");
    let left: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".spiderpool-agent-bind")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let conf = lab.conf("1.0.0", "n", json!({"default_ipv4_ippool": ["late"]}));
    let before = cni(&env_for("ADD", "r1", "eth0", "IgnoreUnknown=1"), &conf);
    assert_eq!(before.code(), 100, "{}", before.stdout);
    std::fs::write(
        lab.extra(),
        "kind: SpiderIPPool\nmetadata: {name: late}\nspec: {subnet: 10.40.0.0/24, ips: [10.40.0.1-10.40.0.9]}\n",
    )
    .expect("write");
    let ok = wait_for(|| cni(&env_for("ADD", "r1", "eth0", "IgnoreUnknown=1"), &conf).status == 0);
    assert!(
        ok,
        "the new pool was not picked up:\n{}",
        lab.agent.log_text()
    );
    // An invalid change is refused with a log line; the last good view stays.
    std::fs::write(
        lab.extra(),
        "kind: SpiderIPPool\nmetadata: {name: late}\nspec: {subnet: 10.40.0.1/24}\n",
    )
    .expect("write");
    assert!(
        wait_for(|| lab
            .agent
            .log_text()
            .contains("manifests changed but are invalid")),
        "{}",
        lab.agent.log_text()
    );
    assert!(lab
        .agent
        .log_text()
        .contains("unformatted subnet 10.40.0.1/24"));
    let still = cni(&env_for("ADD", "r2", "eth0", "IgnoreUnknown=1"), &conf);
    assert_eq!(still.status, 0, "{}", still.stdout);
}

#[test]
fn kill_9_during_a_burst_loses_nothing_acknowledged() {
    let mut lab = Lab::start("kind: SpiderIPPool\nmetadata: {name: big}\nspec: {subnet: 10.50.0.0/16, ips: [10.50.0.1-10.50.3.255]}\n");
    let conf = lab.conf("1.0.0", "n", json!({"default_ipv4_ippool": ["big"]}));
    // Bounded by count, not time: 4 workers of at most 200 ADDs never fill the 1,023 addresses,
    // and the kill comes once 40 are answered, however fast the machine.
    const PER_WORKER: usize = 200;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (conf, stop, answered) = (conf.clone(), stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut told = Vec::new();
                for i in 0..PER_WORKER {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let cid = format!("burst-{w}-{i}");
                    let out = cni(&env_for("ADD", &cid, "eth0", PLAIN_ARGS), &conf);
                    match out.status {
                        0 => {
                            told.push((cid, out.ip()));
                            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        11 => {} // the agent is down: the runtime would retry
                        _ => panic!("unexpected answer {}", out.stdout),
                    }
                }
                told
            })
        })
        .collect();
    let wait_for_answers = |n: usize| {
        let t0 = std::time::Instant::now();
        while answered.load(std::sync::atomic::Ordering::Relaxed) < n
            && t0.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        answered.load(std::sync::atomic::Ordering::Relaxed)
    };
    let at_kill = wait_for_answers(40);
    assert!(at_kill < 4 * PER_WORKER, "the burst ended before the kill");
    lab.agent.kill9();
    std::thread::sleep(Duration::from_millis(200));
    lab.agent.restart();
    wait_for_answers(at_kill + 40);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let told: Vec<(String, String)> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    assert!(told.len() > 10, "only {} ADDs answered", told.len());
    let rows = endpoints(&lab.agent.sock());
    let held: std::collections::BTreeMap<String, String> = rows
        .iter()
        .map(|r| (r.0.split('#').nth(1).unwrap_or("").to_string(), r.2.clone()))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = held.values().collect();
    assert_eq!(distinct.len(), held.len(), "an address held twice");
    for (cid, ip) in &told {
        let addr = ip.split('/').next().unwrap_or("");
        assert_eq!(
            held.get(cid).map(String::as_str),
            Some(addr),
            "{cid} was told {ip}"
        );
        // A retried ADD answers what it got before.
        let again = cni(&env_for("ADD", cid, "eth0", PLAIN_ARGS), &conf);
        assert_eq!(&again.ip(), ip, "{cid}: retried ADD");
    }
    // Records never acknowledged can only be the ADDs in flight at the kill (one per worker).
    assert!(
        held.len() <= told.len() + 4,
        "{} records for {} answers",
        held.len(),
        told.len()
    );
}

/// One bad-input case: what, the environment, stdin, the expected code, a text of the message.
type BadCase<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u64, &'a str);

fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Every 1.1.0 network configuration we ship serves GC and STATUS through both our plugins (the
/// verbs Debian's 1.1.1 plugins do not speak, so each of ours is called directly, as libcni
/// calls each plugin of a list).
#[test]
fn shipped_1_1_0_configurations_serve_gc_and_status() {
    let lab = Lab::start("");
    let root: std::path::PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "deploy"]
        .iter()
        .collect();
    let conflist: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("cni/10-macvlan-zone.conflist")).expect("conflist"),
    )
    .expect("json");
    let nad: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root.join("kubernetes/macvlan-zone-1.1.0.yaml")).expect("nad"),
    )
    .expect("yaml");
    let nad: Value =
        serde_json::from_str(nad["spec"]["config"].as_str().expect("config")).expect("json");
    let coordinator = workspace_bin("coordinator", "spiderpool-cni");
    for list in [conflist, nad] {
        assert_eq!(list["cniVersion"], "1.1.0");
        for p in list["plugins"].as_array().expect("plugins") {
            let mut c = p.clone();
            c["name"] = list["name"].clone();
            c["cniVersion"] = list["cniVersion"].clone();
            c["cni.dev/valid-attachments"] = json!([]);
            if c.get("ipam").is_some() {
                c["ipam"]["ipam_unix_socket_path"] = json!(lab.agent.sock());
            }
            for verb in ["STATUS", "GC"] {
                let out = match p["type"].as_str() {
                    Some("macvlan") => cni(&[("CNI_COMMAND", verb)], c.to_string().as_bytes()),
                    Some("coordinator") => common::cni_with(
                        &coordinator,
                        &[("CNI_COMMAND", verb)],
                        c.to_string().as_bytes(),
                    ),
                    other => panic!("unexpected plugin {other:?}"),
                };
                assert_eq!(out.status, 0, "{verb} of {}: {}", p["type"], out.stdout);
            }
        }
    }
}

/// Every binary says its version; `spiderctl version --socket` also asks the agent.
#[test]
fn every_binary_reports_its_version_and_spiderctl_the_agents() {
    let lab = Lab::start("");
    let v = env!("CARGO_PKG_VERSION");
    for (bin, pkg) in [
        ("spiderpool", "spiderpool-cni"),
        ("coordinator", "spiderpool-cni"),
        ("spiderpool-agent", "spiderpool-agent"),
        ("spiderctl", "spiderpool-agent"),
    ] {
        let out = std::process::Command::new(workspace_bin(bin, pkg))
            .arg("--version")
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.trim() == format!("{bin} {v}"),
            "{bin}: {text}"
        );
    }
    let out = spiderctl(&["version", "--socket", &lab.agent.sock()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "spiderpool-agent {v} (node worker-node-1, store embedded)"
        )),
        "{text}"
    );
    let out = spiderctl(&["version", "--socket", "/nonexistent.sock"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unreachable agent is an error"
    );
}
