//! The store's reads of the blocks: one paged LIST at start, then one watch from that LIST's
//! resourceVersion that keeps the mirror current. The watch resumes from the last version it saw
//! (bookmarks included) when the server ends it or the connection goes silent, and lists again
//! only when the server no longer has that version (410 Gone); a re-list drops the blocks
//! deleted meanwhile. (kube's `watcher` would LIST every block a second time right after start:
//! at 65,000 records that doubled the API server's work and the agent's peak memory.)

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::ResourceExt;
use spiderpool_core::store::StoreError;

use super::{api_code, rv_of, within, Inner};
use crate::k8s::crd::SpiderIPBlock;

/// How long the server keeps one watch open (it ends it then; the store watches again).
const WATCH_SECS: u32 = 290;
/// Silence after which a watch is taken for a dropped connection (bookmarks come well before).
const SILENT: Duration = Duration::from_secs(WATCH_SECS as u64 + 40);

/// Blocks per page of a LIST: a page is decoded whole (typed objects next to the body), and the
/// allocator keeps what the largest page needed; 100 blocks (about 0.5 MB of JSON) keep that
/// small at one request per 1,600 addresses.
const PAGE: u32 = 100;

/// Lists every block in pages of [`PAGE`], handing each page to `take`; returns the list's
/// resourceVersion (where a watch starts).
pub(super) async fn list_blocks(
    inner: &Inner,
    mut take: impl FnMut(&[SpiderIPBlock]),
) -> Result<String, StoreError> {
    let mut lp = ListParams::default().limit(PAGE);
    loop {
        let page = within(inner.opts.request_timeout, inner.blocks.list(&lp))
            .await
            .map_err(|e| inner.unavailable("listing SpiderIPBlocks", e))?;
        take(&page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => return Ok(page.metadata.resource_version.unwrap_or_default()),
        }
    }
}

/// Lists again into the live mirror (the watch's version is gone): blocks the listing does not
/// have are dropped, unless the mirror has them newer than the listing (written since).
async fn relist(inner: &Inner) -> Result<String, StoreError> {
    let mut seen = BTreeSet::new();
    let rv = list_blocks(inner, |page| {
        let mut m = inner.lock();
        for o in page {
            seen.insert(o.name_any());
            m.absorb(o);
        }
    })
    .await?;
    let at = rv.parse::<u64>().unwrap_or(0);
    let mut m = inner.lock();
    let gone: Vec<String> = m
        .blocks
        .keys()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect();
    for g in gone {
        m.forget(&g, at);
    }
    Ok(rv)
}

/// What one watch ended with.
enum Ended {
    /// The server closed it, or it went silent: watch again from the last version seen.
    Resume,
    /// The version is gone (410): list again.
    Expired,
    /// The store is dropped.
    Stop,
}

/// Keeps the mirror current from `rv` (the first LIST's version) on, for as long as the store
/// lives.
pub(super) async fn watch_blocks(inner: std::sync::Weak<Inner>, mut rv: String) {
    let mut pause = Duration::from_millis(200);
    loop {
        match watch_once(&inner, &mut rv).await {
            Ended::Stop => return,
            Ended::Resume => {}
            Ended::Expired => loop {
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                match relist(&strong).await {
                    Ok(v) => {
                        rv = v;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "listing SpiderIPBlocks again failed; retrying");
                        drop(strong);
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(30));
                    }
                }
            },
        }
        pause = Duration::from_millis(200);
    }
}

/// One watch from `rv`, moving `rv` forward with every event and bookmark.
async fn watch_once(inner: &std::sync::Weak<Inner>, rv: &mut String) -> Ended {
    let wp = WatchParams::default().timeout(WATCH_SECS);
    let (api, limit) = match inner.upgrade() {
        Some(i) => (i.blocks.clone(), i.opts.request_timeout),
        None => return Ended::Stop,
    };
    let stream = match within(limit, api.watch(&wp, rv)).await {
        Ok(s) => s,
        Err(e) if api_code(&e) == Some(410) => return Ended::Expired,
        Err(e) => {
            tracing::warn!(error = %e, "SpiderIPBlock watch failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Ended::Resume;
        }
    };
    futures::pin_mut!(stream);
    loop {
        let ev = match tokio::time::timeout(SILENT, stream.next()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => return Ended::Resume,
            Err(_) => {
                tracing::warn!(
                    "SpiderIPBlock watch silent for {} s; watching again",
                    SILENT.as_secs()
                );
                return Ended::Resume;
            }
        };
        let Some(inner) = inner.upgrade() else {
            return Ended::Stop;
        };
        match ev {
            Ok(WatchEvent::Added(o)) | Ok(WatchEvent::Modified(o)) => {
                advance(rv, o.resource_version());
                inner.lock().absorb(&o);
            }
            Ok(WatchEvent::Deleted(o)) => {
                advance(rv, o.resource_version());
                inner.lock().forget(&o.name_any(), rv_of(&o));
            }
            Ok(WatchEvent::Bookmark(b)) => advance(rv, Some(b.metadata.resource_version)),
            Ok(WatchEvent::Error(s)) if s.code == 410 => return Ended::Expired,
            Ok(WatchEvent::Error(s)) => {
                tracing::warn!(code = s.code, message = %s.message, "SpiderIPBlock watch ended with an error; watching again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Ended::Resume;
            }
            Err(e) => {
                tracing::warn!(error = %e, "SpiderIPBlock watch failed; watching again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Ended::Resume;
            }
        }
    }
}

/// Moves the watch's version to `seen` (an empty or missing version keeps the last one: an empty
/// version would mean "from now", skipping what happened meanwhile).
fn advance(rv: &mut String, seen: Option<String>) {
    if let Some(v) = seen.filter(|v| !v.is_empty()) {
        *rv = v;
    }
}
