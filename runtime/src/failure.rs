//! The failure vocabulary: why a call or a message failed, as logs, metrics, dead-letter
//! headers and retry policies name it. A leaf: it imports nothing of the runtime, so the
//! manifest, the retry policy and the delivery path can all use it.

use std::fmt;
use std::time::Duration;

/// Why a call failed, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub reason: String,
    /// The handler's retry-after hint, for `RetryRequested`.
    pub retry_after: Option<Duration>,
}

/// The failure kinds, as they appear in logs and in `Sluice-Failure-Kind` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The handler returned `failure::reject`.
    Rejected,
    /// The handler returned `failure::retry`.
    RetryRequested,
    /// The guest trapped (`unreachable`, a Rust panic, stack overflow, ...).
    Trap,
    /// The call ran past `limits.timeout`.
    Timeout,
    /// The guest tried to grow its memory past `limits.memory`.
    MemoryLimit,
    /// No instance could be created (for example the instance pool is exhausted).
    Instantiation,
    /// The call succeeded but its outputs can never be sent as they are (larger than the
    /// server or the stream takes, a subject it refuses).
    OutputFailed,
    /// The call succeeded but the broker did not take its outputs now (no connection, no
    /// stream answering, a timeout, a stream at its limits), for a handler without an outbox:
    /// retried after a back-off, without counting the attempt.
    BrokerBusy,
    /// A retryable failure happened on the last allowed attempt.
    RetriesExhausted,
    /// The handler's state store could not be reached.
    StoreError,
    /// The call queued more outputs, or more output bytes, than `limits` allow.
    OutputLimit,
    /// The incoming payload is larger than `limits.max_payload`.
    PayloadTooLarge,
    /// The message has no idempotency key and the manifest says to dead-letter such.
    MissingIdempotencyKey,
    /// The key was handled before with a different payload.
    IdempotencyConflict,
    /// The message has no ordering key and the manifest says to dead-letter such.
    MissingOrderingKey,
    /// An earlier message of its ordering key was dead-lettered and the key is parked
    /// (`on_poison = "park"`) until an operator releases it.
    KeyParked,
    /// A resequenced message (`[ordering] sequence`) whose sequence number is missing or not
    /// an unsigned integer.
    MissingSequence,
    /// A resequenced message that waited `max_wait` (or past `max_buffered`) for an earlier
    /// sequence number of its key that never came, with `on_gap = "dead-letter"`.
    SequenceGap,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Rejected => "rejected",
            FailureKind::RetryRequested => "retry-requested",
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::MemoryLimit => "memory-limit",
            FailureKind::Instantiation => "instantiation",
            FailureKind::OutputFailed => "output-failed",
            FailureKind::BrokerBusy => "broker-busy",
            FailureKind::RetriesExhausted => "retries-exhausted",
            FailureKind::StoreError => "store-error",
            FailureKind::OutputLimit => "output-limit",
            FailureKind::PayloadTooLarge => "payload-too-large",
            FailureKind::MissingIdempotencyKey => "missing-idempotency-key",
            FailureKind::IdempotencyConflict => "idempotency-conflict",
            FailureKind::MissingOrderingKey => "missing-ordering-key",
            FailureKind::KeyParked => "key-parked",
            FailureKind::MissingSequence => "missing-sequence",
            FailureKind::SequenceGap => "sequence-gap",
        }
    }

    /// Every kind, for parsing and documentation.
    pub const ALL: [FailureKind; 18] = [
        FailureKind::Rejected,
        FailureKind::RetryRequested,
        FailureKind::Trap,
        FailureKind::Timeout,
        FailureKind::MemoryLimit,
        FailureKind::Instantiation,
        FailureKind::OutputFailed,
        FailureKind::BrokerBusy,
        FailureKind::RetriesExhausted,
        FailureKind::StoreError,
        FailureKind::OutputLimit,
        FailureKind::PayloadTooLarge,
        FailureKind::MissingIdempotencyKey,
        FailureKind::IdempotencyConflict,
        FailureKind::MissingOrderingKey,
        FailureKind::KeyParked,
        FailureKind::MissingSequence,
        FailureKind::SequenceGap,
    ];

    /// The kind named `name` (as in `Sluice-Failure-Kind`).
    pub fn parse(name: &str) -> Option<FailureKind> {
        FailureKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
