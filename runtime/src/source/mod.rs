//! Where messages come from: core NATS subscriptions in a queue group, and durable JetStream
//! pull consumers. Both run each delivery through [`handle_delivery`] and settle the outcome
//! with the handler's [`RetryPolicy`](crate::retry::RetryPolicy): ack, retry later, or
//! dead-letter.

pub mod core;
pub mod jetstream;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;

use crate::bindings::{Delivery, Message};
use crate::dispatch::{self, Outcome};
use crate::dlq::{self, Original, Verdict};
use crate::engine::Engine;
use crate::failure::{Failure, FailureKind};
use crate::handler::Handler;
use crate::idempotency::{self, OnMissing};
use crate::metrics::HandlerMetrics;
use crate::outputs::OutputSender;
use crate::outputs::Outputs;
use crate::retry::Decision;
use crate::store::{Begin, Scope, StoreError};

/// What every delivery of a handler needs.
#[derive(Debug, Clone)]
pub struct Context {
    pub engine: Arc<Engine>,
    pub handler: Arc<Handler>,
    pub sender: Arc<OutputSender>,
    /// The handler's state store (dedup records, the guest's marks and kv).
    pub scope: Option<Scope>,
    /// Fault injection for tests; `None` in production.
    pub fault: Option<Fault>,
    /// The handler's counters and histograms.
    pub metrics: Arc<HandlerMetrics>,
}

/// The span of one attempt at a message: handler, subject, the trace id of an incoming
/// `traceparent`, the attempt, and (recorded once known) the outcome. One span per attempt,
/// so a retried message's log lines do not pile up fields (`attempt=1 ... attempt=2`).
pub fn span(handler: &str, msg: &async_nats::Message, attempt: u32) -> tracing::Span {
    let trace_id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .and_then(|v| v.as_str().split('-').nth(1).map(str::to_owned))
        .unwrap_or_default();
    tracing::info_span!(
        "message",
        handler,
        subject = %msg.subject,
        trace_id,
        attempt,
        outcome = tracing::field::Empty,
    )
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

/// How a delivery ended, for the source to act on.
#[derive(Debug)]
pub enum Settle {
    /// Handled: ack.
    Done,
    /// A duplicate of a handled message: ack without running.
    Skipped,
    /// Run it again after this delay (the failure is in the returned history).
    Retry(Duration),
    /// Dead-letter it.
    GiveUp(Verdict),
    /// Fault injection ([`Fault::HaltAfterOutputs`]): leave the message as a crash would.
    Halt,
}

/// Faults a test can inject, to stop where a crash would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// After the outputs of a successful call are sent: no completion mark, no ack.
    HaltAfterOutputs,
}

/// A delivery: the message and where it stands.
#[derive(Debug, Clone, Copy)]
pub struct Delivered<'a> {
    pub original: Original<'a>,
    /// Shared, so that a call on the guest threads takes a reference, not a copy.
    pub wit: &'a Arc<Message>,
    pub attempt: u32,
}

