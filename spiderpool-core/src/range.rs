//! IP ranges as intervals on `u128`.
//!
//! Spiderpool writes address ranges as strings (`10.6.168.60`, `10.6.168.60-10.6.168.69`,
//! `fd00::10-fd00::ff`). This module parses and prints them, and keeps sets of them as sorted,
//! merged, inclusive intervals so that a `/8` or a `/64` costs a few words, never a list of addresses.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which IP families are wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Families {
    /// IPv4 wanted.
    pub ipv4: bool,
    /// IPv6 wanted.
    pub ipv6: bool,
}

impl Default for Families {
    fn default() -> Self {
        Families {
            ipv4: true,
            ipv6: false,
        }
    }
}

/// The IP version of an address, range, pool or request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// Spiderpool's `ipVersion` number (4 or 6).
    pub fn version(self) -> u8 {
        match self {
            IpFamily::V4 => 4,
            IpFamily::V6 => 6,
        }
    }

    /// The family for an `ipVersion` number.
    pub fn from_version(v: u8) -> Option<Self> {
        match v {
            4 => Some(IpFamily::V4),
            6 => Some(IpFamily::V6),
            _ => None,
        }
    }

    /// The largest address of the family as a `u128`.
    pub fn max_value(self) -> u128 {
        match self {
            IpFamily::V4 => u32::MAX as u128,
            IpFamily::V6 => u128::MAX,
        }
    }

    /// Number of bits in an address of this family.
    pub fn bits(self) -> u8 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for IpFamily {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IpFamily".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "integer", "enum": [4, 6]})
    }
}

impl Serialize for IpFamily {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.version())
    }
}

impl<'de> Deserialize<'de> for IpFamily {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        u8::try_from(v)
            .ok()
            .and_then(IpFamily::from_version)
            .ok_or_else(|| serde::de::Error::custom(format!("ipVersion must be 4 or 6, not {v}")))
    }
}

/// An address as a number.
pub fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// A number as an address of `family`, or `None` when it does not fit.
pub fn u128_to_ip(family: IpFamily, n: u128) -> Option<IpAddr> {
    match family {
        IpFamily::V4 => u32::try_from(n).ok().map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        IpFamily::V6 => Some(IpAddr::V6(Ipv6Addr::from(n))),
    }
}

/// Why a range string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Empty entry.
    #[error("empty IP range")]
    Empty,
    /// Whitespace inside an entry.
    #[error("invalid IP range '{0}': must not contain spaces")]
    Whitespace(String),
    /// A CIDR was given where a range is expected.
    #[error("invalid IP range '{0}': CIDR notation is not allowed, write 'first-last'")]
    Cidr(String),
    /// More than one dash.
    #[error("invalid IP range '{0}': use exactly one '-' between the first and last address")]
    TooManyDashes(String),
    /// Not an address.
    #[error("invalid IP range '{range}': '{part}' is not an IP address")]
    NotAnAddress {
        /// The whole entry.
        range: String,
        /// The part that is not an address.
        part: String,
    },
    /// Start and end of different families.
    #[error("invalid IP range '{0}': start and end must be the same IP version")]
    MixedFamily(String),
    /// Start after end.
    #[error("invalid IP range '{0}': start must not be greater than end")]
    Reversed(String),
    /// A range of the other family than expected.
    #[error("IP range '{range}' is not {expected}")]
    WrongFamily {
        /// The entry.
        range: String,
        /// The family it should have had.
        expected: IpFamily,
    },
}

/// One inclusive interval of addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpRange {
    family: IpFamily,
    start: u128,
    end: u128,
}

impl IpRange {
    /// A range from `start` to `end` inclusive; `None` when the families differ or start > end.
    pub fn new(start: IpAddr, end: IpAddr) -> Option<Self> {
        let family = IpFamily::of(&start);
        if family != IpFamily::of(&end) {
            return None;
        }
        let (s, e) = (ip_to_u128(start), ip_to_u128(end));
        (s <= e).then_some(IpRange {
            family,
            start: s,
            end: e,
        })
    }

    /// A range of one address.
    pub fn single(ip: IpAddr) -> Self {
        let n = ip_to_u128(ip);
        IpRange {
            family: IpFamily::of(&ip),
            start: n,
            end: n,
        }
    }

    /// A range from raw numbers; `None` if out of the family's space or reversed.
    pub fn from_u128(family: IpFamily, start: u128, end: u128) -> Option<Self> {
        (start <= end && end <= family.max_value()).then_some(IpRange { family, start, end })
    }

    /// The whole of a CIDR, network and broadcast addresses included.
    pub fn of_net(net: &ipnet::IpNet) -> Self {
        IpRange {
            family: IpFamily::of(&net.network()),
            start: ip_to_u128(net.network()),
            end: ip_to_u128(net.broadcast()),
        }
    }

