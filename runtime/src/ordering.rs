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

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::sync::mpsc;
use tokio::time::Instant;

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
    /// A resequencer (`sequence = ...`): per key, in sequence-number order.
    pub sequence: Option<Resequence>,
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
        Ok(key) => {
            let seq = ordering.sequence.as_ref().map(|r| sequence_of(r, m));
            sequencer.offer(key, seq, msg).map(|(msg, turn)| (msg, Some(turn)))
        }
        Err(why) => {
            tracing::debug!("no ordering key ({why}): the message runs unordered");
            Some((msg, None))
        }
    }
}

/// A message's sequence number, or why it has none.
fn sequence_of(resequence: &Resequence, m: &async_nats::Message) -> Result<u64, String> {
    let text = resequence.by.derive(m.subject.as_str(), m.headers.as_ref(), &m.payload)?;
    text.trim().parse::<u64>().map_err(|_| format!("sequence number {text:?} is not an unsigned integer"))
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
/// `[ordering] max_wait` when the manifest does not say.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);
/// `[ordering] max_buffered` when the manifest does not say.
pub const DEFAULT_MAX_BUFFERED: usize = 1_000;

/// `[ordering] sequence` and its bounds: a resequencer. Per key, messages are handed to the
/// handler in the order of their sequence numbers, whatever order they arrive in; the next
/// number expected per key is kept in the handler's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resequence {
    /// Where a message's sequence number is (the key syntax; the value is an unsigned integer).
    pub by: KeySpec,
    /// The number a key's first message has (`sequence_start`, default 1).
    pub start: u64,
    /// How long a key's later messages wait for a missing number before `on_gap` applies.
    pub max_wait: Duration,
    /// Messages of one key held back behind a missing number, at most; one more and `on_gap`
    /// applies at once.
    pub max_buffered: usize,
    /// What a gap given up on leads to.
    pub on_gap: OnGap,
}

/// `[ordering] on_gap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnGap {
    /// Go on with the lowest number waiting (the gap is logged and counted); a missing
    /// message that arrives later is skipped as passed.
    #[default]
    Proceed,
    /// Dead-letter the messages waiting, in order, as `sequence-gap`; the key still expects
    /// the missing number (publish it, then replay the dead letters with `sluice dlq replay
    /// --key`).
    DeadLetter,
}

/// What the resequencer says about one message, for the pipeline's gate (which compares it
/// with the next number the store expects).
#[derive(Debug, Clone)]
pub struct Sequenced {
    /// The message's ordering key.
    pub key: Arc<str>,
    /// Its sequence number, or why it has none.
    pub seq: Result<u64, String>,
    /// The sequencer's view of it.
    pub check: Check,
    /// Set by the gate when the message's number is the one its key expects: once it is
    /// settled, the key expects the next.
    confirmed: Arc<OnceLock<u64>>,
    /// Set by the pipeline once the key's next expected number is stored past this message;
    /// read by the turn when it is handed on.
    advanced: Arc<OnceLock<u64>>,
}

/// See [`Sequenced::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The key's turn: handled when its number is the next expected (at least the sequencer's
    /// own idea of it, when it has one), held back when later, skipped when earlier.
    Turn(Option<u64>),
    /// Earlier than the number the key expects: a duplicate, or late after a gap; skipped.
    Passed,
    /// The gap before it was given up on (`on_gap = "proceed"`): handled, unless the store
    /// has moved past it.
    Proceed,
    /// Given up on behind a gap (`on_gap = "dead-letter"`); the key expects this number.
    Gap(Option<u64>),
}

impl Sequenced {
    fn new(key: Arc<str>, seq: Result<u64, String>, check: Check) -> Self {
        Sequenced { key, seq, check, confirmed: Arc::default(), advanced: Arc::default() }
    }

    /// The gate found the message's number `seq` to be the one its key expects.
    pub fn confirm(&self, seq: u64) {
        let _ = self.confirmed.set(seq);
    }

    /// The number confirmed by the gate, once it is; and whether the key was advanced past it.
    pub fn confirmed(&self) -> Option<u64> {
        self.confirmed.get().copied()
    }

    /// Whether the key's next expected number was moved past this message.
    pub fn is_advanced(&self) -> bool {
        self.advanced.get().is_some()
    }

