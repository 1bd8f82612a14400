//! The etcd backend (feature `etcd`): many agents on many nodes share one etcd (API v3).
//!
//! # Key layout (under a prefix, default `/spiderpool/v1/`)
//! | key | value | purpose |
//! |---|---|---|
//! | `ips/<ip>` | record (JSON) | the claim: one key per allocated address, unique cluster-wide |
//! | `att/<container id>/<ifname>/<4\|6>` | record | the attachment slot; its prefix lists a container |
//! | `pool/<pool>/<ip>` | record | lists one pool with one range read |
//! | `node/<node>/<ip>` | record | lists one node's records (GC) with one range read |
//! | `poolrev/<pool>` | empty | its `mod_revision` is the pool revision: every transaction that changes a pool puts it |
//!
//! Nodes allocating from one pool touch only the keys of the addresses they claim, so they contend
//! only when they pick the very same address (rare: each node's search starts elsewhere in the
//! pool). A claim is one transaction: `create_revision == 0` on the address key and the slot key,
//! then four puts. A release is one transaction: `mod_revision == <read>` on the address key, then
//! four deletes. Every key of a record is written and deleted together.
//!
//! # Failures
//! Connection loss, timeouts and an unavailable cluster become [`StoreError::Unavailable`]
//! (retryable; the CNI reports code 11). The outcome of a transaction in flight when the
//! connection dropped is unknown, but a retry is safe: re-claiming an address for the same
//! attachment is a no-op, and a release of what is already gone is a no-op.
//!
//! etcd refuses transactions of more than 128 operations (`--max-txn-ops`); a transaction with
//! more than [`CHUNK`] releases (GC of many records) is applied in atomic parts of [`CHUNK`].
//! When a part fails, the error is [`StoreError::PartiallyReleased`] with the records the earlier
//! parts removed, so the caller knows exactly what is free.

use std::net::IpAddr;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, KvClient,
    Txn as EtcdTxn, TxnOp, TxnOpResponse, WatchClient, WatchOptions,
};
use spiderpool_core::store::{
    Conflict, Filter, Lease, LeaseStore, Listing, Outcome, Release, StoreError, Txn,
};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/spiderpool/v1/";
/// Keys per page of a range read.
pub const PAGE: i64 = 2000;
/// Records per etcd transaction: 4 keys each plus one pool-revision key per pool stays under
/// etcd's 128-operation limit.
pub const CHUNK: usize = spiderpool_core::store::ATOMIC_RELEASES;
/// How often a transaction is re-tried when only benign races (idempotent re-claims, records
/// changed between read and release) stood in its way.
const MAX_ROUNDS: usize = 16;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix (ends with `/`).
    pub prefix: String,
    /// Time limit of one request.
    pub request_timeout: Duration,
    /// Time limit to connect.
    pub connect_timeout: Duration,
}

impl EtcdConfig {
    /// Settings for `endpoints` with the default prefix and timeouts (5 s request, 2 s connect).
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// The etcd store. Cheap to clone (clones share one connection).
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    prefix: String,
    timeout: Duration,
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn family_tag(ip: &IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "4",
        IpAddr::V6(_) => "6",
    }
}

fn map_err(endpoints: &str, e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    let retryable = match &e {
        E::GRpcStatus(s) => matches!(
            s.code(),
            tonic_code::Unavailable
                | tonic_code::DeadlineExceeded
                | tonic_code::Cancelled
                | tonic_code::Aborted
                | tonic_code::ResourceExhausted
                | tonic_code::Unknown
        ),
        E::TransportError(_) | E::IoError(_) => true,
        _ => false,
    };
    let message = format!("etcd at {endpoints}");
    if retryable {
        StoreError::unavailable(message, e)
    } else {
        StoreError::failed(message, e)
    }
}

/// gRPC status codes of etcd-client errors.
mod tonic_code {
    pub use tonic::Code::*;
}

