//! Core NATS: one queue subscription per handler; every Sluice process running the handler
//! joins the same queue group, so NATS spreads the messages across them.
//!
//! Core NATS does not redeliver, so retries happen in this process: a failed message waits
//! out its backoff in its own task, holding no concurrency permit, while other messages flow.
//! A pending retry does not survive the process: on shutdown it runs at once, one last time,
//! and is dead-lettered if it fails again. Use a JetStream source where that matters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, Subscriber};
use futures::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use crate::bindings::Message;
use crate::dlq::{self, Original};
use crate::manifest::Source;
use crate::metrics::Held;
use crate::ordering::{Sequencer, in_order, next_ready};
use crate::pipeline::{self, Entry, History, Lane, Settle};

/// Subscribes the handler of `lane` to its subject in its queue group.
pub async fn subscribe(client: &Client, lane: &Lane) -> anyhow::Result<Subscriber> {
    let spec = &lane.handler.spec;
    let Source::Core { subject, queue } = &spec.manifest.source else {
        anyhow::bail!("handler {} does not have a core NATS source", spec.name);
    };
    client
        .queue_subscribe(subject.as_str().to_owned(), queue.clone())
        .await
        .map_err(|e| anyhow::anyhow!("handler {}: cannot subscribe to {subject}: {e}", spec.name))
}