    /// The key's next expected number is now `next` (stored): its turn hands on accordingly.
    pub fn advance(&self, next: u64) {
        let _ = self.advanced.set(next);
    }
}

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
    resequence: Option<Resequence>,
    /// Woken when a key starts waiting on a gap: [`Sequencer::ready`] then sleeps until
    /// the earliest deadline.
    gap_started: tokio::sync::Notify,
}

#[derive(Debug)]
struct Keys<M> {
    /// A key is here while one of its messages holds the turn, or while messages of it wait.
    queues: HashMap<Arc<str>, KeyState<M>>,
    /// Messages waiting, over every key.
    waiting: usize,
    /// Keys waiting on a gap, by when they give up on it (stale entries are skipped).
    deadlines: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    /// Keys waiting on a gap now.
    gap_keys: usize,
    /// A key started waiting on a gap since [`Sequencer::ready`] last looked.
    gap_started: bool,
}

#[derive(Debug)]
struct KeyState<M> {
    /// One of its messages holds the turn.
    busy: bool,
    /// Waiting, in arrival order (without a resequencer).
    fifo: VecDeque<M>,
    /// Waiting, by sequence number (with one).
    early: BTreeMap<u64, M>,
    /// The next number expected, once known (from the store through the gate, or advanced
    /// by a settled message); forgotten with the key when nothing of it is left.
    next: Option<u64>,
    /// Since when the key has been waiting on a gap.
    gap_since: Option<Instant>,
    /// A gap being dead-lettered: the messages up to this number go out as `sequence-gap`.
    flush_through: Option<u64>,
}

impl<M> KeyState<M> {
    fn new(busy: bool) -> Self {
        KeyState {
            busy,
            fifo: VecDeque::new(),
            early: BTreeMap::new(),
            next: None,
            gap_since: None,
            flush_through: None,
        }
    }

    fn is_empty(&self) -> bool {
        !self.busy && self.fifo.is_empty() && self.early.is_empty()
    }
}

/// The ordering gauges and counters of the handler.
#[derive(Debug, Clone)]
pub struct Gauges {
    /// `sluice_ordering_keys`.
    pub keys: Gauge,
    /// `sluice_ordering_waiting`.
    pub waiting: Gauge,
    /// `sluice_ordering_gap_keys`.
    pub gap_keys: Gauge,
    /// `sluice_ordering_sequence_gaps_total`.
    pub gaps: Counter,
    /// `sluice_ordering_sequence_skipped_total`.
    pub skipped: Counter,
}

impl<M> Shared<M> {
    fn lock(&self) -> MutexGuard<'_, Keys<M>> {
        // A panic while holding the lock cannot leave the queues inconsistent (every update
        // is a single push or pop), so a poisoned lock is used as is.
        self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// After every change: the gauges, and a wake-up for [`Sequencer::ready`] when a gap
    /// started (a permit is kept when nobody waits, so it is not lost).
    fn publish(&self, keys: &mut Keys<M>) {
        self.gauges.keys.set(keys.queues.len() as f64);
        self.gauges.waiting.set(keys.waiting as f64);
        self.gauges.gap_keys.set(keys.gap_keys as f64);
        if std::mem::take(&mut keys.gap_started) {
            self.gap_started.notify_one();
        }
    }

    fn turn(self: &Arc<Self>, key: Arc<str>, sequenced: Option<Sequenced>) -> Turn<M> {
        Turn { key: Some(key), shared: self.clone(), sequenced, returned: None }
    }

    /// A turn that holds no key (a message that passes through without waiting for one).
    fn pass(self: &Arc<Self>, sequenced: Sequenced) -> Turn<M> {
        Turn { key: None, shared: self.clone(), sequenced: Some(sequenced), returned: None }
    }
}

impl<M> Keys<M> {
    fn set_gap(&mut self, key: &Arc<str>, since: Option<Instant>, resequence: &Resequence) {
        let Some(state) = self.queues.get_mut(key) else { return };
        match (state.gap_since, since) {
            (None, Some(at)) => {
                self.gap_keys += 1;
                self.deadlines.push(Reverse((at + resequence.max_wait, key.clone())));
                self.gap_started = true;
            }
            (Some(_), None) => self.gap_keys -= 1,
            _ => return,
        }
        state.gap_since = since;
    }

