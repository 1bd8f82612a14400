//! The one watch over SpiderIPBlocks that keeps the store's mirror current (a re-list after a
//! broken watch drops the blocks deleted meanwhile).

use std::collections::BTreeSet;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher;
use kube::ResourceExt;

use super::{rv_of, Inner};
use crate::k8s::crd::SpiderIPBlock;

pub(super) async fn watch_blocks(inner: std::sync::Weak<Inner>, api: Api<SpiderIPBlock>) {
    use kube::runtime::WatchStreamExt;
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut relisting: Option<BTreeSet<String>> = None;
    while let Some(ev) = stream.next().await {
        let Some(inner) = inner.upgrade() else { return };
        match ev {
            Ok(watcher::Event::Apply(o)) => inner.lock().absorb(&o),
            Ok(watcher::Event::Delete(o)) => {
                let rv = rv_of(&o);
                inner.lock().forget(&o.name_any(), rv);
            }
            Ok(watcher::Event::Init) => relisting = Some(BTreeSet::new()),
            Ok(watcher::Event::InitApply(o)) => {
                if let Some(seen) = relisting.as_mut() {
                    seen.insert(o.name_any());
                }
                inner.lock().absorb(&o);
            }
            Ok(watcher::Event::InitDone) => {
                // A re-list after a broken watch (410 Gone): blocks deleted meanwhile go.
                if let Some(seen) = relisting.take() {
                    let mut m = inner.lock();
                    let gone: Vec<String> = m
                        .blocks
                        .keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    let rv = m.table.revision();
                    for g in gone {
                        m.forget(&g, rv);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "SpiderIPBlock watch failed; retrying"),
        }
    }
}
