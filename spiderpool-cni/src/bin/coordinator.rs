//! `coordinator` (also installed as `veth`): the CNI meta-plugin chained after the main plugin.
//! Everything is in [`spiderpool_cni::coordinator`]; this reads the environment and stdin, asks
//! the node's agent for the cluster's `SpiderCoordinator` defaults, prints the answer and exits
//! with its status.

use spiderpool_cni::answer::{plugin_main, Answer};
use spiderpool_cni::coordinator;

fn main() {
    plugin_main(
        "coordinator",
        |vars, stdin| match coordinator::cluster_defaults(vars, stdin) {
            Ok(cluster) => coordinator::run(vars, stdin, cluster.as_ref()),
            Err(e) => Answer::err(e),
        },
    )
}
