//! Dead-lettering: a message that cannot succeed is published, with its payload and headers
//! and the standard `Sluice-*` headers saying why, to the handler's dead-letter subject.
//!
//! The publish goes through JetStream and must be acknowledged by a stream: only then is the
//! source message let go (termed or dropped). If no stream stores the subject, or the publish
//! fails, the caller keeps the message (JetStream redelivers it), so nothing is lost. Each
//! dead letter carries a `Nats-Msg-Id`, so a re-publish after a crash is dropped by the
//! stream's duplicate window instead of parking the message twice.

#[cfg(any(feature = "cli", feature = "testing"))]
pub mod admin;

use std::time::SystemTime;

use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;

use crate::failure::FailureKind;
use crate::manifest::DeadLetter;
use crate::spec::HandlerSpec;

/// Header names, as documented in the README.
pub mod header {
    pub const KIND: &str = "Sluice-Failure-Kind";
    pub const LAST_KIND: &str = "Sluice-Last-Failure-Kind";
    pub const REASON: &str = "Sluice-Failure-Reason";
    pub const ATTEMPTS: &str = "Sluice-Attempts";
    pub const ORIGINAL_SUBJECT: &str = "Sluice-Original-Subject";
    pub const ORIGINAL_MSG_ID: &str = "Sluice-Original-Msg-Id";
    pub const HANDLER: &str = "Sluice-Handler";
    pub const DIGEST: &str = "Sluice-Handler-Digest";
    pub const FIRST_FAILURE_AT: &str = "Sluice-First-Failure-At";
    pub const LAST_FAILURE_AT: &str = "Sluice-Last-Failure-At";
    pub const STREAM: &str = "Sluice-Stream";
    pub const STREAM_SEQUENCE: &str = "Sluice-Stream-Sequence";
    pub const ORDERING_KEY: &str = "Sluice-Ordering-Key";
    #[cfg(any(feature = "cli", feature = "testing"))]
    pub const REPLAYED_FROM: &str = "Sluice-Replayed-From";
}

/// Why a message is given up, and its history in this process.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// `rejected`, `retries-exhausted`, or the kind of a failure that is not retried.
    pub kind: FailureKind,
    /// The last failure's kind, when it differs from `kind` (after `retries-exhausted`).
    pub last_kind: Option<FailureKind>,
    pub reason: String,
    pub attempts: u32,
    pub first_failure_at: SystemTime,
    pub last_failure_at: SystemTime,
}

/// The message as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Original<'a> {
    pub subject: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub payload: &'a Bytes,
    /// Stream name and sequence, for JetStream messages.
    pub stream: Option<(&'a str, u64)>,
}

/// The `Sluice-*` headers describing `verdict` (also used on failure replies).
pub fn verdict_headers(spec: &HandlerSpec, verdict: &Verdict, original: &Original<'_>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::KIND, verdict.kind.as_str());
    if let Some(last) = verdict.last_kind {
        h.insert(header::LAST_KIND, last.as_str());
    }
    h.insert(header::REASON, one_line(&verdict.reason));
    h.insert(header::ATTEMPTS, verdict.attempts.to_string());
    h.insert(header::ORIGINAL_SUBJECT, one_line(original.subject));
    h.insert(header::HANDLER, &*spec.name);
    h.insert(header::DIGEST, spec.digest.as_str());
    h.insert(header::FIRST_FAILURE_AT, humantime::format_rfc3339_millis(verdict.first_failure_at).to_string());
    h.insert(header::LAST_FAILURE_AT, humantime::format_rfc3339_millis(verdict.last_failure_at).to_string());
    if let Some((stream, seq)) = original.stream {
        h.insert(header::STREAM, stream);
        h.insert(header::STREAM_SEQUENCE, seq.to_string());
    }
    if let Some(ordering) = &spec.manifest.ordering
        && let Ok(key) = ordering.key.derive(original.subject, original.headers, original.payload)
    {
        h.insert(header::ORDERING_KEY, one_line(&key));
    }
    h
}

/// Publishes the dead letter and waits for the stream's acknowledgement.
pub async fn publish(
    js: &jetstream::Context,
    target: &DeadLetter,
    spec: &HandlerSpec,
    verdict: &Verdict,
    original: &Original<'_>,
) -> Result<(), DeadLetterError> {
    let mut headers = verdict_headers(spec, verdict, original);
    // The original headers travel along, except the ones JetStream acts on (a copied
    // `Nats-Expected-*` would make the publish fail; the message id is kept under our name).
    if let Some(orig) = original.headers {
        for (name, values) in orig.iter() {
            let name_str: &str = name.as_ref();
            if name_str.starts_with("Sluice-") {
                continue;
            }
            if name_str.eq_ignore_ascii_case("Nats-Msg-Id") {
                if let Some(v) = values.first() {
                    headers.insert(header::ORIGINAL_MSG_ID, v.clone());
                }
                continue;
            }
            if name_str.starts_with("Nats-") {
                continue;
            }
            for v in values {
                headers.append(name.clone(), v.clone());
            }
        }
    }
    let id = match original.stream {
        Some((stream, seq)) => format!("sluice-dlq:{}:{stream}:{seq}", spec.name),
        None => format!("sluice-dlq:{}:{}", spec.name, humantime::format_rfc3339_nanos(verdict.last_failure_at)),
    };
    headers.insert("Nats-Msg-Id", HeaderValue::from(id.as_str()));
    let subject = || target.subject.clone();
    let ack = js
        .publish_with_headers(target.subject.clone(), headers, original.payload.clone())
        .await
        .map_err(|error| DeadLetterError::Publish { subject: subject(), error })?;
    ack.await.map_err(|error| DeadLetterError::NotStored { subject: subject(), error })?;
    Ok(())
}

/// Why a dead letter was not stored (the message it describes is then kept).
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The publish could not be sent.
    #[error("cannot publish to dead-letter subject {subject}: {error}")]
    Publish {
        subject: String,
        #[source]
        error: jetstream::context::PublishError,
    },
    /// No stream acknowledged it.
    #[error("dead-letter subject {subject} was not stored by a stream ({error}); is a stream capturing it?")]
    NotStored {
        subject: String,
        #[source]
        error: jetstream::context::PublishError,
    },
}

/// Creates the dead-letter stream when the manifest asks for it and it is missing.
pub async fn ensure_stream(js: &jetstream::Context, target: &DeadLetter) -> anyhow::Result<()> {
    let Some(name) = target.stream.as_deref().filter(|_| target.create_stream) else {
        return Ok(());
    };
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec![target.subject.clone()],
            description: Some("Sluice dead letters".to_owned()),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot create dead-letter stream {name}: {e}"))?;
    let info = stream.info().await.map_err(|e| anyhow::anyhow!("dead-letter stream {name}: {e}"))?;
    let captures = info
        .config
        .subjects
        .iter()
        .filter_map(|s| crate::subject::SubjectPattern::parse(s).ok())
        .any(|p| p.matches(&target.subject));
    if !captures {
        anyhow::bail!(
            "dead-letter stream {name} exists but does not capture {} (its subjects: {:?})",
            target.subject,
            info.config.subjects
        );
    }
    Ok(())
}

/// Header values cannot hold line breaks.
pub fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}
