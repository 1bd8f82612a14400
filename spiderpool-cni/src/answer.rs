//! What one invocation answers the runtime: stdout and an exit status.

use serde_json::Value;

use crate::error::CniError;
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
