//! A real container runtime calling the chain: Debian's podman (its CNI backend, runc) runs
//! busybox containers on a node's network namespace; the network is `macvlan` with our
//! `spiderpool` IPAM then our `coordinator`. podman passes `K8S_POD_NAME=<container>` and no
//! namespace: the network's default pool serves it. Containers get addresses of the node's
//! zone pool and reach each other, the node reaches them, `podman restart` (DEL then ADD) is
//! served again, and `podman rm` frees every address and leaves nothing on the node.
//!
//! podman runs under `nsenter --net` (not `ip netns exec`, which remounts /sys and hides the
//! cgroup mounts runc needs), with its own storage (vfs) and configuration in a temp dir.
//! Needs root, podman, runc, busybox-static and the lab's packages: outside CI a missing piece
//! is a loud skip; in CI a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::lab::*;
use serde_json::json;
use spiderpool_store::testing::{find_binary, require};

struct Podman {
    dir: PathBuf,
    node: String,
}

impl Podman {
    fn cmd(&self, args: &[&str]) -> Output {
        let d = self.dir.display();
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.node))
            .arg("podman")
            .args([
                "--root",
                &format!("{d}/root"),
                "--runroot",
                &format!("{d}/run"),
            ])
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .output()
            .expect("podman runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The IPv4 address of the container's eth0, as the container sees it.
    fn ip(&self, name: &str) -> String {
        let out = self.ok(&[
            "exec", name, "ip", "-o", "-4", "addr", "show", "dev", "eth0",
        ]);
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "-af", "-t", "0"]);
    }
}

/// podman's configuration, the busybox image and the network `zone6`.
fn setup(dir: &Path, node: &str, cni_bin: &Path, socket: &str) -> Podman {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir");
    std::fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox")).expect("busybox");
    for applet in ["sh", "sleep", "ping", "ip", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).expect("applet");
    }
    let tar = dir.join("rootfs.tar");
    sh(&[
        "tar",
        "-C",
        &rootfs.to_string_lossy(),
        "-cf",
        &tar.to_string_lossy(),
        ".",
    ]);
    let netd = dir.join("net.d");
    std::fs::create_dir_all(&netd).expect("mkdir");
    std::fs::write(
        dir.join("containers.conf"),
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
             [containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n",
            cni_bin.display(),
            netd.display()
        ),
    )
    .expect("containers.conf");
    let list = json!({"cniVersion": "1.0.0", "name": "zone6", "plugins": [
        {"type": "macvlan", "master": "ens192", "mode": "bridge",
         "ipam": {"type": "spiderpool", "ipam_unix_socket_path": socket,
                  "default_ipv4_ippool": ["test-ippool-6"]}},
        {"type": "coordinator", "service_cidr": ["10.233.0.0/18"]}]});
    std::fs::write(netd.join("zone6.conflist"), list.to_string()).expect("conflist");
    let p = Podman {
        dir: dir.to_path_buf(),
        node: node.to_string(),
    };
    p.ok(&["import", &tar.to_string_lossy(), "localhost/busybox:lab"]);
    p
}

#[test]
fn podman_containers_get_zone_addresses_restart_and_rm_free_them() {
    let Some(_) = lab_prerequisites() else {
        return;
    };
    for (what, hint) in [
        ("podman", "podman"),
        ("runc", "runc"),
        ("nsenter", "util-linux"),
    ] {
        if require(what, find_binary(what), &format!("apt-get install {hint}")).is_none() {
            return;
        }
    }
    if require(
        "busybox",
        Path::new("/usr/bin/busybox").exists().then_some(()),
        "apt-get install busybox-static",
    )
    .is_none()
    {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let store = format!("embedded:{}", dir.path().join("leases.redb").display());
    let agent = agent_for(dir.path(), "controller-node-1", &store);
    let mut ns = Netns::new();
    let (_router, node) = zone6(&mut ns);
    let path = cni_path(dir.path());
    let pm = setup(dir.path(), &node, &path, &agent.sock());
    for c in ["web-a", "web-b"] {
        pm.ok(&[
            "run",
            "-d",
            "--name",
            c,
            "--network",
            "zone6",
            "localhost/busybox:lab",
            "sleep",
            "3600",
        ]);
    }
    let (a, b) = (pm.ip("web-a"), pm.ip("web-b"));
    assert!(
        a.starts_with("10.6.168.") && b.starts_with("10.6.168.") && a != b,
        "{a} {b}"
    );
    assert_eq!(
        pool_counts(&agent.sock())[0],
        ("test-ippool-6".to_string(), 2)
    );
    pm.ok(&["exec", "web-a", "ping", "-c", "1", "-W", "2", &b]);
    pm.ok(&["exec", "web-a", "ping", "-c", "1", "-W", "2", "10.6.0.1"]);
    assert!(ping(&node, &a), "the node cannot reach its container {a}");
    // restart: DEL then ADD on a new namespace; served again, nothing more held.
    pm.ok(&["restart", "-t", "0", "web-a"]);
    let again = pm.ip("web-a");
    assert!(again.starts_with("10.6.168."), "after restart: {again}");
    assert_eq!(
        pool_counts(&agent.sock())[0],
        ("test-ippool-6".to_string(), 2)
    );
    pm.ok(&["exec", "web-b", "ping", "-c", "1", "-W", "2", &again]);
    // rm frees every address and leaves no veth on the node.
    pm.ok(&["rm", "-f", "-t", "0", "web-a", "web-b"]);
    assert_eq!(
        pool_counts(&agent.sock())[0],
        ("test-ippool-6".to_string(), 0)
    );
    let links = sh(&["ip", "-n", &node, "-o", "link", "show", "type", "veth"]);
    assert_eq!(
        links.lines().filter(|l| !l.contains("ens192")).count(),
        0,
        "{links}"
    );
    let rules = sh(&["ip", "-n", &node, "rule"]);
    assert!(!rules.contains("lookup 500"), "{rules}");
}
