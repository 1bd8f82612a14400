//! One plugin invocation: environment and stdin in, stdout and exit status out.
//!
//! DEL and an unreachable agent: when the agent's socket file does not exist at all (no agent on
//! this node: uninstalled, or never started), DEL succeeds with a log line, because a runtime would
//! otherwise retry the sandbox teardown forever; whatever the node held is freed by GC (CNI GC, or
//! the agent's own GC) once an agent runs again. When the socket exists but the agent does not
//! answer (restarting, overloaded), DEL fails with code 11 and the runtime retries, so the address
//! is freed by the DEL itself as soon as the agent is back.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use serde_json::{json, Value};
use spiderpool_core::api::{AddRequest, CheckRequest, DelRequest, DelResponse, GcRequest, Status};
use spiderpool_core::engine::Allocation;

use crate::client::{self, ClientError};
use crate::conf::{self, Command, Env, LogLevel, NetConf};
use crate::error::{
    CniError, AGENT_ERROR, INCOMPATIBLE_VERSION, INVALID_CONFIG, NOT_AVAILABLE, NOT_RECORDED,
};
use crate::result::add_result;
use crate::SUPPORTED_VERSIONS;

/// What the runtime sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Printed on stdout (a result, an error JSON, or nothing).
    pub stdout: String,
    /// Exit status: 0, or the CNI error code (at most 255).
    pub status: i32,
}

impl Answer {
    /// Success with `stdout`.
    pub fn ok(stdout: String) -> Self {
        Answer { stdout, status: 0 }
    }
    /// The error `e`.
    pub fn err(e: CniError) -> Self {
        Answer {
            stdout: e.to_json(),
            status: i32::try_from(e.code.clamp(1, 255)).unwrap_or(1),
        }
    }
}

/// How long the plugin waits for the agent.
const ADD_TIMEOUT: Duration = Duration::from_secs(60);
const OTHER_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one invocation.
pub fn run(vars: &BTreeMap<String, String>, stdin: &[u8]) -> Answer {
    let version = peek_version(stdin);
    let env = match conf::parse_env(vars) {
        Ok(e) => e,
        Err(e) => return Answer::err(e.version(&version)),
    };
    if env.command == Command::Version {
        return Answer::ok(
            json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        );
    }
    let netconf = match conf::parse_netconf(stdin) {
        Ok(c) => c,
        Err(e) => return Answer::err(e),
    };
    let log = Log::new(&netconf, &env);
    let answer = dispatch(&env, &netconf, stdin, &log);
    match &answer {
        Ok(_) => log.write(LogLevel::Info, "ok"),
        Err(e) => log.write(
            LogLevel::Error,
            &format!("code {}: {} {}", e.code, e.msg, e.details),
        ),
    }
    match answer {
        Ok(out) => Answer::ok(out),
        Err(e) => Answer::err(e.version(&netconf.cni_version)),
    }
}

/// The configuration's `cniVersion` when it is one we speak, for error answers and VERSION.
pub fn peek_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_string())
}

fn need_version(c: &NetConf, cmd: Command, min: &str) -> Result<(), CniError> {
    if conf::version_at_least(&c.cni_version, min) {
        Ok(())
    } else {
        Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!(
                "{} needs cniVersion {min} or later; the configuration says {}",
                cmd.as_str(),
                c.cni_version
            ),
        ))
    }
}

