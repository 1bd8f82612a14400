//! CNI errors: `{"cniVersion","code","msg","details"}` on stdout and a non-zero exit status
//! (the code itself, so a shell sees it too).
//!
//! | code | meaning | when |
//! |---|---|---|
//! | 1 | incompatible CNI version | `cniVersion` not one of 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0; CHECK below 0.4.0; GC/STATUS below 1.1.0 |
//! | 4 | invalid environment variables | `CNI_COMMAND` missing or unknown; `CNI_CONTAINERID`, `CNI_IFNAME` (or `CNI_NETNS` for ADD/CHECK) missing; malformed `CNI_ARGS` |
//! | 5 | I/O error | stdin unreadable |
//! | 6 | failed to decode content | stdin not JSON, or larger than 1 MiB |
//! | 7 | invalid network configuration | a key of the wrong type (`default_ipv4_ippool` not a list, ...), `ipam.type` not `spiderpool`, invalid pod annotations, a route the pod's subnets cannot reach |
//! | 11 | try again later | agent socket missing (ADD/CHECK/GC), no agent listening, agent timed out, lease store unreachable or busy, too many allocation races |
//! | 50 | the plugin is not available | STATUS while the agent cannot serve ADD |
//! | 100 | no IPPool eligible | every candidate pool skipped (affinity, disabled, family...), or no pool configured; `details` lists every candidate and why |
//! | 101 | IPPools exhausted | candidates that could serve the pod are full; `details` lists them with `exhausted (used/total allocated)` |
//! | 102 | no address recorded | CHECK for an attachment with no allocation |
//! | 103 | agent error | the agent failed unexpectedly (see its log) or answered something the plugin cannot read |
//! | 104 | IP conflict | IP conflict detection found every address tried (up to 4) answered for by another host; `msg` lists them and the MACs that answered |
//! | 110 | coordinator CHECK failed | the pod's veth pair, or the node's route or rule to a pod address, is missing |
//! | 111 | coordinator netlink failure | a netlink step of the coordinator failed; `msg` says which |

use serde::Serialize;

use spiderpool_core::api::{ApiError, ErrorKind};

/// Incompatible CNI version.
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// Invalid environment variables.
pub const INVALID_ENV: u32 = 4;
/// I/O failure.
pub const IO_FAILURE: u32 = 5;
/// Failed to decode content.
pub const DECODE_FAILURE: u32 = 6;
/// Invalid network configuration.
pub const INVALID_CONFIG: u32 = 7;
/// Try again later.
pub const TRY_AGAIN_LATER: u32 = 11;
/// STATUS: the plugin cannot serve ADD.
pub const NOT_AVAILABLE: u32 = 50;
/// No IPPool eligible.
pub const NO_POOL: u32 = 100;
/// IPPools exhausted.
pub const EXHAUSTED: u32 = 101;
/// CHECK: no address recorded.
pub const NOT_RECORDED: u32 = 102;
/// Every address tried for the NIC is in use by another host (IP conflict detection).
pub const IP_CONFLICT: u32 = 104;
/// The agent failed.
pub const AGENT_ERROR: u32 = 103;

/// A CNI error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    /// CNI version of the answer.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Error code.
    pub code: u32,
    /// One line.
    pub msg: String,
    /// More.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    /// An error with `code` and `msg`.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            cni_version: "1.0.0".into(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// With details.
    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Answered in `version`.
    pub fn version(mut self, version: &str) -> Self {
        self.cni_version = version.to_string();
        self
    }

    /// The error JSON printed on stdout.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"1.0.0","code":{},"msg":"error"}}"#,
                self.code
            )
        })
    }
}

impl From<ApiError> for CniError {
    fn from(e: ApiError) -> Self {
        let code = match e.kind {
            ErrorKind::InvalidConfig | ErrorKind::BadRequest => INVALID_CONFIG,
            ErrorKind::NoPool => NO_POOL,
            ErrorKind::Exhausted => EXHAUSTED,
            ErrorKind::NotFound => NOT_RECORDED,
            ErrorKind::Unavailable => TRY_AGAIN_LATER,
            ErrorKind::Internal => AGENT_ERROR,
        };
        CniError::new(code, e.message).details(e.details)
    }
}
