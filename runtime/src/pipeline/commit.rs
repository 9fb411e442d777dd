//! The commit: what a call's outcome leaves behind. A successful call's reply is checked
//! against the reply rules, its publications are stamped (`Nats-Msg-Id`, trace context) and
//! sent, each awaiting its stream's ack; then the call's kv writes and the key's completion
//! record are committed in one write, and then (with a store) the reply is sent (after a failure
//! nothing is committed and the lease is given up so that a retry can take it at once).
//!
//! Order: outputs stored, then the commit, then (the transport) the ack. A crash between any
//! two leaves a redelivery that runs the handler again: nothing of its state was kept, and
//! its outputs carry the same ids, which a stream downstream drops.

use async_nats::HeaderMap;

use super::gate::Admitted;
use super::{Entry, Fault, Lane, Step};
use crate::dispatch::Outcome;
use crate::failure::{Failure, FailureKind};
use crate::outputs::Outputs;
use crate::store::WriteSet;

/// Commits the outcome of one call.
pub async fn commit(lane: &Lane, entry: &Entry<'_>, admitted: Admitted, outcome: Outcome) -> Step {
    let spec = &lane.handler.spec;
    let key = admitted.key;
    let (result, writes, reply) = match outcome {
        Outcome::Success(mut outputs, writes) => {
            if let Some(reply) = &outputs.reply
                && !lane.reply_allowed(&reply.subject)
            {
                // Dropped, not failed: the message was handled; only its answer has
                // nowhere safe to go.
                outputs.reply = None;
            }
            annotate(&mut outputs, &spec.name, key.as_ref().map(|(k, _)| k.as_str()), entry.original.headers);
            // With a store, the reply waits for the commit: a requester that asks again at
            // once must see what this call wrote.
            let reply = if lane.scope.is_some() { outputs.reply.take() } else { None };
            let sent = if outputs.is_empty() {
                Ok(())
            } else {
                Box::pin(lane.sender.send(outputs)).await.map_err(|e| Failure {
                    kind: FailureKind::OutputFailed,
                    reason: e.to_string(),
                    retry_after: None,
                })
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
    match result {
        // One write: the guest's kv writes and marks, and the key's completion record.
        Ok(()) => match Box::pin(scope.commit(writes, completion)).await {
            Ok(()) => {
                if let Some(reply) = reply {
                    let reply = Outputs { reply: Some(reply), ..Outputs::default() };
                    if let Err(e) = Box::pin(lane.sender.send(reply)).await {
                        // Handled and committed: a retry would be skipped (or, without a key,
                        // run again for an answer nobody may wait for any more).
                        tracing::warn!("cannot send the reply: {e}");
                    }
                }
                Step::Done
            }
            // Nothing of the call's state was kept (on nats-kv: nothing after the failed
            // write), and the key is not marked: the retry runs the handler again, and its
            // outputs carry the same ids as those just sent. The lease goes, so that the retry
            // need not wait for it to lapse.
            Err(e) => {
                if let Some((k, _)) = &key
                    && let Err(e) = Box::pin(scope.release(k)).await
                {
                    tracing::warn!(key = %k, "state store: {e}");
                }
                Step::Failed(Failure {
                    kind: FailureKind::StoreError,
                    reason: format!("state store: {e}"),
                    retry_after: None,
                })
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
