//! Guest state is transactional: a call's kv writes and dedup marks are committed with its
//! message's idempotency record when it succeeds, and dropped when it fails.

use std::time::Duration;

use async_nats::HeaderMap;
use sluice_tests::{Sluice, client, manifest, nats, request, sync, text};

async fn counts(nc: &async_nats::Client, keys: usize) -> Vec<u64> {
    let mut all = Vec::new();
    for k in 0..keys {
        let answer = text(&request(nc, "work", &format!("kv-get:k{k}")).await);
        all.push(if answer == "none" { 0 } else { answer.parse().unwrap() });
    }
    all
}

/// Each message adds 1 to its key's counter and then fails on its odd attempts (after the
/// write); every message is also delivered twice. A counter must end at the number of
/// distinct messages for its key: a failed attempt's write is dropped, a duplicate skipped.
async fn counters_count_each_message_once(backend: &str) {
    let server = nats();
    let extra = format!(
        "[idempotency]\nkey = \"header:Nats-Msg-Id\"\n\n[store]\nbackend = \"{backend}\"\n\n\
         [retry]\nmax_attempts = 100\ninitial = \"10ms\"\nmax = \"100ms\"\n"
    );
    let sluice = Sluice::start(&server, &[("w.toml", manifest("w", "misbehave", "work", &extra))]).await;
    let nc = client(&server).await;
    sync(&nc).await;

    let (keys, per_key) = (4, 5);
    for round in 0..2 {
        for m in 0..per_key {
            for k in 0..keys {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("m-{k}-{m}"));
                let payload = format!("count-flaky:k{k}");
                nc.publish_with_headers("work", headers, payload.into_bytes().into()).await.unwrap();
            }
        }
        if round == 0 {
            // The second copies arrive while the first are being retried.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    nc.flush().await.unwrap();

    let want = vec![per_key as u64; keys];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = counts(&nc, keys).await;
        if now == want {
            break;
        }
        assert!(now.iter().all(|&c| c <= per_key as u64), "{backend}: counted too often: {now:?}");
        assert!(tokio::time::Instant::now() < deadline, "{backend}: counters stuck at {now:?}\n{}", sluice.metrics());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And nothing more arrives later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counts(&nc, keys).await, want, "{backend}");
    let m = sluice.metrics();
    // At least one planned failure per message (more where a commit lost a race).
    let retried = m
        .lines()
        .find_map(|l| l.strip_prefix("sluice_messages_retried_total{handler=\"w\"} "))
        .map_or(0.0, |v| v.parse::<f64>().unwrap());
    assert!(retried >= (keys * per_key) as f64, "{m}");
    sluice.stop().await;
}

#[tokio::test]
async fn a_failed_call_keeps_none_of_its_writes_on_memory() {
    counters_count_each_message_once("memory").await;
}

#[tokio::test]
async fn a_failed_call_keeps_none_of_its_writes_on_redb() {
    counters_count_each_message_once("redb").await;
}

#[tokio::test]
async fn a_failed_call_keeps_none_of_its_writes_on_nats_kv() {
    counters_count_each_message_once("nats-kv").await;
}
