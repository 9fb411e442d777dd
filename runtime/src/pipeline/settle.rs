//! The settlement: the retry policy's decision on a failed attempt, the dead letter of a
//! message given up on, the failure history kept for the next attempt, and the counting of
//! how each delivery ended.

use std::time::SystemTime;

use super::{Entry, Lane, Settle, Step};
use crate::dlq::{self, Verdict};
use crate::failure::{Failure, FailureKind};
use crate::retry::Decision;

/// The failures of one message seen by this process.
#[derive(Debug, Clone)]
pub struct History {
    pub first_failure_at: SystemTime,
    pub last_failure_at: SystemTime,
    pub last: Failure,
    /// Deliveries that ended with the broker not taking the outputs ([`FailureKind::BrokerBusy`]):
    /// not attempts, so a transport subtracts them from its delivery count.
    pub deferrals: u32,
}

impl History {
    pub fn record(previous: Option<History>, failure: Failure) -> History {
        let now = SystemTime::now();
        let deferred = u32::from(failure.kind == FailureKind::BrokerBusy);
        let (first_failure_at, deferrals) = previous.map_or((now, 0), |h| (h.first_failure_at, h.deferrals));
        History { first_failure_at, last_failure_at: now, last: failure, deferrals: deferrals + deferred }
    }

    /// The deliveries of a message that were not attempts (see [`History::deferrals`]).
    pub fn deferred(history: Option<&History>) -> u32 {
        history.map_or(0, |h| h.deferrals)
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

/// Settles one entry whose stages ended at `step`: decides, dead-letters when giving up,
/// counts. Returns the settlement and the history to keep for the next attempt.
pub async fn settle(lane: &Lane, entry: &Entry<'_>, step: Step, history: Option<History>) -> (Settle, Option<History>) {
    let (settle, history) = match step {
        Step::Done => {
            lane.pause.recovered();
            (Settle::Done, None)
        }
        Step::Skipped => (Settle::Skipped, history),
        Step::Halt => (Settle::Halt, history),
        Step::Early(expected) => (Settle::Early(expected), history),
        Step::Exhausted(verdict) => {
            let parked = Box::pin(park(lane, &verdict, entry)).await;
            (Settle::GaveUp { verdict, parked }, None)
        }
        Step::Final(failure) => {
            lane.metrics.failed(failure.kind);
            let kind = failure.kind;
            let history = History::record(history, failure);
            tracing::warn!(kind = %kind, reason = %history.last.reason, "giving up on the message");
            let verdict = history.verdict(kind, entry.attempt);
            let parked = Box::pin(park(lane, &verdict, entry)).await;
            (Settle::GaveUp { verdict, parked }, Some(history))
        }
        // The broker did not take the outputs: wait and come back, without spending an
        // attempt (however long the broker is away: never a dead letter for that).
        Step::Failed(failure) if failure.kind == FailureKind::BrokerBusy => {
            lane.metrics.failed(failure.kind);
            let history = History::record(history, failure);
            // The handler's step, shared by its messages (logged there, once per step).
            let delay = lane.pause.refused(&history.last.reason);
            tracing::debug!(
                reason = %history.last.reason,
                retry_in = ?delay,
                "the broker did not take the outputs; back in a while (not counted as an attempt)"
            );
            (Settle::Retry(delay), Some(history))
        }
        Step::Failed(failure) => {
            lane.metrics.failed(failure.kind);
            let decision = decide(lane, &failure, entry.attempt);
            let history = History::record(history, failure);
            match decision {
                Decision::Retry(delay) => (Settle::Retry(delay), Some(history)),
                Decision::GiveUp(kind) => {
                    let verdict = history.verdict(kind, entry.attempt);
                    let parked = Box::pin(park(lane, &verdict, entry)).await;
                    (Settle::GaveUp { verdict, parked }, Some(history))
                }
            }
        }
    };
    if let Settle::GaveUp { verdict, parked: true } = &settle {
        Box::pin(park_key(lane, verdict, entry)).await;
    }
    if matches!(settle, Settle::Skipped | Settle::GaveUp { parked: true, .. }) {
        Box::pin(advance(lane, entry)).await;
    }
    count(lane, &settle, entry);
    (settle, history)
}

/// With `on_poison = "park"`: a message dead-lettered parks its ordering key, so that the
/// key's later messages follow it to the dead letters, in order, until it is released.
async fn park_key(lane: &Lane, verdict: &Verdict, entry: &Entry<'_>) {
    let (Some(parked), Some(ordering)) = (&lane.parked, &lane.handler.spec.manifest.ordering) else { return };
    // A key parked already, or held at a sequence gap (which waits for its number anyway).
    if matches!(verdict.kind, FailureKind::KeyParked | FailureKind::SequenceGap) {
        return;
    }
    let original = &entry.original;
    let Ok(key) = ordering.key.derive(original.subject, original.headers, original.payload) else { return };
    tracing::warn!(key = %key, kind = %verdict.kind, "ordering key parked: its later messages are dead-lettered until it is released");
    if let Err(e) = parked.park(&key, &verdict.reason).await {
        // Parked in this process all the same; another process (or this one after a restart)
        // does not know.
        tracing::error!(key = %key, "{e}");
    }
}

/// A resequenced message settled without a commit (a duplicate of one handled, or a dead
/// letter): its key expects the next number now. A write that fails is logged; this process
/// moves the key on all the same.
async fn advance(lane: &Lane, entry: &Entry<'_>) {
    let Some(s) = &entry.sequence else { return };
    let (Some(seq), Some(scope)) = (s.confirmed(), &lane.scope) else { return };
    if s.is_advanced() {
        return;
    }
    if let Err(e) = Box::pin(scope.sequence_put(&s.key, seq + 1)).await {
        tracing::error!(key = &*s.key, "cannot store the next sequence number {}: {e}", seq + 1);
    }
    s.advance(seq + 1);
}

/// Logs the failed attempt and decides what comes next.
fn decide(lane: &Lane, failure: &Failure, attempt: u32) -> Decision {
    let decision = lane.handler.spec.manifest.retry.decide(failure, attempt);
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
            digest = lane.handler.short_digest(),
            "giving up on the message"
        ),
    }
    decision
}

