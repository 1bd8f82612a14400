//! `spiderctl`: the operator CLI.
//!
//! Offline subcommands (no daemon needed):
//! - `spiderctl validate FILE...`: check SpiderIPPool/SpiderSubnet/SpiderReservedIP manifests.
//! - `spiderctl explain --manifests F --node N --pod NS/NAME`: dry-run pool selection.
//!
//! Online:
//! - `spiderctl get ippools|subnets|endpoints [--socket PATH | --store SPEC --manifests PATH]
//!   [-o table|json]`: counts and allocations, from a running agent or from the store itself.
//! - `spiderctl check --kubeconfig PATH [-o table|json]`: every record against the cluster
//!   (leaks, conflicts, disagreements); `spiderctl release (--ip IP ... | --from-report F)`:
//!   frees exactly those records (docs/operations.md).
//! - `spiderctl crd`, `uninstall`, `migrate from-spiderpool|to-spiderpool`, `version`, `health`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use spiderpool_agent::ctl::{self, ExplainArgs};
use spiderpool_core::Families;

#[derive(Parser)]
#[command(name = "spiderctl", version, about = "Operate the spiderpool IPAM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Json,
    Table,
}

#[derive(Clone, Copy, ValueEnum)]
enum FamilyArg {
    V4,
    V6,
    Dual,
}

#[derive(Clone, Copy, ValueEnum)]
enum GetArg {
    #[value(alias = "ippool", alias = "sp")]
    Ippools,
    #[value(alias = "subnet", alias = "ss")]
    Subnets,
    #[value(alias = "endpoint", alias = "se")]
    Endpoints,
}

