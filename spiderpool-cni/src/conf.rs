//! The network configuration on stdin and the `CNI_*` environment, checked into typed values.
//!
//! The IPAM plugin gets the **whole** network configuration (the main plugin's, with an `ipam`
//! section whose `type` is `spiderpool`). Spiderpool's `ipam` keys: `ipam_unix_socket_path`,
//! `default_ipv4_ippool`, `default_ipv6_ippool`, `clean_gateway`, `log_level`, `log_file_path`.
//! Unknown keys are ignored, as every CNI plugin does; a known key of the wrong type is an error
//! naming the key.

use std::collections::BTreeMap;

use serde_json::Value;
use spiderpool_core::api::{PodRef, DEFAULT_SOCKET};
use spiderpool_core::engine::Attachment;
use spiderpool_core::netconf::{parse_ipam, IpamConf};
use spiderpool_core::select::CniDefaults;

use crate::error::{CniError, DECODE_FAILURE, INCOMPATIBLE_VERSION, INVALID_CONFIG, INVALID_ENV};
use crate::SUPPORTED_VERSIONS;

/// Largest configuration read from stdin.
pub const MAX_STDIN: usize = 1 << 20;

/// The CNI verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Allocate.
    Add,
    /// Release.
    Del,
    /// Verify.
    Check,
    /// Supported versions.
    Version,
    /// Release what is not listed (1.1.0).
    Gc,
    /// Can ADD be served (1.1.0).
    Status,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            other => {
                return Err(CniError::new(
                    INVALID_ENV,
                    format!("CNI_COMMAND '{other}' is not ADD, DEL, CHECK, VERSION, GC or STATUS"),
                ))
            }
        })
    }

    /// The verb as the runtime writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }

    /// Whether the verb is about one attachment (needs `CNI_CONTAINERID` and `CNI_IFNAME`).
    pub fn needs_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

/// The environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// Verb.
    pub command: Command,
    /// Container and interface (ADD, DEL, CHECK).
    pub attachment: Option<Attachment>,
    /// `CNI_NETNS`.
    pub netns: String,
    /// Pod identity from `CNI_ARGS`.
    pub pod: Option<PodRef>,
}

/// Reads the `CNI_*` variables from `vars`.
pub fn parse_env(vars: &BTreeMap<String, String>) -> Result<Env, CniError> {
    let get = |k: &str| vars.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let command = Command::parse(get("CNI_COMMAND").ok_or_else(|| {
        CniError::new(
            INVALID_ENV,
            "CNI_COMMAND is not set: this is a CNI plugin, run by a container runtime",
        )
    })?)?;
    let netns = get("CNI_NETNS").unwrap_or_default().to_string();
    let attachment = if command.needs_attachment() {
        let missing = |k: &str| {
            CniError::new(
                INVALID_ENV,
                format!(
                    "{k} is not set (required for CNI_COMMAND={})",
                    command.as_str()
                ),
            )
        };
        let container_id = get("CNI_CONTAINERID").ok_or_else(|| missing("CNI_CONTAINERID"))?;
        let ifname = get("CNI_IFNAME").ok_or_else(|| missing("CNI_IFNAME"))?;
        if matches!(command, Command::Add | Command::Check) && netns.is_empty() {
            return Err(missing("CNI_NETNS"));
        }
        for (k, v) in [("CNI_CONTAINERID", container_id), ("CNI_IFNAME", ifname)] {
            if v.contains('/') || v.chars().any(char::is_control) || v.len() > 1024 {
                return Err(CniError::new(
                    INVALID_ENV,
                    format!("{k} '{v}' is not usable: it must be at most 1024 characters, without '/' or control characters"),
                ));
            }
        }
        Some(Attachment {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        })
    } else {
        None
    };
    let pod = match get("CNI_ARGS") {
        Some(args) => parse_cni_args(args)?,
        None => None,
    };
    Ok(Env {
        command,
        attachment,
        netns,
        pod,
    })
}

