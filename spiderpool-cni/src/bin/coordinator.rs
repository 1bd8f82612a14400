//! `coordinator` (also installed as `veth`): the CNI meta-plugin chained after the main plugin.
//! Everything is in [`spiderpool_cni::coordinator`]; this reads the environment and stdin, asks
//! the node's agent for the cluster's `SpiderCoordinator` defaults, prints the answer and exits
//! with its status.

use std::io::Read;

use spiderpool_cni::coordinator;
use spiderpool_cni::error::{CniError, IO_FAILURE};
use spiderpool_cni::run::Answer;

fn main() {
    // A CNI plugin takes no arguments; `--version` is for operators (runtimes use VERSION).
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("coordinator {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let vars = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    let limit = spiderpool_cni::conf::MAX_STDIN as u64 + 1;
    let answer = match std::io::stdin().take(limit).read_to_end(&mut stdin) {
        Ok(_) => match coordinator::cluster_defaults(&vars, &stdin) {
            Ok(cluster) => coordinator::run(&vars, &stdin, cluster.as_ref()),
            Err(e) => Answer::err(e),
        },
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
