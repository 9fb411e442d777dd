//! The `redb` backend: one embedded database file per Sluice process (`<data dir>/state.redb`,
//! a table per handler and space).
//!
//! Reads use read transactions directly. Writes go to one writer thread that applies
//! every commit waiting in its queue in a single transaction and commits it durably (one fsync
//! per batch, not per message: group commit), then answers each caller. It also sweeps
//! expired dedup records once a minute.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use tokio::sync::oneshot;

use super::{Counters, Expect, Leases, Op, Record, Space, StoreError, Versioned, now_ms};

/// Commits applied in one transaction at most.
const MAX_BATCH: usize = 1024;
const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    writer: mpsc::Sender<Job>,
    pub(super) leases: Arc<Leases>,
    counters: Arc<Counters>,
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
        let db = Arc::new(db);
        let (writer, queue) = mpsc::channel();
        let worker_db = db.clone();
        let counters = Arc::new(Counters::default());
        let worker_counters = counters.clone();
        std::thread::Builder::new()
            .name("sluice-redb".into())
            .spawn(move || write_loop(&worker_db, &queue, &worker_counters))
            .map_err(|e| StoreError::backend("cannot start the store writer", e))?;
        Ok(RedbStore { db, writer, leases: Arc::default(), counters })
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
        self.commit(handler, vec![Op { space, key: key.to_owned(), expect: Expect::Is(expected), value }]).await
    }

    /// Writes (or, with `None`, removes) `key` whatever its version.
    pub async fn put(&self, handler: &str, space: Space, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.commit(handler, vec![Op { space, key: key.to_owned(), expect: Expect::Any, value }]).await.map(|_| ())
    }

    /// Applies `ops` together if every expectation holds (false otherwise, nothing applied),
    /// in one durable transaction shared with the other writes waiting.
    pub async fn commit(&self, handler: &str, ops: Vec<Op>) -> Result<bool, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { handler: handler.to_owned(), ops, reply: Some(reply) };
        self.writer.send(job).map_err(|_| StoreError::WriterStopped)?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
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

fn write_loop(db: &Database, queue: &mpsc::Receiver<Job>, counters: &Counters) {
    // Versions only grow, across restarts too (they start from the clock), so a
    // compare-and-swap never mistakes a re-created key for the one it read.
    let next_version = AtomicU64::new(now_ms().saturating_mul(1000));
    let mut last_sweep = Instant::now();
    loop {
        let first = match queue.recv_timeout(SWEEP_EVERY) {
            Ok(swap) => swap,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                sweep(db, counters);
                last_sweep = Instant::now();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(swap) => batch.push(swap),
                Err(_) => break,
            }
        }
        match apply(db, &batch, &next_version) {
            Ok(results) => {
                Counters::add(&counters.transactions, 1);
                Counters::add(&counters.writes, batch.len() as u64);
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
            sweep(db, counters);
            last_sweep = Instant::now();
        }
    }
}

/// Applies a batch of jobs in one durable transaction; each job sees the ones before it, and
/// is applied whole or (when one of its expectations fails) not at all.
fn apply(db: &Database, batch: &[Job], next_version: &AtomicU64) -> Result<Vec<bool>, StoreError> {
    let failed = |e: redb::Error| StoreError::backend("writing the state store", e);
    let txn = db.begin_write().map_err(|e| failed(e.into()))?;
    let mut results = Vec::with_capacity(batch.len());
    {
        // Each table is opened once per transaction, not once per write: opening one walks
        // the table tree and closing it writes its root back.
        let mut tables: HashMap<String, redb::Table<'_, &str, &[u8]>> = HashMap::new();
        for job in batch {
            for op in &job.ops {
                let name = table_name(&job.handler, op.space);
                if let std::collections::hash_map::Entry::Vacant(slot) = tables.entry(name) {
                    let table = txn
                        .open_table(TableDefinition::<&str, &[u8]>::new(slot.key()))
                        .map_err(|e| failed(e.into()))?;
                    slot.insert(table);
                }
            }
            let mut holds = true;
            for op in &job.ops {
                if let Expect::Is(expected) = op.expect {
                    let Some(table) = tables.get(&table_name(&job.handler, op.space)) else { continue };
                    let current =
                        table.get(op.key.as_str()).map_err(|e| failed(e.into()))?.and_then(|v| split(v.value()));
                    if current.map(|v| v.version) != expected {
                        holds = false;
                        break;
                    }
                }
            }
            if holds {
                for op in &job.ops {
                    let Some(table) = tables.get_mut(&table_name(&job.handler, op.space)) else { continue };
                    match &op.value {
                        None => {
                            table.remove(op.key.as_str()).map_err(|e| failed(e.into()))?;
                        }
                        Some(value) => {
                            let version = next_version.fetch_add(1, Ordering::Relaxed);
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
    Ok(results)
}

/// Deletes expired dedup records (the guest's kv has no expiry).
fn sweep(db: &Database, counters: &Counters) {
    let result = (|| -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        let names: Vec<String> = txn
            .list_tables()?
            .map(|t| t.name().to_owned())
            .filter(|n| n.starts_with("dedup/") || n.starts_with("guest-dedup/"))
            .collect();
        let now = now_ms();
        for name in names {
            let mut table = txn.open_table(TableDefinition::<&str, &[u8]>::new(&name))?;
            table
                .retain(|_, bytes| split(bytes).and_then(|v| Record::decode(&v.value)).is_some_and(|r| r.live(now)))?;
        }
        txn.commit()?;
        Counters::add(&counters.transactions, 1);
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!("sweeping expired dedup records: {e}");
    }
}
