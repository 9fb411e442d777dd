//! The gate: whether a message is called at all. It checks the payload against
//! `limits.max_payload`, stops a delivery past the retry budget (its dead letter could not
//! be stored before), derives the idempotency key and takes its lease, or finds the key
//! handled already.

use std::time::Duration;

use super::{Entry, LEASE_GRACE, Lane, Step};
use crate::dlq::Verdict;
use crate::failure::{Failure, FailureKind};
use crate::idempotency::{self, OnMissing};
use crate::ordering::Check;
use crate::store::Begin;

/// What the gate decided.
#[derive(Debug)]
pub enum Gate {
    /// Call the handler.
    Run(Admitted),
    /// Do not; settle with this step.
    Stop(Step),
    /// Another delivery of the same key holds its lease (in this batch, or in another
    /// process); it lapses within this long. Try again later ([`admit_waiting`]): never at
    /// the same time, never dead-lettered for that.
    Busy(Duration),
    /// A resequenced message ahead of its key: the key expects this (lower) number first.
    Early(u64),
}

/// A message let through, with its idempotency key and payload fingerprint when it has one
/// (and then this process holds the key's lease).
#[derive(Debug, Default)]
pub struct Admitted {
    pub key: Option<(String, Option<String>)>,
}

fn final_failure(kind: FailureKind, reason: String) -> Gate {
    Gate::Stop(Step::Final(Failure { kind, reason, retry_after: None }))
}

/// The resequencer's part of the gate: a message whose number its key has passed is
/// skipped, one ahead of it waits, the one expected goes on (and is confirmed, so that its
/// settlement moves the key on). `None`: go on.
async fn sequence(lane: &Lane, entry: &Entry<'_>) -> Option<Gate> {
    let sequenced = entry.sequence.as_ref()?;
    let r = lane.handler.spec.manifest.ordering.as_ref()?.sequence.as_ref()?;
    let key = &*sequenced.key;
    let seq = match &sequenced.seq {
        Ok(seq) => *seq,
        Err(why) => return Some(final_failure(FailureKind::MissingSequence, format!("no sequence number: {why}"))),
    };
    let known = match sequenced.check {
        Check::Passed => {
            lane.metrics.ordering().skipped.increment(1);
            tracing::debug!(key, seq, "sequence number already passed; skipped");
            return Some(Gate::Stop(Step::Skipped));
        }
        Check::Gap(expected) => {
            let expected = expected.map_or_else(|| "an earlier number".to_owned(), |n| n.to_string());
            let reason = format!(
                "ordering key {key:?} waited {:?} for sequence number {expected}, which did not come; this is {seq}",
                r.max_wait
            );
            return Some(final_failure(FailureKind::SequenceGap, reason));
        }
        Check::Turn(known) => known,
        Check::Proceed => None,
    };
    let scope = lane.scope.as_ref()?;
    let stored = match Box::pin(scope.sequence_next(key)).await {
        Ok(stored) => stored,
        Err(e) => return Some(Gate::Stop(Step::Failed(super::store_failure(lane, &e)))),
    };
    let expected = stored.unwrap_or(r.start).max(known.unwrap_or(0));
    match seq.cmp(&expected) {
        std::cmp::Ordering::Less => {
            lane.metrics.ordering().skipped.increment(1);
            tracing::debug!(key, seq, expected, "sequence number already passed; skipped");
            Some(Gate::Stop(Step::Skipped))
        }
        std::cmp::Ordering::Greater if sequenced.check != Check::Proceed => {
            tracing::debug!(key, seq, expected, "ahead of its key; waits for the number expected");
            Some(Gate::Early(expected))
        }
        _ => {
            sequenced.confirm(seq);
            None
        }
    }
}

/// The gate for one entry.
pub async fn admit(lane: &Lane, entry: &Entry<'_>) -> Gate {
    admit_reading(lane, entry, false).await
}

