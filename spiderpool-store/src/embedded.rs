//! The default backend: a durable single-node store in one redb file, with group commit.
//!
//! # How a commit becomes durable
//! One writer thread owns the database. Commits queue to it; it takes every commit waiting (up to
//! [`MAX_BATCH`]), checks each against the table plus the batch's earlier changes in arrival order (so later
//! commits of a batch see earlier ones), writes all accepted changes in **one** redb write
//! transaction with `Durability::Immediate` (fsync before `commit()` returns), and only then
//! publishes the changes to the table readers see and answers every caller. No caller hears
//! "committed" before its change is on disk; one fsync serves the whole batch.
//!
//! If the redb commit fails (a full disk, an I/O error), nothing of the batch is published and
//! every caller gets a **retryable** error ([`StoreError::Unavailable`], CNI code 11): the same
//! request can succeed once the cause is gone. redb refuses every write after a failed commit
//! until the file is reopened, so the writer drops the database and reopens it (reloading the
//! records from the file, which holds exactly the published state) before the next batch; if the
//! reopen fails too, that batch gets a retryable error and the next one tries again. The process
//! never has to restart.
//!
//! # Layout on disk
//! Table `leases`: key = the address as text (`10.6.168.60`, `fd00::10`), value = the record as
//! JSON. Table `meta`: `revision` -> u64. The attachment and container indexes live in memory and
//! are rebuilt at open (a 65,000-record file opens in well under a second; see benchmarks.md).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use spiderpool_core::store::{
    Changes, Filter, Lease, LeaseStore, LeaseTable, Listing, Outcome, PoolAddresses, StoreError,
    Txn,
};
use tokio::sync::oneshot;

const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// redb's page cache. Records are read from the file once, at open (then they live in the
/// in-memory table), and a commit touches a few pages of the B-tree: 4 MiB holds its upper
/// levels many times over. redb's default (1 GiB) would keep every page read at open resident.
pub const CACHE_BYTES: usize = 4 << 20;

/// Opens or creates the redb file with [`CACHE_BYTES`] of cache.
fn open_db(path: &Path) -> Result<Database, redb::DatabaseError> {
    redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)
}

/// Most commits one fsync may serve.
pub const MAX_BATCH: usize = 512;

type Reply = oneshot::Sender<Result<Outcome, StoreError>>;

struct Request {
    txn: Txn,
    reply: Reply,
}

/// Counters of the writer thread.
#[derive(Debug, Default)]
struct Counters {
    commits: std::sync::atomic::AtomicU64,
    batches: std::sync::atomic::AtomicU64,
}

/// How many commits the store applied and in how many durable redb transactions (fsyncs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitStats {
    /// `LeaseStore::commit` calls answered.
    pub commits: u64,
    /// redb write transactions that carried them (one fsync each); fewer than `commits` when
    /// group commit shared an fsync.
    pub batches: u64,
}

struct Inner {
    path: PathBuf,
    counters: Arc<Counters>,
    committed: Arc<RwLock<LeaseTable>>,
    tx: Mutex<Option<Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer thread after it has finished (and answered) what it
        // holds; joining it releases the database file for the next open.
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut w) = self.writer.lock() {
            if let Some(handle) = w.take() {
                let _ = handle.join();
            }
        }
    }
}

/// The embedded durable store. Cheap to clone (all clones share one database).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn io_err(
    what: &str,
    path: &Path,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::failed(format!("{what} {}", path.display()), e)
}

/// The text of an error without its "lease store ..." wrapper (the answer wraps it again).
fn detail(e: &StoreError) -> String {
    match e {
        StoreError::Unavailable { message, source } | StoreError::Failed { message, source } => {
            match source {
                Some(s) => format!("{message}: {s}"),
                None => message.clone(),
            }
        }
        other => other.to_string(),
    }
}