impl EtcdStore {
    /// Connects to etcd. Fails with a retryable error when no endpoint answers.
    pub async fn connect(cfg: EtcdConfig) -> Result<Self, StoreError> {
        let endpoints = cfg.endpoints.join(",");
        if cfg.endpoints.is_empty() {
            return Err(StoreError::Failed {
                message: "no etcd endpoint given".into(),
                source: None,
            });
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(cfg.connect_timeout)
            .with_timeout(cfg.request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let connect = Client::connect(cfg.endpoints.clone(), Some(opts));
        let client = tokio::time::timeout(cfg.connect_timeout + Duration::from_secs(1), connect)
            .await
            .map_err(|e| {
                StoreError::unavailable(format!("etcd at {endpoints}: connect timed out"), e)
            })?
            .map_err(|e| map_err(&endpoints, e))?;
        let mut prefix = cfg.prefix;
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(EtcdStore {
            kv: client.kv_client(),
            watch: client.watch_client(),
            prefix,
            timeout: cfg.request_timeout,
            endpoints,
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn ip_key(&self, ip: &IpAddr) -> String {
        format!("{}ips/{ip}", self.prefix)
    }
    fn slot_key(&self, container: &str, ifname: &str, ip: &IpAddr) -> String {
        format!("{}att/{container}/{ifname}/{}", self.prefix, family_tag(ip))
    }
    fn pool_key(&self, pool: &str, ip: &IpAddr) -> String {
        format!("{}pool/{pool}/{ip}", self.prefix)
    }
    fn node_key(&self, node: &str, ip: &IpAddr) -> String {
        format!("{}node/{node}/{ip}", self.prefix)
    }
    fn pool_rev_key(&self, pool: &str) -> String {
        format!("{}poolrev/{pool}", self.prefix)
    }
    fn keys_of(&self, l: &Lease) -> [String; 4] {
        [
            self.ip_key(&l.ip),
            self.slot_key(&l.owner.container_id, &l.owner.ifname, &l.ip),
            self.pool_key(&l.pool, &l.ip),
            self.node_key(&l.owner.node, &l.ip),
        ]
    }

    async fn run(&self, txn: EtcdTxn) -> Result<etcd_client::TxnResponse, StoreError> {
        let mut kv = self.kv.clone();
        match tokio::time::timeout(self.timeout, kv.txn(txn)).await {
            Ok(r) => r.map_err(|e| map_err(&self.endpoints, e)),
            Err(e) => Err(StoreError::unavailable(
                format!("etcd at {}: request timed out", self.endpoints),
                e,
            )),
        }
    }

    /// Reads every key under `prefix` at one revision, in pages of [`PAGE`] keys (a whole pool
    /// would not fit in one gRPC message).
    async fn get_prefix(&self, prefix: &str) -> Result<(u64, Vec<KeyValue>), StoreError> {
        self.get_prefix_opts(prefix, false).await
    }

    /// As [`EtcdStore::get_prefix`]; with `keys_only`, etcd sends no values.
    async fn get_prefix_opts(
        &self,
        prefix: &str,
        keys_only: bool,
    ) -> Result<(u64, Vec<KeyValue>), StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut start = prefix.as_bytes().to_vec();
        let mut revision = 0i64;
        let mut out = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if keys_only {
                opts = opts.with_keys_only();
            }
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let mut kv = self.kv.clone();
            let req = kv.get(start.clone(), Some(opts));
            let mut resp = match tokio::time::timeout(self.timeout, req).await {
                Ok(r) => r.map_err(|e| map_err(&self.endpoints, e))?,
                Err(e) => {
                    return Err(StoreError::unavailable(
                        format!("etcd at {}: request timed out", self.endpoints),
                        e,
                    ))
                }
            };
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            if let Some(last) = kvs.last() {
                start = last.key().to_vec();
                start.push(0);
            }
            out.extend(kvs);
            if !more {
                break;
            }
        }
        Ok((u64::try_from(revision).unwrap_or(0), out))
    }

    /// The cluster's current revision (a read of an empty range).
    async fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.get_prefix(&format!("{}rev/", self.prefix)).await?.0)
    }

    fn decode(kv: &KeyValue) -> Result<Lease, StoreError> {
        let mut l: Lease = serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            message: e.to_string(),
        })?;
        l.revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
        Ok(l)
    }

    /// Reads the current records of `ips` (by address key), in one consistent read.
    async fn read_ips(&self, ips: &[IpAddr]) -> Result<Vec<Option<Lease>>, StoreError> {
        if ips.is_empty() {
            return Ok(Vec::new());
        }
        let ops: Vec<TxnOp> = ips
            .iter()
            .map(|ip| TxnOp::get(self.ip_key(ip), None))
            .collect();
        let resp = self.run(EtcdTxn::new().and_then(ops)).await?;
        let mut out = Vec::with_capacity(ips.len());
        for r in resp.op_responses() {
            match r {
                TxnOpResponse::Get(g) => out.push(g.kvs().first().map(Self::decode).transpose()?),
                _ => out.push(None),
            }
        }
        Ok(out)
    }

    /// One atomic etcd transaction: the claims and at most [`CHUNK`] releases.
    async fn commit_chunk(&self, txn: Txn) -> Result<Outcome, StoreError> {
        for c in &txn.claims {
            check_key_part("pool", &c.pool)?;
            check_key_part("container id", &c.owner.container_id)?;
            check_key_part("interface", &c.owner.ifname)?;
            check_key_part("node", &c.owner.node)?;
        }
        if let Some(dup) = duplicate_claim(&txn.claims) {
            return Ok(Outcome::Conflict(vec![Conflict::DuplicateInTxn(dup)]));
        }
        let mut claims = txn.claims;
        for _ in 0..MAX_ROUNDS {
            let victims = self.victims(&txn.releases).await?;
            let (compares, success, failure) = self.operations(&claims, &victims)?;
            if success.is_empty() {
                return Ok(Outcome::Committed {
                    revision: self.revision().await?,
                    released: Vec::new(),
                });
            }
            let resp = self
                .run(
                    EtcdTxn::new()
                        .when(compares)
                        .and_then(success)
                        .or_else(failure),
                )
                .await?;
            let rev = resp
                .header()
                .map(|h| u64::try_from(h.revision()).unwrap_or(0))
                .unwrap_or(0);
            if resp.succeeded() {
                return Ok(Outcome::Committed {
                    revision: rev,
                    released: victims,
                });
            }
            match Self::refusal(&resp, claims)? {
                Err(conflicts) => return Ok(Outcome::Conflict(conflicts)),
                // Only idempotent re-claims or changed release targets: drop the no-ops, re-read.
                Ok(keep) => claims = keep,
            }
        }
        Err(StoreError::Unavailable {
            message: format!(
                "etcd at {}: records kept changing under the transaction",
                self.endpoints
            ),
            source: None,
        })
    }

    /// The records the releases hit: still owned as stated, each once, at their revision.
    async fn victims(&self, releases: &[Release]) -> Result<Vec<Lease>, StoreError> {
        let targets: Vec<IpAddr> = releases.iter().map(|r| r.ip).collect();
        let current = self.read_ips(&targets).await?;
        let mut victims: Vec<Lease> = Vec::new();
        for (r, cur) in releases.iter().zip(current) {
            if let Some(cur) = cur {
                if owned(&cur, r) && !victims.iter().any(|v| v.ip == cur.ip) {
                    victims.push(cur);
                }
            }
        }
        Ok(victims)
    }

    /// The transaction's compares, success operations (claims written under their four keys,
    /// victims deleted, touched pools' revision keys bumped) and failure reads (what is at each
    /// claim's address and slot).
    #[allow(clippy::type_complexity)]
    fn operations(
        &self,
        claims: &[Lease],
        victims: &[Lease],
    ) -> Result<(Vec<Compare>, Vec<TxnOp>, Vec<TxnOp>), StoreError> {
        let mut compares = Vec::new();
        let mut success = Vec::new();
        let mut failure = Vec::new();
        // A claim of an address a release of this transaction frees (a move): the release's
        // compare on the record's revision guards the address key, which is overwritten, not
        // deleted (etcd refuses two operations on one key in a transaction).
        let mut put_keys = std::collections::HashSet::new();
        for c in claims {
            let [ipk, slot, poolk, nodek] = self.keys_of(c);
            if !victims.iter().any(|v| v.ip == c.ip) {
                compares.push(Compare::create_revision(ipk.clone(), CompareOp::Equal, 0));
            }
            put_keys.extend([ipk.clone(), slot.clone(), poolk.clone(), nodek.clone()]);
            compares.push(Compare::create_revision(slot.clone(), CompareOp::Equal, 0));
            let mut rec = c.clone();
            rec.revision = 0;
            let json = serde_json::to_vec(&rec)
                .map_err(|e| StoreError::failed("cannot encode a record", e))?;
            for k in [&ipk, &slot, &poolk, &nodek] {
                success.push(TxnOp::put(k.as_str(), json.clone(), None));
            }
            failure.push(TxnOp::get(ipk, None));
            failure.push(TxnOp::get(slot, None));
        }
        for v in victims {
            let keys = self.keys_of(v);
            compares.push(Compare::mod_revision(
                keys[0].clone(),
                CompareOp::Equal,
                i64::try_from(v.revision).unwrap_or(i64::MAX),
            ));
            for k in keys {
                if !put_keys.contains(&k) {
                    success.push(TxnOp::delete(k, None));
                }
            }
        }
        let mut touched: Vec<&str> = claims
            .iter()
            .chain(victims.iter())
            .map(|l| l.pool.as_str())
            .collect();
        touched.sort_unstable();
        touched.dedup();
        for pool in touched {
            success.push(TxnOp::put(self.pool_rev_key(pool), Vec::new(), None));
        }
        Ok((compares, success, failure))
    }

    /// What stood in the way of each claim of a refused transaction: `Err` with the conflicts,
    /// or `Ok` with the claims left once idempotent re-claims are dropped.
    fn refusal(
        resp: &etcd_client::TxnResponse,
        claims: Vec<Lease>,
    ) -> Result<Result<Vec<Lease>, Vec<Conflict>>, StoreError> {
        let mut gets = resp.op_responses().into_iter().map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(Self::decode).transpose(),
            _ => Ok(None),
        });
        let mut conflicts = Vec::new();
        let mut keep = Vec::new();
        for c in claims {
            let at_ip = gets.next().transpose()?.flatten();
            let at_slot = gets.next().transpose()?.flatten();
            let mut noop = false;
            match at_ip {
                Some(cur) if cur.owner.same_attachment(&c.owner) => noop = true,
                Some(cur) => conflicts.push(Conflict::IpTaken(cur)),
                None => {}
            }
            match at_slot {
                Some(cur) if cur.ip == c.ip => {}
                Some(cur) => {
                    noop = false;
                    conflicts.push(Conflict::AttachmentBound(cur));
                }
                None => {}
            }
            if !noop {
                keep.push(c);
            }
        }
        Ok(if conflicts.is_empty() {
            Ok(keep)
        } else {
            Err(conflicts)
        })
    }
}

