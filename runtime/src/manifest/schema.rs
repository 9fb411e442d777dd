//! The manifest as written: serde structs with `deny_unknown_fields`. Each field's doc shows
//! the TOML it parses. Values that can be checked on their own (names, subjects, durations,
//! sizes) are checked here, so their errors point at the value; checks that need more than
//! one value live in `manifest::mod`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;

use super::units::{ByteSize, HumanDuration};
use crate::subject::SubjectPattern;

/// A whole manifest file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    /// `[handler]`: what runs.
    pub handler: HandlerSection,
    /// `[source]`: where its messages come from.
    pub source: Spanned<SourceSection>,
    /// `[limits]`: what one call may use.
    #[serde(default)]
    pub limits: LimitsSection,
    /// `[capabilities]`: what the handler may reach.
    #[serde(default)]
    pub capabilities: CapabilitiesSection,
    /// `[retry]`: how failed attempts are retried.
    #[serde(default)]
    pub retry: RetrySection,
    /// `[dead_letter]`: where messages that cannot succeed are parked.
    pub dead_letter: Option<DeadLetterSection>,
    /// `[idempotency]`: how duplicates are recognised and skipped.
    pub idempotency: Option<IdempotencySection>,
    /// `[store]`: where dedup records and the guest's dedup marks and kv live.
    #[serde(default)]
    pub store: StoreSection,
    /// `[ordering]`: messages with the same key handled one at a time, in order.
    pub ordering: Option<OrderingSection>,
    /// `[config]`: values the handler reads with `config.get`.
    #[serde(default)]
    pub config: BTreeMap<String, ConfigValue>,
    /// `[http]`: what one call's outgoing HTTP requests may use (with `[capabilities] http`).
    pub http: Option<Spanned<HttpSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSection {
    /// `name = "orders-validate"`: unique across the runtime; letters, digits, `-` and `_`.
    pub name: Spanned<HandlerName>,
    /// `component = "../plugins/dist/order-validator.wasm"`: relative to the manifest's folder.
    pub component: Spanned<String>,
}

/// Either core NATS (`subject`, `queue`) or JetStream (`stream`, `consumer`, `filter`,
/// `ack_wait`); which keys go together is checked in `manifest::mod`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// `subject = "orders.created"`: core NATS subject (wildcards allowed).
    pub subject: Option<Spanned<SubjectPattern>>,
    /// `queue = "orders-validate"`: core NATS queue group shared by every Sluice process
    /// running this handler; defaults to the handler name.
    pub queue: Option<Spanned<QueueName>>,
    /// `stream = "ORDERS"`: a JetStream stream, read through a durable pull consumer.
    pub stream: Option<Spanned<StreamName>>,
    /// `consumer = "orders-validate"`: the durable consumer's name; defaults to the handler
    /// name. Every Sluice process bound to it shares its messages.
    pub consumer: Option<Spanned<StreamName>>,
    /// `filter = "orders.created"` or `filter = ["orders.created", "orders.updated"]`: the
    /// consumer's filter subjects; defaults to the whole stream.
    pub filter: Option<Spanned<OneOrMany>>,
    /// `ack_wait = "30s"`: how long JetStream waits for an ack before redelivering; defaults
    /// to twice the timeout plus one second.
    pub ack_wait: Option<Spanned<HumanDuration>>,
    /// `max_ack_pending = 1000`: messages the consumer may have unacknowledged across all
    /// processes (in flight or waiting for a retry); defaults to the larger of 1000 and four
    /// times `limits.max_concurrency`.
    pub max_ack_pending: Option<Spanned<i64>>,
    /// `clusters = ["primary", "secondary"]`: active receiving, the same stream and consumer
    /// read from both clusters (`sluice run --nats-secondary`); defaults to the primary only.
    pub clusters: Option<Spanned<Vec<String>>>,
    /// `backlog = "ORDERS"`: a stream on the secondary cluster whose messages the syphon moves
    /// into the primary (same subjects, same `Nats-Msg-Id`) once the primary takes them.
    pub backlog: Option<Spanned<StreamName>>,
}

