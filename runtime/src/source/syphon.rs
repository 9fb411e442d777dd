//! The syphon: the way back of passive sending. Outputs the primary cluster did not take were
//! stored by a stream of the secondary (see [`crate::outputs`]); a handler whose source is on
//! the primary names that stream as its backlog (`[source] backlog = "..."`), and the syphon
//! moves what it holds into the primary once the primary takes it: each message published to
//! its own subject with its own headers (its `Nats-Msg-Id` included, so the primary stream's
//! duplicate window drops what already arrived there), then acked on the secondary. A message
//! the primary does not take is given back to the secondary and tried again after a back-off
//! (1 s doubling to 10 s); messages move in the backlog's order, except around such a retry.
//!
//! It publishes only to the subjects of the handler's own stream on the primary: a message
//! the backlog holds on any other subject (written there by whoever may publish to the
//! secondary) is terminated and logged, never sent with Sluice's credentials.
//!
//! Imports: the metrics and subject patterns; nothing of the pipeline (the syphon runs no
//! handler).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, consumer::pull};
use futures::StreamExt;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::subject::SubjectPattern;

/// The syphon's durable consumer on the backlog stream.
pub fn consumer_name(handler: &str) -> String {
    format!("sluice-syphon-{handler}")
}

/// What one handler's syphon moves, from where to where.
#[derive(Debug)]
pub struct Syphon {
    pub handler: String,
    /// The subjects of the handler's stream on the primary: the only subjects the syphon
    /// publishes to. Whoever can write to the backlog stream does not choose where Sluice
    /// publishes with its credentials; anything else is terminated and logged.
    pub subjects: Vec<SubjectPattern>,
    /// The backlog stream's consumer, on the secondary.
    pub consumer: PullConsumer,
    /// The primary cluster.
    pub primary: jetstream::Context,
    pub metrics: Arc<Metrics>,
}

impl Syphon {
    /// The syphon of `handler`, whose source is `stream` on `primary`: binds (creating when
    /// missing) its consumer on `backlog` of `secondary`, and reads the subjects it may
    /// publish to from `stream`'s configuration. A stream with no subjects (a mirror, a
    /// sourced stream) is refused: there is nowhere to move the backlog to.
    pub async fn bind(
        primary: &jetstream::Context,
        secondary: &jetstream::Context,
        handler: &str,
        stream: &str,
        backlog: &str,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let on_primary =
            primary.get_stream(stream).await.map_err(|e| anyhow::anyhow!("handler {handler}: stream {stream}: {e}"))?;
        let subjects: Vec<SubjectPattern> =
            on_primary.cached_info().config.subjects.iter().filter_map(|s| SubjectPattern::parse(s).ok()).collect();
        if subjects.is_empty() {
            anyhow::bail!(
                "handler {handler}: backlog {backlog}: stream {stream} on the primary has no subjects to move the \
                 backlog to (a mirror or a sourced stream?)"
            );
        }
        let what = format!("handler {handler}: backlog stream {backlog} on the secondary cluster");
        let s = secondary.get_stream(backlog).await.map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        let name = consumer_name(handler);
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("Sluice: moves the backlog of handler {handler} into the primary cluster")),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 256,
            ..pull::Config::default()
        };
        let consumer = s
            .get_or_create_consumer(&name, config)
            .await
            .map_err(|e| anyhow::anyhow!("{what}: consumer {name}: {e}"))?;
        Ok(Syphon { handler: handler.to_owned(), subjects, consumer, primary: primary.clone(), metrics })
    }
}

const FIRST_STEP: Duration = Duration::from_secs(1);
const LAST_STEP: Duration = Duration::from_secs(10);

/// Moves the backlog until `stop` is set.
pub async fn run(syphon: Syphon, mut stop: watch::Receiver<bool>) {
    let Syphon { handler, subjects, consumer, primary, metrics } = syphon;
    let mut step = FIRST_STEP;
    let mut waiting_logged = false;
    'pull: loop {
        if *stop.borrow() {
            break;
        }
        let mut messages =
            match consumer.stream().max_messages_per_batch(64).expires(Duration::from_secs(2)).messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(handler = %handler, "syphon: cannot pull from the backlog: {e}");
                    if pause(&mut stop, step).await {
                        break;
                    }
                    continue;
                }
            };
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break 'pull,
                next = messages.next() => next,
            };
            let msg = match next {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    tracing::debug!(handler = %handler, "syphon: the backlog's pull failed: {e}");
                    if pause(&mut stop, step).await {
                        break 'pull;
                    }
                    continue 'pull;
                }
                None => continue 'pull,
            };
            if !subjects.iter().any(|p| p.matches(&msg.subject)) {
                tracing::warn!(
                    handler = %handler,
                    subject = %msg.subject,
                    "syphon: a backlog message on a subject the handler's primary stream does not capture; dropped \
                     (terminated on the secondary)"
                );
                if let Err(e) = msg.ack_with(AckKind::Term).await {
                    tracing::debug!(handler = %handler, "syphon: cannot terminate a message: {e}");
                }
                continue;
            }
            let headers = msg.headers.clone().unwrap_or_default();
            let moved = match primary.publish_with_headers(msg.subject.clone(), headers, msg.payload.clone()).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match moved {
                Ok(()) => {
                    if let Err(e) = msg.ack().await {
                        // Redelivered later, and dropped by the primary's duplicate window.
                        tracing::debug!(handler = %handler, "syphon: cannot ack a moved message: {e}");
                    }
                    metrics.syphon_moved(&handler, 1);
                    if waiting_logged {
                        tracing::info!(handler = %handler, "syphon: the primary takes the backlog again");
                    }
                    step = FIRST_STEP;
                    waiting_logged = false;
                }
                Err(e) => {
                    if !waiting_logged {
                        tracing::warn!(
                            handler = %handler,
                            subject = %msg.subject,
                            "syphon: the primary does not take the backlog yet ({e}); trying again with back-off"
                        );
                        waiting_logged = true;
                    }
                    if let Err(e) = msg.ack_with(AckKind::Nak(Some(step))).await {
                        tracing::debug!(handler = %handler, "syphon: cannot give a message back: {e}");
                    }
                    if pause(&mut stop, step).await {
                        break 'pull;
                    }
                    step = (step * 2).min(LAST_STEP);
                }
            }
        }
    }
    tracing::debug!(handler = %handler, "syphon stopped");
}

/// Waits `d`, or less when `stop` is set (then true).
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => true,
        () = tokio::time::sleep(d) => false,
    }
}
