//! # spiderpool-agent
//!
//! The per-node daemon and `spiderctl`, the operator CLI.
//!
//! # Layout
//! - [`ctl`]: offline `spiderctl` subcommands (`validate`, `explain`) over manifests.
//! - [`view`]: the cluster view behind one trait ([`view::ClusterView`]): manifests
//!   ([`view::ManifestView`]) or, with feature `kube`, the API server (`kube_view::KubeView`).
//! - [`server`]: the HTTP API on the unix socket and the metrics endpoint.
//! - [`metrics`]: Prometheus counters and histograms with Spiderpool's names.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

#[cfg(feature = "kube")]
pub mod autopool;
#[cfg(feature = "kube")]
pub mod controller;
pub mod ctl;
#[cfg(feature = "kube")]
pub mod endpoints;
pub mod gc;
#[cfg(feature = "kube")]
pub mod kube_view;
pub mod metrics;
pub mod server;
pub mod view;

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
