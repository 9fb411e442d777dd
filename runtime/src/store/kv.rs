//! The `nats-kv` backend: JetStream key-value buckets, replicated by the NATS cluster and
//! shared by every Sluice process, so a duplicate is caught whichever process receives it.
//!
//! **One bucket per handler**, `sluice-kv-<handler>`, holds everything the handler owns: its
//! idempotency records (`h…`), the guest's dedup marks (`g…`) and kv (`k…`), resequencing
//! positions (`s…`) and the outbox (`o.<instance>.<seq>`). One bucket is one stream, and a
//! stream is what an atomic batch publish (nats-server 2.12+) commits to: a call's record,
//! kv writes and outbox entries land together or not at all. The bucket's stream gets
//! `allow_atomic` and `allow_msg_ttl` (an existing bucket of an older Sluice is upgraded in
//! place); records and marks carry their own time to live (`Nats-TTL`), so the bucket needs
//! no `max_age` and the guest's kv keeps its values for ever.
//!
//! Keys are hashed (SHA-256, hex), since idempotency keys and guest keys may hold characters
//! KV keys cannot; outbox keys are the writing store's random instance id and a sequence
//! number, so that the processes sharing the bucket never overwrite each other's entries.
//!
//! Writes are raw publishes to the bucket's subjects, with the headers KV uses
//! (`KV-Operation: DEL` for a delete) and `Nats-Expected-Last-Subject-Sequence` for a
//! compare-and-swap; reads are the bucket's direct gets.
//!
//! Round trips per message with `[idempotency]` (a new key, the usual case): one write to take
//! the lease (a create: no read first), one for the commit (a single publish when the call
//! wrote nothing else; an atomic batch, acknowledged once, when it did). A duplicate costs the
//! failed create and one read.
//!
//! An older Sluice kept idempotency records in a second bucket, `sluice-dedup-<handler>`. While
//! that bucket holds records, a record missing from the new bucket is looked up there too, so a
//! duplicate of a message handled before the upgrade is still skipped.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::{Counters, Expect, Op, Space, StoreError, Versioned};

/// The most writes one commit may hold: nats-server's atomic batch limit (`max_batch_size`,
/// 1000 by default).
pub const MAX_BATCH: usize = 1000;
/// Atomic batches in flight per store at most: nats-server refuses more than 50 per stream
/// (and 1000 per server) at once.
const BATCHES_IN_FLIGHT: usize = 32;
/// How long a delete marker stays (it only hides an older value, which the bucket's history of
/// one has already dropped; past this the key is simply absent, which reads the same).
const DELETE_TTL: Duration = Duration::from_secs(600);
/// How old another process's outbox entry must be before this one takes it over: older than a
/// live relay takes to send it unless its target is unavailable.
pub const ORPHAN_AGE: Duration = Duration::from_secs(10);

const EXPECTED_LAST: &str = "Nats-Expected-Last-Subject-Sequence";
/// nats-server's "wrong last sequence" for a subject already written, or being written, in
/// the same batch or by a concurrent publish (`JSStreamWrongLastSequenceConstantErr`).
const WRONG_LAST_SEQUENCE_CONSTANT: u64 = 10164;

#[derive(Debug, Clone)]
pub struct KvStore {
    js: jetstream::Context,
    replicas: usize,
    buckets: Arc<RwLock<HashMap<String, Arc<Bucket>>>>,
    counters: Arc<Counters>,
    /// Names this store's outbox entries apart from those of other processes (and of this
    /// process before a restart or a reload).
    instance: Arc<str>,
    batches: Arc<Semaphore>,
}

#[derive(Debug)]
struct Bucket {
    kv: kv::Store,
    /// Where writes go: `$KV.<bucket>.`.
    put_prefix: String,
    /// An older Sluice's `sluice-dedup-<handler>`, while it holds records.
    legacy: Option<kv::Store>,
}

