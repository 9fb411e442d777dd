//! Where messages come from: core NATS subscriptions in a queue group, and durable JetStream
//! pull consumers. Both run each delivery through [`attempt`] and settle the outcome with the
//! handler's [`RetryPolicy`](crate::retry::RetryPolicy): ack, retry later, or dead-letter.

pub mod core;
pub mod jetstream;

use std::sync::Arc;
use std::time::SystemTime;

use async_nats::HeaderMap;

use crate::bindings::{Delivery, Message};
use crate::dispatch::{Failure, FailureKind, Outcome, dispatch};
use crate::dlq::{self, Original, Verdict};
use crate::engine::Engine;
use crate::handler::Handler;
use crate::outputs::OutputSender;
use crate::retry::Decision;

/// What every delivery of a handler needs.
#[derive(Debug, Clone)]
pub struct Context {
    pub engine: Arc<Engine>,
    pub handler: Arc<Handler>,
    pub sender: Arc<OutputSender>,
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

/// One attempt: run the handler, then send its outputs. `Ok` means everything it asked for
/// was sent (and stored, for stream subjects).
pub async fn attempt(ctx: &Context, msg: &Message, delivery: &Delivery) -> Result<(), Failure> {
    match dispatch(&ctx.engine, &ctx.handler, msg, delivery).await {
        Outcome::Success(outputs) => ctx.sender.send(outputs).await.map_err(|reason| Failure {
            kind: FailureKind::OutputFailed,
            reason,
            retry_after: None,
        }),
        Outcome::Failed(failure) => Err(failure),
    }
}

/// The failures of one message seen by this process.
#[derive(Debug, Clone)]
pub struct History {
    pub first_failure_at: SystemTime,
    pub last_failure_at: SystemTime,
    pub last: Failure,
}

impl History {
    pub fn record(previous: Option<History>, failure: Failure) -> History {
        let now = SystemTime::now();
        History {
            first_failure_at: previous.map_or(now, |h| h.first_failure_at),
            last_failure_at: now,
            last: failure,
        }
    }

    /// The verdict when the policy gives up with `kind` after `attempts`.
    pub fn verdict(&self, kind: FailureKind, attempts: u32) -> Verdict {
        Verdict {
            kind,
            last_kind: (kind != self.last.kind).then_some(self.last.kind),
            reason: self.last.reason.clone(),
            attempts,
            first_failure_at: self.first_failure_at,
            last_failure_at: self.last_failure_at,
        }
    }
}

/// Logs the failed attempt and decides what comes next.
pub fn decide(ctx: &Context, failure: &Failure, attempt: u32) -> Decision {
    let decision = ctx.handler.spec.retry.decide(failure, attempt);
    match &decision {
        Decision::Retry(delay) => tracing::info!(
            kind = %failure.kind,
            reason = %failure.reason,
            attempt,
            retry_in = ?delay,
            "attempt failed; will retry"
        ),
        Decision::GiveUp(kind) => tracing::warn!(
            kind = %kind,
            last_kind = %failure.kind,
            reason = %failure.reason,
            attempt,
            digest = ctx.handler.short_digest(),
            "giving up on the message"
        ),
    }
    decision
}

/// Dead-letters a message given up on. `Ok` when it is safely parked (or there is nowhere
/// to park it, which is logged); `Err` when the publish failed and the message must be kept.
pub async fn dead_letter(
    ctx: &Context,
    verdict: &Verdict,
    original: &Original<'_>,
) -> Result<(), String> {
    let spec = &ctx.handler.spec;
    let Some(target) = &spec.dead_letter else {
        tracing::error!(
            kind = %verdict.kind,
            reason = %verdict.reason,
            "message dropped: handler {} has no [dead_letter] subject",
            spec.name
        );
        return Ok(());
    };
    dlq::publish(ctx.sender.jetstream(), target, spec, verdict, original).await?;
    tracing::info!(subject = %target.subject, kind = %verdict.kind, "message dead-lettered");
    Ok(())
}