/// Reads `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` from `CNI_ARGS`
/// (`KEY=VALUE;KEY=VALUE`). Other keys (`IgnoreUnknown`, ...) are ignored.
pub fn parse_cni_args(args: &str) -> Result<Option<PodRef>, CniError> {
    let mut kv = BTreeMap::new();
    for part in args.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(CniError::new(
                INVALID_ENV,
                format!("CNI_ARGS entry '{part}' is not KEY=VALUE (CNI_ARGS='{args}')"),
            ));
        };
        kv.insert(k.trim(), v.trim());
    }
    let ns = kv.get("K8S_POD_NAMESPACE").copied().unwrap_or_default();
    let name = kv.get("K8S_POD_NAME").copied().unwrap_or_default();
    // A Kubernetes pod is named by both. A runtime that is not Kubernetes may pass one of them
    // (podman's CNI backend passes `K8S_POD_NAME=<container name>` and no namespace): no pod
    // identity, so the network configuration's default pools apply, and DEL never fails for it.
    if ns.is_empty() || name.is_empty() {
        return Ok(None);
    }
    Ok(Some(PodRef {
        namespace: ns.to_string(),
        name: name.to_string(),
        uid: kv
            .get("K8S_POD_UID")
            .copied()
            .unwrap_or_default()
            .to_string(),
    }))
}

/// The parts of the network configuration this plugin reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    /// `cniVersion`.
    pub cni_version: String,
    /// The network's `name` and `ipam` defaults.
    pub defaults: CniDefaults,
    /// `ipam.ipam_unix_socket_path`.
    pub socket: String,
    /// `ipam.log_level`.
    pub log_level: LogLevel,
    /// `ipam.log_file_path`.
    pub log_file: Option<String>,
    /// GC: `cni.dev/valid-attachments` (or the older `cni.dev/attachments`).
    pub valid_attachments: Option<Vec<Attachment>>,
    /// `ipam.enableIPConflictDetection`, `ipam.enableGatewayDetection`.
    pub detect: spiderpool_core::engine::Detect,
}

/// The directories `ipam.log_file_path` may name a file in: Spiderpool's (`/var/log/spidernet`)
/// and ours. The plugin runs as root and the path comes from a network configuration, which
/// anyone who may write a NetworkAttachmentDefinition controls: it must not name any file.
pub const LOG_DIRS: [&str; 2] = ["/var/log/spidernet", "/var/log/spiderpool"];

/// Checks `ipam.log_file_path`: an absolute path of a file directly or below one of
/// [`LOG_DIRS`], without `.` or `..` components.
pub fn log_path(p: &str) -> Result<String, String> {
    use std::path::Path;
    let path = Path::new(p);
    let plain = p.starts_with('/')
        && p.split('/')
            .skip(1)
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    let inside = LOG_DIRS
        .iter()
        .any(|d| path.starts_with(d) && path != Path::new(d));
    if plain && inside {
        Ok(p.to_string())
    } else {
        Err(format!(
            "ipam.log_file_path '{p}' must name a file under {} (an absolute path without '.' or '..')",
            LOG_DIRS.join(" or ")
        ))
    }
}

/// `log_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Everything.
    Debug,
    /// Calls and results.
    Info,
    /// Problems that were handled.
    Warn,
    /// Failures only.
    Error,
}

