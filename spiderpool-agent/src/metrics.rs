//! Prometheus metrics with Spiderpool's names, in the text exposition format.
//!
//! Counters and histograms are plain atomics (no registry, no locks on the request path); the
//! `/metrics` handler renders them with the engine's counters and per-pool usage gauges.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use spiderpool_core::exposition::counter;
pub use spiderpool_core::exposition::Histogram;

/// Everything the agent counts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// ADD requests.
    pub allocations: AtomicU64,
    /// Failed ADD requests.
    pub allocation_failures: AtomicU64,
    /// ADDs that failed because the candidate pools were full.
    pub ip_used_out: AtomicU64,
    /// ADDs that failed because no pool was eligible.
    pub no_available_pool: AtomicU64,
    /// ADD latency.
    pub allocation_duration: Histogram,
    /// DEL requests.
    pub releases: AtomicU64,
    /// Failed DEL requests.
    pub release_failures: AtomicU64,
    /// DEL latency.
    pub release_duration: Histogram,
    /// Records freed by CNI GC.
    pub gc_released: AtomicU64,
    /// Addresses another host answered for (IP conflict detection), recorded as in conflict.
    pub ip_conflicts: AtomicU64,
    /// Records freed by the agent's pod-lifecycle GC, by reason (`lifecycle::Reason` order).
    pub lifecycle_released: [AtomicU64; 5],
    /// Releases GC tried that failed (retried next round).
    pub gc_failures: AtomicU64,
    /// Records the last GC round judged dead (freed after a second look, or, in a dry run,
    /// only reported).
    pub gc_leak_candidates: AtomicU64,
    /// Per pool, from the last GC round over this node's records: (leak candidates, addresses
    /// in conflict).
    pub gc_by_pool: std::sync::Mutex<std::collections::BTreeMap<String, (u64, u64)>>,
}

/// The reasons of [`Metrics::lifecycle_released`], in order.
pub const LIFECYCLE_REASONS: [spiderpool_core::lifecycle::Reason; 5] = {
    use spiderpool_core::lifecycle::Reason::*;
    [PodGone, PodFinished, PodTerminating, PodReplaced, NodeGone]
};

/// Per-pool usage for the gauges.
#[derive(Debug, Clone)]
pub struct PoolUsage {
    /// Pool name.
    pub pool: String,
    /// Allocated addresses.
    pub allocated: u64,
    /// totalIPCount.
    pub total: i64,
}

/// One gauge per pool.
fn pool_gauge(
    out: &mut String,
    name: &str,
    help: &str,
    pools: &[PoolUsage],
    v: fn(&PoolUsage) -> i64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for p in pools {
        let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", p.pool, v(p));
    }
}

