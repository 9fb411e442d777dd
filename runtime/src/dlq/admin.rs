//! Operating on a dead-letter stream: listing what is parked, and replaying it.
//!
//! Replay republishes each selected entry (payload and original headers, plus
//! `Sluice-Replayed-From`) to its original subject or a given one, through JetStream with an
//! acknowledgement when a stream captures that subject, then deletes the entry. It stops at
//! the first failure, leaving that entry and the rest in place.

use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig};
use bytes::Bytes;
use futures::StreamExt;

use super::header;
use crate::outputs::OutputSender;
use crate::outputs::{Output, Outputs};

/// One parked message.
#[derive(Debug, Clone)]
pub struct Entry {
    pub sequence: u64,
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// When the dead letter was stored.
    pub stored_at: SystemTime,
}

impl Entry {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }
    pub fn handler(&self) -> &str {
        self.header(header::HANDLER).unwrap_or("?")
    }
    pub fn kind(&self) -> &str {
        self.header(header::KIND).unwrap_or("?")
    }
    pub fn reason(&self) -> &str {
        self.header(header::REASON).unwrap_or("")
    }
    pub fn attempts(&self) -> &str {
        self.header(header::ATTEMPTS).unwrap_or("?")
    }
    pub fn original_subject(&self) -> Option<&str> {
        self.header(header::ORIGINAL_SUBJECT)
    }
    /// Time since the last failure (or since it was stored).
    pub fn age(&self) -> Duration {
        let at = self
            .header(header::LAST_FAILURE_AT)
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .unwrap_or(self.stored_at);
        SystemTime::now().duration_since(at).unwrap_or_default()
    }
}

/// Which entries to act on.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub handler: Option<String>,
    pub kind: Option<String>,
    /// Only the dead letters of this ordering key (`Sluice-Ordering-Key`).
    pub key: Option<String>,
    pub limit: Option<usize>,
}

impl Filter {
    fn matches(&self, e: &Entry) -> bool {
        self.handler.as_deref().is_none_or(|h| h == e.handler())
            && self.kind.as_deref().is_none_or(|k| k == e.kind())
            && self.key.as_deref().is_none_or(|k| Some(k) == e.header(header::ORDERING_KEY))
    }
}

/// The entries of `stream` that match `filter`, oldest first.
pub async fn list(js: &jetstream::Context, stream: &str, filter: &Filter) -> anyhow::Result<Vec<Entry>> {
    let mut s = js.get_stream(stream).await.map_err(|e| anyhow::anyhow!("dead-letter stream {stream}: {e}"))?;
    if s.info().await.map_err(|e| anyhow::anyhow!("dead-letter stream {stream}: {e}"))?.state.messages == 0 {
        return Ok(Vec::new());
    }
    // An ordered consumer reads the whole stream once, in order, leaving no state behind.
    let consumer = s
        .create_consumer(OrderedConfig::default())
        .await
        .map_err(|e| anyhow::anyhow!("cannot read dead-letter stream {stream}: {e}"))?;
    let mut messages = consumer.messages().await.map_err(|e| anyhow::anyhow!("cannot read {stream}: {e}"))?;
    let mut entries = Vec::new();
    while let Some(next) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await.ok().flatten() {
        let msg = next.map_err(|e| anyhow::anyhow!("reading {stream}: {e}"))?;
        let info = msg.info().map_err(|e| anyhow::anyhow!("reading {stream}: {e}"))?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        let stored_at = SystemTime::from(info.published);
        let entry = Entry {
            sequence,
            headers: msg.headers.clone().unwrap_or_default(),
            payload: msg.payload.clone(),
            stored_at,
        };
        if filter.matches(&entry) {
            entries.push(entry);
            if filter.limit.is_some_and(|l| entries.len() >= l) {
                break;
            }
        }
        if pending == 0 {
            break;
        }
    }
    Ok(entries)
}

/// Where replayed messages go.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    pub filter: Filter,
    /// Instead of each entry's original subject.
    pub to: Option<String>,
    pub dry_run: bool,
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Entries republished and removed (or, in a dry run, that would be).
    pub replayed: Vec<u64>,
    /// The entry that could not be replayed, and why; the replay stopped there.
    pub failed: Option<(u64, String)>,
}

/// Replays the matching entries of `stream`; `progress` is called after each one.
pub async fn replay(
    sender: &OutputSender,
    stream: &str,
    options: &ReplayOptions,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<ReplayReport> {
    let js = sender.jetstream();
    let entries = list(js, stream, &options.filter).await?;
    let s = js.get_stream(stream).await.map_err(|e| anyhow::anyhow!("dead-letter stream {stream}: {e}"))?;
    let mut report = ReplayReport::default();
    let total = entries.len();
    for (done, entry) in entries.into_iter().enumerate() {
        let Some(subject) = options.to.clone().or_else(|| entry.original_subject().map(str::to_owned)) else {
            report.failed = Some((entry.sequence, "no Sluice-Original-Subject header; use --to".to_owned()));
            break;
        };
        if let Err(e) = crate::subject::validate_literal(&subject) {
            report.failed = Some((entry.sequence, e));
            break;
        }
        if !options.dry_run {
            let output = Output {
                subject,
                headers: replay_headers(&entry.headers, stream, entry.sequence),
                payload: entry.payload,
            };
            if let Err(e) = sender.send(Outputs { published: vec![output], ..Outputs::default() }).await {
                report.failed = Some((entry.sequence, e.to_string()));
                break;
            }
            if let Err(e) = s.delete_message(entry.sequence).await {
                // Republished but still parked: say so, and stop before anything is replayed twice.
                report.failed = Some((entry.sequence, format!("replayed, but could not be removed: {e}")));
                break;
            }
        }
        report.replayed.push(entry.sequence);
        progress(done + 1, total);
    }
    Ok(report)
}

/// The original headers, without Sluice's failure headers, marked as replayed.
fn replay_headers(parked: &HeaderMap, stream: &str, sequence: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in parked.iter() {
        let n: &str = name.as_ref();
        if n.starts_with("Sluice-") || n.starts_with("Nats-") {
            continue;
        }
        for v in values {
            headers.append(name.clone(), v.clone());
        }
    }
    headers.insert(header::REPLAYED_FROM, format!("{stream}/{sequence}"));
    headers
}
