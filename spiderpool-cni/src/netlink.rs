//! Netlink for the coordinator, through the rust-netlink crates (`rtnetlink`): links,
//! addresses, routes and rules in the node's namespace or a pod's. A pod's namespace is entered
//! on a thread of its own (`setns` affects only the calling thread), where the netlink socket is
//! opened: a socket belongs to the namespace it was created in, so the rest runs on the
//! plugin's runtime as for the node.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// errno values the coordinator treats as "already so".
pub const EEXIST: i32 = 17;
/// No such file, route or rule.
pub const ENOENT: i32 = 2;
/// No such process (the kernel's answer for a missing route).
pub const ESRCH: i32 = 3;
/// No such device.
pub const ENODEV: i32 = 19;

/// A netlink failure: what was being done and the kernel's errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NlError {
    /// What the coordinator was doing.
    pub what: String,
    /// The kernel's errno (positive), when it answered with one.
    pub errno: Option<i32>,
    /// The error as text.
    pub text: String,
}

impl std::fmt::Display for NlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.text)
    }
}

impl NlError {
    fn new(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        NlError {
            what: what.into(),
            errno: None,
            text: e.to_string(),
        }
    }
    fn netlink(what: impl Into<String>, e: rtnetlink::Error) -> Self {
        let errno = match &e {
            rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
            _ => None,
        };
        NlError {
            what: what.into(),
            errno,
            text: e.to_string(),
        }
    }
    /// Whether the kernel said the object exists already.
    pub fn exists(&self) -> bool {
        self.errno == Some(EEXIST)
    }
    /// Whether the kernel said there is no such object.
    pub fn missing(&self) -> bool {
        matches!(self.errno, Some(ENOENT | ESRCH | ENODEV))
    }
}

/// Result of a netlink step.
pub type NlResult<T> = Result<T, NlError>;

/// `r` as a step's result, where the kernel saying the object is gone already is success.
fn gone_ok(r: Result<(), rtnetlink::Error>, what: impl Into<String>) -> NlResult<()> {
    r.or_else(|e| {
        let e = NlError::netlink(what, e);
        if e.missing() {
            Ok(())
        } else {
            Err(e)
        }
    })
}

/// `r` as a step's result, where the kernel saying the object exists already is success.
fn exists_ok(r: Result<(), rtnetlink::Error>, what: impl Into<String>) -> NlResult<()> {
    r.or_else(|e| {
        let e = NlError::netlink(what, e);
        if e.exists() {
            Ok(())
        } else {
            Err(e)
        }
    })
}

/// A route as the coordinator reads it.
#[derive(Debug, Clone)]
pub struct Route {
    /// Destination with its prefix (`0.0.0.0/0` for a default route).
    pub dst: IpNet,
    /// Output interface.
    pub oif: Option<u32>,
    /// Table.
    pub table: u32,
    /// The message, for deleting or copying it.
    pub msg: RouteMessage,
}

/// A routing rule as the coordinator reads it.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `to` prefix.
    pub dst: Option<IpNet>,
    /// `from` prefix.
    pub src: Option<IpNet>,
    /// `lookup` table.
    pub table: u32,
    /// The message, for deleting it.
    pub msg: RuleMessage,
}

/// A netlink connection bound to one network namespace.
pub struct Nl {
    h: Handle,
}

fn net(ip: IpAddr, len: u8) -> Option<IpNet> {
    IpNet::new(ip, len).ok()
}

/// The interface's alias (`ip link set ... alias`).
pub fn link_alias(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(n) => Some(n.as_str()),
        _ => None,
    })
}

impl Nl {
    /// A connection in the namespace the plugin runs in (the node's).
    pub fn here() -> NlResult<Nl> {
        let (conn, h, _) =
            rtnetlink::new_connection().map_err(|e| NlError::new("open netlink", e))?;
        tokio::spawn(conn);
        Ok(Nl { h })
    }

    /// A connection in the namespace `netns` (a path such as `/var/run/netns/NAME`).
    pub fn enter(netns: &Path) -> NlResult<Nl> {
        let rt = tokio::runtime::Handle::current();
        let path = netns.to_path_buf();
        let opened = std::thread::spawn(move || {
            enter_thread(&path)?;
            let _g = rt.enter();
            rtnetlink::new_connection()
                .map_err(|e| NlError::new(format!("open netlink in {}", path.display()), e))
        })
        .join()
        .map_err(|_| NlError::new("enter the network namespace", "the thread failed"))??;
        let (conn, h, _) = opened;
        tokio::spawn(conn);
        Ok(Nl { h })
    }

