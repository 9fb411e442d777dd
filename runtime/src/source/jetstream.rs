//! JetStream: a durable pull consumer per handler. Every Sluice process bound to the same
//! consumer pulls from it, so they share its messages; an unacknowledged message (a crash, a
//! lost process) is redelivered after the ack wait, to whichever process pulls next.
//!
//! The attempt number is JetStream's delivery count, so a retry sequence survives restarts.
//! A retry is a nak with the backoff delay; giving up publishes the dead letter, then terms
//! the message. If the dead-letter publish fails, the message is nak'd instead: it comes back
//! later and is dead-lettered then, without running the handler again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use crate::dlq::Original;
use crate::manifest::{JetStreamSource, Source};
use crate::metrics::Held;
use crate::pipeline::{self, Entry, History, Lane, Settle};

/// Failure histories of messages in a retry sequence, by stream sequence.
type Histories = Arc<Mutex<HashMap<u64, History>>>;

/// The pull consumer configuration a manifest asks for.
pub fn consumer_config(src: &JetStreamSource) -> pull::Config {
    let mut filters: Vec<String> = src.filters.iter().map(|f| f.as_str().to_owned()).collect();
    filters.sort();
    pull::Config {
        durable_name: Some(src.consumer.clone()),
        description: Some("Sluice handler consumer".to_owned()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: src.ack_wait,
        // Sluice counts attempts itself and dead-letters at `max_attempts`; the server must
        // keep redelivering past that, or a failed dead-letter publish would strand the
        // message.
        max_deliver: -1,
        max_ack_pending: src.max_ack_pending,
        filter_subjects: filters,
        ..Default::default()
    }
}

/// Finds or creates the handler's durable consumer. An existing consumer whose filter, ack
/// policy or type differs is a conflict (another deployment uses it differently) and is
/// refused; a different ack wait or ack-pending limit is updated in place.
pub async fn bind(js: &jetstream::Context, lane: &Lane) -> anyhow::Result<PullConsumer> {
    let spec = &lane.handler.spec;
    let Source::JetStream(src) = &spec.manifest.source else {
        anyhow::bail!("handler {} does not have a JetStream source", spec.name);
    };
    let what = format!("handler {}: consumer {} on stream {}", spec.name, src.consumer, src.stream);
    let stream = js
        .get_stream(&src.stream)
        .await
        .map_err(|e| anyhow::anyhow!("handler {}: stream {}: {e}", spec.name, src.stream))?;
    let wanted = consumer_config(src);
    match stream.consumer_info(&src.consumer).await {
        Ok(info) => {
            let have = &info.config;
            let mut have_filters = have.filter_subjects.clone();
            if let Some(f) = Some(&have.filter_subject).filter(|f| !f.is_empty()) {
                have_filters.push(f.clone());
            }
            have_filters.sort();
            let mut conflicts = Vec::new();
            if have.deliver_subject.is_some() {
                conflicts.push("it is a push consumer; Sluice needs a pull consumer".to_owned());
            }
            if have.ack_policy != AckPolicy::Explicit {
                conflicts.push(format!("its ack policy is {:?}, Sluice needs explicit acks", have.ack_policy));
            }
            if have_filters != wanted.filter_subjects {
                conflicts.push(format!(
                    "its filter subjects are {:?}, the manifest asks for {:?}",
                    have_filters, wanted.filter_subjects
                ));
            }
            if !conflicts.is_empty() {
                anyhow::bail!(
                    "{what} exists with a conflicting configuration: {}; delete the consumer or make the manifest match",
                    conflicts.join("; ")
                );
            }
            if have.ack_wait != wanted.ack_wait
                || have.max_ack_pending != wanted.max_ack_pending
                || have.max_deliver != wanted.max_deliver
            {
                tracing::info!(
                    handler = &*spec.name,
                    "updating {what}: ack_wait {:?}, max_ack_pending {}",
                    wanted.ack_wait,
                    wanted.max_ack_pending
                );
                stream.update_consumer(wanted).await.map_err(|e| anyhow::anyhow!("{what}: cannot update: {e}"))?;
            }
        }
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
            tracing::info!(handler = &*spec.name, "creating {what}");
            stream.create_consumer(wanted).await.map_err(|e| anyhow::anyhow!("{what}: cannot create: {e}"))?;
        }
        Err(e) => anyhow::bail!("{what}: {e}"),
    }
    stream.get_consumer(&src.consumer).await.map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// How long one pull request stays open on the server.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// Pulls and processes messages until `stop` turns true; then stops pulling and lets the
/// calls in flight finish (and ack). Messages pulled but not started are not acked and come
/// back after the ack wait.
///
/// What one pull has delivered travels as one batch through the pipeline: once a message is
/// here, every further message already received (up to the free concurrency) joins it.
/// Each message is handled by the version in `versions` when its batch forms (a hot reload
/// swaps it); redeliveries naturally get the version current then.
pub async fn serve(versions: watch::Receiver<Lane>, consumer: PullConsumer, mut stop: watch::Receiver<bool>) {
    let spec = versions.borrow().handler.spec.clone();
    // The consumer's own ack wait, as the server has it (`bind` made it the manifest's).
    let ack_wait = consumer.cached_info().config.ack_wait;
    let concurrency = spec.manifest.limits.max_concurrency as usize;
    let permits = Arc::new(Semaphore::new(concurrency));
    let histories: Histories = Arc::default();
    let mut in_flight = JoinSet::new();
    // Pull no more than can run at once: a message waiting in a local buffer would reach
    // its ack wait and be redelivered elsewhere while still queued here.
    // Pull requests expire after 2 s rather than async-nats's 30 s: when the client's count
    // of outstanding messages drifts from the server's (seen in about one benchmark run in
    // five), the stream waits for its pull to expire before asking again (a 30 s stall with
    // the default, up to 10 s with 5 s), so this bounds such a stall to a few seconds. An idle
    // handler pays one pull request every 2 s.
    // A rate-limited handler pulls no more than its burst at a time: what it pulled must
    // start before its ack wait.
    let limiter = spec.manifest.limits.rate.map(crate::rate::Limiter::new);
    let per_pull = limiter.as_ref().map_or(concurrency, |l| l.burst().clamp(1, concurrency));
    let pulls = consumer.stream().max_messages_per_batch(per_pull).expires(PULL_EXPIRES);
    let mut messages = match pulls.messages().await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(handler = &*spec.name, "cannot pull from the consumer: {e}");
            return;
        }
    };
    loop {
        // A full outbox pauses the handler: no new work until the relay catches up (the
        // messages already pulled wait, kept alive by nothing: past their ack wait they are
        // redelivered, to this process or another).
        let relay = versions.borrow().relay.clone();
        if let Some(relay) = relay {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                () = relay.room() => {}
            }
        }
        let permit = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
        };
        if let Some(limiter) = &limiter {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                () = limiter.take() => {}
            }
        }
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            next = messages.next() => next,
        };
        match next {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(handler = &*spec.name, "pulling messages: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some(Ok(msg)) => {
                let mut batch = vec![(msg, permit)];
                while batch.len() < concurrency {
                    let Ok(permit) = permits.clone().try_acquire_owned() else { break };
                    if limiter.as_ref().is_some_and(|l| !l.try_take()) {
                        break;
                    }
                    match messages.next().now_or_never() {
                        Some(Some(Ok(msg))) => batch.push((msg, permit)),
                        Some(Some(Err(e))) => {
                            tracing::warn!(handler = &*spec.name, "pulling messages: {e}");
                            break;
                        }
                        Some(None) | None => break,
                    }
                }
                let lane = versions.borrow().clone();
                // Boxed: the task then holds a pointer, not the whole state machine, which
                // tokio would otherwise copy as it creates, finishes and reads the task.
                in_flight.spawn(Box::pin(process(lane, batch, histories.clone(), ack_wait)));
                while in_flight.try_join_next().is_some() {}
            }
        }
    }
    drop(messages);
    while in_flight.join_next().await.is_some() {}
    tracing::debug!(handler = &*spec.name, "stopped");
}