/// A change to a pool's records, seen by [`EtcdStore::watch_pools`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolChange {
    /// The pool.
    pub pool: String,
    /// The address.
    pub ip: IpAddr,
    /// Claimed (true) or released (false).
    pub held: bool,
    /// The store revision of the change.
    pub revision: u64,
}

/// Why [`EtcdStore::watch_pools`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEnd {
    /// etcd compacted past the watch's position, or cancelled it: re-read and watch again.
    Compacted {
        /// etcd's compaction revision (0 when it gave none).
        revision: u64,
    },
    /// The stream ended (connection lost): watch again.
    Closed,
}

impl EtcdStore {
    /// Watches every pool's records (`pool/` keys) from `start_revision` (0: from now) and calls
    /// `on_change` for each claim and release, in revision order. Returns when the watch ends;
    /// the caller then forgets what it cached (changes may have been missed) and watches again.
    pub async fn watch_pools(
        &self,
        start_revision: u64,
        mut on_change: impl FnMut(PoolChange) + Send,
    ) -> Result<WatchEnd, StoreError> {
        let prefix = format!("{}pool/", self.prefix);
        let mut opts = WatchOptions::new().with_prefix();
        if start_revision > 0 {
            opts = opts.with_start_revision(i64::try_from(start_revision).unwrap_or(i64::MAX));
        }
        let mut watch = self.watch.clone();
        let connect = watch.watch(prefix.clone(), Some(opts));
        let mut stream = match tokio::time::timeout(self.timeout, connect).await {
            Ok(r) => r.map_err(|e| map_err(&self.endpoints, e))?,
            Err(e) => {
                return Err(StoreError::unavailable(
                    format!("etcd at {}: watch timed out", self.endpoints),
                    e,
                ))
            }
        };
        loop {
            let msg = stream
                .message()
                .await
                .map_err(|e| map_err(&self.endpoints, e))?;
            let Some(resp) = msg else {
                return Ok(WatchEnd::Closed);
            };
            if resp.canceled() || resp.compact_revision() > 0 {
                return Ok(WatchEnd::Compacted {
                    revision: u64::try_from(resp.compact_revision()).unwrap_or(0),
                });
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key());
                let Some((pool, ip)) = key
                    .strip_prefix(&prefix)
                    .and_then(|rest| rest.rsplit_once('/'))
                else {
                    continue;
                };
                let Ok(ip) = ip.parse::<IpAddr>() else {
                    continue;
                };
                on_change(PoolChange {
                    pool: pool.to_string(),
                    ip,
                    held: matches!(ev.event_type(), EventType::Put),
                    revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
                });
            }
        }
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // the whole key space
}

