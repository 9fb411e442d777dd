//! Core NATS retries happen in-process: a message waiting for its next attempt does not
//! hold back other messages, and after its last attempt it is dead-lettered and (for a
//! request) answered with the failure.

use std::time::Duration;

use sluice_tests::{Sluice, client, header, manifest, nats, request, stream, stream_messages, text};

#[tokio::test]
async fn a_retrying_message_does_not_block_others_and_ends_in_the_dead_letter_stream() {
    let server = nats();
    let js = stream(&server, "DLQ", &["dlq.core"]).await;
    let extra = r#"
[limits]
max_concurrency = 1

[retry]
max_attempts = 3
initial = "300ms"
jitter = "none"

[dead_letter]
subject = "dlq.core"
stream = "DLQ"
"#;
    let sluice = Sluice::start(&server, &[("m.toml", manifest("misbehave", "misbehave", "work", extra))]).await;
    let nc = client(&server).await;

    let failing = {
        let nc = nc.clone();
        tokio::spawn(async move { request(&nc, "work", "retry").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // With a single permit, this is only served because the failed message waits for its
    // retry without holding it.
    assert_eq!(text(&request(&nc, "work", "ok").await), "ok");
    assert_eq!(js.get_stream("DLQ").await.unwrap().info().await.unwrap().state.messages, 0);

    // Three attempts (300ms + 600ms of backoff), then the failure reply and the dead letter.
    let reply = failing.await.unwrap();
    assert_eq!(header(&reply, "Sluice-Failure-Kind").as_deref(), Some("retries-exhausted"));
    assert_eq!(header(&reply, "Sluice-Attempts").as_deref(), Some("3"));
    let dead = stream_messages(&js, "DLQ", 1, Duration::from_secs(10)).await;
    assert_eq!(dead[0].headers.get("Sluice-Last-Failure-Kind").map(|v| v.as_str()), Some("retry-requested"));
    assert_eq!(dead[0].headers.get("Sluice-Original-Subject").map(|v| v.as_str()), Some("work"));
    assert!(dead[0].headers.get("Sluice-Stream").is_none(), "a core message has no stream");
    sluice.stop().await;
}
