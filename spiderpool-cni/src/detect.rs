//! IP conflict and gateway detection around ADD (the probes are in [`crate::probe`]): probe the
//! NIC's addresses; an address another host answers for is reported to the agent, which records
//! it as in conflict and allocates again (`POST /v1/conflict`), up to [`MAX_CONFLICTS`] times;
//! a gateway that does not answer fails the ADD, retryably, with the addresses released.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use spiderpool_core::api::{AddRequest, ConflictRequest, DelRequest, DelResponse};
use spiderpool_core::engine::{Allocation, Detect};

use crate::client;
use crate::conf::{LogLevel, NetConf};
use crate::error::{CniError, IP_CONFLICT, TRY_AGAIN_LATER};
use crate::log::Log;
use crate::probe::{self, Port};

/// Addresses in conflict one ADD replaces before it gives up.
pub const MAX_CONFLICTS: usize = 3;

enum Found {
    Clean,
    Conflict(IpAddr, String),
    GatewayDown(IpAddr, IpAddr),
}

/// Probes the attachment's addresses in the pod; answers the allocation to give the runtime.
pub fn settle(
    c: &NetConf,
    req: &AddRequest,
    mut alloc: Allocation,
    d: Detect,
    log: &Log,
    timeout: Duration,
) -> Result<Allocation, CniError> {
    let ifname = req.attachment.ifname.clone();
    let mut replaced = Vec::new();
    loop {
        let addrs: Vec<(IpAddr, Option<IpAddr>)> = alloc
            .nic(&ifname)
            .map(|n| {
                [&n.ipv4, &n.ipv6]
                    .into_iter()
                    .flatten()
                    .map(|a| (a.address.addr(), a.gateway))
                    .collect()
            })
            .unwrap_or_default();
        let ifn = ifname.clone();
        let found = probe::in_netns(Path::new(&req.netns), move || {
            let mut port = Port::open(&ifn)?;
            if d.ip_conflict {
                for (ip, _) in &addrs {
                    if let Some(mac) = port.conflict(*ip)? {
                        return Ok(Found::Conflict(*ip, mac));
                    }
                }
            }
            if d.gateway {
                for (ip, gw) in &addrs {
                    if let Some(g) = gw {
                        if !port.gateway_answers(*ip, *g)? {
                            return Ok(Found::GatewayDown(*ip, *g));
                        }
                    }
                }
            }
            Ok(Found::Clean)
        });
        let fail = |e: CniError| {
            release(c, req, log);
            Err(e)
        };
        match found {
            Ok(Found::Clean) => return Ok(alloc),
            Err(e) => {
                return fail(CniError::new(
                    TRY_AGAIN_LATER,
                    format!("IP conflict / gateway detection on {ifname} could not run: {e}"),
                ))
            }
            Ok(Found::GatewayDown(ip, gw)) => {
                return fail(CniError::new(
                    TRY_AGAIN_LATER,
                    format!(
                        "gateway {gw} does not answer on {ifname} (from {ip}: {} requests of {} ms): the address was released; check the pool's gateway and the uplink of the main plugin's master",
                        probe::GATEWAY_PROBES,
                        probe::GATEWAY_WINDOW.as_millis()
                    ),
                ))
            }
            Ok(Found::Conflict(ip, mac)) => {
                log.write(
                    LogLevel::Warn,
                    &format!("IP conflict: {ip} is answered for by {mac}; asking for another"),
                );
                replaced.push(format!("{ip} (answered by {mac})"));
                if replaced.len() > MAX_CONFLICTS {
                    return fail(CniError::new(
                        IP_CONFLICT,
                        format!(
                            "every address tried for {ifname} is in use by another host: {}; they are recorded as in conflict (spiderctl get endpoints); find the hosts or free the pool",
                            replaced.join(", ")
                        ),
                    ));
                }
                let body = ConflictRequest {
                    add: req.clone(),
                    address: ip,
                    mac,
                };
                alloc = match client::call(&c.socket, "POST", "/v1/conflict", Some(&body), timeout)
                {
                    Ok(a) => a,
                    Err(e) => return fail(CniError::from(e.into_api())),
                };
            }
        }
    }
}

/// Frees what the attachment holds after a failed detection (best effort: the runtime's DEL
/// after the failed ADD frees it as well).
fn release(c: &NetConf, req: &AddRequest, log: &Log) {
    let del = DelRequest {
        attachment: req.attachment.clone(),
        network: c.defaults.network_name.clone().unwrap_or_default(),
        // Only what this attachment holds: never the pod's records imported from Spiderpool.
        pod: None,
    };
    let out: Result<DelResponse, _> = client::call(
        &c.socket,
        "POST",
        "/v1/del",
        Some(&del),
        Duration::from_secs(30),
    );
    if let Err(e) = out {
        log.write(
            LogLevel::Warn,
            &format!("release after failed detection: {e}"),
        );
    }
}
