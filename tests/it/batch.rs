//! The batched pipeline: messages a pull returns together travel as one batch, and each
//! still gets its own outcome, retry, dead letter and ack.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_tests::{Sluice, client, collect_quiet, js_publish, manifest, nats, stream, stream_messages, sync};

fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| series.split_once('{').map_or(*series, |(m, _)| m) == name)
        .map_or(0.0, |(_, value)| value.parse().unwrap())
}

#[tokio::test]
async fn a_batch_of_mixed_outcomes_settles_each_message_on_its_own() {
    let server = nats();
    let js = stream(&server, "WORK", &["work.>"]).await;
    // Outputs land in a stream too: the host awaits its ack before acking the source.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "RESULTS".into(),
        subjects: vec!["results.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    // Everything is in the stream before Sluice starts, so the first pull returns it all.
    for i in 0..6 {
        js_publish(&js, &format!("work.ok.{i}"), &format!("publish:results.ok.{i}")).await;
    }
    js_publish(&js, "work.trap", "trap").await;
    js_publish(&js, "work.loop", "loop").await;
    js_publish(&js, "work.reject", "reject").await;
    js_publish(&js, "work.flaky", "fail-until:1:results.flaky").await;

    let worker = manifest(
        "worker",
        "misbehave",
        "unused",
        r#"
[limits]
timeout = "500ms"
max_concurrency = 16
instances = "warm"

[capabilities]
publish = ["results.>"]

[retry]
max_attempts = 2
initial = "100ms"
jitter = "none"

[dead_letter]
subject = "dlq.worker"
stream = "DLQ"
create_stream = true
"#,
    )
    .replace("subject = \"unused\"", "stream = \"WORK\"");
    let sluice = Sluice::start(&server, &[("w.toml", worker)]).await;
    let nc = client(&server).await;
    sync(&nc).await;

    // Three dead letters: the reject at once, the trap and the timeout after two attempts.
    let dead = stream_messages(&js, "DLQ", 3, Duration::from_secs(20)).await;
    let expect = |kind: &str, last: &str| (kind.to_owned(), last.to_owned());
    let by_subject: BTreeMap<String, (String, String)> = dead
        .iter()
        .map(|m| {
            let h = |n: &str| m.headers.get(n).map(|v| v.as_str().to_owned()).unwrap_or_default();
            (h("Sluice-Original-Subject"), (h("Sluice-Failure-Kind"), h("Sluice-Last-Failure-Kind")))
        })
        .collect();
    assert_eq!(dead.len(), 3, "{by_subject:?}");
    assert_eq!(by_subject.get("work.reject"), Some(&expect("rejected", "")), "{by_subject:?}");
    assert_eq!(by_subject.get("work.trap"), Some(&expect("retries-exhausted", "trap")), "{by_subject:?}");
    assert_eq!(by_subject.get("work.loop"), Some(&expect("retries-exhausted", "timeout")), "{by_subject:?}");

    // Every message settled: nothing pending, nothing waiting for an ack.
    let consumer = js.get_stream("WORK").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let info = consumer.consumer_info("worker").await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not settled: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Acked only after its outputs were stored: once everything is acked, every output is
    // already in RESULTS, once.
    let mut results = js.get_stream("RESULTS").await.unwrap();
    assert_eq!(results.info().await.unwrap().state.messages, 7);
    let outputs = stream_messages(&js, "RESULTS", 7, Duration::from_secs(1)).await;
    let mut subjects: Vec<String> = outputs.iter().map(|m| m.subject.to_string()).collect();
    subjects.sort();
    let mut want: Vec<String> = (0..6).map(|i| format!("results.ok.{i}")).collect();
    want.push("results.flaky".into());
    want.sort();
    assert_eq!(subjects, want);

    // And they did travel together: the first batch held several messages.
    let m = sluice.metrics();
    let (count, sum) = (sample(&m, "sluice_batch_messages_count"), sample(&m, "sluice_batch_messages_sum"));
    assert!(sum >= 10.0 && count < sum, "batches: {count} holding {sum} messages\n{m}");
    assert_eq!(sample(&m, "sluice_messages_succeeded_total"), 7.0, "{m}");
    assert_eq!(dead_lettered(&m), 3.0, "{m}");
    // Nothing else arrives later.
    let mut late = nc.subscribe("results.>").await.unwrap();
    assert!(collect_quiet(&mut late, Duration::from_millis(300), Duration::from_secs(2)).await.is_empty());
    sluice.stop().await;
}

fn dead_lettered(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("sluice_messages_dead_lettered_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}
