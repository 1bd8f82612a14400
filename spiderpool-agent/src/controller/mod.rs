//! `spiderpool-controller`: the admission webhook for SpiderIPPool, SpiderSubnet and
//! SpiderReservedIP (Spiderpool's mutations and `spiderctl validate`'s rules against the
//! cluster's current objects), with its own TLS.

pub mod admission;
pub mod subnets;
pub mod tls;
pub mod webhook;
