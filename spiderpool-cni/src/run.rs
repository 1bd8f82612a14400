//! One plugin invocation: environment and stdin in, stdout and exit status out.
//!
//! DEL and an unreachable agent: when the agent's socket file does not exist at all (no agent on
//! this node: uninstalled, or never started), DEL succeeds with a log line, because a runtime would
//! otherwise retry the sandbox teardown forever; whatever the node held is freed by GC (CNI GC, or
//! the agent's own GC) once an agent runs again. When the socket exists but the agent does not
//! answer (restarting, overloaded), DEL fails with code 11 and the runtime retries, so the address
//! is freed by the DEL itself as soon as the agent is back.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use spiderpool_core::api::{AddRequest, CheckRequest, DelRequest, DelResponse, GcRequest, Status};
use spiderpool_core::engine::Allocation;

pub use crate::answer::{peek_version, Answer};
use crate::client::{self, ClientError};
use crate::conf::{self, Command, Env, LogLevel, NetConf};
use crate::error::{
    CniError, AGENT_ERROR, INCOMPATIBLE_VERSION, INVALID_CONFIG, NOT_AVAILABLE, NOT_RECORDED,
};
pub use crate::log::Log;
use crate::result::add_result;

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
        return crate::answer::version_answer(&version);
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

/// ADD: the agent's allocation (probed first when detection is on) as the CNI result.
fn add(env: &Env, c: &NetConf, log: &Log) -> Result<String, CniError> {
    let att = env.attachment.clone().unwrap_or_default();
    let req = AddRequest {
        attachment: att.clone(),
        netns: env.netns.clone(),
        pod: env.pod.clone(),
        cni: c.defaults.clone(),
    };
    let mut alloc: Allocation = client::call(&c.socket, "POST", "/v1/add", Some(&req), ADD_TIMEOUT)
        .map_err(|e| CniError::from(e.into_api()))?;
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

fn dispatch(env: &Env, c: &NetConf, stdin: &[u8], log: &Log) -> Result<String, CniError> {
    let agent_err = |e: ClientError| CniError::from(e.into_api());
    let network = c.defaults.network_name.clone().unwrap_or_default();
    match env.command {
        Command::Version => Ok(String::new()),
        Command::Add => add(env, c, log),
        Command::Del => {
            let req = DelRequest {
                attachment: env.attachment.clone().unwrap_or_default(),
                network,
                pod: env.pod.clone(),
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
                pod: env.pod.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
