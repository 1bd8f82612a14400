//! Kubernetes times (RFC 3339) as seconds since the epoch, read by the `time` crate: one
//! parser for pod deletion and start times.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Seconds since the epoch of an RFC 3339 time (`2026-11-27T15:20:07Z`, with or without
/// fractional seconds or an offset); `None` for anything else or a time before the epoch.
pub fn parse(s: &str) -> Option<u64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp()).ok()
}

/// The RFC 3339 time (UTC, whole seconds) of `secs` since the epoch.
pub fn format(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_back() {
        assert_eq!(format(1_795_792_807), "2026-11-27T15:20:07Z");
        assert_eq!(parse(&format(951_825_600)), Some(951_825_600));
    }

    #[test]
    fn kubernetes_times() {
        assert_eq!(parse("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse("2026-11-27T15:20:07Z"), Some(1_795_792_807));
        assert_eq!(parse("2026-11-27T15:20:07.123456Z"), Some(1_795_792_807));
        assert_eq!(parse("2026-11-27T16:20:07+01:00"), Some(1_795_792_807));
        assert_eq!(parse("yesterday"), None);
        assert_eq!(parse("1969-12-31T23:59:59Z"), None);
        assert_eq!(parse("2000-02-29T12:00:00Z"), Some(951_825_600));
        assert_eq!(parse("2026-13-01T00:00:00Z"), None);
    }
}
