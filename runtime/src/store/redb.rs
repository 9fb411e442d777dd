//! The `redb` backend: one embedded database file per Sluice process (`<data dir>/state.redb`,
//! a table per handler and space).
//!
//! Reads use read transactions directly. Writes go to one writer thread that applies
//! every commit waiting in its queue in a single transaction and commits it durably (one fsync
//! per batch, not per message: group commit), then answers each caller. It also sweeps
//! expired dedup records once a minute.
//!
//! The host's idempotency records, one per message, are the bulk of the writes, and their keys
//! are random: in a B-tree keyed by them every commit would rewrite a random leaf per message.
//! So they are kept as an **append log** (`dedup-log/<handler>`, keyed by a growing sequence
//! number: every insert lands on the tree's right edge) with an **in-memory index** from a hash
//! of (handler, key) to the log sequences, rebuilt by one scan of the log when the store
//! opens. A lookup that misses (almost every first delivery) never touches the file; a hit
//! reads its log entry and compares the full key. One TTL per handler makes log order expiry
//! order, so the sweep deletes the log's expired prefix. Measured against the alternatives in
//! `bench/STORES.md`. The index costs 20 to 35 bytes per live record (message rate × TTL;
//! a hash table's load varies between its growths).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use tokio::sync::oneshot;

use super::{Counters, Expect, Leases, Op, Record, Space, StoreError, Versioned, now_ms};

/// Commits applied in one transaction at most.
const MAX_BATCH: usize = 1024;
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A queue of at least this many commits is load: the writer lingers ([`LINGER`]) for more
/// before it commits. A lone commit goes at once.
const LINGER_FROM: usize = 8;

/// How long the writer waits for more commits under load. The cost of a transaction is
/// mostly fixed (tree roots, allocator state, the fsync: bench/HISTORY.md, session 11), so a
/// larger group is cheaper per message; the wait is added to the commit latency only when
/// others are queued behind.
const LINGER: Duration = Duration::from_millis(1);

#[derive(Debug, Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    writer: mpsc::Sender<Job>,
    pub(super) leases: Arc<Leases>,
    counters: Arc<Counters>,
    /// The idempotency records' index (see the module docs).
    index: Arc<RwLock<Index>>,
}

/// Where each live idempotency record is in its handler's log: hash of (handler, key) -> log
/// sequence, 16 bytes a record plus the table's slack; the rare hashes two live keys share keep their
/// sequences in `shared` instead.
#[derive(Debug, Default)]
struct Index {
    hasher: std::hash::RandomState,
    slots: HashMap<u64, u64, Prehashed>,
    shared: HashMap<u64, Vec<u64>, Prehashed>,
}

/// The index's maps are keyed by a hash already: the keyed SipHash of (handler, key), as
/// unpredictable to a sender as the map's own would be, so it is used as it is rather
/// than hashed a second time on every lookup.
#[derive(Debug, Default, Clone, Copy)]
struct Prehashed;

impl BuildHasher for Prehashed {
    type Hasher = PrehashedHasher;

    fn build_hasher(&self) -> PrehashedHasher {
        PrehashedHasher(0)
    }
}

#[derive(Debug, Default)]
struct PrehashedHasher(u64);

impl std::hash::Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here (`write_u64`); this is the trait's required
        // fallback, a plain fold of the bytes.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Index {
    fn hash(&self, handler: &str, key: &str) -> u64 {
        self.hasher.hash_one((handler, key))
    }

    fn seqs(&self, hash: u64) -> &[u64] {
        match self.slots.get(&hash) {
            Some(seq) => std::slice::from_ref(seq),
            None => self.shared.get(&hash).map_or(&[], Vec::as_slice),
        }
    }

    fn add(&mut self, hash: u64, seq: u64) {
        if let Some(seqs) = self.shared.get_mut(&hash) {
            seqs.push(seq);
        } else if let Some(first) = self.slots.remove(&hash) {
            self.shared.insert(hash, vec![first, seq]);
        } else {
            self.slots.insert(hash, seq);
        }
    }

    fn remove(&mut self, hash: u64, seq: u64) {
        if self.slots.get(&hash) == Some(&seq) {
            self.slots.remove(&hash);
        } else if let Some(seqs) = self.shared.get_mut(&hash) {
            seqs.retain(|s| *s != seq);
            match seqs[..] {
                [] => {
                    self.shared.remove(&hash);
                }
                [only] => {
                    self.shared.remove(&hash);
                    self.slots.insert(hash, only);
                }
                _ => {}
            }
        }
    }

    fn len(&self) -> usize {
        self.slots.len() + self.shared.values().map(Vec::len).sum::<usize>()
    }
}

