//! IP conflict and gateway detection, on the pod's interface before the plugin answers ADD.
//!
//! The main plugin has created the interface in `CNI_NETNS` (down, no address yet) before it
//! calls IPAM. On a thread that entered that namespace the plugin brings the interface up and
//! opens a packet socket on it, then:
//! - conflict (IPv4): an ARP probe (RFC 5227: sender address 0.0.0.0) for the address, three
//!   times 100 ms; an ARP reply or announcement from another MAC for it is a conflict;
//! - conflict (IPv6): duplicate address detection (RFC 4862: a Neighbor Solicitation from `::`
//!   to the address's solicited-node group), same timing; a Neighbor Advertisement for it is a
//!   conflict;
//! - gateway: an ARP request (IPv6: a Neighbor Solicitation) from the address for the gateway,
//!   up to three times 200 ms; no answer means the gateway is down.
//!
//! Frames are built and read here; `pnet_datalink` opens the socket. No `unsafe`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use pnet_datalink::{Channel, DataLinkReceiver, DataLinkSender, MacAddr, NetworkInterface};

/// ARP probes (or DAD solicitations) per address.
pub const CONFLICT_PROBES: u32 = 3;
/// How long each conflict probe listens.
pub const CONFLICT_WINDOW: Duration = Duration::from_millis(100);
/// Gateway requests at most.
pub const GATEWAY_PROBES: u32 = 3;
/// How long each gateway request waits.
pub const GATEWAY_WINDOW: Duration = Duration::from_millis(200);

const ETH_ARP: u16 = 0x0806;
const ETH_IPV6: u16 = 0x86dd;

/// A packet socket on one interface of the pod.
pub struct Port {
    mac: [u8; 6],
    tx: Box<dyn DataLinkSender>,
    rx: Box<dyn DataLinkReceiver>,
}

/// Runs `f` on a thread that entered the network namespace `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let path = netns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)
            .map_err(|e| format!("open the pod's network namespace {}: {e}", path.display()))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("enter the pod's network namespace {}: {e}", path.display()))?;
        f()
    })
    .join()
    .map_err(|_| "the probe thread failed".to_string())?
}

/// Brings `ifname` up (in the namespace the calling thread is in).
fn link_up(ifname: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        let nl = crate::netlink::Nl::here().map_err(|e| e.to_string())?;
        let index = nl.index(ifname).await.map_err(|e| e.to_string())?;
        nl.set_link(index, None, 0).await.map_err(|e| e.to_string())
    })
}

impl Port {
    /// Brings `ifname` up and opens a packet socket on it (in the calling thread's namespace).
    pub fn open(ifname: &str) -> Result<Port, String> {
        link_up(ifname)?;
        let iface: NetworkInterface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == ifname)
            .ok_or_else(|| format!("the pod has no interface {ifname}"))?;
        let mac = iface
            .mac
            .map(|m| m.octets())
            .ok_or_else(|| format!("{ifname} has no hardware address"))?;
        let config = pnet_datalink::Config {
            read_timeout: Some(Duration::from_millis(20)),
            promiscuous: false,
            ..Default::default()
        };
        match pnet_datalink::channel(&iface, config) {
            Ok(Channel::Ethernet(tx, rx)) => Ok(Port { mac, tx, rx }),
            Ok(_) => Err(format!("no Ethernet channel on {ifname}")),
            Err(e) => Err(format!("open a packet socket on {ifname}: {e}")),
        }
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), String> {
        match self.tx.send_to(frame, None) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(format!("send a probe: {e}")),
            None => Err("send a probe: no buffer".into()),
        }
    }

    /// Listens for `window`, answering whether `hit` matched a frame (and what it returned).
    fn listen<T>(&mut self, window: Duration, hit: impl Fn(&[u8]) -> Option<T>) -> Option<T> {
        let end = Instant::now() + window;
        while Instant::now() < end {
            if let Ok(frame) = self.rx.next() {
                if let Some(t) = hit(frame) {
                    return Some(t);
                }
            }
        }
        None
    }

    /// Whether another host answers for `ip`: its MAC (`aa:bb:...`), or `None` when none did.
    pub fn conflict(&mut self, ip: IpAddr) -> Result<Option<String>, String> {
        let me = self.mac;
        let frame = match ip {
            IpAddr::V4(a) => arp_request(me, Ipv4Addr::UNSPECIFIED, a),
            IpAddr::V6(a) => neighbor_solicit(me, Ipv6Addr::UNSPECIFIED, a),
        };
        for _ in 0..CONFLICT_PROBES {
            self.send(&frame)?;
            let found = self.listen(CONFLICT_WINDOW, |f| match ip {
                IpAddr::V4(a) => arp_from(f, a).filter(|m| *m != me),
                IpAddr::V6(a) => advert_for(f, a).filter(|m| *m != me),
            });
            if let Some(m) = found {
                return Ok(Some(mac_text(m)));
            }
        }
        Ok(None)
    }

    /// Whether `gw` answers a request from `src`.
    pub fn gateway_answers(&mut self, src: IpAddr, gw: IpAddr) -> Result<bool, String> {
        let frame = match (src, gw) {
            (IpAddr::V4(s), IpAddr::V4(g)) => arp_request(self.mac, s, g),
            (IpAddr::V6(s), IpAddr::V6(g)) => neighbor_solicit(self.mac, s, g),
            _ => return Err(format!("gateway {gw} is not of the family of {src}")),
        };
        for _ in 0..GATEWAY_PROBES {
            self.send(&frame)?;
            let seen = self.listen(GATEWAY_WINDOW, |f| match gw {
                IpAddr::V4(g) => arp_reply_from(f, g),
                IpAddr::V6(g) => advert_for(f, g),
            });
            if seen.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(m: [u8; 6]) -> String {
    MacAddr::from(m).to_string()
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(86);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An ARP request (broadcast) for `target` from `sender` (0.0.0.0: an RFC 5227 probe).
pub fn arp_request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet([0xff; 6], mac, ETH_ARP);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

fn u16_at(f: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(i)?, *f.get(i + 1)?]))
}