fn dispatch(env: &Env, c: &NetConf, stdin: &[u8], log: &Log) -> Result<String, CniError> {
    let agent_err = |e: ClientError| CniError::from(e.into_api());
    let network = c.defaults.network_name.clone().unwrap_or_default();
    match env.command {
        Command::Version => Ok(String::new()),
        Command::Add => {
            let att = env.attachment.clone().unwrap_or_default();
            let req = AddRequest {
                attachment: att.clone(),
                netns: env.netns.clone(),
                pod: env.pod.clone(),
                cni: c.defaults.clone(),
            };
            let mut alloc: Allocation =
                client::call(&c.socket, "POST", "/v1/add", Some(&req), ADD_TIMEOUT)
                    .map_err(agent_err)?;
            let d = alloc.detect.or(c.detect);
            if !d.is_off() {
                alloc = crate::detect::settle(c, &req, alloc, d, log, ADD_TIMEOUT)?;
            }
            let result = add_result(&alloc, &att.ifname, &c.cni_version).ok_or_else(|| {
                CniError::new(
                    AGENT_ERROR,
                    format!("the agent allocated nothing for {}", att.ifname),
                )
            })?;
            log.write(LogLevel::Debug, &format!("result {result}"));
            Ok(result.to_string())
        }
        Command::Del => {
            let req = DelRequest {
                attachment: env.attachment.clone().unwrap_or_default(),
                network,
            };
            let out: Result<DelResponse, _> =
                client::call(&c.socket, "POST", "/v1/del", Some(&req), OTHER_TIMEOUT);
            match out {
                Ok(r) => {
                    log.write(LogLevel::Info, &format!("released {:?}", r.released));
                    Ok(String::new())
                }
                Err(e @ ClientError::NoSocket { .. }) => {
                    log.write(
                        LogLevel::Warn,
                        &format!("DEL succeeds without an agent ({e}); GC frees what is left"),
                    );
                    Ok(String::new())
                }
                Err(e) => Err(agent_err(e)),
            }
        }
        Command::Check => {
            need_version(c, Command::Check, "0.4.0")?;
            let att = env.attachment.clone().unwrap_or_default();
            let req = CheckRequest {
                attachment: att.clone(),
            };
            let alloc: Allocation =
                client::call(&c.socket, "POST", "/v1/check", Some(&req), OTHER_TIMEOUT)
                    .map_err(agent_err)?;
            let recorded = add_result(&alloc, &att.ifname, &c.cni_version).ok_or_else(|| {
                CniError::new(
                    NOT_RECORDED,
                    format!(
                        "no IP is allocated to container {} interface {}",
                        att.container_id, att.ifname
                    ),
                )
            })?;
            check_prev_result(stdin, &recorded).map(|()| String::new())
        }
        Command::Gc => {
            need_version(c, Command::Gc, "1.1.0")?;
            let valid = c.valid_attachments.clone().ok_or_else(|| {
                CniError::new(
                    INVALID_CONFIG,
                    "GC needs cni.dev/valid-attachments in the configuration",
                )
            })?;
            let req = GcRequest { network, valid };
            let r: DelResponse =
                client::call(&c.socket, "POST", "/v1/gc", Some(&req), OTHER_TIMEOUT)
                    .map_err(agent_err)?;
            log.write(LogLevel::Info, &format!("GC released {:?}", r.released));
            Ok(String::new())
        }
        Command::Status => {
            need_version(c, Command::Status, "1.1.0")?;
            let s: Result<Status, _> =
                client::call::<(), _>(&c.socket, "GET", "/v1/status", None, OTHER_TIMEOUT);
            match s {
                Ok(_) => Ok(String::new()),
                Err(e) => {
                    let e = e.into_api();
                    Err(CniError::new(
                        NOT_AVAILABLE,
                        format!("spiderpool cannot serve ADD now: {}", e.message),
                    )
                    .details(e.details))
                }
            }
        }
    }
}

/// CHECK: every address recorded for the interface must be in `prevResult` when the runtime
/// passed one.
fn check_prev_result(stdin: &[u8], recorded: &Value) -> Result<(), CniError> {
    let Some(prev) = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("prevResult").cloned())
    else {
        return Ok(());
    };
    let listed: Vec<&str> = prev
        .get("ips")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|ip| ip.get("address")?.as_str())
                .collect()
        })
        .unwrap_or_default();
    let wanted: Vec<&str> = recorded["ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|ip| ip.get("address")?.as_str())
                .collect()
        })
        .unwrap_or_default();
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|w| !listed.contains(w))
        .copied()
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            NOT_RECORDED,
            format!(
                "prevResult lacks the recorded address(es) {}; it lists {:?}",
                missing.join(", "),
                listed
            ),
        ))
    }
}

/// Appends one line per event to `log_file_path` (never stdout, which belongs to the result).
/// The plugin's own log file (`ipam.log_file_path`).
pub struct Log {
    file: Option<String>,
    level: LogLevel,
    prefix: String,
}

impl Log {
    fn new(c: &NetConf, env: &Env) -> Self {
        let att = env
            .attachment
            .as_ref()
            .map(|a| format!(" container={} ifname={}", a.container_id, a.ifname))
            .unwrap_or_default();
        let pod = env
            .pod
            .as_ref()
            .map(|p| format!(" pod={}/{}", p.namespace, p.name))
            .unwrap_or_default();
        Log {
            file: c.log_file.clone(),
            level: c.log_level,
            prefix: format!("{}{att}{pod}", env.command.as_str()),
        }
    }

