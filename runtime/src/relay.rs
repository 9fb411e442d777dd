//! The relay: sends what committed calls left in their handler's outbox, in commit order,
//! and removes each entry once it is sent.
//!
//! With a state store that has an outbox ([`Store::outbox`]), a successful call's
//! publications are not sent before its commit: they are written in the commit itself, as
//! outbox entries (keyed by a sequence number: redb's `outbox/<handler>` table, or the handler's
//! KV bucket), together with the
//! guest's kv writes and the key's completion record. The source message is acked after that
//! commit, and this relay publishes the entries afterwards (awaiting the stream's ack where a
//! stream captures the subject), then removes them from the store lazily (with the store's
//! next group commit). A reply whose call published something goes after those entries.
//!
//! - **Crash safety.** An entry stays in the store until it is sent. At start-up the relay
//!   reads what a crash left there and sends it before anything new (the source waits for that
//!   first round). An entry sent but not yet removed is sent again after a crash; its
//!   `Nats-Msg-Id` (`<handler>/<key>/<n>`, or `<handler>/outbox/<nonce>/<seq>` for a message
//!   without a key) lets a stream's duplicate window drop the second copy.
//! - **Order.** Entries are sent in the order their commits finished, one handler's at a time
//!   and pipelined (many in flight, acks collected in order). After a failure the relay resends
//!   from the first entry not acknowledged, so a later entry that was already stored is sent
//!   again (and dropped by its id).
//! - **Outages.** A failed round (no connection, no stream, a refused or unacknowledged
//!   publish) keeps its entries and is retried with back-off (100 ms doubling to 10 s); the
//!   source keeps being consumed until the outbox holds `[store] max_outbox` entries, then the
//!   handler pauses (no new work) until it drains.
//! - **The `memory` store** keeps its outbox in the relay's queue only: like the rest of that
//!   store, it does not survive a restart.
//! - **The `nats-kv` store** keeps it in the handler's bucket, shared by every process serving
//!   the handler, each naming its entries by a random instance id. At start-up the relay sends
//!   every entry it finds (a peer's entries in flight too: the copies are dropped by their
//!   ids); while idle it looks every [`ADOPT_EVERY`] for entries another store has left for
//!   10 s and sends them, so that a process that dies and never returns loses nothing.
//!   Removals are awaited, so that a sent entry is not taken for an orphan.
//! - **Trust.** What a scan finds is data at rest; an entry is sent only if the handler could
//!   have published it (its `capabilities.publish`, no reserved header).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::{Notify, watch};

use crate::metrics::HandlerMetrics;
use crate::outputs::{Output, OutputSender, SendError, header_map};
use crate::store::{Expect, Op, Space, Store, StoreError};
use crate::subject::SubjectPattern;

/// Entries sent in one round at most.
const ROUND: usize = 1024;
/// Back-off after a failed round: from this, doubling, up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often an idle relay on a shared store looks for entries other processes left.
const ADOPT_EVERY: Duration = Duration::from_secs(5);
/// A failing relay logs at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One call's committed outputs, each with its key in the store.
#[derive(Debug)]
struct Job {
    entries: Vec<(String, Output)>,
    reply: Option<Output>,
    /// When it was committed (Unix ms; for what a crash left, when this relay started).
    committed_ms: u64,
}

#[derive(Debug)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Entries stamped and not yet sent: in `jobs`, in the round being sent, or in a commit
    /// still under way.
    entries: usize,
    next_seq: u64,
    /// When the oldest job of the round being sent was committed.
    sending_since: Option<u64>,
}