/// Names become parts of keys: refuse what would make one key look like another's prefix.
fn check_key_part(what: &str, v: &str) -> Result<(), StoreError> {
    if v.is_empty() || v.contains('/') || v.chars().any(char::is_control) {
        return Err(StoreError::Failed {
            message: format!("{what} '{v}' cannot be stored: it must be non-empty, without '/' or control characters"),
            source: None,
        });
    }
    Ok(())
}

fn owned(cur: &Lease, r: &Release) -> bool {
    cur.owner.container_id == r.container_id && cur.owner.ifname == r.ifname
}

#[async_trait::async_trait]
impl LeaseStore for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    async fn list(&self, filter: Filter<'_>) -> Result<Listing, StoreError> {
        let prefix = match filter {
            Filter::All => format!("{}ips/", self.prefix),
            Filter::Pool(p) => format!("{}pool/{p}/", self.prefix),
            Filter::Container(c) => format!("{}att/{c}/", self.prefix),
            Filter::Node(n) => format!("{}node/{n}/", self.prefix),
            // No pod keys in the layout: every record, filtered below.
            Filter::Pod(..) => format!("{}ips/", self.prefix),
        };
        let (revision, kvs) = self.get_prefix(&prefix).await?;
        let mut leases = kvs
            .iter()
            .map(Self::decode)
            .collect::<Result<Vec<_>, _>>()?;
        leases.retain(|l| filter.matches(l));
        leases.sort_by_key(|l| l.ip);
        Ok(Listing { revision, leases })
    }

    async fn commit(&self, txn: Txn) -> Result<Outcome, StoreError> {
        if txn.claims.len() > CHUNK {
            return Err(StoreError::Failed {
                message: format!(
                    "one transaction claims {} addresses; etcd allows at most {CHUNK}",
                    txn.claims.len()
                ),
                source: None,
            });
        }
        apply_in_parts(txn, |part| self.commit_chunk(part)).await
    }

    async fn pool_addresses(
        &self,
        pool: &str,
    ) -> Result<spiderpool_core::store::PoolAddresses, StoreError> {
        // Keys only: `pool/<pool>/<ip>` names the address; no record crosses the network.
        let prefix = format!("{}pool/{pool}/", self.prefix);
        let (revision, kvs) = self.get_prefix_opts(&prefix, true).await?;
        let mut ips = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key());
            let ip = key
                .strip_prefix(&prefix)
                .and_then(|t| t.parse::<IpAddr>().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: key.to_string(),
                    message: "the key does not end with an address".into(),
                })?;
            ips.push(ip);
        }
        Ok(spiderpool_core::store::PoolAddresses { revision, ips })
    }

    async fn pool_revision(&self, pool: &str) -> Result<u64, StoreError> {
        let mut kv = self.kv.clone();
        let req = kv.get(self.pool_rev_key(pool), None);
        let resp = match tokio::time::timeout(self.timeout, req).await {
            Ok(r) => r.map_err(|e| map_err(&self.endpoints, e))?,
            Err(e) => {
                return Err(StoreError::unavailable(
                    format!("etcd at {}: request timed out", self.endpoints),
                    e,
                ))
            }
        };
        Ok(resp
            .kvs()
            .first()
            .map(|kv| u64::try_from(kv.mod_revision()).unwrap_or(0))
            .unwrap_or(0))
    }
}