/// Serves `subscription` until `stop` turns true, then drains it: messages already
/// delivered to this process are processed, in-flight calls finish, then it returns.
///
/// What the subscription has buffered when a message arrives travels with it as one batch
/// through the pipeline (up to the free concurrency). Each message is handled by the version
/// in `versions` when its batch forms (a hot reload swaps it); a retry uses the version
/// current at that attempt.
pub async fn serve(versions: watch::Receiver<Lane>, mut subscription: Subscriber, mut stop: watch::Receiver<bool>) {
    let (name, concurrency, ordering) = {
        let lane = versions.borrow();
        let manifest = &lane.handler.spec.manifest;
        (lane.handler.spec.name.clone(), manifest.limits.max_concurrency as usize, manifest.ordering.clone())
    };
    let permits = Arc::new(Semaphore::new(concurrency));
    let limiter = versions.borrow().handler.spec.manifest.limits.rate.map(crate::rate::Limiter::new);
    // An ordered handler's messages wait behind their key here.
    let mut sequencer =
        ordering.as_ref().map(|o| Sequencer::new(versions.borrow().metrics.ordering(), o.sequence.clone()));
    let max_waiting = ordering.as_ref().map_or(usize::MAX, |o| o.max_waiting);
    let has_room = |s: &Option<Sequencer<async_nats::Message>>| s.as_ref().is_none_or(|s| s.waiting() < max_waiting);
    let mut in_flight = JoinSet::new();
    let mut draining = false;
    // The subscription has ended (drained): what is left are the calls in flight and, for an
    // ordered handler, the messages waiting behind their key; they all run before returning
    // (core NATS would not deliver them again).
    let mut ended = false;
    loop {
        if ended && in_flight.is_empty() {
            match &sequencer {
                None => break,
                Some(s) if s.idle() => break,
                // Messages held back behind a sequence gap: core NATS will not deliver the
                // missing ones any more, so the gaps are given up on now.
                Some(s) => s.give_up_gaps(),
            }
        }
        let room = has_room(&sequencer);
        let (msg, turn) = tokio::select! {
            biased;
            changed = stop.changed(), if !draining => {
                if changed.is_err() || *stop.borrow() {
                    draining = true;
                    if let Err(e) = subscription.drain().await {
                        tracing::warn!(handler = &*name, "cannot drain subscription: {e}");
                    }
                }
                continue;
            }
            (msg, turn) = next_ready(&mut sequencer) => (msg, Some(turn)),
            next = subscription.next(), if room && !ended => {
                let Some(msg) = next else {
                    ended = true;
                    continue;
                };
                // Waiting behind its key: no permit taken.
                let Some(admitted) = in_order(&sequencer, ordering.as_ref(), msg) else { continue };
                admitted
            }
            Some(_) = in_flight.join_next(), if ended && !in_flight.is_empty() => continue,
        };
        // Waiting for a permit here is the backpressure: at the concurrency limit (or
        // with a full outbox) we stop reading, and the queue group hands messages to
        // other processes.
        let relay = versions.borrow().relay.clone();
        if let Some(relay) = relay {
            let mut stopping = stop.clone();
            tokio::select! {
                () = relay.room() => {}
                _ = stopping.wait_for(|s| *s) => {}
            }
        }
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        // A rate limit holds the message here (the subscription buffers the rest; a
        // queue group hands new ones to the other processes meanwhile).
        if let Some(limiter) = &limiter {
            limiter.take().await;
        }
        let mut batch = super::batch((msg, permit, turn), concurrency);
        while batch.len() < concurrency {
            let Ok(permit) = permits.clone().try_acquire_owned() else { break };
            if limiter.as_ref().is_some_and(|l| !l.try_take()) {
                break;
            }
            if let Some((msg, turn)) = sequencer.as_mut().and_then(Sequencer::try_ready) {
                batch.push((msg, permit, Some(turn)));
                continue;
            }
            if ended || !has_room(&sequencer) {
                break;
            }
            match subscription.next().now_or_never() {
                Some(Some(msg)) => {
                    if let Some((msg, turn)) = in_order(&sequencer, ordering.as_ref(), msg) {
                        batch.push((msg, permit, turn));
                    }
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        let task = process(versions.clone(), batch, permits.clone(), stop.clone());
        // Boxed: the task then holds a pointer, not the whole state machine.
        in_flight.spawn(Box::pin(task));
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
    tracing::debug!(handler = &*name, "stopped");
}

type Turn = crate::ordering::Turn<async_nats::Message>;

/// What a message holds until it is settled: its concurrency permit, and its place in the
/// count of messages this process holds.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    /// An ordered handler's key turn, held through the message's retries.
    turn: Option<Turn>,
    _held: Held,
}

/// Core NATS keeps the permit until the message is settled: nothing else bounds the messages
/// this process holds (JetStream has the consumer's `max_ack_pending`).
impl pipeline::Tag for Slot {}

/// The first attempt of each message of a batch, as one batch; a message to retry then goes
/// on alone, inside this task, until it succeeds or is given up on.
async fn process(
    versions: watch::Receiver<Lane>,
    batch: Vec<(async_nats::Message, OwnedSemaphorePermit, Option<Turn>)>,
    permits: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
) {
    let lane = versions.borrow().clone();
    let received = Instant::now();
    let (mut msgs, mut held) = (Vec::with_capacity(batch.len()), Vec::with_capacity(batch.len()));
    for (msg, permit, turn) in batch {
        msgs.push(msg);
        held.push((permit, turn));
    }
    // Counted once: a retry in this process is not a new delivery.
    lane.metrics.batch(msgs.len() as u64);
    let wits: Vec<Arc<Message>> = msgs.iter().map(|m| Arc::new(pipeline::to_wit(m))).collect();
    let entries = msgs
        .iter()
        .zip(&wits)
        .zip(held)
        .map(|((msg, wit), (permit, turn))| {
            let sequence = turn.as_ref().and_then(|t| t.sequenced().cloned());
            let slot = Slot { permit: Some(permit), turn, _held: lane.metrics.hold() };
            (entry(&lane, msg, wit, 1, None, received, sequence), slot)
        })
        .collect();
    let (versions, permits, stop) = (&versions, &permits, &stop);
    pipeline::run_batch(&lane, entries, |i, mut slot, settle, history| {
        let (lane, msg, wit) = (&lane, &msgs[i], &wits[i]);
        async move {
            if let Settle::Early(expected) = settle {
                hold_back(&mut slot, msg, expected);
                return;
            }
            if let Some((delay, history)) = apply(lane, msg, settle, history).await {
                Box::pin(retry(versions, msg, wit, slot, delay, history, permits, stop.clone(), received)).await;
            }
        }
    })
    .await;
}

/// A resequenced message ahead of its key goes back to wait for its number (its turn passes on).
fn hold_back(slot: &mut Slot, msg: &async_nats::Message, expected: u64) {
    match slot.turn.take() {
        Some(turn) => turn.hold_back(msg.clone(), expected),
        None => tracing::error!("message lost: ahead of its key, with no key turn to wait with"),
    }
}

fn entry<'a>(
    lane: &Lane,
    msg: &'a async_nats::Message,
    wit: &Arc<Message>,
    attempt: u32,
    history: Option<History>,
    received: Instant,
    sequence: Option<crate::ordering::Sequenced>,
) -> Entry<'a> {
    Entry {
        original: Original {
            subject: msg.subject.as_str(),
            headers: msg.headers.as_ref(),
            payload: &msg.payload,
            stream: None,
        },
        wit: wit.clone(),
        attempt,
        history,
        received,
        span: lane.span(msg, attempt),
        sequence,
    }
}

/// The attempts after the first: each after its backoff (holding no concurrency permit
/// meanwhile), alone through the pipeline. On shutdown the last attempt runs at once rather
/// than being lost.
#[allow(clippy::too_many_arguments)]
async fn retry(
    versions: &watch::Receiver<Lane>,
    msg: &async_nats::Message,
    wit: &Arc<Message>,
    mut slot: Slot,
    mut delay: Duration,
    mut history: Option<History>,
    permits: &Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    received: Instant,
) {
    let mut deliveries = 1;
    loop {
        slot.permit = None;
        let last_chance = tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = stop.wait_for(|stopping| *stopping) => true,
        };
        slot.permit = match permits.clone().acquire_owned().await {
            Ok(p) => Some(p),
            Err(_) => return,
        };
        let lane = versions.borrow().clone();
        let max_attempts = lane.handler.spec.manifest.retry.max_attempts;
        // Deliveries the broker's back-pressure caused are not attempts.
        let deferred = History::deferred(history.as_ref());
        deliveries = if last_chance { (max_attempts + deferred).max(deliveries + 1) } else { deliveries + 1 };
        let attempt = deliveries.saturating_sub(deferred).max(1);
        let next = std::sync::Mutex::new(None);
        let sequence = slot.turn.as_ref().and_then(|t| t.sequenced().cloned());
        let entries = vec![(entry(&lane, msg, wit, attempt, history.take(), received, sequence), ())];
        let early = std::sync::Mutex::new(None);
        pipeline::run_batch(&lane, entries, |_, (), settle, history| {
            let (lane, next, early) = (&lane, &next, &early);
            async move {
                if let Settle::Early(expected) = settle {
                    if let Ok(mut early) = early.lock() {
                        *early = Some(expected);
                    }
                    return;
                }
                let again = apply(lane, msg, settle, history).await;
                if let Ok(mut next) = next.lock() {
                    *next = again;
                }
            }
        })
        .await;
        if let Some(expected) = early.into_inner().ok().flatten() {
            hold_back(&mut slot, msg, expected);
            return;
        }
        match next.into_inner().ok().flatten() {
            // Only the broker not taking the outputs retries past the last chance (a retry
            // policy's failure is dead-lettered then); on shutdown that cannot wait.
            Some(_) if last_chance => {
                tracing::error!("message lost: the broker did not take its outputs before shutdown");
                return;
            }
            Some((d, h)) => (delay, history) = (d, h),
            None => return,
        }
    }
}

