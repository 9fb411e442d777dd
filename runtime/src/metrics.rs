//! Prometheus metrics, one registry per runtime (not the process-global recorder, so that
//! several runtimes in one process — tests, embedders — keep their numbers apart).
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `sluice_messages_received_total` | counter | handler | deliveries taken from NATS (a redelivery counts again) |
//! | `sluice_messages_succeeded_total` | counter | handler | messages handled: outputs stored, source acked |
//! | `sluice_messages_retried_total` | counter | handler | failed attempts that will be retried |
//! | `sluice_messages_dead_lettered_total` | counter | handler, kind | messages given up on and parked, by verdict kind |
//! | `sluice_messages_skipped_duplicate_total` | counter | handler | duplicates of handled keys, acked without running (or found by an optimistic nats-kv commit, which kept nothing) |
//! | `sluice_failures_total` | counter | handler, kind | failed attempts, by failure kind (trap, timeout, ...) |
//! | `sluice_replies_refused_total` | counter | handler | replies (and failure replies) not sent because the reply subject is not a reply inbox |
//! | `sluice_handler_duration_seconds` | histogram | handler | one call of the handler, instantiation included |
//! | `sluice_message_latency_seconds` | histogram | handler | from receipt to the message's settlement (ack, retry scheduled, dead letter) |
//! | `sluice_batch_messages` | histogram | handler | messages per batch a transport handed to the pipeline (a pull's worth, or what a subscription had buffered) |
//! | `sluice_in_flight` | gauge | handler | calls running now |
//! | `sluice_outbox_entries` | gauge | handler | committed outputs waiting in the outbox for the relay |
//! | `sluice_outbox_sent_total` | counter | handler | outbox entries the relay published (and, where a stream captures them, had acknowledged) |
//! | `sluice_outbox_oldest_timestamp_seconds` | gauge | handler | when the oldest entry still waiting was committed (Unix time; 0 when the outbox is empty): its age is `time() - this` |
//! | `sluice_outbox_failures_total` | counter | handler, reason | relay rounds that failed, by reason (`timeout`, `no-stream`, `refused`, `connection`); the entries stay and are re-sent with back-off |
//! | `sluice_outbox_dropped_total` | counter | handler | outbox entries dropped because no server will ever take them (larger than the server's `max_payload` or the stream's `max_msg_size`; logged with the subject) |
//! | `sluice_outbox_full_total` | counter | handler | times the handler stopped taking messages because its outbox was full |
//! | `sluice_ordering_keys` | gauge | handler | ordering keys with a message in flight or waiting (`[ordering]`) |
//! | `sluice_ordering_waiting` | gauge | handler | messages waiting behind an earlier message of their key |
//! | `sluice_ordering_gap_keys` | gauge | handler | ordering keys whose next sequence number has not come, with later ones waiting (`[ordering] sequence`) |
//! | `sluice_ordering_sequence_gaps_total` | counter | handler | gaps given up on after `max_wait` or past `max_buffered` (then `on_gap` applies) |
//! | `sluice_ordering_sequence_skipped_total` | counter | handler | messages skipped for a sequence number the key had passed (duplicates, or late after a gap) |
//! | `sluice_ordering_parked_keys` | gauge | handler | ordering keys parked after a dead letter (`on_poison = "park"`), until released |
//! | `sluice_handler_info` | gauge (1) | handler, digest | the version being served |
//! | `sluice_http_requests_total` | counter | handler, host, status | outgoing `wasi:http` requests, by status class (`2xx`, `3xx`, `4xx`, `5xx`, `error`: no response, `denied`: refused by the grants or limits before connecting) |
//! | `sluice_http_request_duration_seconds` | histogram | handler, host | one outgoing request, from send to the response head (refusals not included) |
//! | `sluice_nats_connected` | gauge | | 1 while the NATS connection is up |
//! | `sluice_nats_secondary_active` | gauge | | with `--nats-secondary`: 1 while outputs go to the secondary cluster (the primary did not take the last one it was offered), 0 while they go to the primary |
//! | `sluice_outputs_secondary_total` | counter | | outputs the primary did not take that the secondary cluster stored instead (passive sending) |
//! | `sluice_syphon_moved_total` | counter | handler | messages the syphon moved from the handler's backlog stream on the secondary into the primary |
//! | `sluice_nats_reconnects_total` | counter | | reconnections since start |
//! | `sluice_nats_slow_consumer_drops_total` | counter | | core NATS messages the client dropped because a subscription's buffer was full (JetStream messages are redelivered instead) |

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serde::Serialize;