    /// The family.
    pub fn family(&self) -> IpFamily {
        self.family
    }
    /// First address as a number.
    pub fn start(&self) -> u128 {
        self.start
    }
    /// Last address as a number.
    pub fn end(&self) -> u128 {
        self.end
    }
    /// First address.
    pub fn first(&self) -> IpAddr {
        u128_to_ip(self.family, self.start).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
    /// Last address.
    pub fn last(&self) -> IpAddr {
        u128_to_ip(self.family, self.end).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
    /// Number of addresses, saturating at `u128::MAX` (only the whole IPv6 space overflows).
    pub fn count(&self) -> u128 {
        (self.end - self.start).saturating_add(1)
    }
    /// Whether `ip` lies inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        IpFamily::of(&ip) == self.family && {
            let n = ip_to_u128(ip);
            self.start <= n && n <= self.end
        }
    }

    /// Parses one `ips`/`excludeIPs` entry and checks its family.
    pub fn parse_family(s: &str, family: IpFamily) -> Result<Self, RangeError> {
        let r: IpRange = s.parse()?;
        if r.family != family {
            return Err(RangeError::WrongFamily {
                range: s.to_string(),
                expected: family,
            });
        }
        Ok(r)
    }
}

impl FromStr for IpRange {
    type Err = RangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(RangeError::Empty);
        }
        if s.chars().any(char::is_whitespace) {
            return Err(RangeError::Whitespace(s.to_string()));
        }
        if s.contains('/') {
            return Err(RangeError::Cidr(s.to_string()));
        }
        let parse = |part: &str| {
            part.parse::<IpAddr>()
                .map_err(|_| RangeError::NotAnAddress {
                    range: s.to_string(),
                    part: part.to_string(),
                })
        };
        let mut parts = s.split('-');
        let first = parts.next().unwrap_or_default();
        let second = parts.next();
        if parts.next().is_some() {
            return Err(RangeError::TooManyDashes(s.to_string()));
        }
        let start = parse(first)?;
        let end = match second {
            Some(p) => parse(p)?,
            None => start,
        };
        if IpFamily::of(&start) != IpFamily::of(&end) {
            return Err(RangeError::MixedFamily(s.to_string()));
        }
        IpRange::new(start, end).ok_or_else(|| RangeError::Reversed(s.to_string()))
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.first())
        } else {
            write!(f, "{}-{}", self.first(), self.last())
        }
    }
}

/// A set of addresses of one family: sorted, merged (neither overlapping nor adjacent) intervals,
/// with prefix counts for O(log n) index <-> address conversion.
///
/// ```
/// use spiderpool_core::range::{IpFamily, IpSet};
/// let ips = IpSet::parse(IpFamily::V4, &["10.6.168.60-10.6.168.69", "10.6.168.70"]).unwrap();
/// let excluded = IpSet::parse(IpFamily::V4, &["10.6.168.65"]).unwrap();
/// let free = ips.subtract(&excluded);
/// assert_eq!(free.to_strings(), ["10.6.168.60-10.6.168.64", "10.6.168.66-10.6.168.70"]);
/// assert_eq!(free.count(), 10);
/// assert_eq!(free.nth_ip(5).unwrap().to_string(), "10.6.168.66");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpSet {
    family: IpFamily,
    /// Inclusive `(start, end)` pairs, sorted, with a gap of at least one address between them.
    ranges: Vec<(u128, u128)>,
    /// `prefix[i]` = number of addresses in `ranges[..i]`, saturating.
    prefix: Vec<u128>,
}

impl IpSet {
    /// The empty set.
    pub fn empty(family: IpFamily) -> Self {
        IpSet {
            family,
            ranges: Vec::new(),
            prefix: Vec::new(),
        }
    }

    /// The union of `ranges`; ranges of another family are ignored.
    pub fn from_ranges<I: IntoIterator<Item = IpRange>>(family: IpFamily, ranges: I) -> Self {
        let mut v: Vec<(u128, u128)> = ranges
            .into_iter()
            .filter(|r| r.family == family)
            .map(|r| (r.start, r.end))
            .collect();
        v.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match merged.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Self::from_sorted(family, merged)
    }