impl Queue {
    /// The commit time of the oldest entry waiting (queued or being sent).
    fn oldest_ms(&self) -> Option<u64> {
        self.sending_since.or_else(|| self.jobs.front().map(|j| j.committed_ms))
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A handler's relay. Cheap to share; the sending task runs until [`Relay::stop`].
#[derive(Debug)]
pub struct Relay {
    handler: Arc<str>,
    store: Store,
    /// Entries are in the store (not only in `queue`).
    durable: bool,
    sender: Arc<OutputSender>,
    metrics: Arc<HandlerMetrics>,
    max: usize,
    queue: Mutex<Queue>,
    wake: Notify,
    /// The number of entries waiting, for those who wait for room or for a drain.
    depth: watch::Sender<usize>,
    /// Part of the ids given to publications without one: unique to this relay (a restart or
    /// another process numbers its entries from the same sequence numbers).
    nonce: String,
    /// Test hook: publish, but never remove nor go on (a crash between the two).
    halt_after_publish: bool,
    /// The store is shared by other processes (`nats-kv`): an idle relay looks for entries
    /// one of them left (a process that died, or was scaled away) and sends them.
    adopts: bool,
    /// The handler's `capabilities.publish`: what a scan finds is checked again before it is
    /// sent (see [`read`]).
    grants: Arc<[SubjectPattern]>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Relay {
    /// Starts the relay of `handler`'s outbox in `store`, with what a crash left there first.
    /// `None` when the store has no outbox.
    pub async fn start(
        handler: Arc<str>,
        store: Store,
        sender: Arc<OutputSender>,
        metrics: Arc<HandlerMetrics>,
        max: usize,
        grants: Arc<[SubjectPattern]>,
        halt_after_publish: bool,
    ) -> Result<Option<Arc<Relay>>, StoreError> {
        let Some(durable) = store.outbox() else { return Ok(None) };
        let started = unix_ms();
        let mut jobs = VecDeque::new();
        let mut last = 0;
        if durable {
            let found = store.scan(&handler, Space::Outbox, false).await?;
            // A local store's own keys are sequence numbers, which go on from the last.
            last = found.iter().filter_map(|(key, _)| key.parse::<u64>().ok()).max().unwrap_or(0);
            jobs = read(&handler, &store, &grants, found, started);
        }
        let left = jobs.len();
        let adopts = durable && store.shared();
        if left > 0 {
            tracing::info!(handler = &*handler, entries = left, "outbox: sending what the last run left");
        }
        metrics.outbox_depth(left, (left > 0).then_some(started));
        let relay = Arc::new(Relay {
            handler,
            store,
            durable,
            sender,
            metrics,
            max: max.max(1),
            queue: Mutex::new(Queue { jobs, entries: left, next_seq: last + 1, sending_since: None }),
            wake: Notify::new(),
            depth: watch::Sender::new(left),
            nonce: format!("{:016x}", fastrand::u64(..)),
            halt_after_publish,
            adopts,
            grants,
            task: Mutex::new(None),
        });
        let task = tokio::spawn(relay.clone().run());
        if let Ok(mut slot) = relay.task.lock() {
            *slot = Some(task);
        }
        Ok(Some(relay))
    }

    /// The store the outbox is in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stops the sending task at once (what is left stays in the store).
    pub fn stop(&self) {
        if let Some(task) = self.task.lock().ok().and_then(|mut t| t.take()) {
            task.abort();
        }
    }

    /// Entries waiting now.
    pub fn depth(&self) -> usize {
        *self.depth.borrow()
    }

    /// Whether the outbox can take more (below `max_outbox`).
    pub fn has_room(&self) -> bool {
        self.depth() < self.max
    }

    /// Waits until the outbox is below its bound; logs and counts the pause if it must wait.
    pub async fn room(&self) {
        if self.has_room() {
            return;
        }
        self.metrics.outbox_full();
        tracing::warn!(
            handler = &*self.handler,
            entries = self.depth(),
            "outbox full (store.max_outbox = {}): taking no new messages until the relay sends some",
            self.max
        );
        let mut depth = self.depth.subscribe();
        let _ = depth.wait_for(|&n| n < self.max).await;
        tracing::info!(handler = &*self.handler, "outbox has room again: taking messages");
    }

    /// Waits until the outbox is empty, at most `limit`; returns the entries still waiting.
    pub async fn drained(&self, limit: Duration) -> usize {
        let mut depth = self.depth.subscribe();
        let _ = tokio::time::timeout(limit, depth.wait_for(|&n| n == 0)).await;
        self.depth()
    }

    /// Numbers a call's publications for the outbox and returns their sequence numbers
    /// and the store writes to commit with the call (none when the outbox is the relay's
    /// memory only). A publication without a `Nats-Msg-Id` (a message without an idempotency
    /// key) gets `<handler>/outbox/<relay nonce>/<seq>`, so that a re-send by the relay is dropped too.
    pub fn stamp(&self, published: &mut [Output]) -> (Vec<String>, Vec<Op>) {
        if published.is_empty() {
            return (Vec::new(), Vec::new());
        }
        // The entries count from now on (until sent, or released when the commit fails), so
        // that the bound covers calls still committing, not only what the relay holds.
        let first = match self.queue.lock() {
            Ok(mut q) => {
                let first = q.next_seq;
                q.next_seq += published.len() as u64;
                q.entries += published.len();
                self.report(&q);
                first
            }
            Err(_) => 0,
        };
        let seqs: Vec<u64> = (first..first + published.len() as u64).collect();
        for (out, seq) in published.iter_mut().zip(&seqs) {
            if out.headers.get("Nats-Msg-Id").is_none() {
                out.headers.insert("Nats-Msg-Id", format!("{}/outbox/{}/{seq}", self.handler, self.nonce));
            }
        }
        let keys: Vec<String> = seqs.into_iter().map(key).collect();
        let ops = match self.durable {
            true => published
                .iter()
                .zip(&keys)
                .map(|(out, key)| Op {
                    space: Space::Outbox,
                    key: key.clone(),
                    expect: Expect::Any,
                    value: Some(encode(out)),
                    ttl: None,
                })
                .collect(),
            false => Vec::new(),
        };
        (keys, ops)
    }

    /// Hands a committed call's publications (numbered by [`stamp`](Self::stamp)) and its
    /// reply to the relay.
    pub fn push(&self, keys: Vec<String>, published: Vec<Output>, reply: Option<Output>) {
        let entries: Vec<(String, Output)> = keys.into_iter().zip(published).collect();
        let Ok(mut q) = self.queue.lock() else { return };
        q.jobs.push_back(Job { entries, reply, committed_ms: unix_ms() });
        self.report(&q);
        drop(q);
        self.wake.notify_one();
    }

    /// Gives back the places of `n` stamped entries whose commit failed.
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let Ok(mut q) = self.queue.lock() else { return };
        q.entries = q.entries.saturating_sub(n);
        self.report(&q);
    }

    /// Publishes the depth (to those waiting for room or a drain) and the metrics.
    fn report(&self, q: &Queue) {
        self.depth.send_replace(q.entries);
        self.metrics.outbox_depth(q.entries, q.oldest_ms().filter(|_| q.entries > 0));
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = BACKOFF_MIN;
        let mut warned: Option<Instant> = None;
        loop {
            let round: Vec<Job> = {
                let Ok(mut q) = self.queue.lock() else { return };
                let mut round = Vec::new();
                let mut n = 0;
                while n < ROUND
                    && let Some(job) = q.jobs.pop_front()
                {
                    n += job.entries.len().max(1);
                    round.push(job);
                }
                q.sending_since = round.first().map(|j| j.committed_ms);
                round
            };
            if round.is_empty() {
                match self.adopts {
                    true => {
                        tokio::select! {
                            () = self.wake.notified() => {}
                            () = tokio::time::sleep(ADOPT_EVERY) => self.adopt().await,
                        }
                    }
                    false => self.wake.notified().await,
                }
                continue;
            }
            let (sent, failure) = self.send(&round).await;
            if self.halt_after_publish {
                // As a crash right after publishing would: nothing removed, nothing more sent.
                return;
            }
            let mut round = round;
            let mut dropped = Vec::new();
            // An entry no re-send can ever get through (larger than the server or its stream
            // takes, a subject it refuses) is dropped, counted and logged with its subject, so
            // that it does not hold back the handler's other outputs for ever; the commit stage
            // refuses outputs over the server's `max_payload` before they reach the outbox, so
            // this is the case of a server or stream changed since.
            let failure = match failure {
                Some((k, e)) if e.is_permanent() => {
                    if let Some(job) = round.get_mut(sent)
                        && k < job.entries.len()
                    {
                        let (key, out) = job.entries.remove(k);
                        tracing::error!(
                            handler = &*self.handler,
                            subject = %out.subject,
                            "outbox: dropping an output no server will take: {e}"
                        );
                        self.metrics.outbox_dropped();
                        dropped.push(key);
                    }
                    None
                }
                other => other.map(|(_, e)| e),
            };
            let mut round = round.into_iter();
            let mut count = dropped.len();
            let mut removed = dropped;
            for job in round.by_ref().take(sent) {
                count += job.entries.len();
                removed.extend(job.entries.into_iter().map(|(key, _)| key));
                if let Some(reply) = job.reply
                    && let Err(e) = self.sender.reply(reply).await
                {
                    tracing::warn!(handler = &*self.handler, "cannot send the reply: {e}");
                }
            }
            if self.durable {
                self.store.remove(&self.handler, Space::Outbox, removed).await;
            }
            let depth = match self.queue.lock() {
                Ok(mut q) => {
                    // What was not sent goes back to the front, in order.
                    for job in round.rev() {
                        q.jobs.push_front(job);
                    }
                    q.entries = q.entries.saturating_sub(count);
                    q.sending_since = None;
                    self.report(&q);
                    q.entries
                }
                Err(_) => return,
            };
            self.metrics.outbox_sent(count as u64);
            match failure {
                None => backoff = BACKOFF_MIN,
                Some(e) => {
                    self.metrics.outbox_failed(failure_reason(&e));
                    if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                        warned = Some(Instant::now());
                        tracing::warn!(
                            handler = &*self.handler,
                            waiting = depth,
                            "outbox: {e}; retrying in {backoff:?} (logged at most every {WARN_EVERY:?})"
                        );
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Takes over what was left unsent in a shared outbox (see [`Store::scan`]): by another
    /// process, or by this one (a commit whose acknowledgement was lost, an entry whose
    /// removal failed), when this relay has nothing else to send.
    async fn adopt(&self) {
        let found = match self.store.scan(&self.handler, Space::Outbox, true).await {
            Ok(found) if !found.is_empty() => found,
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(handler = &*self.handler, "outbox: cannot look for entries left by others: {e}");
                return;
            }
        };
        let jobs = read(&self.handler, &self.store, &self.grants, found, unix_ms());
        if jobs.is_empty() {
            return;
        }
        tracing::info!(
            handler = &*self.handler,
            entries = jobs.len(),
            "outbox: sending entries left unsent (by another process, an earlier run, or a commit whose acknowledgement was lost)"
        );
        let Ok(mut q) = self.queue.lock() else { return };
        q.entries += jobs.len();
        q.jobs.extend(jobs);
        self.report(&q);
        drop(q);
        self.wake.notify_one();
    }

    /// Sends every entry of `round`, pipelined; returns how many jobs (from the front) were
    /// wholly sent, and why the next one was not.
    async fn send(&self, round: &[Job]) -> (usize, Option<(usize, SendError)>) {
        let mut acks = Vec::new();
        // The job and the entry in it that failed first.
        let mut failed: Option<(usize, usize, SendError)> = None;
        'jobs: for (j, job) in round.iter().enumerate() {
            for (k, (_, out)) in job.entries.iter().enumerate() {
                match self.sender.publish(out.clone()).await {
                    Ok(Some(pending)) => acks.push((j, k, pending)),
                    Ok(None) => {}
                    Err(e) => {
                        failed = Some((j, k, e));
                        break 'jobs;
                    }
                }
            }
        }
        for (j, k, pending) in acks {
            if failed.as_ref().is_some_and(|(f, _, _)| j >= *f) {
                break;
            }
            if let Err(e) = self.sender.confirm(pending).await {
                failed = Some((j, k, e));
                break;
            }
        }
        match failed {
            Some((j, k, e)) => (j, Some((k, e))),
            None => (round.len(), None),
        }
    }
}

/// The metric label of a failed round ([`crate::metrics::OUTBOX_FAILURES`]).
fn failure_reason(e: &SendError) -> &'static str {
    use async_nats::jetstream::context::PublishErrorKind;
    match e {
        SendError::Stream { error, .. } | SendError::NotAcknowledged { error, .. } => match error.kind() {
            PublishErrorKind::TimedOut => "timeout",
            PublishErrorKind::StreamNotFound => "no-stream",
            PublishErrorKind::BrokenPipe => "connection",
            _ => "refused",
        },
        SendError::Core { .. } | SendError::Reply { .. } => "connection",
        SendError::NotOnSecondary { .. } => "no-stream",
    }
}

fn key(seq: u64) -> String {
    format!("{seq:020}")
}

/// The jobs for what a scan of the outbox found, one entry each. Unreadable entries (not
/// written by this version of Sluice?) are logged and removed, and so is an entry this
/// handler could not have written: a subject outside its `capabilities.publish`, or a header
/// a guest may not set. The outbox is data at rest, in a file or (on `nats-kv`) in a bucket
/// that others with write access to its subjects could fill; Sluice publishes with its own
/// credentials only what the handler itself may publish.
fn read(
    handler: &str,
    store: &Store,
    grants: &[SubjectPattern],
    found: Vec<(String, Vec<u8>)>,
    committed_ms: u64,
) -> VecDeque<Job> {
    let mut jobs = VecDeque::new();
    let (mut unreadable, mut refused) = (Vec::new(), Vec::new());
    for (key, value) in found {
        match decode(&value) {
            Some(out) => match admissible(grants, &out) {
                Ok(()) => jobs.push_back(Job { entries: vec![(key, out)], reply: None, committed_ms }),
                Err(why) => {
                    tracing::error!(handler, subject = %out.subject, "outbox: an entry this handler could not have written, dropped: {why}");
                    refused.push(key);
                }
            },
            None => unreadable.push(key),
        }
    }
    if !unreadable.is_empty() {
        tracing::error!(
            handler,
            "outbox: {} unreadable entries dropped (not written by this version of Sluice?)",
            unreadable.len()
        );
    }
    unreadable.extend(refused);
    store.remove_lazily(handler, Space::Outbox, unreadable);
    jobs
}

/// Whether the handler could have made `out`: the checks its `publish` call makes.
fn admissible(grants: &[SubjectPattern], out: &Output) -> Result<(), String> {
    crate::subject::validate_literal(&out.subject)?;
    if !grants.iter().any(|g| g.matches(&out.subject)) {
        return Err("the subject is not in capabilities.publish".to_owned());
    }
    if let Some((name, _)) = out.headers.iter().find(|(name, _)| crate::host::refused_header(name.as_ref()).is_some()) {
        return Err(format!("header {name} is reserved"));
    }
    Ok(())
}

/// An entry as stored: a format byte, then the subject, the headers and the payload, each
/// length-prefixed (u32, little endian), the payload last and unprefixed.
fn encode(out: &Output) -> Vec<u8> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for (name, values) in out.headers.iter() {
        for value in values {
            pairs.push((name.as_ref(), value.as_str()));
        }
    }
    let size =
        9 + out.subject.len() + pairs.iter().map(|(n, v)| 8 + n.len() + v.len()).sum::<usize>() + out.payload.len();
    let mut bytes = Vec::with_capacity(size);
    bytes.push(1);
    put(&mut bytes, out.subject.as_bytes());
    bytes.extend_from_slice(&u32::try_from(pairs.len()).unwrap_or(u32::MAX).to_le_bytes());
    for (name, value) in pairs {
        put(&mut bytes, name.as_bytes());
        put(&mut bytes, value.as_bytes());
    }
    bytes.extend_from_slice(&out.payload);
    bytes
}

/// A length-prefixed field (the parts of an entry are far below 4 GiB: outputs are bounded
/// by `max_output_bytes`).
fn put(bytes: &mut Vec<u8>, field: &[u8]) {
    bytes.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_le_bytes());
    bytes.extend_from_slice(field);
}

fn decode(bytes: &[u8]) -> Option<Output> {
    let (&format, rest) = bytes.split_first()?;
    if format != 1 {
        return None;
    }
    let mut reader = Reader(rest);
    let subject = reader.text()?;
    let count = reader.len()?;
    let mut pairs = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        pairs.push((reader.text()?, reader.text()?));
    }
    let headers: HeaderMap = header_map(pairs).ok()?;
    Some(Output { subject, headers, payload: Bytes::copy_from_slice(reader.0) })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn len(&mut self) -> Option<usize> {
        usize::try_from(u32::from_le_bytes(self.take(4)?.try_into().ok()?)).ok()
    }

