//! Parked ordering keys (`[ordering] on_poison = "park"`): when a message of an ordered key
//! is dead-lettered, the key is parked, and its later messages are dead-lettered as
//! `key-parked` (in order) until an operator releases it with `sluice ordering release`.
//!
//! The parked keys of a handler live in a NATS KV bucket, `sluice-parked-<handler>`, so they
//! survive restarts and every process serving the handler sees them (the process that takes a
//! partition over included). Each process mirrors the bucket in memory through a watch: the
//! check on every message is a set lookup, not a round trip.
//!
//! Imports: nothing of the runtime (a leaf).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use metrics::Gauge;

/// The bucket of `handler`'s parked keys.
pub fn bucket(handler: &str) -> String {
    format!("sluice-parked-{handler}")
}

/// A bucket key for an ordering key (any text): its hex, which KV keys accept.
fn entry_key(key: &str) -> String {
    hex::encode(key.as_bytes())
}

/// What a parked key's entry holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ParkedKey {
    /// The ordering key.
    pub key: String,
    /// When it was parked (RFC 3339).
    pub parked_at: String,
    /// Why: the failure of the message that was dead-lettered.
    pub reason: String,
}

/// A handler's parked keys, mirrored from its bucket.
#[derive(Debug)]
pub struct Parked {
    kv: kv::Store,
    keys: Arc<RwLock<HashSet<String>>>,
    watch: tokio::task::JoinHandle<()>,
    gauge: Gauge,
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

/// Opens (or creates) `handler`'s bucket.
async fn open_bucket(js: &jetstream::Context, handler: &str, replicas: usize) -> anyhow::Result<kv::Store> {
    let name = bucket(handler);
    match js.get_key_value(&name).await {
        Ok(kv) => Ok(kv),
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: name.clone(),
                description: format!("Sluice: parked ordering keys of handler {handler}"),
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("cannot create KV bucket {name}: {e}")),
    }
}

impl Parked {
    /// Loads `handler`'s parked keys and follows the bucket's changes.
    pub async fn open(
        js: &jetstream::Context,
        handler: &str,
        replicas: usize,
        gauge: Gauge,
    ) -> anyhow::Result<Arc<Parked>> {
        let kv = open_bucket(js, handler, replicas).await?;
        let keys: Arc<RwLock<HashSet<String>>> = Arc::default();
        // The watch replays the bucket's current entries, then follows it; waiting for the
        // replay to end (or finding the bucket empty) means no message is let through that a
        // park from before this start should stop.
        let mut watch =
            kv.watch_with_history(">").await.map_err(|e| anyhow::anyhow!("watching {}: {e}", bucket(handler)))?;
        let pending = kv.status().await.map(|s| s.values()).unwrap_or(0);
        let apply = |keys: &RwLock<HashSet<String>>, entry: &kv::Entry, gauge: &Gauge| {
            let Ok(mut set) = keys.write() else { return };
            let key = hex::decode(&entry.key).ok().and_then(|k| String::from_utf8(k).ok());
            if let Some(key) = key {
                match entry.operation {
                    kv::Operation::Put => set.insert(key),
                    kv::Operation::Delete | kv::Operation::Purge => set.remove(&key),
                };
            }
            gauge.set(set.len() as f64);
        };
        if pending > 0 {
            while let Some(Ok(entry)) = watch.next().await {
                apply(&keys, &entry, &gauge);
                if entry.delta == 0 {
                    break;
                }
            }
        }
        let (mirror, g) = (keys.clone(), gauge.clone());
        let task = tokio::spawn(async move {
            while let Some(next) = watch.next().await {
                match next {
                    Ok(entry) => apply(&mirror, &entry, &g),
                    Err(e) => tracing::warn!("watching parked keys: {e}"),
                }
            }
        });
        Ok(Arc::new(Parked { kv, keys, watch: task, gauge }))
    }

    /// Whether `key` is parked.
    pub fn contains(&self, key: &str) -> bool {
        self.keys.read().is_ok_and(|k| k.contains(key))
    }

    /// The parked keys, sorted.
    pub fn list(&self) -> Vec<String> {
        let mut all: Vec<String> = self.keys.read().map(|k| k.iter().cloned().collect()).unwrap_or_default();
        all.sort();
        all
    }

    /// Parks `key`: at once in this process, and in the bucket for the others (and for
    /// after a restart).
    pub async fn park(&self, key: &str, reason: &str) -> anyhow::Result<()> {
        if let Ok(mut set) = self.keys.write() {
            set.insert(key.to_owned());
            self.gauge.set(set.len() as f64);
        }
        let entry = ParkedKey {
            key: key.to_owned(),
            parked_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            reason: reason.to_owned(),
        };
        let value = serde_json::to_vec(&entry)?;
        self.kv
            .put(entry_key(key), value.into())
            .await
            .map_err(|e| anyhow::anyhow!("cannot store the parked key: {e}"))?;
        Ok(())
    }
}

/// The parked keys of `handler`, from its bucket (for the CLI): none when it has no bucket.
#[cfg(any(feature = "cli", feature = "testing"))]
pub async fn list(js: &jetstream::Context, handler: &str) -> anyhow::Result<Vec<ParkedKey>> {
    let Ok(kv) = js.get_key_value(bucket(handler)).await else { return Ok(Vec::new()) };
    let mut keys = kv.keys().await.map_err(|e| anyhow::anyhow!("listing {}: {e}", bucket(handler)))?;
    let mut all = Vec::new();
    while let Some(k) = keys.next().await {
        let k = k.map_err(|e| anyhow::anyhow!("listing {}: {e}", bucket(handler)))?;
        if let Ok(Some(value)) = kv.get(&k).await
            && let Ok(entry) = serde_json::from_slice::<ParkedKey>(&value)
        {
            all.push(entry);
        }
    }
    all.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(all)
}

/// Releases `key` of `handler`: its later messages are handled again. False when it was not
/// parked.
#[cfg(any(feature = "cli", feature = "testing"))]
pub async fn release(js: &jetstream::Context, handler: &str, key: &str) -> anyhow::Result<bool> {
    let Ok(kv) = js.get_key_value(bucket(handler)).await else { return Ok(false) };
    let k = entry_key(key);
    match kv.get(&k).await {
        Ok(Some(_)) => {}
        Ok(None) => return Ok(false),
        Err(e) => anyhow::bail!("reading {}: {e}", bucket(handler)),
    }
    kv.delete(&k).await.map_err(|e| anyhow::anyhow!("cannot release {key:?}: {e}"))?;
    Ok(true)
}
