//! `lease-tool`: drives the engine over a real store from its own OS process. Tests use it to run
//! several allocating processes against one etcd and to SIGKILL a process in the middle of a
//! stream of commits; the store benchmark uses it for its multi-process figures.
//!
//! `lease-tool alloc --store STORE --pool-size N --count K --node NODE [--concurrency C]`
//! allocates K addresses for containers `<node>-c<i>` from pool `bench` (10.32.0.1 onwards, N
//! addresses) and prints one JSON line per outcome as soon as it is known (an `ok` line only after
//! the store acknowledged the commit), then a summary line.
//!
//! With `--full-primary M`, pool `primary` (10.33.0.1 onwards, M addresses) is filled first by
//! another node and every request names `primary` before `bench`: each ADD spills into the backup
//! pool, the path a full primary puts every pod on. `--reread-full-primary` makes the engine forget
//! its cache of `primary` before each ADD, which costs what the engine did before it learnt to
//! re-read a full pool only when the store changed it (one listing of the whole primary per ADD):
//! the baseline for that path. The summary reports `pool_reads` (pool listings the engine made).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;
use spiderpool_core::engine::{Attachment, Engine, EngineError};
use spiderpool_core::select::{SelectionInput, ANNO_IPPOOL};
use spiderpool_core::types::{IpPoolSpec, Object, ObjectMeta, SpiderIpPool};
use spiderpool_core::PoolSet;
use spiderpool_store::{AnyStore, StoreConfig};

#[derive(Parser)]
#[command(
    name = "lease-tool",
    about = "Drive spiderpool's engine over a real lease store"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Allocate addresses from the `bench` pool and report each outcome.
    Alloc(AllocArgs),
}

#[derive(clap::Args)]
struct AllocArgs {
    /// `memory`, `embedded:PATH` or `etcd:URL[,URL][#PREFIX]`.
    #[arg(long)]
    store: String,
    /// Pool size (addresses 10.32.0.1 onwards; at most 65,000).
    #[arg(long)]
    pool_size: u32,
    /// Allocations to attempt.
    #[arg(long)]
    count: usize,
    /// Node name (also the container id prefix).
    #[arg(long)]
    node: String,
    /// Concurrent requests inside this process.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Keep retrying retryable errors for up to this many seconds per allocation.
    #[arg(long, default_value_t = 30)]
    retry_secs: u64,
    /// Release every address at the end (and report the release rate).
    #[arg(long)]
    release: bool,
    /// Print only the summary, not one line per allocation.
    #[arg(long)]
    quiet: bool,
    /// Fill a `primary` pool of this many addresses first and ask for it before `bench`.
    #[arg(long, default_value_t = 0)]
    full_primary: u32,
    /// Baseline: forget the cached `primary` before each ADD (one listing of it per ADD).
    #[arg(long)]
    reread_full_primary: bool,
}

/// A pool `name` of `n` addresses from 10.`octet`.0.1.
fn numbered_pool(name: &str, octet: u8, n: u32) -> Result<SpiderIpPool> {
    if n == 0 || n > 65_000 {
        bail!("a pool size must be 1..=65000");
    }
    let first = u32::from(std::net::Ipv4Addr::new(10, octet, 0, 1));
    let last = std::net::Ipv4Addr::from(first + n - 1);
    Ok(SpiderIpPool {
        metadata: ObjectMeta {
            name: name.into(),
            ..Default::default()
        },
        spec: IpPoolSpec {
            subnet: format!("10.{octet}.0.0/16"),
            ips: vec![format!("10.{octet}.0.1-{last}")],
            ..Default::default()
        },
        ..Default::default()
    })
}

