//! No confused deputy: a forged reply subject, a `$`-subject under a wildcard grant, or a
//! JetStream control header cannot make Sluice use its own NATS permissions against streams,
//! consumers or buckets that are not the handler's.

use std::time::Duration;

use async_nats::jetstream::{consumer, kv};
use sluice::admin::AdminState;
use sluice::{Runtime, RuntimeOptions};
use sluice_tests::{
    Sluice, client, collect_quiet, header, http_call, js_publish, manifest, nats, request, stream, sync, text,
};

/// Publishes to `subject` with a reply subject chosen by the sender, as any client may.
async fn forge(nc: &async_nats::Client, subject: &str, reply: &str, payload: &str) {
    nc.publish_with_reply(subject.to_owned(), reply.to_owned(), payload.to_owned().into_bytes().into()).await.unwrap();
}

#[tokio::test]
async fn forged_reply_subjects_reach_no_stream_consumer_or_bucket() {
    let server = nats();
    let js = stream(&server, "ORDERS", &["orders.>"]).await;
    js_publish(&js, "orders.created", "o-1").await;
    js.get_stream("ORDERS")
        .await
        .unwrap()
        .create_consumer(consumer::pull::Config { durable_name: Some("audit".into()), ..Default::default() })
        .await
        .unwrap();
    let prices = js.create_key_value(kv::Config { bucket: "prices".into(), ..Default::default() }).await.unwrap();
    prices.put("eur", "1.00".into()).await.unwrap();
    // The nats-kv store gives the handler a bucket of its own (sluice-kv-echo).
    let extra = "[idempotency]\nkey = \"header:Nats-Msg-Id\"\n\n[store]\nbackend = \"nats-kv\"";
    let sluice = Sluice::start(&server, &[("echo.toml", manifest("echo", "echo", "echo", extra))]).await;
    let nc = client(&server).await;

    forge(&nc, "echo", "$JS.API.STREAM.DELETE.ORDERS", "").await;
    forge(&nc, "echo", "$JS.API.STREAM.PURGE.ORDERS", "").await;
    forge(&nc, "echo", "$JS.API.CONSUMER.DELETE.ORDERS.audit", "").await;
    forge(&nc, "echo", "$KV.prices.eur", "0.01").await;
    forge(&nc, "echo", "$KV.sluice-kv-echo.forged", "x").await;
    // Not a `$` subject, but not an inbox either: a write into ORDERS.
    forge(&nc, "echo", "orders.created", "forged order").await;

    // The requester with a proper inbox still gets its answer, after all the forgeries.
    assert_eq!(text(&request(&nc, "echo", "hello").await), "hello");
    sync(&nc).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut orders = js.get_stream("ORDERS").await.expect("stream ORDERS was deleted");
    assert_eq!(orders.info().await.unwrap().state.messages, 1, "ORDERS was purged or written to");
    orders.consumer_info("audit").await.expect("consumer audit was deleted");
    let eur = prices.get("eur").await.unwrap().expect("key eur was deleted");
    assert_eq!(&eur[..], b"1.00", "the prices bucket was written to");
    let dedup = js.get_key_value("sluice-kv-echo").await.expect("the handler's bucket is gone");
    assert!(dedup.get("forged").await.unwrap().is_none(), "the handler's bucket was written to");

    let metrics = sluice.metrics();
    assert!(
        metrics.lines().any(|l| l.starts_with("sluice_replies_refused_total{handler=\"echo\"} 6")),
        "refusals not counted:\n{metrics}"
    );
    sluice.stop().await;
}

