//! [`MemoryStore`]: a [`LeaseTable`] behind a mutex.

use std::sync::Mutex;

use super::{Filter, LeaseStore, LeaseTable, Listing, Outcome, PoolAddresses, StoreError, Txn};

/// A store in process memory: for tests and for embedding where persistence lives elsewhere.
#[derive(Debug, Default)]
pub struct MemoryStore {
    table: Mutex<LeaseTable>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseTable> {
        // A panic while holding the lock cannot leave the table half-updated (apply is
        // infallible), so a poisoned lock is still safe to use.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl LeaseStore for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn list(&self, filter: Filter<'_>) -> Result<Listing, StoreError> {
        Ok(self.lock().list(filter))
    }

    async fn commit(&self, txn: Txn) -> Result<Outcome, StoreError> {
        Ok(self.lock().commit(&txn))
    }

    async fn pool_revision(&self, pool: &str) -> Result<u64, StoreError> {
        Ok(self.lock().pool_revision(pool))
    }

    async fn pool_addresses(&self, pool: &str) -> Result<PoolAddresses, StoreError> {
        Ok(self.lock().pool_addresses(pool))
    }
}

impl MemoryStore {
    /// Records examined by listings so far (the cost of reads, for tests).
    pub fn records_visited(&self) -> u64 {
        self.lock().records_visited()
    }
}
