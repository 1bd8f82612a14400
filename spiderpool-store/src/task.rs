//! Small pieces the daemons (`spiderpool-agent`, `spiderpool-controller`) share: their `main`
//! (logs, runtime, exit code), the clock, and "wait for the interval, or stop".

use std::time::{Duration, SystemTime};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Sleeps `interval`, or less when `stop` changes (or its sender is gone): `true` when the
/// interval passed, `false` when the task should stop.
pub async fn sleep_or_stop(
    interval: Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(interval) => true,
        _ = stop.changed() => false,
    }
}

/// The `main` of the daemons (`spiderpool-agent`, `spiderpool-controller`): logs to stderr
/// (`RUST_LOG`, default `info`), a multi-threaded runtime, `run` on it; a failure is logged,
/// printed as `NAME: error` and exits 1.
pub fn daemon_main<F>(name: &str, run: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_interval_passes_or_stop_ends_it() {
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        assert!(sleep_or_stop(Duration::from_millis(1), &mut rx).await);
        tx.send(true).expect("send");
        assert!(!sleep_or_stop(Duration::from_secs(3600), &mut rx).await);
        assert!(now_secs() > 1_700_000_000);
        assert!(now_millis() / 1000 >= now_secs() - 1);
    }
}
