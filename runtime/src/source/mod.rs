//! Where messages come from: core NATS subscriptions in a queue group (JetStream consumers
//! join here). Each source turns a delivery into a [`dispatch`](crate::dispatch) call and
//! the outcome into NATS actions.

pub mod core;

use async_nats::HeaderMap;

use crate::bindings::Message;

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