/// A stream or consumer name: letters, digits, `-` and `_`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamName(pub String);

impl<'de> Deserialize<'de> for StreamName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        let valid = !name.is_empty()
            && name.len() <= 255
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(de::Error::custom(format!("invalid name {name:?}; expected letters, digits, '-' or '_'")));
        }
        Ok(StreamName(name))
    }
}

/// A string or an array of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a subject or an array of subjects")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut all = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    all.push(s);
                }
                Ok(OneOrMany(all))
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySection {
    /// `max_attempts = 5`: attempts in all, the first included (1 to 1000); 1 never retries.
    pub max_attempts: Option<Spanned<i64>>,
    /// `backoff = "exponential"`: `constant` or `exponential`.
    pub backoff: Option<crate::retry::Backoff>,
    /// `initial = "100ms"`: the first delay.
    pub initial: Option<HumanDuration>,
    /// `max = "30s"`: no delay is longer (a handler's retry-after hint included).
    pub max: Option<Spanned<HumanDuration>>,
    /// `multiplier = 2.0`: exponential growth per attempt (at least 1).
    pub multiplier: Option<Spanned<f64>>,
    /// `jitter = "full"`: `full`, `equal` or `none`.
    pub jitter: Option<crate::retry::Jitter>,
    /// `retry_on = ["retry-requested", "trap", "timeout"]`: failure kinds worth retrying.
    pub retry_on: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSection {
    /// `subject = "dlq.orders"`: where dead letters are published (a literal subject). The
    /// publish must be acknowledged by a stream, or the source message is not let go.
    pub subject: Spanned<SubjectPattern>,
    /// `stream = "DLQ"`: the stream that stores them, for `create_stream` and `sluice dlq`.
    pub stream: Option<StreamName>,
    /// `create_stream = true`: create `stream`, capturing `subject`, when it is missing.
    pub create_stream: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// `memory = "64MiB"`: linear memory one instance may grow to.
    pub memory: Option<Spanned<ByteSize>>,
    /// `timeout = "2s"`: wall-clock time one call may take.
    pub timeout: Option<HumanDuration>,
    /// `max_concurrency = 64`: messages of this handler processed at once.
    pub max_concurrency: Option<Concurrency>,
    /// `max_outputs = 100`: publications one call may queue.
    pub max_outputs: Option<Spanned<i64>>,
    /// `max_output_bytes = "1MiB"`: total size (payloads and headers) of one call's outputs.
    pub max_output_bytes: Option<ByteSize>,
    /// `max_payload = "1MiB"`: the largest incoming payload handed to the handler.
    pub max_payload: Option<ByteSize>,
    /// `max_log_bytes = "64KiB"`: log and stdout/stderr bytes one call may write; the rest
    /// is dropped (and counted in a warning).
    pub max_log_bytes: Option<ByteSize>,
    /// `instances = "fresh"` (a new instance per message, the default) or `"warm"` (an
    /// instance serves many messages in sequence; see `recycle_after`).
    pub instances: Option<InstanceMode>,
    /// `recycle_after = 10000`: messages a warm instance serves before it is replaced.
    pub recycle_after: Option<Spanned<i64>>,
    /// `rate = "500/s"`: messages started per second (or `/m`, `/h`) at most, on average.
    pub rate: Option<Spanned<String>>,
    /// `burst = 50`: with `rate`, messages started at once at most after a pause.
    pub burst: Option<Spanned<i64>>,
}

/// `[limits] instances`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceMode {
    /// A fresh instance for every message: nothing survives between messages.
    Fresh,
    /// Instances kept between messages: a handler's globals survive from one message to the
    /// next (and between messages of different senders).
    Warm,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilitiesSection {
    /// `publish = ["orders.validated", "audit.>"]`: subjects `outbox.publish` may reach.
    /// Checked after parsing, so that an error points at the element, not the array.
    #[serde(default)]
    pub publish: Vec<Spanned<String>>,
    /// `reply_to = ["replies.>"]`: reply subjects accepted besides the reply inboxes
    /// (`_INBOX.>` and the connection's inbox prefix). A reply to anything else is dropped,
    /// so that a forged reply subject cannot make Sluice publish where the requester may not.
    #[serde(default)]
    pub reply_to: Vec<Spanned<String>>,
    /// `allow_system_subjects = true`: lets `publish` and `reply_to` name a `$`-namespace
    /// (`$KV.prices.>`) explicitly; wildcards never reach one either way.
    #[serde(default)]
    pub allow_system_subjects: bool,
    /// `allow_publish_to_source = true`: lets a `publish` grant cover the handler's own source
    /// subject, for a handler that re-queues messages on purpose.
    #[serde(default)]
    pub allow_publish_to_source: bool,
    /// `http = ["https://api.example.com", "http://127.0.0.1:8080/hooks/*"]`: destinations of
    /// the handler's `wasi:http` requests (scheme, host, optional port and path prefix; see
    /// `manifest::http`). Empty: no outbound HTTP.
    #[serde(default)]
    pub http: Vec<Spanned<String>>,
    /// `http_ca = "internal-ca.pem"`: PEM certificates trusted for `https` besides the
    /// system's roots; relative to the manifest's folder.
    pub http_ca: Option<Spanned<String>>,
    /// `http_private = true`: lets named `http` grants resolve to private addresses (10/8,
    /// 172.16/12, 192.168/16, 100.64/10, fc00::/7); loopback and link-local need an IP grant.
    pub http_private: Option<Spanned<bool>>,
}

/// `[http]`: limits of one call's outgoing HTTP requests.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// `max_requests = 16`: requests one call may make (redirect hops count).
    pub max_requests: Option<Spanned<i64>>,
    /// `max_request_bytes = "1MiB"`: body bytes of one request.
    pub max_request_bytes: Option<ByteSize>,
    /// `max_response_bytes = "4MiB"`: body bytes of one response.
    pub max_response_bytes: Option<ByteSize>,
    /// `connect_timeout = "2s"`: TCP connect and TLS handshake.
    pub connect_timeout: Option<HumanDuration>,
    /// `timeout = "10s"`: one request, connect to last response byte; at most `limits.timeout`.
    pub timeout: Option<Spanned<HumanDuration>>,
}

