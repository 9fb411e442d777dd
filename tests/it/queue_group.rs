//! Several Sluice processes share a handler's work through a NATS queue group.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use sluice_tests::{Sluice, client, header, manifest, nats, sync};

#[tokio::test]
async fn two_runtimes_share_a_queue_group_and_handle_each_message_once() {
    let server = nats();
    // Same handler name (so same queue group), told apart by the tag they reply with. The
    // replies go to `replies.<i>`, not to inboxes, so the manifest accepts those.
    let echo = |tag: &str| {
        let extra = format!("[capabilities]\nreply_to = [\"replies.>\"]\n\n[config]\ntag = \"{tag}\"");
        [("echo.toml", manifest("echo", "echo", "echo", &extra))]
    };
    let a = Sluice::start(&server, &echo("a")).await;
    let b = Sluice::start(&server, &echo("b")).await;
    let nc = client(&server).await;
    let mut replies = nc.subscribe("replies.>").await.unwrap();
    sync(&nc).await;

    const N: usize = 300;
    for i in 0..N {
        nc.publish_with_reply("echo", format!("replies.{i}"), i.to_string().into()).await.unwrap();
    }
    sync(&nc).await;

    let mut per_message: HashMap<String, usize> = HashMap::new();
    let mut per_runtime: HashMap<String, usize> = HashMap::new();
    let mut received = 0;
    // Wait for all N, then a little longer for any duplicate.
    let mut quiet = Duration::from_secs(20);
    while let Ok(Some(msg)) = tokio::time::timeout(quiet, replies.next()).await {
        *per_message.entry(msg.subject.to_string()).or_default() += 1;
        *per_runtime.entry(header(&msg, "Test-Tag").unwrap_or_default()).or_default() += 1;
        received += 1;
        if received == N {
            quiet = Duration::from_millis(500);
        }
    }
    assert_eq!(per_message.len(), N, "some messages were not handled");
    assert!(per_message.values().all(|&n| n == 1), "some messages were handled twice");
    // Both runtimes, and no one else, took a real share (NATS picks a queue member at
    // random: under 10% of 300 for one of two is vanishingly unlikely).
    let mut tags: Vec<&str> = per_runtime.keys().map(String::as_str).collect();
    tags.sort_unstable();
    assert_eq!(tags, ["a", "b"], "replies from elsewhere, or one runtime got all the work: {per_runtime:?}");
    assert!(per_runtime.values().all(|&n| n >= N / 10), "the work was not shared: {per_runtime:?}");

    a.stop().await;
    b.stop().await;
}