    /// Parses `ips`-style entries of one family into a set.
    pub fn parse<S: AsRef<str>>(family: IpFamily, entries: &[S]) -> Result<Self, RangeError> {
        let ranges = entries
            .iter()
            .map(|e| IpRange::parse_family(e.as_ref(), family))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_ranges(family, ranges))
    }

    fn from_sorted(family: IpFamily, ranges: Vec<(u128, u128)>) -> Self {
        let mut prefix = Vec::with_capacity(ranges.len());
        let mut acc: u128 = 0;
        for (s, e) in &ranges {
            prefix.push(acc);
            acc = acc.saturating_add((e - s).saturating_add(1));
        }
        IpSet {
            family,
            ranges,
            prefix,
        }
    }

    /// The family.
    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// Whether the set holds no address.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The merged intervals.
    pub fn ranges(&self) -> impl ExactSizeIterator<Item = IpRange> + '_ {
        let family = self.family;
        self.ranges
            .iter()
            .map(move |&(start, end)| IpRange { family, start, end })
    }

    /// The merged intervals as the strings Spiderpool writes (`a` or `a-b`).
    pub fn to_strings(&self) -> Vec<String> {
        self.ranges().map(|r| r.to_string()).collect()
    }

    /// Exact number of addresses, saturating at `u128::MAX`.
    pub fn count(&self) -> u128 {
        match (self.prefix.last(), self.ranges.last()) {
            (Some(p), Some((s, e))) => p.saturating_add((e - s).saturating_add(1)),
            _ => 0,
        }
    }

    /// Number of addresses as Spiderpool's `totalIPCount`: saturates at `i64::MAX`.
    pub fn count_i64(&self) -> i64 {
        i64::try_from(self.count()).unwrap_or(i64::MAX)
    }

    /// Whether the set contains the numeric address `n`.
    pub fn contains_u128(&self, n: u128) -> bool {
        self.locate(n).is_some()
    }

    /// Whether the set contains `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        IpFamily::of(&ip) == self.family && self.contains_u128(ip_to_u128(ip))
    }

    /// Whether every address of `r` is in the set.
    pub fn contains_range(&self, r: &IpRange) -> bool {
        r.family == self.family
            && self
                .locate(r.start)
                .is_some_and(|i| self.ranges[i].1 >= r.end)
    }

    /// Index of the interval holding `n`.
    fn locate(&self, n: u128) -> Option<usize> {
        let i = self.ranges.partition_point(|&(s, _)| s <= n);
        let i = i.checked_sub(1)?;
        (self.ranges[i].1 >= n).then_some(i)
    }

    /// The `index`-th address (0-based) in ascending order.
    pub fn nth(&self, index: u128) -> Option<u128> {
        let i = self
            .prefix
            .partition_point(|&p| p <= index)
            .checked_sub(1)?;
        let (s, e) = self.ranges[i];
        let n = s.checked_add(index - self.prefix[i])?;
        (n <= e).then_some(n)
    }

    /// The `index`-th address as an [`IpAddr`].
    pub fn nth_ip(&self, index: u128) -> Option<IpAddr> {
        self.nth(index).and_then(|n| u128_to_ip(self.family, n))
    }

    /// Position of `n` in ascending order, if present.
    pub fn index_of(&self, n: u128) -> Option<u128> {
        let i = self.locate(n)?;
        Some(self.prefix[i] + (n - self.ranges[i].0))
    }

    /// Position of the first address of the set at or above `n`, if any.
    pub fn index_at_or_after(&self, n: u128) -> Option<u128> {
        let i = self.ranges.partition_point(|&(_, e)| e < n);
        let (s, _) = *self.ranges.get(i)?;
        Some(self.prefix[i] + n.saturating_sub(s))
    }

    /// Position of `ip` in ascending order, if present.
    pub fn index_of_ip(&self, ip: IpAddr) -> Option<u128> {
        if IpFamily::of(&ip) != self.family {
            return None;
        }
        self.index_of(ip_to_u128(ip))
    }

    /// Addresses in either set.
    pub fn union(&self, other: &IpSet) -> IpSet {
        IpSet::from_ranges(self.family, self.ranges().chain(other.ranges()))
    }

    /// Addresses in `self` but not in `other`. Linear in the number of intervals.
    pub fn subtract(&self, other: &IpSet) -> IpSet {
        if other.family != self.family || other.is_empty() {
            return self.clone();
        }
        let mut out = Vec::with_capacity(self.ranges.len());
        let mut j = 0;
        for &(s, e) in &self.ranges {
            let mut cur = s;
            let mut done = false;
            // Skip holes that end before this interval.
            while j < other.ranges.len() && other.ranges[j].1 < cur {
                j += 1;
            }
            let mut k = j;
            while k < other.ranges.len() && other.ranges[k].0 <= e {
                let (hs, he) = other.ranges[k];
                if hs > cur {
                    out.push((cur, hs - 1));
                }
                if he >= e {
                    done = true;
                    break;
                }
                cur = he + 1;
                k += 1;
            }
            if !done {
                out.push((cur, e));
            }
        }
        IpSet::from_sorted(self.family, out)
    }

    /// Addresses in both sets.
    pub fn intersect(&self, other: &IpSet) -> IpSet {
        if other.family != self.family {
            return IpSet::empty(self.family);
        }
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a0, a1) = self.ranges[i];
            let (b0, b1) = other.ranges[j];
            let (lo, hi) = (a0.max(b0), a1.min(b1));
            if lo <= hi {
                out.push((lo, hi));
            }
            if a1 < b1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        IpSet::from_sorted(self.family, out)
    }

    /// Whether the sets share at least one address.
    pub fn overlaps(&self, other: &IpSet) -> bool {
        !self.intersect(other).is_empty()
    }
}

