//! Fault injection (the redb pattern: a backend that fails chosen operations). A store wrapper
//! fails commits and reads with retryable errors, either before applying a commit or after
//! applying it with the answer lost. Callers do what a container runtime does: retry ADD with the
//! same container ID, or give up and send DEL. Whatever the faults, no address is ever held twice,
//! and once every pod is gone and DEL has gone through, nothing is left allocated.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::executor::block_on;
use proptest::prelude::*;
use spiderpool_core::engine::{Attachment, Engine, EngineError};
use spiderpool_core::manifest::pool_set;
use spiderpool_core::select::{SelectionInput, ANNO_IPPOOL};
use spiderpool_core::store::{Filter, LeaseStore, Listing, MemoryStore, Outcome, StoreError, Txn};

/// Fails operations according to a fixed schedule: bit `n` of `plan` set = operation `n` fails.
/// A failing commit is applied first (answer lost) when the matching bit of `applied` is set.
struct FaultyStore {
    inner: Arc<MemoryStore>,
    plan: u64,
    applied: u64,
    op: AtomicU64,
}

impl FaultyStore {
    fn fault(&self) -> Option<bool> {
        let n = self.op.fetch_add(1, Ordering::Relaxed) % 64;
        (self.plan >> n & 1 == 1).then_some(self.applied >> n & 1 == 1)
    }
}

fn injected() -> StoreError {
    StoreError::Unavailable {
        message: "injected fault".into(),
        source: None,
    }
}

#[async_trait::async_trait]
impl LeaseStore for FaultyStore {
    fn backend(&self) -> &'static str {
        "faulty"
    }
    async fn list(&self, filter: Filter<'_>) -> Result<Listing, StoreError> {
        match self.fault() {
            Some(_) => Err(injected()),
            None => self.inner.list(filter).await,
        }
    }
    async fn commit(&self, txn: Txn) -> Result<Outcome, StoreError> {
        match self.fault() {
            Some(true) => {
                let _ = self.inner.commit(txn).await; // applied, answer lost
                Err(injected())
            }
            Some(false) => Err(injected()),
            None => self.inner.commit(txn).await,
        }
    }
    async fn pool_revision(&self, pool: &str) -> Result<u64, StoreError> {
        match self.fault() {
            Some(_) => Err(injected()),
            None => self.inner.pool_revision(pool).await,
        }
    }
}