/// Reads and checks the configuration. The version is checked first, so that an unsupported
/// version is reported as such (code 1), whatever else is wrong.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    if stdin.len() > MAX_STDIN {
        return Err(CniError::new(
            DECODE_FAILURE,
            format!(
                "the network configuration on stdin is larger than {} bytes",
                MAX_STDIN
            ),
        ));
    }
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            DECODE_FAILURE,
            format!("the network configuration on stdin is not JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = &v else {
        return Err(CniError::new(
            DECODE_FAILURE,
            "the network configuration on stdin is not a JSON object",
        ));
    };
    let cni_version = match obj.get("cniVersion") {
        Some(Value::String(s)) => s.clone(),
        None => {
            return Err(CniError::new(
                INVALID_CONFIG,
                "the network configuration has no cniVersion",
            ))
        }
        Some(other) => {
            return Err(CniError::new(
                INVALID_CONFIG,
                format!("cniVersion must be a string, not {other}"),
            ))
        }
    };
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!(
                "incompatible CNI version {cni_version}: spiderpool supports {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let err = |msg: String| CniError::new(INVALID_CONFIG, msg).version(&cni_version);
    let name = match obj.get("name") {
        Some(Value::String(s)) => Some(s.clone()),
        None => None,
        Some(other) => return Err(err(format!("name must be a string, not {other}"))),
    };
    let ipam = match obj.get("ipam") {
        Some(Value::Object(m)) => parse_ipam(name, m).map_err(err)?,
        None => IpamConf::default(),
        Some(other) => return Err(err(format!("ipam must be an object, not {other}"))),
    };
    let log_level = match ipam.log_level.as_deref().map(str::to_ascii_lowercase) {
        None => LogLevel::Info,
        Some(l) => match l.as_str() {
            "debug" => LogLevel::Debug,
            "info" => LogLevel::Info,
            "warn" | "warning" => LogLevel::Warn,
            "error" => LogLevel::Error,
            _ => {
                return Err(err(format!(
                    "ipam.log_level '{l}' is not debug, info, warn or error"
                )))
            }
        },
    };
    let valid_attachments = attachments(obj, &cni_version)?;
    Ok(NetConf {
        detect: ipam.detect,
        defaults: ipam.defaults,
        socket: ipam.socket.unwrap_or_else(|| DEFAULT_SOCKET.to_string()),
        log_level,
        log_file: ipam
            .log_file
            .map(|f| log_path(&f).map_err(err))
            .transpose()?,
        valid_attachments,
        cni_version,
    })
}