/// Handles one delivery of a message: the idempotency gate, the handler, its outputs, the
/// store bookkeeping, and the retry decision. `history` is what this process saw of earlier
/// attempts; the updated one is returned for the next attempt.
pub async fn handle_delivery(ctx: &Context, d: Delivered<'_>, history: Option<History>) -> (Settle, Option<History>) {
    let spec = &ctx.handler.spec;
    let fail = |failure: Failure, history: Option<History>| {
        ctx.metrics.failed(failure.kind);
        let decision = decide(ctx, &failure, d.attempt);
        let history = History::record(history, failure);
        match decision {
            Decision::Retry(delay) => (Settle::Retry(delay), Some(history)),
            Decision::GiveUp(kind) => (Settle::GiveUp(history.verdict(kind, d.attempt)), Some(history)),
        }
    };
    // Failures that are final whatever the retry policy says.
    let final_failure = |kind: FailureKind, reason: String, history: Option<History>| {
        ctx.metrics.failed(kind);
        let history = History::record(history, Failure { kind, reason, retry_after: None });
        tracing::warn!(kind = %kind, reason = %history.last.reason, "giving up on the message");
        (Settle::GiveUp(history.verdict(kind, d.attempt)), Some(history))
    };

    if let Some(max) = spec.manifest.limits.max_payload
        && d.original.payload.len() as u64 > max
    {
        let reason = format!("payload of {} bytes is over limits.max_payload ({max} bytes)", d.original.payload.len());
        return final_failure(FailureKind::PayloadTooLarge, reason, history);
    }

    // The gate: derive the key, and take the lease on it unless it was handled already.
    let mut key = None;
    if let (Some(idem), Some(scope)) = (&spec.manifest.idempotency, &ctx.scope) {
        match idem.key.derive(d.original.subject, d.original.headers, d.original.payload) {
            Err(why) if idem.on_missing == OnMissing::DeadLetter => {
                return final_failure(
                    FailureKind::MissingIdempotencyKey,
                    format!("no idempotency key: {why}"),
                    history,
                );
            }
            Err(why) => tracing::debug!("processing without dedup: {why}"),
            Ok(k) => {
                let fingerprint = idem.fingerprint.then(|| idempotency::fingerprint(d.original.payload));
                let lease = spec.manifest.limits.timeout + LEASE_GRACE;
                match Box::pin(acquire(scope, &k, lease)).await {
                    Err(e) => {
                        let reason = format!("state store: {e}");
                        return fail(Failure { kind: FailureKind::StoreError, reason, retry_after: None }, history);
                    }
                    Ok(Begin::Completed { fingerprint: seen }) => {
                        if let (Some(now), Some(seen)) = (&fingerprint, &seen)
                            && now != seen
                        {
                            let reason = format!("key {k:?} was handled before with a different payload");
                            return final_failure(FailureKind::IdempotencyConflict, reason, history);
                        }
                        tracing::debug!(key = %k, "duplicate of a handled message; skipped");
                        return (Settle::Skipped, history);
                    }
                    Ok(_) => key = Some((k, fingerprint)),
                }
            }
        }
    }

    let delivery = Delivery {
        attempt: d.attempt,
        max_attempts: spec.manifest.retry.max_attempts,
        idempotency_key: key.as_ref().map(|(k, _)| k.clone()),
        stream_sequence: d.original.stream.map(|(_, seq)| seq),
    };
    ctx.metrics.call_started();
    let started = std::time::Instant::now();
    let outcome = dispatch::run(&ctx.engine, &ctx.handler, ctx.scope.clone(), d.wit, delivery).await;
    ctx.metrics.call_ended(started.elapsed());
    let result = match outcome {
        Outcome::Success(mut outputs) => {
            if let Some(reply) = &outputs.reply
                && !reply_allowed(ctx, &reply.subject)
            {
                // Dropped, not failed: the message was handled; only its answer has
                // nowhere safe to go.
                outputs.reply = None;
            }
            if outputs.is_empty() {
                Ok(())
            } else {
                annotate(&mut outputs, &spec.name, key.as_ref().map(|(k, _)| k.as_str()), d.original.headers);
                // Boxed, like the other rarer or larger steps below: every message's task
                // holds its future, and a smaller task is cheaper to spawn.
                Box::pin(ctx.sender.send(outputs)).await.map_err(|e| Failure {
                    kind: FailureKind::OutputFailed,
                    reason: e.to_string(),
                    retry_after: None,
                })
            }
        }
        Outcome::Failed(failure) => Err(failure),
    };

    if result.is_ok() && ctx.fault == Some(Fault::HaltAfterOutputs) {
        return (Settle::Halt, history);
    }
    // Order: outputs sent (and stored), then the key marked completed, then the ack.
    if let (Some((k, fingerprint)), Some(scope), Some(idem)) = (key, &ctx.scope, &spec.manifest.idempotency) {
        let bookkeeping = match &result {
            Ok(()) => Box::pin(scope.complete(&k, idem.ttl, fingerprint)).await,
            Err(_) => Box::pin(scope.release(&k)).await,
        };
        if let Err(e) = bookkeeping {
            // The lease lapses by itself; a later duplicate then runs again, and its outputs
            // carry the same ids, which a downstream stream drops.
            tracing::warn!(key = %k, "state store: {e}");
        }
    }
    match result {
        Ok(()) => (Settle::Done, None),
        Err(failure) => fail(failure, history),
    }
}