/// What a message of a batch holds: its concurrency permit until its call ends, and its place
/// in the count of messages this process holds until it is settled. Messages past their call
/// (waiting for their commit) are bounded by the consumer's `max_ack_pending`.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    _held: Held,
}

impl pipeline::Tag for Slot {
    fn call_ended(&mut self) {
        self.permit = None;
    }
}

/// Runs one batch through the pipeline and settles each message as soon as its outcome is
/// known.
async fn process(
    lane: Lane,
    batch: Vec<(jetstream::Message, OwnedSemaphorePermit)>,
    histories: Histories,
    ack_wait: Duration,
) {
    let spec = lane.handler.spec.clone();
    let received = Instant::now();
    let mut msgs = Vec::with_capacity(batch.len());
    let mut metas = Vec::with_capacity(batch.len());
    let mut slots = Vec::with_capacity(batch.len());
    for (msg, permit) in batch {
        match msg.info() {
            Ok(info) => {
                metas.push((info.stream.to_owned(), info.stream_sequence, info.delivered));
                slots.push(Slot { permit: Some(permit), _held: lane.metrics.hold() });
                msgs.push(msg);
            }
            Err(e) => tracing::error!(handler = &*spec.name, "message without JetStream metadata: {e}"),
        }
    }
    lane.metrics.batch(msgs.len() as u64);
    let entries: Vec<(Entry<'_>, Slot)> = {
        let mut taken = histories.lock().ok();
        msgs.iter()
            .zip(&metas)
            .zip(slots)
            .map(|((msg, (stream, seq, delivered)), slot)| {
                let attempt = u32::try_from(*delivered).unwrap_or(u32::MAX);
                let mut wit = pipeline::to_wit(&msg.message);
                // A stream message's reply subject is JetStream's ack subject, not a
                // requester: a handler's `reply` there would ack, nak or term its own message.
                wit.reply_to = None;
                let entry = Entry {
                    original: Original {
                        subject: msg.subject.as_str(),
                        headers: msg.headers.as_ref(),
                        payload: &msg.payload,
                        stream: Some((stream.as_str(), *seq)),
                    },
                    wit: Arc::new(wit),
                    attempt,
                    history: taken.as_mut().and_then(|h| h.remove(seq)),
                    received,
                    span: lane.span(&msg.message, attempt),
                };
                (entry, slot)
            })
            .collect()
    };
    let settled: Vec<AtomicBool> = msgs.iter().map(|_| AtomicBool::new(false)).collect();
    let work = pipeline::run_batch(&lane, entries, |i, slot, settle, history| {
        let (msg, seq, settled, histories, lane) = (&msgs[i], metas[i].1, &settled[i], &histories, &lane);
        async move {
            apply(lane, msg, seq, histories, settle, history).await;
            settled.store(true, Ordering::Relaxed);
            drop(slot);
        }
    });
    with_progress_acks(&msgs, &settled, ack_wait, work).await;
}

