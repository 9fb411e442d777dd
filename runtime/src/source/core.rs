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
    let (name, concurrency) = {
        let lane = versions.borrow();
        (lane.handler.spec.name.clone(), lane.handler.spec.manifest.limits.max_concurrency as usize)
    };
    let permits = Arc::new(Semaphore::new(concurrency));
    let limiter = versions.borrow().handler.spec.manifest.limits.rate.map(crate::rate::Limiter::new);
    let mut in_flight = JoinSet::new();
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            changed = stop.changed(), if !draining => {
                if changed.is_err() || *stop.borrow() {
                    draining = true;
                    if let Err(e) = subscription.drain().await {
                        tracing::warn!(handler = &*name, "cannot drain subscription: {e}");
                    }
                }
            }
            next = subscription.next() => {
                let Some(msg) = next else { break };
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
                let mut batch = vec![(msg, permit)];
                while batch.len() < concurrency {
                    let Ok(permit) = permits.clone().try_acquire_owned() else { break };
                    if limiter.as_ref().is_some_and(|l| !l.try_take()) {
                        break;
                    }
                    match subscription.next().now_or_never() {
                        Some(Some(msg)) => batch.push((msg, permit)),
                        Some(None) | None => break,
                    }
                }
                let task = process(versions.clone(), batch, permits.clone(), stop.clone());
                // Boxed: the task then holds a pointer, not the whole state machine.
                in_flight.spawn(Box::pin(task));
                while in_flight.try_join_next().is_some() {}
            }
        }
    }
    while in_flight.join_next().await.is_some() {}
    tracing::debug!(handler = &*name, "stopped");
}

/// What a message holds until it is settled: its concurrency permit, and its place in the
/// count of messages this process holds.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    _held: Held,
}

/// Core NATS keeps the permit until the message is settled: nothing else bounds the messages
/// this process holds (JetStream has the consumer's `max_ack_pending`).
impl pipeline::Tag for Slot {}

/// The first attempt of each message of a batch, as one batch; a message to retry then goes
/// on alone, inside this task, until it succeeds or is given up on.
async fn process(
    versions: watch::Receiver<Lane>,
    batch: Vec<(async_nats::Message, OwnedSemaphorePermit)>,
    permits: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
) {
    let lane = versions.borrow().clone();
    let received = Instant::now();
    let (msgs, permits_held): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    // Counted once: a retry in this process is not a new delivery.
    lane.metrics.batch(msgs.len() as u64);
    let wits: Vec<Arc<Message>> = msgs.iter().map(|m| Arc::new(pipeline::to_wit(m))).collect();
    let entries = msgs
        .iter()
        .zip(&wits)
        .zip(permits_held)
        .map(|((msg, wit), permit)| {
            let slot = Slot { permit: Some(permit), _held: lane.metrics.hold() };
            (entry(&lane, msg, wit, 1, None, received), slot)
        })
        .collect();
    let (versions, permits, stop) = (&versions, &permits, &stop);
    pipeline::run_batch(&lane, entries, |i, slot, settle, history| {
        let (lane, msg, wit) = (&lane, &msgs[i], &wits[i]);
        async move {
            if let Some((delay, history)) = apply(lane, msg, settle, history).await {
                Box::pin(retry(versions, msg, wit, slot, delay, history, permits, stop.clone(), received)).await;
            }
        }
    })
    .await;
}

fn entry<'a>(
    lane: &Lane,
    msg: &'a async_nats::Message,
    wit: &Arc<Message>,
    attempt: u32,
    history: Option<History>,
    received: Instant,
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
    let mut attempt = 1;
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
        attempt = if last_chance { max_attempts.max(attempt + 1) } else { attempt + 1 };
        let next = std::sync::Mutex::new(None);
        let entries = vec![(entry(&lane, msg, wit, attempt, history.take(), received), ())];
        pipeline::run_batch(&lane, entries, |_, (), settle, history| {
            let (lane, next) = (&lane, &next);
            async move {
                let again = apply(lane, msg, settle, history).await;
                if let Ok(mut next) = next.lock() {
                    *next = again;
                }
            }
        })
        .await;
        match next.into_inner().ok().flatten() {
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
        Settle::Done | Settle::Skipped | Settle::Halt => None,
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
