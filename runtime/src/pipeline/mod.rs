//! The delivery pipeline: what happens to a message between its receipt by a transport
//! ([`source`](crate::source)) and its settlement, the same for every source. Messages travel
//! in batches (what one JetStream pull returned, what a core subscription had buffered);
//! each message of a batch still has its own outcome, retry, dead letter, idempotency record
//! and outputs, and is settled as soon as its own stages are done.
//!
//! | stage | module | outcome |
//! |---|---|---|
//! | gate: payload limit, exhausted redeliveries, idempotency key, lease | [`gate`] | [`gate::Gate`] |
//! | call: the guest, on the guest threads, one hand-off per batch | [`dispatch`](crate::dispatch) | [`dispatch::Outcome`](crate::dispatch::Outcome) |
//! | commit: reply check, outputs, the dedup record | [`commit`] | [`Step`] |
//! | settle: the retry policy, dead letters, metrics | [`settle`] | [`Settle`] |
//!
//! The transport acts on a [`Settle`] (ack, nak, term; a local retry; a failure reply).
//!
//! Imports: the vocabulary ([`failure`](crate::failure), [`spec`](crate::spec)), the call
//! ([`dispatch`](crate::dispatch), [`engine`](crate::engine), [`handler`](crate::handler)),
//! its effects ([`outputs`](crate::outputs), [`store`](crate::store), [`dlq`](crate::dlq)),
//! the policies ([`idempotency`](crate::idempotency), [`retry`](crate::retry)) and
//! [`metrics`](crate::metrics); never a transport, the runtime or the CLI.

pub mod commit;
pub mod gate;
pub mod settle;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::bindings::{Delivery, Message};
use crate::dispatch::{self, Call};
use crate::dlq::{Original, Verdict};
use crate::engine::Engine;
use crate::failure::Failure;
use crate::handler::Handler;
use crate::metrics::HandlerMetrics;
use crate::outputs::OutputSender;
use crate::relay::Relay;
use crate::store::Scope;

pub use self::settle::History;

/// Extra time a lease lasts beyond the handler's timeout: sending outputs and marking the key.
pub const LEASE_GRACE: Duration = Duration::from_secs(10);

/// What every delivery of one version of a handler needs.
#[derive(Debug, Clone)]
pub struct Lane {
    pub engine: Arc<Engine>,
    pub handler: Arc<Handler>,
    pub sender: Arc<OutputSender>,
    /// The handler's state store (dedup records, the guest's marks and kv).
    pub scope: Option<Scope>,
    /// The relay of the handler's outbox, when its store has one: outputs are committed with
    /// the call and sent after it.
    pub relay: Option<Arc<Relay>>,
    /// The handler's parked ordering keys, with `on_poison = "park"`.
    pub parked: Option<Arc<crate::parked::Parked>>,
    /// The handler's back-off while the broker does not take its outputs (kept across
    /// versions).
    pub pause: Arc<crate::retry::BrokerPause>,
    /// Fault injection for tests; `None` in production.
    pub fault: Option<Fault>,
    /// The handler's counters and histograms.
    pub metrics: Arc<HandlerMetrics>,
}

/// Faults a test can inject, to stop where a crash would.
#[cfg_attr(not(feature = "testing"), expect(dead_code, reason = "the tests construct them, with the testing feature"))]
#[allow(clippy::enum_variant_names)] // each names where the run halts
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Without an outbox: after the outputs of a successful call are sent, no commit, no ack.
    /// With one: before the commit (nothing has left the process).
    HaltAfterOutputs,
    /// After the commit: no ack, and the relay is not told of the entries.
    HaltAfterCommit,
    /// After the commit and the ack: the relay is not told of the entries.
    HaltAfterAck,
    /// The relay publishes a round, then removes nothing and stops.
    HaltAfterPublish,
}

/// One message of a batch, as its transport received it.
#[derive(Debug)]
pub struct Entry<'a> {
    pub original: Original<'a>,
    /// The WIT view of the message, shared with the call on the guest threads.
    pub wit: Arc<Message>,
    /// The attempt this delivery is (1 for the first).
    pub attempt: u32,
    /// What this process saw of the message's earlier attempts.
    pub history: Option<History>,
    /// When the transport received it (for the latency histogram).
    pub received: Instant,
    /// The message's span: every log line about it is inside.
    pub span: tracing::Span,
    /// What the resequencer says of it (`[ordering] sequence`).
    pub sequence: Option<crate::ordering::Sequenced>,
}

/// How a delivery ended, for the transport to act on.
#[derive(Debug)]
pub enum Settle {
    /// Handled: ack.
    Done,
    /// A duplicate of a handled message: ack without running.
    Skipped,
    /// Run it again after this delay (the failure is in the returned history).
    Retry(Duration),
    /// Given up on with this verdict; `parked` when the dead letter is stored (or there is no
    /// dead-letter subject, which is logged). When it is not, the message must be kept: a
    /// durable source redelivers it later and it is dead-lettered then.
    GaveUp { verdict: Verdict, parked: bool },
    /// Fault injection ([`Fault::HaltAfterOutputs`]): leave the message as a crash would.
    Halt,
    /// Early: its key expects this (lower) sequence number first. The transport gives it back
    /// to its key's queue ([`Turn::hold_back`](crate::ordering::Turn::hold_back)).
    Early(u64),
}

