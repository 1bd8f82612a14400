//! Test fixtures with real components (feature `testing`).
//!
//! [`EtcdServer`] runs a real `etcd` (Debian `etcd-server`) on free loopback ports with a temporary
//! data directory, and kills it when dropped. [`require`] decides what a test does when a component
//! is missing: outside CI it skips with a loud message; in CI (`CI` set) it fails, since CI installs
//! everything.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether we run in CI (where every component must be present).
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// Finds `name` on PATH or in the usual Debian places.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Returns `Some(value)` when the component is there. When it is not: in CI, panics (the test
/// fails); elsewhere prints a loud SKIP line and returns `None` (the caller returns early).
pub fn require<T>(what: &str, found: Option<T>, install_hint: &str) -> Option<T> {
    match found {
        Some(v) => Some(v),
        None if in_ci() => panic!("{what} is required in CI but missing ({install_hint})"),
        None => {
            // Written to the stderr handle directly, not through eprintln!, so the test harness
            // does not capture it: a skip must be seen even when the test "passes".
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!! SKIPPED: {what} is missing ({install_hint}); this test did NOT run !!!!!\n"
            );
            None
        }
    }
}

/// The etcd binary, or a skip/fail per [`require`].
pub fn require_etcd() -> Option<PathBuf> {
    require(
        "etcd",
        find_binary("etcd"),
        "apt-get install etcd-server, or run ./scripts/test-all.sh as root",
    )
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A real etcd server on loopback, killed on drop.
pub struct EtcdServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd from `binary` on free ports with a fresh data directory and waits until it is
    /// healthy.
    pub fn start(binary: &Path) -> Result<Self, String> {
        let mut last = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
            let (client_port, peer_port) = (
                free_port().map_err(|e| e.to_string())?,
                free_port().map_err(|e| e.to_string())?,
            );
            let mut s = EtcdServer {
                binary: binary.to_path_buf(),
                dir,
                client_port,
                peer_port,
                child: None,
            };
            match s.spawn() {
                Ok(()) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(format!("etcd did not start: {last}"))
    }

    fn spawn(&mut self) -> Result<(), String> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .map_err(|e| format!("etcd log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.binary)
            .args([
                "--name",
                "t",
                "--data-dir",
                &self.dir.path().join("data").to_string_lossy(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("t={peer}"),
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(20))
    }

    fn wait_healthy(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("etcd exited with {status}: {}", self.log_tail()));
                }
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "etcd not healthy after {limit:?}: {}",
            self.log_tail()
        ))
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// Last lines of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// The client URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL) and waits for it to exit. The data directory is kept.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A unique key prefix per test, so tests can share one etcd.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("/test/{test}-{}-{nanos}/", std::process::id())
}

/// Whether this process runs as root (read from `/proc/self/status`, no libc call).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A small tmpfs mounted on a fresh temporary directory (needs root), unmounted when dropped: a
/// disk that really fills up.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `bytes` bytes. `None` (with a loud skip outside CI, a failure in CI)
    /// when not root or the mount fails.
    pub fn mount(bytes: u64) -> Option<SmallDisk> {
        let root = require(
            "root (to mount a small tmpfs)",
            is_root().then_some(()),
            "run the test as root, e.g. ./scripts/test-all.sh in CI",
        );
        root?;
        let dir = tempfile::tempdir().ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir.path())
            .status();
        let mounted = status.is_ok_and(|s| s.success()).then_some(());
        require("a tmpfs mount", mounted, "mount -t tmpfs must work as root")?;
        Some(SmallDisk { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
