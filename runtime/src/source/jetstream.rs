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
use crate::ordering::Sequencer;
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
    // An ordered handler's messages wait behind their key here, kept alive by in-progress
    // acks until their turn.
    let ordering = spec.manifest.ordering.clone();
    let mut sequencer = ordering.as_ref().map(|_| Sequencer::new(versions.borrow().metrics.ordering()));
    let _keepalive = sequencer.as_ref().map(|s| KeepAlive::start(s.watcher(), ack_wait));
    let max_waiting = ordering.as_ref().map_or(usize::MAX, |o| o.max_waiting);
    let has_room = |s: &Option<Sequencer<jetstream::Message>>| s.as_ref().is_none_or(|s| s.waiting() < max_waiting);
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
        // An ordered handler at its bound of waiting messages pulls nothing new until a key
        // moves on.
        let room = has_room(&sequencer);
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            ready = next_ready(&mut sequencer) => Some(Ok(ready)),
            next = messages.next(), if room => match next {
                None => break,
                Some(Ok(msg)) => Some(Err(msg)),
                Some(Err(e)) => {
                    tracing::warn!(handler = &*spec.name, "pulling messages: {e}");
                    None
                }
            },
        };
        let first = match next {
            None => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Some(Ok((msg, turn))) => Some((msg, Some(turn))),
            Some(Err(msg)) => in_order(&sequencer, ordering.as_ref(), msg),
        };
        // Queued behind its key: the permit goes back.
        let Some((msg, turn)) = first else { continue };
        let mut batch = vec![(msg, permit, turn)];
        while batch.len() < concurrency {
            let Ok(permit) = permits.clone().try_acquire_owned() else { break };
            if limiter.as_ref().is_some_and(|l| !l.try_take()) {
                break;
            }
            if let Some((msg, turn)) = sequencer.as_mut().and_then(Sequencer::try_ready) {
                batch.push((msg, permit, Some(turn)));
                continue;
            }
            if !has_room(&sequencer) {
                break;
            }
            match messages.next().now_or_never() {
                Some(Some(Ok(msg))) => {
                    if let Some((msg, turn)) = in_order(&sequencer, ordering.as_ref(), msg) {
                        batch.push((msg, permit, turn));
                    }
                }
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
        in_flight.spawn(Box::pin(process(lane, batch, histories.clone(), ack_wait, stop.clone())));
        while in_flight.try_join_next().is_some() {}
    }
    drop(messages);
    while in_flight.join_next().await.is_some() {}
    // What waited behind its key goes back to the broker now, each key's in its order
    // (redeliveries come before new messages), rather than after its ack wait.
    if let Some(sequencer) = &mut sequencer {
        for msg in sequencer.drain() {
            if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
                tracing::warn!(handler = &*spec.name, "cannot give back a waiting message: {e}");
            }
        }
    }
    tracing::debug!(handler = &*spec.name, "stopped");
}

/// The next message of an ordered handler whose turn came; never, without ordering.
async fn next_ready(sequencer: &mut Option<Sequencer<jetstream::Message>>) -> (jetstream::Message, Turn) {
    match sequencer {
        Some(s) => s.ready().await,
        None => std::future::pending().await,
    }
}

/// A received message through the handler's sequencer: with its key's turn when it may go
/// now, `None` when it waits behind its key. Without ordering, or without a key (it then runs
/// unordered, or the gate dead-letters it), it goes at once without a turn.
fn in_order(
    sequencer: &Option<Sequencer<jetstream::Message>>,
    ordering: Option<&crate::ordering::Ordering>,
    msg: jetstream::Message,
) -> Option<(jetstream::Message, Option<Turn>)> {
    let (Some(sequencer), Some(ordering)) = (sequencer, ordering) else { return Some((msg, None)) };
    match ordering.key.derive(msg.subject.as_str(), msg.headers.as_ref(), &msg.payload) {
        Ok(key) => sequencer.offer(key, msg).map(|(msg, turn)| (msg, Some(turn))),
        Err(why) => {
            tracing::debug!("no ordering key ({why}): the message runs unordered");
            Some((msg, None))
        }
    }
}

type Turn = crate::ordering::Turn<jetstream::Message>;

/// Sends in-progress acks, every half ack wait, for the messages waiting behind their key,
/// so that they are not redelivered while earlier messages of their key run. Stops when
/// dropped.
struct KeepAlive(tokio::task::JoinHandle<()>);

impl KeepAlive {
    fn start(waiting: crate::ordering::Watcher<jetstream::Message>, ack_wait: Duration) -> Self {
        let period = ack_wait / 2;
        KeepAlive(tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                ticker.tick().await;
                for msg in waiting.waiting() {
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::warn!("cannot send an in-progress ack for a waiting message: {e}");
                    }
                }
            }
        }))
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a message of a batch holds: its concurrency permit until its call ends, its place
/// in the count of messages this process holds until it is settled, and for an ordered
/// handler its key's turn until it is settled. Messages past their call (waiting for their
/// commit) are bounded by the consumer's `max_ack_pending`.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    turn: Option<Turn>,
    _held: Held,
}

