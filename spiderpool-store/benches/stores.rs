//! Store benchmark: allocations per second and p50/p99 latency for each backend, 1 and 8
//! concurrent clients, pools of 1,000 and 65,000 addresses; for etcd also 4 processes sharing one
//! pool. Every figure comes from a real `lease-tool alloc` process (engine + store, as the agent
//! will run them); the physical limits (an fsync on this disk, an etcd round trip) are measured in
//! the same run. Prints a Markdown table.
//!
//! Run: `cargo bench -p spiderpool-store --all-features --bench stores`
//! (etcd rows need the `etcd` binary; `BENCH_QUICK=1` runs fewer allocations).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::Value;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn spawn(store: &str, pool: u32, count: usize, node: &str, clients: usize) -> Child {
    spawn_with(store, pool, count, node, clients, &[])
}

fn spawn_with(
    store: &str,
    pool: u32,
    count: usize,
    node: &str,
    clients: usize,
    extra: &[&str],
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lease-tool"))
        .args([
            "alloc",
            "--store",
            store,
            "--pool-size",
            &pool.to_string(),
            "--count",
            &count.to_string(),
            "--node",
            node,
            "--concurrency",
            &clients.to_string(),
            "--release",
            "--quiet",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("lease-tool starts")
}

fn summary(child: Child) -> Value {
    let out = child.wait_with_output().expect("lease-tool runs");
    assert!(out.status.success(), "lease-tool failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("\"summary\""))
        .expect("summary line");
    serde_json::from_str(line).expect("json")
}

struct Row {
    backend: String,
    pool: u32,
    clients: String,
    ok: u64,
    alloc_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    release_per_s: f64,
    conflicts: u64,
}

fn row(backend: &str, pool: u32, clients: &str, sums: &[Value]) -> Row {
    let mut lat: Vec<u64> = sums
        .iter()
        .flat_map(|s| s["lat_us"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_u64())
        .collect();
    lat.sort_unstable();
    let ok: u64 = sums.iter().map(|s| s["ok"].as_u64().unwrap_or(0)).sum();
    let released: u64 = sums
        .iter()
        .map(|s| s["released"].as_u64().unwrap_or(0))
        .sum();
    let secs = sums
        .iter()
        .map(|s| s["alloc_secs"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    let rsecs = sums
        .iter()
        .map(|s| s["release_secs"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    Row {
        backend: backend.into(),
        pool,
        clients: clients.into(),
        ok,
        alloc_per_s: ok as f64 / secs.max(1e-9),
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        release_per_s: released as f64 / rsecs.max(1e-9),
        conflicts: sums
            .iter()
            .map(|s| s["conflicts"].as_u64().unwrap_or(0))
            .sum(),
    }
}

/// fdatasync of a 4 KiB write on the disk that holds the temp dir: the floor of one durable commit.
fn fsync_limit(dir: &std::path::Path, n: usize) -> (f64, u64) {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.join("fsync-probe"))
        .expect("probe file");
    let buf = vec![7u8; 4096];
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        f.write_all_at(&buf, ((i % 16) * 4096) as u64)
            .expect("write");
        f.sync_data().expect("fdatasync");
        lat.push(t.elapsed().as_micros() as u64);
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    (rate, percentile(&lat, 0.5))
}

#[cfg(all(feature = "etcd", feature = "testing"))]
fn etcd_round_trip(url: &str, n: usize) -> (u64, u64) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([url], None)
            .await
            .expect("connect");
        let (mut put, mut get) = (Vec::new(), Vec::new());
        for i in 0..n {
            let t = Instant::now();
            c.put("/bench/rtt", format!("{i}"), None)
                .await
                .expect("put");
            put.push(t.elapsed().as_micros() as u64);
            let t = Instant::now();
            c.get("/bench/rtt", None).await.expect("get");
            get.push(t.elapsed().as_micros() as u64);
        }
        put.sort_unstable();
        get.sort_unstable();
        (percentile(&put, 0.5), percentile(&get, 0.5))
    })
}

/// Writes `n` records into a fresh embedded store, closes it, and times the next open.
fn embedded_reopen(dir: &std::path::Path, n: u32) -> (usize, f64) {
    use spiderpool_core::store::{Lease, LeaseStore, Owner, Txn};
    use spiderpool_store::embedded::EmbeddedStore;
    let path = dir.join("reopen.redb");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    {
        let store = EmbeddedStore::open(&path).expect("open");
        let base = u32::from(std::net::Ipv4Addr::new(10, 40, 0, 1));
        let leases: Vec<Lease> = (0..n)
            .map(|i| Lease {
                ip: std::net::IpAddr::V4(std::net::Ipv4Addr::from(base + i)),
                pool: "big".into(),
                owner: Owner {
                    pod_namespace: "ns".into(),
                    pod_name: format!("pod-{i}"),
                    pod_uid: format!("uid-{i}"),
                    container_id: format!("c{i}"),
                    ifname: "eth0".into(),
                    node: "n".into(),
                    network: "net".into(),
                    created: 0,
                },
                clean_gateway: false,
                revision: 0,
            })
            .collect();
        rt.block_on(async {
            for chunk in leases.chunks(1000) {
                store
                    .commit(Txn {
                        claims: chunk.to_vec(),
                        releases: vec![],
                    })
                    .await
                    .expect("fill");
            }
        });
    }
    let t = Instant::now();
    let store = EmbeddedStore::open(&path).expect("reopen");
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    (store.len(), ms)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing we need: run only
    // when asked to benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let n_small = if quick { 300 } else { 900 };
    let n_large = if quick { 600 } else { 3000 };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rows = Vec::new();
    let mut backends: Vec<(String, String)> = vec![("memory".into(), "memory".into())];
    backends.push(("embedded".into(), "embedded".into()));

    #[cfg(all(feature = "etcd", feature = "testing"))]
    let etcd = spiderpool_store::testing::find_binary("etcd")
        .map(|b| spiderpool_store::testing::EtcdServer::start(&b).expect("etcd starts"));
    #[cfg(all(feature = "etcd", feature = "testing"))]
    if let Some(server) = &etcd {
        backends.push(("etcd".into(), server.url()));
    }

    let mut k = 0;
    for (name, target) in &backends {
        for pool in [1000u32, 65000] {
            for clients in [1usize, 8] {
                k += 1;
                let store = match name.as_str() {
                    "memory" => "memory".to_string(),
                    "embedded" => format!(
                        "embedded:{}",
                        dir.path().join(format!("b{k}.redb")).display()
                    ),
                    _ => format!("etcd:{target}#/bench/{k}/"),
                };
                let count = if pool == 1000 { n_small } else { n_large };
                let s = summary(spawn(&store, pool, count, "bench-node", clients));
                rows.push(row(name, pool, &clients.to_string(), &[s]));
                eprint!(".");
            }
        }
        if name == "etcd" {
            // 4 processes (nodes) sharing one pool, 2 concurrent requests each.
            for pool in [1000u32, 65000] {
                k += 1;
                let store = format!("etcd:{target}#/bench/{k}/");
                let per = if pool == 1000 {
                    n_small / 4
                } else {
                    n_large / 4
                };
                let children: Vec<Child> = (0..4)
                    .map(|i| spawn(&store, pool, per, &format!("node-{i}"), 2))
                    .collect();
                let sums: Vec<Value> = children.into_iter().map(summary).collect();
                rows.push(row(name, pool, "4 procs x 2", &sums));
            }
        }
    }
    // The backup-pool path: a full 1,000-address primary before `bench` in every request. The
    // baseline re-lists the primary on every ADD (what the engine did before pool revisions).
    let mut backup_rows = Vec::new();
    for (name, target) in backends.iter().filter(|(n, _)| n != "memory") {
        for (mode, extra) in [
            ("re-read only when changed", vec!["--full-primary", "1000"]),
            (
                "baseline: re-list per ADD",
                vec!["--full-primary", "1000", "--reread-full-primary"],
            ),
        ] {
            k += 1;
            let store = match name.as_str() {
                "embedded" => format!(
                    "embedded:{}",
                    dir.path().join(format!("b{k}.redb")).display()
                ),
                _ => format!("etcd:{target}#/bench/{k}/"),
            };
            let s = summary(spawn_with(&store, 65000, n_small, "bench-node", 1, &extra));
            let reads = s["pool_reads"].as_u64().unwrap_or(0);
            backup_rows.push((row(name, 65000, "1", &[s]), mode, reads));
            eprint!(".");
        }
    }
    eprintln!();

    let reopen = embedded_reopen(dir.path(), 65_000);
    let (fsync_rate, fsync_p50) = fsync_limit(dir.path(), if quick { 100 } else { 400 });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "| backend | pool | clients | allocated | alloc/s | p50 | p99 | release/s | lost races |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {} |",
            r.backend,
            r.pool,
            r.clients,
            r.ok,
            r.alloc_per_s,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.release_per_s,
            r.conflicts
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Backup-pool path (a full 1,000-address primary named first, 1 client):\n"
    );
    let _ = writeln!(
        out,
        "| backend | engine | allocated | alloc/s | p50 | p99 | pool listings | listings per ADD |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (r, mode, reads) in &backup_rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.2} ms | {:.2} ms | {} | {:.3} |",
            r.backend,
            mode,
            r.ok,
            r.alloc_per_s,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            reads,
            *reads as f64 / r.ok.max(1) as f64
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Physical limits measured in this run: 4 KiB write + fdatasync on the temp-dir disk: {fsync_rate:.0}/s (p50 {:.2} ms).",
        fsync_p50 as f64 / 1000.0
    );
    let _ = writeln!(
        out,
        "Embedded store open (load + index rebuild) with {} records: {:.0} ms.",
        reopen.0, reopen.1
    );
    #[cfg(all(feature = "etcd", feature = "testing"))]
    if let Some(server) = &etcd {
        let (put, get) = etcd_round_trip(&server.url(), if quick { 50 } else { 200 });
        let _ = writeln!(
            out,
            "etcd (same machine, loopback): one put (raft + WAL fsync) p50 {:.2} ms, one get p50 {:.2} ms.",
            put as f64 / 1000.0,
            get as f64 / 1000.0
        );
    }
}