/// A handler name: `[A-Za-z0-9][A-Za-z0-9_-]*`, at most 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandlerName(pub String);

impl<'de> Deserialize<'de> for HandlerName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        let valid_start = name.starts_with(|c: char| c.is_ascii_alphanumeric());
        let valid_rest = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_start || !valid_rest || name.len() > 64 {
            return Err(de::Error::custom(format!(
                "invalid handler name {name:?}; expected 1 to 64 letters, digits, '-' or '_', starting with a letter or digit"
            )));
        }
        Ok(HandlerName(name))
    }
}

/// A queue group name: non-empty, no whitespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueName(pub String);

impl<'de> Deserialize<'de> for QueueName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '*' || c == '>') {
            return Err(de::Error::custom(format!(
                "invalid queue group {name:?}; expected a non-empty name without whitespace or wildcards"
            )));
        }
        Ok(QueueName(name))
    }
}

/// `max_concurrency`: 1 to 10 000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency(pub u32);

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Concurrency;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer from 1 to 10000")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Concurrency, E> {
                match u32::try_from(n) {
                    Ok(n @ 1..=10_000) => Ok(Concurrency(n)),
                    _ => Err(E::custom(format!(
                        "max_concurrency = {n} is out of range; expected an integer from 1 to 10000"
                    ))),
                }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Concurrency, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A `[config]` value: a string, number or boolean, handed to the guest as text.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigValue(pub String);