/// One write, as a message to the bucket's stream.
struct Message {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

impl KvStore {
    /// A store on `js`'s KV buckets; `counters` is shared by every handler's store.
    pub fn new(js: jetstream::Context, replicas: usize, counters: Arc<Counters>) -> Self {
        KvStore {
            js,
            replicas: replicas.max(1),
            buckets: Arc::default(),
            counters,
            instance: format!("{:016x}", fastrand::u64(..)).into(),
            batches: Arc::new(Semaphore::new(BATCHES_IN_FLIGHT)),
        }
    }

    /// Creates (or upgrades) the handler's bucket now, so a misconfiguration shows at start-up.
    pub async fn prepare(&self, handler: &str) -> Result<(), StoreError> {
        self.bucket(handler).await.map(|_| ())
    }

    async fn bucket(&self, handler: &str) -> Result<Arc<Bucket>, StoreError> {
        // Every call looks its bucket up: a read lock, not held across an await. Opening a
        // bucket happens once per handler (in `prepare`); two racing openers get the same
        // bucket from the server.
        if let Some(b) = self.buckets.read().ok().and_then(|b| b.get(handler).cloned()) {
            return Ok(b);
        }
        let name = format!("sluice-kv-{handler}");
        let store = match self.js.get_key_value(&name).await {
            Ok(store) => store,
            Err(_) => {
                // The stream of a KV bucket, as async-nats lays it out, with atomic batches and
                // per-message TTLs on from the start (so a new bucket needs no update).
                let config = jetstream::stream::Config {
                    name: format!("KV_{name}"),
                    description: Some(format!("Sluice state of handler {handler}")),
                    subjects: vec![format!("$KV.{name}.>")],
                    max_messages_per_subject: 1,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: jetstream::stream::DiscardPolicy::New,
                    num_replicas: self.replicas,
                    allow_atomic_publish: true,
                    allow_message_ttl: true,
                    ..Default::default()
                };
                // Two processes creating it at once get the same stream (the same config).
                self.js
                    .get_or_create_stream(config)
                    .await
                    .map_err(|e| StoreError::backend(format!("cannot create KV bucket {name}"), e))?;
                self.js
                    .get_key_value(&name)
                    .await
                    .map_err(|e| StoreError::backend(format!("cannot open KV bucket {name}"), e))?
            }
        };
        let config = &store.stream.cached_info().config;
        if !config.allow_atomic_publish || !config.allow_message_ttl {
            // A bucket of an older Sluice: upgraded in place, once.
            let mut config = config.clone();
            config.allow_atomic_publish = true;
            config.allow_message_ttl = true;
            let what = || {
                format!(
                    "cannot turn on atomic batches and message TTLs for KV bucket {name}, made by an older Sluice \
                     (this needs nats-server 2.12 or later, and permission to publish to \
                     $JS.API.STREAM.UPDATE.KV_{name})"
                )
            };
            let info = self.js.update_stream(&config).await.map_err(|e| StoreError::backend(what(), e))?;
            // A server that does not know the fields ignores them.
            if !info.config.allow_atomic_publish || !info.config.allow_message_ttl {
                return Err(StoreError::backend(what(), std::io::Error::other("the server ignored them")));
            }
            tracing::info!(bucket = %name, "KV bucket upgraded: atomic batches and message TTLs on");
        }
        let legacy = self.legacy(handler).await;
        let bucket = Arc::new(Bucket {
            put_prefix: store.put_prefix.clone().unwrap_or_else(|| store.prefix.clone()),
            kv: store,
            legacy,
        });
        if let Ok(mut buckets) = self.buckets.write() {
            buckets.insert(handler.to_owned(), bucket.clone());
        }
        Ok(bucket)
    }

    /// The dedup bucket of an older Sluice, if it still holds records.
    async fn legacy(&self, handler: &str) -> Option<kv::Store> {
        let name = format!("sluice-dedup-{handler}");
        let old = self.js.get_key_value(&name).await.ok()?;
        let mut stream = old.stream.clone();
        let messages = stream.info().await.ok()?.state.messages;
        if messages == 0 {
            tracing::info!(bucket = %name, "the dedup bucket of an older Sluice is empty and unused: it can be deleted");
            return None;
        }
        tracing::info!(
            bucket = %name,
            records = messages,
            "reading the idempotency records of an older Sluice from this bucket too, while they last"
        );
        Some(old)
    }

