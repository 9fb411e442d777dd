//! The transactional outbox: a call's publications are committed with its state and key, the
//! source is acked after that commit, and the relay sends them afterwards. A crash at each
//! step leaves exactly one copy of each output downstream (a stream with a duplicate window).

use std::time::Duration;

use async_nats::jetstream;
use sluice::RuntimeOptions;
use sluice::testing::Fault;
use sluice_tests::{Sluice, js_publish, manifest, nats, stream, stream_messages};

/// A JetStream handler on stream WORK that may publish to `out.>`, keyed by `json:/id`.
fn worker(extra: &str) -> String {
    manifest(
        "w",
        "misbehave",
        "work",
        &format!(
            "[capabilities]\npublish = [\"out.>\"]\n\n[limits]\ntimeout = \"1s\"\n\n\
             [idempotency]\nkey = \"json:/id\"\n\n{extra}"
        ),
    )
    .replace("subject = \"work\"", "stream = \"WORK\"\nack_wait = \"3s\"")
}

fn options(data: &std::path::Path, fault: Option<Fault>) -> RuntimeOptions {
    RuntimeOptions { data_dir: Some(data.to_owned()), fault, ..RuntimeOptions::default() }
}

/// The worker on `backend` (`data` holds the embedded store), with `fault` injected.
async fn serve(
    server: &sluice::testing::NatsServer,
    backend: &str,
    data: &std::path::Path,
    fault: Option<Fault>,
) -> Sluice {
    let text = worker(&format!("[store]\nbackend = \"{backend}\""));
    Sluice::start_with(server, &[("w.toml", text)], tempfile::tempdir().unwrap(), options(data, fault)).await.unwrap()
}

async fn out_count(js: &jetstream::Context) -> u64 {
    js.get_stream("OUT").await.unwrap().info().await.unwrap().state.messages
}

/// The line of `metric` for handler `w` in the Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name}{{handler=\"w\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

async fn wait_consumer_settled(js: &jetstream::Context, limit: Duration) -> jetstream::consumer::Info {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let info = js.get_stream("WORK").await.unwrap().consumer_info("w").await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return info;
        }
        assert!(tokio::time::Instant::now() < deadline, "the consumer never settled: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn subjects(msgs: &[jetstream::message::StreamMessage]) -> Vec<String> {
    let mut s: Vec<String> = msgs.iter().map(|m| m.subject.to_string()).collect();
    s.sort();
    s
}

#[tokio::test]
async fn a_crash_after_the_commit_before_the_ack_sends_the_outputs_on_restart_once() {
    crash_after_the_commit("redb").await;
}

#[tokio::test]
async fn a_crash_after_the_commit_before_the_ack_sends_the_outputs_on_restart_once_on_nats_kv() {
    crash_after_the_commit("nats-kv").await;
}

