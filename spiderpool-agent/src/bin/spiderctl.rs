//! `spiderctl`: the operator CLI.
//!
//! Offline subcommands (no daemon needed):
//! - `spiderctl validate FILE...`: check SpiderIPPool/SpiderSubnet/SpiderReservedIP manifests.
//! - `spiderctl explain --manifests F --node N --pod NS/NAME`: dry-run pool selection.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use spiderpool_agent::ctl::{self, ExplainArgs, Format};
use spiderpool_core::select::Families;

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

#[derive(Subcommand)]
enum Command {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => {
            let report = ctl::validate(&files);
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
            let format = match output {
                Output::Json => Format::Json,
                Output::Table => Format::Table,
            };
            match ctl::explain(&args) {
                Ok(x) => {
                    match format {
                        Format::Json => match serde_json::to_string_pretty(&x) {
                            Ok(s) => println!("{s}"),
                            Err(e) => {
                                eprintln!("error: {e}");
                                return ExitCode::from(2);
                            }
                        },
                        Format::Table => print!("{}", x.table()),
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
    }
}
