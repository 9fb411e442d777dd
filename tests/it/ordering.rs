//! `[ordering]`: messages with the same key are handled one at a time, in the order received;
//! different keys run in parallel; a retry holds back its own key only.
//!
//! The handler (misbehave's `trace` command) publishes, for every message, its key, its
//! sequence within the key and when its call started and ended; the tests check those
//! intervals: per key, in published order and never overlapping; across keys, overlapping.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use sluice_tests::{Sluice, client, manifest, nats, stream, sync};

/// One handled message, as the handler reported it.
#[derive(Debug, Clone)]
struct Run {
    key: String,
    seq: u64,
    attempt: u64,
    start: u128,
    end: u128,
}

fn parse(msg: &async_nats::Message) -> Run {
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).expect("trace record");
    let n = |f: &str| v[f].as_str().and_then(|s| s.parse::<u128>().ok()).expect("time");
    Run {
        key: v["key"].as_str().expect("key").to_owned(),
        seq: v["seq"].as_u64().expect("seq"),
        attempt: v["attempt"].as_u64().expect("attempt"),
        start: n("start_ns"),
        end: n("end_ns"),
    }
}

fn command(key: &str, seq: u64, sleep_us: u64, fail_attempts: u64) -> String {
    serde_json::json!({"cmd": "trace:ord.out", "key": key, "seq": seq, "sleep_us": sleep_us, "fail_attempts": fail_attempts})
        .to_string()
}

/// Reads `n` trace records from `sub`, failing after `limit`.
async fn collect(sub: &mut async_nats::Subscriber, n: usize, limit: Duration) -> Vec<Run> {
    let mut runs = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + limit;
    while runs.len() < n {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(msg)) => runs.push(parse(&msg)),
            _ => panic!("only {} of {n} messages handled in {limit:?}", runs.len()),
        }
    }
    runs
}

/// Per key: handled in sequence order, one at a time, each message once. Returns the largest
/// number of calls that ran at the same time (over all keys).
fn check_order(runs: &[Run], keys: usize, per_key: u64) -> usize {
    check_runs(runs, keys, per_key, false)
}

/// [`check_order`], or with `reruns` the first runs of each sequence number in order (a
/// message handled again after a crash, when its ack was lost, runs again right after itself,
/// never after a later one); never two runs of a key overlapping.
fn check_runs(runs: &[Run], keys: usize, per_key: u64, reruns: bool) -> usize {
    let mut by_key: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for run in runs {
        by_key.entry(&run.key).or_default().push(run);
    }
    assert_eq!(by_key.len(), keys, "keys seen");
    for (key, list) in &mut by_key {
        list.sort_by_key(|r| r.start);
        let mut seqs: Vec<u64> = list.iter().map(|r| r.seq).collect();
        if reruns {
            seqs.dedup();
        }
        assert_eq!(seqs, (0..per_key).collect::<Vec<_>>(), "key {key}: handled out of order (or twice, or not at all)");
        for pair in list.windows(2) {
            assert!(
                pair[1].start >= pair[0].end,
                "key {key}: seq {} started before seq {} ended",
                pair[1].seq,
                pair[0].seq
            );
        }
    }
    // The most calls in flight at once: sweep over the starts and ends.
    let mut events: Vec<(u128, i32)> = runs.iter().flat_map(|r| [(r.start, 1), (r.end, -1)]).collect();
    events.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        most = most.max(now);
    }
    most as usize
}

fn ordered(name: &str, source: &str, extra: &str) -> String {
    manifest(
        name,
        "misbehave",
        "ord.in",
        &format!(
            "[limits]\nmax_concurrency = 32\n\n[capabilities]\npublish = [\"ord.out\"]\n\n\
             [ordering]\nkey = \"json:/key\"\n\n{extra}"
        ),
    )
    .replace("subject = \"ord.in\"", source)
}

