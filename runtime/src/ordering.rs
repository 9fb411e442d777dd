//! Per-key order in a process (`[ordering]`): messages with the same ordering key are handled
//! one at a time, in the order the transport received them (stream order on JetStream,
//! arrival order on core NATS); different keys run in parallel up to `max_concurrency`.
//!
//! A transport hands each received message to its handler's [`Sequencer`] with its key: the
//! first message of a key goes at once, with the key's [`Turn`]; a later one waits in the key's
//! queue, outside the pipeline (it holds no concurrency permit, so a busy key does not starve
//! the others). The turn is held until the message is settled — through its retries, which an
//! ordered handler runs in the process — and when it is dropped, the key's next message comes
//! out of [`Sequencer::ready`], to be batched like a newly received one.
//!
//! Imports: the key syntax of [`idempotency`](crate::idempotency) only (a leaf otherwise).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use metrics::Gauge;
use tokio::sync::mpsc;

use crate::idempotency::{KeySpec, OnMissing};

/// A handler's `[ordering]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ordering {
    /// How a message's ordering key is derived (the `[idempotency] key` syntax).
    pub key: KeySpec,
    /// A message without a key: processed unordered, or dead-lettered as
    /// `missing-ordering-key`.
    pub on_missing: OnMissing,
    /// Messages waiting behind their key, at most; at the bound the transport takes no new
    /// messages until keys move on.
    pub max_waiting: usize,
    /// JetStream: one consumer per partition, each pinned to one process at a time.
    pub partitions: Option<Partitions>,
    /// What a dead-lettered message means for the later messages of its key.
    pub on_poison: OnPoison,
}

/// `[ordering] on_poison`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnPoison {
    /// The key's next message goes on.
    #[default]
    Skip,
    /// The key is parked: its later messages are dead-lettered as `key-parked`, in order,
    /// until an operator releases it (`sluice ordering release`).
    Park,
}

/// `[ordering] partitions` and `partition_subject`: the stream's messages split by a subject
/// token that the server fills in on ingest (a `partition(n, ...)` subject mapping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    /// How many (1 to 1024); partition tokens run from 0 to `count - 1`.
    pub count: u32,
    /// The subject pattern with `{partition}` as one whole token.
    pub subject: String,
}

impl Partitions {
    /// The token that stands for the partition number in `subject`.
    pub const TOKEN: &'static str = "{partition}";