use crate::failure::FailureKind;

const META: Metadata<'static> = Metadata::new("sluice", metrics::Level::INFO, Some(module_path!()));

/// Histogram buckets in seconds: 100 µs to 30 s.
const BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Batch-size buckets: 1 to 1024 messages.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Why a relay round failed: the stream did not answer in time, no stream captures the
/// subject (any more), the server refused the message (a limit, a lame duck), or the
/// connection is down.
pub const OUTBOX_FAILURES: [&str; 4] = ["timeout", "no-stream", "refused", "connection"];

/// The metrics of one runtime.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    handlers: Mutex<HashMap<String, Arc<HandlerMetrics>>>,
    // The connection's state, set by the command line's connection callback.
    #[cfg_attr(not(feature = "cli"), expect(dead_code, reason = "set by the command line's connection callback"))]
    pub(crate) nats_connected: Gauge,
    #[cfg_attr(not(feature = "cli"), expect(dead_code, reason = "set by the command line's connection callback"))]
    pub(crate) nats_reconnects: Counter,
    #[cfg_attr(not(feature = "cli"), expect(dead_code, reason = "set by the command line's connection callback"))]
    pub(crate) nats_dropped: Counter,
    pub(crate) secondary_active: Gauge,
    pub(crate) secondary_sent: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let builder = PrometheusBuilder::new();
        // Only an empty bucket list fails; ours are not empty.
        let builder = builder
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full("sluice_batch_messages".into()), BATCH_BUCKETS))
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        describe(&recorder);
        let nats_connected = recorder.register_gauge(&Key::from_name("sluice_nats_connected"), &META);
        let nats_reconnects = recorder.register_counter(&Key::from_name("sluice_nats_reconnects_total"), &META);
        let nats_dropped = recorder.register_counter(&Key::from_name("sluice_nats_slow_consumer_drops_total"), &META);
        let secondary_active = recorder.register_gauge(&Key::from_name("sluice_nats_secondary_active"), &META);
        let secondary_sent = recorder.register_counter(&Key::from_name("sluice_outputs_secondary_total"), &META);
        Metrics {
            recorder,
            handle,
            handlers: Mutex::default(),
            nats_connected,
            nats_reconnects,
            nats_dropped,
            secondary_active,
            secondary_sent,
        }
    }
}

