//! # spiderpool-cni
//!
//! The `spiderpool` CNI IPAM plugin: it speaks the CNI spec (0.3.0 to 1.1.0) on one side and the
//! agent's API (`spiderpool_core::api`) over the agent's unix socket on the other. Thin on
//! purpose: parse, one request, print. No store code, no async runtime (the coordinator, a
//! separate binary, runs a single-threaded one for netlink).
//!
//! # Layout
//! - [`conf`]: the network configuration on stdin and the `CNI_*` environment.
//! - [`result`]: CNI results in the requested version.
//! - [`error`]: CNI error codes (every code this plugin returns is documented there).
//! - [`answer`], [`log`]: what an invocation prints and logs.
//! - [`netlink`]: links, addresses, routes and rules (rtnetlink), in the node's or a pod's namespace.
//! - [`client`]: a minimal HTTP/1.1 client over a unix socket.
//! - [`detect`], [`probe`]: IP conflict and gateway detection (ARP, NDP) in the pod before ADD answers.
//! - [`coordinator`]: the `coordinator` (`veth`) meta-plugin, chained after the main plugin.
//! - [`run`]: one invocation, from environment and stdin to stdout and exit code, testable in
//!   process.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![warn(missing_docs)]

pub mod answer;
pub mod client;
pub mod conf;
pub mod coordinator;
pub mod detect;
pub mod error;
pub mod log;
pub mod netlink;
pub mod probe;
pub mod result;
pub mod run;

/// CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