impl Metrics {
    /// The exposition text. `conflicts` comes from the engine (claims refused by the store).
    pub fn render(&self, conflicts: u64, pools: &[PoolUsage]) -> String {
        let mut out = String::new();
        let c = |a: &AtomicU64| a.load(Relaxed);
        for (name, help, v) in [
            ("spiderpool_ipam_allocation_counts", "IPAM ADD requests.", c(&self.allocations)),
            ("spiderpool_ipam_allocation_failure_counts", "IPAM ADD requests that failed.", c(&self.allocation_failures)),
            ("spiderpool_ipam_allocation_update_ippool_conflict_counts", "Claims the lease store refused because another node took the address first.", conflicts),
            ("spiderpool_ipam_allocation_err_ip_used_out_counts", "ADDs refused because the candidate pools were exhausted.", c(&self.ip_used_out)),
            ("spiderpool_ipam_allocation_err_no_available_pool_counts", "ADDs refused because no pool was eligible.", c(&self.no_available_pool)),
            ("spiderpool_ipam_release_counts", "IPAM DEL requests.", c(&self.releases)),
            ("spiderpool_ipam_release_failure_counts", "IPAM DEL requests that failed.", c(&self.release_failures)),
            ("spiderpool_ip_gc_counts", "Addresses freed by this agent's pod-lifecycle GC (Spiderpool counts them in its controller).", self.lifecycle_released.iter().map(c).sum()),
            ("spiderpool_ip_gc_failure_counts", "GC releases that failed (retried next round).", c(&self.gc_failures)),
            ("spiderpool_ipam_cni_gc_released_counts", "Addresses freed by CNI GC (the runtime's list of live attachments).", c(&self.gc_released)),
            ("spiderpool_ipam_ip_conflict_counts", "Addresses another host answered for (IP conflict detection), recorded as in conflict and replaced.", c(&self.ip_conflicts)),
        ] {
            counter(&mut out, name, help, v);
        }
        self.allocation_duration.render(
            &mut out,
            "spiderpool_ipam_allocation_duration_seconds",
            "IPAM ADD latency.",
        );
        self.release_duration.render(
            &mut out,
            "spiderpool_ipam_release_duration_seconds",
            "IPAM DEL latency.",
        );
        let _ = writeln!(out, "# HELP spiderpool_gc_released_total Addresses freed by the agent's pod-lifecycle GC, by reason.\n# TYPE spiderpool_gc_released_total counter");
        for (i, r) in LIFECYCLE_REASONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "spiderpool_gc_released_total{{reason=\"{}\"}} {}",
                r.as_str(),
                c(&self.lifecycle_released[i])
            );
        }
        let _ = writeln!(
            out,
            "# HELP spiderpool_gc_leak_candidates Records of this node the last GC round judged dead (freed after a second look; only reported with --gc-dry-run).\n# TYPE spiderpool_gc_leak_candidates gauge\nspiderpool_gc_leak_candidates {}",
            c(&self.gc_leak_candidates)
        );
        let _ = writeln!(
            out,
            "# HELP spiderpool_total_ippool_counts SpiderIPPools this agent serves.\n# TYPE spiderpool_total_ippool_counts gauge\nspiderpool_total_ippool_counts {}",
            pools.len()
        );
        pool_gauge(
            &mut out,
            "spiderpool_ippool_allocated_ip_count",
            "Allocated addresses per pool.",
            pools,
            |p| i64::try_from(p.allocated).unwrap_or(i64::MAX),
        );
        pool_gauge(
            &mut out,
            "spiderpool_ippool_total_ip_count",
            "Addresses per pool (ips minus excludeIPs).",
            pools,
            |p| p.total,
        );
        self.render_gc_pools(&mut out, pools);
        pool_gauge(
            &mut out,
            "spiderpool_debug_ippool_total_ip_counts",
            "Addresses per pool (Spiderpool's name).",
            pools,
            |p| p.total,
        );
        pool_gauge(
            &mut out,
            "spiderpool_debug_ippool_available_ip_counts",
            "Free addresses per pool (Spiderpool's name).",
            pools,
            |p| {
                p.total
                    .saturating_sub(i64::try_from(p.allocated).unwrap_or(i64::MAX))
                    .max(0)
            },
        );
        out
    }

    /// Per pool: leak candidates and addresses in conflict from the last GC round.
    fn render_gc_pools(&self, out: &mut String, pools: &[PoolUsage]) {
        let gc = self
            .gc_by_pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (name, help, pick) in [
            (
                "spiderpool_ippool_leak_candidate_counts",
                "Records of this node per pool the last GC round judged dead.",
                0,
            ),
            (
                "spiderpool_ippool_conflict_ip_counts",
                "Addresses of this node per pool in conflict (quarantined).",
                1,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for p in pools {
                let v = gc
                    .get(&p.pool)
                    .map_or(0, |c| if pick == 0 { c.0 } else { c.1 });
                let _ = writeln!(out, "{name}{{pool=\"{}\"}} {v}", p.pool);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.allocations.fetch_add(3, Relaxed);
        m.allocation_duration
            .observe(std::time::Duration::from_millis(2));
        let text = m.render(
            7,
            &[PoolUsage {
                pool: "a".into(),
                allocated: 2,
                total: 10,
            }],
        );
        assert!(
            text.contains("# TYPE spiderpool_ipam_allocation_counts_total counter\nspiderpool_ipam_allocation_counts_total 3\n"),
            "{text}"
        );
        assert!(text.contains("spiderpool_ipam_allocation_update_ippool_conflict_counts_total 7\n"));
        assert!(text.contains("spiderpool_debug_ippool_available_ip_counts{pool=\"a\"} 8\n"));
        assert!(text.contains("spiderpool_total_ippool_counts 1\n"));
        assert!(text.contains("spiderpool_ippool_leak_candidate_counts{pool=\"a\"} 0\n"));
        assert!(
            text.contains("spiderpool_ipam_allocation_duration_seconds_bucket{le=\"0.001\"} 0\n")
        );
        assert!(
            text.contains("spiderpool_ipam_allocation_duration_seconds_bucket{le=\"0.0025\"} 1\n")
        );
        assert!(text.contains("spiderpool_ipam_allocation_duration_seconds_count 1\n"));
        assert!(text.contains("spiderpool_ippool_allocated_ip_count{pool=\"a\"} 2\n"));
    }
}