/// A failed write (full disk, I/O error): retryable, since the same commit can succeed after
/// the cause is gone and the file is reopened.
fn write_err(
    what: &str,
    path: &Path,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::unavailable(format!("{what} {}", path.display()), e)
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store at `path` and loads every record. Blocking: call it
    /// from `spawn_blocking` in async code. Refuses to open a file with a record it cannot read,
    /// since ignoring a record could hand its address out twice.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| io_err("cannot create the directory of", &path, e))?;
        }
        let db = open_db(&path).map_err(|e| io_err("cannot open", &path, e))?;
        let table = load(&db, &path)?;
        let committed = Arc::new(RwLock::new(table));
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            db: Some(db),
            path: path.clone(),
            committed: committed.clone(),
            counters: counters.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("spiderpool-embedded-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io_err("cannot start the writer thread for", &path, e))?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                path,
                counters,
                committed,
                tx: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Commits answered and the durable transactions that carried them.
    pub fn commit_stats(&self) -> CommitStats {
        use std::sync::atomic::Ordering::Relaxed;
        CommitStats {
            commits: self.inner.counters.commits.load(Relaxed),
            batches: self.inner.counters.batches.load(Relaxed),
        }
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, LeaseTable> {
        // The table is only replaced wholesale or updated by infallible code: a poisoned lock
        // still guards consistent data.
        self.inner
            .committed
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }
}

fn load(db: &Database, path: &Path) -> Result<LeaseTable, StoreError> {
    let read = db
        .begin_read()
        .map_err(|e| io_err("cannot read", path, e))?;
    let revision = match read.open_table(META) {
        Ok(meta) => meta
            .get("revision")
            .map_err(|e| io_err("cannot read", path, e))?
            .map(|v| v.value())
            .unwrap_or(0),
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => return Err(io_err("cannot read", path, e)),
    };
    let mut table = LeaseTable::new(revision);
    match read.open_table(LEASES) {
        Ok(leases) => {
            let iter = leases.iter().map_err(|e| io_err("cannot read", path, e))?;
            for item in iter {
                let (k, v) = item.map_err(|e| io_err("cannot read", path, e))?;
                let lease: Lease =
                    serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                        key: format!("{}#{}", path.display(), k.value()),
                        message: e.to_string(),
                    })?;
                if lease.ip.to_string() != k.value() {
                    return Err(StoreError::Corrupt {
                        key: format!("{}#{}", path.display(), k.value()),
                        message: format!("record is for {}", lease.ip),
                    });
                }
                table.load(lease);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(io_err("cannot read", path, e)),
    }
    table.loaded();
    Ok(table)
}

struct Writer {
    /// `None` after a failed commit: reopened before the next batch.
    db: Option<Database>,
    path: PathBuf,
    /// The one table: what is durable. Readers see it; only the writer changes it, after fsync.
    committed: Arc<RwLock<LeaseTable>>,
    counters: Arc<Counters>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            // Take whatever else is already waiting: they share this fsync.
            while batch.len() < MAX_BATCH {
                match rx.recv_timeout(Duration::ZERO) {
                    Ok(r) => batch.push(r),
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            self.commit_batch(batch);
        }
    }

    /// Reopens the database after a failed commit: the file holds exactly the published state.
    fn reopen(&mut self) -> Result<(), StoreError> {
        let db = open_db(&self.path).map_err(|e| write_err("cannot reopen", &self.path, e))?;
        let table = load(&db, &self.path)?;
        {
            let mut published = self.committed.write().unwrap_or_else(|p| p.into_inner());
            if table.len() != published.len() || table.revision() != published.revision() {
                tracing::warn!(path = %self.path.display(), records = table.len(), "embedded store reopened with a different state than published; using the file");
            }
            *published = table;
        }
        self.db = Some(db);
        tracing::info!(path = %self.path.display(), "embedded store reopened after a failed commit");
        Ok(())
    }

    fn commit_batch(&mut self, batch: Vec<Request>) {
        if self.db.is_none() {
            if let Err(e) = self.reopen() {
                tracing::error!(path = %self.path.display(), error = %e, "embedded store cannot reopen");
                for req in batch {
                    let _ = req.reply.send(Err(StoreError::Unavailable {
                        message: format!(
                            "embedded store {} is recovering from a failed write: {e}",
                            self.path.display()
                        ),
                        source: None,
                    }));
                }
                return;
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        let mut changes: Vec<Changes> = Vec::new();
        let revision = {
            // Plan against the published table with the batch's accepted changes on top; the
            // table itself changes only after the batch is durable.
            let table = self.committed.read().unwrap_or_else(|p| p.into_inner());
            let mut pending = table.begin_batch();
            for req in batch {
                let outcome = match table.plan_in(&req.txn, &pending) {
                    Ok(c) => {
                        let revision = pending.add(&c);
                        let released = c.deletes.clone();
                        // Idempotent no-ops change nothing and need no write.
                        if !c.is_empty() {
                            changes.push(c);
                        }
                        Outcome::Committed { revision, released }
                    }
                    Err(c) => Outcome::Conflict(c),
                };
                answers.push((req.reply, outcome));
            }
            pending.revision()
        };
        let result = if changes.is_empty() {
            Ok(())
        } else {
            self.persist(&changes, revision)
        };
        if result.is_ok() {
            use std::sync::atomic::Ordering::Relaxed;
            self.counters
                .commits
                .fetch_add(answers.len() as u64, Relaxed);
            if !changes.is_empty() {
                self.counters.batches.fetch_add(1, Relaxed);
            }
        }
        match result {
            Ok(()) => {
                {
                    let mut pub_table = self.committed.write().unwrap_or_else(|p| p.into_inner());
                    for c in &changes {
                        pub_table.apply(c);
                    }
                }
                for (reply, outcome) in answers {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "embedded store commit failed; reopening before the next batch");
                // Nothing of the batch was published. redb refuses writes after a failed commit until reopened.
                self.db = None;
                let retryable = e.is_retryable();
                let msg = detail(&e);
                for (reply, _) in answers {
                    let message = msg.clone();
                    let _ = reply.send(Err(if retryable {
                        StoreError::Unavailable {
                            message,
                            source: None,
                        }
                    } else {
                        StoreError::Failed {
                            message,
                            source: None,
                        }
                    }));
                }
            }
        }
    }

    fn persist(&mut self, changes: &[Changes], revision: u64) -> Result<(), StoreError> {
        let p = &self.path;
        let Some(db) = self.db.as_ref() else {
            return Err(StoreError::Unavailable {
                message: format!("embedded store {} is not open", p.display()),
                source: None,
            });
        };
        let txn = db
            .begin_write()
            .map_err(|e| write_err("cannot write", p, e))?;
        {
            let mut leases = txn
                .open_table(LEASES)
                .map_err(|e| write_err("cannot write", p, e))?;
            for Changes { writes, deletes } in changes {
                for d in deletes {
                    leases
                        .remove(d.ip.to_string().as_str())
                        .map_err(|e| write_err("cannot write", p, e))?;
                }
                for w in writes {
                    let json = serde_json::to_vec(w)
                        .map_err(|e| StoreError::failed("cannot encode a record", e))?;
                    leases
                        .insert(w.ip.to_string().as_str(), json.as_slice())
                        .map_err(|e| write_err("cannot write", p, e))?;
                }
            }
            let mut meta = txn
                .open_table(META)
                .map_err(|e| write_err("cannot write", p, e))?;
            meta.insert("revision", revision)
                .map_err(|e| write_err("cannot write", p, e))?;
        }
        txn.commit()
            .map_err(|e| write_err("cannot commit to", p, e))
    }
}

#[async_trait::async_trait]
impl LeaseStore for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn list(&self, filter: Filter<'_>) -> Result<Listing, StoreError> {
        Ok(self.read().list(filter))
    }

    async fn pool_revision(&self, pool: &str) -> Result<u64, StoreError> {
        Ok(self.read().pool_revision(pool))
    }

    async fn pool_addresses(&self, pool: &str) -> Result<PoolAddresses, StoreError> {
        Ok(self.read().pool_addresses(pool))
    }

    async fn commit(&self, txn: Txn) -> Result<Outcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        let sent = self
            .inner
            .tx
            .lock()
            .ok()
            .and_then(|tx| tx.as_ref().map(|tx| tx.send(Request { txn, reply })));
        match sent {
            Some(Ok(())) => {}
            _ => {
                return Err(StoreError::Failed {
                    message: format!("embedded store {} is closed", self.inner.path.display()),
                    source: None,
                })
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Failed {
                message: format!(
                    "embedded store {} writer stopped before answering",
                    self.inner.path.display()
                ),
                source: None,
            })
        })
    }
}
