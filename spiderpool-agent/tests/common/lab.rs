//! The lab of the node-path tests: network namespaces for a router, nodes and pods, CNI plugins
//! run inside a node's namespace as its runtime runs them, and agents on the seed's manifests.
//! Needs root, iproute2, ping, etcd and containernetworking-plugins: outside CI a missing piece
//! is a loud skip; in CI (`CI` set) it is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use spiderpool_store::testing::{find_binary, is_root, require};

use super::*;

pub const MACVLAN: &str = "/usr/lib/cni/macvlan";
pub const BRIDGE: &str = "/usr/lib/cni/bridge";

/// Everything a lab test needs, or `None` after a loud skip.
pub fn lab_prerequisites() -> Option<PathBuf> {
    require(
        "root (network namespaces)",
        is_root().then_some(()),
        "run as root, as CI does",
    )?;
    require(
        "iproute2 (ip)",
        find_binary("ip"),
        "apt-get install iproute2",
    )?;
    require("ping", find_binary("ping"), "apt-get install iputils-ping")?;
    for p in [MACVLAN, BRIDGE] {
        require(
            p,
            Path::new(p).exists().then_some(()),
            "apt-get install containernetworking-plugins",
        )?;
    }
    require("etcd", find_binary("etcd"), "apt-get install etcd-server")
}

/// Runs a command; panics with its output when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Namespaces of one test, deleted on drop (deleting a namespace removes its links).
pub struct Netns {
    names: Vec<String>,
    /// The prefix of every namespace of this test.
    pub tag: String,
}

