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

mod kv;
mod memory;
mod redb;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use self::kv::KvStore;
pub use self::memory::MemoryStore;
pub use self::redb::RedbStore;

/// Which backend a handler uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    Memory,
    Redb,
    NatsKv,
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
}

impl Space {
    pub fn prefix(self) -> &'static str {
        match self {
            Space::Dedup => "dedup",
            Space::GuestDedup => "guest-dedup",
            Space::Kv => "kv",
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
    /// The memory store's lock was poisoned by a panic.
    #[error("the memory store is unusable after a panic")]
    Poisoned,
}

impl StoreError {
    /// A backend error while doing `what`.
    pub fn backend(what: impl Into<String>, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend { what: what.into(), source: Arc::new(e) }
    }
}

/// One backend.
#[derive(Debug, Clone)]
pub enum Store {
    Memory(Arc<MemoryStore>),
    Redb(RedbStore),
    Kv(Box<KvStore>),
}

impl Store {
    async fn get(&self, handler: &str, space: Space, key: &str) -> Result<Option<Versioned>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.get(handler, space, key)),
            Store::Redb(r) => r.get(handler, space, key).await,
            Store::Kv(k) => k.get(handler, space, key).await,
        }
    }

    /// Replaces the value of `key` if its version is still `expected` (`None`: the key must
    /// be absent); `value` `None` deletes. False when someone else changed it first.
    async fn swap(
        &self,
        handler: &str,
        space: Space,
        key: &str,
        expected: Option<u64>,
        value: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.swap(handler, space, key, expected, value)),
            Store::Redb(r) => r.swap(handler, space, key, expected, value).await,
            Store::Kv(k) => k.swap(handler, space, key, expected, value).await,
        }
    }

    /// Writes (or, with `None`, removes) `key` whatever its version: one write where the
    /// backend has one, instead of a read and a compare-and-swap.
    async fn put(&self, handler: &str, space: Space, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => match m.put(handler, space, key, value) {
                true => Ok(()),
                false => Err(StoreError::Poisoned),
            },
            Store::Redb(r) => r.put(handler, space, key, value).await,
            Store::Kv(k) => k.put(handler, space, key, value).await,
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

/// A handler's view of its store: everything is in that handler's namespace.
#[derive(Debug, Clone)]
pub struct Scope {
    store: Store,
    handler: Arc<str>,
}

impl Scope {
    pub fn new(store: Store, handler: Arc<str>) -> Self {
        Scope { store, handler }
    }

    /// Takes the lease on `key` for `lease`, unless it is completed or leased elsewhere.
    pub async fn begin(&self, key: &str, lease: Duration) -> Result<Begin, StoreError> {
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
            let lease_record = Record::InProgress { until_ms: after(lease) }.encode();
            if self.store.swap(&self.handler, Space::Dedup, key, expected, Some(lease_record)).await? {
                return Ok(Begin::Acquired);
            }
        }
        Err(StoreError::Contended { key: key.to_owned(), rounds: CAS_ROUNDS })
    }

    /// Marks `key` completed for `ttl` (with the payload's fingerprint, when kept).
    pub async fn complete(&self, key: &str, ttl: Duration, fingerprint: Option<String>) -> Result<(), StoreError> {
        let record = Record::Completed { expires_ms: after(ttl), fingerprint }.encode();
        self.put(Space::Dedup, key, Some(record)).await
    }

    /// Gives up the lease on `key` so that a retry can take it at once.
    pub async fn release(&self, key: &str) -> Result<(), StoreError> {
        let current = self.store.get(&self.handler, Space::Dedup, key).await?;
        if let Some(v) = current
            && matches!(Record::decode(&v.value), Some(Record::InProgress { .. }))
        {
            // Lost races are fine: whoever changed it owns it now.
            self.store.swap(&self.handler, Space::Dedup, key, Some(v.version), None).await?;
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
            if self.store.swap(&self.handler, Space::GuestDedup, key, expected, Some(mark)).await? {
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
    pub async fn kv_put(&self, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.put(Space::Kv, key, value).await
    }

    /// The guest's `kv.compare-and-swap`: sets `new` if the value is still `expected`
    /// (`None`: absent).
    pub async fn kv_cas(&self, key: &str, expected: Option<&[u8]>, new: Vec<u8>) -> Result<bool, StoreError> {
        let current = self.store.get(&self.handler, Space::Kv, key).await?;
        let version = match (&current, expected) {
            (None, None) => None,
            (Some(v), Some(e)) if v.value == e => Some(v.version),
            _ => return Ok(false),
        };
        self.store.swap(&self.handler, Space::Kv, key, version, Some(new)).await
    }

    /// Unconditional write (`None` deletes): one write, whatever is there.
    async fn put(&self, space: Space, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.store.put(&self.handler, space, key, value).await
    }
}

/// The protocol every backend must follow, as one test routine: the unit tests run it on
/// `memory` and `redb`, the integration tests on `nats-kv` against a real server.
#[doc(hidden)]
#[allow(clippy::unwrap_used)]
pub mod conformance {
    use std::time::Duration;

    use super::{Begin, Scope, Store};

    pub async fn protocol(store: Store) {
        let a = Scope::new(store.clone(), "a".into());
        let b = Scope::new(store, "b".into());
        let lease = Duration::from_millis(200);

        assert_eq!(a.begin("k", lease).await.unwrap(), Begin::Acquired);
        assert!(matches!(a.begin("k", lease).await.unwrap(), Begin::InProgress { .. }));
        // Another handler's namespace is separate.
        assert_eq!(b.begin("k", lease).await.unwrap(), Begin::Acquired);

        a.release("k").await.unwrap();
        assert_eq!(a.begin("k", lease).await.unwrap(), Begin::Acquired);
        a.complete("k", Duration::from_millis(300), Some("fp".into())).await.unwrap();
        assert_eq!(a.begin("k", lease).await.unwrap(), Begin::Completed { fingerprint: Some("fp".into()) });

        // A lapsed lease is taken over; an expired completion is forgotten.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(a.begin("k", lease).await.unwrap(), Begin::Acquired);
        tokio::time::sleep(Duration::from_millis(250)).await;
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_protocol() {
        conformance::protocol(Store::Memory(Arc::new(MemoryStore::new(1000)))).await;
    }

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