    fn text(&mut self) -> Option<String> {
        let n = self.len()?;
        Some(std::str::from_utf8(self.take(n)?).ok()?.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "h/k/0");
        headers.append("X-Two", "a");
        headers.append("X-Two", "b");
        let out = Output { subject: "orders.done".into(), headers, payload: Bytes::from_static(b"\x00payload\xff") };
        let back = decode(&encode(&out)).unwrap();
        assert_eq!(back.subject, out.subject);
        assert_eq!(back.payload, out.payload);
        assert_eq!(back.headers.get("Nats-Msg-Id").map(|v| v.as_str()), Some("h/k/0"));
        assert_eq!(back.headers.get_all("X-Two").map(|v| v.as_str().to_owned()).collect::<Vec<_>>(), ["a", "b"]);
        let empty = Output { subject: "s".into(), headers: HeaderMap::new(), payload: Bytes::new() };
        assert_eq!(decode(&encode(&empty)).unwrap().subject, "s");
        // Truncated or foreign bytes are refused, never misread.
        let bytes = encode(&out);
        for cut in 0..bytes.len() - out.payload.len() {
            assert!(decode(&bytes[..cut]).is_none(), "a cut at {cut} was accepted");
        }
        assert!(decode(b"\x02abc").is_none());
    }

    #[test]
    fn keys_sort_as_numbers() {
        assert!(key(9) < key(10));
        assert!(key(99_999) < key(100_000));
    }
}
