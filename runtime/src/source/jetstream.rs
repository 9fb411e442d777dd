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

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PriorityPolicy, PullConsumer, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use crate::dlq::Original;
use crate::manifest::{JetStreamSource, Source};
use crate::metrics::Held;
use crate::ordering::{Partitions, Sequencer, in_order, next_ready};
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

/// A bound consumer, with the JetStream context (the cluster) its messages are acked through.
pub type Bound = (PullConsumer, jetstream::Context);

/// The priority group partitioned consumers pin their clients in.
pub const GROUP: &str = "sluice";

/// How long past the ack wait a pinned process may go without pulling before the server
/// moves its partition to another: by then every message it held has been redelivered (its
/// in-progress acks stopped with it), so the new owner gets those first, in order.
const PIN_GRACE: Duration = Duration::from_secs(5);

/// The durable consumer of partition `i` of an ordered handler: the handler's consumer
/// filtered on the partition's subjects, pinned to one client (process) at a time.
pub fn partition_config(src: &JetStreamSource, partitions: &Partitions, i: u32) -> pull::Config {
    pull::Config {
        durable_name: Some(Partitions::consumer(&src.consumer, i)),
        description: Some(format!("Sluice handler consumer, partition {i} of {}", partitions.count)),
        filter_subjects: vec![partitions.filter(i)],
        priority_policy: PriorityPolicy::PinnedClient,
        priority_groups: vec![GROUP.to_owned()],
        priority_timeout: src.ack_wait + PIN_GRACE,
        ..consumer_config(src)
    }
}

/// Finds or creates the handler's durable consumer (one per partition for a partitioned
/// ordered handler). An existing consumer whose filter, ack policy, type or priority policy
/// differs is a conflict (another deployment uses it differently) and is refused; a different
/// ack wait, ack-pending limit or pin timeout is updated in place.
pub async fn bind(js: &jetstream::Context, lane: &Lane) -> anyhow::Result<Vec<Bound>> {
    let spec = &lane.handler.spec;
    let Source::JetStream(src) = &spec.manifest.source else {
        anyhow::bail!("handler {} does not have a JetStream source", spec.name);
    };
    let stream = js
        .get_stream(&src.stream)
        .await
        .map_err(|e| anyhow::anyhow!("handler {}: stream {}: {e}", spec.name, src.stream))?;
    match spec.manifest.ordering.as_ref().and_then(|o| o.partitions.as_ref()) {
        None => Ok(vec![(bind_one(&stream, &spec.name, &src.stream, consumer_config(src)).await?, js.clone())]),
        Some(partitions) => {
            let mut all = Vec::with_capacity(partitions.count as usize);
            for i in 0..partitions.count {
                let consumer = bind_one(&stream, &spec.name, &src.stream, partition_config(src, partitions, i)).await?;
                all.push((consumer, js.clone()));
            }
            Ok(all)
        }
    }
}

