//! `sluice:handler/outbox`: outputs are checked against the publish allowlist and buffered
//! in the store; the dispatcher sends them only after `handle` returns `ok`.

use std::str::FromStr;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

use super::HostState;
use crate::bindings::sluice::handler::outbox::Host;
use crate::subject;

/// One buffered message, already in the form the NATS client sends.
#[derive(Debug, Clone)]
pub struct Output {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// What one call asked to send, in order.
#[derive(Debug, Default)]
pub struct Outputs {
    pub published: Vec<Output>,
    pub reply: Option<Output>,
    /// Bytes queued so far (payloads and headers).
    pub bytes: u64,
    /// Set when the call went past `max_outputs` or `max_output_bytes`: the call fails with
    /// `output-limit` whatever it returns.
    pub over_limit: Option<String>,
}

impl Outputs {
    /// Nothing to send.
    pub fn is_empty(&self) -> bool {
        self.published.is_empty() && self.reply.is_none()
    }

    /// Accounts for one more output, or says which limit it breaks.
    fn admit(
        &mut self,
        limits: &crate::manifest::Limits,
        headers: &[(String, String)],
        payload: &[u8],
        counts: bool,
    ) -> Result<(), String> {
        let size = payload.len() as u64 + headers.iter().map(|(n, v)| (n.len() + v.len() + 4) as u64).sum::<u64>();
        let error = if counts && self.published.len() as u64 >= u64::from(limits.max_outputs) {
            Some(format!("more than {} outputs (limits.max_outputs)", limits.max_outputs))
        } else if self.bytes + size > limits.max_output_bytes {
            Some(format!("outputs over {} bytes (limits.max_output_bytes)", limits.max_output_bytes))
        } else {
            None
        };
        if let Some(e) = error {
            self.over_limit.get_or_insert_with(|| e.clone());
            return Err(e);
        }
        self.bytes += size;
        Ok(())
    }
}

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
        if !self.spec.publish.iter().any(|p| p.matches(&subject)) {
            return Ok(Err(format!(
                "publishing to {subject:?} is not allowed: handler {} may publish to [{}] (capabilities.publish)",
                self.spec.name,
                self.spec.publish.iter().map(|p| format!("{:?}", p.as_str())).collect::<Vec<_>>().join(", ")
            )));
        }
        if let Err(e) = self.outputs.admit(&self.spec.limits, &headers, &payload, true) {
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
        if let Err(e) = self.outputs.admit(&self.spec.limits, &headers, &payload, false) {
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
fn refused_header(name: &str) -> Option<&'static str> {
    REFUSED_HEADERS.into_iter().find(|prefix| {
        name.len() >= prefix.len()
            && name.is_char_boundary(prefix.len())
            && name[..prefix.len()].eq_ignore_ascii_case(prefix)
    })
}

/// Checks guest-supplied headers (the NATS client would panic on a bad name, a value with CR
/// or LF would corrupt the protocol stream, and some headers are refused; see
/// [`REFUSED_HEADERS`]).
fn header_map(pairs: Vec<(String, String)>) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        if name.is_empty() {
            return Err("empty header name".to_owned());
        }
        if let Some(prefix) = refused_header(&name) {
            let what = if prefix.ends_with('-') { format!("{prefix}*") } else { prefix.to_owned() };
            return Err(format!(
                "header {name:?} is not allowed ({what} headers are reserved: they change what a stream does with \
                 existing data or dedup, or forge Sluice's own failure records)"
            ));
        }
        let name = HeaderName::from_str(&name)
            .map_err(|_| format!("invalid header name {name:?}: expected printable ASCII without ':' or spaces"))?;
        let value = HeaderValue::from_str(&value)
            .map_err(|_| format!("invalid value for header {name}: CR and LF are not allowed"))?;
        map.append(name, value);
    }
    Ok(map)
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
