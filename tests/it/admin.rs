//! Observability: /metrics after a known mix of outcomes, /readyz following binding and the
//! NATS connection, /handlers, and W3C trace context carried to outputs.

use std::time::Duration;

use async_nats::HeaderMap;
use sluice::admin::{AdminState, HandlersReport};
use sluice::{Runtime, RuntimeOptions};
use sluice_tests::{client, collect_quiet, http_get, manifest, nats, request, stream, stream_messages, sync};

/// The value of the sample `name{labels}` in a Prometheus exposition (labels in any order).
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map_or(0.0, |(_, value)| value.parse().unwrap())
}

async fn start_admin(state: AdminState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    sluice::admin::serve(listener, state);
    url
}

#[tokio::test]
async fn metrics_count_a_known_mix_of_outcomes() {
    let server = nats();
    let js = stream(&server, "DLQ", &["dlq.w"]).await;
    let dir = tempfile::tempdir().unwrap();
    let text = manifest(
        "w",
        "misbehave",
        "work",
        r#"
[capabilities]
publish = ["out.>"]

[retry]
max_attempts = 3
initial = "50ms"

[idempotency]

[store]
backend = "memory"

[dead_letter]
subject = "dlq.w"
stream = "DLQ"
"#,
    );
    std::fs::write(dir.path().join("w.toml"), text).unwrap();
    // Calls on the I/O threads (`--guest-threads 0`); every other test uses the default.
    let engine = sluice::EngineOptions { guest_threads: Some(0), ..sluice::EngineOptions::default() };
    let options = RuntimeOptions { engine, data_dir: Some(dir.path().join("data")), ..RuntimeOptions::default() };
    let runtime = Runtime::load(&[dir.path().to_owned()], options).unwrap();
    let state = AdminState::new(runtime.metrics(), runtime.status());
    let admin = start_admin(state.clone()).await;
    let running = runtime.bind(client(&server).await).await.unwrap();
    state.bound(running.client(), running.reloader());

    let nc = client(&server).await;
    let mut out = nc.subscribe("out.>").await.unwrap();
    sync(&nc).await;
    let send = |id: &'static str, payload: &'static str| {
        let nc = nc.clone();
        async move {
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", id);
            nc.publish_with_headers("work", h, payload.into()).await.unwrap();
        }
    };
    send("a", "publish:out.a").await;
    send("b", "publish:out.b").await;
    send("c", "fail-until:1:out.c").await; // one retry, then success
    send("d", "reject").await; // dead-lettered
    let got = collect_quiet(&mut out, Duration::from_millis(800), Duration::from_secs(10)).await;
    assert_eq!(got.len(), 3);
    send("a", "publish:out.a").await; // a duplicate
    stream_messages(&js, "DLQ", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (code, m) = http_get(&format!("{admin}/metrics")).await;
    assert_eq!(code, 200);
    let w = [("handler", "w")];
    assert_eq!(sample(&m, "sluice_messages_received_total", &w), 5.0, "{m}");
    assert_eq!(sample(&m, "sluice_messages_succeeded_total", &w), 3.0);
    assert_eq!(sample(&m, "sluice_messages_retried_total", &w), 1.0);
    assert_eq!(sample(&m, "sluice_messages_skipped_duplicate_total", &w), 1.0);
    assert_eq!(sample(&m, "sluice_messages_dead_lettered_total", &[("handler", "w"), ("kind", "rejected")]), 1.0);
    assert_eq!(sample(&m, "sluice_failures_total", &[("handler", "w"), ("kind", "retry-requested")]), 1.0);
    assert_eq!(sample(&m, "sluice_failures_total", &[("handler", "w"), ("kind", "rejected")]), 1.0);
    assert_eq!(sample(&m, "sluice_failures_total", &[("handler", "w"), ("kind", "trap")]), 0.0);
    // One call per attempt: a, b, c twice, d.
    assert_eq!(sample(&m, "sluice_handler_duration_seconds_count", &w), 5.0);
    assert_eq!(sample(&m, "sluice_message_latency_seconds_count", &w), 6.0);
    assert_eq!(sample(&m, "sluice_in_flight", &w), 0.0);
    let digest = running.status().handler("w").unwrap().digest;
    assert_eq!(sample(&m, "sluice_handler_info", &[("handler", "w"), ("digest", &digest)]), 1.0);
    assert!(m.contains("# HELP sluice_messages_received_total"), "metrics are described");

    let (code, body) = http_get(&format!("{admin}/handlers")).await;
    assert_eq!(code, 200);
    let report: HandlersReport = serde_json::from_str(&body).unwrap();
    let h = &report.handlers[0];
    assert_eq!((h.status.name.as_str(), h.status.digest.as_str()), ("w", digest.as_str()));
    assert_eq!((h.counters.received, h.counters.succeeded, h.counters.retried), (5, 3, 1));
    assert_eq!((h.counters.dead_lettered, h.counters.skipped_duplicates), (1, 1));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn readyz_follows_binding_and_the_nats_connection() {
    let server = nats();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("e.toml"), manifest("e", "echo", "e", "")).unwrap();
    let runtime = Runtime::load(&[dir.path().to_owned()], RuntimeOptions::default()).unwrap();
    let state = AdminState::new(runtime.metrics(), runtime.status());
    let admin = start_admin(state.clone()).await;

    assert_eq!(http_get(&format!("{admin}/healthz")).await.0, 200);
    let (code, why) = http_get(&format!("{admin}/readyz")).await;
    assert_eq!(code, 503, "ready before binding");
    assert!(why.contains("not bound"), "{why}");

    let running = runtime.bind(client(&server).await).await.unwrap();
    state.bound(running.client(), running.reloader());
    assert_eq!(http_get(&format!("{admin}/readyz")).await.0, 200);

    // NATS goes away: not ready (the process stays alive and healthy).
    drop(server);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, why) = http_get(&format!("{admin}/readyz")).await;
        if code == 503 {
            assert!(why.contains("NATS connection"), "{why}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still ready without NATS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(http_get(&format!("{admin}/healthz")).await.0, 200);
    running.abort().await;
}

#[tokio::test]
async fn a_traceparent_sent_in_is_found_on_the_outputs() {
    let server = nats();
    let sluice = sluice_tests::Sluice::start(
        &server,
        &[("w.toml", manifest("w", "misbehave", "work", "[capabilities]\npublish = [\"out.>\"]"))],
    )
    .await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("out.>").await.unwrap();
    sync(&nc).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut h = HeaderMap::new();
    h.insert("traceparent", traceparent);
    h.insert("tracestate", "vendor=opaque");
    let reply = nc
        .send_request("work", async_nats::Request::new().headers(h).payload("publish:out.traced".into()))
        .await
        .unwrap();
    let published = collect_quiet(&mut out, Duration::from_millis(300), Duration::from_secs(10)).await;
    assert_eq!(published.len(), 1);
    for msg in [&published[0], &reply] {
        let headers = msg.headers.as_ref().expect("no headers on an output");
        assert_eq!(headers.get("traceparent").map(|v| v.as_str()), Some(traceparent));
        assert_eq!(headers.get("tracestate").map(|v| v.as_str()), Some("vendor=opaque"));
    }
    // Without one, none is invented.
    let plain = request(&nc, "work", "publish:out.plain").await;
    assert!(plain.headers.as_ref().and_then(|h| h.get("traceparent")).is_none());
    sluice.stop().await;
}

#[tokio::test]
async fn core_messages_dropped_by_a_full_subscription_are_counted() {
    let server = nats();
    let dir = tempfile::tempdir().unwrap();
    // One slow call at a time: a burst larger than the client's subscription buffer (64 Ki
    // messages) cannot be taken in, and the client drops the excess.
    let text = manifest("slow", "misbehave", "slow", "[limits]\nmax_concurrency = 1\ntimeout = \"5s\"\n");
    std::fs::write(dir.path().join("slow.toml"), text).unwrap();
    let options = RuntimeOptions { data_dir: Some(dir.path().join("data")), ..RuntimeOptions::default() };
    let runtime = Runtime::load(&[dir.path().to_owned()], options).unwrap();
    let metrics = runtime.metrics();
    let state = AdminState::new(metrics.clone(), runtime.status());
    let admin = start_admin(state).await;
    let observed =
        sluice::cli::connect_observed(&sluice::connect::Target::url(&server.url()), Some(&metrics)).await.unwrap();
    let running = runtime.bind(observed).await.unwrap();

    let nc = client(&server).await;
    for _ in 0..70_000 {
        nc.publish("slow", "sleep:50".into()).await.unwrap();
    }
    sync(&nc).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let dropped = loop {
        let (_, m) = http_get(&format!("{admin}/metrics")).await;
        let dropped = sample(&m, "sluice_nats_slow_consumer_drops_total", &[]);
        if dropped > 0.0 || std::time::Instant::now() > deadline {
            break dropped;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(dropped > 0.0, "a burst past the subscription buffer was not counted as dropped");
    running.abort().await;
}