fn describe(r: &PrometheusRecorder) {
    let d = |name: &'static str, unit: Option<Unit>, text: &'static str| (name, unit, text);
    let counters = [
        d("sluice_messages_received_total", None, "Deliveries taken from NATS (a redelivery counts again)."),
        d("sluice_messages_succeeded_total", None, "Messages handled: outputs stored, source acked."),
        d("sluice_messages_retried_total", None, "Failed attempts that will be retried."),
        d("sluice_messages_dead_lettered_total", None, "Messages given up on and parked, by verdict kind."),
        d("sluice_messages_skipped_duplicate_total", None, "Duplicates of handled keys, acked without running."),
        d("sluice_failures_total", None, "Failed attempts, by failure kind."),
        d(
            "sluice_replies_refused_total",
            None,
            "Replies not sent because the reply subject is not a reply inbox (_INBOX.> or capabilities.reply_to).",
        ),
        d(
            "sluice_outbox_sent_total",
            None,
            "Outbox entries the relay published (and had acknowledged by their stream).",
        ),
        d("sluice_outbox_failures_total", None, "Relay rounds that failed; their entries stay and are re-sent."),
        d(
            "sluice_outbox_dropped_total",
            None,
            "Outbox entries dropped because no server will take them (too large, invalid subject).",
        ),
        d("sluice_outbox_full_total", None, "Times the handler stopped taking messages because its outbox was full."),
        d("sluice_nats_reconnects_total", None, "NATS reconnections since start."),
        d(
            "sluice_http_requests_total",
            None,
            "Outgoing HTTP requests of handlers, by host and status class (2xx..5xx, error, denied).",
        ),
        d(
            "sluice_outputs_secondary_total",
            None,
            "Outputs the primary cluster did not take that the secondary stored instead.",
        ),
        d("sluice_syphon_moved_total", None, "Backlog messages moved from the secondary cluster into the primary."),
        d(
            "sluice_nats_slow_consumer_drops_total",
            None,
            "Core NATS messages dropped by the client because a subscription's buffer was full.",
        ),
    ];
    for (name, _, text) in counters {
        r.describe_counter(name.into(), None, text.into());
    }
    r.describe_histogram(
        "sluice_handler_duration_seconds".into(),
        Some(Unit::Seconds),
        "One call of the handler, instantiation included.".into(),
    );
    r.describe_histogram(
        "sluice_message_latency_seconds".into(),
        Some(Unit::Seconds),
        "From receipt of a delivery to its settlement (ack, retry scheduled, or dead letter).".into(),
    );
    r.describe_histogram(
        "sluice_batch_messages".into(),
        None,
        "Messages per batch handed to the pipeline (a pull's worth, or what a subscription had buffered).".into(),
    );
    r.describe_histogram(
        "sluice_http_request_duration_seconds".into(),
        Some(Unit::Seconds),
        "One outgoing HTTP request of a handler, from send to the response head.".into(),
    );
    r.describe_gauge("sluice_in_flight".into(), None, "Handler calls running now.".into());
    r.describe_gauge("sluice_outbox_entries".into(), None, "Committed outputs waiting in the outbox.".into());
    r.describe_gauge(
        "sluice_outbox_oldest_timestamp_seconds".into(),
        None,
        "When the oldest output still waiting in the outbox was committed (Unix time; 0 when empty).".into(),
    );
    r.describe_gauge("sluice_ordering_keys".into(), None, "Ordering keys with a message in flight or waiting.".into());
    r.describe_gauge(
        "sluice_ordering_waiting".into(),
        None,
        "Messages waiting behind an earlier message of their ordering key.".into(),
    );
    r.describe_gauge(
        "sluice_ordering_gap_keys".into(),
        None,
        "Ordering keys waiting for a missing sequence number, with later ones held back.".into(),
    );
    r.describe_counter(
        "sluice_ordering_sequence_gaps_total".into(),
        None,
        "Sequence gaps given up on (max_wait or max_buffered); on_gap decided what followed.".into(),
    );
    r.describe_counter(
        "sluice_ordering_sequence_skipped_total".into(),
        None,
        "Messages skipped for a sequence number their key had already passed.".into(),
    );
    r.describe_gauge(
        "sluice_ordering_parked_keys".into(),
        None,
        "Ordering keys parked after a dead letter, until released.".into(),
    );
    r.describe_gauge("sluice_handler_info".into(), None, "The version (component digest) being served.".into());
    r.describe_gauge("sluice_nats_connected".into(), None, "1 while the NATS connection is up.".into());
    r.describe_gauge(
        "sluice_nats_secondary_active".into(),
        None,
        "1 while outputs go to the secondary cluster, 0 while they go to the primary.".into(),
    );
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// The metrics of `handler` (the same ones across versions of the handler).
    pub fn handler(&self, handler: &str) -> Arc<HandlerMetrics> {
        let Ok(mut handlers) = self.handlers.lock() else {
            return Arc::new(HandlerMetrics::new(&self.recorder, handler));
        };
        handlers
            .entry(handler.to_owned())
            .or_insert_with(|| Arc::new(HandlerMetrics::new(&self.recorder, handler)))
            .clone()
    }

    /// Counts `n` messages the syphon of `handler` moved into the primary cluster.
    pub fn syphon_moved(&self, handler: &str, n: u64) {
        let key = Key::from_parts("sluice_syphon_moved_total", labels(&[("handler", handler)]));
        self.recorder.register_counter(&key, &META).increment(n);
    }

    /// Counts one outgoing HTTP request of `handler` to `host`, ended with `status` (a class:
    /// `2xx`..`5xx`, `error`, `denied`), and its latency unless it was refused.
    pub fn http_request(&self, handler: &str, host: &str, status: &str, took: Duration) {
        let key = Key::from_parts(
            "sluice_http_requests_total",
            labels(&[("handler", handler), ("host", host), ("status", status)]),
        );
        self.recorder.register_counter(&key, &META).increment(1);
        if status != "denied" {
            let key = Key::from_parts(
                "sluice_http_request_duration_seconds",
                labels(&[("handler", handler), ("host", host)]),
            );
            self.recorder.register_histogram(&key, &META).record(took.as_secs_f64());
        }
    }

    /// Marks `digest` as the version `handler` serves (and an older one as no longer).
    pub fn version(&self, handler: &str, digest: &str, serving: bool) {
        let key = Key::from_parts("sluice_handler_info", labels(&[("handler", handler), ("digest", digest)]));
        self.recorder.register_gauge(&key, &META).set(if serving { 1.0 } else { 0.0 });
    }
}

