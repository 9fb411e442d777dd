//! Two clusters (two independent single-node servers stand for them): passive sending to the
//! secondary when the primary does not take an output, the syphon that moves the secondary's
//! backlog back into the primary, and active receiving of one stream from both.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::DiscardPolicy};
use sluice::RuntimeOptions;
use sluice_tests::{Sluice, client, manifest, nats, stream};

/// The value of `name` (with `labels`, e.g. `{handler="w"}`, or none) in the Prometheus text.
fn metric(text: &str, name_and_labels: &str) -> f64 {
    let prefix = format!("{name_and_labels} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

async fn count(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name).await.unwrap().info().await.unwrap().state.messages
}

/// Serves `manifests` on `primary` with `secondary` as the secondary cluster.
async fn start_two(
    primary: &sluice::testing::NatsServer,
    secondary: &sluice::testing::NatsServer,
    manifests: &[(&str, String)],
) -> anyhow::Result<Sluice> {
    let (p, s) = (client(primary).await, client(secondary).await);
    Sluice::start_clusters(p, Some(s), manifests, tempfile::tempdir()?, RuntimeOptions::default()).await
}

/// Handler `both`: misbehave on stream SRC read on both clusters, deduplicated by
/// `Nats-Msg-Id` on the memory store, allowed to publish `publish`.
fn reading_both(publish: &str) -> String {
    manifest(
        "both",
        "misbehave",
        "x",
        &format!(
            "[capabilities]\npublish = [\"{publish}\"]\n\n[idempotency]\nkey = \"header:Nats-Msg-Id\"\n\n[store]\nbackend = \"memory\"\n"
        ),
    )
    .replace("subject = \"x\"", "stream = \"SRC\"\nclusters = [\"primary\", \"secondary\"]")
}

/// Handler `drain`: noop on the primary's OUT, whose backlog is the secondary's OUT.
fn draining_out() -> String {
    manifest("drain", "noop", "x", "").replace("subject = \"x\"", "stream = \"OUT\"\nbacklog = \"OUT\"")
}

/// The distinct `Nats-Msg-Id`s of `stored` (a message without one counts as the empty id).
fn distinct_ids(stored: &[jetstream::message::StreamMessage]) -> std::collections::BTreeSet<String> {
    stored.iter().map(|m| m.headers.get("Nats-Msg-Id").map(ToString::to_string).unwrap_or_default()).collect()
}

async fn publish(js: &jetstream::Context, subject: &str, id: &str, payload: String) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    js.publish_with_headers(subject.to_owned(), headers, payload.into()).await.unwrap().await.unwrap();
}