    fn key(&self, space: Space, key: &str) -> String {
        let prefix = match space {
            Space::Dedup => "h",
            Space::GuestDedup => "g",
            Space::Kv => "k",
            // This store's own entries are numbered by its relay; what a scan returns is
            // already `<instance>.<seq>`.
            Space::Outbox if key.contains('.') => return format!("o.{key}"),
            Space::Outbox => return format!("o.{}.{key}", self.instance),
            Space::Sequence => "s",
        };
        format!("{prefix}{}", hex::encode(Sha256::digest(key.as_bytes())))
    }

    pub async fn get(&self, handler: &str, space: Space, key: &str) -> Result<Option<Versioned>, StoreError> {
        let bucket = self.bucket(handler).await?;
        let key = self.key(space, key);
        Counters::add(&self.counters.reads, 1);
        let entry = bucket.kv.entry(&key).await.map_err(|e| StoreError::backend("KV get", e))?;
        if let Some(e) = entry {
            return Ok(
                (e.operation == kv::Operation::Put).then(|| Versioned { value: e.value.to_vec(), version: e.revision })
            );
        }
        // Absent here: an older Sluice's record, if there is one. Its version is 0, which a
        // swap in this bucket reads as "absent here".
        Ok(self.legacy_record(&bucket, space, &key).await?.map(|value| Versioned { value, version: 0 }))
    }

    /// Whether an older Sluice's dedup bucket for `handler` still held records when this
    /// store prepared it (its records are read on a miss).
    pub async fn legacy_records(&self, handler: &str) -> Result<bool, StoreError> {
        Ok(self.bucket(handler).await?.legacy.is_some())
    }

    /// The value an older Sluice's dedup bucket holds for `key` (records and marks only).
    async fn legacy_record(&self, bucket: &Bucket, space: Space, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (Some(legacy), Space::Dedup | Space::GuestDedup) = (&bucket.legacy, space) else { return Ok(None) };
        Counters::add(&self.counters.reads, 1);
        let old = legacy.entry(key).await.map_err(|e| StoreError::backend("KV get", e))?;
        Ok(old.filter(|e| e.operation == kv::Operation::Put).map(|e| e.value.to_vec()))
    }

