//! The controller's metrics (`--metrics-addr`), in the text exposition format: admission
//! reviews and their latency, what the auto-pool reconcile did, the pools and subnets the
//! leader saw. Gauges of the reconcile are the leader's (other replicas report 0 and
//! `spiderpool_controller_leader 0`: query with `max`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use spiderpool_core::exposition::{counter, gauge, Histogram};

/// Everything the controller counts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Admission reviews allowed.
    pub webhook_allowed: AtomicU64,
    /// Admission reviews refused.
    pub webhook_refused: AtomicU64,
    /// Admission review latency.
    pub webhook_duration: Histogram,
    /// Auto-pools made or grown.
    pub autopool_grown: AtomicU64,
    /// Auto-pools shrunk.
    pub autopool_shrunk: AtomicU64,
    /// Auto-pools reclaimed (their application is gone).
    pub autopool_reclaimed: AtomicU64,
    /// Reconcile rounds that failed.
    pub reconcile_failures: AtomicU64,
    /// Pool Events posted (`Exhausted`, `NearlyExhausted`).
    pub pool_events: AtomicU64,
    /// SpiderIPPools the leader saw last round.
    pub pools: AtomicI64,
    /// SpiderSubnets the leader saw last round.
    pub subnets: AtomicI64,
    /// Pools whose `Valid` condition is False.
    pub invalid_pools: AtomicI64,
    /// Pools whose `Exhausted` condition is True.
    pub exhausted_pools: AtomicI64,
    /// 1 while this replica leads.
    pub leader: AtomicI64,
}

/// The controller's metrics.
pub static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(Metrics::default);

impl Metrics {
    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let c = |a: &AtomicU64| a.load(Relaxed);
        let g = |a: &AtomicI64| a.load(Relaxed);
        for (name, help, v) in [
            (
                "spiderpool_webhook_allowed_counts",
                "Admission reviews allowed.",
                c(&self.webhook_allowed),
            ),
            (
                "spiderpool_webhook_refused_counts",
                "Admission reviews refused (the message says why).",
                c(&self.webhook_refused),
            ),
            (
                "spiderpool_auto_pool_grown_counts",
                "Auto-pools made or grown by the reconcile.",
                c(&self.autopool_grown),
            ),
            (
                "spiderpool_auto_pool_shrunk_counts",
                "Auto-pools shrunk by the reconcile.",
                c(&self.autopool_shrunk),
            ),
            (
                "spiderpool_auto_pool_reclaimed_counts",
                "Auto-pools deleted because their application is gone.",
                c(&self.autopool_reclaimed),
            ),
            (
                "spiderpool_reconcile_failure_counts",
                "Reconcile rounds that failed (retried next round).",
                c(&self.reconcile_failures),
            ),
            (
                "spiderpool_ippool_event_counts",
                "Exhausted / NearlyExhausted Events posted on pools.",
                c(&self.pool_events),
            ),
        ] {
            counter(&mut out, name, help, v);
        }
        self.webhook_duration.render(
            &mut out,
            "spiderpool_webhook_duration_seconds",
            "Admission review latency.",
        );
        for (name, help, v) in [
            (
                "spiderpool_total_ippool_counts",
                "SpiderIPPools (the leader's count).",
                g(&self.pools),
            ),
            (
                "spiderpool_total_subnet_counts",
                "SpiderSubnets (the leader's count).",
                g(&self.subnets),
            ),
            (
                "spiderpool_invalid_ippool_counts",
                "Pools whose Valid condition is False (left out of the agents' view).",
                g(&self.invalid_pools),
            ),
            (
                "spiderpool_exhausted_ippool_counts",
                "Pools whose Exhausted condition is True.",
                g(&self.exhausted_pools),
            ),
            (
                "spiderpool_controller_leader",
                "1 while this replica leads the reconcile.",
                g(&self.leader),
            ),
        ] {
            gauge(&mut out, name, help, v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_spiderpools_names() {
        let m = Metrics::default();
        m.webhook_refused.fetch_add(2, Relaxed);
        m.pools.store(3, Relaxed);
        let t = m.render();
        assert!(
            t.contains("spiderpool_webhook_refused_counts_total 2\n"),
            "{t}"
        );
        assert!(t.contains(
            "# TYPE spiderpool_total_ippool_counts gauge\nspiderpool_total_ippool_counts 3\n"
        ));
        assert!(t.contains("spiderpool_webhook_duration_seconds_count 0\n"));
    }
}