    /// Partition `i`'s filter subject.
    pub fn filter(&self, i: u32) -> String {
        self.subject
            .split('.')
            .map(|t| if t == Self::TOKEN { i.to_string() } else { t.to_owned() })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Partition `i`'s durable consumer name, from the handler's consumer name.
    pub fn consumer(consumer: &str, i: u32) -> String {
        format!("{consumer}-{i}")
    }
}

/// What a transport receives: a NATS message (core), or one wrapped with its stream metadata
/// (JetStream).
pub trait Delivered {
    /// The message as NATS delivered it.
    fn message(&self) -> &async_nats::Message;
}

impl Delivered for async_nats::Message {
    fn message(&self) -> &async_nats::Message {
        self
    }
}

impl Delivered for async_nats::jetstream::Message {
    fn message(&self) -> &async_nats::Message {
        &self.message
    }
}

/// A received message through a handler's sequencer: with its key's turn when it may go now,
/// `None` when it waits behind its key. Without ordering, or without a key (it then runs
/// unordered, or the gate dead-letters it), it goes at once without a turn.
pub fn in_order<M: Delivered>(
    sequencer: &Option<Sequencer<M>>,
    ordering: Option<&Ordering>,
    msg: M,
) -> Option<(M, Option<Turn<M>>)> {
    let (Some(sequencer), Some(ordering)) = (sequencer, ordering) else { return Some((msg, None)) };
    let m = msg.message();
    match ordering.key.derive(m.subject.as_str(), m.headers.as_ref(), &m.payload) {
        Ok(key) => sequencer.offer(key, msg).map(|(msg, turn)| (msg, Some(turn))),
        Err(why) => {
            tracing::debug!("no ordering key ({why}): the message runs unordered");
            Some((msg, None))
        }
    }
}

/// The next message of an ordered handler whose turn came; never, without ordering.
pub async fn next_ready<M>(sequencer: &mut Option<Sequencer<M>>) -> (M, Turn<M>) {
    match sequencer {
        Some(s) => s.ready().await,
        None => std::future::pending().await,
    }
}

/// `[ordering] max_waiting` when the manifest does not say.
pub const DEFAULT_MAX_WAITING: usize = 10_000;

/// The per-key queues of one handler's messages (`M`: the transport's message type).
#[derive(Debug)]
pub struct Sequencer<M> {
    shared: Arc<Shared<M>>,
    ready: mpsc::UnboundedReceiver<(M, Turn<M>)>,
}

#[derive(Debug)]
struct Shared<M> {
    keys: Mutex<Keys<M>>,
    ready: mpsc::UnboundedSender<(M, Turn<M>)>,
    gauges: Gauges,
}

#[derive(Debug)]
struct Keys<M> {
    /// A key is here while one of its messages holds the turn; its queue holds the rest.
    queues: HashMap<Arc<str>, VecDeque<M>>,
    waiting: usize,
}

/// `sluice_ordering_keys` and `sluice_ordering_waiting` of the handler.
#[derive(Debug, Clone)]
pub struct Gauges {
    pub keys: Gauge,
    pub waiting: Gauge,
}

impl<M> Shared<M> {
    fn lock(&self) -> MutexGuard<'_, Keys<M>> {
        // A panic while holding the lock cannot leave the queues inconsistent (every update
        // is a single push or pop), so a poisoned lock is used as is.
        self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, keys: &Keys<M>) {
        self.gauges.keys.set(keys.queues.len() as f64);
        self.gauges.waiting.set(keys.waiting as f64);
    }
}

impl<M> Sequencer<M> {
    pub fn new(gauges: Gauges) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let keys = Keys { queues: HashMap::new(), waiting: 0 };
        Sequencer { shared: Arc::new(Shared { keys: Mutex::new(keys), ready: tx, gauges }), ready: rx }
    }

    /// A message of `key` received: returned with the key's turn when no other message of
    /// the key is in flight or waiting; otherwise queued behind them (`None`).
    pub fn offer(&self, key: String, msg: M) -> Option<(M, Turn<M>)> {
        let mut keys = self.shared.lock();
        let turn = if let Some(queue) = keys.queues.get_mut(key.as_str()) {
            queue.push_back(msg);
            keys.waiting += 1;
            None
        } else {
            let key: Arc<str> = key.into();
            keys.queues.insert(key.clone(), VecDeque::new());
            Some((msg, Turn { key: Some(key), shared: self.shared.clone() }))
        };
        self.shared.publish(&keys);
        turn
    }

    /// The next message whose turn came (its key's previous message was settled). Never
    /// ends: wait for it alongside the transport's own messages.
    pub async fn ready(&mut self) -> (M, Turn<M>) {
        match self.ready.recv().await {
            Some(next) => next,
            // The sender lives in `shared`, which this sequencer holds.
            None => std::future::pending().await,
        }
    }

    /// A message whose turn came, if one is there now.
    pub fn try_ready(&mut self) -> Option<(M, Turn<M>)> {
        self.ready.try_recv().ok()
    }

    /// Messages waiting behind their key.
    pub fn waiting(&self) -> usize {
        self.shared.lock().waiting
    }

    /// No key holds a turn and nothing waits: every message offered has been settled.
    pub fn idle(&self) -> bool {
        self.shared.lock().queues.is_empty()
    }

    /// Takes every message not yet handled, each key's in its order: what is ready, then
    /// what waits. Call it when nothing holds a turn any more (the transport's calls have
    /// all ended), to give the messages back to the broker in order.
    pub fn drain(&mut self) -> Vec<M> {
        let mut out = Vec::new();
        loop {
            let Some((msg, turn)) = self.try_ready() else { break };
            out.push(msg);
            // Hands the key's next message to the ready channel, read on the next round.
            drop(turn);
        }
        // Keys still held by a turn elsewhere keep their queues: those turns' holders are
        // still running, and hand them on when they end.
        out
    }

    /// A handle on the waiting messages, for a task that keeps them alive (JetStream's
    /// in-progress acks).
    pub fn watcher(&self) -> Watcher<M> {
        Watcher { shared: self.shared.clone() }
    }
}