/// Waits until `what` holds (at most `limit`), saying what was seen last when it does not.
async fn until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match check().await {
            Ok(()) => return,
            Err(seen) => assert!(tokio::time::Instant::now() < deadline, "{what}: {seen}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn outputs_the_primary_refuses_go_to_the_secondary_and_the_syphon_brings_them_back() {
    let (primary, secondary) = (nats(), nats());
    let js = stream(&primary, "WORK", &["work"]).await;
    // The primary's OUT takes 50 messages and refuses the rest (a stream at its limits).
    js.create_stream(jetstream::stream::Config {
        name: "OUT".into(),
        subjects: vec!["out.>".into()],
        max_messages: 50,
        discard: DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
    // The secondary's OUT captures the same subjects: where passive sending puts them.
    // It also captures `evil.>`: whoever writes there must not have Sluice publish it on the
    // primary (the syphon publishes only to what the handler's primary stream captures).
    let js2 = stream(&secondary, "OUT", &["out.>", "evil.>"]).await;
    let watcher = client(&primary).await;
    let mut evil = watcher.subscribe("evil.>").await.unwrap();
    sluice_tests::sync(&watcher).await;
    publish(&js2, "evil.delete", "evil-1", "{}".into()).await;
    let work = manifest(
        "w",
        "misbehave",
        "work",
        "[capabilities]\npublish = [\"out.>\"]\n\n[idempotency]\nkey = \"json:/id\"\n\n[retry]\nmax_attempts = 2\n\n\
         [dead_letter]\nsubject = \"dlq.w\"\n",
    )
    .replace("subject = \"work\"", "stream = \"WORK\"");
    // A handler on the primary's OUT whose backlog is the secondary's OUT: its syphon moves
    // what the secondary holds into the primary.
    let drain = draining_out();
    let dir = tempfile::tempdir().unwrap();
    let options = RuntimeOptions { data_dir: Some(dir.path().join("data")), ..RuntimeOptions::default() };
    let sluice = Sluice::start_clusters(
        client(&primary).await,
        Some(client(&secondary).await),
        &[("w.toml", work), ("drain.toml", drain)],
        dir,
        options,
    )
    .await
    .unwrap();

    for i in 0..100 {
        publish(&js, "work", &format!("m-{i}"), format!(r#"{{"id": "m-{i}", "cmd": "publish:out.{i}"}}"#)).await;
    }
    // 50 on the primary, the other 50 on the secondary; nothing dead-lettered.
    until(Duration::from_secs(60), "the outputs were not split between the clusters", || async {
        let (p, s) = (count(&js, "OUT").await, count(&js2, "OUT").await - 1);
        let sent = metric(&sluice.metrics(), "sluice_outputs_secondary_total");
        if p == 50 && s == 50 && sent == 50.0 {
            Ok(())
        } else {
            Err(format!("primary {p}, secondary {s}, counted {sent}"))
        }
    })
    .await;
    assert_eq!(metric(&sluice.metrics(), "sluice_nats_secondary_active"), 1.0);

    // The primary takes messages again: the syphon moves the backlog there, and outputs go to
    // the primary again.
    js.update_stream(jetstream::stream::Config {
        name: "OUT".into(),
        subjects: vec!["out.>".into()],
        max_messages: -1,
        discard: DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
    until(Duration::from_secs(60), "the syphon did not move the backlog", || async {
        let p = count(&js, "OUT").await;
        if p == 100 { Ok(()) } else { Err(format!("primary {p}")) }
    })
    .await;
    for i in 100..200 {
        publish(&js, "work", &format!("m-{i}"), format!(r#"{{"id": "m-{i}", "cmd": "publish:out.{i}"}}"#)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until(Duration::from_secs(60), "not every output reached the primary once", || async {
        let p = count(&js, "OUT").await;
        let active = metric(&sluice.metrics(), "sluice_nats_secondary_active");
        if p == 200 && active == 0.0 { Ok(()) } else { Err(format!("primary {p}, secondary active {active}")) }
    })
    .await;
    // Every output once on the primary, by its id.
    let stored = sluice_tests::stream_messages(&js, "OUT", 200, Duration::from_secs(10)).await;
    let ids = distinct_ids(&stored);
    assert_eq!(ids.len(), 200, "outputs with the same id twice, or without one");
    let text = sluice.metrics();
    let moved = metric(&text, "sluice_syphon_moved_total{handler=\"drain\"}");
    let sent = metric(&text, "sluice_outputs_secondary_total");
    assert!(sent >= 50.0 && moved == sent, "sent to the secondary {sent}, moved back {moved}");
    let dead: f64 = text
        .lines()
        .filter(|l| l.starts_with("sluice_messages_dead_lettered_total{handler=\"w\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(dead, 0.0, "something was dead-lettered:\n{text}");
    let leaked = tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut evil)).await;
    assert!(leaked.is_err(), "the syphon published a subject outside the handler's stream: {leaked:?}");
    sluice.stop().await;
}

#[tokio::test]
async fn a_stream_read_on_both_clusters_handles_each_message_once() {
    let (primary, secondary) = (nats(), nats());
    let js = stream(&primary, "SRC", &["src"]).await;
    stream(&primary, "RES", &["res.>"]).await;
    let js2 = stream(&secondary, "SRC", &["src"]).await;
    let both = reading_both("res.>");
    let sluice = start_two(&primary, &secondary, &[("both.toml", both)]).await.unwrap();
    // Active replication by the sender: m-0..59 to both clusters, 60..79 to the primary only,
    // 80..99 to the secondary only.
    for i in 0..100 {
        let payload = || format!(r#"{{"cmd": "publish:res.{i}"}}"#);
        let id = format!("m-{i}");
        if i < 80 {
            publish(&js, "src", &id, payload()).await;
        }
        if !(60..80).contains(&i) {
            publish(&js2, "src", &id, payload()).await;
        }
    }
    until(Duration::from_secs(60), "not every message handled once", || async {
        let text = sluice.metrics();
        let done = metric(&text, "sluice_messages_succeeded_total{handler=\"both\"}");
        let skipped = metric(&text, "sluice_messages_skipped_duplicate_total{handler=\"both\"}");
        if done == 100.0 && skipped == 60.0 { Ok(()) } else { Err(format!("succeeded {done}, skipped {skipped}")) }
    })
    .await;
    // Both consumers are drained, and nothing more ran.
    for (js, cluster) in [(&js, "primary"), (&js2, "secondary")] {
        let info = js.get_stream("SRC").await.unwrap().consumer_info("both").await.unwrap();
        assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "the {cluster}'s consumer: {info:?}");
    }
    assert_eq!(count(&js, "RES").await, 100);
    assert_eq!(metric(&sluice.metrics(), "sluice_messages_succeeded_total{handler=\"both\"}"), 100.0);
    sluice.stop().await;
}

#[tokio::test]
async fn a_manifest_reading_a_secondary_that_is_not_given_is_refused_at_bind() {
    let primary = nats();
    stream(&primary, "SRC", &["src"]).await;
    let text = manifest("both", "noop", "x", "[idempotency]\nkey = \"header:Nats-Msg-Id\"\n")
        .replace("subject = \"x\"", "stream = \"SRC\"\nclusters = [\"primary\", \"secondary\"]");
    let e = Sluice::try_start(&primary, &[("both.toml", text)]).await.expect_err("bound without a secondary");
    assert!(format!("{e:#}").contains("no secondary is given (sluice run --nats-secondary)"), "{e:#}");
}

#[tokio::test]
async fn outputs_go_to_the_secondary_while_the_primary_is_down_and_back_after() {
    let store = tempfile::tempdir().unwrap();
    let start_primary = |port: u16| {
        let dir = store.path().display().to_string();
        sluice::testing::NatsServer::start_with_args(port, &["-sd", &dir]).expect("cannot start nats-server")
    };
    let primary = start_primary(0);
    let port = primary.port();
    let secondary = nats();
    let js = stream(&primary, "SRC", &["src"]).await;
    stream(&primary, "OUT", &["out.>"]).await;
    let js2 = stream(&secondary, "SRC", &["src"]).await;
    js2.create_stream(jetstream::stream::Config {
        name: "OUT".into(),
        subjects: vec!["out.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    // Read on both clusters (so work arrives while the primary is down), outputs to OUT, and
    // the secondary's OUT syphoned back into the primary's.
    let both = reading_both("out.>");
    let drain = draining_out();
    let sluice = start_two(&primary, &secondary, &[("both.toml", both), ("drain.toml", drain)]).await.unwrap();
    let send = |from: usize, to: usize| {
        let js2 = js2.clone();
        async move {
            for i in from..to {
                publish(&js2, "src", &format!("m-{i}"), format!(r#"{{"cmd": "publish:out.{i}"}}"#)).await;
            }
        }
    };
    send(0, 50).await;
    until(Duration::from_secs(60), "the first outputs did not reach the primary", || async {
        let p = count(&js, "OUT").await;
        if p == 50 { Ok(()) } else { Err(format!("primary {p}")) }
    })
    .await;

    drop(primary);
    send(50, 100).await;
    until(Duration::from_secs(60), "outputs did not go to the secondary while the primary was down", || async {
        let s = count(&js2, "OUT").await;
        let active = metric(&sluice.metrics(), "sluice_nats_secondary_active");
        if s == 50 && active == 1.0 { Ok(()) } else { Err(format!("secondary {s}, active {active}")) }
    })
    .await;

    let _primary = start_primary(port);
    // Work goes on arriving (through the secondary); once the primary is back and its few
    // seconds as the passive side are over, outputs go to it again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut sent = 100;
    while metric(&sluice.metrics(), "sluice_nats_secondary_active") != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "outputs never went back to the primary");
        send(sent, sent + 1).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = sent as u64;
    until(Duration::from_secs(90), "not every output reached the primary", || async {
        let Ok(p) = js.get_stream("OUT").await.map(|s| s.cached_info().state.messages) else {
            return Err("the primary's OUT is not back yet".into());
        };
        if p == total { Ok(()) } else { Err(format!("primary {p} of {total}")) }
    })
    .await;
    let stored = sluice_tests::stream_messages(&js, "OUT", total, Duration::from_secs(10)).await;
    let ids = distinct_ids(&stored);
    assert_eq!(ids.len() as u64, total, "an output twice on the primary, or without an id");
    let text = sluice.metrics();
    assert_eq!(metric(&text, "sluice_messages_succeeded_total{handler=\"both\"}"), total as f64);
    assert_eq!(
        metric(&text, "sluice_syphon_moved_total{handler=\"drain\"}"),
        metric(&text, "sluice_outputs_secondary_total")
    );
    sluice.stop().await;
}

#[tokio::test]
async fn a_backlog_for_a_stream_without_subjects_is_refused_at_bind() {
    let (primary, secondary) = (nats(), nats());
    let js = stream(&primary, "SRC", &["src"]).await;
    // A sourced stream listens on no subject: there is nowhere to move a backlog to.
    js.create_stream(jetstream::stream::Config {
        name: "AGG".into(),
        sources: Some(vec![jetstream::stream::Source { name: "SRC".into(), ..Default::default() }]),
        ..Default::default()
    })
    .await
    .unwrap();
    stream(&secondary, "BACKLOG", &["src"]).await;
    let text = manifest("agg", "noop", "x", "").replace("subject = \"x\"", "stream = \"AGG\"\nbacklog = \"BACKLOG\"");
    let e = start_two(&primary, &secondary, &[("agg.toml", text)])
        .await
        .expect_err("bound a syphon with nowhere to publish");
    assert!(format!("{e:#}").contains("stream AGG on the primary has no subjects"), "{e:#}");
}
