//! `spiderpool-controller`: the admission webhook for Spiderpool's pools, subnets and reserved
//! IPs.
//!
//! ```text
//! spiderpool-controller --kubeconfig PATH [--webhook-addr HOST:PORT]   # outside a cluster
//! spiderpool-controller                                                # in a cluster (its Service)
//! ```
//! With `--webhook-addr` it serves the webhooks there and registers webhook configurations that
//! point at `https://HOST:PORT` by URL; in a cluster it listens on `--listen` (default
//! `0.0.0.0:5722`) and registers the Service `--namespace`/`--service`. Its CA and serving
//! certificate live in the Secret `--namespace`/`--secret` (made on first start, renewed before
//! expiry). SIGTERM or SIGINT stop it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use spiderpool_controller::{tls, webhook};

#[derive(Parser)]
#[command(
    name = "spiderpool-controller",
    version,
    about = "Spiderpool's admission webhook"
)]
struct Args {
    /// The kubeconfig (default: in-cluster config, else $KUBECONFIG, ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Serve the webhooks on HOST:PORT and register them by URL (outside a cluster).
    #[arg(long)]
    webhook_addr: Option<String>,
    /// In a cluster: where to listen.
    #[arg(long, default_value = "0.0.0.0:5722")]
    listen: String,
    /// Namespace of the Service and the certificate Secret.
    #[arg(long, default_value = "kube-system")]
    namespace: String,
    /// The agents' user name (their service account): it may write only auto-pools and pool
    /// finalizers, whatever its role allows.
    #[arg(
        long,
        default_value = "system:serviceaccount:kube-system:spiderpool-agent"
    )]
    agent_user: String,
    /// The Service in front of the controller (in a cluster).
    #[arg(long, default_value = "spiderpool-controller")]
    service: String,
    /// The Secret holding the webhook's CA and certificate.
    #[arg(long, default_value = "spiderpool-controller-webhook")]
    secret: String,
    /// How often auto-pools are reconciled (by the leader), in milliseconds.
    #[arg(long, default_value_t = 2000)]
    reconcile_interval_ms: u64,
    /// How long the leader's Lease holds, in seconds: another replica takes over this long after
    /// it last saw the Lease change; the leader stops acting after two thirds of it without a
    /// renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_secs: u64,
    /// Serve Prometheus metrics on HOST:PORT (plain HTTP, `/metrics`); off when not given.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Post a NearlyExhausted Event on a pool when this many percent of it are allocated.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    nearly_exhausted_percent: u8,
    /// How often the certificate is checked for renewal, in seconds.
    #[arg(long, default_value_t = 3600)]
    renew_check_secs: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    spiderpool_store::task::daemon_main("spiderpool-controller", run(args))
}

/// The request client (every call with a deadline), the server's URL, and the webhook's
/// watched cache (on a client without a read timeout, as watches need).
async fn connect(
    args: &Args,
) -> anyhow::Result<(kube::Client, String, spiderpool_controller::cache::Cache)> {
    let path = args.kubeconfig.as_deref();
    let (client, server) = spiderpool_store::k8s::request_client(path)
        .await
        .map_err(anyhow::Error::msg)?;
    let (watching, _) = spiderpool_store::k8s::client(path)
        .await
        .map_err(anyhow::Error::msg)?;
    let cache = spiderpool_controller::cache::Cache::start(&watching, Duration::from_secs(60))
        .await
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("API server {server}"))?;
    Ok((client, server, cache))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (client, server, cache) = connect(&args).await?;
    let (listen, hosts, endpoint) = match &args.webhook_addr {
        Some(addr) => {
            let host = addr
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(|c| c == '[' || c == ']').to_string())
                .context("--webhook-addr must be HOST:PORT")?;
            (
                addr.clone(),
                vec![host],
                webhook::Endpoint::Url(format!("https://{addr}")),
            )
        }
        None => {
            let (svc, ns) = (&args.service, &args.namespace);
            let port = args
                .listen
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .context("--listen must be HOST:PORT")?;
            (
                args.listen.clone(),
                vec![
                    svc.clone(),
                    format!("{svc}.{ns}"),
                    format!("{svc}.{ns}.svc"),
                    format!("{svc}.{ns}.svc.cluster.local"),
                ],
                webhook::Endpoint::Service(ns.clone(), svc.clone(), port),
            )
        }
    };
    let certs = tls::ensure(&client, &args.namespace, &args.secret, &hosts)
        .await
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("the webhook certificate (API server {server})"))?;
    let config = Arc::new(RwLock::new(Arc::new(
        tls::server_config(&certs).map_err(anyhow::Error::msg)?,
    )));
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(webhook::serve(
        listener,
        config.clone(),
        webhook::router(webhook::Served {
            client: client.clone(),
            cache,
            agent_user: args.agent_user.clone(),
        }),
        stop_rx.clone(),
    ));
    // Registered once the server answers: the API server calls it from the first write on.
    webhook::register(&client, &endpoint, &certs.ca_bundle())
        .await
        .map_err(anyhow::Error::msg)?;
    tokio::spawn(webhook::rotate(
        webhook::Renewal {
            client: client.clone(),
            namespace: args.namespace.clone(),
            secret: args.secret.clone(),
            hosts,
            endpoint,
        },
        certs,
        config,
        Duration::from_secs(args.renew_check_secs.max(1)),
        stop_rx.clone(),
    ));
    tokio::spawn(spiderpool_controller::reconcile::run(
        client.clone(),
        args.namespace.clone(),
        identity(),
        Duration::from_millis(args.reconcile_interval_ms.max(50)),
        Duration::from_secs(args.lease_duration_secs.max(2)),
        args.nearly_exhausted_percent,
        stop_rx.clone(),
    ));
    if let Some(addr) = &args.metrics_addr {
        serve_metrics(addr).await?;
    }
    tracing::info!(listen = %listen, server = %server, "serving the admission webhooks");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("watching SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = stop_tx.send(true);
    let _ = serving.await;
    tracing::info!("stopped");
    Ok(())
}

/// Serves `/metrics` (plain HTTP) on `addr` in the background.
async fn serve_metrics(addr: &str) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-addr {addr}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async { spiderpool_controller::metrics::METRICS.render() }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(tcp, app).await {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(())
}

/// This replica's name in the leader Lease: host name and process id.
fn identity() -> String {
    format!(
        "{}-{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "controller".into()),
        std::process::id()
    )
}
