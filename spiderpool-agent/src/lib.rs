//! # spiderpool-agent
//!
//! The per-node daemon and `spiderctl`, the operator CLI.
//!
//! # Layout
//! - [`ctl`]: offline `spiderctl` subcommands (`validate`, `explain`) over manifests.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod ctl;
