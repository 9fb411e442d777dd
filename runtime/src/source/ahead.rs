//! Pulling ahead of the handler: a JetStream consumer's messages are asked for before the
//! handler can start them, in requests of many messages, so that a pull's round trip does not
//! leave the handler idle and asking costs the server little per message (bench/HISTORY.md,
//! session 12: the JetStream noop row went from 38% to about 48% of native with 128 messages
//! ahead instead of async-nats's stream of requests of `max_concurrency`).
//!
//! What has arrived and not started waits here, not in the client's subscription, so it can
//! be kept alive: a waiting message gets an in-progress ack every third of the ack wait,
//! and a slow handler's lookahead is never redelivered while it waits (with async-nats's
//! stream, messages waiting in the subscription cannot be touched, which is why its requests
//! were no larger than what could start at once). How much may be ahead, waiting here and
//! requested from the server, is bounded ([`lookahead`]): one process never holds more than
//! a few calls' worth of a consumer that other processes share.
//!
//! The protocol is the pull consumer's (`$JS.API.CONSUMER.MSG.NEXT`, one inbox): a request
//! asks for n messages within [`PULL_EXPIRES`]; the server answers with up to n messages, then,
//! if it ended short, a `408`/`409` status saying how many it did not send. The count of
//! messages requested and not yet received is kept from those; when nothing at all arrives for
//! longer than a request lives (a lost status, a reconnect), every request has expired on the
//! server and the count starts again from zero.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::{self, AckKind};
use async_nats::{StatusCode, Subject};
use futures::StreamExt;
use futures::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long one pull request stays open on the server.
pub const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// After an error (no JetStream answering, a request that could not be sent), the next
/// request waits this long: an unavailable server is not asked in a loop.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// How many messages a handler of `concurrency` may have ahead of its calls: four calls'
/// worth, within what the consumer lets one client have unacknowledged.
pub fn lookahead(concurrency: usize, max_ack_pending: i64, max_batch: i64) -> usize {
    let mut n = concurrency.saturating_mul(4).clamp(4, 1024);
    // A request for more than the consumer's ack-pending limit is refused (409), and so is
    // one above its request batch limit.
    for limit in [max_ack_pending, max_batch] {
        if let Ok(limit) = usize::try_from(limit)
            && limit > 0
        {
            n = n.min(limit);
        }
    }
    n
}

/// What the pulling task hands the serve loop. Unboxed: messages are nearly every item, and
/// boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Item {
    Message(jetstream::Message),
    Error(String),
}

#[derive(Default)]
struct Queue {
    /// What has arrived, in order, with when it was last acknowledged as in progress (or
    /// arrived).
    items: VecDeque<(Instant, Item)>,
    /// Messages requested from the server and not yet received.
    requested: usize,
    /// The pulling task waits for room to ask for more: the next take that makes room wakes it.
    wants_room: bool,
    /// The pulling task has ended (the consumer is gone, the connection closed).
    ended: bool,
}

impl Queue {
    /// How many more messages may be asked for.
    fn room(&self, lookahead: usize) -> usize {
        lookahead.saturating_sub(self.items.len() + self.requested)
    }
}

