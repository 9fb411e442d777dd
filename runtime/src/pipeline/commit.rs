//! The commit: what a call's outcome leaves behind.
//!
//! With a state store (`memory`, `redb`, `nats-kv`: the handler has a [`Relay`]), a
//! successful call's publications are stamped (`Nats-Msg-Id`, trace context) and written, as
//! outbox entries, in the same commit as its kv writes and its key's completion record: one
//! atomic write (on `nats-kv` one publish or one atomic batch, fenced by the key's lease, or,
//! for a handler whose every effect is in its commit, creating the key's record: a duplicate
//! that committed first, in another process, makes it keep nothing, and the message is settled
//! as a skipped duplicate).
//! Then the relay is handed the entries (and the reply, which goes after them; a call that
//! published nothing replies at once) and the transport acks the source message. Nothing
//! leaves the process before the commit, so a crash before it leaves a redelivery that runs
//! the handler again with a clean slate; a crash after it leaves the entries in the outbox,
//! which the relay sends on start (on `nats-kv`, or another process's relay adopts), and a
//! completed key, which skips the redelivery.
//!
//! Without a store (no `[idempotency]`, no guest state) the publications are sent first, each
//! awaiting its stream's ack, then the message is acked; a crash between the two runs the
//! handler again, and (with its own `Nats-Msg-Id`s) a stream downstream drops the copies.
//!
//! After a failure nothing is committed and the lease is given up so that a retry can take it
//! at once.
//!
//! [`Relay`]: crate::relay::Relay

use async_nats::HeaderMap;

use super::gate::Admitted;
use super::{Entry, Fault, Lane, Step};
use crate::dispatch::Outcome;
use crate::failure::{Failure, FailureKind};
use crate::outputs::{Output, Outputs};
use crate::store::WriteSet;

/// Publications committed to the outbox, for the relay once the commit is durable.
struct Deferred {
    seqs: Vec<String>,
    published: Vec<Output>,
}

