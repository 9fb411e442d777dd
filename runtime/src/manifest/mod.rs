//! Handler manifests: one TOML file per handler, parsed, validated and resolved.
//!
//! Unknown keys are errors, and every error names the file, line and column of the value at
//! fault and says what would be accepted (see [`ManifestError`]).

mod error;
pub mod http;
mod schema;
mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use error::{ManifestError, SourceText};
pub use units::{ByteSize, HumanDuration};

use crate::failure::FailureKind;
use crate::idempotency::{Idempotency, OnMissing};
use crate::ordering::Ordering;
use crate::retry::RetryPolicy;
use crate::store::Backend;
use crate::subject::SubjectPattern;

/// Memory one instance may use when the manifest does not say.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Time one call may take when the manifest does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages of one handler processed at once when the manifest does not say.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 32;

/// A validated manifest, with every default applied and the component path resolved.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The manifest file and its text, to point at lines in later errors.
    pub file: Arc<SourceText>,
    /// The handler's name (`[handler] name`), unique in a runtime.
    pub name: String,
    /// Absolute (or manifest-relative-resolved) path of the component file.
    pub component: PathBuf,
    /// Where its messages come from (`[source]`).
    pub source: Source,
    /// Its resource limits (`[limits]`).
    pub limits: Limits,
    /// The retry policy (`[retry]`).
    pub retry: RetryPolicy,
    /// Where messages go after their last failure (`[dead_letter]`).
    pub dead_letter: Option<DeadLetter>,
    /// How duplicates are detected (`[idempotency]`).
    pub idempotency: Option<Idempotency>,
    /// `[ordering]`: per-key order.
    pub ordering: Option<Ordering>,
    /// The state store (`[store]`).
    pub store: StoreConfig,
    /// The subjects it may publish to (`[capabilities] publish`).
    pub publish: Vec<SubjectPattern>,
    /// Reply subjects accepted besides the reply inboxes (`[capabilities] reply_to`).
    pub reply_to: Vec<SubjectPattern>,
    /// Configuration values the guest reads (`[config]`).
    pub config: BTreeMap<String, String>,
    /// `[capabilities] http` and `[http]`: `None`, the handler makes no HTTP requests.
    pub http: Option<Arc<http::HttpPolicy>>,
    /// Where values sit in the file, for errors found after parsing.
    pub spans: Spans,
}

/// Where a handler's messages come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A core NATS subscription in a queue group.
    Core {
        /// The subject (wildcards allowed).
        subject: SubjectPattern,
        /// The queue group.
        queue: String,
    },
    /// A durable JetStream pull consumer.
    JetStream(JetStreamSource),
}

/// A durable pull consumer on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamSource {
    /// The stream.
    pub stream: String,
    /// The durable consumer's name.
    pub consumer: String,
    /// Empty: the whole stream.
    pub filters: Vec<SubjectPattern>,
    /// How long JetStream waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Messages delivered and not yet acked, at most.
    pub max_ack_pending: i64,
    /// Also read the same stream and consumer on the secondary cluster (active receiving).
    pub secondary: bool,
    /// A stream on the secondary cluster whose messages the syphon moves into the primary.
    pub backlog: Option<String>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Core { subject, queue } => write!(f, "{subject} (queue {queue})"),
            Source::JetStream(js) => write!(f, "stream {} consumer {}", js.stream, js.consumer),
        }
    }
}

/// Where messages that cannot succeed are parked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The subject dead letters are published to.
    pub subject: String,
    /// The stream that captures them.
    pub stream: Option<String>,
    /// Whether Sluice creates that stream when it is missing.
    pub create_stream: bool,
}

/// Where a handler's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// Which backend holds the state.
    pub backend: Backend,
    /// `nats-kv`: bucket replicas.
    pub replicas: usize,
    /// `memory`: entries kept at most.
    pub max_entries: usize,
    /// Committed outputs waiting in the outbox at most (`memory`, `redb`).
    pub max_outbox: usize,
}

/// Outputs waiting in a handler's outbox at most, when the manifest does not say.
pub const DEFAULT_MAX_OUTBOX: usize = 10_000;

