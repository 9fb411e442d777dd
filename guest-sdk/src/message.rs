use crate::__bindings::{Delivery as WitDelivery, Message as WitMessage};

/// One message handed to the handler.
#[derive(Debug, Clone)]
pub struct Message {
    subject: String,
    reply_to: Option<String>,
    headers: Headers,
    payload: Vec<u8>,
    delivery: Delivery,
}

impl Message {
    pub(crate) fn from_wit(msg: WitMessage, delivery: WitDelivery) -> Self {
        Message {
            subject: msg.subject,
            reply_to: msg.reply_to,
            headers: Headers(msg.headers),
            payload: msg.payload,
            delivery: Delivery {
                attempt: delivery.attempt,
                max_attempts: delivery.max_attempts,
                idempotency_key: delivery.idempotency_key,
                stream_sequence: delivery.stream_sequence,
            },
        }
    }

    /// The subject the message was published to.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The reply subject, for a request.
    pub fn reply_to(&self) -> Option<&str> {
        self.reply_to.as_deref()
    }

    /// The message headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload as UTF-8 text; a payload that is not UTF-8 is rejected.
    pub fn text(&self) -> crate::Result<&str> {
        std::str::from_utf8(&self.payload).map_err(|e| crate::Error::reject(format!("payload is not UTF-8: {e}")))
    }

    /// Parses the payload as JSON. A payload that does not parse is rejected (a retry would
    /// not fix it), with serde's explanation as the reason.
    #[cfg(feature = "json")]
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> crate::Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| crate::Error::reject(format!("invalid JSON payload: {e}")))
    }

    /// Attempt number, idempotency key and stream position of this delivery.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }
}

/// What the host knows about this delivery of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery {
    /// 1 on the first attempt, 2 on the first retry, ...
    pub attempt: u32,
    /// The attempt after which the message is dead-lettered instead of retried.
    pub max_attempts: u32,
    /// The idempotency key the host derived for this message, when one is configured.
    pub idempotency_key: Option<String>,
    /// The JetStream stream sequence, for messages from a stream.
    pub stream_sequence: Option<u64>,
}

/// Message headers: a multimap from name to values, in arrival order.
///
/// Lookups match names exactly, as NATS does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Sets `name` to `value`, replacing any values it had.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        self.0.retain(|(n, _)| *n != name);
        self.0.push((name, value.into()));
    }

    /// Adds a value for `name`, keeping the ones it had.
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }

    /// All `(name, value)` pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The number of `(name, value)` pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn to_wit(&self) -> Vec<(String, String)> {
        self.0.clone()
    }
}

impl<N: Into<String>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        Headers(iter.into_iter().map(|(n, v)| (n.into(), v.into())).collect())
    }
}