    /// The link called `name`, if there is one.
    pub async fn link(&self, name: &str) -> NlResult<Option<LinkMessage>> {
        match self
            .h
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
        {
            Ok(m) => Ok(m),
            Err(e) => {
                let e = NlError::netlink(format!("read link {name}"), e);
                if e.missing() {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The index of the link called `name`, or an error saying it is missing.
    pub async fn index(&self, name: &str) -> NlResult<u32> {
        self.link(name)
            .await?
            .map(|m| m.header.index)
            .ok_or_else(|| NlError {
                what: format!("find link {name}"),
                errno: Some(ENODEV),
                text: "no such interface".into(),
            })
    }

    /// Creates the veth pair `name` / `peer` here, with `alias` on `name` (set after the
    /// creation: the kernel takes no alias in a new link's message).
    pub async fn add_veth(&self, name: &str, peer: &str, alias: &str) -> NlResult<()> {
        let msg = LinkVeth::new(name, peer).build();
        self.h
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| NlError::netlink(format!("create veth pair {name}/{peer}"), e))?;
        let index = self.index(name).await?;
        let msg = LinkUnspec::new_with_index(index).alias(alias).build();
        self.h
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NlError::netlink(format!("set the alias of {name}"), e))
    }

    /// Moves link `index` into the namespace at `netns`, renamed `new_name`.
    pub async fn move_link(&self, index: u32, netns: &Path, new_name: &str) -> NlResult<()> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(netns)
            .map_err(|e| NlError::new(format!("open {}", netns.display()), e))?;
        let msg = LinkUnspec::new_with_index(index)
            .setns_by_fd(f.as_raw_fd())
            .name(new_name)
            .build();
        let r = self.h.link().set(msg).execute().await;
        drop(f);
        r.map_err(|e| NlError::netlink(format!("move link {index} into the pod as {new_name}"), e))
    }

    /// Sets link `index` up, and its MAC and transmit queue length when given.
    pub async fn set_link(&self, index: u32, mac: Option<[u8; 6]>, txq: u32) -> NlResult<()> {
        let mut b = LinkUnspec::new_with_index(index).up();
        if let Some(m) = mac {
            b = b.address(m.to_vec());
        }
        if txq > 0 {
            b = b.txqueuelen(txq);
        }
        self.h
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(|e| NlError::netlink(format!("set link {index} up"), e))
    }

    /// Deletes link `index` (a veth pair goes as a whole).
    pub async fn del_link(&self, index: u32) -> NlResult<()> {
        gone_ok(
            self.h.link().del(index).execute().await,
            format!("delete link {index}"),
        )
    }

    /// Addresses of every link (`index`, address with prefix, scope is global).
    pub async fn addresses(&self) -> NlResult<Vec<(u32, IpNet, bool)>> {
        let list: Vec<AddressMessage> = self
            .h
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::netlink("list addresses", e))?;
        Ok(list
            .into_iter()
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })?;
                let global =
                    m.header.scope == rtnetlink::packet_route::address::AddressScope::Universe;
                Some((m.header.index, net(ip, m.header.prefix_len)?, global))
            })
            .collect())
    }

    /// Adds `addr` to link `index`, without duplicate address detection (an address of our
    /// own on a point-to-point veth).
    pub async fn add_address(&self, index: u32, addr: IpNet) -> NlResult<()> {
        let mut req = self.h.address().add(index, addr.addr(), addr.prefix_len());
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        exists_ok(req.execute().await, format!("add {addr} to link {index}"))
    }

    /// Every route of one family, all tables.
    pub async fn routes(&self, v6: bool) -> NlResult<Vec<Route>> {
        let probe = if v6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        let list: Vec<RouteMessage> = self
            .h
            .route()
            .get(probe)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::netlink("list routes", e))?;
        let any: IpAddr = if v6 {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        };
        Ok(list
            .into_iter()
            .filter(|m| m.header.kind == RouteType::Unicast)
            .filter_map(|m| {
                let mut dst = any;
                let mut oif = None;
                let mut table = u32::from(m.header.table);
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = (*ip).into(),
                        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = (*ip).into(),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Table(t) => table = *t,
                        _ => {}
                    }
                }
                Some(Route {
                    dst: net(dst, m.header.destination_prefix_length)?,
                    oif,
                    table,
                    msg: m,
                })
            })
            .collect())
    }

    /// Adds (or replaces) a route to `dst` through link `oif` in `table`: by `gw` when given,
    /// else on the link; with `src` as the preferred source when given.
    pub async fn add_route(
        &self,
        dst: IpNet,
        oif: u32,
        gw: Option<IpAddr>,
        src: Option<IpAddr>,
        table: u32,
    ) -> NlResult<()> {
        let what = || format!("add route {dst} via link {oif} in table {table}");
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| NlError::new(what(), e))?
            .output_interface(oif)
            .table_id(table);
        b = match gw {
            Some(g) => b.gateway(g).map_err(|e| NlError::new(what(), e))?,
            None => b.scope(RouteScope::Link),
        };
        if let Some(s) = src {
            b = b.pref_source(s).map_err(|e| NlError::new(what(), e))?;
        }
        self.h
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(|e| NlError::netlink(what(), e))
    }

    /// Adds a copy of `msg` (a route read here) in `table`.
    pub async fn copy_route(&self, mut msg: RouteMessage, table: u32) -> NlResult<()> {
        msg.attributes
            .retain(|a| !matches!(a, RouteAttribute::Table(_)));
        msg.attributes.push(RouteAttribute::Table(table));
        msg.header.table = u8::try_from(table).unwrap_or(252);
        self.h
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| NlError::netlink(format!("copy a route into table {table}"), e))
    }

    /// Deletes a route read here; a route already gone is fine.
    pub async fn del_route(&self, msg: RouteMessage) -> NlResult<()> {
        gone_ok(self.h.route().del(msg).execute().await, "delete a route")
    }

    /// Every rule, both families.
    pub async fn rules(&self) -> NlResult<Vec<Rule>> {
        let mut out = Vec::new();
        for v in [IpVersion::V4, IpVersion::V6] {
            let list: Vec<RuleMessage> = self
                .h
                .rule()
                .get(v)
                .execute()
                .try_collect()
                .await
                .map_err(|e| NlError::netlink("list rules", e))?;
            for m in list {
                let mut r = Rule {
                    dst: None,
                    src: None,
                    table: u32::from(m.header.table),
                    msg: m.clone(),
                };
                for a in &m.attributes {
                    match a {
                        RuleAttribute::Destination(ip) => r.dst = net(*ip, m.header.dst_len),
                        RuleAttribute::Source(ip) => r.src = net(*ip, m.header.src_len),
                        RuleAttribute::Table(t) => r.table = *t,
                        _ => {}
                    }
                }
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Adds the rule `to dst lookup table` (`to: true`) or `from dst lookup table`, unless an
    /// equal one exists.
    pub async fn add_rule(&self, to: bool, prefix: IpNet, table: u32) -> NlResult<()> {
        let have = self.rules().await?;
        let same = |r: &Rule| {
            r.table == table
                && if to {
                    r.dst == Some(prefix) && r.src.is_none()
                } else {
                    r.src == Some(prefix) && r.dst.is_none()
                }
        };
        if have.iter().any(same) {
            return Ok(());
        }
        let what = || {
            format!(
                "add rule {} {prefix} lookup {table}",
                if to { "to" } else { "from" }
            )
        };
        // No priority: the kernel puts the rule just before the first one after `local`, ahead of
        // `main`.
        let req = self
            .h
            .rule()
            .add()
            .table_id(table)
            .action(rtnetlink::packet_route::rule::RuleAction::ToTable);
        let r = match (prefix.addr(), to) {
            (IpAddr::V4(a), true) => {
                req.v4()
                    .destination_prefix(a, prefix.prefix_len())
                    .execute()
                    .await
            }
            (IpAddr::V4(a), false) => {
                req.v4()
                    .source_prefix(a, prefix.prefix_len())
                    .execute()
                    .await
            }
            (IpAddr::V6(a), true) => {
                req.v6()
                    .destination_prefix(a, prefix.prefix_len())
                    .execute()
                    .await
            }
            (IpAddr::V6(a), false) => {
                req.v6()
                    .source_prefix(a, prefix.prefix_len())
                    .execute()
                    .await
            }
        };
        exists_ok(r, what())
    }

    /// Deletes a rule read here; a rule already gone is fine.
    pub async fn del_rule(&self, msg: RuleMessage) -> NlResult<()> {
        gone_ok(self.h.rule().del(msg).execute().await, "delete a rule")
    }
}

fn enter_thread(path: &PathBuf) -> NlResult<()> {
    let f = std::fs::File::open(path)
        .map_err(|e| NlError::new(format!("open the network namespace {}", path.display()), e))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| NlError::new(format!("enter the network namespace {}", path.display()), e))
}

/// Writes sysctl `key` (`net/ipv4/conf/all/rp_filter`) in the namespace `netns`, on a thread
/// that entered it (`/proc/sys/net` is the calling thread's namespace).
pub fn sysctl_in(netns: &Path, key: &str, value: &str) -> NlResult<()> {
    let path = netns.to_path_buf();
    let key = key.to_string();
    let value = value.to_string();
    std::thread::spawn(move || {
        enter_thread(&path)?;
        std::fs::write(format!("/proc/sys/{key}"), &value)
            .map_err(|e| NlError::new(format!("set {key} = {value} in the pod"), e))
    })
    .join()
    .map_err(|_| NlError::new("set a sysctl in the pod", "the thread failed"))?
}