/// The second claim of an address or attachment slot in `claims`, if any.
fn duplicate_claim(claims: &[Lease]) -> Option<Lease> {
    let mut ips = std::collections::HashSet::new();
    let mut slots = std::collections::HashSet::new();
    claims
        .iter()
        .find(|c| {
            let slot = (&c.owner.container_id, &c.owner.ifname, family_tag(&c.ip));
            !ips.insert(c.ip) || !slots.insert(slot)
        })
        .cloned()
}

/// Applies `txn` with `commit` in parts of at most [`CHUNK`] releases (claims go with the first
/// part; every part is atomic). When part k fails, the error carries what parts 1..k-1 released.
pub async fn apply_in_parts<F, Fut>(txn: Txn, mut commit: F) -> Result<Outcome, StoreError>
where
    F: FnMut(Txn) -> Fut,
    Fut: std::future::Future<Output = Result<Outcome, StoreError>>,
{
    if txn.releases.len() <= CHUNK {
        return commit(txn).await;
    }
    let mut released: Vec<Lease> = Vec::new();
    let mut revision = 0;
    let mut claims = Some(txn.claims);
    for chunk in txn.releases.chunks(CHUNK) {
        let part = Txn {
            claims: claims.take().unwrap_or_default(),
            releases: chunk.to_vec(),
        };
        match commit(part).await {
            Ok(Outcome::Committed {
                revision: r,
                released: mut rel,
            }) => {
                revision = r;
                released.append(&mut rel);
            }
            // Only the first part carries claims, so only it can conflict: nothing applied yet.
            Ok(conflict @ Outcome::Conflict(_)) => return Ok(conflict),
            Err(e) if released.is_empty() => return Err(e),
            Err(e) => {
                return Err(StoreError::PartiallyReleased {
                    released,
                    source: Box::new(e),
                })
            }
        }
    }
    Ok(Outcome::Committed { revision, released })
}