async fn bind_one(
    stream: &jetstream::stream::Stream,
    handler: &str,
    stream_name: &str,
    wanted: pull::Config,
) -> anyhow::Result<PullConsumer> {
    let name = wanted.durable_name.clone().unwrap_or_default();
    let what = format!("handler {handler}: consumer {name} on stream {stream_name}");
    match stream.consumer_info(&name).await {
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
            if have.priority_policy != wanted.priority_policy || have.priority_groups != wanted.priority_groups {
                conflicts.push(format!(
                    "its priority policy is {:?} with groups {:?}, the manifest asks for {:?} with {:?}",
                    have.priority_policy, have.priority_groups, wanted.priority_policy, wanted.priority_groups
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
                || have.priority_timeout != wanted.priority_timeout
            {
                tracing::info!(
                    handler,
                    "updating {what}: ack_wait {:?}, max_ack_pending {}",
                    wanted.ack_wait,
                    wanted.max_ack_pending
                );
                stream.update_consumer(wanted).await.map_err(|e| anyhow::anyhow!("{what}: cannot update: {e}"))?;
            }
        }
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
            tracing::info!(handler, "creating {what}");
            stream.create_consumer(wanted).await.map_err(|e| anyhow::anyhow!("{what}: cannot create: {e}"))?;
        }
        Err(e) => anyhow::bail!("{what}: {e}"),
    }
    stream.get_consumer(&name).await.map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

use super::ahead::{Ahead, PULL_EXPIRES};

/// Where a consumer's messages come from: pulled ahead of the handler's calls, or, for a
/// pinned partition and a rate-limited handler, async-nats's stream of pull requests no
/// larger than what can start at once (a partition's pin travels in the requests, and a rate
/// is a bound on starts that a lookahead would only hold waiting).
enum Pulls {
    Ahead(Ahead),
    Stream(Box<pull::Stream>),
}

impl Pulls {
    async fn start(
        consumer: &PullConsumer,
        js: jetstream::Context,
        pinned: bool,
        limiter: Option<&crate::rate::Limiter>,
        concurrency: usize,
        ack_wait: Duration,
    ) -> anyhow::Result<Self> {
        if !pinned && limiter.is_none() {
            let config = &consumer.cached_info().config;
            let lookahead = super::ahead::lookahead(concurrency, config.max_ack_pending, config.max_batch);
            return Ok(Pulls::Ahead(Ahead::start(consumer.clone(), js, lookahead, ack_wait).await?));
        }
        // Pull no more than can run at once: a message waiting in the client's subscription
        // cannot be kept alive, and would reach its ack wait and be redelivered elsewhere while
        // still queued here. A rate-limited handler pulls no more than its burst at a time.
        // Pull requests expire after 2 s rather than async-nats's 30 s: when the client's count
        // of outstanding messages drifts from the server's (seen in about one benchmark run in
        // five), the stream waits for its pull to expire before asking again (a 30 s stall
        // with the default), so this bounds such a stall to a few seconds. An idle handler pays
        // one pull request every 2 s.
        let per_pull = limiter.map_or(concurrency, |l| l.burst().clamp(1, concurrency));
        let mut pulls = consumer.stream().max_messages_per_batch(per_pull).expires(PULL_EXPIRES);
        if pinned {
            pulls = pulls.group(GROUP);
        }
        Ok(Pulls::Stream(Box::new(pulls.messages().await?)))
    }

    /// How many messages have arrived and wait here to start.
    fn waiting(&self) -> usize {
        match self {
            Pulls::Ahead(ahead) => ahead.waiting(),
            Pulls::Stream(_) => 0,
        }
    }

    /// Whether messages wait in this process, kept alive, until the handler takes them.
    fn waits_here(&self) -> bool {
        matches!(self, Pulls::Ahead(_))
    }

    /// Stops pulling; what was pulled ahead and not started goes back to the server.
    async fn give_back(self) {
        match self {
            Pulls::Ahead(ahead) => ahead.give_back().await,
            Pulls::Stream(stream) => drop(stream),
        }
    }
}

impl futures::Stream for Pulls {
    type Item = Result<jetstream::Message, String>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match &mut *self {
            Pulls::Ahead(ahead) => ahead.poll_next_unpin(cx),
            Pulls::Stream(stream) => stream.poll_next_unpin(cx).map(|m| m.map(|m| m.map_err(|e| e.to_string()))),
        }
    }
}

/// How many times the serve loop lets other tasks run, at most, for permits to come back
/// before it forms a batch (see `serve_one`).
const BATCH_YIELDS: usize = 4;

/// Pulls and processes messages until `stop` turns true; then stops pulling and lets the
/// calls in flight finish (and ack). Messages pulled ahead and not started are given back (a
/// nak: redelivered at once); a pinned partition's or a rate-limited handler's, still in the
/// client's subscription, come back after the ack wait.
///
/// What one pull has delivered travels as one batch through the pipeline: once a message is
/// here, every further message already received (up to the free concurrency) joins it.
/// Each message is handled by the version in `versions` when its batch forms (a hot reload
/// swaps it); redeliveries naturally get the version current then.
pub async fn serve(versions: watch::Receiver<Lane>, consumers: Vec<Bound>, stop: watch::Receiver<bool>) {
    let spec = versions.borrow().handler.spec.clone();
    let concurrency = spec.manifest.limits.max_concurrency as usize;
    // The partitions of an ordered handler share the handler's concurrency and rate.
    let shared = Shared {
        permits: Arc::new(Semaphore::new(concurrency)),
        limiter: spec.manifest.limits.rate.map(|r| Arc::new(crate::rate::Limiter::new(r))),
    };
    let all = consumers.into_iter().map(|(c, js)| Box::pin(serve_one(versions.clone(), c, js, stop.clone(), &shared)));
    futures::future::join_all(all).await;
}

/// What the consumers of one handler share.
struct Shared {
    permits: Arc<Semaphore>,
    limiter: Option<Arc<crate::rate::Limiter>>,
}

/// [`serve`] for one consumer.
async fn serve_one(
    versions: watch::Receiver<Lane>,
    consumer: PullConsumer,
    js: jetstream::Context,
    mut stop: watch::Receiver<bool>,
    shared: &Shared,
) {
    let spec = versions.borrow().handler.spec.clone();
    // The consumer's own ack wait, as the server has it (`bind` made it the manifest's).
    let ack_wait = consumer.cached_info().config.ack_wait;
    let name = consumer.cached_info().name.clone();
    let pinned = consumer.cached_info().config.priority_policy == PriorityPolicy::PinnedClient;
    let concurrency = spec.manifest.limits.max_concurrency as usize;
    let permits = shared.permits.clone();
    let histories: Histories = Arc::default();
    let mut in_flight = JoinSet::new();
    // An ordered handler's messages wait behind their key here, kept alive by in-progress
    // acks until their turn.
    let ordering = spec.manifest.ordering.clone();
    let mut sequencer =
        ordering.as_ref().map(|o| Sequencer::new(versions.borrow().metrics.ordering(), o.sequence.clone()));
    let _keepalive = sequencer.as_ref().map(|s| KeepAlive::start(s.watcher(), ack_wait));
    let max_waiting = ordering.as_ref().map_or(usize::MAX, |o| o.max_waiting);
    let has_room = |s: &Option<Sequencer<jetstream::Message>>| s.as_ref().is_none_or(|s| s.waiting() < max_waiting);
    // A partition's consumer pins one process at a time: this one pulls in the priority
    // group, and waits on standby while another holds the pin.
    let limiter = shared.limiter.as_deref();
    let mut messages = match Pulls::start(&consumer, js, pinned, limiter, concurrency, ack_wait).await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(handler = &*spec.name, "cannot pull from the consumer: {e}");
            return;
        }
    };
    // A partition's pin, and what taking it over from another process holds back.
    let mut takeover = Takeover::new(pinned, ack_wait);
    loop {
        // A full outbox pauses the handler: no new work until the relay catches up (the
        // messages already pulled ahead wait, kept alive; a partition's, in the client's
        // subscription, are redelivered past their ack wait, to this process or another).
        let relay = versions.borrow().relay.clone();
        if let Some(relay) = relay {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                () = relay.room() => {}
            }
        }
        // A handler backing off from the broker (it did not take its outputs or its store
        // writes) takes nothing new until the step ends: what it pulled ahead waits here,
        // kept alive. (Handed back to the server instead, each message would come back as one
        // more delivery, which another process counts as an attempt.)
        if messages.waits_here() {
            let pause = versions.borrow().pause.clone();
            if pause.remaining().is_some() {
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    () = pause.wait() => {}
                }
            }
        }
        let permit = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
        };
        // The calls of a batch end one by one and give their permits back one by one, so a
        // batch formed at the first permit would often carry one message (a third of the
        // batches did, under load), and each batch costs a task and a hand-off to the guest
        // threads. While messages wait here, the calls ending now get a moment (a few turns
        // of the scheduler, never a timer) to give theirs back first.
        let wanted = messages.waiting().min(concurrency);
        for _ in 0..BATCH_YIELDS {
            if permits.available_permits() + 1 >= wanted {
                break;
            }
            tokio::task::yield_now().await;
        }
        if let Some(limiter) = limiter {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                () = limiter.take() => {}
            }
        }
        // An ordered handler at its bound of waiting messages pulls nothing new until a key
        // moves on.
        let room = has_room(&sequencer);
        let next = if let Some(msg) = takeover.released.pop_front() {
            Got::Pulled(msg)
        } else {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                (msg, turn) = next_ready(&mut sequencer) => Got::Ready(msg, turn),
                () = takeover.until(), if takeover.holding() => Got::Tick,
                next = messages.next(), if room => match next {
                    None => break,
                    Some(Ok(msg)) => Got::Received(msg),
                    Some(Err(e)) => {
                        // A leadership change, a server going away, a full ack-pending:
                        // the handler's back-off, logged once per step.
                        let pause = versions.borrow().pause.clone();
                        pause.refused(&format!("pulling messages: {e}"));
                        Got::Nothing
                    }
                },
            }
        };
        let first = match next {
            Got::Nothing => {
                let pause = versions.borrow().pause.clone();
                pause.wait().await;
                continue;
            }
            Got::Tick => {
                takeover.tick().await;
                continue;
            }
            Got::Ready(msg, turn) => Some((msg, Some(turn))),
            Got::Pulled(msg) => in_order(&sequencer, ordering.as_ref(), msg),
            Got::Received(msg) => match takeover.admit(msg, &consumer).await {
                Some(msg) => in_order(&sequencer, ordering.as_ref(), msg),
                None => continue,
            },
        };
        // Queued behind its key: the permit goes back.
        let Some((msg, turn)) = first else { continue };
        let mut batch = super::batch((msg, permit, turn), concurrency);
        while batch.len() < concurrency {
            let Ok(permit) = permits.clone().try_acquire_owned() else { break };
            if limiter.is_some_and(|l| !l.try_take()) {
                break;
            }
            if let Some((msg, turn)) = sequencer.as_mut().and_then(Sequencer::try_ready) {
                batch.push((msg, permit, Some(turn)));
                continue;
            }
            if !has_room(&sequencer) {
                break;
            }
            let pulled = match takeover.released.pop_front() {
                Some(msg) => Some(Some(Ok(msg))),
                None => messages.next().now_or_never(),
            };
            match pulled {
                Some(Some(Ok(msg))) => {
                    let Some(msg) = takeover.admit(msg, &consumer).await else { continue };
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
    messages.give_back().await;
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
    // Hand the partition on at once rather than after the pin timeout, when this process
    // still holds it: what it held is settled or given back.
    if let Some(pin) = takeover.pin {
        let js = versions.borrow().sender.jetstream().clone();
        if let Err(e) = release_pin(&js, &consumer.cached_info().stream_name, &name, &pin).await {
            tracing::warn!(handler = &*spec.name, consumer = %name, "cannot release the partition (another process takes it after the pin timeout): {e}");
        }
    }
    tracing::debug!(handler = &*spec.name, consumer = %name, "stopped");
}

/// What the serve loop got.
enum Got {
    /// A message whose key's turn came.
    Ready(jetstream::Message, Turn),
    /// A message from the consumer, past the takeover check.
    Pulled(jetstream::Message),
    /// A message from the consumer, for the takeover check.
    Received(jetstream::Message),
    /// Holding back after a takeover: time to keep the held messages alive, or to release them.
    Tick,
    /// A pull error (logged): pause a little.
    Nothing,
}

/// A pinned partition's view of its pin. When this process gains the pin and the consumer
/// shows messages delivered before its first one still unacknowledged, another process held
/// them when it lost the pin (a crash, a pause, messages given back on a clean stop): they
/// come back after their ack wait, and must be handled before what was delivered since. So
/// for one ack wait everything received is held; then it is released in stream order.
struct Takeover {
    pinned: bool,
    ack_wait: Duration,
    /// The pin id of the messages delivered to this process (a header the server adds).
    pin: Option<String>,
    /// While holding back: until when, when their next in-progress ack is due, and what was
    /// received meanwhile.
    held: Option<(tokio::time::Instant, tokio::time::Instant, Vec<jetstream::Message>)>,
    /// What was held, in stream order, to be handled before anything newer.
    released: std::collections::VecDeque<jetstream::Message>,
}

impl Takeover {
    fn new(pinned: bool, ack_wait: Duration) -> Self {
        Takeover { pinned, ack_wait, pin: None, held: None, released: Default::default() }
    }

    fn holding(&self) -> bool {
        self.held.is_some()
    }

    /// When holding back ends or the held messages need an in-progress ack (never, when not
    /// holding); then call [`tick`](Self::tick).
    async fn until(&self) {
        match &self.held {
            Some((until, keepalive, _)) => tokio::time::sleep_until(*until.min(keepalive)).await,
            None => std::future::pending().await,
        }
    }

    /// Releases what was held when its time came; otherwise keeps it alive.
    async fn tick(&mut self) {
        let now = tokio::time::Instant::now();
        let Some((until, keepalive, held)) = &mut self.held else { return };
        if now >= *until {
            self.release();
            return;
        }
        if now >= *keepalive {
            for msg in held.iter() {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::warn!("cannot send an in-progress ack for a held message: {e}");
                }
            }
            *keepalive = now + self.ack_wait / 2;
        }
    }

    /// A received message: returned to be handled now, or held back.
    async fn admit(&mut self, msg: jetstream::Message, consumer: &PullConsumer) -> Option<jetstream::Message> {
        if !self.pinned {
            return Some(msg);
        }
        if let Some((_, _, held)) = &mut self.held {
            held.push(msg);
            return None;
        }
        let id = msg.headers.as_ref().and_then(|h| h.get_last(async_nats::header::NATS_PIN_ID));
        let Some(id) = id.map(|id| id.as_str().to_owned()) else { return Some(msg) };
        if self.pin.as_deref() == Some(id.as_str()) {
            return Some(msg);
        }
        self.pin = Some(id);
        // Delivered before this message and not acknowledged: held elsewhere.
        let first = msg.info().map(|i| i.consumer_sequence).unwrap_or(0);
        let orphans = match consumer.get_info().await {
            Ok(info) => info.ack_floor.consumer_sequence + 1 < first,
            // Cannot tell: assume the worst.
            Err(_) => true,
        };
        if !orphans {
            return Some(msg);
        }
        let name = &consumer.cached_info().name;
        tracing::info!(
            consumer = %name,
            "partition taken over with messages of the previous holder unacknowledged: holding new ones for {:?}, until those are redelivered",
            self.ack_wait
        );
        // One ack wait, and a little for the redeliveries to arrive.
        let now = tokio::time::Instant::now();
        self.held = Some((now + self.ack_wait + Duration::from_secs(1), now + self.ack_wait / 2, vec![msg]));
        None
    }

    /// Ends holding back: what was received goes out in stream order.
    fn release(&mut self) {
        if let Some((_, _, mut held)) = self.held.take() {
            held.sort_by_key(|m| m.info().map(|i| i.stream_sequence).unwrap_or(u64::MAX));
            // A message delivered twice meanwhile (its ack wait passed while held) is kept
            // once, in its latest delivery; the other acks nothing.
            held.dedup_by_key(|m| m.info().map(|i| i.stream_sequence).unwrap_or(u64::MAX));
            self.released.extend(held);
        }
    }
}

/// Unpins `consumer` when `pin` is still the pinned client's id (the server moves the pin
/// only after the pin timeout without pulls, so it cannot move between the check and the
/// unpin).
async fn release_pin(js: &jetstream::Context, stream: &str, consumer: &str, pin: &str) -> anyhow::Result<()> {
    let stream = js.get_stream(stream).await?;
    let info = stream.consumer_info(consumer).await?;
    let holds = info.priority_groups.iter().any(|g| g.group == GROUP && g.pinned_client_id.as_deref() == Some(pin));
    if holds {
        stream.unpin_consumer(consumer, GROUP).await?;
        tracing::debug!(consumer, "partition released");
    }
    Ok(())
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

/// The attempt a delivery is: JetStream's delivery count (plus any retries made in this
/// process), less the deliveries the broker's back-pressure caused (not attempts).
fn effective_attempt(deliveries: i64, history: Option<&History>) -> u32 {
    let deliveries = u32::try_from(deliveries).unwrap_or(u32::MAX);
    deliveries.saturating_sub(History::deferred(history)).max(1)
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
    sequence: Option<crate::ordering::Sequenced>,
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
        sequence,
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
    // The broker refused this handler's outputs lately: what arrives during the back-off
    // step goes back to the server until the step ends, without a call (and without an
    // attempt), so that the handler asks the broker again once per step, not once per
    // message. (An ordered message keeps its key's turn instead, and retries in the process.)
    // Messages pulled ahead wait for the step's end before they get here (`serve_one`), so
    // this is for a pinned partition's, a rate-limited handler's and the few taken as a step
    // began.
    let pause_left = lane.pause.remaining();
    for (msg, permit, turn) in batch {
        match msg.info() {
            Ok(info) if turn.is_none() && pause_left.is_some() => {
                let left = pause_left.unwrap_or_default();
                defer(&msg, info.stream_sequence, &histories, left).await;
                drop(permit);
            }
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
                let history = taken.as_mut().and_then(|h| h.remove(&meta.1));
                let attempt = effective_attempt(meta.2, history.as_ref());
                let sequence = slot.turn.as_ref().and_then(|t| t.sequenced().cloned());
                (entry_of(&lane, msg, meta, attempt, history, received, sequence), slot)
            })
            .collect()
    };
    let settled: Vec<AtomicBool> = msgs.iter().map(|_| AtomicBool::new(false)).collect();
    let work = pipeline::run_batch(&lane, entries, |i, mut slot, settle, history| {
        let (msg, meta, settled, histories, lane, stop) = (&msgs[i], &metas[i], &settled[i], &histories, &lane, &stop);
        async move {
            let sequence = slot.turn.as_ref().and_then(|t| t.sequenced().cloned());
            match settle {
                // Ahead of its key (a resequencer): back to wait for its number, kept alive
                // by the in-progress acks of the waiting messages.
                Settle::Early(expected) if slot.turn.as_ref().is_some_and(Turn::holds_key) => {
                    if let Some(turn) = slot.turn.take() {
                        turn.hold_back(msg.clone(), expected);
                    }
                }
                // An ordered message is retried here, holding its key: the later messages
                // of the key wait for it, the other keys flow.
                Settle::Retry(delay) if slot.turn.is_some() => {
                    let again = Again { delay, deliveries: meta.2, history, sequence };
                    Box::pin(retry_in_order(lane, msg, meta, again, histories, stop.clone(), received)).await;
                }
                // Its dead letter could not be stored: kept here too (not nak'd behind the
                // key's next messages), and dead-lettered on its next turn.
                Settle::GaveUp { parked: false, .. } if slot.turn.is_some() => {
                    let retry = &lane.handler.spec.manifest.retry;
                    let deliveries = i64::from(retry.max_attempts + History::deferred(history.as_ref()));
                    let again = Again { delay: retry.max, deliveries: deliveries.max(meta.2), history, sequence };
                    Box::pin(retry_in_order(lane, msg, meta, again, histories, stop.clone(), received)).await;
                }
                settle => apply(lane, msg, meta.1, histories, settle, history).await,
            }
            settled.store(true, Ordering::Relaxed);
            drop(slot);
        }
    });
    with_progress_acks(&msgs, &settled, ack_wait, work).await;
}

/// Gives a message back to the server for `left` during the handler's back-off step,
/// recording the delivery as a deferral (not an attempt).
async fn defer(msg: &jetstream::Message, seq: u64, histories: &Histories, left: Duration) {
    let failure = crate::failure::Failure {
        kind: crate::failure::FailureKind::BrokerBusy,
        reason: "the handler is backing off: the broker did not take its outputs".to_owned(),
        retry_after: None,
    };
    if let Ok(mut h) = histories.lock() {
        let previous = h.remove(&seq);
        h.insert(seq, History::record(previous, failure));
    }
    if let Err(e) = msg.ack_with(AckKind::Nak(Some(left))).await {
        tracing::warn!("cannot nak (it will be redelivered after the ack wait): {e}");
    }
}

/// The next attempt of an ordered message kept in this process.
struct Again {
    delay: Duration,
    /// Deliveries so far, JetStream's and this process's (see [`effective_attempt`]).
    deliveries: i64,
    history: Option<History>,
    /// What the resequencer says of it.
    sequence: Option<crate::ordering::Sequenced>,
}

/// The attempts after the first of an ordered message, in this process (the message's
/// in-progress acks keep it here meanwhile), each after its backoff and alone through the
/// pipeline, until it is settled. Its attempt is JetStream's delivery count plus the retries
/// made here; a message whose dead letter could not be stored waits `retry.max` and is
/// dead-lettered again. On shutdown it goes back to the broker at once (a nak), to be
/// redelivered first.
async fn retry_in_order(
    lane: &Lane,
    msg: &jetstream::Message,
    meta: &Meta,
    again: Again,
    histories: &Histories,
    mut stop: watch::Receiver<bool>,
    received: Instant,
) {
    let Again { mut delay, mut deliveries, mut history, sequence } = again;
    loop {
        let stopping = tokio::select! {
            () = tokio::time::sleep(delay) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopping {
            apply(lane, msg, meta.1, histories, Settle::Retry(Duration::ZERO), history).await;
            return;
        }
        deliveries = deliveries.saturating_add(1);
        let attempt = effective_attempt(deliveries, history.as_ref());
        let next = Mutex::new(None);
        let entries = vec![(entry_of(lane, msg, meta, attempt, history.take(), received, sequence.clone()), ())];
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
            Some((Settle::GaveUp { parked: false, .. }, h)) => {
                let retry = &lane.handler.spec.manifest.retry;
                let last = i64::from(retry.max_attempts + History::deferred(h.as_ref()));
                (delay, history, deliveries) = (retry.max, h, deliveries.max(last));
            }
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
        // Ahead of its key with no turn to wait with (cannot happen on a first delivery):
        // the broker delivers it again at once, to be put in order then.
        Settle::Early(_) => {
            if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
                tracing::warn!("cannot nak (it will be redelivered after the ack wait): {e}");
            }
        }
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
