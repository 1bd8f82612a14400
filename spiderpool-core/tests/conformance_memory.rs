//! The backend conformance suite against the in-memory store.
#![cfg(feature = "conformance")]

use std::sync::Arc;

use futures::executor::block_on;
use spiderpool_core::conformance;
use spiderpool_core::MemoryStore;

#[test]
fn memory_store_conforms() {
    block_on(conformance::run_all(|| async {
        Arc::new(MemoryStore::new())
    }));
}