/// Acts on a message's settlement: ack, nak with the retry delay, term after its dead letter,
/// or keep it (nak) when the dead letter could not be stored.
async fn apply(
    lane: &Lane,
    msg: &jetstream::Message,
    seq: u64,
    histories: &Histories,
    settle: Settle,
    history: Option<History>,
) {
    let keep = |history: Option<History>| {
        if let (Some(history), Ok(mut h)) = (history, histories.lock()) {
            h.insert(seq, history);
        }
    };
    match settle {
        Settle::Done | Settle::Skipped => {
            if let Err(e) = msg.ack().await {
                tracing::warn!("cannot ack (it will be redelivered): {e}");
            }
        }
        Settle::Halt => {}
        Settle::Retry(delay) => {
            keep(history);
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!("cannot nak (it will be redelivered after the ack wait): {e}");
            }
        }
        Settle::GaveUp { parked: true, .. } => {
            if let Err(e) = msg.ack_with(AckKind::Term).await {
                tracing::warn!("cannot term the dead-lettered message: {e}");
            }
        }
        Settle::GaveUp { parked: false, .. } => {
            keep(history);
            let delay = lane.handler.spec.manifest.retry.max;
            tracing::error!("keeping the message that could not be dead-lettered (back in {delay:?})");
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!("cannot nak: {e}");
            }
        }
    }
}

/// Runs `work`, telling JetStream every half ack wait that the messages of the batch not yet
/// settled are still in progress, so that a long run (slow outputs, a slow dead-letter
/// stream) is not redelivered meanwhile.
async fn with_progress_acks<T>(
    msgs: &[jetstream::Message],
    settled: &[AtomicBool],
    ack_wait: Duration,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let period = ack_wait / 2;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            result = &mut work => return result,
            _ = ticker.tick() => {
                for (msg, settled) in msgs.iter().zip(settled) {
                    if !settled.load(Ordering::Relaxed)
                        && let Err(e) = msg.ack_with(AckKind::Progress).await
                    {
                        tracing::warn!("cannot send an in-progress ack: {e}");
                    }
                }
            }
        }
    }
}