/// Where a message's stages got to: the commit stage's outcome, and the gate's when it stops
/// a message before its call. The settle stage turns it into a [`Settle`].
#[derive(Debug)]
pub enum Step {
    /// Handled, effects committed.
    Done,
    /// A duplicate of a handled message.
    Skipped,
    /// A failed attempt: the retry policy decides.
    Failed(Failure),
    /// A failure no retry can help (payload too large, no key, a conflicting payload).
    Final(Failure),
    /// Delivered past the retry budget already (an earlier dead letter could not be stored).
    Exhausted(Verdict),
    /// Fault injection: stop here.
    Halt,
    /// Its key expects this (lower) sequence number first.
    Early(u64),
}

impl Lane {
    /// The span of one attempt at a message: handler, subject, the trace id of an incoming
    /// `traceparent` (when there is one), the attempt, and (recorded once known) the outcome.
    /// One span per attempt, so a retried message's log lines do not pile up fields.
    pub fn span(&self, msg: &async_nats::Message, attempt: u32) -> tracing::Span {
        let handler = &*self.handler.spec.name;
        let subject = msg.subject.as_str();
        let trace_id =
            msg.headers.as_ref().and_then(|h| h.get("traceparent")).and_then(|v| v.as_str().split('-').nth(1));
        // Without a trace, no empty `trace_id` field to format into every message's span.
        match trace_id {
            Some(trace_id) => {
                tracing::info_span!("message", handler, subject, trace_id, attempt, outcome = tracing::field::Empty)
            }
            None => tracing::info_span!("message", handler, subject, attempt, outcome = tracing::field::Empty),
        }
    }

    /// Whether a reply (or a failure reply) may go to `subject`; counts a refusal.
    pub fn reply_allowed(&self, subject: &str) -> bool {
        let allowed = self.sender.reply_allowed(&self.handler.spec, subject);
        if !allowed {
            self.metrics.reply_refused();
        }
        allowed
    }
}

/// A failure of the handler's store. On `nats-kv` a backend that does not answer (a timeout,
/// no responders, a leadership change) is the broker's back-pressure, not the message's fault:
/// [`FailureKind::BrokerBusy`](crate::failure::FailureKind::BrokerBusy), backed off per
/// handler and not counted as an attempt. Anything else is `store-error`.
pub fn store_failure(lane: &Lane, e: &crate::store::StoreError) -> Failure {
    use crate::failure::FailureKind;
    let shared = lane.scope.as_ref().is_some_and(|s| s.store().shared());
    let kind = match e {
        crate::store::StoreError::Backend { .. } if shared => FailureKind::BrokerBusy,
        _ => FailureKind::StoreError,
    };
    Failure { kind, reason: format!("state store: {e}"), retry_after: None }
}

/// The WIT view of a NATS message.
pub fn to_wit(msg: &async_nats::Message) -> Message {
    Message {
        subject: msg.subject.to_string(),
        reply_to: msg.reply.as_ref().map(ToString::to_string),
        headers: msg.headers.as_ref().map(header_pairs).unwrap_or_default(),
        payload: msg.payload.to_vec(),
    }
}

fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut pairs = Vec::with_capacity(headers.len());
    for (name, values) in headers.iter() {
        for value in values {
            pairs.push((name.to_string(), value.to_string()));
        }
    }
    pairs
}

/// What a transport keeps with each message of a batch until it is settled (a concurrency
/// permit, its place in the count of held messages).
pub trait Tag: Send {
    /// The message's call has ended; its commit and settlement are still to come. A
    /// transport whose in-flight messages are bounded elsewhere (JetStream: the consumer's
    /// `max_ack_pending`) gives back its call permit here, so that a durable commit's latency
    /// does not keep the next calls waiting: more messages then share each group commit.
    fn call_ended(&mut self) {}
}

impl Tag for () {}

