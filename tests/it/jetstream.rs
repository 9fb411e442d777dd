//! JetStream sources: retries with backoff, dead-lettering with the standard headers, crash
//! recovery, shared durable consumers, and conflicting consumers.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use async_nats::jetstream::message::StreamMessage;
use futures::StreamExt;
use sluice_tests::{Sluice, client, js_publish, manifest, nats, stream, stream_messages, sync};

/// A misbehave handler on stream WORK, dead-lettering to DLQ (created by Sluice).
fn work_manifest(retry: &str) -> String {
    manifest(
        "worker",
        "misbehave",
        "unused",
        &format!(
            r#"
[limits]
timeout = "1s"

[capabilities]
publish = ["results.>"]

[retry]
{retry}

[dead_letter]
subject = "dlq.worker"
stream = "DLQ"
create_stream = true
"#
        ),
    )
    .replace("subject = \"unused\"", "stream = \"WORK\"")
}

fn header(m: &StreamMessage, name: &str) -> String {
    m.headers.get(name).map(|v| v.as_str().to_owned()).unwrap_or_else(|| panic!("no header {name}"))
}

fn time_header(m: &StreamMessage, name: &str) -> SystemTime {
    humantime::parse_rfc3339(&header(m, name)).unwrap()
}

async fn consumer_info(js: &jetstream::Context, consumer: &str) -> jetstream::consumer::Info {
    js.get_stream("WORK").await.unwrap().consumer_info(consumer).await.unwrap()
}

