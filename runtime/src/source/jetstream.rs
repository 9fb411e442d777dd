//! JetStream: a durable pull consumer per handler. Every Sluice process bound to the same
//! consumer pulls from it, so they share its messages; an unacknowledged message (a crash, a
//! lost process) is redelivered after the ack wait, to whichever process pulls next.
//!
//! The attempt number is JetStream's delivery count, so a retry sequence survives restarts.
//! A retry is a nak with the backoff delay; giving up publishes the dead letter, then terms
//! the message. If the dead-letter publish fails, the message is nak'd instead: it comes back
//! later and is dead-lettered then, without running the handler again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::{Context, Delivered, History, Settle};
use crate::dlq::{Original, Verdict};
use crate::failure::FailureKind;
use crate::manifest::{JetStreamSource, Source};

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
pub async fn bind(js: &jetstream::Context, ctx: &Context) -> anyhow::Result<PullConsumer> {
    let spec = &ctx.handler.spec;
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
/// Each message is handled by the version in `versions` when it is pulled (a hot reload swaps
/// it); redeliveries naturally get the version current then.
pub async fn serve(versions: watch::Receiver<Context>, consumer: PullConsumer, mut stop: watch::Receiver<bool>) {
    let spec = versions.borrow().handler.spec.clone();
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
    let pulls = consumer.stream().max_messages_per_batch(concurrency).expires(PULL_EXPIRES);
    let mut messages = match pulls.messages().await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(handler = &*spec.name, "cannot pull from the consumer: {e}");
            return;
        }
    };
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
        };
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
                // JetStream's delivery count is the attempt (and `process` reports a
                // message without metadata).
                let attempt = msg.info().map_or(0, |i| u32::try_from(i.delivered).unwrap_or(u32::MAX));
                let span = super::span(&spec.name, &msg.message, attempt);
                let ctx = versions.borrow().clone();
                // Boxed: the task then holds a pointer, not the whole state machine, which
                // tokio would otherwise copy as it creates, finishes and reads the task.
                in_flight.spawn(Box::pin(process(ctx, msg, histories.clone(), permit).instrument(span)));
                while in_flight.try_join_next().is_some() {}
            }
        }
    }
    drop(messages);
    while in_flight.join_next().await.is_some() {}
    tracing::debug!(handler = &*spec.name, "stopped");
}

async fn process(ctx: Context, msg: jetstream::Message, histories: Histories, _permit: OwnedSemaphorePermit) {
    let spec = ctx.handler.spec.clone();
    let (stream, seq, delivered) = match msg.info() {
        Ok(info) => (info.stream.to_owned(), info.stream_sequence, info.delivered),
        Err(e) => {
            tracing::error!("message without JetStream metadata: {e}");
            return;
        }
    };
    let attempt = u32::try_from(delivered).unwrap_or(u32::MAX);
    let received = std::time::Instant::now();
    ctx.metrics.received();
    let _held = ctx.metrics.hold();
    let original = Original {
        subject: msg.subject.as_str(),
        headers: msg.headers.as_ref(),
        payload: &msg.payload,
        stream: Some((stream.as_str(), seq)),
    };
    let take_history = || histories.lock().ok().and_then(|mut h| h.remove(&seq));

    let (settle, history) = if attempt > spec.manifest.retry.max_attempts {
        // Already given up on: an earlier dead-letter publish failed, or the process died
        // between publishing the dead letter and terming. The dead letter's id makes a second
        // publish harmless.
        let verdict = match take_history() {
            Some(h) => h.verdict(FailureKind::RetriesExhausted, attempt - 1),
            None => Verdict {
                kind: FailureKind::RetriesExhausted,
                last_kind: None,
                reason: format!(
                    "delivered {delivered} times; the last failure was seen before a restart or by another process"
                ),
                attempts: attempt - 1,
                first_failure_at: std::time::SystemTime::now(),
                last_failure_at: std::time::SystemTime::now(),
            },
        };
        (Settle::GiveUp(verdict), None)
    } else {
        let mut wit = super::to_wit(&msg.message);
        // A stream message's reply subject is JetStream's ack subject, not a requester: a
        // handler's `reply` there would ack, nak or term its own message.
        wit.reply_to = None;
        let wit = Arc::new(wit);
        let delivered = Delivered { original, wit: &wit, attempt };
        let work = super::handle_delivery(&ctx, delivered, take_history());
        with_progress_acks(&msg, ack_wait(&spec.manifest.source), work).await
    };
    super::count(&ctx, &settle, received);
    match settle {
        Settle::Done | Settle::Skipped => {
            if let Err(e) = msg.ack().await {
                tracing::warn!("cannot ack (it will be redelivered): {e}");
            }
        }
        Settle::Halt => {}
        Settle::Retry(delay) => {
            if let (Some(history), Ok(mut h)) = (history, histories.lock()) {
                h.insert(seq, history);
            }
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!("cannot nak (it will be redelivered after the ack wait): {e}");
            }
        }
        Settle::GiveUp(verdict) => {
            if let (Some(history), Ok(mut h)) = (history, histories.lock()) {
                h.insert(seq, history);
            }
            Box::pin(give_up(&ctx, &msg, verdict, &original, &histories, seq)).await;
        }
    }
}

fn ack_wait(source: &Source) -> Duration {
    match source {
        Source::JetStream(src) => src.ack_wait,
        Source::Core { .. } => Duration::from_secs(30),
    }
}

/// Dead-letters, then terms; if the dead letter cannot be stored, keeps the message.
async fn give_up(
    ctx: &Context,
    msg: &jetstream::Message,
    verdict: Verdict,
    original: &Original<'_>,
    histories: &Histories,
    seq: u64,
) {
    match super::dead_letter(ctx, &verdict, original).await {
        Ok(()) => {
            if let Ok(mut h) = histories.lock() {
                h.remove(&seq);
            }
            if let Err(e) = msg.ack_with(AckKind::Term).await {
                tracing::warn!("cannot term the dead-lettered message: {e}");
            }
        }
        Err(e) => {
            let delay = ctx.handler.spec.manifest.retry.max;
            tracing::error!("dead-letter failed, keeping the message (back in {delay:?}): {e}");
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!("cannot nak: {e}");
            }
        }
    }
}

/// Runs `work`, telling JetStream the message is still in progress every half ack wait so
/// that a long run (slow outputs, a slow dead-letter stream) is not redelivered meanwhile.
async fn with_progress_acks<T>(msg: &jetstream::Message, ack_wait: Duration, work: impl Future<Output = T>) -> T {
    tokio::pin!(work);
    let period = ack_wait / 2;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            result = &mut work => return result,
            _ = ticker.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::warn!("cannot send an in-progress ack: {e}");
                }
            }
        }
    }
}
