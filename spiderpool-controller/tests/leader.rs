//! Leadership of the auto-pool reconcile against the real API server: another replica's Lease is
//! judged by how long this one has seen it unchanged (client-go's observed time), never by the
//! other replica's clock, and an expired one is taken over.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use spiderpool_store::k8s::crd::crds_yaml;
use spiderpool_store::testing::KubeServer;

const LEASE: &str = "spiderpool-controller";

/// `secs_ago` seconds before now as a Kubernetes MicroTime (RFC 3339, 6 fractional digits).
fn micro_time_ago(secs_ago: i64) -> String {
    let t = time::OffsetDateTime::now_utc() - time::Duration::seconds(secs_ago);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    t.format(&f).expect("time")
}

fn holder(s: &KubeServer) -> String {
    let (_, out, _) = s.kubectl(
        &[
            "get",
            "lease",
            "-n",
            "kube-system",
            LEASE,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        "",
    );
    out
}

struct Proc(Child, std::path::PathBuf);

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A controller with a 3 s lease, reconciling every 200 ms, logging to `log`.
fn start_controller(s: &KubeServer, log: &std::path::Path) -> Proc {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .to_string();
    let child = Command::new(env!("CARGO_BIN_EXE_spiderpool-controller"))
        .arg("--kubeconfig")
        .arg(s.kubeconfig())
        .args([
            "--webhook-addr",
            &addr,
            "--reconcile-interval-ms",
            "200",
            "--lease-duration-secs",
            "3",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("controller starts");
    Proc(child, log.to_path_buf())
}

/// A replica whose clock runs two minutes behind keeps renewing its Lease: its `renewTime` looks
/// long expired to our clock, yet the controller never takes the Lease while it changes; once the
/// other replica stops, the controller takes over after one lease duration of seeing no change.
#[test]
fn a_live_leader_with_a_slow_clock_keeps_the_lease_and_a_dead_one_loses_it() {
    let Some(s) = KubeServer::start() else { return };
    s.install_crds(&crds_yaml()).expect("CRDs");
    let lease = |renew: &str| {
        format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {{name: {LEASE}, namespace: kube-system}}\nspec: {{holderIdentity: other-replica, leaseDurationSeconds: 3, renewTime: '{renew}', acquireTime: '{renew}'}}\n"
        )
    };
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &lease(&micro_time_ago(120)));
    assert!(ok, "{err}");
    // The other replica renews every 300 ms, with its clock two minutes behind ours.
    let renewing = AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while renewing.load(Relaxed) {
                let patch = format!(r#"{{"spec":{{"renewTime":"{}"}}}}"#, micro_time_ago(120));
                let _ = s.kubectl(
                    &[
                        "patch",
                        "lease",
                        "-n",
                        "kube-system",
                        LEASE,
                        "--type=merge",
                        "-p",
                        &patch,
                    ],
                    "",
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let dir = tempfile::tempdir().expect("dir");
        let c = start_controller(&s, &dir.path().join("c.log"));
        // Five lease durations: the live replica keeps it.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(6) {
            assert_eq!(holder(&s), "other-replica", "{}", c.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(!c.log().contains("leading=true"), "{}", c.log());
        // The other replica dies: taken over after one lease duration without a change.
        renewing.store(false, Relaxed);
        let t1 = Instant::now();
        while holder(&s) == "other-replica" {
            assert!(t1.elapsed() < Duration::from_secs(15), "{}", c.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            t1.elapsed() >= Duration::from_millis(2500),
            "taken after {:?}, before the lease ran out",
            t1.elapsed()
        );
        assert!(c.log().contains("leading=true"), "{}", c.log());
    });
}

/// Two controllers; the leader is paused (SIGSTOP: a stalled process, a frozen VM) for two lease
/// durations. The other takes over; when the paused one resumes it does not act on the
/// leadership it had: it sees the other's Lease, reports itself no longer leading, and the Lease
/// stays with the new leader.
#[test]
fn a_paused_leader_loses_the_lease_and_does_not_take_it_back() {
    let Some(s) = KubeServer::start() else { return };
    s.install_crds(&crds_yaml()).expect("CRDs");
    let dir = tempfile::tempdir().expect("dir");
    let a = start_controller(&s, &dir.path().join("a.log"));
    let b = start_controller(&s, &dir.path().join("b.log"));
    let pid_of = |h: &str| h.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
    let t0 = Instant::now();
    let first = loop {
        if let Some(pid) = pid_of(&holder(&s)) {
            break pid;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{}\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (leader, other) = if first == a.0.id() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(first, leader.0.id());
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &leader.0.id().to_string()])
            .status()
            .is_ok_and(|st| st.success());
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    let t1 = Instant::now();
    while pid_of(&holder(&s)) != Some(other.0.id()) {
        if t1.elapsed() > Duration::from_secs(15) {
            signal("-CONT");
            panic!("no takeover:\n{}", other.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    signal("-CONT");
    // Three lease durations after the resume: the Lease stays with the new leader.
    let t2 = Instant::now();
    while t2.elapsed() < Duration::from_secs(9) {
        assert_eq!(
            pid_of(&holder(&s)),
            Some(other.0.id()),
            "the resumed replica took the Lease back:\n{}",
            leader.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = leader.log();
    let gave_up = log.rfind("leading=false");
    let led = log.find("leading=true");
    assert!(
        led.is_some() && gave_up > led,
        "the resumed replica does not say it stopped leading:\n{log}"
    );
}