fn labels(pairs: &[(&'static str, &str)]) -> Vec<Label> {
    pairs.iter().map(|(k, v)| Label::new(*k, SharedString::from(v.to_string()))).collect()
}

/// One handler's metrics: Prometheus handles, and plain counters for the JSON status.
pub struct HandlerMetrics {
    received: Counter,
    succeeded: Counter,
    retried: Counter,
    skipped: Counter,
    replies_refused: Counter,
    duration: Histogram,
    latency: Histogram,
    batch: Histogram,
    in_flight: Gauge,
    outbox_entries: Gauge,
    outbox_oldest: Gauge,
    outbox_sent: Counter,
    outbox_failures: HashMap<&'static str, Counter>,
    outbox_full: Counter,
    outbox_dropped: Counter,
    ordering: crate::ordering::Gauges,
    parked_keys: Gauge,
    failures: HashMap<FailureKind, Counter>,
    dead_lettered: HashMap<FailureKind, Counter>,
    counts: Counts,
}

impl std::fmt::Debug for HandlerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerMetrics").field("counts", &self.counts.snapshot()).finish()
    }
}

/// The counters, readable.
#[derive(Debug, Default)]
struct Counts {
    received: AtomicU64,
    succeeded: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    skipped: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    /// Messages received and not yet settled (running, or waiting for a retry in this
    /// process): what a shutdown cut short abandons.
    held: AtomicU64,
    outbox: AtomicU64,
    /// Unix ms of the oldest outbox entry; 0 when empty.
    outbox_oldest_ms: AtomicU64,
}

/// A snapshot of a handler's counters, for `/handlers`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CountsSnapshot {
    pub received: u64,
    pub succeeded: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub skipped_duplicates: u64,
    pub failed_attempts: u64,
    pub in_flight: u64,
    /// Committed outputs waiting in the outbox.
    #[serde(default)]
    pub outbox: u64,
    /// Unix ms of the oldest of them (0 when none).
    #[serde(default)]
    pub outbox_oldest_ms: u64,
}

impl Counts {
    fn snapshot(&self) -> CountsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountsSnapshot {
            received: g(&self.received),
            succeeded: g(&self.succeeded),
            retried: g(&self.retried),
            dead_lettered: g(&self.dead_lettered),
            skipped_duplicates: g(&self.skipped),
            failed_attempts: g(&self.failed),
            in_flight: g(&self.in_flight),
            outbox: g(&self.outbox),
            outbox_oldest_ms: g(&self.outbox_oldest_ms),
        }
    }
}

