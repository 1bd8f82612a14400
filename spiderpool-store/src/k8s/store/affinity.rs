//! Node-affine blocks: giving back this node's blocks that stayed empty, and the blocks of nodes
//! that are gone (see `docs/design.md`, "Node-affine blocks").

use std::sync::Weak;
use std::time::Duration;

use kube::api::{DeleteParams, PostParams, Preconditions};
use spiderpool_core::store::StoreError;

use super::mirror::base_of_name;
use super::{api_code, within, Inner};
use crate::k8s::crd::{SpiderIPBlock, SpiderIPBlockSpec};

impl Inner {
    /// The nodes other than this one that own a block holding none of their own records.
    pub(super) fn idle_block_owners(&self) -> Vec<String> {
        let m = self.lock();
        let mut owners: Vec<String> = m
            .blocks
            .values()
            .filter_map(|b| {
                let owner = b.owner.as_ref()?;
                let holds_own = b
                    .ips
                    .iter()
                    .any(|ip| m.table.get(ip).is_some_and(|l| &l.owner.node == owner));
                (Some(owner) != m.node.as_ref() && !holds_own).then(|| owner.clone())
            })
            .collect();
        owners.sort_unstable();
        owners.dedup();
        owners
    }

    /// Gives back every block of a `gone` node that holds none of that node's records: deleted
    /// when empty, made free when it holds other nodes' (borrowed) records.
    pub(super) async fn return_blocks_of(&self, gone: &[String]) -> Result<usize, StoreError> {
        let due: Vec<(String, u64, bool)> = {
            let m = self.lock();
            m.blocks
                .iter()
                .filter(|(name, b)| {
                    !m.unreadable.contains_key(*name)
                        && b.owner.as_ref().is_some_and(|o| gone.contains(o))
                        && !b.ips.iter().any(|ip| {
                            m.table
                                .get(ip)
                                .is_some_and(|l| Some(&l.owner.node) == b.owner.as_ref())
                        })
                })
                .map(|(name, b)| (name.clone(), b.rv, b.ips.is_empty()))
                .collect()
        };
        let mut n = 0;
        for (name, rv, empty) in due {
            let done = if empty {
                self.give_back(&name, rv).await?
            } else {
                self.disown(&name, rv).await?
            };
            if done {
                tracing::info!(block = %name, "gave back a block of a node that is gone");
                n += 1;
            }
        }
        Ok(n)
    }

    /// Deletes block `name` if it is still at `rv` (nothing written since it was seen empty).
    /// False when it changed meanwhile (kept).
    pub(super) async fn give_back(&self, name: &str, rv: u64) -> Result<bool, StoreError> {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(rv.to_string()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        match within(self.opts.request_timeout, self.blocks.delete(name, &dp)).await {
            Ok(_) => Ok(true),
            Err(e) if matches!(api_code(&e), Some(404 | 409)) => Ok(false),
            Err(e) => Err(self.unavailable(&format!("giving back SpiderIPBlock {name}"), e)),
        }
    }

    /// Clears the owner of block `name` if it is still at `rv`, keeping its records.
    async fn disown(&self, name: &str, rv: u64) -> Result<bool, StoreError> {
        let Some((_, allocations, _)) = self.lock().slots(name) else {
            return Ok(false);
        };
        let Some(base) = base_of_name(name) else {
            return Ok(false);
        };
        let mut obj = SpiderIPBlock::new(
            name,
            SpiderIPBlockSpec {
                base: base.to_string(),
                owner: None,
                allocations,
            },
        );
        obj.metadata.resource_version = Some(rv.to_string());
        let pp = PostParams::default();
        let put = self.blocks.replace(name, &pp, &obj);
        match within(self.opts.request_timeout, put).await {
            Ok(o) => {
                self.lock().absorb(&o);
                Ok(true)
            }
            Err(e) if matches!(api_code(&e), Some(404 | 409)) => Ok(false),
            Err(e) => Err(self.unavailable(&format!("freeing SpiderIPBlock {name}"), e)),
        }
    }

    /// This node's blocks that have held no record for `return_after` (and that no write of
    /// this agent is waiting for).
    fn idle_due(&self) -> Vec<(String, u64)> {
        let after = self.opts.return_after;
        let queued = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let m = self.lock();
        m.idle_since
            .iter()
            .filter(|(name, since)| since.elapsed() >= after && !queued.contains_key(*name))
            .filter_map(|(name, _)| {
                let b = m.blocks.get(name)?;
                let mine = b.owner.is_some() && b.owner == m.node;
                (mine && b.ips.is_empty() && !m.unreadable.contains_key(name))
                    .then(|| (name.clone(), b.rv))
            })
            .collect()
    }
}

/// Gives back this node's blocks once they have stayed empty for `return_after`, so other nodes
/// can own them (a pool's addresses follow its pods from node to node).
pub(super) async fn return_idle(inner: Weak<Inner>) {
    loop {
        let every = {
            let Some(inner) = inner.upgrade() else { return };
            for (name, rv) in inner.idle_due() {
                match inner.give_back(&name, rv).await {
                    Ok(true) => tracing::info!(block = %name, "gave back an empty block"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(block = %name, error = %e, "giving back an empty block failed; next round")
                    }
                }
            }
            (inner.opts.return_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(15))
        };
        tokio::time::sleep(every).await;
    }
}
