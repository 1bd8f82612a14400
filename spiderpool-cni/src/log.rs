//! The plugin's own log file (`ipam.log_file_path`): one line per event, never stdout.

use std::io::Write;

use crate::conf::{Env, LogLevel, NetConf};

/// Appends one line per event to `log_file_path` (never stdout, which belongs to the result).
/// The plugin's own log file (`ipam.log_file_path`).
pub struct Log {
    file: Option<String>,
    level: LogLevel,
    prefix: String,
}

impl Log {
    /// The log of one invocation.
    pub fn new(c: &NetConf, env: &Env) -> Self {
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
}