#[tokio::test]
async fn a_message_failing_k_times_succeeds_on_attempt_k_plus_1_after_the_backoff() {
    let server = nats();
    let js = stream(&server, "WORK", &["work.>"]).await;
    let sluice = Sluice::start(
        &server,
        &[("w.toml", work_manifest("max_attempts = 5\ninitial = \"200ms\"\njitter = \"none\""))],
    )
    .await;
    let nc = client(&server).await;
    let mut results = nc.subscribe("results.>").await.unwrap();
    sync(&nc).await;

    let started = tokio::time::Instant::now();
    js_publish(&js, "work.1", "fail-until:2:results.1").await;
    let result = tokio::time::timeout(Duration::from_secs(20), results.next()).await.unwrap().unwrap();
    let elapsed = started.elapsed();
    assert_eq!(String::from_utf8_lossy(&result.payload), "attempt 3");
    // Two backoffs: 200ms then 400ms (no jitter). A lower bound only: the machine is shared.
    assert!(elapsed >= Duration::from_millis(600), "retried too early: {elapsed:?}");

    // Acked: nothing pending, nothing dead-lettered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = consumer_info(&js, "worker").await;
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
    assert_eq!(js.get_stream("DLQ").await.unwrap().info().await.unwrap().state.messages, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn a_rejected_message_is_dead_lettered_after_one_attempt_with_every_header() {
    let server = nats();
    let js = stream(&server, "WORK", &["work.>"]).await;
    let sluice = Sluice::start(&server, &[("w.toml", work_manifest("max_attempts = 5"))]).await;

    let mut headers = async_nats::HeaderMap::new();
    headers.insert("X-Trace", "abc-123");
    headers.insert("Nats-Msg-Id", "order-42");
    let before = SystemTime::now();
    let seq = js.publish_with_headers("work.orders", headers, "reject".into()).await.unwrap().await.unwrap().sequence;

    let dead = stream_messages(&js, "DLQ", 1, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.subject.as_str(), "dlq.worker");
    assert_eq!(&d.payload[..], b"reject");
    assert_eq!(header(d, "Sluice-Failure-Kind"), "rejected");
    assert_eq!(header(d, "Sluice-Failure-Reason"), "asked to reject");
    assert_eq!(header(d, "Sluice-Attempts"), "1");
    assert_eq!(header(d, "Sluice-Original-Subject"), "work.orders");
    assert_eq!(header(d, "Sluice-Handler"), "worker");
    assert!(header(d, "Sluice-Handler-Digest").starts_with("sha256:"));
    assert_eq!(header(d, "Sluice-Stream"), "WORK");
    assert_eq!(header(d, "Sluice-Stream-Sequence"), seq.to_string());
    assert_eq!(header(d, "Sluice-Original-Msg-Id"), "order-42");
    assert_eq!(header(d, "X-Trace"), "abc-123");
    let (first, last) = (time_header(d, "Sluice-First-Failure-At"), time_header(d, "Sluice-Last-Failure-At"));
    assert!(first >= before - Duration::from_secs(1) && last >= first);
    assert!(d.headers.get("Sluice-Last-Failure-Kind").is_none());

    // Termed, not redelivered: still one dead letter a while later, nothing pending.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = consumer_info(&js, "worker").await;
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
    assert_eq!(js.get_stream("DLQ").await.unwrap().info().await.unwrap().state.messages, 1);
    sluice.stop().await;
}

#[tokio::test]
async fn an_always_failing_message_is_dead_lettered_after_exactly_max_attempts() {
    let server = nats();
    let js = stream(&server, "WORK", &["work.>"]).await;
    let sluice = Sluice::start(
        &server,
        &[("w.toml", work_manifest("max_attempts = 3\ninitial = \"150ms\"\njitter = \"none\""))],
    )
    .await;

    js_publish(&js, "work.1", "retry").await;
    let dead = stream_messages(&js, "DLQ", 1, Duration::from_secs(20)).await;
    let d = &dead[0];
    assert_eq!(header(d, "Sluice-Failure-Kind"), "retries-exhausted");
    assert_eq!(header(d, "Sluice-Last-Failure-Kind"), "retry-requested");
    assert_eq!(header(d, "Sluice-Failure-Reason"), "asked to retry");
    assert_eq!(header(d, "Sluice-Attempts"), "3");
    // Backoffs of 150ms and 300ms lie between the first and the last failure.
    let gap =
        time_header(d, "Sluice-Last-Failure-At").duration_since(time_header(d, "Sluice-First-Failure-At")).unwrap();
    assert!(gap >= Duration::from_millis(450), "attempts too close together: {gap:?}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(js.get_stream("DLQ").await.unwrap().info().await.unwrap().state.messages, 1);
    assert_eq!(consumer_info(&js, "worker").await.num_ack_pending, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn a_missing_dead_letter_stream_does_not_lose_the_message() {
    let server = nats();
    let js = stream(&server, "WORK", &["work.>"]).await;
    // No stream captures the dead-letter subject, and Sluice is not asked to create one.
    let text =
        work_manifest("max_attempts = 2\ninitial = \"100ms\"\nmax = \"300ms\"").replace("create_stream = true\n", "");
    let sluice = Sluice::start(&server, &[("w.toml", text)]).await;

    js_publish(&js, "work.1", "reject").await;
    // The dead letter cannot be stored, so the message stays with the consumer...
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let info = consumer_info(&js, "worker").await;
    assert_eq!(info.num_ack_pending + info.num_pending as usize, 1, "the message was let go: {info:?}");
    assert!(info.num_redelivered >= 1, "the message did not come back: {info:?}");

    // ...and once the stream exists, its next delivery is dead-lettered (without running
    // the handler again).
    js.create_stream(jetstream::stream::Config {
        name: "DLQ".into(),
        subjects: vec!["dlq.worker".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let dead = stream_messages(&js, "DLQ", 1, Duration::from_secs(20)).await;
    assert_eq!(header(&dead[0], "Sluice-Failure-Kind"), "retries-exhausted");
    assert_eq!(&dead[0].payload[..], b"reject");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(consumer_info(&js, "worker").await.num_ack_pending, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn a_crash_mid_retry_sequence_continues_after_restart_with_one_dead_letter() {
    let server = nats();
    let js = stream(&server, "WORK", &["work.>"]).await;
    let text = work_manifest("max_attempts = 4\ninitial = \"400ms\"\njitter = \"none\"");
    let first = Sluice::start(&server, &[("w.toml", text.clone())]).await;

    js_publish(&js, "work.1", "retry").await;
    // Attempt 1 at once, attempt 2 after 400ms; crash before attempt 3 (800ms later).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while consumer_info(&js, "worker").await.delivered.stream_sequence == 0
        || consumer_info(&js, "worker").await.num_redelivered == 0
    {
        assert!(tokio::time::Instant::now() < deadline, "attempt 2 never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.crash().await;

    let second = Sluice::start(&server, &[("w.toml", text)]).await;
    let dead = stream_messages(&js, "DLQ", 1, Duration::from_secs(30)).await;
    assert_eq!(dead.len(), 1);
    // The count went on from JetStream's delivery count: 4 attempts in all, not 4 after the
    // restart.
    assert_eq!(header(&dead[0], "Sluice-Attempts"), "4");
    assert_eq!(header(&dead[0], "Sluice-Failure-Kind"), "retries-exhausted");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(js.get_stream("DLQ").await.unwrap().info().await.unwrap().state.messages, 1);
    let info = consumer_info(&js, "worker").await;
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
    second.stop().await;
}

#[tokio::test]
async fn runtimes_bound_to_one_durable_consumer_share_its_messages() {
    let server = nats();
    let js = stream(&server, "WORK", &["work.>"]).await;
    let tagged = |tag: &str| {
        work_manifest("max_attempts = 3").replace("[retry]", &format!("[config]\ntag = \"{tag}\"\n\n[retry]"))
    };
    let a = Sluice::start(&server, &[("w.toml", tagged("a"))]).await;
    let b = Sluice::start(&server, &[("w.toml", tagged("b"))]).await;
    let nc = client(&server).await;
    let mut results = nc.subscribe("results.>").await.unwrap();
    sync(&nc).await;

    const N: usize = 200;
    for i in 0..N {
        js_publish(&js, &format!("work.{i}"), &format!("publish:results.{i}")).await;
    }
    let mut per_message: HashMap<String, usize> = HashMap::new();
    let mut per_runtime: HashMap<String, usize> = HashMap::new();
    let mut quiet = Duration::from_secs(30);
    let mut received = 0;
    while let Ok(Some(msg)) = tokio::time::timeout(quiet, results.next()).await {
        *per_message.entry(msg.subject.to_string()).or_default() += 1;
        let tag = msg.headers.as_ref().and_then(|h| h.get("Test-Tag")).map(|v| v.to_string());
        *per_runtime.entry(tag.unwrap_or_default()).or_default() += 1;
        received += 1;
        if received == N {
            quiet = Duration::from_millis(500);
        }
    }
    assert_eq!(per_message.len(), N);
    assert!(per_message.values().all(|&n| n == 1), "a message was handled twice");
    assert_eq!(per_runtime.len(), 2, "one runtime got everything: {per_runtime:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_existing_consumer_with_another_filter_is_refused() {
    let server = nats();
    let js = stream(&server, "WORK", &["work.>"]).await;
    js.get_stream("WORK")
        .await
        .unwrap()
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("worker".into()),
            filter_subject: "work.other".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = Sluice::try_start(&server, &[("w.toml", work_manifest("max_attempts = 2"))]).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("consumer worker on stream WORK exists with a conflicting configuration"), "{text}");
    assert!(text.contains("filter subjects are [\"work.other\"]"), "{text}");
}

#[tokio::test]
async fn dlq_replay_into_a_fixed_handler_empties_the_dead_letter_stream() {
    use sluice::testing::dlq_admin::{self as admin, Filter, ReplayOptions};

    let server = nats();
    let js = stream(&server, "WORK", &["work.>"]).await;
    let broken = work_manifest("max_attempts = 2").replace("[retry]", "[config]\nbroken = true\n\n[retry]");
    let v1 = Sluice::start(&server, &[("w.toml", broken)]).await;
    const N: usize = 20;
    for i in 0..N {
        js_publish(&js, &format!("work.{i}"), &format!("config-gate:results.{i}")).await;
    }
    stream_messages(&js, "DLQ", N as u64, Duration::from_secs(30)).await;
    v1.stop().await;

    // Listing, filtered.
    let all = admin::list(&js, "DLQ", &Filter::default()).await.unwrap();
    assert_eq!(all.len(), N);
    assert!(all.iter().all(|e| e.handler() == "worker" && e.kind() == "rejected" && e.reason() == "handler is broken"));
    let by_kind = Filter { kind: Some("rejected".into()), ..Filter::default() };
    assert_eq!(admin::list(&js, "DLQ", &by_kind).await.unwrap().len(), N);
    let other = Filter { handler: Some("someone-else".into()), ..Filter::default() };
    assert!(admin::list(&js, "DLQ", &other).await.unwrap().is_empty());

    // The fixed version serves; a dry run changes nothing.
    let v2 = Sluice::start(&server, &[("w.toml", work_manifest("max_attempts = 2"))]).await;
    let nc = client(&server).await;
    let mut results = nc.subscribe("results.>").await.unwrap();
    sync(&nc).await;
    let sender = sluice::testing::OutputSender::new(nc.clone());
    let dry = ReplayOptions { dry_run: true, ..ReplayOptions::default() };
    assert_eq!(admin::replay(&sender, "DLQ", &dry, |_, _| {}).await.unwrap().replayed.len(), N);
    assert_eq!(js.get_stream("DLQ").await.unwrap().info().await.unwrap().state.messages, N as u64);

    // A limited replay, then the rest.
    let five = ReplayOptions { filter: Filter { limit: Some(5), ..Filter::default() }, ..ReplayOptions::default() };
    let mut progress = Vec::new();
    let report = admin::replay(&sender, "DLQ", &five, |done, total| progress.push((done, total))).await.unwrap();
    assert_eq!(report.replayed.len(), 5);
    assert!(report.failed.is_none());
    assert_eq!(progress.last(), Some(&(5, 5)));
    assert_eq!(js.get_stream("DLQ").await.unwrap().info().await.unwrap().state.messages, (N - 5) as u64);
    let rest = admin::replay(&sender, "DLQ", &ReplayOptions::default(), |_, _| {}).await.unwrap();
    assert_eq!(rest.replayed.len(), N - 5);
    assert_eq!(js.get_stream("DLQ").await.unwrap().info().await.unwrap().state.messages, 0);

    // Every replayed message was processed by the fixed handler, once.
    let mut seen = std::collections::HashSet::new();
    while seen.len() < N {
        let msg = tokio::time::timeout(Duration::from_secs(20), results.next()).await.unwrap().unwrap();
        assert_eq!(&msg.payload[..], b"fixed");
        assert!(seen.insert(msg.subject.to_string()), "{} processed twice", msg.subject);
    }
    v2.stop().await;
}

#[tokio::test]
async fn a_handler_cannot_reply_to_the_ack_subject_of_its_stream_message() {
    // A stream message's reply subject is JetStream's ack subject. Were it handed to the
    // guest, misbehave's answer ("ok") would be published there, next to Sluice's own ack,
    // and a reply of "-NAK" or "+TERM" would settle the message behind Sluice's back.
    let server = nats();
    let js = stream(&server, "WORK", &["work.>"]).await;
    let observer = client(&server).await;
    let mut acks = observer.subscribe("$JS.ACK.WORK.>").await.unwrap();
    sync(&observer).await;
    let sluice = Sluice::start(&server, &[("w.toml", work_manifest("max_attempts = 1"))]).await;
    js_publish(&js, "work.1", "ok").await;
    let seen = sluice_tests::collect_quiet(&mut acks, Duration::from_millis(800), Duration::from_secs(10)).await;
    let payloads: Vec<String> = seen.iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect();
    // async-nats acks with an empty payload.
    assert_eq!(payloads, [""], "only Sluice's own ack reaches the ack subject");
    let info = consumer_info(&js, "worker").await;
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    sluice.stop().await;
}

/// A one-call-at-a-time handler whose calls take `ms`, on stream WORK, with its ack wait.
fn slow_manifest(ack_wait: &str) -> String {
    work_manifest("max_attempts = 3")
        .replace("timeout = \"1s\"", "timeout = \"1s\"\nmax_concurrency = 1")
        .replace("stream = \"WORK\"", &format!("stream = \"WORK\"\nack_wait = \"{ack_wait}\""))
}

/// Collects results until `n` distinct subjects arrived (or `within` passed), then for as
/// long as more keep arriving within `linger` (duplicates).
async fn collect(
    results: &mut async_nats::Subscriber,
    n: usize,
    within: Duration,
    linger: Duration,
) -> HashMap<String, usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + within;
    while seen.len() < n {
        match tokio::time::timeout_at(deadline, results.next()).await {
            Ok(Some(msg)) => *seen.entry(msg.subject.to_string()).or_default() += 1,
            _ => break,
        }
    }
    while let Ok(Some(msg)) = tokio::time::timeout(linger, results.next()).await {
        *seen.entry(msg.subject.to_string()).or_default() += 1;
    }
    seen
}

/// Stream WORK with `n` messages each taking `ms` to handle, and a subscription to their
/// results (kept alive by the returned client).
async fn slow_work(
    n: usize,
    ms: u64,
) -> (sluice::testing::NatsServer, jetstream::Context, async_nats::Client, async_nats::Subscriber) {
    let server = nats();
    let js = stream(&server, "WORK", &["work.>"]).await;
    let nc = client(&server).await;
    let results = nc.subscribe("results.>").await.unwrap();
    sync(&nc).await;
    for i in 0..n {
        js_publish(&js, &format!("work.{i}"), &format!("work:{ms}:results.{i}")).await;
    }
    (server, js, nc, results)
}

#[tokio::test]
async fn messages_pulled_ahead_of_a_slow_handler_are_kept_alive_past_their_ack_wait() {
    // One call at a time, 700 ms each: the lookahead (4 messages) waits up to 2.8 s here,
    // longer than the 2 s ack wait. In-progress acks keep them from being redelivered.
    const N: usize = 8;
    let (server, js, _nc, mut results) = slow_work(N, 700).await;
    let sluice = Sluice::start(&server, &[("w.toml", slow_manifest("2s"))]).await;
    let seen = collect(&mut results, N, Duration::from_secs(30), Duration::from_millis(500)).await;
    assert_eq!(seen.len(), N, "not every message was handled: {seen:?}");
    assert!(seen.values().all(|&n| n == 1), "a message was handled twice: {seen:?}");
    let info = consumer_info(&js, "worker").await;
    assert_eq!(info.num_redelivered, 0, "a message waiting here was redelivered");
    assert_eq!(info.num_ack_pending, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn a_stopping_process_gives_back_what_it_pulled_ahead_at_once() {
    // A 30 s ack wait: what the first process pulled ahead and did not start reaches the
    // second well before that, because stopping gives it back.
    const N: usize = 6;
    let (server, _js, _nc, mut results) = slow_work(N, 400).await;
    let first = Sluice::start(&server, &[("w.toml", slow_manifest("30s"))]).await;
    let mut seen = collect(&mut results, 1, Duration::from_secs(10), Duration::ZERO).await;
    assert!(!seen.is_empty(), "the first process handled nothing");
    first.stop().await;
    // What the first finished while stopping (its call in flight).
    for (subject, n) in collect(&mut results, N, Duration::from_millis(300), Duration::ZERO).await {
        *seen.entry(subject).or_default() += n;
    }
    assert!(seen.len() < N, "the first process handled everything before it stopped: {seen:?}");
    let stopped = tokio::time::Instant::now();
    let second = Sluice::start(&server, &[("w.toml", slow_manifest("30s"))]).await;
    for (subject, n) in collect(&mut results, N - seen.len(), Duration::from_secs(15), Duration::from_millis(500)).await
    {
        *seen.entry(subject).or_default() += n;
    }
    assert_eq!(seen.len(), N, "messages pulled ahead waited for their ack wait: {seen:?}");
    assert!(stopped.elapsed() < Duration::from_secs(25), "took {:?}", stopped.elapsed());
    assert!(seen.values().all(|&n| n == 1), "a message was handled twice: {seen:?}");
    second.stop().await;
}
