//! The commit shape the outbox design has, the same for every engine.

use std::error::Error;
use std::path::Path;

pub type R<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The handler every message belongs to (outbox keys are (handler, seq)).
pub const HANDLER: &str = "orders";
/// Guest kv keys a message's one write is drawn from.
pub const KV_KEYS: u64 = 1000;
pub const RECORD_LEN: usize = 80;
pub const OUTBOX_LEN: usize = 200;

/// An idempotency key: 32 lowercase hex characters (a UUID's worth of randomness), derived
/// from a number so a crash check can recompute the key of any sequence number.
pub type Key = [u8; 32];

pub fn key_of(n: u64, salt: u64) -> Key {
    // Both inputs go through the mixer, so (n, salt) pairs cannot collide by arithmetic.
    let a = splitmix(splitmix(n) ^ splitmix(salt.wrapping_mul(0x2545_f491_4f6c_dd1d)));
    let b = splitmix(a ^ 0x9e37_79b9_7f4a_7c15);
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&a.to_le_bytes());
    raw[8..].copy_from_slice(&b.to_le_bytes());
    let mut key = [0u8; 32];
    hex::encode_to_slice(raw, &mut key).unwrap_or_default();
    key
}

pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The dedup record: state, expiry, payload fingerprint (SHA-256 sized), padded to 80 bytes
/// (today's JSON record with a hex fingerprint is longer; a binary one is about this).
pub fn record(expires_ms: u64, fingerprint: &[u8; 32]) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0] = 2; // completed
    r[1..9].copy_from_slice(&expires_ms.to_le_bytes());
    r[9..41].copy_from_slice(fingerprint);
    r
}

pub fn record_expires(r: &[u8]) -> u64 {
    r.get(1..9).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
}

pub fn record_fingerprint(r: &[u8]) -> Option<[u8; 32]> {
    r.get(9..41).and_then(|b| b.try_into().ok())
}

/// The guest kv key of counter `i`.
pub fn kv_key(i: u64) -> String {
    format!("counter-{i:04}")
}

/// One message's effects: its dedup record, one guest kv write, one outbox entry.
#[derive(Debug, Clone)]
pub struct Msg {
    pub key: Key,
    pub record: [u8; RECORD_LEN],
    pub kv_key: String,
    pub kv_value: [u8; 16],
    pub seq: u64,
    pub outbox: Vec<u8>,
}

impl Msg {
    pub fn new(seq: u64, salt: u64, expires_ms: u64, rng: &mut fastrand::Rng) -> Msg {
        let mut fingerprint = [0u8; 32];
        rng.fill(&mut fingerprint);
        let mut outbox = vec![0u8; OUTBOX_LEN];
        rng.fill(&mut outbox);
        let mut kv_value = [0u8; 16];
        kv_value[..8].copy_from_slice(&seq.to_le_bytes());
        Msg {
            key: key_of(seq, salt),
            record: record(expires_ms, &fingerprint),
            kv_key: kv_key(rng.u64(..KV_KEYS)),
            kv_value,
            seq,
            outbox,
        }
    }
}

/// What a TTL sweep did.
#[derive(Debug, Clone, Default)]
pub struct Sweep {
    pub removed: u64,
    pub transactions: u64,
    pub total_ms: f64,
    /// The longest single step that holds the writer (one chunk, or one compaction).
    pub longest_ms: f64,
    pub how: &'static str,
    /// Expired records still stored afterwards (where the engine removes them lazily).
    pub left: u64,
}

/// One candidate: an engine and a layout.
pub trait Store {
    /// Point lookup of a dedup key on the hot path: the fingerprint of a live record.
    fn lookup(&mut self, key: &Key, now_ms: u64) -> R<Option<[u8; 32]>>;
    /// One atomic durable transaction holding every message's three writes, and the removal
    /// of outbox entries `remove` (empty, unless the relay's removals ride in the next commit).
    fn commit(&mut self, msgs: &[Msg], remove: &[u64]) -> R<()>;
    /// One durable transaction removing these outbox entries (the relay, after publishing).
    fn remove_outbox(&mut self, seqs: &[u64]) -> R<()>;
    /// Bulk load: dedup records for `keys`, record `i` expiring at `expires(i)`.
    fn preload(&mut self, keys: &mut dyn Iterator<Item = (Key, u64)>) -> R<()>;
    /// Expire every record with `expires_ms <= now_ms`, never scanning live records.
    fn sweep(&mut self, now_ms: u64) -> R<Sweep>;
    /// The outbox sequence numbers present, from `from` on (crash check).
    fn outbox_from(&mut self, from: u64) -> R<Vec<u64>>;
    /// Bytes of bookkeeping held in memory by the layout itself (not the engine's cache).
    fn index_bytes(&self) -> u64 {
        0
    }
    /// Finishes the work a measured run started and deferred (fjall: the flushes and
    /// compactions under way; SQLite: checkpointing the WAL), so the run is charged for it.
    fn finish_run(&mut self) -> R<()> {
        Ok(())
    }
    /// Time spent compacting in the background so far, where the engine does, ms.
    fn background_ms(&self) -> Option<f64> {
        None
    }
    /// Waits for background work the bulk load left (fjall's flushes and compactions), ms.
    fn settle(&mut self) -> f64 {
        0.0
    }
    /// Today's sweep (a scan of every record), where the candidate is today's layout, ms.
    fn full_scan_sweep(&mut self, _now_ms: u64) -> R<Option<f64>> {
        Ok(None)
    }
}

/// Cache every engine is given, so none wins by caching more.
pub const CACHE_BYTES: usize = 256 << 20;
/// Expired records deleted per transaction by a chunked sweep.
pub const SWEEP_CHUNK: usize = 10_000;

/// Opens a candidate's store in `dir` (creating it), by name.
pub fn open(name: &str, dir: &Path) -> R<Box<dyn Store>> {
    Ok(match name {
        "redb-random" => Box::new(crate::redb_random::RedbRandom::open(dir)?),
        "redb-log" => Box::new(crate::redb_log::RedbLog::open(dir)?),
        "fjall" => Box::new(crate::fjall_lsm::FjallLsm::open(dir)?),
        "sqlite" => Box::new(crate::sqlite::Sqlite::open(dir)?),
        other => return Err(format!("unknown candidate {other}").into()),
    })
}

pub const CANDIDATES: &[&str] = &["redb-random", "redb-log", "fjall", "sqlite"];