    /// Replaces `key` if its version is still `expected` (`None` or `Some(0)`: absent); the
    /// new version, or `None` when someone else changed it first.
    pub async fn swap(
        &self,
        handler: &str,
        space: Space,
        key: &str,
        expected: Option<u64>,
        value: Option<Vec<u8>>,
        ttl: Option<Duration>,
    ) -> Result<Option<u64>, StoreError> {
        let bucket = self.bucket(handler).await?;
        let key = self.key(space, key);
        // A record an older Sluice kept counts as present: the caller reads it (`get`).
        if expected.is_none() && self.legacy_record(&bucket, space, &key).await?.is_some() {
            return Ok(None);
        }
        Counters::add(&self.counters.writes, 1);
        let message = Self::message(&bucket, &key, Some(expected.unwrap_or(0)), value.clone(), ttl);
        match self.publish(message).await {
            Ok(revision) => Ok(Some(revision)),
            // "Absent" may be a delete marker: then its revision is the one to name.
            Err(StoreError::Conflict) if expected.is_none() => {
                Counters::add(&self.counters.reads, 1);
                match bucket.kv.entry(&key).await.map_err(|e| StoreError::backend("KV get", e))? {
                    Some(e) if e.operation != kv::Operation::Put => {
                        Counters::add(&self.counters.writes, 1);
                        match self.publish(Self::message(&bucket, &key, Some(e.revision), value, ttl)).await {
                            Ok(revision) => Ok(Some(revision)),
                            Err(StoreError::Conflict) => Ok(None),
                            Err(e) => Err(e),
                        }
                    }
                    _ => Ok(None),
                }
            }
            Err(StoreError::Conflict) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes (or, with `None`, deletes) `key` whatever its revision.
    pub async fn put(
        &self,
        handler: &str,
        space: Space,
        key: &str,
        value: Option<Vec<u8>>,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let bucket = self.bucket(handler).await?;
        let key = self.key(space, key);
        Counters::add(&self.counters.writes, 1);
        self.publish(Self::message(&bucket, &key, None, value, ttl)).await.map(|_| ())
    }

    /// Applies `ops` together if every expectation holds: one publish for one op, an atomic
    /// batch for more (its messages sent without waiting, the commit acknowledged once). False
    /// (nothing applied) when an expectation does not hold.
    pub async fn commit(&self, handler: &str, ops: Vec<Op>) -> Result<bool, StoreError> {
        if ops.len() > MAX_BATCH {
            return Err(StoreError::TooLarge { writes: ops.len(), max: MAX_BATCH });
        }
        let bucket = self.bucket(handler).await?;
        let mut messages = Vec::with_capacity(ops.len());
        for op in ops {
            let key = self.key(op.space, &op.key);
            let expected = match op.expect {
                Expect::Any => None,
                Expect::Is(Some(version)) => Some(version),
                // Absent when the call looked: absent now is no message on the subject, or a
                // delete marker, whose revision is the one to name.
                Expect::Is(None) => {
                    Counters::add(&self.counters.reads, 1);
                    match bucket.kv.entry(&key).await.map_err(|e| StoreError::backend("KV get", e))? {
                        None => Some(0),
                        Some(e) if e.operation != kv::Operation::Put => Some(e.revision),
                        Some(_) => return Ok(false),
                    }
                }
            };
            messages.push(Self::message(&bucket, &key, expected, op.value, op.ttl));
        }
        Counters::add(&self.counters.writes, messages.len() as u64);
        Counters::add(&self.counters.transactions, 1);
        let result = match messages.len() {
            0 => return Ok(true),
            1 => self.publish(messages.remove(0)).await,
            _ => self.batch(messages).await,
        };
        match result {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn message(
        bucket: &Bucket,
        key: &str,
        expected: Option<u64>,
        value: Option<Vec<u8>>,
        ttl: Option<Duration>,
    ) -> Message {
        let mut headers = HeaderMap::new();
        if let Some(revision) = expected {
            headers.insert(EXPECTED_LAST, revision.to_string());
        }
        let ttl = match value {
            Some(_) => ttl,
            None => {
                headers.insert("KV-Operation", "DEL");
                Some(DELETE_TTL)
            }
        };
        if let Some(ttl) = ttl {
            // Whole seconds, at least one (the server's minimum), rounded up.
            let secs = ttl.as_millis().div_ceil(1000).max(1);
            headers.insert("Nats-TTL", format!("{secs}s"));
        }
        Message {
            subject: format!("{}{key}", bucket.put_prefix),
            headers,
            payload: value.map(Bytes::from).unwrap_or_default(),
        }
    }

    /// One acknowledged publish; its stream sequence (the key's new revision).
    async fn publish(&self, m: Message) -> Result<u64, StoreError> {
        let ack = self
            .js
            .send_publish(m.subject, PublishMessage::build().headers(m.headers).payload(m.payload))
            .await
            .map_err(classify)?
            .await
            .map_err(classify)?;
        Ok(ack.sequence)
    }

    /// An atomic batch: every message but the last published without an ack, the last with
    /// `Nats-Batch-Commit` and awaited. The server stores all of them or none.
    async fn batch(&self, mut messages: Vec<Message>) -> Result<u64, StoreError> {
        let _permit = self.batches.acquire().await.map_err(|_| StoreError::WriterStopped)?;
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let n = messages.len();
        for (i, m) in messages.iter_mut().enumerate() {
            m.headers.insert("Nats-Batch-Id", id.as_str());
            m.headers.insert("Nats-Batch-Sequence", (i + 1).to_string());
        }
        let Some(mut last) = messages.pop() else { return Ok(0) };
        last.headers.insert("Nats-Batch-Commit", "1");
        let client = self.js.client();
        for m in messages {
            client
                .publish_with_headers(m.subject, m.headers, m.payload)
                .await
                .map_err(|e| StoreError::backend(format!("KV batch of {n}"), e))?;
        }
        self.publish(last).await
    }

    /// The handler's outbox entries, oldest first, keyed `<instance>.<seq>`: all of them, or
    /// (`adopting`) those left unsent for [`ORPHAN_AGE`]: by another store (another process,
    /// or this one before a restart or a reload), or by this one, whose relay was never told
    /// of them (a commit that landed but whose acknowledgement was lost, so the call was
    /// retried and found its key handled) or could not remove them after sending.
    pub async fn scan_outbox(&self, handler: &str, adopting: bool) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let bucket = self.bucket(handler).await?;
        let filter = format!("{}o.>", bucket.kv.prefix);
        let failed = |e| StoreError::backend("KV scan of the outbox", e);
        let mut subjects = Vec::new();
        {
            let stream = bucket.kv.stream.clone();
            let mut info = stream.info_with_subjects(&filter).await.map_err(failed)?;
            while let Some(item) = info.next().await {
                let (subject, _) = item.map_err(failed)?;
                if let Some(key) = subject.strip_prefix(bucket.kv.prefix.as_str()) {
                    subjects.push(key.to_owned());
                }
            }
        }
        Counters::add(&self.counters.reads, subjects.len() as u64);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let age = if adopting { ORPHAN_AGE } else { Duration::ZERO };
        let cutoff = async_nats::datetime::from_nanos(now.saturating_sub(age).as_nanos() as i128)
            .map_err(|e| StoreError::backend("the clock", std::io::Error::other(e.to_string())))?;
        let mut found: Vec<(u64, String, Vec<u8>)> = Vec::new();
        let mut entries = futures::stream::iter(subjects)
            .map(|key| {
                let kv = bucket.kv.clone();
                async move { kv.entry(&key).await.map(|e| (key, e)) }
            })
            .buffer_unordered(32);
        while let Some(result) = entries.next().await {
            let (key, entry) = result.map_err(|e| StoreError::backend("KV get", e))?;
            if let Some(e) = entry.filter(|e| e.operation == kv::Operation::Put && e.created <= cutoff)
                && let Some(rest) = key.strip_prefix("o.")
            {
                found.push((e.revision, rest.to_owned(), e.value.to_vec()));
            }
        }
        found.sort_by_key(|(revision, ..)| *revision);
        Ok(found.into_iter().map(|(_, key, value)| (key, value)).collect())
    }

    /// Removes entries of `space` (the relay's sent outbox entries), each removal acknowledged
    /// and retried once; a removal that still fails leaves the entry for a later adoption,
    /// which re-sends it under its id (logged).
    pub async fn remove(&self, handler: &str, space: Space, keys: Vec<String>) {
        let Ok(bucket) = self.bucket(handler).await else { return };
        let removals = keys.into_iter().map(|key| {
            let key = self.key(space, &key);
            let bucket = bucket.clone();
            async move {
                for attempt in 0..2 {
                    Counters::add(&self.counters.writes, 1);
                    match self.publish(Self::message(&bucket, &key, None, None, None)).await {
                        Ok(_) => return,
                        Err(e) if attempt == 1 => {
                            tracing::warn!(handler = %store_handler(&bucket), "outbox: cannot remove a sent entry ({e}); it may be sent again");
                        }
                        Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
            }
        });
        futures::stream::iter(removals).buffer_unordered(64).collect::<Vec<()>>().await;
    }
}

fn store_handler(bucket: &Bucket) -> &str {
    bucket.kv.name.strip_prefix("sluice-kv-").unwrap_or(&bucket.kv.name)
}

/// A refused write: a failed expectation is a [`StoreError::Conflict`], anything else the
/// backend's failure.
fn classify(e: PublishError) -> StoreError {
    let constant = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|api| api.error_code().0 == WRONG_LAST_SEQUENCE_CONSTANT);
    match e.kind() {
        PublishErrorKind::WrongLastSequence => StoreError::Conflict,
        _ if constant => StoreError::Conflict,
        _ => StoreError::backend("KV write", e),
    }
}