    /// The message that goes next for `key`, which holds no turn: the next in order, the
    /// consequence of a gap when it is due (`due`: its wait is over), or none (the key waits
    /// on a gap, or is forgotten when nothing of it is left). The key is busy after one.
    fn next_out(
        &mut self,
        key: &Arc<str>,
        resequence: Option<&Resequence>,
        gauges: &Gauges,
        due: bool,
    ) -> Option<(M, Option<Sequenced>)> {
        let mut gap = None;
        let out = {
            let state = self.queues.get_mut(key)?;
            debug_assert!(!state.busy);
            match resequence {
                None => state.fifo.pop_front().map(|m| (m, None)),
                Some(r) => resequenced(state, key, r, gauges, due, &mut gap),
            }
        };
        if let (Some(r), Some(since)) = (resequence, gap) {
            self.set_gap(key, since, r);
        }
        let state = self.queues.get_mut(key)?;
        match out {
            Some(_) => {
                state.busy = true;
                self.waiting -= 1;
            }
            None if state.is_empty() => {
                if state.gap_since.is_some() {
                    self.gap_keys -= 1;
                }
                self.queues.remove(key);
            }
            None => {}
        }
        out
    }
}

/// [`Keys::next_out`] with a resequencer; `gap` is set to the key's new gap clock when it
/// changes.
fn resequenced<M>(
    state: &mut KeyState<M>,
    key: &Arc<str>,
    r: &Resequence,
    gauges: &Gauges,
    due: bool,
    gap: &mut Option<Option<Instant>>,
) -> Option<(M, Option<Sequenced>)> {
    if let Some(through) = state.flush_through {
        if let Some(entry) = state.early.first_entry()
            && *entry.key() <= through
        {
            let (seq, m) = entry.remove_entry();
            return Some((m, Some(Sequenced::new(key.clone(), Ok(seq), Check::Gap(state.next)))));
        }
        state.flush_through = None;
    }
    let Some((&first, _)) = state.early.first_key_value() else {
        *gap = Some(None);
        return None;
    };
    let check = match state.next {
        None => Check::Turn(None),
        Some(n) if first < n => Check::Passed,
        Some(n) if first == n => Check::Turn(Some(n)),
        Some(n) => {
            let now = Instant::now();
            let over =
                due || state.early.len() > r.max_buffered || state.gap_since.is_some_and(|s| s + r.max_wait <= now);
            if !over {
                if state.gap_since.is_none() {
                    *gap = Some(Some(now));
                }
                return None;
            }
            gauges.gaps.increment(1);
            tracing::warn!(
                key = &**key,
                expected = n,
                next = first,
                waiting = state.early.len(),
                on_gap = ?r.on_gap,
                "sequence gap given up on"
            );
            match r.on_gap {
                OnGap::Proceed => Check::Proceed,
                OnGap::DeadLetter => {
                    state.flush_through = state.early.last_key_value().map(|(s, _)| *s);
                    Check::Gap(Some(n))
                }
            }
        }
    };
    let (seq, m) = state.early.pop_first()?;
    // Progress (or the gap's end): a later gap waits its own max_wait.
    *gap = Some(None);
    Some((m, Some(Sequenced::new(key.clone(), Ok(seq), check))))
}

impl<M> Sequencer<M> {
    /// A sequencer in arrival order, or with a resequencer.
    pub fn new(gauges: Gauges, resequence: Option<Resequence>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let keys =
            Keys { queues: HashMap::new(), waiting: 0, deadlines: BinaryHeap::new(), gap_keys: 0, gap_started: false };
        let shared = Shared { keys: Mutex::new(keys), ready: tx, gauges, resequence, gap_started: Default::default() };
        Sequencer { shared: Arc::new(shared), ready: rx }
    }