/// How long a handled key is remembered when the manifest does not say.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// What one call may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest linear memory of an instance, in bytes.
    pub memory: u64,
    /// How long one call may run.
    pub timeout: Duration,
    /// Calls in flight at once.
    pub max_concurrency: u32,
    /// Outputs one call may queue, at most.
    pub max_outputs: u32,
    /// Total bytes of one call's outputs, at most.
    pub max_output_bytes: u64,
    /// `None`: whatever the NATS server lets through.
    pub max_payload: Option<u64>,
    /// Bytes of guest logs per call, at most.
    pub max_log_bytes: u64,
    /// Fresh instances, or warm ones and how many messages each serves.
    pub instances: Instances,
    /// `[limits] rate` and `burst`: `None`, no limit.
    pub rate: Option<crate::rate::Rate>,
}

/// How a handler's instances are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    /// A fresh instance per message (the default).
    Fresh,
    /// Warm instances, each replaced after `recycle_after` messages, after any failure other
    /// than the handler's own `reject` or `retry`, and on reload.
    Warm {
        /// Messages an instance handles before it is replaced.
        recycle_after: u32,
    },
}

/// Messages a warm instance serves, when the manifest does not say.
pub const DEFAULT_RECYCLE_AFTER: u32 = 10_000;

/// Publications one call may queue when the manifest does not say.
pub const DEFAULT_MAX_OUTPUTS: u32 = 100;
/// Total output bytes of one call when the manifest does not say.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 4 << 20;
/// Log bytes one call may write when the manifest does not say.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 << 10;

/// Byte ranges of values that later checks (engine, registry) may have to point at.
#[derive(Debug, Clone, Default)]
pub struct Spans {
    /// The span of `[handler] name`.
    pub name: std::ops::Range<usize>,
    /// The span of `[handler] component`.
    pub component: std::ops::Range<usize>,
    /// The span of `[limits] memory`, when given.
    pub memory: Option<std::ops::Range<usize>>,
}

impl Manifest {
    /// An error located at `span` of this manifest.
    pub fn error_at(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> ManifestError {
        ManifestError::at(&self.file, span, message)
    }
}

/// Reads and validates the manifest at `path`.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ManifestError::without_location(path, format!("cannot read manifest: {e}")))?;
    parse(path, text)
}

