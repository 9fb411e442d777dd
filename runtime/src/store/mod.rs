//! Handler state: the host's dedup records, the guest's own dedup marks, and the guest's
//! key-value bucket, on one of three backends behind one interface:
//!
//! - `memory`: in this process, bounded, for development;
//! - `redb`: an embedded file (`<data dir>/state.redb`), survives restarts, one process;
//! - `nats-kv`: JetStream key-value buckets, replicated, shared by every Sluice process.
//!
//! Every backend offers the same two primitives, a versioned `get` and a compare-and-swap
//! `swap`; the protocols on top (leases, completion, check-and-mark, guest CAS) are written
//! once, here, so the backends cannot drift apart. Each handler only ever reaches its own
//! namespace: the scoping is done by [`Scope`], which the guest cannot name.

#[cfg(feature = "nats-kv")]
mod kv;
mod memory;
#[cfg(feature = "redb")]
mod redb;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[cfg(feature = "nats-kv")]
pub use self::kv::KvStore;
pub use self::memory::MemoryStore;
#[cfg(feature = "redb")]
pub use self::redb::RedbStore;

/// Which backend a handler uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    Memory,
    Redb,
    NatsKv,
}

impl Backend {
    /// The name a manifest gives it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redb => "redb",
            Backend::NatsKv => "nats-kv",
        }
    }

    /// Whether this build has it: `redb` and `nats-kv` are cargo features (on by default).
    pub fn compiled(self) -> bool {
        match self {
            Backend::Memory => true,
            Backend::Redb => cfg!(feature = "redb"),
            Backend::NatsKv => cfg!(feature = "nats-kv"),
        }
    }
}

/// The three kinds of records a handler owns; each lives in its own table or bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    /// The host's idempotency records (lease, completion).
    Dedup,
    /// The guest's `dedup.check-and-mark` marks.
    GuestDedup,
    /// The guest's `kv` bucket.
    Kv,
    /// Committed outputs waiting for the relay ([`crate::relay`]), by sequence number.
    Outbox,
    /// The resequencer's next expected sequence number per ordering key (`[ordering]
    /// sequence`).
    Sequence,
}

impl Space {
    #[cfg_attr(not(any(feature = "redb", feature = "nats-kv")), allow(dead_code))]
    pub fn prefix(self) -> &'static str {
        match self {
            Space::Dedup => "dedup",
            Space::GuestDedup => "guest-dedup",
            Space::Kv => "kv",
            Space::Outbox => "outbox",
            Space::Sequence => "sequence",
        }
    }
}

/// A value and the version a swap must name to replace it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub version: u64,
}

/// Why a store operation failed. Every variant is a store that cannot be used right now
/// (the caller retries the message later); none is the guest's fault.
#[derive(Debug, Clone, thiserror::Error)]
#[cfg_attr(not(any(feature = "redb", feature = "nats-kv")), allow(dead_code))]
pub enum StoreError {
    /// The backend failed: a database or I/O error (redb), a NATS error (nats-kv).
    #[error("{what}: {source}")]
    Backend {
        /// What was being done.
        what: String,
        /// The backend's error.
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// Other writers kept changing the key.
    #[error("key {key:?} is contended; gave up after {rounds} tries")]
    Contended { key: String, rounds: usize },
    /// The embedded store's writer thread is gone.
    #[error("the store writer has stopped")]
    WriterStopped,
    /// A lock of the store (the memory store, the redb index) was poisoned by a panic.
    #[error("the state store is unusable after a panic")]
    Poisoned,
    /// A call's commit found a key it read changed by another call since: nothing of it
    /// was committed.
    #[error("another call changed this call's state first; nothing was committed")]
    Conflict,
    /// An optimistic commit found its key handled already (by a duplicate delivery, in
    /// another process or earlier): nothing of this call was committed.
    #[error("the key was handled already; nothing was committed")]
    Handled { fingerprint: Option<String> },
    /// A call's commit holds more writes (kv writes and outputs) than the backend commits at
    /// once (`nats-kv`: the server's atomic batch limit).
    #[error(
        "the call's commit holds {writes} writes (kv writes and outputs); this store commits at most {max} at once"
    )]
    TooLarge { writes: usize, max: usize },
}

impl StoreError {
    /// A backend error while doing `what`.
    #[cfg_attr(not(any(feature = "redb", feature = "nats-kv")), allow(dead_code))]
    pub fn backend(what: impl Into<String>, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend { what: what.into(), source: Arc::new(e) }
    }
}

/// What a backend has done since it was opened, from its own counters: what an operator (and
/// the benchmark) reads to know what a message costs in store work. Logged at shutdown.
#[derive(Debug, Default)]
pub struct Counters {
    /// Reads (redb: read transactions; nats-kv: KV gets, each a round trip).
    pub reads: std::sync::atomic::AtomicU64,
    /// Writes asked for (redb: commits, each of any number of keys; nats-kv: KV puts,
    /// creates, updates and deletes, each a durable write to the bucket's stream and a round
    /// trip).
    pub writes: std::sync::atomic::AtomicU64,
    /// redb: durable write transactions, each one fsync (redb's default one-phase commit);
    /// a group commit applies many writes in one.
    pub transactions: std::sync::atomic::AtomicU64,
}

impl Counters {
    #[cfg_attr(not(any(feature = "redb", feature = "nats-kv")), allow(dead_code))]
    pub(crate) fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// `(reads, writes, transactions)`.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        (g(&self.reads), g(&self.writes), g(&self.transactions))
    }
}

/// One backend.
///
/// The `nats-kv` arms of its async methods are boxed: its futures are about 8 KiB (the
/// client's bucket calls), and held inline they made every backend's `begin` and `commit`
/// that large, allocated and copied per message (bench/HISTORY.md, session 14).
#[derive(Debug, Clone)]
pub enum Store {
    Memory(Arc<MemoryStore>),
    #[cfg(feature = "redb")]
    Redb(RedbStore),
    #[cfg(feature = "nats-kv")]
    Kv(Box<KvStore>),
}