/// Runs a batch through the pipeline. Every entry is gated (their leases taken together),
/// the admitted ones are called as one batch on the guest threads, and each is committed
/// and settled as soon as its own call ends: `settled(index, tag, settle, history)` is
/// awaited for it then, inside its span, concurrently with the rest of the batch, so a slow
/// message holds back no other's ack. `history` is the updated failure history, for the next
/// attempt. Returns when every entry is settled.
pub async fn run_batch<T, S, F>(lane: &Lane, entries: Vec<(Entry<'_>, T)>, settled: S)
where
    T: Tag,
    S: Fn(usize, T, Settle, Option<History>) -> F + Sync,
    F: Future<Output = ()> + Send,
{
    let spec = &lane.handler.spec;
    let n = entries.len();
    let (mut entries, mut tags): (Vec<Entry<'_>>, Vec<Option<T>>) =
        entries.into_iter().map(|(e, t)| (e, Some(t))).unzip();
    let gates = futures::future::join_all(entries.iter().map(|e| InSpan::new(&e.span, gate::admit(lane, e)))).await;
    let mut histories: Vec<Option<History>> = entries.iter_mut().map(|e| e.history.take()).collect();
    let entries = entries;

    type Pending<'f> = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'f>>;
    let call_of = |i: usize, admitted: &gate::Admitted| {
        let entry = &entries[i];
        Call {
            index: i,
            scope: lane.scope.clone(),
            msg: entry.wit.clone(),
            delivery: Delivery {
                attempt: entry.attempt,
                max_attempts: spec.manifest.retry.max_attempts,
                idempotency_key: admitted.key.as_ref().map(|(k, _)| k.clone()),
                stream_sequence: entry.original.stream.map(|(_, seq)| seq),
            },
            span: entry.span.clone(),
        }
    };
    // A message's last stages, in its span: (waiting for its key, then its own call,)
    // commit, settle.
    let finish = |i: usize, then: Then, history, mut tag: T| -> Pending<'_> {
        let entry = &entries[i];
        let (settled, call_of) = (&settled, &call_of);
        Box::pin(InSpan::new(&entry.span, async move {
            let step = match then {
                Then::Settle(step) => step,
                Then::Commit(admitted, outcome) => commit::commit(lane, entry, admitted, outcome).await,
                Then::Wait(remaining) => match gate::admit_waiting(lane, entry, remaining).await {
                    Ok(admitted) => {
                        lane.metrics.calls_started(1);
                        let mut alone = dispatch::run_batch(&lane.engine, &lane.handler, vec![call_of(i, &admitted)]);
                        match alone.next().await {
                            Some(ended) => {
                                tag.call_ended();
                                lane.metrics.call_ended(ended.took);
                                commit::commit(lane, entry, admitted, ended.outcome).await
                            }
                            None => Step::Failed(Failure {
                                kind: crate::failure::FailureKind::Trap,
                                reason: "the call ended abnormally".to_owned(),
                                retry_after: None,
                            }),
                        }
                    }
                    Err(step) => step,
                },
            };
            let (settle, history) = settle::settle(lane, entry, step, history).await;
            settled(i, tag, settle, history).await;
        }))
    };

    let mut after: FuturesUnordered<Pending<'_>> = FuturesUnordered::new();
    let mut admitted: Vec<Option<gate::Admitted>> = (0..n).map(|_| None).collect();
    let mut calls = Vec::with_capacity(n);
    for (i, gate) in gates.into_iter().enumerate() {
        let then = match gate {
            gate::Gate::Run(a) => {
                calls.push(call_of(i, &a));
                admitted[i] = Some(a);
                continue;
            }
            gate::Gate::Stop(step) => Then::Settle(step),
            gate::Gate::Early(expected) => Then::Settle(Step::Early(expected)),
            // Typically a duplicate in this very batch: it waits for the first to settle.
            gate::Gate::Busy(remaining) => Then::Wait(remaining),
        };
        if let Some(tag) = tags[i].take() {
            after.push(finish(i, then, histories[i].take(), tag));
        }
    }

    lane.metrics.calls_started(calls.len() as u64);
    let mut outcomes = dispatch::run_batch(&lane.engine, &lane.handler, calls);
    let mut calls_done = false;
    loop {
        tokio::select! {
            ended = outcomes.next(), if !calls_done => match ended {
                None => calls_done = true,
                Some(ended) => {
                    lane.metrics.call_ended(ended.took);
                    let i = ended.index;
                    if let Some(tag) = tags[i].as_mut() {
                        tag.call_ended();
                    }
                    if let (Some(a), Some(tag)) = (admitted[i].take(), tags[i].take()) {
                        after.push(finish(i, Then::Commit(a, ended.outcome), histories[i].take(), tag));
                    }
                }
            },
            Some(()) = after.next() => {}
            else => break,
        }
    }
}

pin_project_lite::pin_project! {
    /// A future run inside a span it borrows: `Instrument` without the span's clone (each
    /// clone and drop is a trip through the subscriber's registry).
    struct InSpan<'s, F> {
        span: &'s tracing::Span,
        #[pin]
        inner: F,
    }
}

impl<'s, F> InSpan<'s, F> {
    fn new(span: &'s tracing::Span, inner: F) -> Self {
        InSpan { span, inner }
    }
}

impl<F: Future> Future for InSpan<'_, F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        this.inner.poll(cx)
    }
}

/// What is left to do for a message when it leaves the batch's shared part.
enum Then {
    /// Settle it with this step.
    Settle(Step),
    /// Commit its call's outcome, then settle.
    Commit(gate::Admitted, dispatch::Outcome),
    /// Its key was busy: wait for the lease, call it alone, commit, settle.
    Wait(Duration),
}
