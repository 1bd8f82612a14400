//! What one invocation answers the runtime: stdout and an exit status.

use std::collections::BTreeMap;
use std::io::Read;

use serde_json::{json, Value};

use crate::error::{CniError, IO_FAILURE};
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

/// The answer to CNI VERSION.
pub fn version_answer(version: &str) -> Answer {
    Answer::ok(json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}).to_string())
}

/// A plugin binary's `main`: `--version` for operators (runtimes use CNI VERSION), else the
/// `CNI_*` environment and the configuration on stdin (at most [`crate::conf::MAX_STDIN`] bytes
/// read) to `run`; prints its answer and exits with its status.
pub fn plugin_main(name: &str, run: impl FnOnce(&BTreeMap<String, String>, &[u8]) -> Answer) -> ! {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("{name} {}", env!("CARGO_PKG_VERSION"));
        std::process::exit(0);
    }
    let vars: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    let limit = crate::conf::MAX_STDIN as u64 + 1;
    let answer = match std::io::stdin().take(limit).read_to_end(&mut stdin) {
        Ok(_) => run(&vars, &stdin),
        Err(e) => Answer::err(CniError::new(
            IO_FAILURE,
            format!("cannot read the network configuration from stdin: {e}"),
        )),
    };
    if !answer.stdout.is_empty() {
        println!("{}", answer.stdout);
    }
    std::process::exit(answer.status);
}