async fn crash_after_the_commit(backend: &str) {
    let server = nats();
    let js = stream(&server, "WORK", &["work"]).await;
    let _ = stream(&server, "OUT", &["out.>"]).await;
    let data = tempfile::tempdir().unwrap();

    let first = serve(&server, backend, data.path(), Some(Fault::HaltAfterCommit)).await;
    js_publish(&js, "work", r#"{"id": "k-1", "cmd": "publish:out.1"}"#).await;
    js_publish(&js, "work", r#"{"id": "k-2", "cmd": "publish:out.2"}"#).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&first.metrics(), "sluice_messages_received_total") != Some(2.0) {
        assert!(tokio::time::Instant::now() < deadline, "not received:\n{}", first.metrics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(out_count(&js).await, 0, "an output left the process before its commit was relayed");
    first.crash().await;

    // The restart sends both from the outbox, then skips the redeliveries (the keys completed).
    let second = serve(&server, backend, data.path(), None).await;
    assert_eq!(out_count(&js).await, 2, "the outbox is sent before the handler serves");
    let info = wait_consumer_settled(&js, Duration::from_secs(20)).await;
    assert!(info.delivered.consumer_sequence >= 4, "the messages were not redelivered: {info:?}");
    let out = stream_messages(&js, "OUT", 2, Duration::from_secs(1)).await;
    assert_eq!(subjects(&out), ["out.1", "out.2"]);
    let m = second.metrics();
    assert_eq!(metric(&m, "sluice_outbox_sent_total"), Some(2.0), "{m}");
    assert_eq!(metric(&m, "sluice_messages_skipped_duplicate_total"), Some(2.0), "{m}");
    assert_eq!(metric(&m, "sluice_outbox_entries"), Some(0.0), "{m}");
    second.stop().await;
}

#[tokio::test]
async fn a_crash_after_the_ack_before_the_relay_sends_the_outputs_on_restart_first() {
    crash_after_the_ack("redb").await;
}

#[tokio::test]
async fn a_crash_after_the_ack_before_the_relay_sends_the_outputs_on_restart_first_on_nats_kv() {
    crash_after_the_ack("nats-kv").await;
}

async fn crash_after_the_ack(backend: &str) {
    let server = nats();
    let js = stream(&server, "WORK", &["work"]).await;
    let _ = stream(&server, "OUT", &["out.>"]).await;
    let data = tempfile::tempdir().unwrap();

    let first = serve(&server, backend, data.path(), Some(Fault::HaltAfterAck)).await;
    for i in 0..5 {
        js_publish(&js, "work", &format!(r#"{{"id": "old-{i}", "cmd": "publish:out.old.{i}"}}"#)).await;
    }
    // A message without a key: committed (its handler has a store), acked, never redelivered.
    js_publish(&js, "work", r#"{"cmd": "publish:out.old.nokey"}"#).await;
    wait_consumer_settled(&js, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(out_count(&js).await, 0);
    first.crash().await;

    let second = serve(&server, backend, data.path(), None).await;
    for i in 0..5 {
        js_publish(&js, "work", &format!(r#"{{"id": "new-{i}", "cmd": "publish:out.new.{i}"}}"#)).await;
    }
    let out = stream_messages(&js, "OUT", 11, Duration::from_secs(20)).await;
    assert_eq!(out.len(), 11, "{:?}", subjects(&out));
    // What the crash left goes out before anything new.
    let order: Vec<String> = out.iter().map(|m| m.subject.to_string()).collect();
    assert!(order[..6].iter().all(|s| s.starts_with("out.old.")), "{order:?}");
    assert!(order[6..].iter().all(|s| s.starts_with("out.new.")), "{order:?}");
    let nokey = out.iter().find(|m| m.subject.as_str() == "out.old.nokey").unwrap();
    let id = nokey.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()).unwrap_or_default();
    assert!(id.starts_with("w/outbox/"), "a keyless output gets a stored id: {id:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(out_count(&js).await, 11);
    second.stop().await;
}

#[tokio::test]
async fn a_crash_after_publishing_before_removal_resends_and_the_stream_drops_the_copies() {
    crash_after_publishing("redb").await;
}

#[tokio::test]
async fn a_crash_after_publishing_before_removal_resends_and_the_stream_drops_the_copies_on_nats_kv() {
    crash_after_publishing("nats-kv").await;
}

async fn crash_after_publishing(backend: &str) {
    let server = nats();
    let js = stream(&server, "WORK", &["work"]).await;
    let _ = stream(&server, "OUT", &["out.>"]).await;
    let data = tempfile::tempdir().unwrap();

    let first = serve(&server, backend, data.path(), Some(Fault::HaltAfterPublish)).await;
    js_publish(&js, "work", r#"{"id": "k-1", "cmd": "publish:out.1"}"#).await;
    js_publish(&js, "work", r#"{"id": "k-2", "cmd": "publish:out.2"}"#).await;
    js_publish(&js, "work", r#"{"cmd": "publish:out.nokey"}"#).await;
    wait_consumer_settled(&js, Duration::from_secs(10)).await;
    stream_messages(&js, "OUT", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.crash().await;

    // Every entry was still in the outbox (the one published too): all three are sent again,
    // and OUT's duplicate window keeps one copy of each.
    let second = serve(&server, backend, data.path(), None).await;
    let m = second.metrics();
    assert_eq!(metric(&m, "sluice_outbox_sent_total"), Some(3.0), "{m}");
    let out = stream_messages(&js, "OUT", 3, Duration::from_secs(5)).await;
    assert_eq!(subjects(&out), ["out.1", "out.2", "out.nokey"]);
    second.stop().await;

    // Sent and removed: a third start has nothing left to send.
    let third = serve(&server, backend, data.path(), None).await;
    assert_eq!(metric(&third.metrics(), "sluice_outbox_sent_total").unwrap_or(0.0), 0.0);
    assert_eq!(out_count(&js).await, 3);
    third.stop().await;
}

#[tokio::test]
async fn a_full_outbox_pauses_the_handler_without_failing_messages() {
    let server = nats();
    let js = stream(&server, "WORK", &["work"]).await;
    // OUT takes two messages, then refuses (discard new) until its limit is raised.
    js.create_stream(jetstream::stream::Config {
        name: "OUT".into(),
        subjects: vec!["out.>".into()],
        max_messages: 2,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let text = worker("[store]\nmax_outbox = 4\n").replace("timeout = \"1s\"", "timeout = \"1s\"\nmax_concurrency = 2");
    let sluice =
        Sluice::start_with(&server, &[("w.toml", text)], tempfile::tempdir().unwrap(), options(data.path(), None))
            .await
            .unwrap();
    const N: u64 = 30;
    for i in 0..N {
        js_publish(&js, "work", &format!(r#"{{"id": "k-{i}", "cmd": "publish:out.{i}"}}"#)).await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = format!("http://{}", listener.local_addr().unwrap());
    sluice::admin::serve(listener, sluice::admin::AdminState::new(sluice.metrics_registry(), sluice.status()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while metric(&sluice.metrics(), "sluice_outbox_full_total").unwrap_or(0.0) < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the outbox never filled:\n{}", sluice.metrics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = sluice.metrics();
    let depth = metric(&m, "sluice_outbox_entries").unwrap();
    // Over the bound by at most the messages under way: calls running (2) and the few between
    // their call and their commit.
    assert!((4.0..=8.0).contains(&depth), "the outbox holds its bound, plus at most the calls under way: {depth}\n{m}");
    let info = js.get_stream("WORK").await.unwrap().consumer_info("w").await.unwrap();
    assert!(info.num_pending > 0, "the handler kept taking messages: {info:?}");
    assert_eq!(
        metric(&m, "sluice_messages_retried_total").unwrap_or(0.0),
        0.0,
        "a refused output is not a failed attempt"
    );
    // The stream's refusal is counted by reason, and the process says it is degraded (alive,
    // still ready) once the oldest output has waited 5 s.
    let refused = m
        .lines()
        .find_map(|l| l.strip_prefix("sluice_outbox_failures_total{handler=\"w\",reason=\"refused\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(refused.is_some_and(|n| n >= 1.0), "{m}");
    assert!(metric(&m, "sluice_outbox_oldest_timestamp_seconds").unwrap_or(0.0) > 1.0e9, "{m}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = sluice_tests::http_get(&format!("{admin}/healthz")).await;
        assert_eq!(code, 200);
        if body.starts_with("degraded: handler w: outbox ") {
            break;
        }
        assert!(body == "ok\n", "{body}");
        assert!(tokio::time::Instant::now() < deadline, "/healthz never said degraded: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The stream takes messages again: everything arrives, once.
    let mut out = js.get_stream("OUT").await.unwrap();
    let mut config = out.info().await.unwrap().config.clone();
    config.max_messages = -1;
    js.update_stream(config).await.unwrap();
    let got = stream_messages(&js, "OUT", N, Duration::from_secs(60)).await;
    assert_eq!(got.len() as u64, N);
    wait_consumer_settled(&js, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(out.info().await.unwrap().state.messages, N);
    let m = sluice.metrics();
    assert_eq!(metric(&m, "sluice_outbox_entries"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "sluice_outbox_oldest_timestamp_seconds"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "sluice_messages_succeeded_total"), Some(N as f64), "{m}");
    assert_eq!(sluice_tests::http_get(&format!("{admin}/healthz")).await, (200, "ok\n".to_owned()));
    sluice.stop().await;
}

#[tokio::test]
async fn an_output_larger_than_the_server_takes_fails_its_call_and_never_blocks_the_outbox() {
    let server = nats();
    let text = manifest(
        "w",
        "misbehave",
        "work",
        "[capabilities]\npublish = [\"allowed.>\", \"out.>\"]\n\n[idempotency]\n\n[store]\nbackend = \"memory\"\n",
    );
    let sluice = Sluice::start(&server, &[("w.toml", text)]).await;
    let nc = sluice_tests::client(&server).await;
    let mut out = nc.subscribe("out.>").await.unwrap();
    sluice_tests::sync(&nc).await;
    // 2 MB: within max_output_bytes (4 MiB), over the server's max_payload (1 MiB).
    let reply = sluice_tests::request(&nc, "work", "publish-big:2000000").await;
    assert_eq!(sluice_tests::header(&reply, "Sluice-Failure-Kind").as_deref(), Some("output-limit"));
    let reason = sluice_tests::header(&reply, "Sluice-Failure-Reason").unwrap_or_default();
    assert!(reason.contains("max_payload"), "{reason}");
    // The outbox holds nothing of it: the next output goes out at once.
    assert_eq!(sluice_tests::text(&sluice_tests::request(&nc, "work", "publish:out.after").await), "published");
    let got = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut out)).await.unwrap().unwrap();
    assert_eq!(got.subject.as_str(), "out.after");
    assert_eq!(metric(&sluice.metrics(), "sluice_outbox_entries"), Some(0.0));
    sluice.stop().await;
}

#[tokio::test]
async fn an_entry_its_stream_will_never_take_is_dropped_and_the_rest_flows() {
    let server = nats();
    let js = jetstream::new(sluice_tests::client(&server).await);
    js.create_stream(jetstream::stream::Config {
        name: "OUT".into(),
        subjects: vec!["allowed.>".into()],
        max_message_size: 300,
        ..Default::default()
    })
    .await
    .unwrap();
    let text = manifest(
        "w",
        "misbehave",
        "work",
        "[capabilities]\npublish = [\"allowed.>\"]\n\n[idempotency]\n\n[store]\nbackend = \"memory\"\n",
    );
    let sluice = Sluice::start(&server, &[("w.toml", text)]).await;
    let nc = sluice_tests::client(&server).await;
    sluice_tests::sync(&nc).await;
    // Within every limit Sluice knows of, over the stream's max_msg_size: the relay cannot
    // ever send it.
    assert_eq!(sluice_tests::text(&sluice_tests::request(&nc, "work", "publish-big:1000").await), "published");
    assert_eq!(sluice_tests::text(&sluice_tests::request(&nc, "work", "publish:allowed.small").await), "published");
    let got = stream_messages(&js, "OUT", 1, Duration::from_secs(10)).await;
    assert_eq!(got.iter().map(|m| m.subject.to_string()).collect::<Vec<_>>(), ["allowed.small"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&sluice.metrics(), "sluice_outbox_dropped_total") != Some(1.0) {
        assert!(tokio::time::Instant::now() < deadline, "{}", sluice.metrics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&sluice.metrics(), "sluice_outbox_entries"), Some(0.0));
    sluice.stop().await;
}

/// On `nats-kv` a commit can land while its acknowledgement is lost (a broker outage): the
/// call is retried, finds its key handled, and the relay is never told of the entries. An idle
/// relay finds such entries of its own once they are `ORPHAN_AGE` old and sends them, without
/// a restart (stood in for here by `HaltAfterAck`: committed and acked, the relay not told).
#[tokio::test]
async fn entries_a_nats_kv_relay_lost_track_of_are_sent_by_the_same_process() {
    let server = nats();
    let js = stream(&server, "WORK", &["work"]).await;
    let _ = stream(&server, "OUT", &["out.>"]).await;
    let data = tempfile::tempdir().unwrap();
    let sluice = serve(&server, "nats-kv", data.path(), Some(Fault::HaltAfterAck)).await;
    for i in 0..3 {
        js_publish(&js, "work", &format!(r#"{{"id": "lost-{i}", "cmd": "publish:out.lost.{i}"}}"#)).await;
    }
    wait_consumer_settled(&js, Duration::from_secs(10)).await;
    assert_eq!(out_count(&js).await, 0, "the relay was not told of the entries");
    let out = stream_messages(&js, "OUT", 3, Duration::from_secs(40)).await;
    assert_eq!(out.len(), 3, "{:?}", subjects(&out));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(out_count(&js).await, 3);
    sluice.stop().await;
}

/// On `nats-kv` the outbox is shared: what a process committed and acked but never sent (it
/// died right after) is sent by another process serving the same handler, once the entries
/// are older than a live relay would leave them; each output lands once.
#[tokio::test]
async fn entries_a_dead_process_left_in_a_nats_kv_outbox_are_sent_by_a_peer() {
    let server = nats();
    let js = stream(&server, "WORK", &["work"]).await;
    let _ = stream(&server, "OUT", &["out.>"]).await;
    // The peer serves handler `w` too (the same bucket) but receives none of WORK's messages.
    let peer_text = manifest(
        "w",
        "misbehave",
        "idle.w",
        "[capabilities]\npublish = [\"out.>\"]\n\n[idempotency]\nkey = \"json:/id\"\n\n[store]\nbackend = \"nats-kv\"\n",
    );
    let peer_data = tempfile::tempdir().unwrap();
    let peer = Sluice::start_with(
        &server,
        &[("w.toml", peer_text)],
        tempfile::tempdir().unwrap(),
        options(peer_data.path(), None),
    )
    .await
    .unwrap();

    let data = tempfile::tempdir().unwrap();
    let dying = serve(&server, "nats-kv", data.path(), Some(Fault::HaltAfterAck)).await;
    for i in 0..5 {
        js_publish(&js, "work", &format!(r#"{{"id": "left-{i}", "cmd": "publish:out.left.{i}"}}"#)).await;
    }
    wait_consumer_settled(&js, Duration::from_secs(10)).await;
    dying.crash().await;
    assert_eq!(out_count(&js).await, 0, "the dying process sent something");

    // The peer's relay looks for orphans while idle; these are orphans after 10 s.
    let out = stream_messages(&js, "OUT", 5, Duration::from_secs(40)).await;
    assert_eq!(subjects(&out), (0..5).map(|i| format!("out.left.{i}")).collect::<Vec<_>>());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&peer.metrics(), "sluice_outbox_entries") != Some(0.0) {
        assert!(tokio::time::Instant::now() < deadline, "the peer never emptied its outbox:\n{}", peer.metrics());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&peer.metrics(), "sluice_outbox_sent_total"), Some(5.0), "{}", peer.metrics());
    // Removed once sent: a later look-out finds nothing more, and nothing is sent twice.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(metric(&peer.metrics(), "sluice_outbox_sent_total"), Some(5.0), "{}", peer.metrics());
    assert_eq!(out_count(&js).await, 5);
    peer.stop().await;
}

/// An outbox entry, as the relay stores it (format 1: subject, headers, payload).
fn outbox_entry(subject: &str, headers: &[(&str, &str)], payload: &str) -> Vec<u8> {
    let mut bytes = vec![1u8];
    let put = |bytes: &mut Vec<u8>, field: &[u8]| {
        bytes.extend_from_slice(&(field.len() as u32).to_le_bytes());
        bytes.extend_from_slice(field);
    };
    put(&mut bytes, subject.as_bytes());
    bytes.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (name, value) in headers {
        put(&mut bytes, name.as_bytes());
        put(&mut bytes, value.as_bytes());
    }
    bytes.extend_from_slice(payload.as_bytes());
    bytes
}

/// Whoever can write to a handler's bucket can put entries in its outbox; the relay sends
/// only what the handler itself could have published (its `capabilities.publish`, no reserved
/// headers) and drops the rest. The bucket here is also one an older Sluice made (no atomic
/// batches), which the first start upgrades in place.
#[tokio::test]
async fn outbox_entries_the_handler_could_not_have_written_are_dropped_not_sent() {
    let server = nats();
    let js = stream(&server, "WORK", &["work"]).await;
    let _ = stream(&server, "OUT", &["out.>"]).await;
    let _ = stream(&server, "SECRET", &["secret.>"]).await;
    let bucket = js
        .create_key_value(jetstream::kv::Config { bucket: "sluice-kv-w".into(), history: 1, ..Default::default() })
        .await
        .unwrap();
    bucket.put("o.planted.00000000000000000001", outbox_entry("secret.x", &[], "stolen").into()).await.unwrap();
    let rollup = outbox_entry("out.purge", &[("Nats-Rollup", "all")], "");
    bucket.put("o.planted.00000000000000000002", rollup.into()).await.unwrap();
    let fine = outbox_entry("out.fine", &[("Nats-Msg-Id", "w/left/0")], "ok");
    bucket.put("o.planted.00000000000000000003", fine.into()).await.unwrap();

    let data = tempfile::tempdir().unwrap();
    let sluice = serve(&server, "nats-kv", data.path(), None).await;
    let out = stream_messages(&js, "OUT", 1, Duration::from_secs(10)).await;
    assert_eq!(subjects(&out), ["out.fine"]);
    let config = js.get_stream("KV_sluice-kv-w").await.unwrap().info().await.unwrap().config.clone();
    assert!(config.allow_atomic_publish && config.allow_message_ttl, "the bucket was not upgraded");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for key in ["o.planted.00000000000000000001", "o.planted.00000000000000000002", "o.planted.00000000000000000003"] {
        while bucket.get(key).await.unwrap().is_some() {
            assert!(tokio::time::Instant::now() < deadline, "{key} was left in the outbox");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(js.get_stream("SECRET").await.unwrap().info().await.unwrap().state.messages, 0);
    assert_eq!(out_count(&js).await, 1, "the entry with a reserved header was sent");
    assert_eq!(metric(&sluice.metrics(), "sluice_outbox_sent_total"), Some(1.0));
    sluice.stop().await;
}