/// `cni.dev/valid-attachments` (CNI 1.1), or the older `cni.dev/attachments`.
fn attachments(
    obj: &serde_json::Map<String, Value>,
    version: &str,
) -> Result<Option<Vec<Attachment>>, CniError> {
    let Some((key, v)) = ["cni.dev/valid-attachments", "cni.dev/attachments"]
        .iter()
        .find_map(|k| obj.get(*k).map(|v| (*k, v)))
    else {
        return Ok(None);
    };
    let bad =
        |what: String| CniError::new(INVALID_CONFIG, format!("{key}: {what}")).version(version);
    let Value::Array(items) = v else {
        return Err(bad(format!("must be a list, not {v}")));
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let field = |k: &str| {
            item.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        match (field("containerID"), field("ifname")) {
            (Some(c), Some(i)) => out.push(Attachment {
                container_id: c.to_string(),
                ifname: i.to_string(),
            }),
            _ => {
                return Err(bad(format!(
                    "every entry needs containerID and ifname, got {item}"
                )))
            }
        }
    }
    Ok(Some(out))
}

/// Whether `a` is at least `b` (both supported versions).
pub fn version_at_least(a: &str, b: &str) -> bool {
    let parse = |s: &str| -> (u32, u32, u32) {
        let mut it = s.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
        )
    };
    parse(a) >= parse(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_needs_container_and_ifname_for_add_del_check() {
        let e = parse_env(&env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ]))
        .expect_err("no container");
        assert_eq!(e.code, INVALID_ENV);
        assert!(
            e.msg
                .contains("CNI_CONTAINERID is not set (required for CNI_COMMAND=ADD)"),
            "{}",
            e.msg
        );
        let e = parse_env(&env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_CONTAINERID", "c"),
        ]))
        .expect_err("no netns");
        assert!(e.msg.contains("CNI_NETNS"), "{}", e.msg);
        // DEL may come without a netns (the sandbox is gone).
        let ok = parse_env(&env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_CONTAINERID", "c"),
        ]))
        .expect("del");
        assert_eq!(ok.attachment.map(|a| a.container_id), Some("c".into()));
        assert_eq!(
            parse_env(&env(&[("CNI_COMMAND", "VERSION")]))
                .expect("v")
                .command,
            Command::Version
        );
        assert_eq!(parse_env(&env(&[])).expect_err("none").code, INVALID_ENV);
        assert_eq!(
            parse_env(&env(&[("CNI_COMMAND", "FLY")]))
                .expect_err("bad")
                .code,
            INVALID_ENV
        );
    }

    #[test]
    fn cni_args_give_the_pod() {
        let p = parse_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u1",
        )
        .expect("ok")
        .expect("pod");
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str(), p.uid.as_str()),
            ("default", "web-0", "u1")
        );
        assert_eq!(parse_cni_args("IgnoreUnknown=1").expect("ok"), None);
        assert_eq!(
            parse_cni_args("garbage").expect_err("bad").code,
            INVALID_ENV
        );
        // podman's CNI backend: the container's name, no namespace, no UID.
        assert_eq!(
            parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web").expect("podman"),
            None
        );
        assert_eq!(
            parse_cni_args("K8S_POD_NAMESPACE=default;K8S_POD_INFRA_CONTAINER_ID=abc")
                .expect("namespace only"),
            None
        );
    }

    #[test]
    fn netconf_keys_and_their_errors() {
        let c = parse_netconf(
            br#"{"cniVersion":"1.0.0","name":"macvlan-6","type":"macvlan",
            "ipam":{"type":"spiderpool","default_ipv4_ippool":["a","b"],"clean_gateway":true,
            "ipam_unix_socket_path":"/run/x.sock","log_level":"debug","future_key":1}}"#,
        )
        .expect("valid");
        assert_eq!(c.defaults.default_ipv4_ippool, ["a", "b"]);
        assert!(c.defaults.clean_gateway);
        assert!(c.detect.is_off());
        assert_eq!(c.defaults.network_name.as_deref(), Some("macvlan-6"));
        assert_eq!(c.socket, "/run/x.sock");
        assert_eq!(c.log_level, LogLevel::Debug);
        let d = parse_netconf(br#"{"cniVersion":"0.3.1","name":"n","ipam":{"type":"spiderpool"}}"#)
            .expect("valid");
        assert_eq!(d.socket, DEFAULT_SOCKET);
        let cases: [(&[u8], u32, &str); 8] = [
            (b"{not json", DECODE_FAILURE, "not JSON"),
            (b"[1]", DECODE_FAILURE, "not a JSON object"),
            (
                br#"{"cniVersion":"9.9.9"}"#,
                INCOMPATIBLE_VERSION,
                "incompatible CNI version 9.9.9",
            ),
            (br#"{"name":"n"}"#, INVALID_CONFIG, "no cniVersion"),
            (
                br#"{"cniVersion":"1.0.0","ipam":{"type":"host-local"}}"#,
                INVALID_CONFIG,
                "ipam.type",
            ),
            (
                br#"{"cniVersion":"1.0.0","ipam":{"default_ipv4_ippool":"a"}}"#,
                INVALID_CONFIG,
                "ipam.default_ipv4_ippool must be a list",
            ),
            (
                br#"{"cniVersion":"1.0.0","ipam":{"clean_gateway":"yes"}}"#,
                INVALID_CONFIG,
                "clean_gateway must be true or false",
            ),
            (
                br#"{"cniVersion":"1.0.0","ipam":{"enableIPConflictDetection":1}}"#,
                INVALID_CONFIG,
                "ipam.enableIPConflictDetection must be true or false",
            ),
        ];
        for (input, code, text) in cases {
            let e = parse_netconf(input).expect_err("refused");
            assert_eq!(e.code, code, "{}", e.msg);
            assert!(e.msg.contains(text), "{} (want {text})", e.msg);
        }
        let huge = vec![b' '; MAX_STDIN + 1];
        assert_eq!(parse_netconf(&huge).expect_err("huge").code, DECODE_FAILURE);
    }

    #[test]
    fn gc_attachments_in_both_keys() {
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            let text = format!(
                r#"{{"cniVersion":"1.1.0","name":"n","{key}":[{{"containerID":"c1","ifname":"eth0"}}]}}"#
            );
            let c = parse_netconf(text.as_bytes()).expect("valid");
            assert_eq!(c.valid_attachments.expect("listed").len(), 1);
        }
        let e = parse_netconf(
            br#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#,
        )
        .expect_err("no container");
        assert_eq!(e.code, INVALID_CONFIG);
    }

    #[test]
    fn versions_compare() {
        assert!(version_at_least("1.1.0", "0.4.0"));
        assert!(version_at_least("0.4.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
    }
}