/// Validates manifest `text` as if read from `path` (which anchors the component path).
pub fn parse(path: &Path, text: String) -> Result<Manifest, ManifestError> {
    let file = Arc::new(SourceText { path: path.to_owned(), text });
    let raw: schema::RawManifest = toml::from_str(&file.text).map_err(|e| {
        let message = with_hint(e.message().trim_end());
        match e.span() {
            Some(span) => ManifestError::at(&file, span, message),
            None => ManifestError::without_location(path, message),
        }
    })?;

    let dir = path.parent().unwrap_or(Path::new("."));
    let component_text = raw.handler.component.get_ref();
    if component_text.trim().is_empty() {
        return Err(ManifestError::at(
            &file,
            raw.handler.component.span(),
            "empty component path; expected the path of a .wasm component, relative to this manifest",
        ));
    }
    let component = dir.join(component_text);
    if let Err(why) = check_component_path(&component) {
        return Err(ManifestError::at(&file, raw.handler.component.span(), why));
    }

    let caps = &raw.capabilities;
    let grants = |key: &str, patterns: &[toml::Spanned<String>]| {
        let mut parsed = Vec::with_capacity(patterns.len());
        for pattern in patterns {
            let p =
                SubjectPattern::parse(pattern.get_ref()).map_err(|e| ManifestError::at(&file, pattern.span(), e))?;
            if p.names_reserved() && !caps.allow_system_subjects {
                return Err(ManifestError::at(
                    &file,
                    pattern.span(),
                    format!(
                        "{key} names {:?}, a NATS system namespace ($JS, $KV, $O, $SYS, ...): a handler could \
                         administer streams, consumers or buckets with Sluice's credentials; set \
                         `allow_system_subjects = true` in [capabilities] if that is intended",
                        p.as_str()
                    ),
                ));
            }
            parsed.push((p, pattern.span()));
        }
        Ok(parsed)
    };
    let publish = grants("publish", &caps.publish)?;
    let reply_to = grants("reply_to", &caps.reply_to)?;
    let allow_publish_to_source = caps.allow_publish_to_source;

    let name = raw.handler.name.get_ref().0.clone();
    let limits = Limits {
        memory: raw.limits.memory.as_ref().map_or(DEFAULT_MEMORY, |m| m.get_ref().0),
        timeout: raw.limits.timeout.map_or(DEFAULT_TIMEOUT, |t| t.0),
        max_concurrency: raw.limits.max_concurrency.map_or(DEFAULT_MAX_CONCURRENCY, |c| c.0),
        max_outputs: match raw.limits.max_outputs {
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(v @ 0..=100_000) => v,
                _ => {
                    return Err(ManifestError::at(
                        &file,
                        n.span(),
                        format!("max_outputs = {} is out of range; expected 0 to 100000", n.get_ref()),
                    ));
                }
            },
            None => DEFAULT_MAX_OUTPUTS,
        },
        max_output_bytes: raw.limits.max_output_bytes.map_or(DEFAULT_MAX_OUTPUT_BYTES, |b| b.0),
        max_payload: raw.limits.max_payload.map(|b| b.0),
        max_log_bytes: raw.limits.max_log_bytes.map_or(DEFAULT_MAX_LOG_BYTES, |b| b.0),
        instances: resolve_instances(&file, raw.limits.instances, raw.limits.recycle_after)?,
        rate: resolve_rate(&file, raw.limits.rate, raw.limits.burst)?,
    };
    let source_span = raw.source.span();
    let clusters_span = raw.source.get_ref().clusters.as_ref().map(|c| c.span());
    let source = resolve_source(&file, source_span, raw.source.into_inner(), &name, &limits)?;
    let retry = resolve_retry(&file, raw.retry)?;
    let dead_letter_span = raw.dead_letter.as_ref().map(|d| d.subject.span());
    let dead_letter = raw.dead_letter.map(|d| resolve_dead_letter(&file, d)).transpose()?;
    if let (Some(dl), Some(span)) = (&dead_letter, dead_letter_span) {
        check_dead_letter_loop(&file, &source, dl, span)?;
    }
    if !allow_publish_to_source {
        check_publish_to_source(&file, &source, &publish)?;
    }
    let publish: Vec<SubjectPattern> = publish.into_iter().map(|(p, _)| p).collect();
    let reply_to: Vec<SubjectPattern> = reply_to.into_iter().map(|(p, _)| p).collect();
    let idempotency = raw.idempotency.map(|i| Idempotency {
        key: i.key.unwrap_or_default(),
        ttl: i.ttl.map_or(DEFAULT_IDEMPOTENCY_TTL, |t| t.0),
        on_missing: i.on_missing.unwrap_or(OnMissing::Process),
        fingerprint: i.fingerprint,
    });
    let store = resolve_store(&file, raw.store)?;
    let ordering = raw.ordering.map(|o| resolve_ordering(&file, o, &source)).transpose()?;
    let http = http::resolve(&file, dir, &raw.capabilities, raw.http, limits.timeout)?;
    if let (Source::JetStream(js), Some(span)) = (&source, clusters_span)
        && js.secondary
    {
        // A message may arrive from both clusters: the key is what makes the second harmless.
        if idempotency.is_none() {
            return Err(ManifestError::at(
                &file,
                span,
                "reading from two clusters needs [idempotency]: a message that reaches both is handled once by its key",
            ));
        }
        if ordering.is_some() {
            return Err(ManifestError::at(
                &file,
                span,
                "[ordering] and two clusters do not go together: the two streams have no common order",
            ));
        }
    }

    Ok(Manifest {
        spans: Spans {
            name: raw.handler.name.span(),
            component: raw.handler.component.span(),
            memory: raw.limits.memory.as_ref().map(|m| m.span()),
        },
        file,
        name,
        component,
        source,
        limits,
        retry,
        dead_letter,
        idempotency,
        ordering,
        store,
        publish,
        reply_to,
        config: raw.config.into_iter().map(|(k, v)| (k, v.0)).collect(),
        http,
    })
}

