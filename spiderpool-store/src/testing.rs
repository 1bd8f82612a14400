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

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
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

/// The directory with the envtest `kube-apiserver`: `KUBEBUILDER_ASSETS` (envtest's convention,
/// which `.ci/run` sets), else `../shared/envtest` beside the workspace (developer machines).
pub fn envtest_dir() -> Option<PathBuf> {
    let from_env = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from);
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/envtest");
    from_env
        .into_iter()
        .chain([beside])
        .find(|d| d.join("kube-apiserver").is_file())
}

/// A user of the API server besides the admin: a static token, a name and groups (comma
/// separated, may be empty). Bind it with RBAC to test least privilege.
#[derive(Debug, Clone)]
pub struct KubeUser {
    /// Bearer token.
    pub token: String,
    /// User name.
    pub name: String,
    /// Groups.
    pub groups: String,
}

/// A real kube-apiserver (envtest's, v1.24) with its own etcd on free loopback ports, as
/// `../shared/envtest/start.sh` starts them, stopped when dropped. `None` from [`KubeServer::start`]
/// means skip (outside CI, loudly); in CI a missing server fails the test.
pub struct KubeServer {
    dir: tempfile::TempDir,
    apiserver_bin: PathBuf,
    etcd: EtcdServer,
    apiserver: Option<Child>,
    port: u16,
    /// The admin's bearer token (group `system:masters`).
    pub token: String,
}

fn openssl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let a = h.finish();
    h.write_u64(a);
    format!("{a:016x}{:016x}", h.finish())
}

impl KubeServer {
    /// Starts etcd and the API server (admin only).
    pub fn start() -> Option<KubeServer> {
        Self::start_with_users(&[])
    }

    /// Starts etcd and the API server with extra static-token users.
    pub fn start_with_users(users: &[KubeUser]) -> Option<KubeServer> {
        let dir = require(
            "the envtest kube-apiserver",
            envtest_dir(),
            "set KUBEBUILDER_ASSETS to a directory holding kube-apiserver (../shared/envtest here; elsewhere: go install sigs.k8s.io/controller-runtime/tools/setup-envtest@release-0.19 && export KUBEBUILDER_ASSETS=\"$(setup-envtest use -p path 1.24.x)\")",
        )?;
        let etcd_bin = require_etcd()?;
        let openssl_ok = require("openssl", find_binary("openssl"), "apt-get install openssl");
        openssl_ok?;
        match Self::try_start(&dir.join("kube-apiserver"), &etcd_bin, users) {
            Ok(s) => Some(s),
            Err(e) => panic!("the API server did not start: {e}"),
        }
    }