const POOL: &str = r#"
kind: SpiderIPPool
metadata: {name: p}
spec: {subnet: 10.0.0.0/16, ips: [10.0.0.1-10.0.0.4]}
"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn faults_never_duplicate_or_leak(plan in any::<u64>(), applied in any::<u64>(),
                                      pods in prop::collection::vec((0..6u8, any::<bool>()), 1..40)) {
        let pools = pool_set(POOL).expect("valid");
        let inner = Arc::new(MemoryStore::new());
        // At most half the operations fail, so work makes progress.
        let store = FaultyStore { inner: inner.clone(), plan: plan & 0x3333_3333_3333_3333, applied, op: AtomicU64::new(0) };
        let engine = Engine::new(store, "n1");
        let annos: BTreeMap<String, String> = [(ANNO_IPPOOL.to_string(), r#"{"ipv4":["p"]}"#.to_string())].into();
        let input = SelectionInput { pod_namespace: "ns", pod_name: "p", pod_annotations: Some(&annos), node_name: "n1", ..Default::default() };
        // container -> address the runtime was told
        let mut told: BTreeMap<u8, std::net::IpAddr> = BTreeMap::new();
        for (c, delete) in pods {
            let cid = format!("c{c}");
            if delete {
                // DEL: the runtime retries until it succeeds.
                let mut ok = false;
                for _ in 0..20 {
                    if block_on(engine.release(&cid, Some("eth0"))).is_ok() { ok = true; break; }
                }
                prop_assert!(ok, "DEL never got through");
                told.remove(&c);
            } else {
                // ADD: retried with the same container ID while the error is retryable.
                let att = Attachment { container_id: cid.clone(), ifname: "eth0".into() };
                let mut answered = false;
                for _ in 0..20 {
                    match block_on(engine.allocate(&pools, &input, &att, "u", 0)) {
                        Ok(a) => {
                            let ip = a.nics[0].ipv4.as_ref().map(|x| x.address.addr()).expect("v4");
                            if let Some(prev) = told.get(&c) {
                                prop_assert_eq!(*prev, ip, "a repeated ADD changed the address");
                            }
                            told.insert(c, ip);
                            answered = true;
                            break;
                        }
                        Err(e) if e.is_retryable() => continue,
                        Err(EngineError::NoAvailablePool { .. }) => {
                            // Only when the pool really is full.
                            let held = block_on(inner.list(Filter::All)).expect("list").leases.len();
                            prop_assert_eq!(held, 4, "exhausted with free addresses");
                            answered = true;
                            break;
                        }
                        Err(e) => prop_assert!(false, "unexpected error {}", e),
                    }
                }
                prop_assert!(answered, "ADD of c{} never succeeded through the faults", c);
            }
            // Invariant after every step: no address twice, at most one per container.
            let leases = block_on(inner.list(Filter::All)).expect("list").leases;
            let ips: BTreeSet<_> = leases.iter().map(|l| l.ip).collect();
            prop_assert_eq!(ips.len(), leases.len());
            let cids: BTreeSet<_> = leases.iter().map(|l| l.owner.container_id.clone()).collect();
            prop_assert_eq!(cids.len(), leases.len(), "a container holds two addresses");
            // Whatever the runtime was told is really held by that container.
            for (c, ip) in &told {
                prop_assert!(leases.iter().any(|l| l.ip == *ip && l.owner.container_id == format!("c{c}")),
                    "c{} was told {} but does not hold it", c, ip);
            }
        }
        // Every pod goes away: DEL for all six containers, retried through faults.
        for c in 0..6u8 {
            let mut ok = false;
            for _ in 0..20 {
                if block_on(engine.release(&format!("c{c}"), None)).is_ok() { ok = true; break; }
            }
            prop_assert!(ok);
        }
        let left = block_on(inner.list(Filter::All)).expect("list").leases;
        prop_assert!(left.is_empty(), "leaked: {:?}", left);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Several runtimes at once, interleaved at every await of the store, on two engines (nodes)
    /// sharing a 4-address pool, with faults (failed reads, commits lost before or after being
    /// applied). Each runtime ADDs its container (retrying while retryable), maybe DELs it, and at
    /// the end every container is DELeted. No address is ever held twice, every address a runtime
    /// was told is held by its container when told, and nothing is left at the end.
    #[test]
    fn interleaved_faults_never_duplicate_or_leak(seed in any::<u64>(), fail in 0u64..250,
                                                  pods in prop::collection::vec(any::<bool>(), 1..12)) {
        use spiderpool_core::conformance::Interleaved;
        let pools = pool_set(POOL).expect("valid");
        let store = Arc::new(Interleaved::new(MemoryStore::new(), seed, fail));
        let engines = [Engine::new(store.clone(), "n0"), Engine::new(store.clone(), "n1")];
        let annos: BTreeMap<String, String> = [(ANNO_IPPOOL.to_string(), r#"{"ipv4":["p"]}"#.to_string())].into();
        let told = std::sync::Mutex::new(Vec::<(String, std::net::IpAddr)>::new());
        let violations = std::sync::Mutex::new(Vec::<String>::new());
        let runtimes = pods.iter().enumerate().map(|(i, &delete)| {
            let (engine, pools, annos, told, violations, store) = (&engines[i % 2], &pools, &annos, &told, &violations, &store);
            async move {
                let input = SelectionInput { pod_namespace: "ns", pod_name: "p", pod_annotations: Some(annos), node_name: "n", ..Default::default() };
                let cid = format!("c{i}");
                let att = Attachment { container_id: cid.clone(), ifname: "eth0".into() };
                for _ in 0..40 {
                    match engine.allocate(pools, &input, &att, "u", 0).await {
                        Ok(a) => {
                            let Some(ip) = a.nics[0].ipv4.as_ref().map(|x| x.address.addr()) else { break };
                            // Held by this container at the moment we were told.
                            let held = store.inner().list(Filter::Container(&cid)).await.map(|l| l.leases.iter().any(|l| l.ip == ip)).unwrap_or(false);
                            if !held { violations.lock().expect("lock").push(format!("{cid} told {ip} but does not hold it")); }
                            told.lock().expect("lock").push((cid.clone(), ip));
                            break;
                        }
                        Err(e) if e.is_retryable() => continue,
                        Err(EngineError::NoAvailablePool { .. }) => break,
                        Err(e) => { violations.lock().expect("lock").push(format!("{cid}: unexpected {e}")); break; }
                    }
                }
                if delete {
                    for _ in 0..40 {
                        if engine.release(&cid, None).await.is_ok() { break; }
                    }
                }
            }
        });
        block_on(futures::future::join_all(runtimes));
        let v = violations.into_inner().expect("lock");
        prop_assert!(v.is_empty(), "{:?}", v);
        // No address twice (the store would refuse it; check it holds what it says).
        let leases = block_on(store.inner().list(Filter::All)).expect("list").leases;
        let ips: BTreeSet<_> = leases.iter().map(|l| l.ip).collect();
        prop_assert_eq!(ips.len(), leases.len());
        let cids: BTreeSet<_> = leases.iter().map(|l| l.owner.container_id.clone()).collect();
        prop_assert_eq!(cids.len(), leases.len(), "a container holds two addresses");
        // A runtime that did not DEL still holds what it was told: nothing freed a live pod's
        // address (so no one else can have been told it meanwhile).
        let told = told.into_inner().expect("lock");
        for (cid, ip) in &told {
            let i: usize = cid[1..].parse().expect("num");
            if !pods[i] {
                prop_assert!(leases.iter().any(|l| l.ip == *ip && &l.owner.container_id == cid),
                    "{} was told {} and never deleted, but does not hold it", cid, ip);
            }
        }
        // Every pod goes away.
        for (i, _) in pods.iter().enumerate() {
            let mut ok = false;
            for _ in 0..40 {
                if block_on(engines[i % 2].release(&format!("c{i}"), None)).is_ok() { ok = true; break; }
            }
            prop_assert!(ok, "DEL of c{} never got through", i);
        }
        let left = block_on(store.inner().list(Filter::All)).expect("list").leases;
        prop_assert!(left.is_empty(), "leaked: {:?}", left);
    }
}