/// The gate, `after_wait` for an entry whose key was busy in this process (see
/// [`Scope::begin_after_wait`](crate::store::Scope::begin_after_wait)).
async fn admit_reading(lane: &Lane, entry: &Entry<'_>, after_wait: bool) -> Gate {
    let spec = &lane.handler.spec;
    let manifest = &spec.manifest;
    if let Some(gate) = Box::pin(sequence(lane, entry)).await {
        return gate;
    }
    if entry.attempt > manifest.retry.max_attempts {
        // Already given up on: an earlier dead-letter publish failed, or the process died
        // between publishing the dead letter and settling. The dead letter's id makes a
        // second publish harmless.
        let attempts = entry.attempt - 1;
        let verdict = match &entry.history {
            Some(h) => h.verdict(FailureKind::RetriesExhausted, attempts),
            None => Verdict {
                kind: FailureKind::RetriesExhausted,
                last_kind: None,
                reason: format!(
                    "delivered {} times; the last failure was seen before a restart or by another process",
                    entry.attempt
                ),
                attempts,
                first_failure_at: std::time::SystemTime::now(),
                last_failure_at: std::time::SystemTime::now(),
            },
        };
        return Gate::Stop(Step::Exhausted(verdict));
    }
    let original = &entry.original;
    if let Some(max) = manifest.limits.max_payload
        && original.payload.len() as u64 > max
    {
        let reason = format!("payload of {} bytes is over limits.max_payload ({max} bytes)", original.payload.len());
        return final_failure(FailureKind::PayloadTooLarge, reason);
    }
    if let Some(ordering) = &manifest.ordering
        && (ordering.on_missing == OnMissing::DeadLetter || lane.parked.is_some())
    {
        match ordering.key.derive(original.subject, original.headers, original.payload) {
            // The transport found no ordering key and ran the message unordered; the manifest
            // may say to dead-letter such instead.
            Err(why) if ordering.on_missing == OnMissing::DeadLetter => {
                return final_failure(FailureKind::MissingOrderingKey, format!("no ordering key: {why}"));
            }
            Ok(key) if lane.parked.as_ref().is_some_and(|p| p.contains(&key)) => {
                let reason = format!(
                    "ordering key {key:?} is parked: an earlier message of it was dead-lettered; release it with `sluice ordering release {} KEY`",
                    spec.name
                );
                return final_failure(FailureKind::KeyParked, reason);
            }
            _ => {}
        }
    }
    let (Some(idem), Some(scope)) = (&manifest.idempotency, &lane.scope) else {
        return Gate::Run(Admitted::default());
    };
    let k = match idem.key.derive(original.subject, original.headers, original.payload) {
        Ok(k) => k,
        Err(why) if idem.on_missing == OnMissing::DeadLetter => {
            return final_failure(FailureKind::MissingIdempotencyKey, format!("no idempotency key: {why}"));
        }
        Err(why) => {
            tracing::debug!("processing without dedup: {why}");
            return Gate::Run(Admitted::default());
        }
    };
    let fingerprint = idem.fingerprint.then(|| idempotency::fingerprint(original.payload));
    let lease = manifest.limits.timeout + LEASE_GRACE;
    let begun = match after_wait {
        true => Box::pin(scope.begin_after_wait(&k, lease)).await,
        false => Box::pin(scope.begin(&k, lease)).await,
    };
    match begun {
        Err(e) => Gate::Stop(Step::Failed(super::store_failure(lane, &e))),
        Ok(Begin::Completed { fingerprint: seen }) => {
            if let (Some(now), Some(seen)) = (&fingerprint, &seen)
                && now != seen
            {
                let reason = format!("key {k:?} was handled before with a different payload");
                return final_failure(FailureKind::IdempotencyConflict, reason);
            }
            tracing::debug!(key = %k, "duplicate of a handled message; skipped");
            Gate::Stop(Step::Skipped)
        }
        Ok(Begin::InProgress { remaining }) => {
            tracing::debug!(key = %k, "in progress elsewhere; waiting up to {remaining:?}");
            Gate::Busy(remaining)
        }
        Ok(Begin::Acquired) => Gate::Run(Admitted { key: Some((k, fingerprint)) }),
    }
}

/// The gate for an entry whose key was busy: tries again, waiting a little between tries,
/// until the lease is ours (`Ok`) or the message is stopped (the key found handled, say).
pub async fn admit_waiting(lane: &Lane, entry: &Entry<'_>, mut remaining: Duration) -> Result<Admitted, Step> {
    loop {
        tokio::time::sleep(remaining.clamp(Duration::from_millis(20), Duration::from_millis(500))).await;
        match admit_reading(lane, entry, true).await {
            Gate::Busy(r) => remaining = r,
            Gate::Run(admitted) => return Ok(admitted),
            Gate::Stop(step) => return Err(step),
            Gate::Early(expected) => return Err(Step::Early(expected)),
        }
    }
}