/// Commits the outcome of one call.
pub async fn commit(lane: &Lane, entry: &Entry<'_>, admitted: Admitted, outcome: Outcome) -> Step {
    let spec = &lane.handler.spec;
    let key = admitted.key;
    let mut outbox = Vec::new();
    let mut deferred = None;
    let (result, writes, reply) = match outcome {
        Outcome::Success(mut outputs, writes) => 'success: {
            if let Some(reply) = &outputs.reply
                && !lane.reply_allowed(&reply.subject)
            {
                // Dropped, not failed: the message was handled; only its answer has
                // nowhere safe to go.
                outputs.reply = None;
            }
            annotate(&mut outputs, &spec.name, key.as_ref().map(|(k, _)| k.as_str()), entry.original.headers);
            if let Some(failure) = too_large(lane, &outputs) {
                break 'success (Err(failure), WriteSet::default(), None);
            }
            // With a store, the reply waits for the commit: a requester that asks again at
            // once must see what this call wrote.
            let reply = if lane.scope.is_some() { outputs.reply.take() } else { None };
            let sent = match &lane.relay {
                Some(relay) => {
                    let (seqs, ops) = relay.stamp(&mut outputs.published);
                    outbox = ops;
                    deferred = Some(Deferred { seqs, published: std::mem::take(&mut outputs.published) });
                    Ok(())
                }
                None if outputs.is_empty() => Ok(()),
                // Without an outbox the outputs go before the ack: when the broker does not take
                // them now, the message waits and comes back (not an attempt of the handler's).
                None => Box::pin(lane.sender.send(outputs)).await.map_err(|e| Failure {
                    kind: if e.is_permanent() { FailureKind::OutputFailed } else { FailureKind::BrokerBusy },
                    reason: e.to_string(),
                    retry_after: None,
                }),
            };
            (sent, writes, reply)
        }
        Outcome::Failed(failure) => (Err(failure), WriteSet::default(), None),
    };

    if result.is_ok() && lane.fault == Some(Fault::HaltAfterOutputs) {
        return Step::Halt;
    }
    let Some(scope) = &lane.scope else {
        return match result {
            Ok(()) => Step::Done,
            Err(failure) => Step::Failed(failure),
        };
    };
    let completion = match (&key, &spec.manifest.idempotency) {
        (Some((k, fingerprint)), Some(idem)) => Some((k.as_str(), idem.ttl, fingerprint.clone())),
        _ => None,
    };
    // A resequenced message moves its key on in the same write.
    let sequenced = entry.sequence.as_ref().and_then(|s| Some((s, s.confirmed()?)));
    if let Some((s, seq)) = sequenced {
        outbox.push(crate::store::Scope::sequence_op(&s.key, seq + 1));
    }
    match result {
        // One write: the guest's kv writes and marks, the outbox entries, the key's
        // completion record (and its next sequence number).
        Ok(()) => match Box::pin(scope.commit(writes, outbox, completion)).await {
            Ok(()) => {
                if let Some((s, seq)) = sequenced {
                    s.advance(seq + 1);
                }
                match lane.fault {
                    Some(Fault::HaltAfterCommit) => return Step::Halt,
                    // Acked, but the relay never heard of the entries: they wait in the store.
                    Some(Fault::HaltAfterAck) => return Step::Done,
                    _ => {}
                }
                match (deferred, &lane.relay) {
                    (Some(d), Some(relay)) if !d.published.is_empty() => relay.push(d.seqs, d.published, reply),
                    _ => {
                        if let Some(reply) = reply {
                            let reply = Outputs { reply: Some(reply), ..Outputs::default() };
                            if let Err(e) = Box::pin(lane.sender.send(reply)).await {
                                // Handled and committed: a retry would be skipped (or, without
                                // a key, run again for an answer nobody may wait for any more).
                                tracing::warn!("cannot send the reply: {e}");
                            }
                        }
                    }
                }
                Step::Done
            }
            // Nothing of the call's state was kept, and the key is not marked: the retry runs the handler again, and its
            // outputs carry the same ids as any sent. The lease goes, so that the retry need
            // not wait for it to lapse.
            Err(e) => {
                if let (Some(d), Some(relay)) = (&deferred, &lane.relay) {
                    relay.release(d.seqs.len());
                }
                // An optimistic commit (nats-kv) found the key handled by a duplicate: this
                // call's effects go with it, as a duplicate found at the gate would have.
                if let crate::store::StoreError::Handled { fingerprint: seen } = &e {
                    let now = key.as_ref().and_then(|(_, f)| f.as_ref());
                    if let (Some(now), Some(seen), Some((k, _))) = (now, seen, &key)
                        && now != seen
                    {
                        let reason = format!("key {k:?} was handled before with a different payload");
                        return Step::Final(Failure {
                            kind: FailureKind::IdempotencyConflict,
                            reason,
                            retry_after: None,
                        });
                    }
                    tracing::debug!("duplicate of a message handled meanwhile; its effects are dropped");
                    return Step::Skipped;
                }
                if let Some((k, _)) = &key
                    && let Err(e) = Box::pin(scope.release(k)).await
                {
                    tracing::warn!(key = %k, "state store: {e}");
                }
                Step::Failed(super::store_failure(lane, &e))
            }
        },
        Err(failure) => {
            if let Some((k, _)) = &key
                && let Err(e) = Box::pin(scope.release(k)).await
            {
                // The lease lapses by itself.
                tracing::warn!(key = %k, "state store: {e}");
            }
            Step::Failed(failure)
        }
    }
}

/// An output larger than the NATS server takes (`max_payload`, headers included) can never be
/// sent: the call fails with `output-limit` (not retried by default) before anything of it is
/// committed or queued, instead of holding the outbox.
fn too_large(lane: &Lane, outputs: &Outputs) -> Option<Failure> {
    if outputs.is_empty() {
        return None;
    }
    let max = lane.sender.max_payload();
    if max == 0 {
        return None;
    }
    let size = |o: &Output| {
        let headers: usize = o
            .headers
            .iter()
            .map(|(n, vs)| vs.iter().map(|v| AsRef::<str>::as_ref(n).len() + v.as_str().len() + 4).sum::<usize>())
            .sum();
        o.payload.len() + if headers > 0 { headers + 14 } else { 0 }
    };
    let big = outputs.published.iter().chain(&outputs.reply).find(|o| size(o) > max)?;
    Some(Failure {
        kind: FailureKind::OutputLimit,
        reason: format!(
            "the output to {} is {} bytes, more than the NATS server's max_payload ({max} bytes)",
            big.subject,
            size(big)
        ),
        retry_after: None,
    })
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