#[tokio::test]
async fn a_failed_request_with_a_forged_reply_subject_gets_no_failure_reply() {
    let server = nats();
    let js = stream(&server, "ORDERS", &["orders.>"]).await;
    let once = "[retry]\nmax_attempts = 1";
    let sluice = Sluice::start(&server, &[("m.toml", manifest("misbehave", "misbehave", "work", once))]).await;
    let nc = client(&server).await;

    // The failure reply would carry Sluice-* headers into ORDERS.
    forge(&nc, "work", "orders.failed", "reject").await;
    let reply = request(&nc, "work", "reject").await;
    assert_eq!(header(&reply, "Sluice-Failure-Kind").as_deref(), Some("rejected"), "a real requester is answered");
    sync(&nc).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(js.get_stream("ORDERS").await.unwrap().info().await.unwrap().state.messages, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn control_headers_and_dollar_subjects_are_refused_under_a_catch_all_grant() {
    let server = nats();
    let js = stream(&server, "ORDERS", &["orders.>"]).await;
    js_publish(&js, "orders.created", "o-1").await;
    let grant = "[capabilities]\npublish = [\">\"]\nallow_publish_to_source = true";
    let sluice = Sluice::start(&server, &[("m.toml", manifest("misbehave", "misbehave", "work", grant))]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("allowed.header").await.unwrap();
    sync(&nc).await;

    for name in [
        "Nats-Rollup",
        "Nats-Expected-Last-Sequence",
        "Nats-Expected-Stream",
        "Nats-TTL",
        "Nats-Marker-Reason",
        "Nats-Batch-Id",
        "Sluice-Failure-Kind",
        "Sluice-Original-Subject",
    ] {
        let answer = text(&request(&nc, "work", &format!("publish-header:{name}")).await);
        assert!(answer.starts_with("refused: ") && answer.contains(name), "{name}: {answer}");
    }
    for subject in ["$JS.API.STREAM.DELETE.ORDERS", "$KV.prices.eur", "$SYS.REQ.SERVER.PING", "$O.files.x"] {
        let answer = text(&request(&nc, "work", &format!("publish:{subject}")).await);
        assert!(answer.starts_with("refused: ") && answer.contains(subject), "{subject}: {answer}");
    }
    js.get_stream("ORDERS").await.expect("stream ORDERS was deleted");

    // A guest's own Nats-Msg-Id is kept, scoped by the handler name.
    assert_eq!(text(&request(&nc, "work", "publish-header:Nats-Msg-Id").await), "published");
    let got = collect_quiet(&mut out, Duration::from_millis(300), Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "only the Nats-Msg-Id publication is sent");
    assert_eq!(header(&got[0], "Nats-Msg-Id").as_deref(), Some("misbehave/x"));
    sluice.stop().await;
}

#[tokio::test]
async fn a_manifest_may_widen_the_reply_subjects() {
    let server = nats();
    let sluice = Sluice::start(
        &server,
        &[("echo.toml", manifest("echo", "echo", "echo", "[capabilities]\nreply_to = [\"answers.>\"]"))],
    )
    .await;
    let nc = client(&server).await;
    let mut answers = nc.subscribe("answers.>").await.unwrap();
    sync(&nc).await;
    forge(&nc, "echo", "answers.one", "widened").await;
    let got = collect_quiet(&mut answers, Duration::from_millis(300), Duration::from_secs(5)).await;
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), ["widened"]);
    sluice.stop().await;
}

#[tokio::test]
async fn an_admin_token_guards_handlers_and_reload_but_not_the_probes() {
    let server = nats();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("e.toml"), manifest("e", "echo", "e", "")).unwrap();
    let runtime = Runtime::load(&[dir.path().to_owned()], RuntimeOptions::default()).unwrap();
    assert_eq!(runtime.handler_names(), ["e"]);
    let state = AdminState::new(runtime.metrics(), runtime.status()).with_token(Some("s3cret".into()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = format!("http://{}", listener.local_addr().unwrap());
    sluice::admin::serve(listener, state.clone());
    let running = runtime.bind(client(&server).await).await.unwrap();
    state.bound(running.client(), running.reloader());

    for (method, route) in [("GET", "/handlers"), ("POST", "/reload")] {
        let url = format!("{admin}{route}");
        assert_eq!(http_call(method, &url, None).await.0, 401, "{route} without a token");
        assert_eq!(http_call(method, &url, Some("wrong")).await.0, 401, "{route} with a wrong token");
        let (code, body) = http_call(method, &url, Some("s3cret")).await;
        assert_eq!(code, 200, "{route} with the token: {body}");
        assert!(!body.contains("s3cret"), "{route} shows the token");
    }
    for route in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(http_call("GET", &format!("{admin}{route}"), None).await.0, 200, "{route} is open");
    }
    running.abort().await;
}