impl fmt::Display for IpSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_strings().join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpSet {
        let entries: Vec<&str> = s.split(',').filter(|e| !e.is_empty()).collect();
        IpSet::parse(IpFamily::V4, &entries).expect("valid test ranges")
    }

    #[test]
    fn parses_single_range_and_v6() {
        let r: IpRange = "10.6.168.60-10.6.168.69".parse().expect("range");
        assert_eq!(r.count(), 10);
        assert_eq!(r.to_string(), "10.6.168.60-10.6.168.69");
        let r: IpRange = "10.6.168.60".parse().expect("single");
        assert_eq!(r.count(), 1);
        assert_eq!(r.to_string(), "10.6.168.60");
        let r: IpRange = "fd00::10-fd00::ff".parse().expect("v6");
        assert_eq!(r.family(), IpFamily::V6);
        assert_eq!(r.count(), 0xf0);
    }

    #[test]
    fn refuses_bad_ranges_with_reasons() {
        let cases = [
            ("", RangeError::Empty),
            (
                "10.0.0.1 -10.0.0.2",
                RangeError::Whitespace("10.0.0.1 -10.0.0.2".into()),
            ),
            ("10.0.0.0/24", RangeError::Cidr("10.0.0.0/24".into())),
            (
                "10.0.0.1-10.0.0.2-10.0.0.3",
                RangeError::TooManyDashes("10.0.0.1-10.0.0.2-10.0.0.3".into()),
            ),
            (
                "10.0.0.1-fd00::1",
                RangeError::MixedFamily("10.0.0.1-fd00::1".into()),
            ),
            (
                "10.0.0.9-10.0.0.1",
                RangeError::Reversed("10.0.0.9-10.0.0.1".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<IpRange>(), Err(want), "input {input:?}");
        }
        assert!(matches!(
            "10.0.0.x".parse::<IpRange>(),
            Err(RangeError::NotAnAddress { part, .. }) if part == "10.0.0.x"
        ));
        assert!(matches!(
            IpRange::parse_family("fd00::1", IpFamily::V4),
            Err(RangeError::WrongFamily { .. })
        ));
    }

    #[test]
    fn merges_overlapping_and_adjacent() {
        let s = v4("10.0.0.5-10.0.0.9,10.0.0.1-10.0.0.4,10.0.0.8-10.0.0.12,10.0.0.20");
        assert_eq!(s.to_strings(), vec!["10.0.0.1-10.0.0.12", "10.0.0.20"]);
        assert_eq!(s.count(), 13);
    }

    #[test]
    fn subtract_and_index() {
        let s = v4("10.0.0.0-10.0.0.255").subtract(&v4("10.0.0.0,10.0.0.1,10.0.0.100-10.0.0.110"));
        assert_eq!(
            s.to_strings(),
            vec!["10.0.0.2-10.0.0.99", "10.0.0.111-10.0.0.255"]
        );
        assert_eq!(s.count(), 98 + 145);
        let ip: IpAddr = "10.0.0.111".parse().expect("ip");
        assert_eq!(s.index_of_ip(ip), Some(98));
        assert_eq!(s.nth_ip(98), Some(ip));
        assert_eq!(s.nth(243), None);
        assert_eq!(s.index_of_ip("10.0.0.100".parse().expect("ip")), None);
    }

    #[test]
    fn huge_v6_counts_saturate_for_spiderpool() {
        let all = IpSet::parse(
            IpFamily::V6,
            &["::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"],
        )
        .expect("whole space");
        assert_eq!(all.count(), u128::MAX);
        assert_eq!(all.count_i64(), i64::MAX);
        let small = IpSet::parse(IpFamily::V6, &["fd00::-fd00::ffff:ffff:ffff:ffff"]).expect("/64");
        assert_eq!(small.count(), 1u128 << 64);
        assert_eq!(small.count_i64(), i64::MAX);
    }

    #[test]
    fn intersect_and_overlap() {
        let a = v4("10.0.0.1-10.0.0.10,10.0.0.20-10.0.0.30");
        let b = v4("10.0.0.5-10.0.0.25");
        assert_eq!(
            a.intersect(&b).to_strings(),
            vec!["10.0.0.5-10.0.0.10", "10.0.0.20-10.0.0.25"]
        );
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&v4("10.0.0.11-10.0.0.19")));
    }
}
