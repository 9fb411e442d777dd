//! `sluice:handler/outbox`: outputs are checked against the publish allowlist and buffered
//! in the store; the dispatcher sends them only after `handle` returns `ok`.

use async_nats::HeaderMap;

use super::HostState;
use crate::bindings::sluice::handler::outbox::Host;
use crate::outputs::Output;
use crate::subject;

impl Host for HostState {
    fn publish(
        &mut self,
        subject: String,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
    ) -> wasmtime::Result<Result<(), String>> {
        if let Err(e) = subject::validate_literal(&subject) {
            return Ok(Err(e));
        }
        if !self.spec.manifest.publish.iter().any(|p| p.matches(&subject)) {
            return Ok(Err(format!(
                "publishing to {subject:?} is not allowed: handler {} may publish to [{}] (capabilities.publish)",
                self.spec.name,
                self.spec.manifest.publish.iter().map(|p| format!("{:?}", p.as_str())).collect::<Vec<_>>().join(", ")
            )));
        }
        if let Err(e) = self.outputs.admit(&self.spec.manifest.limits, &headers, &payload, true) {
            return Ok(Err(e));
        }
        let mut headers = match header_map(headers) {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        // Scoped by handler name: otherwise a handler could pick the id another handler's
        // output will carry, and a shared stream's duplicate window would drop that output.
        if let Some(id) = headers.get(MSG_ID) {
            let scoped = format!("{}/{}", self.spec.name, id.as_str());
            headers.insert(MSG_ID, scoped.as_str());
        }
        self.outputs.published.push(Output { subject, headers, payload: payload.into() });
        Ok(Ok(()))
    }

    fn reply(&mut self, headers: Vec<(String, String)>, payload: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        let Some(subject) = self.reply_to.clone() else {
            return Ok(Err("the message has no reply subject (it was not a request)".to_owned()));
        };
        if self.outputs.reply.is_some() {
            return Ok(Err("a reply was already queued for this message".to_owned()));
        }
        if let Err(e) = self.outputs.admit(&self.spec.manifest.limits, &headers, &payload, false) {
            return Ok(Err(e));
        }
        let headers = match header_map(headers) {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        self.outputs.reply = Some(Output { subject, headers, payload: payload.into() });
        Ok(Ok(()))
    }
}

/// The JetStream dedup header; a guest's value is prefixed with the handler name.
const MSG_ID: &str = "Nats-Msg-Id";

/// Headers a guest may not set, by prefix (compared without regard to case). The `Nats-`
/// ones make a stream do something to data that is not the handler's: `Nats-Rollup` purges a
/// subject or the whole stream, `Nats-Expected-*` and `Nats-Batch-*` steer optimistic
/// concurrency and atomic batches, `Nats-TTL` and `Nats-Marker-Reason` expire or tombstone
/// messages. `Sluice-` headers are Sluice's own failure and replay record: a forged one would
/// make an ordinary output look like a dead letter to `sluice dlq`.
const REFUSED_HEADERS: [&str; 6] =
    ["Nats-Rollup", "Nats-Expected-", "Nats-TTL", "Nats-Marker-Reason", "Nats-Batch-", "Sluice-"];

/// The refused prefix `name` falls under, if any.
pub(crate) fn refused_header(name: &str) -> Option<&'static str> {
    REFUSED_HEADERS.into_iter().find(|prefix| {
        name.len() >= prefix.len()
            && name.is_char_boundary(prefix.len())
            && name[..prefix.len()].eq_ignore_ascii_case(prefix)
    })
}

/// Checks guest-supplied headers: refused ones first (see [`REFUSED_HEADERS`]), then what
/// every header must be ([`crate::outputs::header_map`]).
fn header_map(pairs: Vec<(String, String)>) -> Result<HeaderMap, String> {
    for (name, _) in &pairs {
        if let Some(prefix) = refused_header(name) {
            let what = if prefix.ends_with('-') { format!("{prefix}*") } else { prefix.to_owned() };
            return Err(format!(
                "header {name:?} is not allowed ({what} headers are reserved: they change what a stream does with \
                 existing data or dedup, or forge Sluice's own failure records)"
            ));
        }
    }
    crate::outputs::header_map(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_headers_are_refused() {
        for name in [
            "Nats-Rollup",
            "nats-rollup",
            "Nats-Expected-Last-Sequence",
            "Nats-Expected-Stream",
            "Nats-TTL",
            "Nats-Marker-Reason",
            "Nats-Batch-Id",
            "Sluice-Failure-Kind",
            "SLUICE-HANDLER",
        ] {
            let err = header_map(vec![(name.to_owned(), "x".to_owned())]).expect_err(name);
            assert!(err.contains(name), "{err}");
        }
        for name in ["Nats-Msg-Id", "traceparent", "Content-Type", "Nats", "Sluic"] {
            assert!(header_map(vec![(name.to_owned(), "x".to_owned())]).is_ok(), "{name}");
        }
    }
}
