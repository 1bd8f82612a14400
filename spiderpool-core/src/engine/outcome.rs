//! What the engine answers: the attachment a request is about, the allocation per NIC (addresses,
//! gateways, routes), its errors and its tally.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::range::IpFamily;
use crate::select::SelectionError;
use crate::store::StoreError;

/// The attachment an ADD/DEL/CHECK is about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// Container (sandbox) ID.
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
}

/// An allocated address with what the NIC needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressInfo {
    /// Address with the pool subnet's prefix length.
    pub address: IpNet,
    /// Pool.
    pub pool: String,
    /// Gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// VLAN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vlan: Option<i64>,
}

/// A route for a NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// Destination.
    pub dst: IpNet,
    /// Next hop.
    pub gw: IpAddr,
}

/// The addresses of one NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NicAllocation {
    /// Interface.
    pub ifname: String,
    /// IPv4 address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<AddressInfo>,
    /// IPv6 address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<AddressInfo>,
    /// Default route suppressed.
    pub clean_gateway: bool,
    /// Routes (pool routes and the pod's routes annotation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteInfo>,
}

/// Everything allocated to one container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// One entry per NIC.
    pub nics: Vec<NicAllocation>,
    /// Probes the node's agent asks the plugin to make before it answers the runtime (its
    /// `--ip-conflict-detection` / `--gateway-detection`; a network config may add its own).
    #[serde(default, skip_serializing_if = "Detect::is_off")]
    pub detect: Detect,
}

/// IP conflict and gateway detection (Spiderpool's `enableIPConflictDetection`,
/// `enableGatewayDetection`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Detect {
    /// Probe each address (ARP / NDP duplicate address detection); one another host answers
    /// for is recorded as in conflict and replaced.
    #[serde(default)]
    pub ip_conflict: bool,
    /// Probe each gateway; ADD fails (retryably, the address released) when it does not answer.
    #[serde(default)]
    pub gateway: bool,
}

impl Detect {
    /// Neither probe.
    pub fn is_off(&self) -> bool {
        !self.ip_conflict && !self.gateway
    }

    /// Both sets of switches together.
    pub fn or(self, other: Detect) -> Detect {
        Detect {
            ip_conflict: self.ip_conflict || other.ip_conflict,
            gateway: self.gateway || other.gateway,
        }
    }
}

impl Allocation {
    /// The NIC named `ifname`.
    pub fn nic(&self, ifname: &str) -> Option<&NicAllocation> {
        self.nics.iter().find(|n| n.ifname == ifname)
    }
}

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Pool selection failed (bad annotation, no source, unknown interface).
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// Every candidate was ineligible or exhausted.
    #[error("no IPPool available for {ifname} {family} of pod {pod}: {detail}")]
    NoAvailablePool {
        /// ns/name.
        pod: String,
        /// NIC.
        ifname: String,
        /// Family.
        family: IpFamily,
        /// Every candidate and why it failed.
        detail: String,
        /// Whether at least one candidate could serve the pod but was full (pools exhausted),
        /// rather than every candidate being ineligible.
        exhausted: bool,
    },
    /// Nothing recorded for the attachment (CHECK).
    #[error("no IP is allocated to container {container_id} interface {ifname}")]
    NotFound {
        /// Container.
        container_id: String,
        /// NIC.
        ifname: String,
    },
    /// Lost the race for free addresses too often; retry later.
    #[error("gave up after {rounds} rounds of allocation conflicts with other nodes; try again")]
    TooManyConflicts {
        /// Rounds tried.
        rounds: usize,
    },
    /// The routes annotation names a gateway in no allocated subnet.
    #[error("pod {pod}: route {dst} via {gw} (annotation ipam.spidernet.io/routes): gateway is in none of the pod's subnets")]
    UnroutableRoute {
        /// ns/name.
        pod: String,
        /// Destination.
        dst: String,
        /// Gateway.
        gw: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EngineError {
    /// Whether the same request may succeed later without any change.
    pub fn is_retryable(&self) -> bool {
        match self {
            EngineError::Store(e) => e.is_retryable(),
            EngineError::TooManyConflicts { .. } => true,
            _ => false,
        }
    }
}

/// Tally kept by the engine for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    /// Successful allocations (new, not idempotent replays).
    pub allocations: u64,
    /// Idempotent replays.
    pub replays: u64,
    /// Claims refused by the store (lost races).
    pub conflicts: u64,
    /// Failed allocations.
    pub failures: u64,
    /// Released records.
    pub releases: u64,
    /// Pool listings read from the store to build or rebuild a cache.
    pub pool_reads: u64,
    /// Picks in this node's own blocks (stores with node-affine blocks).
    pub own_block_picks: u64,
    /// Picks in blocks no node owned (the write claims the block for this node).
    pub free_block_picks: u64,
    /// Picks in other nodes' blocks (borrowed: no own or free block had a free address).
    pub borrowed_picks: u64,
}