impl Store {
    /// Whether an older Sluice's records of `handler` may be somewhere a commit's
    /// expectation does not see (`nats-kv`: its `sluice-dedup-<handler>` bucket).
    async fn legacy_records(&self, handler: &str) -> Result<bool, StoreError> {
        let _ = handler;
        match self {
            #[cfg(feature = "nats-kv")]
            Store::Kv(k) => Box::pin(k.legacy_records(handler)).await,
            #[allow(unreachable_patterns)]
            _ => Ok(false),
        }
    }

    async fn get(&self, handler: &str, space: Space, key: &str) -> Result<Option<Versioned>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.get(handler, space, key)),
            #[cfg(feature = "redb")]
            Store::Redb(r) => r.get(handler, space, key).await,
            #[cfg(feature = "nats-kv")]
            Store::Kv(k) => Box::pin(k.get(handler, space, key)).await,
        }
    }

    /// Replaces the value of `key` if its version is still `expected` (`None`: the key must
    /// be absent); `value` `None` deletes. `None` when someone else changed it first; else
    /// the new version where the backend tells it (`nats-kv`: the revision a later write can
    /// be fenced with), 0 otherwise. `ttl`: how long the backend may keep the value
    /// (`nats-kv`; the local stores expire records by reading them).
    async fn swap(
        &self,
        handler: &str,
        space: Space,
        key: &str,
        expected: Option<u64>,
        value: Option<Vec<u8>>,
        ttl: Option<Duration>,
    ) -> Result<Option<u64>, StoreError> {
        let _ = ttl;
        match self {
            Store::Memory(m) => Ok(m.swap(handler, space, key, expected, value).then_some(0)),
            #[cfg(feature = "redb")]
            Store::Redb(r) => Ok(r.swap(handler, space, key, expected, value).await?.then_some(0)),
            #[cfg(feature = "nats-kv")]
            Store::Kv(k) => Box::pin(k.swap(handler, space, key, expected, value, ttl)).await,
        }
    }

    /// Writes (or, with `None`, removes) `key` whatever its version: one write where the
    /// backend has one, instead of a read and a compare-and-swap.
    async fn put(
        &self,
        handler: &str,
        space: Space,
        key: &str,
        value: Option<Vec<u8>>,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let _ = ttl;
        match self {
            Store::Memory(m) => match m.put(handler, space, key, value) {
                true => Ok(()),
                false => Err(StoreError::Poisoned),
            },
            #[cfg(feature = "redb")]
            Store::Redb(r) => r.put(handler, space, key, value).await,
            #[cfg(feature = "nats-kv")]
            Store::Kv(k) => Box::pin(k.put(handler, space, key, value, ttl)).await,
        }
    }

    /// Applies `ops` together if every expectation holds: false (and nothing applied) when one
    /// does not. On every backend this is one atomic write: on `memory` under one lock, on
    /// `redb` one durable transaction (group-committed with whatever else waits), on `nats-kv`
    /// one publish or one atomic batch to the handler's bucket.
    async fn commit(&self, handler: &str, ops: Vec<Op>) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => m.commit(handler, &ops).ok_or(StoreError::Poisoned),
            #[cfg(feature = "redb")]
            Store::Redb(r) => r.commit(handler, ops).await,
            #[cfg(feature = "nats-kv")]
            Store::Kv(k) => Box::pin(k.commit(handler, ops)).await,
        }
    }

    /// Whether both are the same store (the same map, database or buckets).
    pub fn same(&self, other: &Store) -> bool {
        match (self, other) {
            (Store::Memory(a), Store::Memory(b)) => Arc::ptr_eq(a, b),
            #[cfg(feature = "redb")]
            (Store::Redb(a), Store::Redb(b)) => a.same(b),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Whether several processes share it (`nats-kv`): its failures are the broker's.
    pub fn shared(&self) -> bool {
        match self {
            #[cfg(feature = "nats-kv")]
            Store::Kv(_) => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Where committed outputs wait for the relay: `Some(true)` in the store itself (redb,
    /// nats-kv: they survive a crash), `Some(false)` in the relay's memory only (memory:
    /// nothing of this store survives a restart). Every backend has one; the `Option` is for
    /// the callers that also serve handlers without a store.
    pub fn outbox(&self) -> Option<bool> {
        match self {
            Store::Memory(_) => Some(false),
            #[cfg(feature = "redb")]
            Store::Redb(_) => Some(true),
            #[cfg(feature = "nats-kv")]
            Store::Kv(_) => Some(true),
        }
    }

    /// What the relay finds in its outbox (`space` is [`Space::Outbox`]): on a local store
    /// every entry, in key order. On `nats-kv`, which other processes share, every entry
    /// (`adopting` false: the relay's start, which also sends what a peer has in flight; the
    /// copies are dropped by their ids) or only those left unsent for a while (`adopting`:
    /// an idle relay's look-out for a process that died or was scaled away, and for its own
    /// entries it lost track of; the age is the nats-kv store's `ORPHAN_AGE`, 10 s), oldest
    /// first, keyed so that [`remove`](Self::remove) finds them.
    pub async fn scan(
        &self,
        handler: &str,
        space: Space,
        adopting: bool,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let _ = adopting;
        match self {
            Store::Memory(m) => Ok(m.scan(handler, space)),
            #[cfg(feature = "redb")]
            Store::Redb(r) => r.scan(handler, space).await,
            #[cfg(feature = "nats-kv")]
            Store::Kv(k) => Box::pin(k.scan_outbox(handler, adopting)).await,
        }
    }

    /// Removes the relay's sent entries: on the local stores lazily ([`remove_lazily`](Self::remove_lazily));
    /// on `nats-kv` each removal acknowledged before this returns, so that no other process
    /// takes a sent entry for an orphan.
    pub async fn remove(&self, handler: &str, space: Space, keys: Vec<String>) {
        match self {
            #[cfg(feature = "nats-kv")]
            Store::Kv(k) => Box::pin(k.remove(handler, space, keys)).await,
            #[allow(unreachable_patterns)]
            _ => self.remove_lazily(handler, space, keys),
        }
    }

    /// Removes `keys` from `space` without waiting for it to be durable: on redb the removal
    /// joins the writer's next group commit. A crash before then leaves them in place, which
    /// the caller must tolerate (the relay re-sends an output, which its id makes harmless).
    pub fn remove_lazily(&self, handler: &str, space: Space, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        let ops: Vec<Op> =
            keys.into_iter().map(|key| Op { space, key, expect: Expect::Any, value: None, ttl: None }).collect();
        match self {
            Store::Memory(m) => {
                m.commit(handler, &ops);
            }
            #[cfg(feature = "redb")]
            Store::Redb(r) => r.commit_lazily(handler, ops),
            #[cfg(feature = "nats-kv")]
            Store::Kv(k) => {
                let (k, handler) = (k.clone(), handler.to_owned());
                let keys = ops.into_iter().map(|op| op.key).collect();
                tokio::spawn(async move { k.remove(&handler, space, keys).await });
            }
        }
    }

    /// The in-process leases of a store owned by this process alone (`memory`, `redb`).
    fn local_leases(&self) -> Option<&Leases> {
        match self {
            Store::Memory(m) => Some(&m.leases),
            #[cfg(feature = "redb")]
            Store::Redb(r) => Some(&*r.leases),
            #[cfg(feature = "nats-kv")]
            Store::Kv(_) => None,
        }
    }
}

/// What a write expects of the key's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing: write whatever is there.
    Any,
    /// This version (`None`: the key absent).
    Is(Option<u64>),
}

/// One write of a commit: `value` `None` deletes.
#[derive(Debug, Clone)]
pub struct Op {
    pub space: Space,
    pub key: String,
    pub expect: Expect,
    pub value: Option<Vec<u8>>,
    /// How long the backend may keep the value (`nats-kv` expires it then; the local stores
    /// expire records by reading them and ignore this).
    #[cfg_attr(not(feature = "nats-kv"), allow(dead_code))]
    pub ttl: Option<Duration>,
}

/// In-progress leases kept in memory, for a store only this process uses: a crash loses
/// them with everything the call did, which is harmless (nothing of the call escaped the
/// process before its commit but outputs with stable ids).
#[derive(Debug, Default)]
pub struct Leases {
    /// Handler -> key -> until (ms). Keyed by handler first so that a lookup or a removal
    /// borrows the key instead of allocating one.
    held: std::sync::Mutex<HashMap<Arc<str>, HashMap<String, u64>>>,
}

impl Leases {
    /// Takes the lease on `key` until `until_ms`, unless a live one is held: then the time
    /// it has left.
    fn take(&self, handler: &Arc<str>, key: &str, until_ms: u64) -> Result<(), Duration> {
        let Ok(mut held) = self.held.lock() else { return Ok(()) };
        let now = now_ms();
        let keys = held.entry(handler.clone()).or_default();
        match keys.get_mut(key) {
            Some(until) if *until > now => return Err(Duration::from_millis(*until - now)),
            Some(until) => *until = until_ms,
            None => {
                keys.insert(key.to_owned(), until_ms);
            }
        }
        Ok(())
    }

    fn drop_lease(&self, handler: &Arc<str>, key: &str) {
        if let Ok(mut held) = self.held.lock()
            && let Some(keys) = held.get_mut(&**handler)
        {
            keys.remove(key);
        }
    }
}

/// The most keys one call may write to its kv.
pub const MAX_CALL_WRITES: usize = 10_000;
/// The most bytes of keys and values one call may write.
pub const MAX_CALL_WRITE_BYTES: usize = 16 << 20;

/// A call's effects on its handler's kv, kept aside while it runs and committed with its idempotency record when it succeeds, or
/// dropped when it fails. The guest reads its own writes.
#[derive(Debug, Default)]
pub struct WriteSet {
    pending: Vec<Op>,
    /// Bytes of keys and values written (an overwritten value still counts).
    bytes: usize,
}

impl WriteSet {
    /// True when the call wrote nothing.
    #[cfg(any(test, feature = "cli"))]
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// How many keys the call wrote.
    #[cfg(any(test, feature = "cli"))]
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Refuses a write of `value_len` bytes to `key` that would take the call past
    /// [`MAX_CALL_WRITES`] keys or [`MAX_CALL_WRITE_BYTES`] bytes.
    pub fn room_for(&self, key: &str, value_len: usize) -> Result<(), String> {
        if self.bytes + key.len() + value_len > MAX_CALL_WRITE_BYTES {
            return Err(format!("a call may write at most {MAX_CALL_WRITE_BYTES} bytes of state"));
        }
        if self.pending.len() >= MAX_CALL_WRITES && !self.pending.iter().any(|op| op.key == key) {
            return Err(format!("a call may write at most {MAX_CALL_WRITES} keys"));
        }
        Ok(())
    }

    /// The call's own write of `key`, if it made one: `Some(None)` when it deleted it.
    fn read(&self, space: Space, key: &str) -> Option<Option<&[u8]>> {
        self.pending.iter().find(|op| op.space == space && op.key == key).map(|op| op.value.as_deref())
    }

    /// Records a write. A key written twice keeps the expectation of its first write (what
    /// the call read first must still hold at the commit) and the value of its last.
    fn write(&mut self, space: Space, key: &str, expect: Expect, value: Option<Vec<u8>>) {
        self.bytes += key.len() + value.as_ref().map_or(0, Vec::len);
        match self.pending.iter_mut().find(|op| op.space == space && op.key == key) {
            Some(op) => op.value = value,
            None => self.pending.push(Op { space, key: key.to_owned(), expect, value, ttl: None }),
        }
    }
}

/// A dedup record, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
enum Record {
    /// A process is handling the message until `until_ms` (a lease: a crash lets it lapse).
    InProgress { until_ms: u64 },
    /// Handled; a duplicate before `expires_ms` is skipped.
    Completed {
        expires_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fingerprint: Option<String>,
    },
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// An unreadable record is treated as absent (it can only be replaced).
    fn decode(bytes: &[u8]) -> Option<Record> {
        serde_json::from_slice(bytes).ok()
    }

    fn live(&self, now: u64) -> bool {
        match self {
            Record::InProgress { until_ms } => *until_ms > now,
            Record::Completed { expires_ms, .. } => *expires_ms > now,
        }
    }
}

/// What the host learns when it tries to start a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The lease is ours: run the handler.
    Acquired,
    /// Already handled (with this payload fingerprint, if one was recorded).
    Completed { fingerprint: Option<String> },
    /// Being handled elsewhere; the lease lapses in `remaining` at the latest.
    InProgress { remaining: Duration },
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn after(d: Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How often a compare-and-swap is retried when another process wins the race.
const CAS_ROUNDS: usize = 16;
/// How long a shared store keeps a lease record past its lease (it is replaced by the
/// completion record, or lapses and is taken over, well before).
const LEASE_RECORD_GRACE: Duration = Duration::from_secs(60);
/// Leases held at once on a shared store, at most, whose revision is kept to fence the
/// commit (past this, the oldest are forgotten and their commits go unfenced).
const MAX_FENCES: usize = 100_000;

/// A handler's view of its store: everything is in that handler's namespace.
#[derive(Debug, Clone)]
pub struct Scope {
    store: Store,
    handler: Arc<str>,
    /// On a shared store (`nats-kv`): the revision of each lease this process holds. The
    /// call's commit names it, so a commit whose lease lapsed and was taken over by another
    /// process commits nothing (two processes never both commit one key).
    fences: Arc<std::sync::Mutex<HashMap<String, u64>>>,
    /// On a shared store, for a handler whose every effect is in its commit (no outbound
    /// HTTP, no `dedup` marks): the leases are this process's, in memory, and the commit creates the key's
    /// record or commits nothing ([`Scope::begin`]).
    optimistic: Option<Arc<Leases>>,
}

impl Scope {
    pub fn new(store: Store, handler: Arc<str>) -> Self {
        Scope { store, handler, fences: Arc::default(), optimistic: None }
    }

    /// Says that the handler's calls have effects outside their commit (outbound HTTP, the
    /// guest's `dedup` marks), or not. On a shared store, a handler without such effects is run optimistically: no
    /// lease is written, and a duplicate running elsewhere at the same time is found by its
    /// commit, which then commits nothing ([`Scope::begin`]). A handler with them keeps the
    /// lease record that stops two processes from running one key at once.
    #[must_use]
    pub fn effects_outside_commit(mut self, outside: bool) -> Self {
        self.optimistic = (self.store.shared() && !outside).then(Arc::default);
        self
    }

    /// Where this process keeps its leases in memory: a local store's own map, or an
    /// optimistic scope's.
    fn memory_leases(&self) -> Option<&Leases> {
        self.store.local_leases().or(self.optimistic.as_deref())
    }

    fn fence(&self, key: &str, revision: u64) {
        if let Ok(mut fences) = self.fences.lock() {
            if fences.len() >= MAX_FENCES {
                fences.clear();
            }
            fences.insert(key.to_owned(), revision);
        }
    }

    fn unfence(&self, key: &str) -> Option<u64> {
        let mut fences = self.fences.lock().ok()?;
        // A local store never fences: no hashing for it.
        if fences.is_empty() {
            return None;
        }
        fences.remove(key)
    }

    /// Takes the lease on `key` for `lease`, unless it is completed or leased elsewhere.
    ///
    /// On a store only this process uses (`memory`, `redb`) the lease is kept in memory: one
    /// read of the record, no write. On `nats-kv` it is a record every process sees: a create
    /// first (one round trip for a new key), then, if the key has a record, a read and a
    /// compare-and-swap; but for an optimistic scope ([`Scope::effects_outside_commit`]) it
    /// is kept in memory too and nothing is read or written here: the commit creates the
    /// key's record with the call's effects, or, when the key has one already (handled
    /// elsewhere, or at the same time by another process), commits nothing and says so
    /// ([`StoreError::Handled`]). So a message costs one round trip to `nats-kv`, its commit,
    /// and a duplicate is found after its call rather than before.
    pub async fn begin(&self, key: &str, lease: Duration) -> Result<Begin, StoreError> {
        self.begin_reading(key, lease, false).await
    }

    /// Like [`begin`](Self::begin), for a delivery that waited for another of the same key in
    /// this process (which has likely committed since): an optimistic scope reads the key's
    /// record first, so that the copy is skipped rather than run again to be dropped at its
    /// commit.
    pub async fn begin_after_wait(&self, key: &str, lease: Duration) -> Result<Begin, StoreError> {
        self.begin_reading(key, lease, true).await
    }

    async fn begin_reading(&self, key: &str, lease: Duration, after_wait: bool) -> Result<Begin, StoreError> {
        if let Some(leases) = &self.optimistic {
            // A record an older Sluice kept elsewhere is not seen by the commit: read it.
            if (after_wait || self.store.legacy_records(&self.handler).await?)
                && let Some(fingerprint) = self.completed(key).await?
            {
                return Ok(Begin::Completed { fingerprint });
            }
            return Ok(match leases.take(&self.handler, key, after(lease)) {
                Ok(()) => Begin::Acquired,
                Err(remaining) => Begin::InProgress { remaining },
            });
        }
        if let Some(leases) = self.store.local_leases() {
            if let Some(fingerprint) = self.completed(key).await? {
                return Ok(Begin::Completed { fingerprint });
            }
            return Ok(match leases.take(&self.handler, key, after(lease)) {
                Ok(()) => Begin::Acquired,
                Err(remaining) => Begin::InProgress { remaining },
            });
        }
        let ttl = Some(lease + LEASE_RECORD_GRACE);
        let lease_record = || Record::InProgress { until_ms: after(lease) }.encode();
        if let Some(revision) =
            self.store.swap(&self.handler, Space::Dedup, key, None, Some(lease_record()), ttl).await?
        {
            self.fence(key, revision);
            return Ok(Begin::Acquired);
        }
        for _ in 0..CAS_ROUNDS {
            let current = self.store.get(&self.handler, Space::Dedup, key).await?;
            let now = now_ms();
            let expected = match &current {
                Some(v) => match Record::decode(&v.value).filter(|r| r.live(now)) {
                    Some(Record::Completed { fingerprint, .. }) => return Ok(Begin::Completed { fingerprint }),
                    Some(Record::InProgress { until_ms }) => {
                        return Ok(Begin::InProgress { remaining: Duration::from_millis(until_ms - now) });
                    }
                    None => Some(v.version), // lapsed or unreadable: take it over
                },
                None => None,
            };
            if let Some(revision) =
                self.store.swap(&self.handler, Space::Dedup, key, expected, Some(lease_record()), ttl).await?
            {
                self.fence(key, revision);
                return Ok(Begin::Acquired);
            }
        }
        Err(StoreError::Contended { key: key.to_owned(), rounds: CAS_ROUNDS })
    }

    /// The fingerprint of `key`'s live completion record, if it has one.
    async fn completed(&self, key: &str) -> Result<Option<Option<String>>, StoreError> {
        let current = self.store.get(&self.handler, Space::Dedup, key).await?;
        Ok(match current.and_then(|v| Record::decode(&v.value)).filter(|r| r.live(now_ms())) {
            Some(Record::Completed { fingerprint, .. }) => Some(fingerprint),
            _ => None,
        })
    }

    /// Gives up the lease on `key` so that a retry can take it at once.
    pub async fn release(&self, key: &str) -> Result<(), StoreError> {
        if let Some(leases) = self.memory_leases() {
            leases.drop_lease(&self.handler, key);
            return Ok(());
        }
        // Lost races are fine: whoever changed it owns it now.
        if let Some(revision) = self.unfence(key) {
            self.store.swap(&self.handler, Space::Dedup, key, Some(revision), None, None).await?;
            return Ok(());
        }
        let current = self.store.get(&self.handler, Space::Dedup, key).await?;
        if let Some(v) = current
            && matches!(Record::decode(&v.value), Some(Record::InProgress { .. }))
        {
            self.store.swap(&self.handler, Space::Dedup, key, Some(v.version), None, None).await?;
        }
        Ok(())
    }

    /// The guest's `check-and-mark`: true the first time `key` is seen within `ttl`.
    pub async fn check_and_mark(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        for _ in 0..CAS_ROUNDS {
            let current = self.store.get(&self.handler, Space::GuestDedup, key).await?;
            let expected = match &current {
                Some(v) if Record::decode(&v.value).is_some_and(|r| r.live(now_ms())) => return Ok(false),
                Some(v) => Some(v.version),
                None => None,
            };
            let mark = Record::Completed { expires_ms: after(ttl), fingerprint: None }.encode();
            if self.store.swap(&self.handler, Space::GuestDedup, key, expected, Some(mark), Some(ttl)).await?.is_some()
            {
                return Ok(true);
            }
        }
        Err(StoreError::Contended { key: key.to_owned(), rounds: CAS_ROUNDS })
    }

    /// The guest's `forget`.
    pub async fn forget(&self, key: &str) -> Result<(), StoreError> {
        self.put(Space::GuestDedup, key, None).await
    }

    /// The guest's `kv.get`.
    pub async fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.store.get(&self.handler, Space::Kv, key).await?.map(|v| v.value))
    }

    /// The guest's `kv.set` (`None` deletes).
    #[cfg(any(test, feature = "testing"))]
    pub async fn kv_put(&self, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.put(Space::Kv, key, value).await
    }

    /// The guest's `kv.compare-and-swap`: sets `new` if the value is still `expected`
    /// (`None`: absent).
    #[cfg(any(test, feature = "testing"))]
    pub async fn kv_cas(&self, key: &str, expected: Option<&[u8]>, new: Vec<u8>) -> Result<bool, StoreError> {
        let current = self.store.get(&self.handler, Space::Kv, key).await?;
        let version = match (&current, expected) {
            (None, None) => None,
            (Some(v), Some(e)) if v.value == e => Some(v.version),
            _ => return Ok(false),
        };
        Ok(self.store.swap(&self.handler, Space::Kv, key, version, Some(new), None).await?.is_some())
    }

    /// The next sequence number expected for ordering key `key`, if one was stored.
    pub async fn sequence_next(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let stored = self.store.get(&self.handler, Space::Sequence, key).await?;
        // An unreadable record counts as absent: the key starts over at `sequence_start`.
        Ok(stored.and_then(|v| std::str::from_utf8(&v.value).ok()?.parse().ok()))
    }

    /// The write that stores `next` as the next sequence number of ordering key `key`, for a
    /// commit.
    pub fn sequence_op(key: &str, next: u64) -> Op {
        Op {
            space: Space::Sequence,
            key: key.to_owned(),
            expect: Expect::Any,
            value: Some(next.to_string().into_bytes()),
            ttl: None,
        }
    }

    /// Stores `next` as the next sequence number of ordering key `key`, alone.
    pub async fn sequence_put(&self, key: &str, next: u64) -> Result<(), StoreError> {
        self.put(Space::Sequence, key, Some(next.to_string().into_bytes())).await
    }

    /// Unconditional write (`None` deletes): one write, whatever is there.
    async fn put(&self, space: Space, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.store.put(&self.handler, space, key, value, None).await
    }

    /// The store under this scope.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Commits a successful call: its guest writes, its outbox entries (`outbox`) and, with an
    /// idempotency key, the key's completion record (for `ttl`, with the payload's
    /// fingerprint), in one atomic write (see [`Store::commit`]). Conflicts (another call
    /// changed what this one read; on `nats-kv`, also another process that took the key over
    /// after this call's lease lapsed) fail with [`StoreError::Conflict`] and commit nothing.
    /// The key's lease is given up either way.
    pub async fn commit(
        &self,
        writes: WriteSet,
        outbox: Vec<Op>,
        completion: Option<(&str, Duration, Option<String>)>,
    ) -> Result<(), StoreError> {
        let mut ops = writes.pending;
        ops.extend(outbox);
        if let Some((key, ttl, fingerprint)) = &completion {
            let record = Record::Completed { expires_ms: after(*ttl), fingerprint: fingerprint.clone() }.encode();
            // On a shared store, fenced by the lease: if the lease lapsed and another process
            // took the key over, nothing of this call is committed. Optimistic: the record is
            // created here, so it must not exist yet.
            let expect = match self.unfence(key) {
                Some(revision) => Expect::Is(Some(revision)),
                // Version 0: no message on the key's subject (`nats-kv`), named without a read.
                None if self.optimistic.is_some() => Expect::Is(Some(0)),
                None => Expect::Any,
            };
            ops.push(Op { space: Space::Dedup, key: (*key).to_owned(), expect, value: Some(record), ttl: Some(*ttl) });
        }
        let result = match (&completion, &self.optimistic) {
            (Some((key, ..)), Some(_)) => Box::pin(self.commit_creating(key, ops)).await,
            _ if ops.is_empty() => Ok(true),
            _ => self.store.commit(&self.handler, ops).await,
        };
        if let (Some((key, ..)), Some(leases)) = (&completion, self.memory_leases()) {
            leases.drop_lease(&self.handler, key);
        }
        match result? {
            true => Ok(()),
            false => Err(StoreError::Conflict),
        }
    }

    /// An optimistic commit: `ops`, the last of which creates `key`'s record. When the key
    /// has a record already, nothing is committed and the record says why: handled (by a
    /// duplicate elsewhere: [`StoreError::Handled`]), or leased by a process that runs the
    /// lease protocol (an older Sluice: [`StoreError::Conflict`], retried later). A record
    /// that lapsed, or a deletion left behind, is replaced in another try.
    async fn commit_creating(&self, key: &str, mut ops: Vec<Op>) -> Result<bool, StoreError> {
        for _ in 0..CAS_ROUNDS {
            // Kept for another try: the backend consumes what it commits. Only the last
            // (the record) changes between tries.
            let again = ops.clone();
            let tried = ops.last().map(|record| record.expect);
            if self.store.commit(&self.handler, ops).await? {
                return Ok(true);
            }
            let current = self.store.get(&self.handler, Space::Dedup, key).await?;
            let expected = match &current {
                Some(v) => match Record::decode(&v.value).filter(|r| r.live(now_ms())) {
                    Some(Record::Completed { fingerprint, .. }) => return Err(StoreError::Handled { fingerprint }),
                    Some(Record::InProgress { .. }) => return Ok(false),
                    None => Some(v.version),
                },
                // Absent: no message, or a deletion, whose revision the backend names.
                None => None,
            };
            // The record was as expected: another expectation failed (a kv compare-and-swap).
            if tried == Some(Expect::Is(expected)) {
                return Ok(false);
            }
            ops = again;
            if let Some(record) = ops.last_mut() {
                record.expect = Expect::Is(expected);
            }
        }
        Err(StoreError::Contended { key: key.to_owned(), rounds: CAS_ROUNDS })
    }

    /// The guest's `kv.get`, inside a call: its own writes first.
    pub async fn kv_get_in(&self, writes: &WriteSet, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match writes.read(Space::Kv, key) {
            Some(own) => Ok(own.map(<[u8]>::to_vec)),
            None => self.kv_get(key).await,
        }
    }

    /// The guest's `kv.set` (`None` deletes), inside a call.
    pub fn kv_put_in(&self, writes: &mut WriteSet, key: &str, value: Option<Vec<u8>>) {
        writes.write(Space::Kv, key, Expect::Any, value);
    }

    /// The guest's `kv.compare-and-swap`, inside a call: compared with what the call sees
    /// (its own writes first); the version read must still be current at the commit.
    pub async fn kv_cas_in(
        &self,
        writes: &mut WriteSet,
        key: &str,
        expected: Option<&[u8]>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let expect = match writes.read(Space::Kv, key) {
            Some(own) => {
                if own != expected {
                    return Ok(false);
                }
                Expect::Any // the first write's expectation stands
            }
            None => {
                let current = self.store.get(&self.handler, Space::Kv, key).await?;
                if current.as_ref().map(|v| v.value.as_slice()) != expected {
                    return Ok(false);
                }
                Expect::Is(current.map(|v| v.version))
            }
        };
        writes.write(Space::Kv, key, expect, Some(new));
        Ok(true)
    }
}

/// The protocol every backend must follow, as one test routine: the unit tests run it on
/// `memory` and `redb`, the integration tests on `nats-kv` against a real server.
#[cfg(any(test, feature = "testing"))]
#[allow(clippy::unwrap_used)]
pub mod conformance {
    use std::time::Duration;

    use super::{Begin, Scope, Space, Store, WriteSet};

    fn entry_op(key: &str) -> super::Op {
        super::Op {
            space: Space::Outbox,
            key: key.to_owned(),
            expect: super::Expect::Any,
            value: Some(key.as_bytes().to_vec()),
            ttl: None,
        }
    }

    pub async fn protocol(store: Store) {
        let a = Scope::new(store.clone(), "a".into());
        let b = Scope::new(store, "b".into());
        // Generous times: a durable commit on a loaded machine can take a good part of a second.
        let lease = Duration::from_millis(600);

        assert_eq!(a.begin("k", lease).await.unwrap(), Begin::Acquired);
        assert!(matches!(a.begin("k", lease).await.unwrap(), Begin::InProgress { .. }));
        // Another handler's namespace is separate.
        assert_eq!(b.begin("k", lease).await.unwrap(), Begin::Acquired);

        a.release("k").await.unwrap();
        assert_eq!(a.begin("k", lease).await.unwrap(), Begin::Acquired);
        a.commit(WriteSet::default(), Vec::new(), Some(("k", Duration::from_millis(900), Some("fp".into()))))
            .await
            .unwrap();
        assert_eq!(a.begin("k", lease).await.unwrap(), Begin::Completed { fingerprint: Some("fp".into()) });

        // A lapsed lease is taken over; an expired completion is forgotten.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(a.begin("k", lease).await.unwrap(), Begin::Acquired);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(a.begin("k", lease).await.unwrap(), Begin::Acquired);

        assert!(a.check_and_mark("m", Duration::from_secs(60)).await.unwrap());
        assert!(!a.check_and_mark("m", Duration::from_secs(60)).await.unwrap());
        assert!(b.check_and_mark("m", Duration::from_secs(60)).await.unwrap());
        a.forget("m").await.unwrap();
        assert!(a.check_and_mark("m", Duration::from_secs(60)).await.unwrap());

        assert_eq!(a.kv_get("x").await.unwrap(), None);
        assert!(a.kv_cas("x", None, b"1".to_vec()).await.unwrap());
        assert!(!a.kv_cas("x", None, b"2".to_vec()).await.unwrap());
        assert!(!a.kv_cas("x", Some(b"9"), b"2".to_vec()).await.unwrap());
        assert!(a.kv_cas("x", Some(b"1"), b"2".to_vec()).await.unwrap());
        assert_eq!(a.kv_get("x").await.unwrap(), Some(b"2".to_vec()));
        assert_eq!(b.kv_get("x").await.unwrap(), None);
        a.kv_put("x", None).await.unwrap();
        assert_eq!(a.kv_get("x").await.unwrap(), None);
        a.kv_put("y", Some(b"v".to_vec())).await.unwrap();
        assert_eq!(a.kv_get("y").await.unwrap(), Some(b"v".to_vec()));

        // A call's writes: read back inside the call, invisible outside until the commit,
        // committed with the key's record in one write.
        assert_eq!(a.begin("c", lease).await.unwrap(), Begin::Acquired);
        let mut w = WriteSet::default();
        a.kv_put_in(&mut w, "n", Some(b"1".to_vec()));
        assert_eq!(a.kv_get_in(&w, "n").await.unwrap(), Some(b"1".to_vec()));
        assert!(a.kv_cas_in(&mut w, "n", Some(b"1"), b"2".to_vec()).await.unwrap());
        assert!(!a.kv_cas_in(&mut w, "n", Some(b"1"), b"3".to_vec()).await.unwrap());
        assert_eq!(a.kv_get("n").await.unwrap(), None, "not visible before the commit");
        a.commit(w, Vec::new(), Some(("c", Duration::from_secs(60), None))).await.unwrap();
        assert_eq!(a.kv_get("n").await.unwrap(), Some(b"2".to_vec()));
        assert_eq!(a.begin("c", lease).await.unwrap(), Begin::Completed { fingerprint: None });

        // A dropped write set leaves nothing.
        let mut dropped = WriteSet::default();
        a.kv_put_in(&mut dropped, "gone", Some(b"x".to_vec()));
        drop(dropped);
        assert_eq!(a.kv_get("gone").await.unwrap(), None);

        // Two calls read the same version; the second to commit conflicts and commits nothing.
        let (mut first, mut second) = (WriteSet::default(), WriteSet::default());
        assert!(a.kv_cas_in(&mut first, "n", Some(b"2"), b"3".to_vec()).await.unwrap());
        assert!(a.kv_cas_in(&mut second, "n", Some(b"2"), b"30".to_vec()).await.unwrap());
        a.kv_put_in(&mut second, "side", Some(b"s".to_vec()));
        a.commit(first, Vec::new(), None).await.unwrap();
        assert!(matches!(a.commit(second, Vec::new(), None).await, Err(super::StoreError::Conflict)));
        assert_eq!(a.kv_get("n").await.unwrap(), Some(b"3".to_vec()));
        assert_eq!(a.kv_get("side").await.unwrap(), None, "a conflicting commit keeps none of its writes");
        // A failed call gives up its lease: the retry takes it at once.
        assert_eq!(a.begin("r", lease).await.unwrap(), Begin::Acquired);
        a.release("r").await.unwrap();
        assert_eq!(a.begin("r", lease).await.unwrap(), Begin::Acquired);

        // A shared store: another process (another scope: its own leases) takes over a key
        // whose lease lapsed; the first process's late commit is fenced off and keeps nothing.
        if a.store().shared() {
            let other = Scope::new(a.store().clone(), "a".into());
            let short = Duration::from_millis(300);
            assert_eq!(a.begin("z", short).await.unwrap(), Begin::Acquired);
            assert!(matches!(other.begin("z", short).await.unwrap(), Begin::InProgress { .. }));
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(other.begin("z", lease).await.unwrap(), Begin::Acquired);
            let mut late = WriteSet::default();
            a.kv_put_in(&mut late, "zombie", Some(b"1".to_vec()));
            let fenced = a.commit(late, Vec::new(), Some(("z", Duration::from_secs(60), None))).await;
            assert!(matches!(fenced, Err(super::StoreError::Conflict)), "{fenced:?}");
            assert_eq!(a.kv_get("zombie").await.unwrap(), None, "a fenced commit keeps none of its writes");
            other.commit(WriteSet::default(), Vec::new(), Some(("z", Duration::from_secs(60), None))).await.unwrap();
            assert_eq!(a.begin("z", lease).await.unwrap(), Begin::Completed { fingerprint: None });

            // Optimistic (a handler whose every effect is in its commit): no lease record.
            // Two processes may run one key at once; the first commit keeps its effects, the
            // second keeps nothing and is told the key was handled.
            let day = Duration::from_secs(86_400);
            let p = Scope::new(a.store().clone(), "a".into()).effects_outside_commit(false);
            let q = Scope::new(a.store().clone(), "a".into()).effects_outside_commit(false);
            assert_eq!(p.begin("w", lease).await.unwrap(), Begin::Acquired);
            assert!(matches!(p.begin("w", lease).await.unwrap(), Begin::InProgress { .. }), "one process runs it once");
            assert_eq!(q.begin("w", lease).await.unwrap(), Begin::Acquired);
            let (mut pw, mut qw) = (WriteSet::default(), WriteSet::default());
            p.kv_put_in(&mut pw, "by-p", Some(b"1".to_vec()));
            q.kv_put_in(&mut qw, "by-q", Some(b"1".to_vec()));
            p.commit(pw, Vec::new(), Some(("w", day, Some("fp".into())))).await.unwrap();
            let lost = q.commit(qw, vec![entry_op("lost")], Some(("w", day, Some("fp".into())))).await;
            assert!(matches!(&lost, Err(super::StoreError::Handled { fingerprint: Some(f) }) if f == "fp"), "{lost:?}");
            assert_eq!(a.kv_get("by-p").await.unwrap(), Some(b"1".to_vec()));
            assert_eq!(a.kv_get("by-q").await.unwrap(), None, "the second commit keeps none of its writes");
            assert!(a.store().scan("a", Space::Outbox, false).await.unwrap().is_empty(), "nor its outbox entry");
            assert_eq!(a.begin("w", lease).await.unwrap(), Begin::Completed { fingerprint: Some("fp".into()) });
            assert_eq!(q.begin("w", lease).await.unwrap(), Begin::Acquired, "its lease went with the commit");
            q.release("w").await.unwrap();
            // A copy that waited in this process for another of its key reads the record.
            assert_eq!(
                q.begin_after_wait("w", lease).await.unwrap(),
                Begin::Completed { fingerprint: Some("fp".into()) }
            );
            // A key a lease process deleted (a released lease leaves a deletion behind) is
            // created over the deletion; a key leased by one is left to it.
            assert_eq!(a.begin("t", lease).await.unwrap(), Begin::Acquired);
            a.release("t").await.unwrap();
            assert_eq!(p.begin("t", lease).await.unwrap(), Begin::Acquired);
            p.commit(WriteSet::default(), Vec::new(), Some(("t", day, None))).await.unwrap();
            assert_eq!(a.begin("t", lease).await.unwrap(), Begin::Completed { fingerprint: None });
            assert_eq!(a.begin("u", lease).await.unwrap(), Begin::Acquired);
            assert_eq!(p.begin("u", lease).await.unwrap(), Begin::Acquired);
            let leased = p.commit(WriteSet::default(), Vec::new(), Some(("u", day, None))).await;
            assert!(matches!(leased, Err(super::StoreError::Conflict)), "{leased:?}");
            // A kv compare-and-swap another call beat fails the commit as a conflict (and
            // creates no record), not as a key to create again.
            let (mut first, mut second) = (WriteSet::default(), WriteSet::default());
            assert!(p.kv_cas_in(&mut first, "cas", None, b"1".to_vec()).await.unwrap());
            assert!(p.kv_cas_in(&mut second, "cas", None, b"2".to_vec()).await.unwrap());
            p.commit(first, Vec::new(), Some(("c1", day, None))).await.unwrap();
            let beaten = p.commit(second, Vec::new(), Some(("c2", day, None))).await;
            assert!(matches!(beaten, Err(super::StoreError::Conflict)), "{beaten:?}");
            assert_eq!(p.kv_get("cas").await.unwrap(), Some(b"1".to_vec()));
            assert_eq!(p.begin_after_wait("c2", lease).await.unwrap(), Begin::Acquired, "no record for c2");
        }

        // Outbox entries commit with the call, are read back in key order, per handler, and
        // go once removed.
        let entry = entry_op;
        if a.store().outbox() == Some(true) {
            let mut w = WriteSet::default();
            a.kv_put_in(&mut w, "with-outbox", Some(b"1".to_vec()));
            a.commit(w, vec![entry("00000000000000000010"), entry("00000000000000000009")], Some(("o", lease, None)))
                .await
                .unwrap();
            let scan = |scope: &Scope, handler: &'static str| {
                let store = scope.store().clone();
                async move { store.scan(handler, Space::Outbox, false).await.unwrap() }
            };
            let found = scan(&a, "a").await;
            let keys: Vec<String> = found.iter().map(|(k, _)| k.clone()).collect();
            // A local store keys them by sequence number, in order; a shared one prefixes the
            // writing store's instance and returns them in commit order.
            let mut seqs: Vec<&str> = keys.iter().map(|k| k.rsplit('.').next().unwrap()).collect();
            if !a.store().shared() {
                assert_eq!(seqs, ["00000000000000000009", "00000000000000000010"]);
            }
            seqs.sort();
            assert_eq!(seqs, ["00000000000000000009", "00000000000000000010"]);
            for (key, value) in &found {
                assert!(key.ends_with(std::str::from_utf8(value).unwrap()), "{key} holds another entry's value");
            }
            assert!(scan(&b, "b").await.is_empty());
            // A conflicting commit leaves no outbox entry either.
            let (mut first, mut second) = (WriteSet::default(), WriteSet::default());
            assert!(a.kv_cas_in(&mut first, "with-outbox", Some(b"1"), b"2".to_vec()).await.unwrap());
            assert!(a.kv_cas_in(&mut second, "with-outbox", Some(b"1"), b"3".to_vec()).await.unwrap());
            a.commit(first, Vec::new(), None).await.unwrap();
            assert!(a.commit(second, vec![entry("00000000000000000011")], None).await.is_err());
            assert_eq!(scan(&a, "a").await.len(), 2);
            a.store().remove_lazily("a", Space::Outbox, keys);
            // Lazily: durable with a later commit, visible once the writer has applied it.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while !scan(&a, "a").await.is_empty() {
                assert!(tokio::time::Instant::now() < deadline, "the removal never applied");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_protocol() {
        conformance::protocol(Store::Memory(Arc::new(MemoryStore::new(1000)))).await;
    }

    #[cfg(feature = "redb")]
    #[tokio::test]
    async fn redb_store_protocol() {
        let dir = tempfile::tempdir().unwrap();
        conformance::protocol(Store::Redb(RedbStore::open(&dir.path().join("s.redb")).unwrap())).await;
    }

    #[test]
    fn memory_store_is_bounded() {
        let m = MemoryStore::new(10);
        for i in 0..100 {
            assert!(m.swap("h", Space::Kv, &i.to_string(), None, Some(vec![1])));
        }
        assert!(m.len() <= 10);
        assert!(m.get("h", Space::Kv, "99").is_some(), "the newest entries are kept");
    }
}