/// Core NATS or JetStream, never both, with each key only where it means something.
fn resolve_source(
    file: &SourceText,
    span: std::ops::Range<usize>,
    raw: schema::SourceSection,
    handler: &str,
    limits: &Limits,
) -> Result<Source, ManifestError> {
    let err = |span: std::ops::Range<usize>, m: &str| ManifestError::at(file, span, m);
    match (raw.subject, raw.stream) {
        (Some(_), Some(stream)) => Err(err(
            stream.span(),
            "conflicting sources: `subject` (core NATS) and `stream` (JetStream) are both set; choose one",
        )),
        (None, None) => {
            Err(err(span, "[source] needs `subject = \"...\"` (core NATS) or `stream = \"...\"` (JetStream)"))
        }
        (Some(subject), None) => {
            for (key, s) in [
                ("consumer", raw.consumer.as_ref().map(|c| c.span())),
                ("filter", raw.filter.as_ref().map(|f| f.span())),
                ("ack_wait", raw.ack_wait.as_ref().map(|a| a.span())),
                ("max_ack_pending", raw.max_ack_pending.as_ref().map(|a| a.span())),
                ("clusters", raw.clusters.as_ref().map(|c| c.span())),
                ("backlog", raw.backlog.as_ref().map(|b| b.span())),
            ] {
                if let Some(s) = s {
                    return Err(err(
                        s,
                        &format!("`{key}` only applies to a JetStream source (`stream = ...`), not to `subject`"),
                    ));
                }
            }
            let queue = raw.queue.map_or_else(|| handler.to_owned(), |q| q.into_inner().0);
            Ok(Source::Core { subject: subject.into_inner(), queue })
        }
        (None, Some(stream)) => {
            if let Some(queue) = raw.queue {
                return Err(err(
                    queue.span(),
                    "`queue` only applies to a core NATS source; a JetStream consumer is shared by name (`consumer`)",
                ));
            }
            let mut filters = Vec::new();
            if let Some(filter) = raw.filter {
                let span = filter.span();
                for f in &filter.get_ref().0 {
                    filters.push(SubjectPattern::parse(f).map_err(|e| err(span.clone(), &e))?);
                }
            }
            let default_ack_wait = limits.timeout * 2 + Duration::from_secs(1);
            let ack_wait = match raw.ack_wait {
                Some(a) if a.get_ref().0 <= limits.timeout => {
                    return Err(err(
                        a.span(),
                        &format!(
                            "ack_wait {} must be longer than the timeout ({}), or JetStream redelivers messages still running",
                            a.get_ref(),
                            HumanDuration(limits.timeout)
                        ),
                    ));
                }
                Some(a) => a.into_inner().0,
                None => default_ack_wait,
            };
            let max_ack_pending = match raw.max_ack_pending {
                Some(n) if !(1..=1_000_000).contains(n.get_ref()) => {
                    return Err(err(n.span(), "max_ack_pending is out of range; expected 1 to 1000000"));
                }
                Some(n) => n.into_inner(),
                None => (i64::from(limits.max_concurrency) * 4).max(1000),
            };
            let secondary = match raw.clusters {
                None => false,
                Some(c) => {
                    let mut names = c.get_ref().clone();
                    names.sort();
                    match names.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                        ["primary"] => false,
                        ["primary", "secondary"] => true,
                        _ => {
                            return Err(err(
                                c.span(),
                                "clusters must be [\"primary\"] (the default) or [\"primary\", \"secondary\"] \
                                 (read the stream on both clusters)",
                            ));
                        }
                    }
                }
            };
            Ok(Source::JetStream(JetStreamSource {
                secondary,
                backlog: raw.backlog.map(|b| b.into_inner().0),
                max_ack_pending,
                stream: stream.into_inner().0,
                consumer: raw.consumer.map_or_else(|| handler.to_owned(), |c| c.into_inner().0),
                filters,
                ack_wait,
            }))
        }
    }
}