/// A handler's log of idempotency records.
fn log_name(handler: &str) -> String {
    format!("dedup-log/{handler}")
}

fn log_def(name: &str) -> TableDefinition<'_, u64, &'static [u8]> {
    TableDefinition::new(name)
}

/// A log entry: the key's length (u32, little endian), the key, then the record.
fn log_entry(key: &str, record: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(4 + key.len() + record.len());
    bytes.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_le_bytes());
    bytes.extend_from_slice(key.as_bytes());
    bytes.extend_from_slice(record);
    bytes
}

/// The key and the record of a log entry.
fn split_entry(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (len, rest) = bytes.split_at_checked(4)?;
    let len = usize::try_from(u32::from_le_bytes(len.try_into().ok()?)).ok()?;
    let (key, record) = rest.split_at_checked(len)?;
    Some((std::str::from_utf8(key).ok()?, record))
}

/// The sequence of `key`'s entry among `seqs` in `log`.
fn find_in<T: ReadableTable<u64, &'static [u8]>>(log: &T, seqs: &[u64], key: &str) -> Result<Option<u64>, redb::Error> {
    for &seq in seqs.iter().rev() {
        if let Some(v) = log.get(seq)?
            && split_entry(v.value()).is_some_and(|(k, _)| k == key)
        {
            return Ok(Some(seq));
        }
    }
    Ok(None)
}

/// Writes applied together or not at all (every expectation must hold), in the writer's
/// next transaction.
struct Job {
    handler: String,
    ops: Vec<Op>,
    /// `None`: nobody waits (a lazy removal).
    reply: Option<oneshot::Sender<Result<bool, StoreError>>>,
}

fn table_name(handler: &str, space: Space) -> String {
    format!("{}/{handler}", space.prefix())
}

/// Stored bytes: the version (8 bytes, little endian), then the value.
fn split(bytes: &[u8]) -> Option<Versioned> {
    let (version, value) = bytes.split_at_checked(8)?;
    Some(Versioned { version: u64::from_le_bytes(version.try_into().ok()?), value: value.to_vec() })
}