/// Acts on a settlement; returns the delay and history of a retry to run.
async fn apply(
    lane: &Lane,
    msg: &async_nats::Message,
    settle: Settle,
    history: Option<History>,
) -> Option<(Duration, Option<History>)> {
    match settle {
        // Handled by the caller, which holds the message's key turn.
        Settle::Done | Settle::Skipped | Settle::Halt | Settle::Early(_) => None,
        Settle::Retry(delay) => Some((delay, history)),
        Settle::GaveUp { verdict, parked } => {
            if !parked {
                tracing::error!("message lost: its dead letter could not be stored");
            }
            // A refused reply subject gets no failure reply either: that too would be
            // published with Sluice's credentials.
            if let Some(reply) = &msg.reply
                && lane.reply_allowed(reply.as_str())
            {
                let original = Original {
                    subject: msg.subject.as_str(),
                    headers: msg.headers.as_ref(),
                    payload: &msg.payload,
                    stream: None,
                };
                Box::pin(reply_failure(lane.sender.client(), reply.clone(), lane, &verdict, &original)).await;
            }
            None
        }
    }
}

/// A request whose handler failed gets an error reply at once instead of a timeout, in the
/// NATS services convention (`Nats-Service-Error`) plus Sluice's failure headers.
async fn reply_failure(
    client: &Client,
    reply: async_nats::Subject,
    lane: &Lane,
    verdict: &dlq::Verdict,
    original: &Original<'_>,
) {
    let mut headers = dlq::verdict_headers(&lane.handler.spec, verdict, original);
    headers.insert("Nats-Service-Error-Code", "500");
    headers.insert("Nats-Service-Error", dlq::one_line(&verdict.reason));
    if let Err(e) = client.publish_with_headers(reply, headers, Default::default()).await {
        tracing::warn!("cannot send the failure reply: {e}");
    }
}