fn resolve_ordering(
    file: &SourceText,
    raw: schema::OrderingSection,
    source: &Source,
) -> Result<Ordering, ManifestError> {
    let sequence = resolve_sequence(file, &raw)?;
    let max_waiting = match raw.max_waiting {
        None => crate::ordering::DEFAULT_MAX_WAITING,
        Some(n) => match usize::try_from(*n.get_ref()) {
            Ok(v @ 1..=1_000_000) => v,
            _ => {
                return Err(ManifestError::at(
                    file,
                    n.span(),
                    format!("max_waiting = {} is out of range; expected 1 to 1000000", n.get_ref()),
                ));
            }
        },
    };
    let partitions = match (raw.partitions, raw.partition_subject) {
        (None, None) => None,
        (None, Some(subject)) => {
            return Err(ManifestError::at(
                file,
                subject.span(),
                "partition_subject only applies with `partitions = N` (one consumer per partition)",
            ));
        }
        (Some(n), None) => {
            return Err(ManifestError::at(
                file,
                n.span(),
                "partitions needs `partition_subject = \"...\"`: the stream's subjects with the partition token written {partition}, like \"orders.{partition}.>\"",
            ));
        }
        (Some(n), Some(subject)) => {
            let Source::JetStream(js) = source else {
                return Err(ManifestError::at(
                    file,
                    n.span(),
                    "partitions only apply to a JetStream source (`stream = ...`): core NATS has no consumer to pin",
                ));
            };
            let count = match u32::try_from(*n.get_ref()) {
                Ok(v @ 1..=1024) => v,
                _ => {
                    return Err(ManifestError::at(
                        file,
                        n.span(),
                        format!("partitions = {} is out of range; expected 1 to 1024", n.get_ref()),
                    ));
                }
            };
            let text = subject.get_ref();
            let tokens = text.split('.').filter(|t| *t == crate::ordering::Partitions::TOKEN).count();
            if tokens != 1 {
                return Err(ManifestError::at(
                    file,
                    subject.span(),
                    format!(
                        "partition_subject {text:?} must hold the token {{partition}} exactly once, as a whole token, like \"orders.{{partition}}.>\""
                    ),
                ));
            }
            let as_pattern = text.replace(crate::ordering::Partitions::TOKEN, "*");
            SubjectPattern::parse(&as_pattern).map_err(|e| ManifestError::at(file, subject.span(), e))?;
            if !js.filters.is_empty() {
                return Err(ManifestError::at(
                    file,
                    subject.span(),
                    "with partitions, each partition's consumer filters on partition_subject; remove `filter` from [source]",
                ));
            }
            Some(crate::ordering::Partitions { count, subject: text.clone() })
        }
    };
    Ok(Ordering {
        key: raw.key,
        on_missing: raw.on_missing.unwrap_or(OnMissing::Process),
        max_waiting,
        partitions,
        on_poison: raw.on_poison.unwrap_or_default(),
        sequence,
    })
}

/// `[ordering] sequence` and the keys that only mean something with it.
fn resolve_sequence(
    file: &SourceText,
    raw: &schema::OrderingSection,
) -> Result<Option<crate::ordering::Resequence>, ManifestError> {
    let Some(by) = &raw.sequence else {
        let stray = [
            ("sequence_start", raw.sequence_start.as_ref().map(|s| s.span())),
            ("max_wait", raw.max_wait.as_ref().map(|s| s.span())),
            ("max_buffered", raw.max_buffered.as_ref().map(|s| s.span())),
            ("on_gap", raw.on_gap.as_ref().map(|s| s.span())),
        ];
        if let Some((name, Some(span))) = stray.into_iter().find(|(_, span)| span.is_some()) {
            return Err(ManifestError::at(
                file,
                span,
                format!(
                    "{name} only applies with `sequence = \"...\"` (the resequencer), which this [ordering] does not set"
                ),
            ));
        }
        return Ok(None);
    };
    let start = match &raw.sequence_start {
        None => 1,
        Some(n) => u64::try_from(*n.get_ref()).map_err(|_| {
            ManifestError::at(
                file,
                n.span(),
                format!("sequence_start = {} is negative; sequence numbers are unsigned", n.get_ref()),
            )
        })?,
    };
    let max_buffered = match &raw.max_buffered {
        None => crate::ordering::DEFAULT_MAX_BUFFERED,
        Some(n) => match usize::try_from(*n.get_ref()) {
            Ok(v @ 1..=1_000_000) => v,
            _ => {
                return Err(ManifestError::at(
                    file,
                    n.span(),
                    format!("max_buffered = {} is out of range; expected 1 to 1000000", n.get_ref()),
                ));
            }
        },
    };
    Ok(Some(crate::ordering::Resequence {
        by: by.get_ref().clone(),
        start,
        max_wait: raw.max_wait.as_ref().map_or(crate::ordering::DEFAULT_MAX_WAIT, |d| d.get_ref().0),
        max_buffered,
        on_gap: raw.on_gap.as_ref().map(|g| *g.get_ref()).unwrap_or_default(),
    }))
}