impl RedbStore {
    /// Opens (or creates) the database at `path`. Fails if another process has it open.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::backend(format!("cannot create {}", dir.display()), e))?;
        }
        let db = open_when_free(path).map_err(|e| {
            let what = format!(
                "cannot open the state store {} (each Sluice process needs its own --data-dir; \
                 use the nats-kv backend to share state between processes)",
                path.display()
            );
            StoreError::backend(what, e)
        })?;
        let started = Instant::now();
        let (index, next_seq) = load_log(&db).map_err(|e| StoreError::backend("reading the state store", e))?;
        let records = index.len();
        if started.elapsed() > Duration::from_millis(500) {
            tracing::info!(records, took = ?started.elapsed(), "state store: idempotency index rebuilt");
        }
        let db = Arc::new(db);
        let index = Arc::new(RwLock::new(index));
        let (writer, queue) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let worker = Worker { db: db.clone(), counters: counters.clone(), index: index.clone(), next_seq };
        std::thread::Builder::new()
            .name("sluice-redb".into())
            .spawn(move || worker.run(&queue))
            .map_err(|e| StoreError::backend("cannot start the store writer", e))?;
        Ok(RedbStore { db, writer, leases: Arc::default(), counters, index })
    }

    /// What this store has done since it was opened.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Reads `key`. The read runs on the calling thread: a redb read transaction takes no
    /// lock the writer holds and, on a store whose pages are cached (a dedup store's recent
    /// keys are), finishes in microseconds, far less than handing it to a blocking thread
    /// would cost.
    pub async fn get(&self, handler: &str, space: Space, key: &str) -> Result<Option<Versioned>, StoreError> {
        Counters::add(&self.counters.reads, 1);
        if space == Space::Dedup {
            return self.get_record(handler, key);
        }
        let txn = self.db.begin_read().map_err(|e| StoreError::backend("reading the state store", e))?;
        let table = table_name(handler, space);
        let def = TableDefinition::<&str, &[u8]>::new(&table);
        let table = match txn.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(StoreError::backend("reading the state store", e)),
        };
        let value = table.get(key).map_err(|e| StoreError::backend("reading the state store", e))?;
        Ok(value.and_then(|v| split(v.value())))
    }

    pub async fn swap(
        &self,
        handler: &str,
        space: Space,
        key: &str,
        expected: Option<u64>,
        value: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        self.commit(handler, vec![Op { space, key: key.to_owned(), expect: Expect::Is(expected), value, ttl: None }])
            .await
    }

    /// Writes (or, with `None`, removes) `key` whatever its version.
    pub async fn put(&self, handler: &str, space: Space, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.commit(handler, vec![Op { space, key: key.to_owned(), expect: Expect::Any, value, ttl: None }])
            .await
            .map(|_| ())
    }

    /// Applies `ops` together if every expectation holds (false otherwise, nothing applied),
    /// in one durable transaction shared with the other writes waiting.
    pub async fn commit(&self, handler: &str, ops: Vec<Op>) -> Result<bool, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { handler: handler.to_owned(), ops, reply: Some(reply) };
        self.writer.send(job).map_err(|_| StoreError::WriterStopped)?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// An idempotency record: from the index, then (on a hit) its log entry.
    fn get_record(&self, handler: &str, key: &str) -> Result<Option<Versioned>, StoreError> {
        let failed = |e: redb::Error| StoreError::backend("reading the state store", e);
        let seqs: Vec<u64> = match self.index.read() {
            Ok(index) => index.seqs(index.hash(handler, key)).to_vec(),
            Err(_) => return Err(StoreError::Poisoned),
        };
        if seqs.is_empty() {
            return Ok(None);
        }
        let txn = self.db.begin_read().map_err(|e| failed(e.into()))?;
        let name = log_name(handler);
        let log = match txn.open_table(log_def(&name)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(failed(e.into())),
        };
        // An entry the writer removed since the index was read was expired or replaced; a
        // replacement is only written for a key whose record was no longer live.
        let Some(seq) = find_in(&log, &seqs, key).map_err(failed)? else { return Ok(None) };
        let entry = log.get(seq).map_err(|e| failed(e.into()))?;
        Ok(entry
            .and_then(|v| split_entry(v.value()).map(|(_, record)| Versioned { value: record.to_vec(), version: seq })))
    }

    /// Whether both are handles on the same database.
    pub fn same(&self, other: &RedbStore) -> bool {
        Arc::ptr_eq(&self.db, &other.db)
    }

    /// Queues `ops` for the writer's next transaction without waiting for it: they are
    /// durable with the next group commit (a crash before then loses them).
    pub fn commit_lazily(&self, handler: &str, ops: Vec<Op>) {
        let _ = self.writer.send(Job { handler: handler.to_owned(), ops, reply: None });
    }

    /// Every record of `handler`'s `space`, in key order.
    pub async fn scan(&self, handler: &str, space: Space) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let failed = |e: redb::Error| StoreError::backend("reading the state store", e);
        let txn = self.db.begin_read().map_err(|e| failed(e.into()))?;
        let name = table_name(handler, space);
        let table = match txn.open_table(TableDefinition::<&str, &[u8]>::new(&name)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(failed(e.into())),
        };
        let mut found = Vec::new();
        for row in table.iter().map_err(|e| failed(e.into()))? {
            let (key, value) = row.map_err(|e| failed(e.into()))?;
            if let Some(v) = split(value.value()) {
                found.push((key.value().to_owned(), v.value));
            }
        }
        Ok(found)
    }
}

