//! The `nats-kv` backend: JetStream key-value buckets, replicated by the NATS cluster and
//! shared by every Sluice process, so a duplicate is caught whichever process receives it.
//!
//! Buckets are per handler: `sluice-dedup-<handler>` (host and guest dedup records, kept
//! `max_age`) and `sluice-kv-<handler>` (the guest's kv). Keys are hashed (SHA-256, hex), since
//! idempotency keys and guest keys may hold characters KV keys cannot.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use sha2::{Digest, Sha256};

use super::{Counters, Space, StoreError, Versioned};

#[derive(Debug, Clone)]
pub struct KvStore {
    js: jetstream::Context,
    replicas: usize,
    /// How long dedup records are kept at most (the bucket's max age).
    dedup_max_age: Duration,
    buckets: Arc<RwLock<HashMap<String, kv::Store>>>,
    counters: Arc<Counters>,
}

impl KvStore {
    /// A store on `js`'s KV buckets; `counters` is shared by every handler's store.
    pub fn new(js: jetstream::Context, replicas: usize, dedup_max_age: Duration, counters: Arc<Counters>) -> Self {
        KvStore { js, replicas: replicas.max(1), dedup_max_age, buckets: Arc::default(), counters }
    }

    /// Creates the handler's buckets now, so a misconfiguration shows at start-up.
    pub async fn prepare(&self, handler: &str) -> Result<(), StoreError> {
        self.bucket(handler, Space::Dedup).await?;
        self.bucket(handler, Space::Kv).await?;
        Ok(())
    }

    async fn bucket(&self, handler: &str, space: Space) -> Result<kv::Store, StoreError> {
        let (name, max_age) = match space {
            Space::Dedup | Space::GuestDedup => (format!("sluice-dedup-{handler}"), self.dedup_max_age),
            // The outbox is not kept on nats-kv (see `Store::outbox`); the arm keeps the match whole.
            Space::Kv | Space::Outbox | Space::Sequence => (format!("sluice-kv-{handler}"), Duration::ZERO),
        };
        // Every call looks its bucket up: a read lock, not held across an await. Creating a
        // bucket happens once per handler (in `prepare`); two racing creators get the same
        // bucket from the server.
        if let Some(b) = self.buckets.read().ok().and_then(|b| b.get(&name).cloned()) {
            return Ok(b);
        }
        let store = match self.js.get_key_value(&name).await {
            Ok(store) => store,
            Err(_) => self
                .js
                .create_key_value(kv::Config {
                    bucket: name.clone(),
                    description: format!("Sluice state of handler {handler}"),
                    history: 1,
                    max_age,
                    num_replicas: self.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| StoreError::backend(format!("cannot create KV bucket {name}"), e))?,
        };
        if let Ok(mut buckets) = self.buckets.write() {
            buckets.insert(name, store.clone());
        }
        Ok(store)
    }

    fn key(space: Space, key: &str) -> String {
        let prefix = match space {
            Space::Dedup => "h",
            Space::GuestDedup => "g",
            Space::Kv => "k",
            Space::Outbox => "o",
            Space::Sequence => "s",
        };
        format!("{prefix}{}", hex::encode(Sha256::digest(key.as_bytes())))
    }

    pub async fn get(&self, handler: &str, space: Space, key: &str) -> Result<Option<Versioned>, StoreError> {
        let bucket = self.bucket(handler, space).await?;
        Counters::add(&self.counters.reads, 1);
        let entry = bucket.entry(Self::key(space, key)).await.map_err(|e| StoreError::backend("KV get", e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| Versioned { value: e.value.to_vec(), version: e.revision }))
    }

    pub async fn swap(
        &self,
        handler: &str,
        space: Space,
        key: &str,
        expected: Option<u64>,
        value: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let bucket = self.bucket(handler, space).await?;
        let key = Self::key(space, key);
        if !(expected.is_none() && value.is_none()) {
            Counters::add(&self.counters.writes, 1);
        }
        match (expected, value) {
            (None, Some(value)) => match bucket.create(&key, value.into()).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(StoreError::backend("KV create", e)),
            },
            (Some(revision), Some(value)) => match bucket.update(&key, value.into(), revision).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(e) => Err(StoreError::backend("KV update", e)),
            },
            (Some(revision), None) => match bucket.delete_expect_revision(&key, Some(revision)).await {
                Ok(()) => Ok(true),
                // A wrong revision is the only expected failure (someone changed the key).
                Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(false),
                Err(e) => Err(StoreError::backend("KV delete", e)),
            },
            (None, None) => Ok(true),
        }
    }

    /// Writes (or, with `None`, deletes) `key` whatever its revision.
    pub async fn put(&self, handler: &str, space: Space, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        let bucket = self.bucket(handler, space).await?;
        let key = Self::key(space, key);
        Counters::add(&self.counters.writes, 1);
        match value {
            Some(value) => {
                bucket.put(&key, value.into()).await.map(|_| ()).map_err(|e| StoreError::backend("KV put", e))
            }
            None => bucket.delete(&key).await.map_err(|e| StoreError::backend("KV delete", e)),
        }
    }
}