fn resolve_rate(
    file: &SourceText,
    rate: Option<toml::Spanned<String>>,
    burst: Option<toml::Spanned<i64>>,
) -> Result<Option<crate::rate::Rate>, ManifestError> {
    let per_sec = match (&rate, &burst) {
        (None, None) => return Ok(None),
        (None, Some(b)) => {
            return Err(ManifestError::at(file, b.span(), "burst only applies with a rate (`rate = \"500/s\"`)"));
        }
        (Some(r), _) => crate::rate::Rate::parse(r.get_ref()).map_err(|e| ManifestError::at(file, r.span(), e))?,
    };
    let burst = match burst {
        None => crate::rate::Rate::default_burst(per_sec),
        Some(b) => match u32::try_from(*b.get_ref()) {
            Ok(v @ 1..=1_000_000) => v,
            _ => {
                return Err(ManifestError::at(
                    file,
                    b.span(),
                    format!("burst = {} is out of range; expected 1 to 1000000", b.get_ref()),
                ));
            }
        },
    };
    Ok(Some(crate::rate::Rate { per_sec, burst }))
}

fn resolve_instances(
    file: &SourceText,
    mode: Option<schema::InstanceMode>,
    recycle_after: Option<toml::Spanned<i64>>,
) -> Result<Instances, ManifestError> {
    match (mode.unwrap_or(schema::InstanceMode::Fresh), recycle_after) {
        (schema::InstanceMode::Fresh, Some(n)) => Err(ManifestError::at(
            file,
            n.span(),
            "recycle_after only applies to warm instances (`instances = \"warm\"`)",
        )),
        (schema::InstanceMode::Fresh, None) => Ok(Instances::Fresh),
        (schema::InstanceMode::Warm, None) => Ok(Instances::Warm { recycle_after: DEFAULT_RECYCLE_AFTER }),
        (schema::InstanceMode::Warm, Some(n)) => match u32::try_from(*n.get_ref()) {
            Ok(v @ 1..=100_000_000) => Ok(Instances::Warm { recycle_after: v }),
            _ => Err(ManifestError::at(
                file,
                n.span(),
                format!("recycle_after = {} is out of range; expected 1 to 100000000", n.get_ref()),
            )),
        },
    }
}

fn resolve_retry(file: &SourceText, raw: schema::RetrySection) -> Result<RetryPolicy, ManifestError> {
    let defaults = RetryPolicy::default();
    let max_attempts = match raw.max_attempts {
        Some(n) => match u32::try_from(*n.get_ref()) {
            Ok(v @ 1..=1000) => v,
            _ => {
                return Err(ManifestError::at(
                    file,
                    n.span(),
                    format!("max_attempts = {} is out of range; expected 1 to 1000", n.get_ref()),
                ));
            }
        },
        None => defaults.max_attempts,
    };
    let initial = raw.initial.map_or(defaults.initial, |d| d.0);
    let max = match raw.max {
        Some(m) if m.get_ref().0 < initial => {
            return Err(ManifestError::at(
                file,
                m.span(),
                format!("max = {} is shorter than initial = {}", m.get_ref(), HumanDuration(initial)),
            ));
        }
        Some(m) => m.into_inner().0,
        None => defaults.max.max(initial),
    };
    let multiplier = match raw.multiplier {
        Some(m) if !(1.0..=100.0).contains(m.get_ref()) => {
            return Err(ManifestError::at(
                file,
                m.span(),
                format!("multiplier = {} is out of range; expected 1.0 to 100.0", m.get_ref()),
            ));
        }
        Some(m) => m.into_inner(),
        None => defaults.multiplier,
    };
    let retry_on = match raw.retry_on {
        None => defaults.retry_on,
        Some(names) => {
            let mut kinds = std::collections::HashSet::new();
            for name in names {
                let kind = FailureKind::parse(name.get_ref())
                    .filter(|k| crate::retry::RETRYABLE.contains(k))
                    .ok_or_else(|| {
                        let accepted: Vec<String> =
                            crate::retry::RETRYABLE.iter().map(|k| format!("\"{k}\"")).collect();
                        ManifestError::at(
                            file,
                            name.span(),
                            format!(
                                "unknown or non-retryable failure kind {:?}; expected one of {}",
                                name.get_ref(),
                                accepted.join(", ")
                            ),
                        )
                    })?;
                kinds.insert(kind);
            }
            kinds
        }
    };
    Ok(RetryPolicy {
        max_attempts,
        backoff: raw.backoff.unwrap_or(defaults.backoff),
        initial,
        max,
        multiplier,
        jitter: raw.jitter.unwrap_or(defaults.jitter),
        retry_on,
    })
}