/// Ask again once half the lookahead is free: few, large requests.
fn worth_asking(room: usize, lookahead: usize) -> bool {
    room > 0 && room >= lookahead.div_ceil(2)
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// The serve loop, waiting for a message.
    waiting: AtomicWaker,
    /// The pulling task, waiting for room to ask for more.
    taken: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands the serve loop an error; one in a row is enough (a long outage, while every
    /// call slot is busy, would otherwise pile them up).
    fn error(&self, e: String) {
        let mut queue = self.lock();
        if !matches!(queue.items.back(), Some((_, Item::Error(_)))) {
            queue.items.push_back((Instant::now(), Item::Error(e)));
        }
        drop(queue);
        self.waiting.wake();
    }
}

/// A consumer's messages, pulled ahead (see the module docs). A stream of messages and pull
/// errors that ends when the consumer cannot be pulled from any more; dropping it stops the
/// pulling, and [`give_back`](Self::give_back) also returns what waits to the server.
pub struct Ahead {
    shared: Arc<Shared>,
    lookahead: usize,
    task: tokio::task::JoinHandle<()>,
}

impl Ahead {
    /// Subscribes an inbox and starts pulling `lookahead` messages ahead.
    pub async fn start(
        consumer: PullConsumer,
        js: jetstream::Context,
        lookahead: usize,
        ack_wait: Duration,
    ) -> Result<Self, async_nats::SubscribeError> {
        let client = js.client();
        let inbox = Subject::from(client.new_inbox());
        let sub = client.subscribe(inbox.clone()).await?;
        let shared = Arc::new(Shared::default());
        let pulling = Pulling { consumer, js, inbox, lookahead, tick: ack_wait / 6, shared: shared.clone() };
        let task = tokio::spawn(pulling.run(sub));
        Ok(Ahead { shared, lookahead, task })
    }

    /// Stops pulling and gives the messages that had not started back to the server (a nak:
    /// redelivered at once, to this process or another, rather than after their ack wait).
    pub async fn give_back(mut self) {
        self.task.abort();
        // Ended for certain: nothing arrives after the queue is taken.
        let _ = (&mut self.task).await;
        let items = std::mem::take(&mut self.shared.lock().items);
        for (_, item) in items {
            if let Item::Message(msg) = item
                && let Err(e) = msg.ack_with(AckKind::Nak(None)).await
            {
                tracing::warn!("cannot give back a message pulled ahead (it comes back after its ack wait): {e}");
            }
        }
    }

    /// How many messages (and errors) have arrived and wait to be taken.
    pub fn waiting(&self) -> usize {
        self.shared.lock().items.len()
    }

    fn pop(&self) -> Option<Item> {
        let mut queue = self.shared.lock();
        let item = queue.items.pop_front().map(|(_, item)| item);
        // Woken only when it can ask: one wake-up per request, not one per message.
        let wake = item.is_some() && queue.wants_room && worth_asking(queue.room(self.lookahead), self.lookahead);
        if wake {
            queue.wants_room = false;
        }
        drop(queue);
        if wake {
            self.shared.taken.notify_one();
        }
        item
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl futures::Stream for Ahead {
    type Item = Result<jetstream::Message, String>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let ready = |item| {
            Poll::Ready(Some(match item {
                Item::Message(msg) => Ok(msg),
                Item::Error(e) => Err(e),
            }))
        };
        if let Some(item) = self.pop() {
            return ready(item);
        }
        self.shared.waiting.register(cx.waker());
        if let Some(item) = self.pop() {
            return ready(item);
        }
        if self.shared.lock().ended { Poll::Ready(None) } else { Poll::Pending }
    }
}

/// The pulling task's state.
struct Pulling {
    consumer: PullConsumer,
    js: jetstream::Context,
    inbox: Subject,
    lookahead: usize,
    /// How often waiting messages are looked at for an in-progress ack: a sixth of the ack
    /// wait, so one waits at most a third of it between acks, and once it starts, the
    /// pipeline's own in-progress acks (every half ack wait) come before its ack wait ends.
    tick: Duration,
    shared: Arc<Shared>,
}

impl Pulling {
    async fn run(self, mut sub: async_nats::Subscriber) {
        // Nothing has arrived since this long after the last request: every request has
        // expired on the server, whatever the count says.
        let mut silent_from = Instant::now();
        let mut next_request = Instant::now();
        let mut tick: Option<Instant> = None;
        loop {
            let (waiting, room, requested) = {
                let mut queue = self.shared.lock();
                let room = queue.room(self.lookahead);
                queue.wants_room = !worth_asking(room, self.lookahead);
                (queue.items.len(), room, queue.requested)
            };
            let ask = worth_asking(room, self.lookahead);
            if ask && Instant::now() >= next_request {
                let request = BatchConfig { batch: room, expires: Some(PULL_EXPIRES), ..Default::default() };
                match self.consumer.request_batch(request, self.inbox.clone()).await {
                    Ok(()) => {
                        self.shared.lock().requested += room;
                        silent_from = Instant::now() + PULL_EXPIRES + Duration::from_secs(1);
                    }
                    Err(e) => {
                        self.shared.error(format!("cannot ask for messages: {e}"));
                        next_request = Instant::now() + RETRY_AFTER;
                    }
                }
                continue;
            }
            // A tick while messages wait: each gets an in-progress ack at most two ticks
            // after it arrived or was last acked.
            if waiting == 0 {
                tick = None;
            } else if tick.is_none() {
                tick = Some(Instant::now() + self.tick);
            }
            tokio::select! {
                biased;
                msg = sub.next() => {
                    let Some(msg) = msg else { break };
                    silent_from = Instant::now() + PULL_EXPIRES + Duration::from_secs(1);
                    match self.received(msg) {
                        Received::Fine => {}
                        Received::Retry => next_request = Instant::now() + RETRY_AFTER,
                        Received::End => break,
                    }
                }
                () = self.shared.taken.notified() => {}
                () = sleep_until(tick), if tick.is_some() => {
                    self.keep_alive().await;
                    tick = None;
                }
                () = tokio::time::sleep_until(silent_from), if requested > 0 => {
                    tracing::debug!(requested, "pull requests expired without an answer; asking again");
                    self.shared.lock().requested = 0;
                }
                () = tokio::time::sleep_until(next_request), if ask => {}
            }
        }
        self.shared.lock().ended = true;
        self.shared.waiting.wake();
    }

    /// One message on the inbox: a message of the consumer's, or a status about a request.
    fn received(&self, msg: async_nats::Message) -> Received {
        match msg.status.unwrap_or(StatusCode::OK) {
            StatusCode::OK => {
                let msg = jetstream::Message { message: msg, context: self.js.clone() };
                let mut queue = self.shared.lock();
                queue.requested = queue.requested.saturating_sub(1);
                queue.items.push_back((Instant::now(), Item::Message(msg)));
                drop(queue);
                self.shared.waiting.wake();
                Received::Fine
            }
            StatusCode::IDLE_HEARTBEAT => Received::Fine,
            // A request that ended short: expired, or ended by the server (its ack-pending
            // limit reached, a leader change, the consumer deleted).
            StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED | StatusCode::PIN_ID_MISMATCH => {
                let description = msg.description.as_deref().unwrap_or_default();
                if description == "Consumer Deleted"
                    || description == "Consumer is push based"
                    || description.starts_with("Exceeded MaxRequest")
                {
                    self.shared.error(format!("pulling messages: {description}"));
                    return Received::End;
                }
                let unsent = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Pending-Messages"))
                    .and_then(|n| n.as_str().parse::<usize>().ok());
                // Without the count the request's size is unknown here: start again.
                let mut queue = self.shared.lock();
                queue.requested = unsent.map_or(0, |n| queue.requested.saturating_sub(n));
                Received::Fine
            }
            StatusCode::NO_RESPONDERS => {
                self.shared.lock().requested = 0;
                self.shared.error("pulling messages: JetStream did not answer (no responders)".into());
                Received::Retry
            }
            status => {
                let description = msg.description.as_deref().unwrap_or_default();
                self.shared.error(format!("pulling messages: {status} {description}"));
                Received::Retry
            }
        }
    }

    /// Acknowledges as in progress every message that has waited a tick or more since it
    /// arrived or was last acknowledged.
    async fn keep_alive(&self) {
        let now = Instant::now();
        let due: Vec<jetstream::Message> = {
            let mut queue = self.shared.lock();
            let mut due = Vec::new();
            for (at, item) in queue.items.iter_mut() {
                if *at + self.tick <= now {
                    *at = now;
                    if let Item::Message(msg) = item {
                        due.push(msg.clone());
                    }
                }
            }
            due
        };
        for msg in due {
            if let Err(e) = msg.ack_with(AckKind::Progress).await {
                tracing::warn!("cannot send an in-progress ack for a message pulled ahead: {e}");
            }
        }
    }
}

enum Received {
    Fine,
    /// An error that asking again at once would repeat.
    Retry,
    /// The consumer cannot be pulled from any more.
    End,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lookahead_is_four_calls_within_the_consumers_limits() {
        assert_eq!(lookahead(32, 1000, 0), 128);
        assert_eq!(lookahead(1, 1000, 0), 4);
        assert_eq!(lookahead(1000, -1, 0), 1024);
        assert_eq!(lookahead(32, 50, 0), 50, "no request above the ack-pending limit");
        assert_eq!(lookahead(32, 1000, 10), 10, "no request above the consumer's request batch limit");
    }

    #[test]
    fn a_request_waits_for_half_the_lookahead() {
        assert!(!worth_asking(0, 128));
        assert!(!worth_asking(63, 128));
        assert!(worth_asking(64, 128));
        assert!(worth_asking(1, 1));
        assert!(worth_asking(2, 3));
    }
}
