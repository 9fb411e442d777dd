//! Candidate 1, redb as today: dedup records in one table keyed by the random idempotency
//! key (each insert a random B-tree leaf), plus what the TTL needs to stop scanning: a
//! secondary table keyed by (expires_ms, key), swept with a range delete from its start.

use std::path::Path;
use std::time::Instant;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::model::{CACHE_BYTES, HANDLER, Key, Msg, R, SWEEP_CHUNK, Store, Sweep, record_expires, record_fingerprint};

const DEDUP: TableDefinition<&str, &[u8]> = TableDefinition::new("dedup/orders");
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("dedup-expiry/orders");
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv/orders");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox/orders");

#[derive(Debug)]
pub struct RedbRandom {
    db: Database,
}

pub fn open_db(path: &Path) -> R<Database> {
    Ok(Database::builder().set_cache_size(CACHE_BYTES).create(path)?)
}

fn key_str(key: &Key) -> &str {
    std::str::from_utf8(key).unwrap_or_default()
}

impl RedbRandom {
    pub fn open(dir: &Path) -> R<Self> {
        std::fs::create_dir_all(dir)?;
        let db = open_db(&dir.join("state.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(DEDUP)?;
        txn.open_table(EXPIRY)?;
        txn.open_table(KV)?;
        txn.open_table(OUTBOX)?;
        txn.commit()?;
        let _ = HANDLER;
        Ok(RedbRandom { db })
    }
}

impl Store for RedbRandom {
    fn lookup(&mut self, key: &Key, now_ms: u64) -> R<Option<[u8; 32]>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DEDUP)?;
        let Some(v) = table.get(key_str(key))? else { return Ok(None) };
        let v = v.value();
        Ok(if record_expires(v) > now_ms { record_fingerprint(v) } else { None })
    }

    fn commit(&mut self, msgs: &[Msg], remove: &[u64]) -> R<()> {
        let txn = self.db.begin_write()?;
        {
            let mut dedup = txn.open_table(DEDUP)?;
            let mut expiry = txn.open_table(EXPIRY)?;
            let mut kv = txn.open_table(KV)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            for m in msgs {
                dedup.insert(key_str(&m.key), m.record.as_slice())?;
                expiry.insert((record_expires(&m.record), key_str(&m.key)), ())?;
                kv.insert(m.kv_key.as_str(), m.kv_value.as_slice())?;
                outbox.insert(m.seq, m.outbox.as_slice())?;
            }
            for s in remove {
                outbox.remove(*s)?;
            }
        }
        txn.commit()?;
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
            let mut n = 0;
            {
                let mut dedup = txn.open_table(DEDUP)?;
                let mut expiry = txn.open_table(EXPIRY)?;
                for (key, expires) in (&mut *keys).take(50_000) {
                    let mut r = record;
                    r[1..9].copy_from_slice(&expires.to_le_bytes());
                    dedup.insert(key_str(&key), r.as_slice())?;
                    expiry.insert((expires, key_str(&key)), ())?;
                    n += 1;
                }
            }
            txn.commit()?;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    fn sweep(&mut self, now_ms: u64) -> R<Sweep> {
        let mut sweep = Sweep { how: "range delete over (expires_ms, key), 10k per txn", ..Sweep::default() };
        let started = Instant::now();
        loop {
            let chunk = Instant::now();
            let txn = self.db.begin_write()?;
            let n;
            {
                let mut expiry = txn.open_table(EXPIRY)?;
                let mut dedup = txn.open_table(DEDUP)?;
                let mut victims: Vec<(u64, String)> = Vec::with_capacity(SWEEP_CHUNK);
                for entry in expiry.range::<(u64, &str)>(..(now_ms + 1, ""))? {
                    let (k, _) = entry?;
                    let (expires, key) = k.value();
                    victims.push((expires, key.to_owned()));
                    if victims.len() == SWEEP_CHUNK {
                        break;
                    }
                }
                n = victims.len();
                for (expires, key) in &victims {
                    expiry.remove((*expires, key.as_str()))?;
                    // A key rewritten since has a newer index entry: keep its record.
                    let current = dedup.get(key.as_str())?.map(|v| record_expires(v.value()));
                    if current == Some(*expires) {
                        dedup.remove(key.as_str())?;
                    }
                }
            }
            txn.commit()?;
            sweep.longest_ms = sweep.longest_ms.max(chunk.elapsed().as_secs_f64() * 1e3);
            if n == 0 {
                break;
            }
            sweep.removed += n as u64;
            sweep.transactions += 1;
        }
        sweep.total_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(sweep)
    }

    /// Today's sweep, for reference: `retain` over the whole dedup table (every record read).
    fn full_scan_sweep(&mut self, now_ms: u64) -> R<Option<f64>> {
        let started = Instant::now();
        let txn = self.db.begin_write()?;
        txn.open_table(DEDUP)?.retain(|_, v| record_expires(v) > now_ms)?;
        txn.commit()?;
        Ok(Some(started.elapsed().as_secs_f64() * 1e3))
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
}