    /// A message of `key` received (with its sequence number, or why it has none, for a
    /// resequenced handler): returned with the key's turn when it may go now; otherwise
    /// queued behind the key's earlier messages (`None`). With a resequencer, a message
    /// without a number, or with one the key has passed, goes at once (the gate settles it)
    /// without taking the turn; and the message returned may be another of the key's, the
    /// one whose number came (or that goes on past a gap over `max_buffered`).
    pub fn offer(&self, key: String, seq: Option<Result<u64, String>>, msg: M) -> Option<(M, Turn<M>)> {
        let resequence = self.shared.resequence.as_ref();
        let mut keys = self.shared.lock();
        let key: Arc<str> = key.into();
        let (out, handed) = match (resequence, seq) {
            (Some(_), Some(Err(why))) => {
                let sequenced = Sequenced::new(key, Err(why), Check::Passed);
                (Some((msg, self.shared.pass(sequenced))), None)
            }
            (Some(r), Some(Ok(seq))) => match keys.queues.get_mut(&key) {
                None => {
                    keys.queues.insert(key.clone(), KeyState::new(true));
                    let sequenced = Sequenced::new(key.clone(), Ok(seq), Check::Turn(None));
                    (Some((msg, self.shared.turn(key, Some(sequenced)))), None)
                }
                Some(state) if state.next.is_some_and(|n| seq < n) => {
                    let sequenced = Sequenced::new(key, Ok(seq), Check::Passed);
                    (Some((msg, self.shared.pass(sequenced))), None)
                }
                Some(state) => {
                    // A second delivery of a number already waiting replaces the first (a
                    // redelivery is the one the broker now expects an answer for).
                    if state.early.insert(seq, msg).is_none() {
                        keys.waiting += 1;
                    }
                    let handed = match keys.queues.get(&key).is_some_and(|s| !s.busy) {
                        true => keys.next_out(&key, Some(r), &self.shared.gauges, false).map(|o| (key, o)),
                        false => None,
                    };
                    (None, handed)
                }
            },
            _ => match keys.queues.get_mut(&key) {
                Some(state) => {
                    state.fifo.push_back(msg);
                    keys.waiting += 1;
                    (None, None)
                }
                None => {
                    keys.queues.insert(key.clone(), KeyState::new(true));
                    (Some((msg, self.shared.turn(key, None))), None)
                }
            },
        };
        self.shared.publish(&mut keys);
        drop(keys);
        match handed {
            Some((key, (msg, sequenced))) => Some((msg, self.shared.turn(key, sequenced))),
            None => out,
        }
    }

    /// The next message whose turn came (its key's previous message was settled, or the gap
    /// before it was given up on). Never ends: wait for it alongside the transport's own
    /// messages.
    pub async fn ready(&mut self) -> (M, Turn<M>) {
        loop {
            let deadline = self.shared.lock().deadlines.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                next = self.ready.recv() => match next {
                    Some(next) => return next,
                    // The sender lives in `shared`, which this sequencer holds.
                    None => std::future::pending().await,
                },
                () = sleep_until(deadline) => self.expire(false),
                // A new deadline, maybe earlier than the one slept on.
                () = self.shared.gap_started.notified() => {}
            }
        }
    }

    /// Gives up on every gap now, whatever its wait (a core subscription that ended: the
    /// missing messages cannot come any more).
    pub fn give_up_gaps(&self) {
        self.expire(true);
    }

    /// Gives up on the gaps whose wait is over (every gap, with `all`): what follows them is
    /// sent to `ready`.
    fn expire(&self, all: bool) {
        let Some(r) = self.shared.resequence.as_ref() else { return };
        let now = Instant::now();
        let mut keys = self.shared.lock();
        let mut out = Vec::new();
        while let Some(Reverse((at, _))) = keys.deadlines.peek()
            && (all || *at <= now)
        {
            let Some(Reverse((_, key))) = keys.deadlines.pop() else { break };
            let due = keys
                .queues
                .get(&key)
                .is_some_and(|s| !s.busy && s.gap_since.is_some_and(|s| all || s + r.max_wait <= now));
            if due && let Some(next) = keys.next_out(&key, Some(r), &self.shared.gauges, true) {
                out.push((key, next));
            }
        }
        self.shared.publish(&mut keys);
        drop(keys);
        for (key, (msg, sequenced)) in out {
            let _ = self.shared.ready.send((msg, self.shared.turn(key, sequenced)));
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
        // Keys waiting on a gap hold no turn: their messages come out here. Keys still held
        // by a turn elsewhere keep their queues: those turns' holders are still running, and
        // hand them on when they end.
        let mut keys = self.shared.lock();
        let mut drained = 0;
        keys.queues.retain(|_, state| {
            if state.busy {
                return true;
            }
            drained += state.early.len() + state.fifo.len();
            out.extend(std::mem::take(&mut state.early).into_values());
            out.extend(state.fifo.drain(..));
            false
        });
        keys.waiting -= drained;
        keys.gap_keys = keys.queues.values().filter(|s| s.gap_since.is_some()).count();
        self.shared.publish(&mut keys);
        out
    }

    /// A handle on the waiting messages, for a task that keeps them alive (JetStream's
    /// in-progress acks).
    pub fn watcher(&self) -> Watcher<M> {
        Watcher { shared: self.shared.clone() }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
        let keys = self.shared.lock();
        keys.queues.values().flat_map(|s| s.fifo.iter().chain(s.early.values())).cloned().collect()
    }
}