/// Dead-letters a message given up on: true when it is safely parked (or there is nowhere to
/// park it, which is logged); false when the publish failed and the message must be kept.
async fn park(lane: &Lane, verdict: &Verdict, entry: &Entry<'_>) -> bool {
    let spec = &lane.handler.spec;
    let Some(target) = &spec.manifest.dead_letter else {
        tracing::error!(
            kind = %verdict.kind,
            reason = %verdict.reason,
            "message dropped: handler {} has no [dead_letter] subject",
            spec.name
        );
        return true;
    };
    match dlq::publish(lane.sender.jetstream(), target, spec, verdict, &entry.original).await {
        Ok(()) => {
            tracing::info!(subject = %target.subject, kind = %verdict.kind, "message dead-lettered");
            true
        }
        Err(e) => {
            tracing::error!("dead-letter failed: {e}");
            false
        }
    }
}

/// Counts how a delivery settled, and how long it took since its receipt. The span gets
/// the outcome unless it is a success: what is logged after settling (the transport's ack)
/// is rare, and a field recorded into every message's span costs its formatting each time,
/// logged or not (about 2.5% of a message's CPU on the warm store row, bench/HISTORY.md
/// session 15).
fn count(lane: &Lane, settle: &Settle, entry: &Entry<'_>) {
    let m = &lane.metrics;
    let outcome = match settle {
        Settle::Done => {
            m.succeeded();
            m.settled(entry.received.elapsed());
            return;
        }
        Settle::Skipped => {
            m.skipped();
            "skipped-duplicate"
        }
        Settle::Retry(_) => {
            m.retried();
            "retry"
        }
        Settle::GaveUp { verdict, .. } => {
            m.dead_lettered(verdict.kind);
            "given-up"
        }
        Settle::Halt => "halted",
        // Not settled: back in its key's queue.
        Settle::Early(_) => {
            entry.span.record("outcome", "early");
            return;
        }
    };
    entry.span.record("outcome", outcome);
    m.settled(entry.received.elapsed());
}
