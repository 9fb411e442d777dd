//! Broker outages: nats-server killed while messages flow and restarted on the same port and
//! store. Sluice reconnects and resumes by itself; nothing is lost, duplicated downstream or
//! dead-lettered.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use sluice::RuntimeOptions;
use sluice::testing::NatsServer;
use sluice_tests::{Sluice, init_logging, manifest, stream};

fn server_on(port: u16, store: &std::path::Path) -> NatsServer {
    init_logging();
    let store = store.display().to_string();
    NatsServer::start_with_args(port, &["-sd", &store]).expect("cannot start nats-server")
}

/// Publishes `{"id": "m-i", ...}` with `Nats-Msg-Id: m-i` until the stream acknowledges it,
/// across the outage (a retried publish the stream already stored is dropped by its id).
async fn publish_until_stored(js: &jetstream::Context, i: usize) {
    publish_payload_until_stored(js, i, format!(r#"{{"id": "m-{i}", "cmd": "publish:out.{i}"}}"#)).await;
}

/// Publishes `payload` to `work` with `Nats-Msg-Id: m-i` until the stream acknowledges it.
async fn publish_payload_until_stored(js: &jetstream::Context, i: usize, payload: String) {
    loop {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("m-{i}"));
        if let Ok(ack) = js.publish_with_headers("work", headers, payload.clone().into()).await
            && let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), ack).await
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_server_killed_and_restarted_mid_stream_loses_and_repeats_nothing() {
    let store = tempfile::tempdir().unwrap();
    let server = server_on(0, store.path());
    let port = server.port();
    let js = stream(&server, "WORK", &["work"]).await;
    stream(&server, "OUT", &["out.>"]).await;
    let text = manifest(
        "w",
        "misbehave",
        "work",
        "[capabilities]\npublish = [\"out.>\"]\n\n[limits]\ntimeout = \"1s\"\n\n[idempotency]\nkey = \"json:/id\"\n",
    )
    .replace("subject = \"work\"", "stream = \"WORK\"\nack_wait = \"3s\"");
    let data = tempfile::tempdir().unwrap();
    let options = RuntimeOptions { data_dir: Some(data.path().to_owned()), ..RuntimeOptions::default() };
    let sluice = Sluice::start_with(&server, &[("w.toml", text)], tempfile::tempdir().unwrap(), options).await.unwrap();

    const N: usize = 1500;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            for i in 0..N {
                publish_until_stored(&js, i).await;
            }
        })
    };
    // Let work flow, then take the server away for 5 s, mid-stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while js.get_stream("OUT").await.map(|s| s.cached_info().state.messages).unwrap_or(0) < 200 {
        assert!(tokio::time::Instant::now() < deadline, "nothing flowed before the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at = js.get_stream("OUT").await.map(|s| s.cached_info().state.messages).unwrap_or(0);
    eprintln!("killing nats-server with {at} of {N} outputs stored");
    drop(server);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let _server = server_on(port, store.path());

    tokio::time::timeout(Duration::from_secs(60), publisher).await.expect("the publisher never finished").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (out, info) = loop {
        let out = js.get_stream("OUT").await.map(|s| s.cached_info().state.messages).unwrap_or(0);
        let info = js.get_stream("WORK").await.unwrap().consumer_info("w").await.unwrap();
        if out >= N as u64 && info.num_pending == 0 && info.num_ack_pending == 0 {
            break (out, info);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "did not resume: {out} of {N} outputs, {info:?}\n{}",
            sluice.metrics()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out_now = js.get_stream("OUT").await.unwrap().cached_info().state.messages;
    assert_eq!((out, out_now), (N as u64, N as u64), "outputs lost or stored twice");
    let m = sluice.metrics();
    assert!(!m.lines().any(|l| l.starts_with("sluice_messages_dead_lettered_total") && !l.ends_with(" 0")), "{m}");
    assert!(info.num_pending == 0, "{info:?}");
    sluice.stop().await;
}

#[tokio::test]
async fn a_target_stream_removed_and_recreated_gets_every_output_once() {
    target_stream_removed_and_recreated("redb").await;
}

/// The same on `nats-kv`: the outbox is in the handler's bucket, so the source keeps being
/// consumed while OUT is away, and nothing is dead-lettered or sent twice.
#[tokio::test]
async fn a_target_stream_removed_and_recreated_gets_every_output_once_on_nats_kv() {
    target_stream_removed_and_recreated("nats-kv").await;
}

async fn target_stream_removed_and_recreated(backend: &str) {
    let store = tempfile::tempdir().unwrap();
    let server = server_on(0, store.path());
    let js = stream(&server, "WORK", &["work"]).await;
    let out_config = jetstream::stream::Config {
        name: "OUT".into(),
        subjects: vec!["out.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    js.create_stream(out_config.clone()).await.unwrap();
    let text = manifest(
        "w",
        "misbehave",
        "work",
        &format!(
            "[capabilities]\npublish = [\"out.>\"]\n\n[limits]\ntimeout = \"1s\"\n\n[idempotency]\nkey = \"json:/id\"\n\n\
             [store]\nbackend = \"{backend}\"\n"
        ),
    )
    .replace("subject = \"work\"", "stream = \"WORK\"");
    let data = tempfile::tempdir().unwrap();
    let options = RuntimeOptions { data_dir: Some(data.path().to_owned()), ..RuntimeOptions::default() };
    let sluice = Sluice::start_with(&server, &[("w.toml", text)], tempfile::tempdir().unwrap(), options).await.unwrap();

    // 500 messages handled with OUT in place; then OUT goes away while 1,500 more arrive, for
    // longer than the sender remembers a stream lookup (10 s), and comes back.
    const BEFORE: usize = 500;
    const N: usize = 2000;
    for i in 0..BEFORE {
        publish_until_stored(&js, i).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while js.get_stream("OUT").await.map(|s| s.cached_info().state.messages).unwrap_or(0) < BEFORE as u64 {
        assert!(tokio::time::Instant::now() < deadline, "the first messages were not handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    js.delete_stream("OUT").await.unwrap();
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            for i in BEFORE..N {
                publish_until_stored(&js, i).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(12)).await;
    js.create_stream(out_config).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), publisher).await.expect("the publisher never finished").unwrap();

    // What OUT held before it was deleted is gone with it; everything after arrives once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info = js.get_stream("WORK").await.unwrap().consumer_info("w").await.unwrap();
        let m = sluice.metrics();
        let depth = m
            .lines()
            .find_map(|l| l.strip_prefix("sluice_outbox_entries{handler=\"w\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if info.num_pending == 0 && info.num_ack_pending == 0 && depth == Some(0.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "did not drain: {info:?}\n{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = js.get_stream("OUT").await.unwrap().cached_info().state.messages;
    assert_eq!(out, (N - BEFORE) as u64, "outputs lost or doubled while the stream was away");
    let m = sluice.metrics();
    assert!(!m.lines().any(|l| l.starts_with("sluice_messages_dead_lettered_total") && !l.ends_with(" 0")), "{m}");
    assert!(!m.lines().any(|l| l.starts_with("sluice_messages_retried_total") && !l.ends_with(" 0")), "{m}");
    sluice.stop().await;
}

/// Publishes a valid order `i` to `work` (through WORK) until the stream has it.
async fn publish_order_until_stored(js: &jetstream::Context, i: usize) {
    let order = format!(
        r#"{{"id":"m-{i}","customer":"c-1","currency":"EUR","items":[{{"sku":"A1","quantity":1,"unit_price_cents":5}}]}}"#
    );
    publish_payload_until_stored(js, i, order).await;
}

/// A handler without an outbox (no state store: `order-validator` neither keeps state nor has
/// `[idempotency]`) sends its outputs before the ack: while their stream
/// is away, each delivery ends with `broker-busy`, which backs off and is not an attempt, so
/// even a handler allowed two attempts dead-letters nothing and loses nothing.
/// Handler `w`'s failures of `kind`, from its metrics.
fn failures(metrics: &str, kind: &str) -> f64 {
    let prefix = format!("sluice_failures_total{{handler=\"w\",kind=\"{kind}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test]
async fn without_an_outbox_a_missing_target_stream_spends_no_attempts() {
    let store = tempfile::tempdir().unwrap();
    let server = server_on(0, store.path());
    let js = stream(&server, "WORK", &["work"]).await;
    js.create_stream(jetstream::stream::Config {
        name: "DLQ".into(),
        subjects: vec!["dlq.work".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let out_config = jetstream::stream::Config {
        name: "OUT".into(),
        subjects: vec!["orders.validated".into()],
        ..Default::default()
    };
    js.create_stream(out_config.clone()).await.unwrap();
    let text = manifest(
        "w",
        "order-validator",
        "work",
        "[capabilities]\npublish = [\"orders.validated\"]\n\n[limits]\ntimeout = \"1s\"\nmax_concurrency = 8\n\n[retry]\nmax_attempts = 2\ninitial = \"50ms\"\n\n\
         [dead_letter]\nsubject = \"dlq.work\"\n",
    )
    .replace("subject = \"work\"", "stream = \"WORK\"");
    let sluice = Sluice::start(&server, &[("w.toml", text)]).await;
    const BEFORE: usize = 100;
    const N: usize = 400;
    for i in 0..BEFORE {
        publish_order_until_stored(&js, i).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while js.get_stream("OUT").await.map(|s| s.cached_info().state.messages).unwrap_or(0) < BEFORE as u64 {
        assert!(tokio::time::Instant::now() < deadline, "the first messages were not handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    js.delete_stream("OUT").await.unwrap();
    for i in BEFORE..N {
        publish_order_until_stored(&js, i).await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let m = sluice.metrics();
    let busy = failures(&m, "broker-busy");
    assert!(busy >= 1.0, "deliveries were not deferred while OUT was away: {busy}\n{m}");
    // The back-off is the handler's, not each message's: it pulls nothing new while a step
    // runs, so far fewer deliveries were refused than messages waited.
    assert!(busy < (N - BEFORE) as f64, "every message hammered the broker on its own: {busy}\n{m}");
    js.create_stream(out_config).await.unwrap();

    // Every message published while OUT was away reaches it (after a back-off of at most
    // 10 s); nothing is dead-lettered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info = js.get_stream("WORK").await.unwrap().consumer_info("w").await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "did not drain: {info:?}\n{}", sluice.metrics());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = js.get_stream("OUT").await.unwrap().cached_info().state.messages;
    assert_eq!(out, (N - BEFORE) as u64, "outputs lost or doubled while the stream was away");
    let dead = js.get_stream("DLQ").await.unwrap().cached_info().state.messages;
    assert_eq!(dead, 0, "messages dead-lettered because the broker was away:\n{}", sluice.metrics());
    // While a step runs, what was pulled ahead waits in the process rather than going back to
    // the server: the redeliveries are about the refused calls, not every waiting message.
    let info = js.get_stream("WORK").await.unwrap().consumer_info("w").await.unwrap();
    let redelivered = info.delivered.consumer_sequence - N as u64;
    let refused = failures(&sluice.metrics(), "broker-busy");
    // Each refused call's message goes back (one redelivery each, at most 8 a step); steps
    // that handed back the lookahead too (up to 32 messages each, 4 x max_concurrency) would
    // add a lookahead's worth per step, far beyond one.
    assert!(
        redelivered as f64 <= refused + 32.0,
        "waiting messages went back to the server: {redelivered} redeliveries for {refused} refused calls"
    );
    sluice.stop().await;
}