/// A key's turn: held by the one message of the key being handled, until it is settled.
/// Dropping it hands the turn to the key's next message (through [`Sequencer::ready`]).
#[derive(Debug)]
pub struct Turn<M> {
    /// `None` once handed on (or disarmed, when the sequencer is gone), or for a message
    /// that holds no key.
    key: Option<Arc<str>>,
    shared: Arc<Shared<M>>,
    sequenced: Option<Sequenced>,
    /// A message the gate found early: back in the key's queue, with the number expected.
    returned: Option<Box<(M, u64, u64)>>,
}

impl<M> Turn<M> {
    /// What the resequencer says about the message (with `[ordering] sequence`).
    pub fn sequenced(&self) -> Option<&Sequenced> {
        self.sequenced.as_ref()
    }

    /// Whether the turn holds its key (a message that passes through does not).
    pub fn holds_key(&self) -> bool {
        self.key.is_some()
    }

    /// The gate found the message early (the key expects `expected`): it goes back to wait
    /// for its number, and the turn passes on.
    pub fn hold_back(mut self, msg: M, expected: u64) {
        if let Some(Ok(seq)) = self.sequenced.as_ref().map(|s| s.seq.clone())
            && self.key.is_some()
        {
            self.returned = Some(Box::new((msg, seq, expected)));
        }
    }
}