impl<'de> Deserialize<'de> for ConfigValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ConfigValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_string()))
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencySection {
    /// `key = "header:Nats-Msg-Id"` (the default), `"json:/order/id"`, `"payload-sha256"`,
    /// `"subject"`, or a template like `"{subject}:{json:/order/id}"`.
    pub key: Option<crate::idempotency::KeySpec>,
    /// `ttl = "24h"`: how long a handled key is remembered.
    pub ttl: Option<HumanDuration>,
    /// `on_missing = "process"`: a message without a key is processed without dedup, or, with
    /// `"dead-letter"`, dead-lettered as `missing-idempotency-key`.
    pub on_missing: Option<crate::idempotency::OnMissing>,
    /// `fingerprint = true`: a duplicate key with a different payload is dead-lettered as
    /// `idempotency-conflict` instead of skipped.
    #[serde(default)]
    pub fingerprint: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderingSection {
    /// `key = "json:/order/id"`: the ordering key, in the `[idempotency] key` syntax
    /// (`header:NAME`, `json:/pointer`, `subject`, a template). Required.
    pub key: crate::idempotency::KeySpec,
    /// `on_missing = "process"`: a message without a key is processed unordered, or, with
    /// `"dead-letter"`, dead-lettered as `missing-ordering-key`.
    pub on_missing: Option<crate::idempotency::OnMissing>,
    /// `max_waiting = 10000`: messages waiting behind their key at most; at the bound the
    /// handler takes no new messages until keys move on.
    pub max_waiting: Option<Spanned<i64>>,
    /// `on_poison = "skip"`: when a message of a key is dead-lettered, its key's later
    /// messages go on (`skip`), or are dead-lettered as `key-parked` until the key is released
    /// (`park`).
    pub on_poison: Option<crate::ordering::OnPoison>,
    /// `partitions = 16`: JetStream only: one consumer per partition, each served by one
    /// Sluice process at a time (a pinned client), so a key's messages never run in two
    /// processes at once. Needs `partition_subject`.
    pub partitions: Option<Spanned<i64>>,
    /// `partition_subject = "orders.{partition}.>"`: the stream's subjects with the partition
    /// token written `{partition}`; partition `i`'s consumer filters on it with `i` there.
    pub partition_subject: Option<Spanned<String>>,
    /// `sequence = "header:Seq"`: a resequencer: per key, messages are handled in the order
    /// of this unsigned integer (the key syntax), whatever order they arrive in.
    pub sequence: Option<Spanned<crate::idempotency::KeySpec>>,
    /// `sequence_start = 1`: the number a key's first message has.
    pub sequence_start: Option<Spanned<i64>>,
    /// `max_wait = "5s"`: how long later messages wait for a missing number.
    pub max_wait: Option<Spanned<HumanDuration>>,
    /// `max_buffered = 1000`: messages of one key held back behind a missing number, at most.
    pub max_buffered: Option<Spanned<i64>>,
    /// `on_gap = "proceed"`: a gap given up on: go on with the next number (`proceed`), or
    /// dead-letter the waiting messages as `sequence-gap` (`dead-letter`).
    pub on_gap: Option<Spanned<crate::ordering::OnGap>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `backend = "redb"`: `memory`, `redb` or `nats-kv`.
    pub backend: Option<Spanned<crate::store::Backend>>,
    /// `replicas = 3`: copies of a `nats-kv` bucket in a cluster.
    pub replicas: Option<Spanned<i64>>,
    /// `max_entries = 100000`: the `memory` backend's bound.
    pub max_entries: Option<Spanned<i64>>,
    /// `max_outbox = 10000`: committed outputs waiting to be sent, at most; when full, the
    /// handler takes no new messages until the relay catches up.
    pub max_outbox: Option<Spanned<i64>>,
}
