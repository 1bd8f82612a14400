//! The `ipam` section of a CNI network configuration, read once for every caller: the
//! `spiderpool` plugin (which adds the CNI envelope: `cniVersion`, GC attachments), `spiderctl
//! explain --cni-conf` and embedders ([`CniDefaults::from_netconf`]).

use serde_json::{Map, Value};

use crate::select::CniDefaults;

/// The plugin's `ipam` keys, checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpamConf {
    /// Default pools, `clean_gateway` and the network's name.
    pub defaults: CniDefaults,
    /// `ipam_unix_socket_path`.
    pub socket: Option<String>,
    /// `log_level`, as written (checked by the plugin, which knows its levels).
    pub log_level: Option<String>,
    /// `log_file_path`.
    pub log_file: Option<String>,
    /// `enableIPConflictDetection`, `enableGatewayDetection` (Spiderpool's keys).
    pub detect: crate::engine::Detect,
}

/// Reads an `ipam` object whose `type` is `spiderpool` (or absent). `name` is the network's
/// `name`. The error names the key and what it must be.
pub fn parse_ipam(name: Option<String>, ipam: &Map<String, Value>) -> Result<IpamConf, String> {
    if let Some(t) = ipam.get("type") {
        if t.as_str() != Some("spiderpool") {
            return Err(format!(
                "ipam.type is {t}: this plugin is 'spiderpool' (check the network configuration)"
            ));
        }
    }
    let list = |key: &str| -> Result<Vec<String>, String> {
        match ipam.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| match x {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    other => Err(format!(
                        "ipam.{key} must be a list of pool names, but holds {other}"
                    )),
                })
                .collect(),
            Some(other) => Err(format!(
                "ipam.{key} must be a list of pool names, not {other}"
            )),
        }
    };
    let string = |key: &str| -> Result<Option<String>, String> {
        match ipam.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("ipam.{key} must be a string, not {other}")),
        }
    };
    let flag = |key: &str| -> Result<bool, String> {
        match ipam.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(format!("ipam.{key} must be true or false, not {other}")),
        }
    };
    let clean_gateway = flag("clean_gateway")?;
    Ok(IpamConf {
        defaults: CniDefaults {
            default_ipv4_ippool: list("default_ipv4_ippool")?,
            default_ipv6_ippool: list("default_ipv6_ippool")?,
            clean_gateway,
            network_name: name,
        },
        socket: string("ipam_unix_socket_path")?,
        log_level: string("log_level")?,
        log_file: string("log_file_path")?,
        detect: crate::engine::Detect {
            ip_conflict: flag("enableIPConflictDetection")?,
            gateway: flag("enableGatewayDetection")?,
        },
    })
}

impl CniDefaults {
    /// Reads the defaults from a CNI network configuration (a single plugin config or a
    /// `.conflist` with `plugins`): the `ipam` section whose `type` is `spiderpool`.
    pub fn from_netconf(conf: &Value) -> Result<CniDefaults, String> {
        let name = conf
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_string);
        let ipam = match conf.get("plugins") {
            Some(Value::Array(plugins)) => plugins
                .iter()
                .filter_map(|p| p.get("ipam"))
                .find(|i| i.get("type").and_then(|t| t.as_str()) == Some("spiderpool")),
            Some(_) => return Err("\"plugins\" must be a list".into()),
            None => conf.get("ipam"),
        };
        match ipam {
            Some(Value::Object(m))
                if m.get("type").and_then(|t| t.as_str()) == Some("spiderpool") =>
            {
                parse_ipam(name, m).map(|c| c.defaults)
            }
            Some(Value::Object(_)) => Err("ipam.type is not \"spiderpool\"".into()),
            _ => Err("no \"ipam\" section of type \"spiderpool\"".into()),
        }
    }
}
