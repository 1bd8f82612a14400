//! The backend conformance suite against the in-memory store, directly and through a wrapper that
//! interleaves concurrent requests at every await (the memory store's own futures never yield, so
//! without it "concurrent" requests would run one at a time).
#![cfg(feature = "conformance")]

use std::sync::Arc;

use futures::executor::block_on;
use spiderpool_core::conformance::{self, Interleaved};
use spiderpool_core::MemoryStore;

#[test]
fn memory_store_conforms() {
    block_on(conformance::run_all(|| async {
        Arc::new(MemoryStore::new())
    }));
}

#[test]
fn memory_store_conforms_with_requests_interleaved_at_every_await() {
    for seed in 1..=16u64 {
        block_on(conformance::run_all(|| async move {
            Arc::new(Interleaved::new(MemoryStore::new(), seed, 0))
        }));
    }
}