    fn try_start(apiserver: &Path, etcd: &Path, users: &[KubeUser]) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki).map_err(|e| e.to_string())?;
        let p = |f: &str| pki.join(f).to_string_lossy().into_owned();
        // A CA and a serving certificate it signs (rustls refuses a self-signed CA as the
        // server's own certificate, which start.sh makes; curl and kubectl accept both).
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "3650",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
            "-subj",
            "/CN=envtest-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,digitalSignature,keyCertSign",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p("serving.key"),
            "-out",
            &p("serving.csr"),
            "-subj",
            "/CN=kube-apiserver",
        ])?;
        std::fs::write(
            pki.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n",
        )
        .map_err(|e| e.to_string())?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p("serving.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            &p("serving.crt"),
            "-extfile",
            &p("ext.cnf"),
        ])?;
        openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &p("sa.key"),
        ])?;
        openssl(&["ec", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")])?;
        let token = random_token();
        let mut tokens = format!("{token},admin,admin-uid,system:masters\n");
        for u in users {
            tokens.push_str(&format!("{},{},{}-uid", u.token, u.name, u.name));
            if !u.groups.is_empty() {
                tokens.push_str(&format!(",\"{}\"", u.groups));
            }
            tokens.push('\n');
        }
        std::fs::write(pki.join("tokens.csv"), tokens).map_err(|e| e.to_string())?;
        let etcd = EtcdServer::start(etcd)?;
        let port = free_port().map_err(|e| e.to_string())?;
        let mut s = KubeServer {
            dir,
            apiserver_bin: apiserver.to_path_buf(),
            etcd,
            apiserver: None,
            port,
            token,
        };
        s.spawn_apiserver()?;
        s.write_kubeconfig("kubeconfig", &s.token.clone())?;
        Ok(s)
    }

    fn spawn_apiserver(&mut self) -> Result<(), String> {
        let pki = self.dir.path().join("pki");
        let p = |f: &str| pki.join(f).to_string_lossy().into_owned();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("apiserver.log"))
            .map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.apiserver_bin)
            .args([
                "--etcd-servers",
                &self.etcd.url(),
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--secure-port",
                &self.port.to_string(),
                "--cert-dir",
                &pki.to_string_lossy(),
                "--tls-cert-file",
                &p("serving.crt"),
                "--tls-private-key-file",
                &p("serving.key"),
                "--token-auth-file",
                &p("tokens.csv"),
                "--authorization-mode",
                "RBAC",
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file",
                &p("sa.pub"),
                "--service-account-signing-key-file",
                &p("sa.key"),
                "--service-cluster-ip-range",
                "10.0.0.0/24",
                "--profiling=false",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.apiserver_bin.display()))?;
        self.apiserver = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(90) {
            if let Some(Ok(Some(st))) = self.apiserver.as_mut().map(|c| c.try_wait()) {
                return Err(format!(
                    "kube-apiserver exited with {st}: {}",
                    self.log_tail()
                ));
            }
            let ready = Command::new("curl")
                .args(["-s", "--max-time", "2", "--cacert", &p("ca.crt"), "-H"])
                .arg(format!("Authorization: Bearer {}", self.token))
                .arg(format!("{}/readyz", self.url()))
                .output()
                .is_ok_and(|o| o.stdout == b"ok");
            if ready {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "kube-apiserver not ready after 90 s: {}",
            self.log_tail()
        ))
    }

    /// Writes a kubeconfig for `token` into the server's directory; returns its path.
    pub fn write_kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf, String> {
        let ca = std::fs::read(self.dir.path().join("pki/ca.crt")).map_err(|e| e.to_string())?;
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: envtest\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: envtest\n  context: {{cluster: envtest, user: u}}\ncurrent-context: envtest\n",
            self.url(),
            crate::base64(&ca)
        );
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        Ok(path)
    }

    /// The API server's CA certificate (its self-signed serving certificate).
    pub fn cacert(&self) -> PathBuf {
        self.dir.path().join("pki/ca.crt")
    }

    /// A GET as the admin with `accept`, through curl; the body.
    pub fn get_raw(&self, path: &str, accept: &str) -> String {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10", "--cacert"])
            .arg(self.cacert())
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.token))
            .arg("-H")
            .arg(format!("Accept: {accept}"))
            .arg(format!("{}{path}", self.url()))
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Applies the CRDs in `yaml` and waits until the API server serves them.
    pub fn install_crds(&self, yaml: &str) -> Result<(), String> {
        let (ok, _, err) = self.kubectl(&["apply", "-f", "-"], yaml);
        if !ok {
            return Err(format!("kubectl apply of the CRDs: {err}"));
        }
        let (ok, _, err) = self.kubectl(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd",
                "--all",
            ],
            "",
        );
        if ok {
            Ok(())
        } else {
            Err(format!("CRDs not established: {err}"))
        }
    }

    /// The admin's kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Runs `kubectl` as the admin with `stdin`; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str], stdin: &str) -> (bool, String, String) {
        self.kubectl_as(&self.kubeconfig(), args, stdin)
    }

    /// Runs `kubectl` with another kubeconfig (another user, see [`KubeServer::write_kubeconfig`]).
    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: &str,
    ) -> (bool, String, String) {
        let child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            return (false, String::new(), "kubectl not found".into());
        };
        if let Some(mut i) = child.stdin.take() {
            let _ = i.write_all(stdin.as_bytes());
        }
        match child.wait_with_output() {
            Ok(o) => (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ),
            Err(e) => (false, String::new(), e.to_string()),
        }
    }

    /// Last lines of the API server's log.
    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Stops the API server (SIGKILL), keeping etcd; [`KubeServer::start_apiserver`] brings it
    /// back on the same port.
    pub fn kill_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the API server again (after [`KubeServer::kill_apiserver`]).
    pub fn start_apiserver(&mut self) -> Result<(), String> {
        self.kill_apiserver();
        self.spawn_apiserver()
    }

    /// Process ids of the API server and etcd (to read their CPU time from `/proc`).
    pub fn pids(&self) -> Vec<u32> {
        self.apiserver
            .iter()
            .map(|c| c.id())
            .chain(self.etcd.pid())
            .collect()
    }
}

impl Drop for KubeServer {
    fn drop(&mut self) {
        self.kill_apiserver();
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat; here 0-based after the state field (3rd).
    (ticks(11) + ticks(12)) / 100.0
}

/// A binary of this workspace next to the running test (`target/<profile>/NAME`), for tests
/// that run programs of other packages (an agent test with a controller beside it: cargo only
/// provides `CARGO_BIN_EXE_*` for a package's own binaries). `cargo test --workspace` builds
/// every package's binaries first; when it is missing (only one package's tests were asked
/// for) it is built here (`cargo build -p PACKAGE --bin NAME`). Panics with cargo's output when
/// that build fails: a test that needs the program cannot pass without it.
#[allow(clippy::expect_used)] // a fixture: failing loudly is the point
pub fn workspace_bin(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a test binary under target/<profile>/deps")
        .to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let bin = profile_dir.join(name);
    if bin.exists() {
        return bin;
    }
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-q", "-p", package, "--bin", name])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("running cargo build");
    assert!(
        out.status.success(),
        "cargo build -p {package} --bin {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}