fn resolve_store(file: &SourceText, raw: schema::StoreSection) -> Result<StoreConfig, ManifestError> {
    let bounded = |v: Option<toml::Spanned<i64>>, key: &str, max: i64, default: usize| match v {
        Some(n) if !(1..=max).contains(n.get_ref()) => Err(ManifestError::at(
            file,
            n.span(),
            format!("{key} = {} is out of range; expected 1 to {max}", n.get_ref()),
        )),
        Some(n) => Ok(usize::try_from(n.into_inner()).unwrap_or(default)),
        None => Ok(default),
    };
    let backend = match raw.backend {
        Some(b) if !b.get_ref().compiled() => {
            return Err(ManifestError::at(
                file,
                b.span(),
                format!(
                    "backend = \"{0}\": this build of Sluice has no {0} store (it was built without the cargo \
                     feature `{0}`, on by default)",
                    b.get_ref().name()
                ),
            ));
        }
        Some(b) => b.into_inner(),
        None => Backend::Redb,
    };
    Ok(StoreConfig {
        backend,
        replicas: bounded(raw.replicas, "replicas", 5, 1)?,
        max_entries: bounded(raw.max_entries, "max_entries", 100_000_000, 100_000)?,
        max_outbox: bounded(raw.max_outbox, "max_outbox", 10_000_000, DEFAULT_MAX_OUTBOX)?,
    })
}

/// The subjects a source receives, as far as the manifest says: the core subject, or the
/// consumer's filters (none: the whole stream, whose subjects only the server knows).
fn source_subjects(source: &Source) -> &[SubjectPattern] {
    match source {
        Source::Core { subject, .. } => std::slice::from_ref(subject),
        Source::JetStream(js) => &js.filters,
    }
}

/// A dead letter the handler's own source receives again would fail again, be dead-lettered
/// again, and so on forever: refused.
fn check_dead_letter_loop(
    file: &SourceText,
    source: &Source,
    dl: &DeadLetter,
    span: std::ops::Range<usize>,
) -> Result<(), ManifestError> {
    let caught = source_subjects(source).iter().find(|p| p.matches(&dl.subject));
    let why = match (source, caught) {
        (_, Some(p)) => format!("this handler's source subject {:?} receives it", p.as_str()),
        (Source::JetStream(js), None) if js.filters.is_empty() && dl.stream.as_deref() == Some(&js.stream) => {
            format!("it is stored in stream {}, which this handler consumes whole", js.stream)
        }
        _ => return Ok(()),
    };
    Err(ManifestError::at(
        file,
        span,
        format!(
            "dead-letter subject {:?} loops back: {why}, so a dead letter would be handled (and fail) again; \
             choose a subject outside the source",
            dl.subject
        ),
    ))
}

/// A grant covering the handler's own source lets one message fan out into itself for ever;
/// refused unless `allow_publish_to_source = true` says the re-queueing is deliberate.
fn check_publish_to_source(
    file: &SourceText,
    source: &Source,
    publish: &[(SubjectPattern, std::ops::Range<usize>)],
) -> Result<(), ManifestError> {
    for (grant, span) in publish {
        if let Some(own) = source_subjects(source).iter().find(|s| grant.overlaps(s)) {
            return Err(ManifestError::at(
                file,
                span.clone(),
                format!(
                    "publish grant {:?} covers this handler's own source subject {:?}: its outputs would come \
                     back to it as input; narrow the grant, or set `allow_publish_to_source = true` in \
                     [capabilities] if the handler re-queues on purpose",
                    grant.as_str(),
                    own.as_str()
                ),
            ));
        }
    }
    Ok(())
}