impl<M> Drop for Turn<M> {
    fn drop(&mut self) {
        let mut key = self.key.take();
        let mut advanced = self.sequenced.as_ref().and_then(|s| s.advanced.get().copied());
        let mut returned = self.returned.take();
        let resequence = self.shared.resequence.as_ref();
        while let Some(k) = key.take() {
            let next = {
                let mut keys = self.shared.lock();
                let mut back = 0;
                if let Some(state) = keys.queues.get_mut(&k) {
                    state.busy = false;
                    if let Some(a) = advanced.take() {
                        state.next = Some(state.next.map_or(a, |n| n.max(a)));
                    }
                    if let Some((msg, seq, expected)) = returned.take().map(|b| *b) {
                        state.next = Some(state.next.map_or(expected, |n| n.max(expected)));
                        // A redelivery of it waiting already is the one to keep.
                        if let std::collections::btree_map::Entry::Vacant(v) = state.early.entry(seq) {
                            v.insert(msg);
                            back = 1;
                        }
                    }
                }
                keys.waiting += back;
                let next = keys.next_out(&k, resequence, &self.shared.gauges, false);
                self.shared.publish(&mut keys);
                next
            };
            let Some((msg, sequenced)) = next else { break };
            let turn = self.shared.turn(k, sequenced);
            // Sent outside the lock. When the sequencer is gone (its transport stopped), the
            // message is dropped (JetStream redelivers it) and the turn passes to the next,
            // here rather than by recursion.
            if let Err(mpsc::error::SendError((_, mut turn))) = self.shared.ready.send((msg, turn)) {
                key = turn.key.take();
                turn.sequenced = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> Gauges {
        Gauges {
            keys: Gauge::noop(),
            waiting: Gauge::noop(),
            gap_keys: Gauge::noop(),
            gaps: Counter::noop(),
            skipped: Counter::noop(),
        }
    }

    fn resequence(on_gap: OnGap, max_buffered: usize) -> Resequence {
        Resequence {
            by: KeySpec::parse("header:Seq").expect("key syntax"),
            start: 1,
            max_wait: Duration::from_secs(5),
            max_buffered,
            on_gap,
        }
    }

    /// What the pipeline does with a message in its key's turn, given the number the store
    /// expects: handles it (moving the key on), or gives it back when it is early.
    fn settle(msg: u64, turn: Turn<u64>, stored: u64) {
        let s = turn.sequenced().expect("resequenced").clone();
        let expected = match s.check {
            Check::Turn(known) => stored.max(known.unwrap_or(0)),
            _ => msg,
        };
        if msg > expected {
            turn.hold_back(msg, expected);
        } else {
            s.confirm(msg);
            s.advance(msg + 1);
            drop(turn);
        }
    }

    fn check_of(turn: &Turn<u64>) -> Check {
        turn.sequenced().expect("resequenced").check
    }

    #[tokio::test]
    async fn shuffled_numbers_come_out_in_order() {
        let mut seq = Sequencer::new(gauges(), Some(resequence(OnGap::Proceed, 100)));
        // A fresh key's first message goes to the gate, which knows what the store expects.
        let (two, turn) = seq.offer("k".into(), Some(Ok(2)), 2).expect("fresh key");
        assert_eq!(check_of(&turn), Check::Turn(None));
        settle(two, turn, 1);
        assert_eq!(seq.waiting(), 1, "2 waits for 1");
        assert!(seq.offer("k".into(), Some(Ok(4)), 4).is_none());
        assert!(seq.offer("k".into(), Some(Ok(3)), 3).is_none());
        assert!(seq.try_ready().is_none(), "nothing before 1");
        let (one, turn) = seq.offer("k".into(), Some(Ok(1)), 1).expect("1 is expected");
        assert_eq!(check_of(&turn), Check::Turn(Some(1)));
        settle(one, turn, 1);
        let mut order = vec![one];
        while let Some((n, turn)) = seq.try_ready() {
            assert_eq!(check_of(&turn), Check::Turn(Some(n)));
            order.push(n);
            settle(n, turn, 1);
        }
        assert_eq!(order, [1, 2, 3, 4]);
        assert!(seq.idle(), "a key with nothing left is forgotten (the store keeps its number)");
    }

    #[tokio::test]
    async fn a_number_passed_goes_through_to_be_skipped_and_a_redelivery_replaces_its_copy() {
        let mut seq = Sequencer::new(gauges(), Some(resequence(OnGap::Proceed, 100)));
        let (one, turn) = seq.offer("k".into(), Some(Ok(1)), 1).expect("fresh");
        assert!(seq.offer("k".into(), Some(Ok(2)), 2).is_none());
        assert!(seq.offer("k".into(), Some(Ok(2)), 2).is_none(), "a second copy of 2");
        assert_eq!(seq.waiting(), 1, "kept once");
        settle(one, turn, 1);
        let (two, turn) = seq.try_ready().expect("2 next");
        assert_eq!(two, 2);
        let (again, passed) = seq.offer("k".into(), Some(Ok(1)), 1).expect("passes through");
        assert_eq!(again, 1);
        assert_eq!(check_of(&passed), Check::Passed);
        assert!(!passed.holds_key());
        drop(passed);
        assert!(seq.try_ready().is_none(), "a message passing through hands nothing on");
        settle(two, turn, 1);
        assert!(seq.idle());
        // Without a number: through, for the gate to dead-letter.
        let (_, turn) = seq.offer("k".into(), Some(Err("no header".into())), 9).expect("through");
        assert!(turn.sequenced().expect("sequenced").seq.is_err());
        assert!(!turn.holds_key());
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_proceeds_after_max_wait() {
        let mut seq = Sequencer::new(gauges(), Some(resequence(OnGap::Proceed, 100)));
        let (one, turn) = seq.offer("k".into(), Some(Ok(1)), 1).expect("fresh");
        assert!(seq.offer("k".into(), Some(Ok(3)), 3).is_none());
        settle(one, turn, 1);
        assert!(seq.try_ready().is_none(), "3 waits for 2");
        let started = Instant::now();
        let (three, turn) = seq.ready().await;
        assert_eq!(three, 3);
        assert_eq!(check_of(&turn), Check::Proceed);
        assert!(started.elapsed() >= Duration::from_secs(5), "waited max_wait");
        settle(three, turn, 2);
        // 2 arriving late is passed.
        let (_, turn) = seq.offer("k".into(), Some(Ok(2)), 2).expect("fresh key again, for the gate");
        assert_eq!(check_of(&turn), Check::Turn(None), "the store (4 expected) decides");
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_dead_letters_what_waits_in_order_and_keeps_expecting_the_number() {
        let mut seq = Sequencer::new(gauges(), Some(resequence(OnGap::DeadLetter, 100)));
        let (one, turn) = seq.offer("k".into(), Some(Ok(1)), 1).expect("fresh");
        settle(one, turn, 1);
        let (four, turn) = seq.offer("k".into(), Some(Ok(4)), 4).expect("fresh again");
        settle(four, turn, 2);
        assert!(seq.offer("k".into(), Some(Ok(3)), 3).is_none());
        let (first, turn) = seq.ready().await;
        assert_eq!((first, check_of(&turn)), (3, Check::Gap(Some(2))));
        assert!(seq.offer("k".into(), Some(Ok(5)), 5).is_none(), "arrives while the gap is dead-lettered");
        drop(turn); // dead-lettered: the key does not move on
        let (second, turn) = seq.try_ready().expect("the next of the gap");
        assert_eq!((second, check_of(&turn)), (4, Check::Gap(Some(2))));
        drop(turn);
        assert!(seq.try_ready().is_none(), "5 came after the gap was given up on: it waits its own max_wait");
        let (third, turn) = seq.ready().await;
        assert_eq!((third, check_of(&turn)), (5, Check::Gap(Some(2))));
        drop(turn);
        assert!(seq.idle());
    }

    #[tokio::test(start_paused = true)]
    async fn past_max_buffered_a_gap_is_given_up_on_at_once() {
        let mut seq = Sequencer::new(gauges(), Some(resequence(OnGap::Proceed, 2)));
        let (one, turn) = seq.offer("k".into(), Some(Ok(1)), 1).expect("fresh");
        settle(one, turn, 1);
        let (three, turn) = seq.offer("k".into(), Some(Ok(3)), 3).expect("fresh again");
        settle(three, turn, 2);
        assert!(seq.offer("k".into(), Some(Ok(4)), 4).is_none());
        assert!(seq.try_ready().is_none(), "two wait: within the bound");
        let (next, turn) = seq.offer("k".into(), Some(Ok(5)), 5).expect("the third over the bound: on with the lowest");
        assert_eq!((next, check_of(&turn)), (3, Check::Proceed));
        settle(next, turn, 2);
        let (next, turn) = seq.try_ready().expect("then in order");
        assert_eq!((next, check_of(&turn)), (4, Check::Turn(Some(4))));
        settle(next, turn, 2);
        let (next, _turn) = seq.try_ready().expect("and on");
        assert_eq!(next, 5);
    }

    #[tokio::test]
    async fn one_message_of_a_key_at_a_time_in_order() {
        let mut seq = Sequencer::new(gauges(), None);
        let (first, turn_a) = seq.offer("a".into(), None, 1).expect("a is free");
        assert_eq!(first, 1);
        assert!(seq.offer("a".into(), None, 2).is_none());
        assert!(seq.offer("a".into(), None, 3).is_none());
        let (other, turn_b) = seq.offer("b".into(), None, 10).expect("b is free");
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
        assert!(seq.offer("a".into(), None, 4).is_some());
    }

    #[test]
    fn a_turn_outliving_its_sequencer_drops_the_rest() {
        let seq = Sequencer::new(gauges(), None);
        let (_, turn) = seq.offer("k".into(), None, 1).expect("free");
        for n in 2..10_000 {
            assert!(seq.offer("k".into(), None, n).is_none());
        }
        let watcher = seq.watcher();
        assert_eq!(watcher.waiting().len(), 9_998);
        drop(seq);
        // Would recurse (and overflow the stack) if the turn were handed on by dropping.
        drop(turn);
        assert!(watcher.waiting().is_empty());
    }
}