/// See [`Sequencer::watcher`].
#[derive(Debug)]
pub struct Watcher<M> {
    shared: Arc<Shared<M>>,
}

impl<M: Clone> Watcher<M> {
    /// Copies of the messages waiting now.
    pub fn waiting(&self) -> Vec<M> {
        self.shared.lock().queues.values().flatten().cloned().collect()
    }
}

/// A key's turn: held by the one message of the key being handled, until it is settled.
/// Dropping it hands the turn to the key's next message (through [`Sequencer::ready`]).
#[derive(Debug)]
pub struct Turn<M> {
    /// `None` once handed on (or disarmed, when the sequencer is gone).
    key: Option<Arc<str>>,
    shared: Arc<Shared<M>>,
}

impl<M> Drop for Turn<M> {
    fn drop(&mut self) {
        let mut key = self.key.take();
        while let Some(k) = key.take() {
            let next = {
                let mut keys = self.shared.lock();
                let next = match keys.queues.get_mut(&k) {
                    Some(queue) => queue.pop_front(),
                    None => None,
                };
                match next {
                    Some(_) => keys.waiting -= 1,
                    None => {
                        keys.queues.remove(&k);
                    }
                }
                self.shared.publish(&keys);
                next
            };
            let Some(msg) = next else { break };
            let turn = Turn { key: Some(k), shared: self.shared.clone() };
            // Sent outside the lock. When the sequencer is gone (its transport stopped), the
            // message is dropped (JetStream redelivers it) and the turn passes to the next,
            // here rather than by recursion.
            if let Err(mpsc::error::SendError((_, mut turn))) = self.shared.ready.send((msg, turn)) {
                key = turn.key.take();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> Gauges {
        Gauges { keys: Gauge::noop(), waiting: Gauge::noop() }
    }

    #[tokio::test]
    async fn one_message_of_a_key_at_a_time_in_order() {
        let mut seq = Sequencer::new(gauges());
        let (first, turn_a) = seq.offer("a".into(), 1).expect("a is free");
        assert_eq!(first, 1);
        assert!(seq.offer("a".into(), 2).is_none());
        assert!(seq.offer("a".into(), 3).is_none());
        let (other, turn_b) = seq.offer("b".into(), 10).expect("b is free");
        assert_eq!(other, 10);
        assert_eq!(seq.waiting(), 2);
        assert!(seq.try_ready().is_none(), "nothing moves while a's first is in flight");
        drop(turn_b);
        assert!(seq.try_ready().is_none(), "b had nothing waiting");
        drop(turn_a);
        let (second, turn) = seq.try_ready().expect("a's second");
        assert_eq!(second, 2);
        assert!(seq.try_ready().is_none(), "a's third waits for the second");
        assert!(!seq.idle());
        drop(turn);
        let (third, turn) = seq.ready().await;
        assert_eq!(third, 3);
        assert_eq!(seq.waiting(), 0);
        drop(turn);
        assert!(seq.idle());
        // A key that went idle starts again at once.
        assert!(seq.offer("a".into(), 4).is_some());
    }

    #[test]
    fn a_turn_outliving_its_sequencer_drops_the_rest() {
        let seq = Sequencer::new(gauges());
        let (_, turn) = seq.offer("k".into(), 1).expect("free");
        for n in 2..10_000 {
            assert!(seq.offer("k".into(), n).is_none());
        }
        let watcher = seq.watcher();
        assert_eq!(watcher.waiting().len(), 9_998);
        drop(seq);
        // Would recurse (and overflow the stack) if the turn were handed on by dropping.
        drop(turn);
        assert!(watcher.waiting().is_empty());
    }
}