    /// Writes one line at `level`.
    pub fn write(&self, level: LogLevel, msg: &str) {
        let Some(path) = &self.file else { return };
        if level < self.level {
            return;
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if let Ok(mut f) = open_log(std::path::Path::new(path)) {
            let _ = writeln!(
                f,
                "{secs} {level:?} pid={} {}",
                std::process::id(),
                escape(&format!("{} {msg}", self.prefix))
            );
        }
    }
}

/// Opens the log for appending: created with mode 0600, never through a symbolic link (the
/// path is checked by `conf::log_path`; `O_NOFOLLOW` closes the last step of a link race).
fn open_log(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// One log line stays one line: control characters (a newline in a pool name from a pod
/// annotation) are written escaped.
fn escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_one_line_per_event_and_never_follows_a_link() {
        assert_eq!(
            escape("pool a\nfake line\u{1b}[31m"),
            "pool a\\nfake line\\u{1b}[31m"
        );
        let dir = tempfile::tempdir().expect("dir");
        let real = dir.path().join("real");
        std::fs::write(&real, "").expect("file");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("link");
        assert!(open_log(&link).is_err(), "a symbolic link is refused");
        let fresh = dir.path().join("cni.log");
        open_log(&fresh).expect("created");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&fresh)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn the_log_path_stays_in_the_log_directories() {
        assert!(crate::conf::log_path("/var/log/spidernet/spiderpool.log").is_ok());
        assert!(crate::conf::log_path("/var/log/spiderpool/cni.log").is_ok());
        for bad in [
            "/etc/shadow",
            "/var/log/spidernet/../../../etc/passwd",
            "var/log/spidernet/x.log",
            "/var/log/spidernet",
            "/var/log/spidernet/./x",
        ] {
            let e = crate::conf::log_path(bad).expect_err(bad);
            assert!(e.contains("ipam.log_file_path") && e.contains(bad), "{e}");
        }
    }

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn version_answers_without_an_agent() {
        let a = run(
            &vars(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"0.4.0"}"#,
        );
        assert_eq!(a.status, 0);
        let v: Value = serde_json::from_str(&a.stdout).expect("json");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"].as_array().map(Vec::len), Some(5));
    }

    #[test]
    fn errors_are_cni_json_with_the_code_as_status() {
        let a = run(&vars(&[]), b"{}");
        assert_eq!(a.status, 4);
        let v: Value = serde_json::from_str(&a.stdout).expect("json");
        assert_eq!(v["code"], 4);
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ];
        assert_eq!(run(&vars(&add), b"nope").status, 6);
        assert_eq!(run(&vars(&add), br#"{"cniVersion":"0.2.0"}"#).status, 1);
        // No agent socket: ADD is retryable (11), DEL succeeds, STATUS is 50.
        let conf = br#"{"cniVersion":"1.1.0","name":"n","ipam":{"type":"spiderpool","ipam_unix_socket_path":"/nonexistent/s.sock"}}"#;
        let a = run(&vars(&add), conf);
        assert_eq!(a.status, 11, "{}", a.stdout);
        assert!(
            a.stdout.contains("/nonexistent/s.sock does not exist"),
            "{}",
            a.stdout
        );
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert_eq!(run(&vars(&del), conf), Answer::ok(String::new()));
        assert_eq!(run(&vars(&[("CNI_COMMAND", "STATUS")]), conf).status, 50);
        // CHECK below 0.4.0 and GC below 1.1.0 are version errors.
        let old = br#"{"cniVersion":"0.3.1","name":"n","ipam":{"type":"spiderpool"}}"#;
        let check = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ];
        assert_eq!(run(&vars(&check), old).status, 1);
        assert_eq!(run(&vars(&[("CNI_COMMAND", "GC")]), old).status, 1);
    }

    #[test]
    fn check_compares_prev_result() {
        let rec = json!({"ips":[{"address":"10.6.0.5/16"}]});
        assert!(check_prev_result(
            br#"{"prevResult":{"ips":[{"address":"10.6.0.5/16"}]}}"#,
            &rec
        )
        .is_ok());
        assert!(check_prev_result(br#"{}"#, &rec).is_ok());
        let e = check_prev_result(
            br#"{"prevResult":{"ips":[{"address":"10.6.0.9/16"}]}}"#,
            &rec,
        )
        .expect_err("mismatch");
        assert_eq!(e.code, NOT_RECORDED);
    }
}
