//! Candidate 4, SQLite (bundled, through rusqlite) in WAL mode with `synchronous=FULL`: a
//! commit appends its pages to the WAL and syncs it; the automatic checkpoint (every 1000
//! WAL pages, the default) copies them into the database file and syncs that. Dedup records
//! are a WITHOUT ROWID table keyed by (handler, key) with an index on `expires` for the sweep.

use std::path::Path;
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, params};

use crate::model::{CACHE_BYTES, HANDLER, Key, Msg, R, SWEEP_CHUNK, Store, Sweep, record_fingerprint};

#[derive(Debug)]
pub struct Sqlite {
    conn: Connection,
}

fn key_str(key: &Key) -> &str {
    std::str::from_utf8(key).unwrap_or_default()
}

impl Sqlite {
    pub fn open(dir: &Path) -> R<Self> {
        std::fs::create_dir_all(dir)?;
        let conn = Connection::open(dir.join("state.sqlite"))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(format!("journal_mode is {mode}, not wal").into());
        }
        conn.execute_batch(&format!(
            "PRAGMA synchronous=FULL;
             PRAGMA cache_size=-{};
             CREATE TABLE IF NOT EXISTS dedup(handler TEXT NOT NULL, key TEXT NOT NULL,
                 expires INTEGER NOT NULL, rec BLOB NOT NULL, PRIMARY KEY(handler, key)) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS dedup_expires ON dedup(expires);
             CREATE TABLE IF NOT EXISTS kv(handler TEXT NOT NULL, key TEXT NOT NULL,
                 value BLOB NOT NULL, PRIMARY KEY(handler, key)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS outbox(handler TEXT NOT NULL, seq INTEGER NOT NULL,
                 value BLOB NOT NULL, PRIMARY KEY(handler, seq)) WITHOUT ROWID;",
            CACHE_BYTES / 1024
        ))?;
        Ok(Sqlite { conn })
    }
}

impl Store for Sqlite {
    fn lookup(&mut self, key: &Key, now_ms: u64) -> R<Option<[u8; 32]>> {
        let mut stmt = self.conn.prepare_cached("SELECT expires, rec FROM dedup WHERE handler = ?1 AND key = ?2")?;
        let row: Option<(i64, Vec<u8>)> =
            stmt.query_row(params![HANDLER, key_str(key)], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        Ok(row.and_then(|(expires, rec)| if expires as u64 > now_ms { record_fingerprint(&rec) } else { None }))
    }

    fn commit(&mut self, msgs: &[Msg], remove: &[u64]) -> R<()> {
        let tx = self.conn.transaction()?;
        {
            let mut dedup =
                tx.prepare_cached("INSERT OR REPLACE INTO dedup(handler, key, expires, rec) VALUES (?1, ?2, ?3, ?4)")?;
            let mut kv = tx.prepare_cached("INSERT OR REPLACE INTO kv(handler, key, value) VALUES (?1, ?2, ?3)")?;
            let mut outbox = tx.prepare_cached("INSERT INTO outbox(handler, seq, value) VALUES (?1, ?2, ?3)")?;
            for m in msgs {
                let expires = crate::model::record_expires(&m.record) as i64;
                dedup.execute(params![HANDLER, key_str(&m.key), expires, m.record.as_slice()])?;
                kv.execute(params![HANDLER, m.kv_key, m.kv_value.as_slice()])?;
                outbox.execute(params![HANDLER, m.seq as i64, m.outbox])?;
            }
            if !remove.is_empty() {
                let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE handler = ?1 AND seq = ?2")?;
                for s in remove {
                    stmt.execute(params![HANDLER, *s as i64])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn remove_outbox(&mut self, seqs: &[u64]) -> R<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE handler = ?1 AND seq = ?2")?;
            for s in seqs {
                stmt.execute(params![HANDLER, *s as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn preload(&mut self, keys: &mut dyn Iterator<Item = (Key, u64)>) -> R<()> {
        let record = crate::model::record(0, &[7; 32]);
        loop {
            let tx = self.conn.transaction()?;
            let mut n = 0;
            {
                let mut stmt =
                    tx.prepare_cached("INSERT INTO dedup(handler, key, expires, rec) VALUES (?1, ?2, ?3, ?4)")?;
                for (key, expires) in (&mut *keys).take(50_000) {
                    let mut r = record;
                    r[1..9].copy_from_slice(&expires.to_le_bytes());
                    stmt.execute(params![HANDLER, key_str(&key), expires as i64, r.as_slice()])?;
                    n += 1;
                }
            }
            tx.commit()?;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    fn sweep(&mut self, now_ms: u64) -> R<Sweep> {
        let mut sweep = Sweep { how: "DELETE through the index on expires, 10k per txn", ..Sweep::default() };
        let started = Instant::now();
        loop {
            let chunk = Instant::now();
            let tx = self.conn.transaction()?;
            let n = tx.execute(
                "DELETE FROM dedup WHERE (handler, key) IN
                     (SELECT handler, key FROM dedup WHERE expires <= ?1 ORDER BY expires LIMIT ?2)",
                params![now_ms as i64, SWEEP_CHUNK as i64],
            )?;
            tx.commit()?;
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

    fn finish_run(&mut self) -> R<()> {
        let _: (i64, i64, i64) =
            self.conn.query_row("PRAGMA wal_checkpoint(FULL)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(())
    }

    fn outbox_from(&mut self, from: u64) -> R<Vec<u64>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT seq FROM outbox WHERE handler = ?1 AND seq >= ?2 ORDER BY seq")?;
        let rows = stmt.query_map(params![HANDLER, from as i64], |r| r.get::<_, i64>(0))?;
        let mut seqs = Vec::new();
        for r in rows {
            seqs.push(r? as u64);
        }
        Ok(seqs)
    }
}