/// The benchmark/test pool: `n` addresses from 10.32.0.1; with `primary > 0`, also pool
/// `primary` of that many addresses from 10.33.0.1.
pub fn bench_pool(n: u32, primary: u32) -> Result<PoolSet> {
    let mut objects = vec![Object::IpPool(
        numbered_pool("bench", 32, n).context("--pool-size")?,
    )];
    if primary > 0 {
        objects.push(Object::IpPool(
            numbered_pool("primary", 33, primary).context("--full-primary")?,
        ));
    }
    PoolSet::build(&objects).map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Fills pool `primary` with records of another node, in transactions every store accepts.
async fn fill_primary(store: &AnyStore, pools: &PoolSet) -> Result<()> {
    use spiderpool_core::store::{Lease, LeaseStore, Outcome, Owner, Txn, ATOMIC_RELEASES};
    let Some(p) = pools.pools.get("primary") else {
        return Ok(());
    };
    let space = p.allocatable(pools.reserved(p.family));
    let leases: Vec<Lease> = (0..space.count())
        .filter_map(|i| space.nth_ip(i))
        .enumerate()
        .map(|(n, ip)| Lease {
            ip,
            pool: "primary".into(),
            owner: Owner {
                pod_namespace: "filler".into(),
                pod_name: format!("filler-{n}"),
                pod_uid: "filler".into(),
                container_id: format!("filler-{n}"),
                ifname: "eth0".into(),
                node: "filler-node".into(),
                network: String::new(),
                created: 0,
            },
            clean_gateway: false,
            revision: 0,
        })
        .collect();
    for chunk in leases.chunks(ATOMIC_RELEASES) {
        match store
            .commit(Txn {
                claims: chunk.to_vec(),
                releases: vec![],
            })
            .await
            .context("filling the primary pool")?
        {
            Outcome::Committed { .. } => {}
            Outcome::Conflict(c) => bail!("filling the primary pool: {c:?}"),
        }
    }
    Ok(())
}

fn emit(line: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// What one allocation worker did.
#[derive(Default)]
struct Tally {
    lat: Vec<u64>,
    exhausted: usize,
    failed: usize,
    retries: usize,
}

/// One worker: takes the next index until `count`, allocates it (retrying retryable errors for
/// `retry_secs`), prints each outcome unless `quiet`.
#[allow(clippy::too_many_arguments)]
async fn alloc_worker(
    engine: Arc<Engine<AnyStore>>,
    pools: Arc<PoolSet>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    node: String,
    wanted: &'static str,
    count: usize,
    retry_secs: u64,
    quiet: bool,
    reread_full_primary: bool,
) -> Tally {
    let annos = [(ANNO_IPPOOL.to_string(), wanted.to_string())].into();
    let mut t = Tally::default();
    loop {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if i >= count {
            return t;
        }
        let cid = format!("{node}-c{i}");
        let pod = format!("pod-{i}");
        let input = SelectionInput {
            pod_namespace: "bench",
            pod_name: &pod,
            pod_annotations: Some(&annos),
            node_name: &node,
            ..Default::default()
        };
        let att = Attachment {
            container_id: cid.clone(),
            ifname: "eth0".into(),
        };
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(retry_secs);
        loop {
            if reread_full_primary {
                engine.invalidate(Some("primary"));
            }
            match engine.allocate(&pools, &input, &att, "uid", 0).await {
                Ok(a) => {
                    t.lat.push(t0.elapsed().as_micros() as u64);
                    if !quiet {
                        let ip = a.nics[0]
                            .ipv4
                            .as_ref()
                            .map(|x| x.address.addr().to_string());
                        emit(json!({"cid": cid, "ip": ip}));
                    }
                    break;
                }
                Err(EngineError::NoAvailablePool { .. }) => {
                    t.exhausted += 1;
                    if !quiet {
                        emit(json!({"cid": cid, "exhausted": true}));
                    }
                    break;
                }
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    t.retries += 1;
                    if !quiet {
                        emit(json!({"cid": cid, "retry": e.to_string()}));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    t.failed += 1;
                    emit(
                        json!({"cid": cid, "error": e.to_string(), "retryable": e.is_retryable()}),
                    );
                    break;
                }
            }
        }
    }
}

/// Releases every container `0..count` of `node` with `concurrency` workers; how many records.
async fn release_all(
    engine: &Arc<Engine<AnyStore>>,
    node: &str,
    count: usize,
    concurrency: usize,
) -> Result<usize> {
    let mut rel_tasks = Vec::new();
    let per = count.div_ceil(concurrency.max(1));
    for w in 0..concurrency.max(1) {
        let (engine, node) = (engine.clone(), node.to_string());
        rel_tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            for i in (w * per)..((w + 1) * per).min(count) {
                n += engine
                    .release(&format!("{node}-c{i}"), Some("eth0"))
                    .await?
                    .len();
            }
            Ok::<usize, EngineError>(n)
        }));
    }
    let mut released = 0;
    for t in rel_tasks {
        released += t.await.context("release task panicked")??;
    }
    Ok(released)
}

async fn alloc(args: AllocArgs) -> Result<()> {
    let AllocArgs {
        store,
        pool_size,
        count,
        node,
        concurrency,
        retry_secs,
        release,
        quiet,
        full_primary,
        reread_full_primary,
    } = args;
    let cfg = StoreConfig::parse(&store).map_err(anyhow::Error::msg)?;
    let store = AnyStore::open(&cfg).await.context("opening the store")?;
    let pools = Arc::new(bench_pool(pool_size, full_primary)?);
    fill_primary(&store, &pools).await?;
    let wanted = if full_primary > 0 {
        r#"{"ipv4":["primary","bench"]}"#
    } else {
        r#"{"ipv4":["bench"]}"#
    };
    let engine = Arc::new(Engine::new(store, node.clone()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        tasks.push(tokio::spawn(alloc_worker(
            engine.clone(),
            pools.clone(),
            next.clone(),
            node.clone(),
            wanted,
            count,
            retry_secs,
            quiet,
            reread_full_primary,
        )));
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.context("allocation task panicked")?;
        all.lat.extend(t.lat);
        all.exhausted += t.exhausted;
        all.failed += t.failed;
        all.retries += t.retries;
    }
    let alloc_secs = started.elapsed().as_secs_f64();
    all.lat.sort_unstable();
    let (mut release_secs, mut released) = (0.0, 0usize);
    if release {
        let t0 = Instant::now();
        released = release_all(&engine, &node, count, concurrency).await?;
        release_secs = t0.elapsed().as_secs_f64();
    }
    let stats = engine.stats();
    emit(json!({
        "summary": true,
        "node": node,
        "ok": all.lat.len(),
        "exhausted": all.exhausted,
        "failed": all.failed,
        "retries": all.retries,
        "conflicts": stats.conflicts,
        "pool_reads": stats.pool_reads,
        "alloc_secs": alloc_secs,
        "p50_us": percentile(&all.lat, 0.50),
        "p99_us": percentile(&all.lat, 0.99),
        "lat_us": all.lat,
        "released": released,
        "release_secs": release_secs,
    }));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Alloc(args) => alloc(args).await,
    }
}
