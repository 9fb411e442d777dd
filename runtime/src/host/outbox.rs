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
        let headers = match header_map(headers) {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
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

/// Checks guest-supplied headers (the NATS client would panic on a bad name, and a value
/// with CR or LF would corrupt the protocol stream).
fn header_map(pairs: Vec<(String, String)>) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        if name.is_empty() {
            return Err("empty header name".to_owned());
        }
        let name = HeaderName::from_str(&name)
            .map_err(|_| format!("invalid header name {name:?}: expected printable ASCII without ':' or spaces"))?;
        let value = HeaderValue::from_str(&value)
            .map_err(|_| format!("invalid value for header {name}: CR and LF are not allowed"))?;
        map.append(name, value);
    }
    Ok(map)
}