impl Netns {
    pub fn new() -> Netns {
        Netns {
            names: Vec::new(),
            tag: format!(
                "sp{}x{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// Creates namespace `<tag>-<what>` with loopback up; returns its name.
    pub fn add(&mut self, what: &str) -> String {
        let name = format!("{}-{what}", self.tag);
        sh(&["ip", "netns", "add", &name]);
        self.names.push(name.clone());
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// A router namespace with `gw` (CIDR) on a veth whose other end is `ens192` in `node`.
    pub fn uplink(&self, router: &str, node: &str, side: &str, gw: &str) {
        sh(&[
            "ip", "link", "add", "ens192", "netns", node, "type", "veth", "peer", "name", side,
            "netns", router,
        ]);
        sh(&["ip", "-n", node, "link", "set", "ens192", "up"]);
        sh(&["ip", "-n", router, "addr", "add", gw, "dev", side]);
        sh(&["ip", "-n", router, "link", "set", side, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// A main CNI plugin run inside a node's namespace, as the node's runtime runs it.
pub struct Runtime<'a> {
    /// The node's namespace.
    pub node: &'a str,
    /// The plugin binary.
    pub main: &'a str,
    /// `CNI_PATH`.
    pub cni_path: &'a Path,
}

/// Runs `rt.main` for `cmd` on the pod namespace `pod_ns`.
pub fn plugin_in(
    rt: &Runtime<'_>,
    cmd: &str,
    pod_ns: &str,
    container: &str,
    args: &str,
    conf: &Value,
) -> Call {
    plugin_in_if(rt, cmd, pod_ns, container, "eth0", args, conf)
}

/// Runs `rt.main` for `cmd` on interface `ifname` of the pod namespace `pod_ns`.
pub fn plugin_in_if(
    rt: &Runtime<'_>,
    cmd: &str,
    pod_ns: &str,
    container: &str,
    ifname: &str,
    args: &str,
    conf: &Value,
) -> Call {
    let netns = format!("/var/run/netns/{pod_ns}");
    let cni_path = rt.cni_path.to_string_lossy().into_owned();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", rt.node, rt.main])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", &netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", &cni_path)
        .env("CNI_ARGS", args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("plugin runs");
    {
        use std::io::Write;
        let mut i = child.stdin.take().expect("stdin");
        i.write_all(conf.to_string().as_bytes())
            .expect("write conf");
    }
    let out = child.wait_with_output().expect("plugin ends");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Call {
        status: out.status.code().unwrap_or(-1),
        json: serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        stdout: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// A CNI_PATH directory with our plugins in it: `spiderpool` (IPAM), and `coordinator` under
/// its own name and the seed's, `veth`.
pub fn cni_path(dir: &Path) -> PathBuf {
    let p = dir.join("cni-bin");
    std::fs::create_dir_all(&p).expect("mkdir");
    std::os::unix::fs::symlink(plugin(), p.join("spiderpool")).expect("symlink");
    let coordinator = workspace_bin("coordinator", "spiderpool-cni");
    for name in ["coordinator", "veth"] {
        std::os::unix::fs::symlink(&coordinator, p.join(name)).expect("symlink");
    }
    p
}

pub fn pod_args(name: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_UID=uid-{name}")
}

pub fn ping(from_ns: &str, to: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", from_ns, "ping", "-c", "1", "-W", "2", to])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn agent_for(dir: &Path, node: &str, store: &str) -> Agent {
    agent_with(dir, node, store, &[])
}

/// An agent on the seed's manifests and `extra` ones.
pub fn agent_with(dir: &Path, node: &str, store: &str, extra: &[PathBuf]) -> Agent {
    let mut args: Vec<String> = [
        "--node-name",
        node,
        "--store",
        store,
        "--manifests",
        &testdata("seed-pools.yaml").to_string_lossy(),
        "--manifests",
        &testdata("seed-cluster.yaml").to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for e in extra {
        args.push("--manifests".into());
        args.push(e.to_string_lossy().into_owned());
    }
    Agent::start(
        &dir.join(format!("{node}.sock")),
        &dir.join(format!("{node}.log")),
        &args,
    )
}

pub fn pool_counts(socket: &str) -> Vec<(String, u64)> {
    let out = spiderctl(&["get", "ippools", "--socket", socket, "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    v.as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default().to_string(),
                r["allocatedIPCount"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// A veth from `node` (`nic`) into the router's bridge `br`.
pub fn wire(router: &str, br: &str, node: &str, nic: &str, side: &str) {
    sh(&[
        "ip", "link", "add", nic, "netns", node, "type", "veth", "peer", "name", side, "netns",
        router,
    ]);
    sh(&["ip", "-n", node, "link", "set", nic, "up"]);
    sh(&["ip", "-n", router, "link", "set", side, "master", br]);
    sh(&["ip", "-n", router, "link", "set", side, "up"]);
}

/// A router namespace's bridge `br` with the gateway address `gw` (CIDR) on it.
pub fn bridge(router: &str, br: &str, gw: &str) {
    sh(&["ip", "-n", router, "link", "add", br, "type", "bridge"]);
    sh(&["ip", "-n", router, "addr", "add", gw, "dev", br]);
    sh(&["ip", "-n", router, "link", "set", br, "up"]);
}

/// Zone 6 of the seed: a `router` namespace whose bridge `br6` holds the gateway 10.6.0.1/16, and
/// a node `node6` whose uplink `ens192` is on that bridge, with 10.6.0.2/16 and a default route
/// through the gateway. Answers (router, node).
pub fn zone6(ns: &mut Netns) -> (String, String) {
    let router = ns.add("router");
    let node = ns.add("node6");
    bridge(&router, "br6", "10.6.0.1/16");
    wire(&router, "br6", &node, "ens192", "r6a");
    sh(&[
        "ip",
        "-n",
        &node,
        "addr",
        "add",
        "10.6.0.2/16",
        "dev",
        "ens192",
    ]);
    sh(&[
        "ip", "-n", &node, "route", "add", "default", "via", "10.6.0.1",
    ]);
    (router, node)
}

/// Plugin `i` of the conflist `list` as libcni passes it: the list's `name` and `cniVersion`,
/// and `prevResult` when given.
pub fn plugin_conf(list: &Value, i: usize, prev: Option<&Value>) -> Value {
    let mut c = list["plugins"][i].clone();
    c["name"] = list["name"].clone();
    c["cniVersion"] = list["cniVersion"].clone();
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

/// The binary of plugin type `ty`: ours in `cni_path`, else Debian's in /usr/lib/cni.
pub fn plugin_binary(cni_path: &Path, ty: &str) -> PathBuf {
    let ours = cni_path.join(ty);
    if ours.exists() {
        ours
    } else {
        Path::new("/usr/lib/cni").join(ty)
    }
}

/// Writes `yaml` (manifests) to `dir/name` for an agent's `--manifests`.
pub fn write_manifest(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, yaml).expect("write manifest");
    p
}

/// libcni's way with a conflist: ADD and CHECK in order, DEL in reverse; each plugin gets the
/// list's `name` and `cniVersion`, and `prevResult` (the previous plugin's result for ADD, the
/// chain's result for CHECK and DEL at 0.4.0 and later).
pub struct Chain<'a> {
    /// The node's namespace (where the plugins run).
    pub node: &'a str,
    /// `CNI_PATH`: our plugins; Debian's come from /usr/lib/cni.
    pub cni_path: &'a Path,
    /// The conflist.
    pub list: Value,
}

impl Chain<'_> {
    /// The configuration of plugin `i` as libcni passes it.
    pub fn plugin_conf(&self, i: usize, prev: Option<&Value>) -> Value {
        plugin_conf(&self.list, i, prev)
    }

    /// Runs plugin `i` for `cmd` on `pod`.
    pub fn call(&self, i: usize, cmd: &str, pod: &Pod<'_>, prev: Option<&Value>) -> Call {
        let conf = self.plugin_conf(i, prev);
        let bin = plugin_binary(self.cni_path, conf["type"].as_str().unwrap_or_default())
            .to_string_lossy()
            .into_owned();
        let rt = Runtime {
            node: self.node,
            main: &bin,
            cni_path: self.cni_path,
        };
        plugin_in_if(
            &rt,
            cmd,
            &pod.ns,
            &pod.container,
            pod.ifname,
            &pod.args,
            &conf,
        )
    }

    /// See the type.
    pub fn len(&self) -> usize {
        self.list["plugins"].as_array().map_or(0, Vec::len)
    }

    /// See the type.
    pub fn add(&self, pod: &Pod<'_>) -> Value {
        let mut prev: Option<Value> = None;
        for i in 0..self.len() {
            let out = self.call(i, "ADD", pod, prev.as_ref());
            assert_eq!(
                out.status, 0,
                "ADD of plugin {i} for {} ({}): {}",
                pod.container, pod.ifname, out.stdout
            );
            prev = Some(out.json);
        }
        prev.expect("a result")
    }

    /// See the type.
    pub fn legacy(&self) -> bool {
        self.list["cniVersion"] == "0.3.1"
    }

    /// See the type.
    pub fn check(&self, pod: &Pod<'_>, result: &Value) -> Vec<Call> {
        (0..self.len())
            .map(|i| self.call(i, "CHECK", pod, Some(result)))
            .collect()
    }

    /// See the type.
    pub fn del(&self, pod: &Pod<'_>, result: &Value) {
        for i in (0..self.len()).rev() {
            let prev = (!self.legacy()).then_some(result);
            let out = self.call(i, "DEL", pod, prev);
            assert_eq!(
                out.status, 0,
                "DEL of plugin {i} for {}: {}",
                pod.container, out.stdout
            );
        }
    }
}

/// One attachment: a pod's namespace, its sandbox ID and interface.
pub struct Pod<'a> {
    /// The pod's namespace name.
    pub ns: String,
    /// `CNI_CONTAINERID`.
    pub container: String,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
    /// `CNI_ARGS`.
    pub args: String,
}
