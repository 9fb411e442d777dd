//! The commit: what a call's outcome leaves behind. A successful call's reply is checked
//! against the reply rules, its publications are stamped (`Nats-Msg-Id`, trace context) and
//! sent, each awaiting its stream's ack; then the idempotency record is marked completed (or,
//! after a failure, the lease is given up so that a retry can take it at once).
//!
//! Order: outputs stored, then the key completed, then (the transport) the ack. A crash
//! between any two leaves a redelivery whose outputs carry the same ids, which a stream
//! downstream drops.

use async_nats::HeaderMap;

use super::gate::Admitted;
use super::{Entry, Fault, Lane, Step};
use crate::dispatch::Outcome;
use crate::failure::{Failure, FailureKind};
use crate::outputs::Outputs;

/// Commits the outcome of one call.
pub async fn commit(lane: &Lane, entry: &Entry<'_>, admitted: Admitted, outcome: Outcome) -> Step {
    let spec = &lane.handler.spec;
    let key = admitted.key;
    let result = match outcome {
        Outcome::Success(mut outputs) => {
            if let Some(reply) = &outputs.reply
                && !lane.reply_allowed(&reply.subject)
            {
                // Dropped, not failed: the message was handled; only its answer has
                // nowhere safe to go.
                outputs.reply = None;
            }
            if outputs.is_empty() {
                Ok(())
            } else {
                annotate(&mut outputs, &spec.name, key.as_ref().map(|(k, _)| k.as_str()), entry.original.headers);
                Box::pin(lane.sender.send(outputs)).await.map_err(|e| Failure {
                    kind: FailureKind::OutputFailed,
                    reason: e.to_string(),
                    retry_after: None,
                })
            }
        }
        Outcome::Failed(failure) => Err(failure),
    };

    if result.is_ok() && lane.fault == Some(Fault::HaltAfterOutputs) {
        return Step::Halt;
    }
    if let (Some((k, fingerprint)), Some(scope), Some(idem)) = (key, &lane.scope, &spec.manifest.idempotency) {
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
        Ok(()) => Step::Done,
        Err(failure) => Step::Failed(failure),
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