/// Extra time a lease lasts beyond the handler's timeout: sending outputs and marking the key.
pub const LEASE_GRACE: Duration = Duration::from_secs(10);

/// Takes the lease on `key`, waiting while another process holds it: a duplicate in progress
/// elsewhere is never run at the same time, and never dead-lettered for that.
async fn acquire(scope: &Scope, key: &str, lease: Duration) -> Result<Begin, StoreError> {
    loop {
        match scope.begin(key, lease).await? {
            Begin::InProgress { remaining } => {
                tracing::debug!(key, "in progress elsewhere; waiting up to {remaining:?}");
                tokio::time::sleep(remaining.clamp(Duration::from_millis(20), Duration::from_millis(500))).await;
            }
            other => return Ok(other),
        }
    }
}

/// Whether a reply (or a failure reply) may go to `subject`; counts a refusal.
pub fn reply_allowed(ctx: &Context, subject: &str) -> bool {
    let allowed = ctx.sender.reply_allowed(&ctx.handler.spec, subject);
    if !allowed {
        ctx.metrics.reply_refused();
    }
    allowed
}

/// Stamps each publication `Nats-Msg-Id = <handler>/<key>/<index>` (unless the handler set
/// one, which the host has already prefixed with `<handler>/`), so a stream downstream drops
/// a re-send after a crash or a redelivery; the handler name keeps two handlers that see the
/// same key from suppressing each other's outputs in a shared stream. Also carries the
/// message's W3C trace context (`traceparent`, `tracestate`) to every output it causes.
fn annotate(outputs: &mut Outputs, handler: &str, key: Option<&str>, incoming: Option<&HeaderMap>) {
    let trace: Vec<(&str, &async_nats::HeaderValue)> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| incoming.and_then(|h| h.get(name)).map(|v| (name, v)))
        .collect();
    for (i, out) in outputs.published.iter_mut().enumerate() {
        if let Some(key) = key
            && out.headers.get("Nats-Msg-Id").is_none()
        {
            out.headers.insert("Nats-Msg-Id", format!("{handler}/{key}/{i}"));
        }
    }
    for out in outputs.published.iter_mut().chain(outputs.reply.as_mut()) {
        for (name, value) in &trace {
            if out.headers.get(*name).is_none() {
                out.headers.insert(*name, (*value).clone());
            }
        }
    }
}

/// Counts how a delivery settled, and how long it took since its receipt.
pub fn count(ctx: &Context, settle: &Settle, received: std::time::Instant) {
    let m = &ctx.metrics;
    match settle {
        Settle::Done => m.succeeded(),
        Settle::Skipped => m.skipped(),
        Settle::Retry(_) => m.retried(),
        Settle::GiveUp(verdict) => m.dead_lettered(verdict.kind),
        Settle::Halt => {}
    }
    let outcome = match settle {
        Settle::Done => "succeeded",
        Settle::Skipped => "skipped-duplicate",
        Settle::Retry(_) => "retry",
        Settle::GiveUp(_) => "given-up",
        Settle::Halt => "halted",
    };
    tracing::Span::current().record("outcome", outcome);
    m.settled(received.elapsed());
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
        History { first_failure_at: previous.map_or(now, |h| h.first_failure_at), last_failure_at: now, last: failure }
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
    let decision = ctx.handler.spec.manifest.retry.decide(failure, attempt);
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
) -> Result<(), dlq::DeadLetterError> {
    let spec = &ctx.handler.spec;
    let Some(target) = &spec.manifest.dead_letter else {
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
