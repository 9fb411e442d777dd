//! Candidate 2, redb as an append log with an in-memory index: dedup records go to a table
//! keyed by a monotonically increasing sequence number (every insert lands on the B-tree's
//! right edge: an append), and the point lookup by idempotency key is served from a hash map
//! of the live keys (key hash -> log sequence) rebuilt by one scan of the log at start. A
//! fixed TTL per handler makes log order expiry order, so the sweep is a range delete of
//! the log's oldest prefix; it stops at the first live record.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::path::Path;
use std::time::Instant;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::model::{Key, Msg, R, SWEEP_CHUNK, Store, Sweep, record_expires, record_fingerprint};
use crate::redb_random::open_db;

/// seq -> idempotency key (32 bytes) then the record.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("dedup-log/orders");
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv/orders");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox/orders");

/// The map's keys are already hashes.
#[derive(Debug, Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Debug)]
pub struct RedbLog {
    db: Database,
    hasher: RandomState,
    /// Hash of a live key -> its log sequence number. A hit is confirmed against the log
    /// (the full key is compared), so a hash collision can cost a read, never a wrong answer
    /// for the key read; two live keys with one hash would need a multimap (not done here).
    index: HashMap<u64, u64, BuildHasherDefault<Identity>>,
    next: u64,
}

impl RedbLog {
    pub fn open(dir: &Path) -> R<Self> {
        std::fs::create_dir_all(dir)?;
        let db = open_db(&dir.join("state.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(KV)?;
        txn.open_table(OUTBOX)?;
        txn.commit()?;
        let hasher = RandomState::new();
        let mut index = HashMap::default();
        let mut next = 0;
        {
            let txn = db.begin_read()?;
            let log = txn.open_table(LOG)?;
            index.reserve(usize::try_from(log.len()?).unwrap_or(0));
            for entry in log.iter()? {
                let (seq, v) = entry?;
                let (seq, v) = (seq.value(), v.value());
                index.insert(hasher.hash_one(&v[..32]), seq);
                next = seq + 1;
            }
        }
        Ok(RedbLog { db, hasher, index, next })
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }
}

impl Store for RedbLog {
    fn lookup(&mut self, key: &Key, now_ms: u64) -> R<Option<[u8; 32]>> {
        let Some(seq) = self.index.get(&self.hash(key)) else { return Ok(None) };
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let Some(v) = log.get(*seq)? else { return Ok(None) };
        let v = v.value();
        if &v[..32] != key {
            return Ok(None);
        }
        let r = &v[32..];
        Ok(if record_expires(r) > now_ms { record_fingerprint(r) } else { None })
    }

    fn commit(&mut self, msgs: &[Msg], remove: &[u64]) -> R<()> {
        let txn = self.db.begin_write()?;
        let first = self.next;
        {
            let mut log = txn.open_table(LOG)?;
            let mut kv = txn.open_table(KV)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut entry = [0u8; 32 + crate::model::RECORD_LEN];
            for (i, m) in msgs.iter().enumerate() {
                entry[..32].copy_from_slice(&m.key);
                entry[32..].copy_from_slice(&m.record);
                log.insert(first + i as u64, entry.as_slice())?;
                kv.insert(m.kv_key.as_str(), m.kv_value.as_slice())?;
                outbox.insert(m.seq, m.outbox.as_slice())?;
            }
            for s in remove {
                outbox.remove(*s)?;
            }
        }
        txn.commit()?;
        // Only what is durable is indexed.
        for (i, m) in msgs.iter().enumerate() {
            let h = self.hash(&m.key);
            self.index.insert(h, first + i as u64);
        }
        self.next = first + msgs.len() as u64;
        Ok(())
    }

    fn remove_outbox(&mut self, seqs: &[u64]) -> R<()> {
        let txn = self.db.begin_write()?;
        {
            let mut outbox = txn.open_table(OUTBOX)?;
            for s in seqs {
                outbox.remove(*s)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn preload(&mut self, keys: &mut dyn Iterator<Item = (Key, u64)>) -> R<()> {
        let record = crate::model::record(0, &[7; 32]);
        loop {
            // Durable commits of 50k records: a non-durable one cannot reuse freed pages,
            // which would leave the file larger than service would.
            let txn = self.db.begin_write()?;
            let mut added = Vec::new();
            {
                let mut log = txn.open_table(LOG)?;
                let mut entry = [0u8; 32 + crate::model::RECORD_LEN];
                for (key, expires) in (&mut *keys).take(50_000) {
                    entry[..32].copy_from_slice(&key);
                    entry[32..].copy_from_slice(&record);
                    entry[33..41].copy_from_slice(&expires.to_le_bytes());
                    let seq = self.next + added.len() as u64;
                    log.insert(seq, entry.as_slice())?;
                    added.push((self.hash(&key), seq));
                }
            }
            txn.commit()?;
            if added.is_empty() {
                break;
            }
            self.next += added.len() as u64;
            self.index.extend(added);
        }
        Ok(())
    }

    fn sweep(&mut self, now_ms: u64) -> R<Sweep> {
        let mut sweep = Sweep { how: "range delete of the log's expired prefix, 10k per txn", ..Sweep::default() };
        let started = Instant::now();
        loop {
            let chunk = Instant::now();
            let txn = self.db.begin_write()?;
            let mut victims: Vec<(u64, u64)> = Vec::with_capacity(SWEEP_CHUNK);
            {
                let mut log = txn.open_table(LOG)?;
                for entry in log.iter()? {
                    let (seq, v) = entry?;
                    let v = v.value();
                    if record_expires(&v[32..]) > now_ms {
                        break;
                    }
                    victims.push((self.hasher.hash_one(&v[..32]), seq.value()));
                    if victims.len() == SWEEP_CHUNK {
                        break;
                    }
                }
                if let Some(&(_, last)) = victims.last() {
                    log.retain_in(..=last, |_, _| false)?;
                }
            }
            txn.commit()?;
            for (h, seq) in &victims {
                if self.index.get(h) == Some(seq) {
                    self.index.remove(h);
                }
            }
            sweep.longest_ms = sweep.longest_ms.max(chunk.elapsed().as_secs_f64() * 1e3);
            if victims.is_empty() {
                break;
            }
            sweep.removed += victims.len() as u64;
            sweep.transactions += 1;
        }
        sweep.total_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(sweep)
    }

    fn outbox_from(&mut self, from: u64) -> R<Vec<u64>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OUTBOX)?;
        let mut seqs = Vec::new();
        for entry in table.range(from..)? {
            seqs.push(entry?.0.value());
        }
        Ok(seqs)
    }

    fn index_bytes(&self) -> u64 {
        // hashbrown: 16 bytes of entry and one control byte per bucket.
        (self.index.capacity() * 17) as u64
    }
}