#[cfg(test)]
mod tests {
    use super::*;
    use spiderpool_core::store::Release;

    fn lease(n: usize) -> Lease {
        let ip = IpAddr::from([10, 0, (n / 256) as u8, (n % 256) as u8]).to_string();
        spiderpool_core::conformance::lease(&ip, "p", &format!("c{n}"), "eth0", "n")
    }

    #[test]
    fn a_failed_part_reports_what_the_earlier_parts_released() {
        let leases: Vec<Lease> = (0..CHUNK * 3).map(lease).collect();
        let txn = Txn {
            claims: Vec::new(),
            releases: leases.iter().map(Release::from).collect(),
        };
        let mut part = 0;
        let out = futures::executor::block_on(apply_in_parts(txn, |t| {
            part += 1;
            let n = part;
            let gone: Vec<Lease> = leases
                .iter()
                .filter(|l| t.releases.iter().any(|r| r.ip == l.ip))
                .cloned()
                .collect();
            async move {
                if n == 3 {
                    Err(StoreError::Unavailable {
                        message: "etcd went away".into(),
                        source: None,
                    })
                } else {
                    Ok(Outcome::Committed {
                        revision: n as u64,
                        released: gone,
                    })
                }
            }
        }));
        let err = out.expect_err("part 3 fails");
        assert_eq!(
            err.released(),
            &leases[..CHUNK * 2],
            "parts 1 and 2 were applied"
        );
        assert!(err.is_retryable(), "retryable like its cause: {err}");
        assert!(err
            .to_string()
            .contains(&format!("released {} records", CHUNK * 2)));
    }

    #[test]
    fn a_failed_first_part_is_the_plain_error() {
        let leases: Vec<Lease> = (0..CHUNK + 1).map(lease).collect();
        let txn = Txn {
            claims: Vec::new(),
            releases: leases.iter().map(Release::from).collect(),
        };
        let out = futures::executor::block_on(apply_in_parts(txn, |_| async {
            Err(StoreError::Failed {
                message: "no".into(),
                source: None,
            })
        }));
        assert!(matches!(out, Err(StoreError::Failed { .. })));
    }

    #[test]
    fn duplicate_claims_are_found() {
        let a = lease(1);
        let mut b = lease(2);
        b.owner.container_id = a.owner.container_id.clone();
        assert_eq!(duplicate_claim(&[a.clone(), b.clone()]), Some(b));
        assert_eq!(duplicate_claim(&[a.clone(), lease(2)]), None);
        assert_eq!(duplicate_claim(&[a.clone(), a.clone()]), Some(a));
    }
}