/// Opens the database, waiting up to a second for a lock held by a store of this same
/// process that is shutting down (its writer thread lets go once its last user is gone).
fn open_when_free(path: &Path) -> Result<Database, redb::DatabaseError> {
    let mut tries = 0;
    loop {
        match Database::create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// Rebuilds the index from every handler's log, after moving the records of a store written
/// by an older version (a `dedup/<handler>` table keyed by the key) into logs. Returns the
/// index and the next log sequence.
fn load_log(db: &Database) -> Result<(Index, u64), redb::Error> {
    let txn = db.begin_write()?;
    let legacy: Vec<String> =
        txn.list_tables()?.map(|t| t.name().to_owned()).filter(|n| n.starts_with("dedup/")).collect();
    let mut next = 1;
    let logs: Vec<String> =
        txn.list_tables()?.map(|t| t.name().to_owned()).filter(|n| n.starts_with("dedup-log/")).collect();
    for name in &logs {
        let log = txn.open_table(log_def(name))?;
        if let Some((last, _)) = log.last()? {
            next = next.max(last.value() + 1);
        }
    }
    let now = now_ms();
    for name in &legacy {
        let handler = &name["dedup/".len()..];
        let old = txn.open_table(TableDefinition::<&str, &[u8]>::new(name))?;
        let mut live = Vec::new();
        for row in old.iter()? {
            let (key, value) = row?;
            if let Some(v) = split(value.value())
                && Record::decode(&v.value).is_some_and(|r| r.live(now))
            {
                live.push((key.value().to_owned(), v.value));
            }
        }
        drop(old);
        let log_table = log_name(handler);
        let mut log = txn.open_table(log_def(&log_table))?;
        for (key, record) in live {
            log.insert(next, log_entry(&key, &record).as_slice())?;
            next += 1;
        }
        drop(log);
        txn.delete_table(TableDefinition::<&str, &[u8]>::new(name))?;
    }
    txn.commit()?;

    let mut index = Index::default();
    let txn = db.begin_read()?;
    for table in txn.list_tables()? {
        let Some(handler) = table.name().strip_prefix("dedup-log/") else { continue };
        let handler = handler.to_owned();
        let log = txn.open_table(log_def(table.name()))?;
        for row in log.iter()? {
            let (seq, value) = row?;
            if let Some((key, _)) = split_entry(value.value()) {
                index.add(index.hash(&handler, key), seq.value());
            }
        }
    }
    Ok((index, next))
}

/// The writer thread's state.
struct Worker {
    db: Arc<Database>,
    counters: Arc<Counters>,
    index: Arc<RwLock<Index>>,
    next_seq: u64,
}

/// An idempotency record changed by a transaction: the entry it replaced (found before the
/// transaction's first change to it) and its entry now.
struct Change {
    /// The index's hash of (handler, key), computed once.
    hash: u64,
    replaced: Option<u64>,
    now: Option<u64>,
}

/// Expired records removed from the logs per sweep transaction, and transactions per sweep
/// at most (the rest waits for the next sweep: the writer is not held for long).
const SWEEP_CHUNK: usize = 10_000;
const SWEEP_CHUNKS: usize = 50;

impl Worker {
    fn run(mut self, queue: &mpsc::Receiver<Job>) {
        // Versions only grow, across restarts too (they start from the clock), so a
        // compare-and-swap never mistakes a re-created key for the one it read.
        let mut next_version = now_ms().saturating_mul(1000);
        let mut last_sweep = Instant::now();
        loop {
            let first = match queue.recv_timeout(SWEEP_EVERY) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.sweep();
                    last_sweep = Instant::now();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            // Under load, wait a little for more: a transaction costs the same whether it
            // holds ten commits or a hundred. Asleep, not waiting on the queue: a wait would
            // be woken by every commit that arrives.
            if batch.len() >= LINGER_FROM && batch.len() < MAX_BATCH {
                std::thread::sleep(LINGER);
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
            }
            match self.apply(&batch, &mut next_version) {
                Ok(results) => {
                    Counters::add(&self.counters.transactions, 1);
                    Counters::add(&self.counters.writes, batch.len() as u64);
                    for (job, result) in batch.into_iter().zip(results) {
                        if let Some(reply) = job.reply {
                            let _ = reply.send(Ok(result));
                        }
                    }
                }
                Err(e) => {
                    for job in batch {
                        match job.reply {
                            Some(reply) => {
                                let _ = reply.send(Err(e.clone()));
                            }
                            None => tracing::warn!("a lazy write to the state store failed: {e}"),
                        }
                    }
                }
            }
            if last_sweep.elapsed() > SWEEP_EVERY {
                self.sweep();
                last_sweep = Instant::now();
            }
        }
    }

    /// Applies a batch of jobs in one durable transaction; each job sees the ones before it,
    /// and is applied whole or (when one of its expectations fails) not at all. The index
    /// changes once the transaction is durable, before anyone is answered.
    fn apply(&mut self, batch: &[Job], next_version: &mut u64) -> Result<Vec<bool>, StoreError> {
        let failed = |e: redb::Error| StoreError::backend("writing the state store", e);
        let txn = self.db.begin_write().map_err(|e| failed(e.into()))?;
        let mut results = Vec::with_capacity(batch.len());
        // The records this transaction changed, by (handler, key): borrowed from the batch,
        // found in one lookup however many commits the group holds.
        let mut changes: HashMap<(&str, &str), Change> = HashMap::with_capacity(batch.len());
        let mut next_seq = self.next_seq;
        {
            // Read-locked: lookups go on while the transaction is built.
            let index = self.index.read().map_err(|_| StoreError::Poisoned)?;
            // Each table is opened once per transaction, not once per write.
            let mut tables: HashMap<(&str, Space), redb::Table<'_, &str, &[u8]>> = HashMap::new();
            let mut logs: HashMap<&str, redb::Table<'_, u64, &[u8]>> = HashMap::new();
            for job in batch {
                let handler = job.handler.as_str();
                for op in &job.ops {
                    match op.space {
                        Space::Dedup => {
                            if let std::collections::hash_map::Entry::Vacant(slot) = logs.entry(handler) {
                                let name = log_name(handler);
                                let table = txn.open_table(log_def(&name)).map_err(|e| failed(e.into()))?;
                                slot.insert(table);
                            }
                        }
                        space => {
                            if let std::collections::hash_map::Entry::Vacant(slot) = tables.entry((handler, space)) {
                                let name = table_name(handler, space);
                                let table = txn
                                    .open_table(TableDefinition::<&str, &[u8]>::new(&name))
                                    .map_err(|e| failed(e.into()))?;
                                slot.insert(table);
                            }
                        }
                    }
                }
                // The record's entry now: this transaction's change, or the index's.
                let current_seq = |changes: &HashMap<(&str, &str), Change>,
                                   logs: &HashMap<&str, redb::Table<'_, u64, &[u8]>>,
                                   key: &str,
                                   hash: u64| {
                    if let Some(c) = changes.get(&(handler, key)) {
                        return Ok::<_, redb::Error>(c.now);
                    }
                    let seqs = index.seqs(hash);
                    match logs.get(handler) {
                        Some(log) if !seqs.is_empty() => find_in(log, seqs, key),
                        _ => Ok(None),
                    }
                };
                let mut holds = true;
                for op in &job.ops {
                    if let Expect::Is(expected) = op.expect {
                        let version = match op.space {
                            Space::Dedup => {
                                current_seq(&changes, &logs, &op.key, index.hash(handler, &op.key)).map_err(failed)?
                            }
                            space => {
                                let Some(table) = tables.get(&(handler, space)) else { continue };
                                table
                                    .get(op.key.as_str())
                                    .map_err(|e| failed(e.into()))?
                                    .and_then(|v| split(v.value()))
                                    .map(|v| v.version)
                            }
                        };
                        if version != expected {
                            holds = false;
                            break;
                        }
                    }
                }
                if holds {
                    for op in &job.ops {
                        if op.space == Space::Dedup {
                            let hash = index.hash(handler, &op.key);
                            let replaced = current_seq(&changes, &logs, &op.key, hash).map_err(failed)?;
                            let Some(log) = logs.get_mut(handler) else { continue };
                            if let Some(old) = replaced {
                                log.remove(old).map_err(|e| failed(e.into()))?;
                            }
                            let now = match &op.value {
                                Some(record) => {
                                    let seq = next_seq;
                                    next_seq += 1;
                                    log.insert(seq, log_entry(&op.key, record).as_slice())
                                        .map_err(|e| failed(e.into()))?;
                                    Some(seq)
                                }
                                None => None,
                            };
                            changes.entry((handler, op.key.as_str())).and_modify(|c| c.now = now).or_insert(Change {
                                hash,
                                replaced,
                                now,
                            });
                            continue;
                        }
                        let Some(table) = tables.get_mut(&(handler, op.space)) else { continue };
                        match &op.value {
                            None => {
                                table.remove(op.key.as_str()).map_err(|e| failed(e.into()))?;
                            }
                            Some(value) => {
                                let version = *next_version;
                                *next_version += 1;
                                let mut bytes = Vec::with_capacity(8 + value.len());
                                bytes.extend_from_slice(&version.to_le_bytes());
                                bytes.extend_from_slice(value);
                                table.insert(op.key.as_str(), bytes.as_slice()).map_err(|e| failed(e.into()))?;
                            }
                        }
                    }
                }
                results.push(holds);
            }
        }
        txn.commit().map_err(|e| failed(e.into()))?;
        self.next_seq = next_seq;
        let mut index = self.index.write().map_err(|_| StoreError::Poisoned)?;
        for c in changes.into_values() {
            if let Some(old) = c.replaced {
                index.remove(c.hash, old);
            }
            if let Some(seq) = c.now {
                index.add(c.hash, seq);
            }
        }
        Ok(results)
    }

    /// Deletes expired records: the expired prefix of each handler's log, and the guest's
    /// expired marks (the guest's kv has no expiry).
    fn sweep(&mut self) {
        if let Err(e) = self.sweep_marks() {
            tracing::warn!("sweeping expired dedup marks: {e}");
        }
        let logs: Vec<String> = match self.db.begin_read().map_err(redb::Error::from).and_then(|txn| {
            Ok(txn.list_tables()?.map(|t| t.name().to_owned()).filter(|n| n.starts_with("dedup-log/")).collect())
        }) {
            Ok(logs) => logs,
            Err(e) => {
                tracing::warn!("sweeping expired idempotency records: {e}");
                return;
            }
        };
        for name in logs {
            for _ in 0..SWEEP_CHUNKS {
                match self.sweep_log(&name) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("sweeping expired idempotency records: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// Removes up to [`SWEEP_CHUNK`] expired entries from the front of one log (it stops at
    /// the first live one); returns how many.
    fn sweep_log(&mut self, name: &str) -> Result<usize, redb::Error> {
        let handler = name.trim_start_matches("dedup-log/").to_owned();
        let now = now_ms();
        let txn = self.db.begin_write()?;
        let mut expired: Vec<(u64, String)> = Vec::new();
        {
            let mut log = txn.open_table(log_def(name))?;
            for row in log.iter()? {
                let (seq, value) = row?;
                let live = split_entry(value.value())
                    .is_some_and(|(_, record)| Record::decode(record).is_some_and(|r| r.live(now)));
                if live || expired.len() == SWEEP_CHUNK {
                    break;
                }
                let key = split_entry(value.value()).map(|(k, _)| k.to_owned()).unwrap_or_default();
                expired.push((seq.value(), key));
            }
            if let Some((last, _)) = expired.last() {
                log.retain_in(..=*last, |_, _| false)?;
            }
        }
        if expired.is_empty() {
            return Ok(0);
        }
        txn.commit()?;
        Counters::add(&self.counters.transactions, 1);
        if let Ok(mut index) = self.index.write() {
            for (seq, key) in &expired {
                let hash = index.hash(&handler, key);
                index.remove(hash, *seq);
            }
        }
        Ok(expired.len())
    }

    fn sweep_marks(&self) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        let names: Vec<String> =
            txn.list_tables()?.map(|t| t.name().to_owned()).filter(|n| n.starts_with("guest-dedup/")).collect();
        let now = now_ms();
        for name in names {
            let mut table = txn.open_table(TableDefinition::<&str, &[u8]>::new(&name))?;
            table
                .retain(|_, bytes| split(bytes).and_then(|v| Record::decode(&v.value)).is_some_and(|r| r.live(now)))?;
        }
        txn.commit()?;
        Counters::add(&self.counters.transactions, 1);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

    fn completed(expires_ms: u64) -> Vec<u8> {
        Record::Completed { expires_ms, fingerprint: Some("fp".into()) }.encode()
    }

    #[test]
    fn the_index_keeps_keys_that_share_a_hash_apart() {
        let mut index = Index::default();
        index.add(7, 1);
        index.add(7, 2);
        assert_eq!(index.seqs(7), [1, 2]);
        index.remove(7, 1);
        assert_eq!(index.seqs(7), [2]);
        index.remove(7, 2);
        assert!(index.seqs(7).is_empty() && index.slots.is_empty() && index.shared.is_empty());
    }

    #[tokio::test]
    async fn records_are_found_after_a_reopen_and_a_replacement_leaves_one_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let later = now_ms() + 60_000;
        {
            let store = RedbStore::open(&path).unwrap();
            let put = |key: &str, value: Vec<u8>| Op {
                space: Space::Dedup,
                key: key.into(),
                expect: Expect::Any,
                value: Some(value),
                ttl: None,
            };
            assert!(store.commit("h", vec![put("a", completed(later)), put("b", completed(later))]).await.unwrap());
            assert!(store.commit("h", vec![put("a", completed(later + 1))]).await.unwrap());
            assert!(store.commit("other", vec![put("a", completed(later))]).await.unwrap());
            let a = store.get("h", Space::Dedup, "a").await.unwrap().unwrap();
            assert_eq!(a.value, completed(later + 1));
            assert_eq!(store.get("h", Space::Dedup, "missing").await.unwrap(), None);
        }
        // The writer lets go of the file once the last handle is gone.
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.get("h", Space::Dedup, "a").await.unwrap().unwrap().value, completed(later + 1));
        assert_eq!(store.get("h", Space::Dedup, "b").await.unwrap().unwrap().value, completed(later));
        assert!(store.get("other", Space::Dedup, "a").await.unwrap().is_some());
        // One entry per key: the replaced one is gone from the log.
        let txn = store.db.begin_read().unwrap();
        let log = txn.open_table(log_def("dedup-log/h")).unwrap();
        assert_eq!(log.len().unwrap(), 2);
        // A delete removes the entry and the index slot.
        drop((log, txn));
        let del = Op { space: Space::Dedup, key: "b".into(), expect: Expect::Any, value: None, ttl: None };
        assert!(store.commit("h", vec![del]).await.unwrap());
        assert_eq!(store.get("h", Space::Dedup, "b").await.unwrap(), None);
    }

    #[tokio::test]
    async fn records_of_an_older_layout_move_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut old = txn.open_table(TableDefinition::<&str, &[u8]>::new("dedup/h")).unwrap();
                for (key, expires) in [("live", now_ms() + 60_000), ("expired", 1)] {
                    let mut bytes = 5u64.to_le_bytes().to_vec();
                    bytes.extend_from_slice(&completed(expires));
                    old.insert(key, bytes.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert!(store.get("h", Space::Dedup, "live").await.unwrap().is_some());
        assert_eq!(store.get("h", Space::Dedup, "expired").await.unwrap(), None);
        let txn = store.db.begin_read().unwrap();
        assert!(txn.list_tables().unwrap().all(|t| t.name() != "dedup/h"), "the old table is gone");
    }

    #[tokio::test]
    async fn the_sweep_removes_the_expired_prefix_of_a_log_and_stops_at_a_live_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let put = |key: &str, value: Vec<u8>| Op {
            space: Space::Dedup,
            key: key.into(),
            expect: Expect::Any,
            value: Some(value),
            ttl: None,
        };
        let later = now_ms() + 60_000;
        assert!(store.commit("h", vec![put("old-1", completed(1)), put("old-2", completed(2))]).await.unwrap());
        assert!(store.commit("h", vec![put("live", completed(later)), put("old-3", completed(3))]).await.unwrap());
        let mut worker = Worker {
            db: store.db.clone(),
            counters: store.counters.clone(),
            index: store.index.clone(),
            next_seq: 1_000,
        };
        assert_eq!(worker.sweep_log("dedup-log/h").unwrap(), 2, "stops at the first live record");
        assert_eq!(worker.sweep_log("dedup-log/h").unwrap(), 0);
        {
            let index = store.index.read().unwrap();
            assert!(index.seqs(index.hash("h", "old-1")).is_empty());
            assert!(!index.seqs(index.hash("h", "live")).is_empty());
            // An expired record behind a live one waits for it, and is never served meanwhile
            // (the lookup checks the record's expiry).
            assert!(!index.seqs(index.hash("h", "old-3")).is_empty());
        }
        assert!(store.get("h", Space::Dedup, "live").await.unwrap().is_some());
    }
}