impl pipeline::Tag for Slot {
    fn call_ended(&mut self) {
        self.permit = None;
    }
}

/// A stream message's place: stream, stream sequence, delivery count.
type Meta = (String, u64, i64);

/// The pipeline's view of a stream message, for `attempt`.
fn entry_of<'a>(
    lane: &Lane,
    msg: &'a jetstream::Message,
    (stream, seq, _): &'a Meta,
    attempt: u32,
    history: Option<History>,
    received: Instant,
) -> Entry<'a> {
    let mut wit = pipeline::to_wit(&msg.message);
    // A stream message's reply subject is JetStream's ack subject, not a requester: a
    // handler's `reply` there would ack, nak or term its own message.
    wit.reply_to = None;
    Entry {
        original: Original {
            subject: msg.subject.as_str(),
            headers: msg.headers.as_ref(),
            payload: &msg.payload,
            stream: Some((stream.as_str(), *seq)),
        },
        wit: Arc::new(wit),
        attempt,
        history,
        received,
        span: lane.span(&msg.message, attempt),
    }
}

/// Runs one batch through the pipeline and settles each message as soon as its outcome is
/// known.
async fn process(
    lane: Lane,
    batch: Vec<(jetstream::Message, OwnedSemaphorePermit, Option<Turn>)>,
    histories: Histories,
    ack_wait: Duration,
    stop: watch::Receiver<bool>,
) {
    let spec = lane.handler.spec.clone();
    let received = Instant::now();
    let mut msgs = Vec::with_capacity(batch.len());
    let mut metas: Vec<Meta> = Vec::with_capacity(batch.len());
    let mut slots = Vec::with_capacity(batch.len());
    for (msg, permit, turn) in batch {
        match msg.info() {
            Ok(info) => {
                metas.push((info.stream.to_owned(), info.stream_sequence, info.delivered));
                slots.push(Slot { permit: Some(permit), turn, _held: lane.metrics.hold() });
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
            .map(|((msg, meta), slot)| {
                let attempt = u32::try_from(meta.2).unwrap_or(u32::MAX);
                let history = taken.as_mut().and_then(|h| h.remove(&meta.1));
                (entry_of(&lane, msg, meta, attempt, history, received), slot)
            })
            .collect()
    };
    let settled: Vec<AtomicBool> = msgs.iter().map(|_| AtomicBool::new(false)).collect();
    let work = pipeline::run_batch(&lane, entries, |i, slot, settle, history| {
        let (msg, meta, settled, histories, lane, stop) = (&msgs[i], &metas[i], &settled[i], &histories, &lane, &stop);
        async move {
            match settle {
                // An ordered message is retried here, holding its key: the later messages
                // of the key wait for it, the other keys flow.
                Settle::Retry(delay) if slot.turn.is_some() => {
                    Box::pin(retry_in_order(lane, msg, meta, delay, history, histories, stop.clone(), received)).await;
                }
                settle => apply(lane, msg, meta.1, histories, settle, history).await,
            }
            settled.store(true, Ordering::Relaxed);
            drop(slot);
        }
    });
    with_progress_acks(&msgs, &settled, ack_wait, work).await;
}

/// The attempts after the first of an ordered message, in this process (the message's
/// in-progress acks keep it here meanwhile), each after its backoff and alone through the
/// pipeline, until it is settled. Its attempt is JetStream's delivery count plus the retries
/// made here. On shutdown it goes back to the broker at once (a nak), to be redelivered first.
#[allow(clippy::too_many_arguments)]
async fn retry_in_order(
    lane: &Lane,
    msg: &jetstream::Message,
    meta: &Meta,
    mut delay: Duration,
    mut history: Option<History>,
    histories: &Histories,
    mut stop: watch::Receiver<bool>,
    received: Instant,
) {
    let mut attempt = u32::try_from(meta.2).unwrap_or(u32::MAX);
    loop {
        let stopping = tokio::select! {
            () = tokio::time::sleep(delay) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopping {
            apply(lane, msg, meta.1, histories, Settle::Retry(Duration::ZERO), history).await;
            return;
        }
        attempt = attempt.saturating_add(1);
        let next = Mutex::new(None);
        let entries = vec![(entry_of(lane, msg, meta, attempt, history.take(), received), ())];
        pipeline::run_batch(lane, entries, |_, (), settle, history| {
            let next = &next;
            async move {
                if let Ok(mut next) = next.lock() {
                    *next = Some((settle, history));
                }
            }
        })
        .await;
        match next.into_inner().ok().flatten() {
            Some((Settle::Retry(d), h)) => (delay, history) = (d, h),
            Some((settle, h)) => {
                apply(lane, msg, meta.1, histories, settle, h).await;
                return;
            }
            None => return,
        }
    }
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
