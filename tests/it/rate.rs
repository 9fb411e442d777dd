//! `[limits] rate`: a handler starts no more messages than its rate allows (plus its burst),
//! and loses none of those it holds back.

use std::time::Duration;

use sluice_tests::{Sluice, client, js_publish, manifest, nats, stream, sync};

fn succeeded(sluice: &Sluice) -> f64 {
    sluice
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix("sluice_messages_succeeded_total{handler=\"w\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `n` messages succeeded (at most `limit`).
async fn wait_succeeded(sluice: &Sluice, n: f64, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while succeeded(sluice) < n {
        assert!(tokio::time::Instant::now() < deadline, "stuck at {}:\n{}", succeeded(sluice), sluice.metrics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_core_handler_starts_no_more_than_its_rate_and_loses_nothing() {
    let server = nats();
    let sluice =
        Sluice::start(&server, &[("w.toml", manifest("w", "misbehave", "work", "[limits]\nrate = \"200/s\"\n"))]).await;
    let nc = client(&server).await;
    sync(&nc).await;
    let started = tokio::time::Instant::now();
    for _ in 0..600 {
        nc.publish("work", "ok".into()).await.unwrap();
    }
    nc.flush().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let done = succeeded(&sluice);
    let elapsed = started.elapsed().as_secs_f64();
    // At 200/s with a burst of 20: at most 20 + 200 × elapsed. The bound only fails if the
    // limiter lets more through; a slow machine makes the count smaller, never larger.
    assert!(done <= 20.0 + 200.0 * elapsed + 1.0, "{done} messages in {elapsed:.2} s at 200/s");
    assert!(done < 600.0, "everything ran at once: {done}");
    wait_succeeded(&sluice, 600.0, Duration::from_secs(30)).await;
    sluice.stop().await;
}

#[tokio::test]
async fn a_jetstream_handler_pulls_at_its_rate_and_acks_everything() {
    let server = nats();
    let js = stream(&server, "WORK", &["work"]).await;
    for _ in 0..300 {
        js_publish(&js, "work", "ok").await;
    }
    let text = manifest("w", "misbehave", "work", "[limits]\nrate = \"100/s\"\nburst = 5\n")
        .replace("subject = \"work\"", "stream = \"WORK\"");
    let started = tokio::time::Instant::now();
    let sluice = Sluice::start(&server, &[("w.toml", text)]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let done = succeeded(&sluice);
    let elapsed = started.elapsed().as_secs_f64();
    assert!(done <= 5.0 + 100.0 * elapsed + 1.0, "{done} messages in {elapsed:.2} s at 100/s");
    wait_succeeded(&sluice, 300.0, Duration::from_secs(30)).await;
    let info = js.get_stream("WORK").await.unwrap().consumer_info("w").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut info = info;
    while info.num_ack_pending > 0 || info.num_pending > 0 {
        assert!(tokio::time::Instant::now() < deadline, "{info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        info = js.get_stream("WORK").await.unwrap().consumer_info("w").await.unwrap();
    }
    assert_eq!(info.num_redelivered, 0, "a message waited past its ack wait: {info:?}");
    sluice.stop().await;
}