fn six(f: &[u8], i: usize) -> Option<[u8; 6]> {
    f.get(i..i + 6)?.try_into().ok()
}

/// The sender MAC of an ARP frame (request or reply) whose sender address is `ip`.
pub fn arp_from(f: &[u8], ip: Ipv4Addr) -> Option<[u8; 6]> {
    if u16_at(f, 12)? != ETH_ARP {
        return None;
    }
    let spa: [u8; 4] = f.get(28..32)?.try_into().ok()?;
    (Ipv4Addr::from(spa) == ip).then(|| six(f, 22)).flatten()
}

/// The sender MAC of an ARP reply from `ip`.
fn arp_reply_from(f: &[u8], ip: Ipv4Addr) -> Option<[u8; 6]> {
    (u16_at(f, 20)? == 2).then(|| arp_from(f, ip)).flatten()
}

/// The solicited-node multicast group of `a` (`ff02::1:ffXX:XXXX`).
pub fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The ICMPv6 checksum over the pseudo-header and `body`.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, body: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for c in bytes.chunks(2) {
            let hi = u32::from(c[0]) << 8;
            let lo = c.get(1).map_or(0, |b| u32::from(*b));
            sum = sum.wrapping_add(hi | lo);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(body);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).unwrap_or(0xffff))
}

/// A Neighbor Solicitation for `target` from `src` (`::`: duplicate address detection, to the
/// solicited-node group, without a source link-layer option).
pub fn neighbor_solicit(mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let group = solicited_node(target);
    let g = group.octets();
    let mut f = ethernet([0x33, 0x33, g[12], g[13], g[14], g[15]], mac, ETH_IPV6);
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    if !src.is_unspecified() {
        icmp.extend_from_slice(&[1, 1]);
        icmp.extend_from_slice(&mac);
    }
    let sum = icmpv6_checksum(src, group, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&u16::try_from(icmp.len()).unwrap_or(0).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&group.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The sender MAC of a Neighbor Advertisement for `target`.
pub fn advert_for(f: &[u8], target: Ipv6Addr) -> Option<[u8; 6]> {
    if u16_at(f, 12)? != ETH_IPV6 || *f.get(20)? != 58 || *f.get(54)? != 136 {
        return None;
    }
    let t: [u8; 16] = f.get(62..78)?.try_into().ok()?;
    (Ipv6Addr::from(t) == target).then(|| six(f, 6)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: [u8; 6] = [0x0a, 0x1b, 1, 2, 3, 4];
    const THEM: [u8; 6] = [0x0e, 0, 0, 0, 0, 9];

    #[test]
    fn arp_frames_round_trip() {
        let probe = arp_request(
            ME,
            Ipv4Addr::UNSPECIFIED,
            "10.6.168.60".parse().expect("ip"),
        );
        assert_eq!(probe.len(), 42);
        assert_eq!(&probe[0..6], &[0xff; 6]);
        // Our own probe names 0.0.0.0, not the address: not a conflict.
        assert_eq!(arp_from(&probe, "10.6.168.60".parse().expect("ip")), None);
        // Another host's reply for the address.
        let mut reply = arp_request(
            THEM,
            "10.6.168.60".parse().expect("ip"),
            Ipv4Addr::UNSPECIFIED,
        );
        reply[21] = 2;
        assert_eq!(
            arp_from(&reply, "10.6.168.60".parse().expect("ip")),
            Some(THEM)
        );
        assert_eq!(
            arp_reply_from(&reply, "10.6.168.60".parse().expect("ip")),
            Some(THEM)
        );
        assert_eq!(
            arp_from(&reply[..30], "10.6.168.60".parse().expect("ip")),
            None
        );
        assert_eq!(mac_text(THEM), "0e:00:00:00:00:09");
    }

    #[test]
    fn neighbor_solicitation_layout_and_checksum() {
        let target: Ipv6Addr = "fd00:6::61".parse().expect("ip");
        assert_eq!(
            solicited_node(target),
            "ff02::1:ff00:61".parse::<Ipv6Addr>().expect("ip")
        );
        let f = neighbor_solicit(ME, Ipv6Addr::UNSPECIFIED, target);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0xff, 0, 0, 0x61]);
        assert_eq!(f.len(), 14 + 40 + 24);
        // The checksum verifies: summing again with it in place gives zero.
        let body = &f[54..];
        assert_eq!(
            icmpv6_checksum(Ipv6Addr::UNSPECIFIED, solicited_node(target), body),
            0
        );
        // An advertisement for the target (type 136) from another host is recognised.
        let mut na = neighbor_solicit(THEM, Ipv6Addr::UNSPECIFIED, target);
        na[54] = 136;
        assert_eq!(advert_for(&na, target), Some(THEM));
        assert_eq!(
            advert_for(&f, target),
            None,
            "a solicitation is not an advertisement"
        );
        let with_option = neighbor_solicit(ME, target, "fd00:6::1".parse().expect("ip"));
        assert_eq!(with_option.len(), 14 + 40 + 32);
    }
}