#[derive(Subcommand)]
enum Command {
    /// This spiderctl's version, and with --socket the version of the agent answering there.
    Version {
        /// An agent's socket to ask as well.
        #[arg(long)]
        socket: Option<String>,
    },
    /// Ask a running agent whether it is ready (serves ADD: its store answers, no command stuck)
    /// or, with --live, alive (no command stuck past every deadline): the DaemonSet's probes.
    /// Exit 0 yes, 1 no (the reason on stderr).
    Health {
        /// The agent's socket.
        #[arg(long)]
        socket: Option<String>,
        /// Liveness instead of readiness.
        #[arg(long)]
        live: bool,
    },
    /// List pools, subnets or allocations with their counts, from a running agent (--socket,
    /// the default) or from the lease store itself (--store with --manifests, agent stopped for
    /// an embedded store). Exit 0, or 2 when the source cannot be read.
    Get {
        /// ippools, subnets or endpoints.
        what: GetArg,
        /// The agent's socket.
        #[arg(long, conflicts_with = "store")]
        socket: Option<String>,
        /// Read the store directly (embedded:PATH, etcd:URL[#PREFIX], ...).
        #[arg(long, requires = "manifests")]
        store: Option<String>,
        /// Manifests with the pools (with --store).
        #[arg(long = "manifests")]
        manifests: Vec<PathBuf>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print the CustomResourceDefinitions (SpiderIPPool, SpiderSubnet, SpiderReservedIP,
    /// SpiderEndpoint, SpiderIPBlock) as YAML, generated from the Rust types: `spiderctl crd |
    /// kubectl apply -f -` installs them.
    #[cfg(feature = "kube")]
    Crd,
    /// Take spiderpool-rs off a cluster without blocking on its own webhooks: the webhook
    /// configurations, then the agents, the controller and what the manifests install by name,
    /// then our finalizer on pools that hold no address, then (with --delete-crds) the CRDs.
    /// Exit 0 done, 1 some pools still hold addresses (named; nothing else is left), 2 error.
    #[cfg(feature = "kube")]
    Uninstall {
        /// The kubeconfig (default: in-cluster, $KUBECONFIG, ~/.kube/config).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Also delete the CRDs (and with them every pool, subnet, block and endpoint).
        #[arg(long)]
        delete_crds: bool,
        /// Drop the finalizer of pools that still hold addresses (their pods keep running with
        /// addresses nobody tracks any more) and delete the CRDs even then.
        #[arg(long)]
        force: bool,
    },
    /// Take over a stopped Spiderpool's allocations in place (pods keep their addresses), or
    /// give them back. Exit 0 done and clean, 1 done with findings (or addresses not imported),
    /// 2 refused or failed (nothing lost: run it again).
    #[cfg(feature = "kube")]
    Migrate {
        #[command(subcommand)]
        direction: Direction,
    },
    /// Check every allocation record against the cluster (read-only): leaks (pod gone,
    /// finished, past its grace period, replaced), records of missing pools or outside their
    /// pool, addresses in conflict, pods using addresses nobody holds for them, SpiderEndpoints
    /// and subnet ledgers that disagree. Exit 0 clean, 1 findings, 2 could not check.
    Check {
        /// The kubeconfig (default: in-cluster, $KUBECONFIG, ~/.kube/config).
        #[arg(long, conflicts_with = "store")]
        kubeconfig: Option<PathBuf>,
        /// Outside Kubernetes: the store (embedded:PATH, etcd:URL[#PREFIX]); pools only.
        #[arg(long, requires = "manifests")]
        store: Option<String>,
        /// Manifests with the pools (with --store).
        #[arg(long = "manifests")]
        manifests: Vec<PathBuf>,
        /// The agents' --gc-interval-ms, in seconds (to say when GC frees a leak).
        #[arg(long, default_value_t = 60)]
        gc_interval_secs: u64,
        /// The agents' --gc-margin-secs.
        #[arg(long, default_value_t = 30)]
        gc_margin_secs: u64,
        /// Output format (json is what `release --from-report` reads).
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Free exactly the records named: by address, or the releasable findings of a `check -o
    /// json` report (each only while the record is still the one reported). Refuses an address
    /// whose pod is alive (or whose StatefulSet wants it back) unless --force. Exit 0 all
    /// freed, 1 some refused or left alone (each said why), 2 error.
    #[cfg(feature = "kube")]
    Release {
        /// The kubeconfig (default: in-cluster, $KUBECONFIG, ~/.kube/config).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Addresses to free.
        #[arg(
            long = "ip",
            required_unless_present = "from_report",
            conflicts_with = "from_report"
        )]
        ips: Vec<std::net::IpAddr>,
        /// A `spiderctl check -o json` report ("-" for stdin).
        #[arg(long)]
        from_report: Option<PathBuf>,
        /// Free addresses whose pod is alive too (it may then be handed out twice).
        #[arg(long)]
        force: bool,
    },
    /// Validate SpiderIPPool, SpiderSubnet and SpiderReservedIP manifests, alone and together.
    /// Exit 0 when all are valid, 1 otherwise (one line per problem).
    Validate {
        /// Manifest files (multi-document YAML or JSON).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show which pool each NIC and IP family of a pod would use, and why others are skipped.
    /// Exit 0 when every requested family of every NIC has a pool, 1 when one has none (or the
    /// pod's annotations are invalid), 2 when the input files are unreadable or incomplete.
    Explain {
        /// Manifests holding Node, Namespace, Pod, SpiderIPPool and SpiderReservedIP objects.
        #[arg(long = "manifests", required = true)]
        manifests: Vec<PathBuf>,
        /// The node the pod runs on.
        #[arg(long)]
        node: String,
        /// The pod, as NAMESPACE/NAME.
        #[arg(long)]
        pod: String,
        /// The interface being set up.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// The CNI network configuration (for default_ipv4_ippool, clean_gateway, name).
        #[arg(long)]
        cni_config: Option<PathBuf>,
        /// IP families the cluster serves from default pools (spec.default: true). Default:
        /// every family that has a default pool (IPv4 when none has); the output says which.
        #[arg(long, value_enum)]
        default_families: Option<FamilyArg>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// `spiderctl migrate` directions.
#[cfg(feature = "kube")]
#[derive(Subcommand)]
enum Direction {
    /// With Spiderpool's agents and controller stopped: back up its objects, replace its CRDs
    /// with ours, import every allocation (pool statuses, SpiderEndpoints) into SpiderIPBlocks
    /// and check that each address is held by the same pod. Idempotent and resumable.
    FromSpiderpool(MigrateArgs),
    /// With our agents and controller stopped: write every record back into Spiderpool's pool
    /// statuses, restore its CRDs and webhooks from the backup, delete the SpiderIPBlocks.
    ToSpiderpool {
        #[command(flatten)]
        args: MigrateArgs,
        /// Spiderpool's CRDs are installed already (no backup to restore them from).
        #[arg(long)]
        keep_crds: bool,
    },
}

/// What both directions take.
#[cfg(feature = "kube")]
#[derive(clap::Args)]
struct MigrateArgs {
    /// The kubeconfig (default: in-cluster, $KUBECONFIG, ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Print what would be done and every inconsistency found; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Go on although the other IPAM's agents or controller still run, or pools still change.
    #[arg(long)]
    force: bool,
    /// The namespace of the backup ConfigMaps.
    #[arg(long, default_value = "kube-system")]
    namespace: String,
    /// Pools must stay unchanged this long (milliseconds) before the import starts.
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// Output format of the report.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        #[cfg(feature = "kube")]
        Command::Crd => {
            print!("{}", spiderpool_store::k8s::crd::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Get {
            what,
            socket,
            store,
            manifests,
            output,
        } => get(what, socket, store, manifests, output),
        Command::Health { socket, live } => health(socket, live),
        Command::Version { socket } => version(socket),
        #[cfg(feature = "kube")]
        Command::Uninstall {
            kubeconfig,
            delete_crds,
            force,
        } => uninstall(kubeconfig, delete_crds, force),
        #[cfg(feature = "kube")]
        Command::Migrate { direction } => migrate(direction),
        Command::Check {
            kubeconfig,
            store,
            manifests,
            gc_interval_secs,
            gc_margin_secs,
            output,
        } => {
            let gc = spiderpool_core::audit::GcTiming {
                interval: gc_interval_secs,
                margin: gc_margin_secs,
            };
            check(kubeconfig, store, &manifests, gc, output)
        }
        #[cfg(feature = "kube")]
        Command::Release {
            kubeconfig,
            ips,
            from_report,
            force,
        } => release(kubeconfig, ips, from_report, force),
        Command::Validate { files } => validate(&files),
        Command::Explain {
            manifests,
            node,
            pod,
            ifname,
            cni_config,
            default_families,
            output,
        } => {
            let families = default_families.map(|f| match f {
                FamilyArg::V4 => Families {
                    ipv4: true,
                    ipv6: false,
                },
                FamilyArg::V6 => Families {
                    ipv4: false,
                    ipv6: true,
                },
                FamilyArg::Dual => Families {
                    ipv4: true,
                    ipv6: true,
                },
            });
            let args = ExplainArgs {
                manifests,
                node,
                pod,
                ifname,
                cni_config,
                families,
            };
            explain(&args, output)
        }
    }
}

fn get(
    what: GetArg,
    socket: Option<String>,
    store: Option<String>,
    manifests: Vec<PathBuf>,
    output: Output,
) -> ExitCode {
    let what = match what {
        GetArg::Ippools => ctl::GetWhat::IpPools,
        GetArg::Subnets => ctl::GetWhat::Subnets,
        GetArg::Endpoints => ctl::GetWhat::Endpoints,
    };
    let source = match store {
        Some(spec) => ctl::GetSource::Store { spec, manifests },
        None => ctl::GetSource::Socket(
            socket.unwrap_or_else(|| spiderpool_core::api::DEFAULT_SOCKET.to_string()),
        ),
    };
    match ctl::get(what, &source) {
        Ok(rows) => {
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).unwrap_or_default()
                ),
                Output::Table => print!("{}", ctl::render_get(what, &rows)),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let report = ctl::validate(files);
    for e in &report.errors {
        println!("{e}");
    }
    for w in &report.warnings {
        println!("warning: {w}");
    }
    if report.errors.is_empty() {
        let summary: Vec<String> = report
            .counts
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        println!("valid: {}", summary.join(", "));
        ExitCode::SUCCESS
    } else {
        eprintln!("{} problem(s) found", report.errors.len());
        ExitCode::from(1)
    }
}

fn explain(args: &ExplainArgs, output: Output) -> ExitCode {
    match ctl::explain(args) {
        Ok(x) => {
            match output {
                Output::Json => match serde_json::to_string_pretty(&x) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                },
                Output::Table => print!("{}", x.table()),
            }
            if x.complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(ctl::ExplainError::Selection(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(ctl::ExplainError::Input(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `spiderctl health`.
fn health(socket: Option<String>, live: bool) -> ExitCode {
    let socket = socket.unwrap_or_else(|| spiderpool_core::api::DEFAULT_SOCKET.to_string());
    let path = if live { "/livez" } else { "/readyz" };
    match spiderpool_cni::client::exchange::<()>(
        &socket,
        "GET",
        path,
        None,
        std::time::Duration::from_secs(8),
    ) {
        Ok((200, _)) => ExitCode::SUCCESS,
        Ok((status, body)) => {
            eprintln!(
                "spiderctl: agent at {socket} not {} ({status}): {}",
                if live { "alive" } else { "ready" },
                String::from_utf8_lossy(&body)
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("spiderctl: {e}");
            ExitCode::from(1)
        }
    }
}

/// `spiderctl version [--socket PATH]`: exit 1 when the agent cannot be asked.
fn version(socket: Option<String>) -> ExitCode {
    println!("spiderctl {}", env!("CARGO_PKG_VERSION"));
    let Some(sock) = socket else {
        return ExitCode::SUCCESS;
    };
    let s: Result<spiderpool_core::api::Status, _> = spiderpool_cni::client::call::<(), _>(
        &sock,
        "GET",
        "/v1/status",
        None,
        std::time::Duration::from_secs(8),
    );
    match s {
        Ok(s) => {
            println!(
                "spiderpool-agent {} (node {}, store {})",
                s.version, s.node, s.store
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spiderctl: {e}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// `spiderctl check`.
fn check(
    kubeconfig: Option<PathBuf>,
    store: Option<String>,
    manifests: &[PathBuf],
    gc: spiderpool_core::audit::GcTiming,
    output: Output,
) -> ExitCode {
    use spiderpool_agent::ctl::check as c;
    let report = match store {
        Some(spec) => c::check_store(&spec, manifests),
        #[cfg(feature = "kube")]
        None => runtime().and_then(|rt| {
            rt.block_on(async {
                let (client, server) =
                    spiderpool_store::k8s::request_client(kubeconfig.as_deref()).await?;
                c::check_kube(client, &server, gc).await
            })
        }),
        #[cfg(not(feature = "kube"))]
        None => {
            let _ = (kubeconfig, gc);
            Err("this spiderctl is built without Kubernetes support: use --store".to_string())
        }
    };
    match report {
        Ok(r) => {
            match output {
                Output::Json => {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default())
                }
                Output::Table => print!("{}", c::render(&r)),
            }
            if r.findings.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("spiderctl: could not check: {e}");
            ExitCode::from(2)
        }
    }
}

/// `spiderctl release`.
#[cfg(feature = "kube")]
fn release(
    kubeconfig: Option<PathBuf>,
    ips: Vec<std::net::IpAddr>,
    from_report: Option<PathBuf>,
    force: bool,
) -> ExitCode {
    use spiderpool_agent::ctl::check as c;
    let targets = match from_report {
        Some(path) => {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).map_err(|e| e.to_string())
            } else {
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
            };
            match text.and_then(|t| c::targets_from_report(&t)) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("spiderctl: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        None => ips
            .into_iter()
            .map(|ip| c::Target { ip, expect: None })
            .collect(),
    };
    let out = runtime().and_then(|rt| {
        rt.block_on(async {
            let (client, server) =
                spiderpool_store::k8s::request_client(kubeconfig.as_deref()).await?;
            c::release_kube(client, &server, &targets, force).await
        })
    });
    match out {
        Ok(r) => {
            for l in &r.released {
                println!("{l}");
            }
            for l in r.refused.iter().chain(&r.skipped) {
                eprintln!("{l}");
            }
            if r.refused.is_empty() && r.skipped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("spiderctl: {e}");
            ExitCode::from(2)
        }
    }
}

/// `spiderctl uninstall`.
#[cfg(feature = "kube")]
fn uninstall(kubeconfig: Option<PathBuf>, delete_crds: bool, force: bool) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("spiderctl: {e}");
            return ExitCode::from(2);
        }
    };
    let out = rt.block_on(async {
        let (client, _) = spiderpool_store::k8s::request_client(kubeconfig.as_deref()).await?;
        spiderpool_agent::ctl::uninstall::uninstall(client, delete_crds, force).await
    });
    match out {
        Ok(r) => {
            for line in &r.done {
                println!("{line}");
            }
            for (pool, n) in &r.refused {
                eprintln!("kept: SpiderIPPool {pool} holds {n} addresses (its pods still use them: delete them first, or --force)");
            }
            if r.refused.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("spiderctl: {e}");
            ExitCode::from(2)
        }
    }
}

/// `spiderctl migrate`.
#[cfg(feature = "kube")]
fn migrate(direction: Direction) -> ExitCode {
    use spiderpool_agent::ctl::migrate as m;
    let (args, keep_crds, back) = match direction {
        Direction::FromSpiderpool(a) => (a, false, false),
        Direction::ToSpiderpool { args, keep_crds } => (args, keep_crds, true),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("spiderctl: {e}");
            return ExitCode::from(2);
        }
    };
    let out = rt.block_on(async {
        let (client, server) =
            spiderpool_store::k8s::request_client(args.kubeconfig.as_deref()).await?;
        let opts = m::Options {
            dry_run: args.dry_run,
            force: args.force,
            namespace: args.namespace.clone(),
            settle: std::time::Duration::from_millis(args.settle_ms),
            server,
        };
        if back {
            m::to_spiderpool(client, &opts, keep_crds).await
        } else {
            m::from_spiderpool(client, &opts).await
        }
    });
    match out {
        Ok(r) => {
            match args.output {
                Output::Json => println!("{}", m::report_json(&r)),
                Output::Table => print!("{}", m::report_text(&r, args.dry_run)),
            }
            if r.findings.is_empty() && r.refused.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("spiderctl: {e}");
            ExitCode::from(2)
        }
    }
}