impl HandlerMetrics {
    fn new(r: &PrometheusRecorder, handler: &str) -> Self {
        let h = |name: &'static str| Key::from_parts(name, labels(&[("handler", handler)]));
        let by_kind = |name: &'static str| {
            FailureKind::ALL
                .into_iter()
                .map(|k| {
                    (
                        k,
                        r.register_counter(
                            &Key::from_parts(name, labels(&[("handler", handler), ("kind", k.as_str())])),
                            &META,
                        ),
                    )
                })
                .collect()
        };
        HandlerMetrics {
            received: r.register_counter(&h("sluice_messages_received_total"), &META),
            succeeded: r.register_counter(&h("sluice_messages_succeeded_total"), &META),
            retried: r.register_counter(&h("sluice_messages_retried_total"), &META),
            skipped: r.register_counter(&h("sluice_messages_skipped_duplicate_total"), &META),
            replies_refused: r.register_counter(&h("sluice_replies_refused_total"), &META),
            duration: r.register_histogram(&h("sluice_handler_duration_seconds"), &META),
            latency: r.register_histogram(&h("sluice_message_latency_seconds"), &META),
            batch: r.register_histogram(&h("sluice_batch_messages"), &META),
            in_flight: r.register_gauge(&h("sluice_in_flight"), &META),
            outbox_entries: r.register_gauge(&h("sluice_outbox_entries"), &META),
            outbox_sent: r.register_counter(&h("sluice_outbox_sent_total"), &META),
            outbox_oldest: r.register_gauge(&h("sluice_outbox_oldest_timestamp_seconds"), &META),
            outbox_failures: OUTBOX_FAILURES
                .into_iter()
                .map(|reason| {
                    let key = Key::from_parts(
                        "sluice_outbox_failures_total",
                        labels(&[("handler", handler), ("reason", reason)]),
                    );
                    (reason, r.register_counter(&key, &META))
                })
                .collect(),
            outbox_full: r.register_counter(&h("sluice_outbox_full_total"), &META),
            outbox_dropped: r.register_counter(&h("sluice_outbox_dropped_total"), &META),
            ordering: crate::ordering::Gauges {
                keys: r.register_gauge(&h("sluice_ordering_keys"), &META),
                waiting: r.register_gauge(&h("sluice_ordering_waiting"), &META),
                gap_keys: r.register_gauge(&h("sluice_ordering_gap_keys"), &META),
                gaps: r.register_counter(&h("sluice_ordering_sequence_gaps_total"), &META),
                skipped: r.register_counter(&h("sluice_ordering_sequence_skipped_total"), &META),
            },
            parked_keys: r.register_gauge(&h("sluice_ordering_parked_keys"), &META),
            failures: by_kind("sluice_failures_total"),
            dead_lettered: by_kind("sluice_messages_dead_lettered_total"),
            counts: Counts::default(),
        }
    }

    /// `n` deliveries at once (a batch).
    pub fn received_many(&self, n: u64) {
        self.received.increment(n);
        self.counts.received.fetch_add(n, Ordering::Relaxed);
    }
    /// A batch of `n` deliveries received: counted, and its size recorded.
    pub fn batch(&self, n: u64) {
        self.received_many(n);
        self.batch.record(n as f64);
    }
    pub fn succeeded(&self) {
        self.succeeded.increment(1);
        self.counts.succeeded.fetch_add(1, Ordering::Relaxed);
    }
    pub fn retried(&self) {
        self.retried.increment(1);
        self.counts.retried.fetch_add(1, Ordering::Relaxed);
    }
    pub fn skipped(&self) {
        self.skipped.increment(1);
        self.counts.skipped.fetch_add(1, Ordering::Relaxed);
    }
    /// The outbox now holds `n` entries, the oldest committed at `oldest_ms` (Unix ms).
    pub fn outbox_depth(&self, n: usize, oldest_ms: Option<u64>) {
        self.outbox_entries.set(n as f64);
        let oldest = oldest_ms.unwrap_or(0);
        self.outbox_oldest.set(oldest as f64 / 1000.0);
        self.counts.outbox.store(n as u64, Ordering::Relaxed);
        self.counts.outbox_oldest_ms.store(oldest, Ordering::Relaxed);
    }
    /// The relay sent `n` entries.
    pub fn outbox_sent(&self, n: u64) {
        self.outbox_sent.increment(n);
    }
    /// A relay round failed, for `reason` (one of [`OUTBOX_FAILURES`]).
    pub fn outbox_failed(&self, reason: &str) {
        if let Some(c) = self.outbox_failures.get(reason) {
            c.increment(1);
        }
    }
    /// The relay dropped an entry no server will take.
    pub fn outbox_dropped(&self) {
        self.outbox_dropped.increment(1);
    }
    /// The handler paused because its outbox was full.
    pub fn outbox_full(&self) {
        self.outbox_full.increment(1);
    }
    /// The gauge of the handler's parked ordering keys.
    pub fn parked_keys(&self) -> Gauge {
        self.parked_keys.clone()
    }
    /// The gauges a handler's ordering sequencer keeps up to date.
    pub fn ordering(&self) -> crate::ordering::Gauges {
        self.ordering.clone()
    }
    pub fn reply_refused(&self) {
        self.replies_refused.increment(1);
    }
    pub fn failed(&self, kind: FailureKind) {
        if let Some(c) = self.failures.get(&kind) {
            c.increment(1);
        }
        self.counts.failed.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dead_lettered(&self, kind: FailureKind) {
        if let Some(c) = self.dead_lettered.get(&kind) {
            c.increment(1);
        }
        self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }
    /// `n` calls handed to the guest threads at once (a batch).
    pub fn calls_started(&self, n: u64) {
        if n > 0 {
            self.in_flight.increment(n as f64);
            self.counts.in_flight.fetch_add(n, Ordering::Relaxed);
        }
    }
    pub fn call_ended(&self, took: Duration) {
        self.in_flight.decrement(1.0);
        self.counts.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.duration.record(took.as_secs_f64());
    }
    pub fn settled(&self, since_receipt: Duration) {
        self.latency.record(since_receipt.as_secs_f64());
    }
    pub fn snapshot(&self) -> CountsSnapshot {
        self.counts.snapshot()
    }

    /// Counts a message as held by this process until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>) -> Held {
        self.counts.held.fetch_add(1, Ordering::Relaxed);
        Held(self.clone())
    }

    /// Messages held now (see [`hold`](Self::hold)).
    pub fn held(&self) -> u64 {
        self.counts.held.load(Ordering::Relaxed)
    }
}

/// A message held by this process; see [`HandlerMetrics::hold`].
#[derive(Debug)]
pub struct Held(Arc<HandlerMetrics>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.counts.held.fetch_sub(1, Ordering::Relaxed);
    }
}
