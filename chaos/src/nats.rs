//! The harness's own NATS client work: streams, the publisher (which survives the faults
//! too), and the independent reader that counts every output.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

/// Acknowledgements the publisher waits for at once.
const PUBLISH_WINDOW: usize = 256;

/// Connects to the cluster (all URLs), reconnecting for ever.
pub async fn connect(urls: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    let servers: Vec<async_nats::ServerAddr> =
        urls.split(',').map(str::parse).collect::<Result<_, _>>().with_context(|| format!("bad URLs {urls}"))?;
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(servers)
        .await
        .with_context(|| format!("cannot connect to {urls}"))
}

/// Creates (or replaces) a file stream with `replicas` copies and a duplicate window of
/// `window`, retrying while the cluster has no meta leader yet.
pub async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
    replicas: usize,
    window: Duration,
) -> anyhow::Result<stream::Stream> {
    let config = stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window: window,
        ..Default::default()
    };
    let start = Instant::now();
    loop {
        match js.create_stream(config.clone()).await {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot create stream {name}")),
        }
    }
}

/// What the publisher did.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// Messages the stream acknowledged (each once, whatever the retries).
    pub acked: u64,
    /// Publications retried after an error or a lost acknowledgement.
    pub retries: u64,
}

/// Publishes messages `0..n` to `subject`, each `Nats-Msg-Id: <tag>-<seq>`, at most `rate`
/// a second (as fast as acknowledged when `None`), retrying each until a stream acknowledges
/// it (a retry of a message stored before its acknowledgement was lost is dropped by the
/// stream's duplicate window, and acknowledged as a duplicate). `acked` counts as it goes.
pub async fn publish_all(
    js: &jetstream::Context,
    subject: &str,
    tag: &str,
    n: u64,
    rate: Option<f64>,
    payload: impl Fn(u64) -> Bytes,
    acked: Arc<AtomicU64>,
) -> Published {
    let start = Instant::now();
    let mut next = 0u64;
    let mut retry: VecDeque<u64> = VecDeque::new();
    let mut pending = FuturesUnordered::new();
    let mut retries = 0;
    loop {
        let allowed = rate.map_or(n, |r| ((start.elapsed().as_secs_f64() * r) as u64).min(n));
        while pending.len() < PUBLISH_WINDOW {
            let seq = match retry.pop_front() {
                Some(seq) => seq,
                None if next < allowed => {
                    next += 1;
                    next - 1
                }
                None => break,
            };
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{tag}-{seq}").as_str());
            match js.publish_with_headers(subject.to_owned(), headers, payload(seq)).await {
                Ok(ack) => pending.push(async move { (seq, ack.await.is_ok()) }),
                Err(_) => {
                    retries += 1;
                    retry.push_back(seq);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
            }
        }
        if next == n && retry.is_empty() && pending.is_empty() {
            break;
        }
        if pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        if let Ok(Some((seq, ok))) = tokio::time::timeout(Duration::from_millis(5), pending.next()).await {
            if ok {
                acked.fetch_add(1, Ordering::Relaxed);
            } else {
                retries += 1;
                retry.push_back(seq);
            }
        }
    }
    Published { acked: acked.load(Ordering::Relaxed), retries }
}

/// Messages in a stream now (`None` while the cluster cannot say).
pub async fn stream_messages(js: &jetstream::Context, name: &str) -> Option<u64> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), js.get_stream(name)).await.ok()?.ok()?;
    let info = tokio::time::timeout(Duration::from_secs(2), s.info()).await.ok()?.ok()?;
    Some(info.state.messages)
}

/// A durable consumer's state now (`None` while the cluster cannot say).
pub async fn consumer_info(js: &jetstream::Context, stream: &str, name: &str) -> Option<consumer::Info> {
    let s = tokio::time::timeout(Duration::from_secs(2), js.get_stream(stream)).await.ok()?.ok()?;
    tokio::time::timeout(Duration::from_secs(2), s.consumer_info(name)).await.ok()?.ok()
}

/// What an independent reader found in a stream.
#[derive(Debug, Default)]
pub struct Tally {
    /// Messages read.
    pub total: u64,
    /// How many messages each key had (the key from `key_of`).
    pub per_key: HashMap<String, u64>,
    /// Messages by the value of one header (for dead letters: `Sluice-Failure-Kind`).
    pub by_header: BTreeMap<String, u64>,
}

/// Reads every message of `stream` from the first, with an ephemeral consumer of its own
/// (no acks, nothing shared with Sluice), and tallies them by `key_of(payload)` and by the
/// header `header`.
pub async fn read_all(
    js: &jetstream::Context,
    stream_name: &str,
    header: &str,
    key_of: impl Fn(&[u8]) -> Option<String>,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let expected =
        stream_messages(js, stream_name).await.ok_or_else(|| anyhow::anyhow!("no info for stream {stream_name}"))?;
    if expected == 0 {
        return Ok(tally);
    }
    let s = js.get_stream(stream_name).await?;
    let reader = s
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            deliver_policy: consumer::DeliverPolicy::All,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot create a reader on {stream_name}"))?;
    let mut messages = reader.messages().await?;
    while tally.total < expected {
        let msg = match tokio::time::timeout(Duration::from_secs(20), messages.next()).await {
            Ok(Some(Ok(msg))) => msg,
            Ok(Some(Err(e))) => return Err(e).context("reading {stream_name}"),
            Ok(None) | Err(_) => {
                bail!("the reader of {stream_name} got {} of its {expected} messages", tally.total)
            }
        };
        tally.total += 1;
        let key = key_of(&msg.payload).unwrap_or_else(|| "<unreadable>".to_owned());
        *tally.per_key.entry(key).or_default() += 1;
        if let Some(v) = msg.headers.as_ref().and_then(|h| h.get(header)) {
            *tally.by_header.entry(v.as_str().to_owned()).or_default() += 1;
        }
    }
    Ok(tally)
}