#[tokio::test]
async fn jetstream_keys_are_handled_in_stream_order_one_at_a_time_and_in_parallel() {
    let server = nats();
    let js = stream(&server, "ORD", &["ord.in"]).await;
    let (keys, per_key) = (20usize, 500u64);
    // Acks awaited in a window: the client allows only so many in flight.
    let mut acks = std::collections::VecDeque::new();
    for seq in 0..per_key {
        for k in 0..keys {
            let sleep_us = fastrand::u64(0..1500);
            let payload = command(&format!("k{k}"), seq, sleep_us, 0);
            acks.push_back(js.publish("ord.in", payload.into()).await.unwrap());
            if acks.len() >= 256
                && let Some(ack) = acks.pop_front()
            {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let nc = client(&server).await;
    let mut out = nc.subscribe("ord.out").await.unwrap();
    sync(&nc).await;
    let sluice = Sluice::start(&server, &[("o.toml", ordered("o", "stream = \"ORD\"", ""))]).await;
    let runs = collect(&mut out, keys * per_key as usize, Duration::from_secs(240)).await;
    let most = check_order(&runs, keys, per_key);
    assert!(most > 1, "never more than one call at a time: ordering serialised every key");
    assert!(runs.iter().all(|r| r.attempt == 1), "nothing failed, nothing was retried");
    sluice.stop().await;
}

#[tokio::test]
async fn core_keys_are_handled_in_arrival_order_one_at_a_time_and_in_parallel() {
    let server = nats();
    let nc = client(&server).await;
    let mut out = nc.subscribe("ord.out").await.unwrap();
    let sluice = Sluice::start(&server, &[("o.toml", ordered("o", "subject = \"ord.in\"", ""))]).await;
    sync(&nc).await;
    let (keys, per_key) = (10usize, 100u64);
    for seq in 0..per_key {
        for k in 0..keys {
            nc.publish("ord.in", command(&format!("k{k}"), seq, fastrand::u64(0..1500), 0).into()).await.unwrap();
        }
    }
    nc.flush().await.unwrap();
    let runs = collect(&mut out, keys * per_key as usize, Duration::from_secs(120)).await;
    let most = check_order(&runs, keys, per_key);
    assert!(most > 1, "never more than one call at a time: ordering serialised every key");
    sluice.stop().await;
}

/// A retry holds back the later messages of its key, and only of its key.
async fn a_retry_holds_its_key_only(source: &str, jetstream: bool) {
    let server = nats();
    let js = stream(&server, "ORD", &["ord.in"]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("ord.out").await.unwrap();
    let retry = "[retry]\nbackoff = \"constant\"\ninitial = \"1500ms\"\njitter = \"none\"\n";
    let sluice = Sluice::start(&server, &[("o.toml", ordered("o", source, retry))]).await;
    sync(&nc).await;
    for seq in 0..5 {
        // The first message of key a fails once; everything else succeeds.
        for (key, fail) in [("a", u64::from(seq == 0)), ("b", 0)] {
            let payload = command(key, seq, 1000, fail);
            if jetstream {
                js.publish("ord.in", payload.into()).await.unwrap().await.unwrap();
            } else {
                nc.publish("ord.in", payload.into()).await.unwrap();
            }
        }
    }
    nc.flush().await.unwrap();
    let runs = collect(&mut out, 10, Duration::from_secs(60)).await;
    check_order(&runs, 2, 5);
    let find = |key: &str, seq: u64| runs.iter().find(|r| r.key == key && r.seq == seq).expect("handled").clone();
    let a0 = find("a", 0);
    assert_eq!(a0.attempt, 2, "a's first message succeeds on its second attempt");
    // Its retry came 1.5 s after its first attempt; key b did not wait for it.
    let b4 = find("b", 4);
    assert!(
        b4.end < a0.start,
        "key b waited for key a's retry: b4 ended {} ns after a0's retry began",
        b4.end - a0.start
    );
    // Key a's later messages did.
    assert!(find("a", 1).start >= a0.end, "a1 ran before a0's retry succeeded");
    sluice.stop().await;
}

#[tokio::test]
async fn a_jetstream_retry_holds_back_its_key_and_no_other() {
    a_retry_holds_its_key_only("stream = \"ORD\"", true).await;
}

#[tokio::test]
async fn a_core_retry_holds_back_its_key_and_no_other() {
    a_retry_holds_its_key_only("subject = \"ord.in\"", false).await;
}

/// A server with the source stream ORD and a dead-letter stream DLQ on `dlq.ord`, a client,
/// and its subscription to the handler's trace records.
async fn with_dead_letters()
-> (sluice::testing::NatsServer, async_nats::jetstream::Context, async_nats::Client, async_nats::Subscriber) {
    let server = nats();
    let js = stream(&server, "ORD", &["ord.in"]).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "DLQ".to_owned(),
        subjects: vec!["dlq.ord".to_owned()],
        ..Default::default()
    })
    .await
    .unwrap();
    let nc = client(&server).await;
    let out = nc.subscribe("ord.out").await.unwrap();
    sync(&nc).await;
    (server, js, nc, out)
}

#[tokio::test]
async fn a_message_without_an_ordering_key_is_dead_lettered_when_the_manifest_says_so() {
    let (server, js, _nc, mut out) = with_dead_letters().await;
    let extra = "on_missing = \"dead-letter\"\n\n[dead_letter]\nsubject = \"dlq.ord\"\n";
    let text =
        ordered("o", "stream = \"ORD\"", "").replace("key = \"json:/key\"\n", &format!("key = \"json:/key\"\n{extra}"));
    let sluice = Sluice::start(&server, &[("o.toml", text)]).await;
    js.publish("ord.in", r#"{"cmd": "trace:ord.out", "seq": 0}"#.into()).await.unwrap().await.unwrap();
    js.publish("ord.in", command("k", 1, 0, 0).into()).await.unwrap().await.unwrap();
    let runs = collect(&mut out, 1, Duration::from_secs(30)).await;
    assert_eq!(runs[0].seq, 1, "the keyed message runs");
    let dead = sluice_tests::stream_messages(&js, "DLQ", 1, Duration::from_secs(30)).await;
    let kind = dead[0].headers.get("Sluice-Failure-Kind").map(|v| v.as_str().to_owned());
    assert_eq!(kind.as_deref(), Some("missing-ordering-key"));
    sluice.stop().await;
}

/// The next trace record and the `Test-Tag` of the process that published it.
async fn next(sub: &mut async_nats::Subscriber, deadline: tokio::time::Instant) -> (String, Run) {
    let msg = tokio::time::timeout_at(deadline, sub.next()).await.ok().flatten().expect("outputs stopped");
    (sluice_tests::header(&msg, "Test-Tag").unwrap_or_default(), parse(&msg))
}

#[tokio::test]
async fn partitions_keep_each_key_in_one_process_at_a_time_and_move_when_it_dies() {
    let server = nats();
    let js = async_nats::jetstream::new(client(&server).await);
    // The stream fills in the partition token on ingest: `ordp.in.KEY` is stored as
    // `ordp.p.P.KEY`, P a hash of KEY in 0..4 (what a server-wide mapping would do too).
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ORDP".to_owned(),
        subjects: vec!["ordp.in.*".to_owned()],
        subject_transform: Some(async_nats::jetstream::stream::SubjectTransform {
            source: "ordp.in.*".to_owned(),
            destination: "ordp.p.{{partition(4,1)}}.{{wildcard(1)}}".to_owned(),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let nc = client(&server).await;
    let mut out = nc.subscribe("ord.out").await.unwrap();
    let text = |tag: &str| {
        ordered("o", "stream = \"ORDP\"", &format!("[config]\ntag = \"{tag}\"\n"))
            .replace("[limits]\n", "[limits]\ntimeout = \"1s\"\n")
            .replace(
                "key = \"json:/key\"\n",
                "key = \"subject\"\npartitions = 4\npartition_subject = \"ordp.p.{partition}.*\"\n",
            )
    };
    let mut processes = Vec::new();
    for tag in ["p0", "p1", "p2"] {
        processes.push(Sluice::start(&server, &[("o.toml", text(tag))]).await);
    }
    let (keys, per_key) = (12usize, 150u64);
    let mut acks = std::collections::VecDeque::new();
    for seq in 0..per_key {
        for k in 0..keys {
            let payload = command(&format!("k{k}"), seq, fastrand::u64(0..2000), 0);
            acks.push_back(js.publish(format!("ordp.in.k{k}"), payload.into()).await.unwrap());
            if acks.len() >= 256
                && let Some(ack) = acks.pop_front()
            {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    // Let some work happen, then kill the process that has done the most.
    let total = keys * per_key as usize;
    let mut runs: Vec<(String, Run)> = Vec::with_capacity(total + 64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while runs.len() < total / 4 {
        runs.push(next(&mut out, deadline).await);
    }
    let busiest = ["p0", "p1", "p2"]
        .iter()
        .enumerate()
        .max_by_key(|(_, tag)| runs.iter().filter(|(t, _)| t == *tag).count())
        .map(|(i, _)| i)
        .unwrap();
    let killed = format!("p{busiest}");
    processes.remove(busiest).crash().await;
    let crashed_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    // Every message handled in the end (partitions of the dead process taken over), some of
    // them twice at most (those whose ack died with it).
    loop {
        let mut seen: Vec<(&str, u64)> = runs.iter().map(|(_, r)| (r.key.as_str(), r.seq)).collect();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() == total {
            break;
        }
        runs.push(next(&mut out, deadline).await);
    }
    let after: Vec<&String> = runs.iter().filter(|(_, r)| r.start > crashed_at).map(|(t, _)| t).collect();
    assert!(after.iter().all(|t| **t != killed), "the killed process {killed} kept working");
    assert!(!after.is_empty(), "nothing was left after the kill");
    let only: Vec<Run> = runs.iter().map(|(_, r)| r.clone()).collect();
    check_runs(&only, keys, per_key, true);
    for p in processes {
        p.stop().await;
    }
}

#[tokio::test]
async fn a_parked_key_sends_its_later_messages_to_the_dead_letters_in_order_until_released_and_replayed() {
    let (server, js, nc, mut out) = with_dead_letters().await;
    let text = |fixed: bool| {
        ordered(
            "o",
            "stream = \"ORD\"",
            &format!("[dead_letter]\nsubject = \"dlq.ord\"\n\n[config]\nfixed = {fixed}\n"),
        )
        .replace("key = \"json:/key\"\n", "key = \"json:/key\"\non_poison = \"park\"\n")
    };
    let sluice = Sluice::start(&server, &[("o.toml", text(false))]).await;
    let publish = |key: &str, seq: u64, poison: bool| {
        let payload = serde_json::json!({"cmd": "trace:ord.out", "key": key, "seq": seq, "poison": poison}).to_string();
        let js = js.clone();
        async move { js.publish("ord.in", payload.into()).await.unwrap().await.unwrap() }
    };
    publish("a", 0, true).await;
    for seq in 1..5 {
        publish("a", seq, false).await;
    }
    for seq in 0..5 {
        publish("b", seq, false).await;
    }
    // Key b is untouched; key a's first message is dead-lettered as rejected, the rest of its
    // messages, in order, as key-parked.
    let runs = collect(&mut out, 5, Duration::from_secs(30)).await;
    assert!(runs.iter().all(|r| r.key == "b"), "{runs:?}");
    let dead = sluice_tests::stream_messages(&js, "DLQ", 5, Duration::from_secs(30)).await;
    let seen: Vec<(String, String, u64)> = dead
        .iter()
        .map(|m| {
            let h = |n: &str| m.headers.get(n).map(|v| v.as_str().to_owned()).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            (h("Sluice-Failure-Kind"), h("Sluice-Ordering-Key"), v["seq"].as_u64().unwrap())
        })
        .collect();
    let expected: Vec<(String, String, u64)> = std::iter::once(("rejected".to_owned(), "a".to_owned(), 0))
        .chain((1..5).map(|s| ("key-parked".to_owned(), "a".to_owned(), s)))
        .collect();
    assert_eq!(seen, expected);
    let parked = sluice::testing::list_parked(&js, "o").await.unwrap();
    assert_eq!(parked.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["a"]);
    assert!(parked[0].reason.contains("poison"), "{parked:?}");
    assert_eq!(sluice.status().parked_keys("o"), ["a"], "what /handlers shows");
    // Still parked: a new message of a follows the others.
    publish("a", 5, false).await;
    sluice_tests::stream_messages(&js, "DLQ", 6, Duration::from_secs(30)).await;

    // The handler is fixed, the key released, its dead letters replayed: all six, in order.
    std::fs::write(sluice.manifest_dir().join("o.toml"), text(true)).unwrap();
    assert_eq!(sluice.reloader().reload().await.updated, ["o"]);
    assert!(sluice::testing::release_parked(&js, "o", "a").await.unwrap());
    assert!(!sluice::testing::release_parked(&js, "o", "a").await.unwrap(), "released twice");
    let sender = sluice::testing::OutputSender::new(nc.clone());
    let options = sluice::testing::dlq_admin::ReplayOptions {
        filter: sluice::testing::dlq_admin::Filter { key: Some("a".to_owned()), ..Default::default() },
        to: None,
        dry_run: false,
    };
    let report = sluice::testing::dlq_admin::replay(&sender, "DLQ", &options, |_, _| {}).await.unwrap();
    assert_eq!(report.replayed.len(), 6);
    let runs = collect(&mut out, 6, Duration::from_secs(30)).await;
    check_order(&runs, 1, 6);
    assert!(sluice::testing::list_parked(&js, "o").await.unwrap().is_empty());
    assert!(sluice.status().parked_keys("o").is_empty(), "the release reached the running handler");
    sluice.stop().await;
}

/// `[ordering]` with the resequencer on the payload's `seq` (starting at 0) and `extra`.
fn resequenced(name: &str, source: &str, extra: &str) -> String {
    ordered(name, source, "").replace(
        "key = \"json:/key\"\n",
        &format!("key = \"json:/key\"\nsequence = \"json:/seq\"\nsequence_start = 0\n{extra}"),
    )
}

/// Publishes every key's numbers 0..per_key, shuffled across and within keys.
fn shuffled(keys: usize, per_key: u64) -> Vec<(String, u64)> {
    let mut all: Vec<(String, u64)> = (0..keys).flat_map(|k| (0..per_key).map(move |s| (format!("k{k}"), s))).collect();
    fastrand::shuffle(&mut all);
    all
}

async fn resequences_shuffled_numbers(source: &str, jetstream: bool) {
    let server = nats();
    let js = stream(&server, "ORD", &["ord.in"]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("ord.out").await.unwrap();
    sync(&nc).await;
    let sluice = Sluice::start(&server, &[("o.toml", resequenced("o", source, "max_wait = \"30s\"\n"))]).await;
    let (keys, per_key) = (10usize, 50u64);
    let mut published = shuffled(keys, per_key);
    // Two copies of a few numbers: each is handled once.
    published.insert(published.len() / 2, ("k3".to_owned(), 7));
    published.push(("k5".to_owned(), 0));
    for (key, seq) in &published {
        let payload = command(key, *seq, fastrand::u64(0..500), 0);
        if jetstream {
            js.publish("ord.in", payload.into()).await.unwrap().await.unwrap();
        } else {
            nc.publish("ord.in", payload.into()).await.unwrap();
        }
    }
    let runs = collect(&mut out, keys * per_key as usize, Duration::from_secs(120)).await;
    let most = check_order(&runs, keys, per_key);
    assert!(most > 1, "never more than one call at a time: the resequencer serialised every key");
    // Nothing more: the copies were skipped.
    let extra = tokio::time::timeout(Duration::from_secs(1), out.next()).await;
    assert!(extra.is_err(), "a copy was handled: {:?}", extra.ok().flatten().map(|m| parse(&m)));
    sluice.stop().await;
}

#[tokio::test]
async fn the_resequencer_hands_a_jetstream_keys_shuffled_numbers_to_the_handler_in_order() {
    resequences_shuffled_numbers("stream = \"ORD\"", true).await;
}

#[tokio::test]
async fn the_resequencer_hands_a_core_keys_shuffled_numbers_to_the_handler_in_order() {
    resequences_shuffled_numbers("subject = \"ord.in\"", false).await;
}

#[tokio::test]
async fn a_sequence_gap_is_given_up_on_after_max_wait_and_a_late_number_is_skipped() {
    let (server, js, _nc, mut out) = with_dead_letters().await;
    let text = resequenced("o", "stream = \"ORD\"", "max_wait = \"1s\"\n");
    let sluice = Sluice::start(&server, &[("o.toml", text)]).await;
    for seq in [0, 1, 3, 4] {
        js.publish("ord.in", command("a", seq, 0, 0).into()).await.unwrap().await.unwrap();
    }
    let first = collect(&mut out, 2, Duration::from_secs(30)).await;
    assert_eq!(first.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1]);
    let started = std::time::Instant::now();
    let rest = collect(&mut out, 2, Duration::from_secs(30)).await;
    assert_eq!(rest.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4], "on past the gap, in order");
    assert!(started.elapsed() >= Duration::from_millis(500), "3 did not wait for 2");
    // 2 arrives late: the key has passed it.
    js.publish("ord.in", command("a", 2, 0, 0).into()).await.unwrap().await.unwrap();
    js.publish("ord.in", command("a", 5, 0, 0).into()).await.unwrap().await.unwrap();
    let after = collect(&mut out, 1, Duration::from_secs(30)).await;
    assert_eq!(after[0].seq, 5, "the late 2 is skipped, 5 follows 4");
    sluice.stop().await;
}

#[tokio::test]
async fn a_sequence_gap_dead_letters_the_waiting_messages_in_order_until_the_number_comes() {
    let (server, js, nc, mut out) = with_dead_letters().await;
    let text = resequenced(
        "o",
        "stream = \"ORD\"",
        "max_wait = \"1s\"\non_gap = \"dead-letter\"\n\n[dead_letter]\nsubject = \"dlq.ord\"\n",
    );
    let sluice = Sluice::start(&server, &[("o.toml", text)]).await;
    for seq in [0, 2, 3] {
        js.publish("ord.in", command("a", seq, 0, 0).into()).await.unwrap().await.unwrap();
    }
    // Without a number: dead-lettered at once.
    js.publish("ord.in", r#"{"cmd": "trace:ord.out", "key": "b"}"#.into()).await.unwrap().await.unwrap();
    let runs = collect(&mut out, 1, Duration::from_secs(30)).await;
    assert_eq!(runs[0].seq, 0);
    let dead = sluice_tests::stream_messages(&js, "DLQ", 3, Duration::from_secs(30)).await;
    let seen: Vec<(String, Option<u64>)> = dead
        .iter()
        .map(|m| {
            let kind = m.headers.get("Sluice-Failure-Kind").map(|v| v.as_str().to_owned()).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            (kind, v["seq"].as_u64())
        })
        .collect();
    let mut gap: Vec<_> = seen.iter().filter(|(k, _)| k == "sequence-gap").cloned().collect();
    assert_eq!(gap, [("sequence-gap".to_owned(), Some(2)), ("sequence-gap".to_owned(), Some(3))], "{seen:?}");
    assert!(seen.contains(&("missing-sequence".to_owned(), None)), "{seen:?}");
    // The key still expects 1; it comes, then the dead letters are replayed: 2 and 3 follow.
    js.publish("ord.in", command("a", 1, 0, 0).into()).await.unwrap().await.unwrap();
    assert_eq!(collect(&mut out, 1, Duration::from_secs(30)).await[0].seq, 1);
    let sender = sluice::testing::OutputSender::new(nc.clone());
    let options = sluice::testing::dlq_admin::ReplayOptions {
        filter: sluice::testing::dlq_admin::Filter { key: Some("a".to_owned()), ..Default::default() },
        to: None,
        dry_run: false,
    };
    let report = sluice::testing::dlq_admin::replay(&sender, "DLQ", &options, |_, _| {}).await.unwrap();
    assert_eq!(report.replayed.len(), 2);
    let replayed = collect(&mut out, 2, Duration::from_secs(30)).await;
    gap = replayed.iter().map(|r| ("sequence-gap".to_owned(), Some(r.seq))).collect();
    assert_eq!(gap.iter().map(|(_, s)| s.unwrap()).collect::<Vec<_>>(), [2, 3]);
    sluice.stop().await;
}

#[tokio::test]
async fn the_next_expected_number_survives_a_restart_on_nats_kv() {
    let server = nats();
    let js = stream(&server, "ORD", &["ord.in"]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("ord.out").await.unwrap();
    sync(&nc).await;
    let text =
        format!("{}\n[store]\nbackend = \"nats-kv\"\n", resequenced("o", "stream = \"ORD\"", "max_wait = \"30s\"\n"));
    let sluice = Sluice::start(&server, &[("o.toml", text.clone())]).await;
    for seq in 0..3 {
        js.publish("ord.in", command("a", seq, 0, 0).into()).await.unwrap().await.unwrap();
    }
    assert_eq!(
        collect(&mut out, 3, Duration::from_secs(30)).await.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    sluice.stop().await;
    // Another process: the key's next number (3) is in the store, not in memory.
    let sluice = Sluice::start(&server, &[("o.toml", text)]).await;
    for seq in [1, 4, 3] {
        js.publish("ord.in", command("a", seq, 0, 0).into()).await.unwrap().await.unwrap();
    }
    let runs = collect(&mut out, 2, Duration::from_secs(30)).await;
    assert_eq!(runs.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4], "1 passed, 4 waited for 3");
    assert!(tokio::time::timeout(Duration::from_secs(1), out.next()).await.is_err(), "1 ran again");
    sluice.stop().await;
}
