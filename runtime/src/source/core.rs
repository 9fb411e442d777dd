//! Core NATS: one queue subscription per handler; every Sluice process running the handler
//! joins the same queue group, so NATS spreads the messages across them.
//!
//! Core NATS does not redeliver, so retries happen in this process: a failed message waits
//! out its backoff in its own task, holding no concurrency permit, while other messages flow.
//! A pending retry does not survive the process: on shutdown it runs at once, one last time,
//! and is dead-lettered if it fails again. Use a JetStream source where that matters.

use std::sync::Arc;

use async_nats::{Client, Subscriber};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::{Context, Delivered, History, Settle};
use crate::dlq::{self, Original};
use crate::manifest::Source;

/// Subscribes the handler of `ctx` to its subject in its queue group.
pub async fn subscribe(client: &Client, ctx: &Context) -> anyhow::Result<Subscriber> {
    let spec = &ctx.handler.spec;
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
/// Each message is handled by the version in `versions` when it arrives (a hot reload swaps
/// it); a retry uses the version current at that attempt.
pub async fn serve(versions: watch::Receiver<Context>, mut subscription: Subscriber, mut stop: watch::Receiver<bool>) {
    let (name, concurrency) = {
        let ctx = versions.borrow();
        (ctx.handler.spec.name.clone(), ctx.handler.spec.manifest.limits.max_concurrency as usize)
    };
    let permits = Arc::new(Semaphore::new(concurrency));
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
                // Waiting for a permit here is the backpressure: at the concurrency limit we
                // stop reading, and the queue group hands messages to other processes.
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let task = process(versions.clone(), msg, permits.clone(), permit, stop.clone());
                // Boxed: the task then holds a pointer, not the whole state machine.
                in_flight.spawn(Box::pin(task));
                while in_flight.try_join_next().is_some() {}
            }
        }
    }
    while in_flight.join_next().await.is_some() {}
    tracing::debug!(handler = &*name, "stopped");
}

/// Every attempt of one message, until it succeeds or is given up on.
async fn process(
    versions: watch::Receiver<Context>,
    msg: async_nats::Message,
    permits: Arc<Semaphore>,
    mut permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let wit = Arc::new(super::to_wit(&msg));
    let original =
        Original { subject: msg.subject.as_str(), headers: msg.headers.as_ref(), payload: &msg.payload, stream: None };
    let mut history: Option<History> = None;
    let mut attempt = 1;
    let received = std::time::Instant::now();
    let _held = {
        let ctx = versions.borrow();
        ctx.metrics.received();
        ctx.metrics.hold()
    };
    loop {
        let ctx = versions.borrow().clone();
        let max_attempts = ctx.handler.spec.manifest.retry.max_attempts;
        let span = super::span(&ctx.handler.spec.name, &msg, attempt);
        let delivered = Delivered { original, wit: &wit, attempt };
        let (settle, seen) = super::handle_delivery(&ctx, delivered, history.take()).instrument(span.clone()).await;
        history = seen;
        span.in_scope(|| super::count(&ctx, &settle, received));
        match settle {
            Settle::Done | Settle::Skipped | Settle::Halt => return,
            Settle::Retry(delay) => {
                drop(permit);
                // On shutdown, the last attempt runs at once rather than being lost.
                let last_chance = tokio::select! {
                    _ = tokio::time::sleep(delay) => false,
                    _ = stop.wait_for(|stopping| *stopping) => true,
                };
                permit = match permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                };
                attempt = if last_chance { max_attempts.max(attempt + 1) } else { attempt + 1 };
            }
            Settle::GiveUp(verdict) => {
                let give_up = async {
                    if let Err(e) = Box::pin(super::dead_letter(&ctx, &verdict, &original)).await {
                        tracing::error!("message lost: {e}");
                    }
                    // A refused reply subject gets no failure reply either: that too would be
                    // published with Sluice's credentials.
                    if let Some(reply) = &msg.reply
                        && super::reply_allowed(&ctx, reply.as_str())
                    {
                        Box::pin(reply_failure(ctx.sender.client(), reply.clone(), &ctx, &verdict, &original)).await;
                    }
                };
                give_up.instrument(span).await;
                return;
            }
        }
    }
}

/// A request whose handler failed gets an error reply at once instead of a timeout, in the
/// NATS services convention (`Nats-Service-Error`) plus Sluice's failure headers.
async fn reply_failure(
    client: &Client,
    reply: async_nats::Subject,
    ctx: &Context,
    verdict: &dlq::Verdict,
    original: &Original<'_>,
) {
    let mut headers = dlq::verdict_headers(&ctx.handler.spec, verdict, original);
    headers.insert("Nats-Service-Error-Code", "500");
    headers.insert("Nats-Service-Error", dlq::one_line(&verdict.reason));
    if let Err(e) = client.publish_with_headers(reply, headers, Default::default()).await {
        tracing::warn!("cannot send the failure reply: {e}");
    }
}
