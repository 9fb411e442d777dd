//! Core NATS: one queue subscription per handler; every Sluice process running the handler
//! joins the same queue group, so NATS spreads the messages across them.

use std::sync::Arc;

use async_nats::{Client, HeaderMap, Subscriber};
use futures::StreamExt;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::bindings::Delivery;
use crate::dispatch::{Failure, Outcome, dispatch};
use crate::engine::Engine;
use crate::handler::Handler;
use crate::host::Outputs;

/// Subscribes `handler` to its subject in its queue group.
pub async fn subscribe(client: &Client, handler: &Handler) -> anyhow::Result<Subscriber> {
    let spec = &handler.spec;
    client
        .queue_subscribe(spec.subject.as_str().to_owned(), spec.queue.clone())
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "handler {}: cannot subscribe to {}: {e}",
                spec.name,
                spec.subject
            )
        })
}

/// Serves `subscription` until `stop` turns true, then drains it: messages already
/// delivered to this process are processed, in-flight calls finish, then it returns.
pub async fn serve(
    client: Client,
    engine: Arc<Engine>,
    handler: Arc<Handler>,
    mut subscription: Subscriber,
    mut stop: watch::Receiver<bool>,
) {
    let spec = handler.spec.clone();
    let permits = Arc::new(Semaphore::new(spec.limits.max_concurrency as usize));
    let mut in_flight = JoinSet::new();
    let mut draining = *stop.borrow();
    if draining {
        drain(&mut subscription, &spec.name).await;
    }
    loop {
        tokio::select! {
            biased;
            changed = stop.changed(), if !draining => {
                if changed.is_err() || *stop.borrow() {
                    draining = true;
                    drain(&mut subscription, &spec.name).await;
                }
            }
            next = subscription.next() => {
                let Some(msg) = next else { break };
                // Waiting for a permit here is the backpressure: at the concurrency limit we
                // stop reading, and the queue group hands messages to other processes.
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let (client, engine, handler) = (client.clone(), engine.clone(), handler.clone());
                in_flight.spawn(async move {
                    process(&client, &engine, &handler, msg).await;
                    drop(permit);
                });
                while in_flight.try_join_next().is_some() {}
            }
        }
    }
    while in_flight.join_next().await.is_some() {}
    tracing::debug!(handler = &*spec.name, "stopped");
}

async fn drain(subscription: &mut Subscriber, handler: &str) {
    if let Err(e) = subscription.drain().await {
        tracing::warn!(handler, "cannot drain subscription: {e}");
    }
}

async fn process(client: &Client, engine: &Engine, handler: &Handler, msg: async_nats::Message) {
    let spec = &handler.spec;
    let span = tracing::info_span!("message", handler = &*spec.name, subject = %msg.subject);
    async {
        let wit_msg = super::to_wit(&msg);
        let delivery = Delivery { attempt: 1, max_attempts: 1, idempotency_key: None, stream_sequence: None };
        match dispatch(engine, handler, &wit_msg, &delivery).await {
            Outcome::Success(outputs) => send(client, outputs).await,
            Outcome::Failed(failure) => {
                tracing::warn!(kind = %failure.kind, reason = %failure.reason, digest = handler.short_digest(), "handler failed");
                if let Some(reply) = msg.reply {
                    reply_failure(client, reply, handler, &failure).await;
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Sends what a successful call queued, in order: publications, then the reply.
async fn send(client: &Client, outputs: Outputs) {
    for out in outputs.published.into_iter().chain(outputs.reply) {
        let subject = out.subject.clone();
        if let Err(e) = client
            .publish_with_headers(out.subject, out.headers, out.payload)
            .await
        {
            tracing::error!(%subject, "cannot send output: {e}");
        }
    }
}

/// A request whose handler failed gets an error reply at once instead of a timeout, in the
/// NATS services convention (`Nats-Service-Error`) plus Sluice's failure headers.
async fn reply_failure(
    client: &Client,
    reply: async_nats::Subject,
    handler: &Handler,
    failure: &Failure,
) {
    let mut headers = HeaderMap::new();
    let reason = one_line(&failure.reason);
    headers.insert("Nats-Service-Error-Code", "500");
    headers.insert("Nats-Service-Error", reason.as_str());
    headers.insert("Sluice-Failure-Kind", failure.kind.as_str());
    headers.insert("Sluice-Failure-Reason", reason.as_str());
    headers.insert("Sluice-Handler", &*handler.spec.name);
    headers.insert("Sluice-Handler-Digest", handler.spec.digest.as_str());
    if let Err(e) = client
        .publish_with_headers(reply, headers, Default::default())
        .await
    {
        tracing::warn!("cannot send the failure reply: {e}");
    }
}

/// Header values cannot hold line breaks.
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}
