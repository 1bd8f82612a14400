//! [`Interleaved`]: a store wrapper for concurrency and fault tests on one thread.

use std::future::Future;

use crate::store::{Filter, LeaseStore, Outcome, Txn};

/// A store wrapper that makes concurrency real on a single-threaded executor: every call yields
/// to the executor a pseudo-random number of times before and after the inner store acts (so
/// requests of several engines interleave at every await, as they do over a network store), and
/// fails a chosen share of calls with a retryable error, a failing commit being applied first
/// half of the time (the answer lost). Deterministic for a given seed.
#[derive(Debug)]
pub struct Interleaved<S> {
    inner: S,
    rng: std::sync::atomic::AtomicU64,
    /// Calls that fail, per thousand.
    fail_per_mille: u64,
    /// Most yields around one call.
    max_yields: u64,
}

impl<S> Interleaved<S> {
    /// Wraps `inner`; `seed` fixes the schedule, `fail_per_mille` calls in a thousand fail.
    pub fn new(inner: S, seed: u64, fail_per_mille: u64) -> Self {
        Interleaved {
            inner,
            rng: std::sync::atomic::AtomicU64::new(seed | 1),
            fail_per_mille,
            max_yields: 4,
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn next(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        // xorshift64*: no dependency, good enough for schedules.
        let mut x = self.rng.load(Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Relaxed);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    async fn shuffle(&self) {
        for _ in 0..self.next() % (self.max_yields + 1) {
            YieldNow(false).await;
        }
    }

    fn fails(&self) -> bool {
        self.next() % 1000 < self.fail_per_mille
    }
}

fn injected() -> crate::store::StoreError {
    crate::store::StoreError::Unavailable {
        message: "injected fault".into(),
        source: None,
    }
}

/// Returns `Pending` once (waking itself), then `Ready`.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            std::task::Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }
}

#[async_trait::async_trait]
impl<S: LeaseStore> LeaseStore for Interleaved<S> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn list(
        &self,
        filter: Filter<'_>,
    ) -> Result<crate::store::Listing, crate::store::StoreError> {
        self.shuffle().await;
        if self.fails() {
            return Err(injected());
        }
        let out = self.inner.list(filter).await;
        self.shuffle().await;
        out
    }

    async fn commit(&self, txn: Txn) -> Result<Outcome, crate::store::StoreError> {
        self.shuffle().await;
        let fail = self.fails();
        if fail && self.next() % 2 == 0 {
            return Err(injected());
        }
        let out = self.inner.commit(txn).await;
        self.shuffle().await;
        if fail {
            return Err(injected()); // applied, answer lost
        }
        out
    }

    async fn pool_revision(&self, pool: &str) -> Result<u64, crate::store::StoreError> {
        self.shuffle().await;
        if self.fails() {
            return Err(injected());
        }
        self.inner.pool_revision(pool).await
    }
}