fn resolve_dead_letter(file: &SourceText, raw: schema::DeadLetterSection) -> Result<DeadLetter, ManifestError> {
    let subject = raw.subject.get_ref();
    if let Err(e) = crate::subject::validate_literal(subject.as_str()) {
        return Err(ManifestError::at(file, raw.subject.span(), format!("dead-letter {e}")));
    }
    let create_stream = raw.create_stream.as_ref().is_some_and(|c| *c.get_ref());
    if create_stream && raw.stream.is_none() {
        let span = raw.create_stream.map(|c| c.span()).unwrap_or(raw.subject.span());
        return Err(ManifestError::at(
            file,
            span,
            "create_stream = true needs `stream = \"...\"`, the stream to create",
        ));
    }
    Ok(DeadLetter { subject: subject.as_str().to_owned(), stream: raw.stream.map(|s| s.0), create_stream })
}

/// Says what is wrong with a component path that is not a regular file, without opening it
/// (opening a FIFO blocks until a writer comes; reading `/dev/zero` never ends).
pub fn check_component_path(path: &Path) -> Result<(), String> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "component file not found: {} (paths are relative to the manifest's folder)",
                path.display()
            ));
        }
        Err(e) => return Err(format!("cannot read component {}: {e}", path.display())),
    };
    if meta.is_file() {
        return Ok(());
    }
    let what = if meta.is_dir() {
        "a folder"
    } else {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            let t = meta.file_type();
            if t.is_fifo() {
                "a FIFO (named pipe)"
            } else if t.is_char_device() || t.is_block_device() {
                "a device"
            } else if t.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            }
        }
        #[cfg(not(unix))]
        {
            "not a regular file"
        }
    };
    Err(format!("component path {} is {what}; expected a .wasm component file", path.display()))
}

/// serde's "missing field" names the field; say what it is for.
fn with_hint(message: &str) -> String {
    let hint = match message {
        "missing field `handler`" => "a manifest needs a [handler] table with `name` and `component`",
        "missing field `source`" => "a manifest needs a [source] table with the `subject` to subscribe to",
        "missing field `name`" => "[handler] needs `name = \"...\"`, unique across the runtime",
        "missing field `component`" => "[handler] needs `component = \"path/to/handler.wasm\"`",
        "missing field `subject`" => "[source] needs `subject = \"...\"`, the NATS subject to subscribe to",
        "missing field `key`" => {
            "[ordering] needs `key = \"...\"`, what messages that must stay in order share (\"json:/order/id\", \"header:Tenant\", ...)"
        }
        _ => return message.to_owned(),
    };
    format!("{message}: {hint}")
}

/// Every manifest in `paths`: files as given, directories for their `*.toml` files (sorted,
/// not recursive, hidden files skipped). Handler names must be unique across all of them.
///
/// Returns every error found, not just the first, so one run of `sluice validate` shows
/// them all.
pub fn load_all(paths: &[PathBuf]) -> Result<Vec<Manifest>, Vec<ManifestError>> {
    let mut errors = Vec::new();
    let mut manifests: Vec<Manifest> = Vec::new();
    for file in manifest_files(paths, &mut errors) {
        match load(&file) {
            Ok(m) => {
                if let Some(first) = manifests.iter().find(|other| other.name == m.name) {
                    errors.push(m.error_at(
                        m.spans.name.clone(),
                        format!(
                            "duplicate handler name {:?}: {} already declares it",
                            m.name,
                            first.file.path.display()
                        ),
                    ));
                } else {
                    manifests.push(m);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() { Ok(manifests) } else { Err(errors) }
}

/// The manifest files named by `paths`, expanding directories.
pub fn manifest_files(paths: &[PathBuf], errors: &mut Vec<ManifestError>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> =
                        entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| is_manifest_file(p)).collect();
                    found.sort();
                    files.extend(found);
                }
                Err(e) => errors.push(ManifestError::without_location(path, format!("cannot read folder: {e}"))),
            }
        } else if path.exists() {
            files.push(path.clone());
        } else {
            errors.push(ManifestError::without_location(path, "no such file or folder"));
        }
    }
    files
}

/// True for `*.toml` files whose name does not start with a dot.
pub fn is_manifest_file(path: &Path) -> bool {
    path.is_file() && is_manifest_name(path)
}

/// True for a path named like a manifest: `*.toml`, not starting with a dot (editors'
/// temporary files do). Whether it exists is not checked: a removed manifest matters too.
pub fn is_manifest_name(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "toml")
        && !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}
