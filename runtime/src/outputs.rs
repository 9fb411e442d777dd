//! Sending what a successful call queued. A publication to a subject that a stream captures
//! goes through JetStream, and every acknowledgement is awaited (pipelined: all are sent
//! first, then all acks collected); other subjects and replies are core NATS publishes.
//! Without an outbox that happens before the source message is acked; with one
//! ([`crate::relay`]) the relay sends after the commit and the ack.
//!
//! A reply goes only to a reply inbox ([`OutputSender::reply_allowed`]): the reply subject
//! comes from whoever sent the request, and without that check a forged one
//! (`$JS.API.STREAM.DELETE.ORDERS`) would have Sluice publish there with its own
//! credentials, a confused deputy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::str::FromStr;

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::{Client, HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

use crate::metrics::Metrics;
use crate::spec::HandlerSpec;
use crate::subject::SubjectPattern;

/// A refused reply is warned about at most this often per handler and subject prefix: a
/// client forging reply subjects must not be able to flood the log.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// How long "does a stream capture this subject?" is remembered.
const STREAM_LOOKUP_TTL: Duration = Duration::from_secs(10);

/// After the primary cluster did not take an output, how long outputs go straight to the
/// secondary before the primary is offered one again.
const PRIMARY_RETRY_AFTER: Duration = Duration::from_secs(5);

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
    pub(crate) fn admit(
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

/// Headers from text pairs, checked as the NATS client needs them (it would panic on a bad
/// name, and a value with CR or LF would corrupt the protocol stream).
pub fn header_map(pairs: impl IntoIterator<Item = (String, String)>) -> Result<HeaderMap, String> {
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

/// Why a call's outputs were not all sent. The JetStream errors keep their kind (a stream
/// that is missing, full or slow to answer), which is what an outage policy tells apart.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A publication to a subject a stream captures could not be sent.
    #[error("cannot publish to {subject}: {error}")]
    Stream {
        subject: String,
        #[source]
        error: jetstream::context::PublishError,
    },
    /// A core NATS publication could not be sent.
    #[error("cannot publish to {subject}: {error}")]
    Core {
        subject: String,
        #[source]
        error: async_nats::PublishError,
    },
    /// The stream did not acknowledge a publication.
    #[error("stream did not acknowledge the output to {subject}: {error}")]
    NotAcknowledged {
        subject: String,
        #[source]
        error: jetstream::context::PublishError,
    },
    /// The reply could not be sent.
    #[error("cannot send the reply: {error}")]
    Reply {
        #[source]
        error: async_nats::PublishError,
    },
    /// The primary cluster did not take it, and no stream of the secondary captures it.
    #[error("the primary did not take the output to {subject}, and no stream of the secondary cluster captures it")]
    NotOnSecondary { subject: String },
}

impl SendError {
    /// No server will ever take this publication (larger than the server's `max_payload` or
    /// the stream's `max_msg_size`, a subject the server refuses): sending it again cannot
    /// help. Every other failure is the broker not taking it now (no connection, no stream
    /// answering, a timeout, a stream at its limits), which a later try may get past.
    pub fn is_permanent(&self) -> bool {
        use async_nats::jetstream::context::PublishErrorKind as Js;
        match self {
            SendError::Core { error, .. } => {
                matches!(
                    error.kind(),
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded
                        | async_nats::client::PublishErrorKind::InvalidSubject
                )
            }
            SendError::Stream { error, .. } | SendError::NotAcknowledged { error, .. } => {
                error.kind() == Js::MaxPayloadExceeded || error.to_string().contains("message size exceeds maximum")
            }
            SendError::Reply { .. } | SendError::NotOnSecondary { .. } => false,
        }
    }
}

/// Sends outputs, knowing which subjects are stored by streams.
#[derive(Debug)]
pub struct OutputSender {
    client: Client,
    js: jetstream::Context,
    captured: Mutex<HashMap<String, (bool, Instant)>>,
    /// Streams seen, with their subjects: what they capture is captured for good.
    streams: Mutex<Vec<(String, Vec<SubjectPattern>)>>,
    /// The server's `max_payload`, and when it was read (the client copies its whole server
    /// info on every read).
    max_payload: Mutex<(usize, Option<Instant>)>,
    /// `_INBOX.>`, plus `<prefix>.>` when the connection uses a custom inbox prefix.
    inboxes: Vec<SubjectPattern>,
    /// When a refused reply was last warned about, per (handler, subject prefix).
    refusals: Mutex<HashMap<(String, String), Instant>>,
    /// The secondary cluster (`--nats-secondary`), for outputs the primary does not take.
    secondary: Option<Secondary>,
}

/// Passive sending: outputs go to the primary cluster; one the primary does not take (no
/// connection, no stream answering, a refusal for its limits, no acknowledgement in time)
/// goes to the secondary with the same headers (its `Nats-Msg-Id` included), where a stream
/// must capture its subject. Then the roles swap for [`PRIMARY_RETRY_AFTER`]: outputs go
/// straight to the secondary, and the first one offered to the primary afterwards that it
/// takes swaps them back.
#[derive(Debug)]
struct Secondary {
    sender: Box<OutputSender>,
    /// While set and in the future (or the primary not connected), the secondary is active.
    primary_down_until: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

impl Secondary {
    fn primary_down(&self, primary: &Client) -> bool {
        if primary.connection_state() != async_nats::connection::State::Connected {
            self.mark_primary_down(&"not connected");
            return true;
        }
        self.primary_down_until.lock().is_ok_and(|until| until.is_some_and(|t| Instant::now() < t))
    }

    fn mark_primary_down(&self, why: &dyn std::fmt::Display) {
        if let Ok(mut until) = self.primary_down_until.lock() {
            if until.is_none() {
                tracing::warn!("the primary NATS cluster did not take an output ({why}); sending to the secondary");
            }
            *until = Some(Instant::now() + PRIMARY_RETRY_AFTER);
        }
        self.metrics.secondary_active.set(1.0);
    }

    fn primary_took_one(&self) {
        if let Ok(mut until) = self.primary_down_until.lock()
            && until.take().is_some()
        {
            tracing::info!("the primary NATS cluster takes outputs again");
            self.metrics.secondary_active.set(0.0);
        }
    }

    /// Sends `out` to the secondary and awaits its stream's acknowledgement. Only where a
    /// stream there captures the subject: a core publish would be stored nowhere.
    async fn deliver(&self, out: Output) -> Result<(), SendError> {
        let subject = out.subject.clone();
        if !self.sender.is_captured(&subject).await {
            return Err(SendError::NotOnSecondary { subject });
        }
        let ack = match self.sender.js.publish_with_headers(out.subject, out.headers, out.payload).await {
            Ok(ack) => ack,
            Err(error) => return Err(SendError::Stream { subject, error }),
        };
        ack.await.map_err(|error| SendError::NotAcknowledged { subject, error })?;
        self.metrics.secondary_sent.increment(1);
        Ok(())
    }
}

/// A publication sent to a stream whose acknowledgement is still to come
/// ([`OutputSender::confirm`]).
#[derive(Debug)]
pub struct Pending {
    subject: String,
    ack: PublishAckFuture,
    /// A copy to send to the secondary cluster if the primary does not acknowledge it.
    again: Option<Output>,
}

impl OutputSender {
    pub fn new(client: Client) -> Self {
        let mut inboxes = vec![SubjectPattern::parse("_INBOX.>").expect("a valid pattern")];
        // The client does not expose its inbox prefix, but every inbox it makes is
        // `<prefix>.<unique id>`.
        let inbox = client.new_inbox();
        if let Some((prefix, _)) = inbox.rsplit_once('.')
            && prefix != "_INBOX"
            && let Ok(pattern) = SubjectPattern::parse(&format!("{prefix}.>"))
        {
            inboxes.push(pattern);
        }
        OutputSender {
            js: jetstream::new(client.clone()),
            client,
            captured: Mutex::new(HashMap::new()),
            streams: Mutex::new(Vec::new()),
            max_payload: Mutex::new((0, None)),
            inboxes,
            refusals: Mutex::new(HashMap::new()),
            secondary: None,
        }
    }

    /// Passive sending to `secondary` (a client of the secondary cluster) for the outputs the
    /// primary does not take; see [`Secondary`].
    pub fn with_secondary(mut self, secondary: Client, metrics: Arc<Metrics>) -> Self {
        metrics.secondary_active.set(0.0);
        self.secondary = Some(Secondary {
            sender: Box::new(OutputSender::new(secondary)),
            primary_down_until: Mutex::new(None),
            metrics,
        });
        self
    }

    /// Whether `handler` may send a reply to `subject`: a reply inbox, or a subject its
    /// manifest accepts (`[capabilities] reply_to`). A refusal is logged, at most once a
    /// minute per handler and subject prefix (the first two tokens).
    pub fn reply_allowed(&self, handler: &HandlerSpec, subject: &str) -> bool {
        if self.inboxes.iter().chain(&handler.manifest.reply_to).any(|p| p.matches(subject)) {
            return true;
        }
        let prefix: String = subject.split('.').take(2).collect::<Vec<_>>().join(".");
        let warn = match self.refusals.lock() {
            Ok(mut seen) => {
                if seen.len() > 10_000 {
                    seen.clear();
                }
                let key = (handler.name.to_string(), prefix.clone());
                match seen.get(&key) {
                    Some(at) if at.elapsed() < REFUSAL_WARNING_EVERY => false,
                    _ => {
                        seen.insert(key, Instant::now());
                        true
                    }
                }
            }
            Err(_) => true,
        };
        if warn {
            tracing::warn!(
                handler = &*handler.name,
                prefix = %prefix,
                "reply not sent: {subject:?} is not a reply inbox (_INBOX.> or capabilities.reply_to); \
                 further refusals for this prefix are not logged for a minute"
            );
        }
        false
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The largest message (headers and payload) the server takes; 0 when not known yet.
    /// Re-read at most once a second (a reconnect may reach a server with another limit).
    pub fn max_payload(&self) -> usize {
        let Ok(mut cached) = self.max_payload.lock() else { return self.client.server_info().max_payload };
        if cached.1.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
            *cached = (self.client.server_info().max_payload, Some(Instant::now()));
        }
        cached.0
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Sends `outputs` in order; Ok once every stream has acknowledged its messages.
    pub async fn send(&self, outputs: Outputs) -> Result<(), SendError> {
        let mut acks: Vec<Pending> = Vec::new();
        for out in outputs.published {
            if let Some(ack) = self.publish(out).await? {
                acks.push(ack);
            }
        }
        for ack in acks {
            self.confirm(ack).await?;
        }
        // The reply goes last: a requester that got its answer may rely on the rest.
        if let Some(reply) = outputs.reply {
            self.reply(reply).await?;
        }
        Ok(())
    }

    /// Sends one publication: through JetStream when a stream captures its subject (then
    /// returns the acknowledgement to await with [`OutputSender::confirm`]), as a core NATS
    /// publish otherwise. With a secondary cluster, a publication the primary does not take
    /// goes there (and, while the secondary is active, straight there when it captures the
    /// subject); Ok(None) then means it is stored.
    pub async fn publish(&self, out: Output) -> Result<Option<Pending>, SendError> {
        if let Some(secondary) = &self.secondary
            && secondary.primary_down(&self.client)
            && secondary.sender.is_captured(&out.subject).await
        {
            return secondary.deliver(out).await.map(|()| None);
        }
        if self.is_captured(&out.subject).await {
            let again = self.secondary.as_ref().map(|_| out.clone());
            match self.js.publish_with_headers(out.subject.clone(), out.headers, out.payload).await {
                Ok(ack) => Ok(Some(Pending { subject: out.subject, ack, again })),
                Err(error) => {
                    self.fail_over(again, SendError::Stream { subject: out.subject, error }).await.map(|()| None)
                }
            }
        } else {
            match self.client.publish_with_headers(out.subject.clone(), out.headers, out.payload).await {
                Ok(()) => Ok(None),
                Err(error) => Err(SendError::Core { subject: out.subject, error }),
            }
        }
    }

    /// Awaits a publication's acknowledgement (with a secondary cluster: sends it there when
    /// the primary does not acknowledge it).
    pub async fn confirm(&self, pending: Pending) -> Result<(), SendError> {
        match pending.ack.await {
            Ok(_) => {
                if let Some(secondary) = &self.secondary {
                    secondary.primary_took_one();
                }
                Ok(())
            }
            Err(error) => {
                self.fail_over(pending.again, SendError::NotAcknowledged { subject: pending.subject, error }).await
            }
        }
    }

    /// The primary did not take `again` (`cause`): the secondary's turn, when there is one
    /// and another try can help. The error returned is the primary's.
    async fn fail_over(&self, again: Option<Output>, cause: SendError) -> Result<(), SendError> {
        match (again, &self.secondary) {
            (Some(out), Some(secondary)) if !cause.is_permanent() => {
                secondary.mark_primary_down(&cause);
                match secondary.deliver(out).await {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        tracing::debug!("the secondary did not take the output either: {e}");
                        Err(cause)
                    }
                }
            }
            _ => Err(cause),
        }
    }

    /// Sends a reply (a core NATS publish).
    pub async fn reply(&self, reply: Output) -> Result<(), SendError> {
        self.client
            .publish_with_headers(reply.subject, reply.headers, reply.payload)
            .await
            .map_err(|error| SendError::Reply { error })
    }

    /// Whether a stream captures `subject`. A stream once seen stays known to this sender
    /// with its subjects: if it goes away (deleted, its server down), publications to any of
    /// its subjects keep going through JetStream and fail until it is back (the outbox keeps
    /// them), rather than turning into core publishes that no stream stores. A subject no
    /// known stream captures is looked up, and a miss remembered for [`STREAM_LOOKUP_TTL`].
    async fn is_captured(&self, subject: &str) -> bool {
        if let Ok(known) = self.streams.lock()
            && known.iter().any(|(_, subjects)| subjects.iter().any(|p| p.matches(subject)))
        {
            return true;
        }
        if let Ok(cache) = self.captured.lock()
            && let Some((captured, at)) = cache.get(subject)
            && at.elapsed() < STREAM_LOOKUP_TTL
        {
            return *captured;
        }
        let found = self.js.stream_by_subject(subject.to_owned()).await.ok();
        if let Some(name) = &found
            && let Ok(mut stream) = self.js.get_stream(name).await
            && let Ok(info) = stream.info().await
        {
            let subjects: Vec<SubjectPattern> =
                info.config.subjects.iter().filter_map(|s| SubjectPattern::parse(s).ok()).collect();
            if let Ok(mut known) = self.streams.lock() {
                known.retain(|(n, _)| n != name);
                if known.len() < 1_000 {
                    known.push((name.clone(), subjects));
                }
            }
        }
        let captured = found.is_some();
        if let Ok(mut cache) = self.captured.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(subject.to_owned(), (captured, Instant::now()));
        }
        captured
    }
}
