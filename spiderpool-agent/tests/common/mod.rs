//! Fixtures for tests with real processes: the `spiderpool-agent` daemon, the `spiderpool` CNI
//! plugin binary called as a runtime calls it, and `spiderctl`. Everything is torn down on drop.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[cfg(feature = "kube")]
pub mod kube;
pub mod lab;

/// A binary of this workspace (see [`spiderpool_store::testing::workspace_bin`]).
pub fn workspace_bin(name: &str, package: &str) -> PathBuf {
    spiderpool_store::testing::workspace_bin(package, name)
}

/// The CNI plugin binary.
pub fn plugin() -> PathBuf {
    workspace_bin("spiderpool", "spiderpool-cni")
}

/// The path of a file in `testdata/`.
pub fn testdata(name: &str) -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "..", "testdata", name]
        .iter()
        .collect()
}

/// This workspace's agent binary.
fn this_agent() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spiderpool-agent"))
}

/// A running agent process; killed (SIGKILL) on drop unless stopped.
pub struct Agent {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
    /// Extra environment of the agent process.
    pub env: Vec<(String, String)>,
    /// The agent binary (this workspace's unless a bench compares another build).
    pub bin: PathBuf,
}

impl Agent {
    /// Starts `spiderpool-agent` with `args` (plus `--socket`, `--node-name` given by the caller
    /// in `args`), logging to `log`, and waits until it answers `/healthz`.
    pub fn start(socket: &Path, log: &Path, args: &[String]) -> Agent {
        Self::start_bin_with_env(&this_agent(), socket, log, args, &[])
    }

    /// Like [`Agent::start`], with extra environment variables for the process.
    pub fn start_with_env(
        socket: &Path,
        log: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Agent {
        Self::start_bin_with_env(&this_agent(), socket, log, args, env)
    }

    /// Like [`Agent::start`], running the agent binary at `bin` (a benchmark's baseline build).
    pub fn start_bin(bin: &Path, socket: &Path, log: &Path, args: &[String]) -> Agent {
        Self::start_bin_with_env(bin, socket, log, args, &[])
    }

    fn start_bin_with_env(
        bin: &Path,
        socket: &Path,
        log: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut a = Agent {
            child: None,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            args: args.to_vec(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            bin: bin.to_path_buf(),
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let child = Command::new(&self.bin)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("--socket")
            .arg(&self.socket)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("agent starts");
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20));
    }

    /// Waits until the agent answers on its socket.
    pub fn wait_ready(&mut self, limit: Duration) {
        let t0 = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("agent exited with {status}:\n{}", self.log_text());
                }
            }
            let ok = spiderpool_cni::client::exchange::<()>(
                &self.socket.to_string_lossy(),
                "GET",
                "/healthz",
                None,
                Duration::from_secs(2),
            )
            .is_ok_and(|(s, _)| s == 200);
            if ok {
                return;
            }
            assert!(
                t0.elapsed() < limit,
                "agent not ready after {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same agent again after it died (waits until it answers).
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// Starts the same agent again.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let c = self.child.take().expect("running");
        let pid = c.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let out = c.wait_with_output().expect("wait");
        out.status
    }

    /// The socket path as a string.
    pub fn sock(&self) -> String {
        self.socket.to_string_lossy().into_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A CNI network configuration for the plugin.
pub fn netconf(version: &str, name: &str, socket: &str, extra_ipam: Value) -> Value {
    let mut ipam = serde_json::json!({"type": "spiderpool", "ipam_unix_socket_path": socket});
    if let (Some(m), Value::Object(extra)) = (ipam.as_object_mut(), extra_ipam) {
        m.extend(extra);
    }
    serde_json::json!({"cniVersion": version, "name": name, "type": "macvlan", "ipam": ipam})
}

/// What one plugin call returned.
#[derive(Debug)]
pub struct Call {
    pub status: i32,
    pub stdout: String,
    pub json: Value,
}

impl Call {
    /// The CNI error code (0 on success).
    pub fn code(&self) -> u64 {
        if self.status == 0 {
            0
        } else {
            self.json["code"].as_u64().unwrap_or(u64::MAX)
        }
    }
    /// The first address of a result.
    pub fn ip(&self) -> String {
        self.json["ips"][0]["address"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Runs the plugin with `env` (CNI_* vars) and `stdin`, as a runtime does.
pub fn cni(env: &[(&str, &str)], stdin: &[u8]) -> Call {
    cni_with(&plugin(), env, stdin)
}

/// Runs the plugin binary `bin` with `env` (CNI_* vars) and `stdin`, as a runtime does.
pub fn cni_with(bin: &Path, env: &[(&str, &str)], stdin: &[u8]) -> Call {
    let mut cmd = Command::new(bin);
    cmd.env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("plugin runs");
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin);
    }
    let out: Output = child.wait_with_output().expect("plugin ends");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Call {
        status: out.status.code().unwrap_or(-1),
        json: serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        stdout,
    }
}

/// ADD/DEL/CHECK environment for a container of a pod.
pub fn env_for<'a>(
    cmd: &'a str,
    container: &'a str,
    ifname: &'a str,
    args: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", container),
        ("CNI_IFNAME", ifname),
        ("CNI_NETNS", "/var/run/netns/test"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", args),
    ]
}

/// `spiderctl ARGS`.
pub fn spiderctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spiderctl"))
        .args(args)
        .output()
        .expect("spiderctl runs")
}

/// Every allocation the agent reports: (pod, interface, address, pool, network).
pub fn endpoints(socket: &str) -> Vec<(String, String, String, String, String)> {
    let out = spiderctl(&["get", "endpoints", "--socket", socket, "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let mut rows: Vec<_> = v
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (
                format!("{}#{}", s("pod"), s("containerId")),
                s("interface"),
                s("address"),
                s("pool"),
                s("network"),
            )
        })
        .collect();
    rows.sort();
    rows
}
