//! Kubernetes mode when things go wrong half-way, against the real API server: a client that
//! leaves in the middle of an ADD, objects the view or the store cannot use.
#![cfg(feature = "kube")]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::kube::{holders, lab, pod, wait_for};
use common::{cni, env_for, netconf, plugin};

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// The plugin gives up on an ADD (here: killed while the block write waits on a paused etcd)
/// and the runtime sends DEL at once. The ADD's write still lands after the client left; the
/// DEL waits for it and frees it. Before the fix the DEL found nothing to free, answered 0,
/// and the write landed afterwards: the address leaked for the pod's lifetime.
#[test]
fn an_add_whose_client_left_is_freed_by_the_next_del() {
    let Some(lab) = lab() else { return };
    let s = &lab.server;
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], &pod("cut", "controller-node-1"));
    assert!(ok, "{err}");
    let a = lab.agent("controller-node-1");
    let conf = netconf("1.0.0", "macvlan-conf", &a.sock(), serde_json::json!({}));
    let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=cut";
    // The pool's block exists and the view has the pod: the next ADD needs etcd only to write.
    for cmd in ["ADD", "DEL"] {
        let c = cni(
            &env_for(cmd, "cut-warm", "eth0", args),
            conf.to_string().as_bytes(),
        );
        assert_eq!(c.code(), 0, "{cmd}: {}\n{}", c.stdout, a.log_text());
    }
    assert!(holders(s).is_empty());
    let etcd = *s.pids().last().expect("etcd pid");

    signal(etcd, "-STOP");
    let mut add = Command::new(plugin())
        .env_clear()
        .envs(env_for("ADD", "cut-1", "eth0", args))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("plugin");
    add.stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("netconf");
    std::thread::sleep(Duration::from_millis(1500));
    // The runtime's timeout: the plugin is gone, its connection closed.
    let _ = add.kill();
    let _ = add.wait();
    let del_conf = conf.to_string();
    let del = std::thread::spawn(move || {
        cni(&env_for("DEL", "cut-1", "eth0", args), del_conf.as_bytes())
    });
    std::thread::sleep(Duration::from_millis(1000));
    signal(etcd, "-CONT");
    let del = del.join().expect("DEL thread");
    assert_eq!(del.code(), 0, "DEL: {}\n{}", del.stdout, a.log_text());
    // Whatever the abandoned ADD wrote is gone now, and stays gone.
    wait_for(
        "the abandoned ADD's record freed",
        Duration::from_secs(10),
        || holders(s).is_empty(),
        &|| format!("{:?}\n{}", holders(s), a.log_text()),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        holders(s).is_empty(),
        "a record appeared after the DEL: {:?}\n{}",
        holders(s),
        a.log_text()
    );
}
