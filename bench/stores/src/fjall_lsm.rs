//! Candidate 3, fjall (an LSM tree): three keyspaces (dedup, kv, outbox) in one database;
//! a message group is one cross-keyspace `WriteBatch`, committed with
//! `PersistMode::SyncData` (one journal append and `fdatasync`, then memtable inserts).
//! TTL expiry is a compaction filter on the dedup keyspace that drops expired records when
//! background compaction rewrites them: nothing on the hot path, and no sweep transaction.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fjall::compaction::filter::{CompactionFilter, Context, Factory, ItemAccessor, Verdict};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::model::{CACHE_BYTES, HANDLER, Key, Msg, R, Store, Sweep, record_expires, record_fingerprint};

/// The clock the compaction filter expires against (the harness's simulated time).
pub static NOW_MS: AtomicU64 = AtomicU64::new(0);
/// Records the filter has dropped.
pub static EXPIRED: AtomicU64 = AtomicU64::new(0);

struct Ttl;

impl CompactionFilter for Ttl {
    fn filter_item(
        &mut self,
        item: ItemAccessor<'_>,
        ctx: &Context,
    ) -> fjall::compaction::filter::CompactionFilterResult {
        let value = item.value()?;
        if record_expires(&value) > NOW_MS.load(Ordering::Relaxed) {
            return Ok(Verdict::Keep);
        }
        EXPIRED.fetch_add(1, Ordering::Relaxed);
        // Below the last level an older version could resurface without a tombstone.
        Ok(if ctx.is_last_level { Verdict::Destroy } else { Verdict::Remove })
    }
}

struct TtlFactory;

impl Factory for TtlFactory {
    fn name(&self) -> &str {
        "dedup-ttl"
    }
    fn make_filter(&self, _: &Context) -> Box<dyn CompactionFilter> {
        Box::new(Ttl)
    }
}

pub struct FjallLsm {
    db: Database,
    dedup: Keyspace,
    kv: Keyspace,
    outbox: Keyspace,
}

impl std::fmt::Debug for FjallLsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallLsm").finish_non_exhaustive()
    }
}

fn dedup_key(key: &Key) -> Vec<u8> {
    let mut k = Vec::with_capacity(HANDLER.len() + 1 + key.len());
    k.extend_from_slice(HANDLER.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

fn outbox_key(seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(HANDLER.len() + 9);
    k.extend_from_slice(HANDLER.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl FjallLsm {
    pub fn open(dir: &Path) -> R<Self> {
        let db = Database::builder(dir)
            .cache_size(CACHE_BYTES as u64)
            .with_compaction_filter_factories(Arc::new(|name: &str| {
                (name == "dedup").then(|| Arc::new(TtlFactory) as Arc<dyn Factory>)
            }))
            .open()?;
        let dedup = db.keyspace("dedup", KeyspaceCreateOptions::default)?;
        let kv = db.keyspace("kv", KeyspaceCreateOptions::default)?;
        let outbox = db.keyspace("outbox", KeyspaceCreateOptions::default)?;
        Ok(FjallLsm { db, dedup, kv, outbox })
    }

    /// Waits until no flush or compaction is running (after a bulk load), at most `limit`.
    fn wait_quiet(&self, limit: Duration) -> f64 {
        let started = Instant::now();
        let mut quiet = 0;
        while started.elapsed() < limit && quiet < 5 {
            std::thread::sleep(Duration::from_millis(100));
            if self.db.outstanding_flushes() == 0 && self.db.active_compactions() == 0 {
                quiet += 1;
            } else {
                quiet = 0;
            }
        }
        started.elapsed().as_secs_f64() * 1e3
    }
}

impl Store for FjallLsm {
    fn lookup(&mut self, key: &Key, now_ms: u64) -> R<Option<[u8; 32]>> {
        let Some(v) = self.dedup.get(dedup_key(key))? else { return Ok(None) };
        Ok(if record_expires(&v) > now_ms { record_fingerprint(&v) } else { None })
    }

    fn commit(&mut self, msgs: &[Msg], remove: &[u64]) -> R<()> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        for m in msgs {
            batch.insert(&self.dedup, dedup_key(&m.key), m.record.as_slice());
            let mut kv = Vec::with_capacity(HANDLER.len() + 1 + m.kv_key.len());
            kv.extend_from_slice(HANDLER.as_bytes());
            kv.push(0);
            kv.extend_from_slice(m.kv_key.as_bytes());
            batch.insert(&self.kv, kv, m.kv_value.as_slice());
            batch.insert(&self.outbox, outbox_key(m.seq), m.outbox.as_slice());
        }
        for s in remove {
            batch.remove(&self.outbox, outbox_key(*s));
        }
        batch.commit()?;
        Ok(())
    }

    fn remove_outbox(&mut self, seqs: &[u64]) -> R<()> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        for s in seqs {
            batch.remove(&self.outbox, outbox_key(*s));
        }
        batch.commit()?;
        Ok(())
    }

    fn preload(&mut self, keys: &mut dyn Iterator<Item = (Key, u64)>) -> R<()> {
        let record = crate::model::record(0, &[7; 32]);
        loop {
            let mut batch = self.db.batch();
            for (key, expires) in (&mut *keys).take(50_000) {
                let mut r = record;
                r[1..9].copy_from_slice(&expires.to_le_bytes());
                batch.insert(&self.dedup, dedup_key(&key), r.as_slice());
            }
            if batch.is_empty() {
                break;
            }
            batch.commit()?;
        }
        self.db.persist(PersistMode::SyncData)?;
        Ok(())
    }

    fn sweep(&mut self, now_ms: u64) -> R<Sweep> {
        // In service the filter runs whenever compaction does; here a major compaction
        // forces it over every record at once, the worst single pause it can cause.
        NOW_MS.store(now_ms, Ordering::Relaxed);
        let before = EXPIRED.load(Ordering::Relaxed);
        let started = Instant::now();
        self.dedup.rotate_memtable_and_wait()?;
        self.dedup.major_compact()?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let mut left = 0;
        for guard in self.dedup.iter() {
            if record_expires(&guard.value()?) <= now_ms {
                left += 1;
            }
        }
        Ok(Sweep {
            left,
            removed: EXPIRED.load(Ordering::Relaxed) - before,
            transactions: 0,
            total_ms: ms,
            longest_ms: ms,
            how: "compaction filter (forced here by a major compaction, off the writer)",
        })
    }

    fn finish_run(&mut self) -> R<()> {
        // Flushes and compactions the run started; memtables still filling (64 MiB each
        // by default) are flushed by a later run, when full, as in service.
        self.wait_quiet(Duration::from_secs(60));
        Ok(())
    }

    fn background_ms(&self) -> Option<f64> {
        Some(self.db.time_compacting().as_secs_f64() * 1e3)
    }

    fn settle(&mut self) -> f64 {
        self.wait_quiet(Duration::from_secs(60))
    }

    fn outbox_from(&mut self, from: u64) -> R<Vec<u64>> {
        let mut seqs = Vec::new();
        for guard in self.outbox.range(outbox_key(from)..) {
            let key = guard.key()?;
            if let Some(seq) = key.get(key.len() - 8..).and_then(|b| b.try_into().ok()) {
                seqs.push(u64::from_be_bytes(seq));
            }
        }
        Ok(seqs)
    }
}
