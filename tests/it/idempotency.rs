//! Idempotency keys, the dedup stores, and effectively-once outputs.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use sluice::RuntimeOptions;
use sluice::testing::Fault;
use sluice_tests::{
    Sluice, client, collect_quiet, js_publish, manifest, nats, request, stream, stream_messages, sync, text,
};

/// A core handler on `work` that may publish to `out.*`, with the given extra sections.
fn worker(name: &str, extra: &str) -> String {
    manifest(name, "misbehave", "work", &format!("[capabilities]\npublish = [\"out.>\"]\n\n{extra}"))
}

async fn publish_with_id(nc: &async_nats::Client, subject: &str, id: &str, payload: &str) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    nc.publish_with_headers(subject.to_owned(), headers, payload.to_owned().into_bytes().into()).await.unwrap();
}

/// Waits (10 s at most) until `handler`'s nats-kv bucket has had `writes` messages written to
/// it in all (its stream's last sequence: deletions and replaced values count too).
async fn wait_bucket_writes(nc: &async_nats::Client, handler: &str, writes: u64) {
    let js = jetstream::new(nc.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut bucket = js.get_stream(format!("KV_sluice-kv-{handler}")).await.unwrap();
        let last = bucket.info().await.unwrap().state.last_sequence;
        if last == writes {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "writes to the bucket: {last}, expected {writes}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn msg_id(m: &async_nats::Message) -> Option<String> {
    m.headers.as_ref()?.get("Nats-Msg-Id").map(|v| v.as_str().to_owned())
}

#[tokio::test]
async fn the_same_message_three_times_runs_once_and_yields_one_output() {
    let server = nats();
    let sluice =
        Sluice::start(&server, &[("w.toml", worker("w", "[idempotency]\nkey = \"header:Nats-Msg-Id\""))]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("out.>").await.unwrap();
    sync(&nc).await;

    for _ in 0..3 {
        publish_with_id(&nc, "work", "order-1", "publish:out.one").await;
    }
    publish_with_id(&nc, "work", "order-2", "publish:out.two").await; // another id: another message
    let got = collect_quiet(&mut out, Duration::from_millis(700), Duration::from_secs(10)).await;
    let mut subjects: Vec<String> = got.iter().map(|m| m.subject.to_string()).collect();
    subjects.sort();
    assert_eq!(subjects, ["out.one", "out.two"]);
    // Outputs carry <handler>/<key>/<index>, so that a stream downstream drops re-sends (and
    // only re-sends of this handler's outputs).
    let one = got.iter().find(|m| m.subject.as_str() == "out.one").unwrap();
    assert_eq!(msg_id(one).as_deref(), Some("w/order-1/0"));
    sluice.stop().await;
}

#[tokio::test]
async fn copies_stored_in_a_stream_run_once_with_a_json_key() {
    let server = nats();
    let js = stream(&server, "WORK", &["work"]).await;
    let text = worker("w", "[idempotency]\nkey = \"json:/id\"").replace("subject = \"work\"", "stream = \"WORK\"");
    let sluice = Sluice::start(&server, &[("w.toml", text)]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("out.>").await.unwrap();
    sync(&nc).await;

    // No Nats-Msg-Id: the stream stores all three copies; Sluice runs the handler once.
    for _ in 0..3 {
        js_publish(&js, "work", r#"{"id": "o-1", "cmd": "publish:out.o1"}"#).await;
    }
    // A payload without the key is processed without dedup (on_missing = "process").
    js_publish(&js, "work", r#"{"cmd": "publish:out.nokey"}"#).await;
    js_publish(&js, "work", r#"{"cmd": "publish:out.nokey"}"#).await;
    let got = collect_quiet(&mut out, Duration::from_millis(700), Duration::from_secs(10)).await;
    let mut subjects: Vec<String> = got.iter().map(|m| m.subject.to_string()).collect();
    subjects.sort();
    assert_eq!(subjects, ["out.nokey", "out.nokey", "out.o1"]);
    let info = js.get_stream("WORK").await.unwrap().consumer_info("w").await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "skipped duplicates are acked");
    sluice.stop().await;
}

#[tokio::test]
async fn a_crash_after_the_call_before_its_commit_yields_one_output_on_nats_kv() {
    let server = nats();
    let js = stream(&server, "WORK", &["work"]).await;
    let out_stream = stream(&server, "OUT", &["out.>"]).await;
    // The call's output waits in its commit (an outbox entry in the handler's bucket, written
    // in one atomic batch with the key's record); the crash comes before that commit.
    let text = worker(
        "w",
        "[limits]\ntimeout = \"1s\"\n\n[idempotency]\nkey = \"json:/id\"\n\n[store]\nbackend = \"nats-kv\"",
    )
    .replace("subject = \"work\"", "stream = \"WORK\"");

    // The first runtime runs the handler, then stops as a crash would: no commit, no ack,
    // and a lease record left in the bucket.
    let data = tempfile::tempdir().unwrap();
    let halting = RuntimeOptions {
        data_dir: Some(data.path().to_owned()),
        fault: Some(Fault::HaltAfterOutputs),
        ..RuntimeOptions::default()
    };
    let first =
        Sluice::start_with(&server, &[("w.toml", text.clone())], tempfile::tempdir().unwrap(), halting).await.unwrap();
    js_publish(&js, "work", r#"{"id": "o-9", "cmd": "publish:out.o9"}"#).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !first.metrics().lines().any(|l| l.starts_with("sluice_messages_received_total") && l.ends_with(" 1")) {
        assert!(tokio::time::Instant::now() < deadline, "never received:\n{}", first.metrics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        out_stream.get_stream("OUT").await.unwrap().info().await.unwrap().state.messages,
        0,
        "an output left the process before its commit"
    );
    first.crash().await;

    // The restarted runtime gets the redelivery, waits out the dead process's lease (a record
    // in the KV bucket), runs the handler again and commits; its output goes out once.
    let same_data = RuntimeOptions { data_dir: Some(data.path().to_owned()), ..RuntimeOptions::default() };
    let second =
        Sluice::start_with(&server, &[("w.toml", text)], tempfile::tempdir().unwrap(), same_data).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let info = js.get_stream("WORK").await.unwrap().consumer_info("w").await.unwrap();
        // Delivered twice (the crash, then the redelivery) and acked.
        if info.delivered.consumer_sequence >= 2 && info.ack_floor.consumer_sequence >= 2 && info.num_ack_pending == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the redelivery was never acked: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outputs = stream_messages(&out_stream, "OUT", 1, Duration::from_secs(1)).await;
    assert_eq!(outputs.len(), 1, "the output was stored twice");
    assert_eq!(
        outputs[0].headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some("w/o-9/0"),
        "the id is scoped by the handler name"
    );
    second.stop().await;
}

#[tokio::test]
async fn two_processes_sharing_a_nats_kv_store_run_concurrent_duplicates_once() {
    let server = nats();
    let extra = |tag: &str| {
        format!(
            "[config]\ntag = \"{tag}\"\n\n[idempotency]\nkey = \"header:Nats-Msg-Id\"\n\n[store]\nbackend = \"nats-kv\""
        )
    };
    let a = Sluice::start(&server, &[("w.toml", worker("w", &extra("a")))]).await;
    let b = Sluice::start(&server, &[("w.toml", worker("w", &extra("b")))]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("out.>").await.unwrap();
    sync(&nc).await;

    // Each key twice, back to back; the queue group spreads the copies over both processes,
    // and the handler is slow enough that both copies are in flight together.
    const KEYS: usize = 30;
    for i in 0..KEYS {
        for _ in 0..2 {
            publish_with_id(&nc, "work", &format!("k-{i}"), &format!("work:150:out.{i}")).await;
        }
    }
    let got = collect_quiet(&mut out, Duration::from_millis(1500), Duration::from_secs(60)).await;
    let mut per_key: HashMap<String, usize> = HashMap::new();
    let mut per_runtime: HashMap<String, usize> = HashMap::new();
    for m in &got {
        *per_key.entry(m.subject.to_string()).or_default() += 1;
        let tag = m.headers.as_ref().and_then(|h| h.get("Test-Tag")).map(|v| v.to_string()).unwrap_or_default();
        *per_runtime.entry(tag).or_default() += 1;
    }
    assert_eq!(per_key.len(), KEYS, "some keys were never handled");
    assert!(per_key.values().all(|&n| n == 1), "a duplicate ran twice: {per_key:?}");
    assert_eq!(per_runtime.len(), 2, "one process did all the work: {per_runtime:?}");
    // This handler imports `dedup` (marks are written as set, outside the commit), so it takes
    // the lease record: four writes a key (the lease; the outbox entry and the record in one
    // batch; the entry's removal), where an optimistic handler makes three.
    wait_bucket_writes(&nc, "w", 4 * KEYS as u64).await;
    a.stop().await;
    b.stop().await;
}

/// On `nats-kv`, a handler without outbound HTTP or marks (order-validator) runs
/// optimistically: no lease is written, copies of a message may run in two processes at once,
/// and the later commit keeps nothing. Each order is published twice, back to back, to the
/// queue group of two processes: each is validated once downstream, each second copy counts as
/// a skipped duplicate, and the bucket holds no lease: three writes an order (the outbox entry
/// and the record in one atomic batch, the entry's removal), where a lease would add a fourth.
#[tokio::test]
async fn two_processes_on_nats_kv_run_a_handler_without_outside_effects_optimistically_and_keep_one_commit() {
    let server = nats();
    let text = manifest(
        "v",
        "order-validator",
        "orders.created",
        "[capabilities]\npublish = [\"orders.validated\"]\n\n[idempotency]\nkey = \"json:/id\"\n\n\
         [store]\nbackend = \"nats-kv\"",
    );
    let a = Sluice::start(&server, &[("v.toml", text.clone())]).await;
    let b = Sluice::start(&server, &[("v.toml", text)]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("orders.validated").await.unwrap();
    sync(&nc).await;

    const ORDERS: usize = 40;
    for i in 0..ORDERS {
        let order = format!(
            r#"{{"id": "o-{i}", "customer": "c-1", "currency": "EUR", "items": [{{"sku": "A1", "quantity": 1, "unit_price_cents": 100}}]}}"#
        );
        for _ in 0..2 {
            nc.publish("orders.created", order.clone().into()).await.unwrap();
        }
    }
    let got = collect_quiet(&mut out, Duration::from_millis(1500), Duration::from_secs(60)).await;
    let mut per_order: HashMap<String, usize> = HashMap::new();
    for m in &got {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        *per_order.entry(v["id"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    assert_eq!(per_order.len(), ORDERS, "some orders were never validated");
    assert!(per_order.values().all(|&n| n == 1), "an order was validated twice: {per_order:?}");
    let skipped = |s: &Sluice| {
        s.metrics()
            .lines()
            .find_map(|l| l.strip_prefix("sluice_messages_skipped_duplicate_total{handler=\"v\"} "))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    assert_eq!(skipped(&a) + skipped(&b), ORDERS as f64, "every second copy is a skipped duplicate");
    wait_bucket_writes(&nc, "v", 3 * ORDERS as u64).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_redb_store_remembers_across_a_restart() {
    let server = nats();
    let data = tempfile::tempdir().unwrap();
    let options = || RuntimeOptions { data_dir: Some(data.path().to_owned()), ..RuntimeOptions::default() };
    let text = worker("w", "[idempotency]\nkey = \"header:Nats-Msg-Id\"\n\n[store]\nbackend = \"redb\"");
    let nc = client(&server).await;
    let mut out = nc.subscribe("out.>").await.unwrap();
    sync(&nc).await;

    let first = Sluice::start_with(&server, &[("w.toml", text.clone())], tempfile::tempdir().unwrap(), options())
        .await
        .unwrap();
    publish_with_id(&nc, "work", "k-1", "publish:out.first").await;
    assert_eq!(collect_quiet(&mut out, Duration::from_millis(500), Duration::from_secs(10)).await.len(), 1);
    first.stop().await;

    let second =
        Sluice::start_with(&server, &[("w.toml", text)], tempfile::tempdir().unwrap(), options()).await.unwrap();
    publish_with_id(&nc, "work", "k-1", "publish:out.again").await;
    publish_with_id(&nc, "work", "k-2", "publish:out.new").await;
    let got = collect_quiet(&mut out, Duration::from_millis(700), Duration::from_secs(10)).await;
    assert_eq!(got.iter().map(|m| m.subject.to_string()).collect::<Vec<_>>(), ["out.new"]);
    second.stop().await;
}

#[tokio::test]
async fn after_the_ttl_a_key_is_processed_again() {
    let server = nats();
    let text = worker("w", "[idempotency]\nttl = \"1s\"\n\n[store]\nbackend = \"memory\"");
    let sluice = Sluice::start(&server, &[("w.toml", text)]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("out.>").await.unwrap();
    sync(&nc).await;

    publish_with_id(&nc, "work", "k", "publish:out.1").await;
    publish_with_id(&nc, "work", "k", "publish:out.2").await;
    let got = collect_quiet(&mut out, Duration::from_millis(500), Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "the duplicate within the TTL ran");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    publish_with_id(&nc, "work", "k", "publish:out.3").await;
    let got = collect_quiet(&mut out, Duration::from_millis(500), Duration::from_secs(10)).await;
    assert_eq!(got.iter().map(|m| m.subject.to_string()).collect::<Vec<_>>(), ["out.3"]);
    sluice.stop().await;
}

#[tokio::test]
async fn the_same_key_with_another_payload_is_dead_lettered_as_a_conflict() {
    let server = nats();
    let js = stream(&server, "DLQ", &["dlq.w"]).await;
    let text = worker(
        "w",
        "[idempotency]\nfingerprint = true\n\n[dead_letter]\nsubject = \"dlq.w\"\nstream = \"DLQ\"\n\n[store]\nbackend = \"memory\"",
    );
    let sluice = Sluice::start(&server, &[("w.toml", text)]).await;
    let nc = client(&server).await;

    publish_with_id(&nc, "work", "k", "publish:out.a").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_with_id(&nc, "work", "k", "publish:out.a").await; // same payload: skipped
    publish_with_id(&nc, "work", "k", "publish:out.b").await; // other payload: conflict
    let dead = stream_messages(&js, "DLQ", 1, Duration::from_secs(10)).await;
    assert_eq!(dead[0].headers.get("Sluice-Failure-Kind").map(|v| v.as_str()), Some("idempotency-conflict"));
    assert_eq!(&dead[0].payload[..], b"publish:out.b");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(js.get_stream("DLQ").await.unwrap().info().await.unwrap().state.messages, 1);
    sluice.stop().await;
}

#[tokio::test]
async fn a_message_without_a_key_is_dead_lettered_when_the_manifest_says_so() {
    let server = nats();
    let js = stream(&server, "DLQ", &["dlq.w"]).await;
    let text = worker(
        "w",
        "[idempotency]\nkey = \"json:/id\"\non_missing = \"dead-letter\"\n\n[dead_letter]\nsubject = \"dlq.w\"\nstream = \"DLQ\"\n\n[store]\nbackend = \"memory\"",
    );
    let sluice = Sluice::start(&server, &[("w.toml", text)]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("out.>").await.unwrap();
    sync(&nc).await;

    nc.publish("work", "publish:out.x".into()).await.unwrap(); // not JSON
    nc.publish("work", r#"{"cmd": "publish:out.y"}"#.into()).await.unwrap(); // JSON without /id
    nc.publish("work", r#"{"id": 7, "cmd": "publish:out.z"}"#.into()).await.unwrap();
    let dead = stream_messages(&js, "DLQ", 2, Duration::from_secs(10)).await;
    let reasons: Vec<&str> =
        dead.iter().filter_map(|d| d.headers.get("Sluice-Failure-Reason")).map(|v| v.as_str()).collect();
    assert!(
        dead.iter()
            .all(|d| d.headers.get("Sluice-Failure-Kind").map(|v| v.as_str()) == Some("missing-idempotency-key"))
    );
    assert!(reasons.iter().any(|r| r.contains("not JSON")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("no value at /id")), "{reasons:?}");
    let got = collect_quiet(&mut out, Duration::from_millis(500), Duration::from_secs(10)).await;
    assert_eq!(got.iter().map(|m| m.subject.to_string()).collect::<Vec<_>>(), ["out.z"]);
    sluice.stop().await;
}

/// Two handlers running the same component, each with its own kv and dedup marks.
async fn guest_state_is_scoped(backend: &str) {
    let server = nats();
    let store = format!("[store]\nbackend = \"{backend}\"");
    let sluice = Sluice::start(
        &server,
        &[("a.toml", manifest("a", "misbehave", "a", &store)), ("b.toml", manifest("b", "misbehave", "b", &store))],
    )
    .await;
    let nc = client(&server).await;
    assert_eq!(text(&request(&nc, "a", "kv-set:secret:42").await), "set");
    assert_eq!(text(&request(&nc, "a", "kv-get:secret").await), "42");
    assert_eq!(text(&request(&nc, "b", "kv-get:secret").await), "none", "{backend}: b read a's key");
    assert_eq!(text(&request(&nc, "a", "mark:m").await), "first");
    assert_eq!(text(&request(&nc, "a", "mark:m").await), "seen");
    assert_eq!(text(&request(&nc, "b", "mark:m").await), "first", "{backend}: b saw a's mark");
    sluice.stop().await;
}

#[tokio::test]
async fn guest_state_is_scoped_to_its_handler_in_memory() {
    guest_state_is_scoped("memory").await;
}

#[tokio::test]
async fn guest_state_is_scoped_to_its_handler_in_redb() {
    guest_state_is_scoped("redb").await;
}

#[tokio::test]
async fn guest_state_is_scoped_to_its_handler_in_nats_kv() {
    guest_state_is_scoped("nats-kv").await;
}

#[tokio::test]
async fn the_nats_kv_store_follows_the_store_protocol() {
    let server = nats();
    let js = jetstream::new(client(&server).await);
    let kv = sluice::testing::KvStore::new(js, 1, Default::default());
    sluice::testing::conformance::protocol(sluice::testing::Store::Kv(Box::new(kv))).await;
}

/// An older Sluice kept idempotency records in a second bucket, `sluice-dedup-<handler>`: while
/// it holds records, a duplicate of a message handled before the upgrade is still skipped.
#[tokio::test]
async fn a_record_in_the_dedup_bucket_of_an_older_sluice_still_skips_its_duplicate() {
    use sha2::Digest;
    let server = nats();
    let js = jetstream::new(client(&server).await);
    let old = js
        .create_key_value(jetstream::kv::Config { bucket: "sluice-dedup-w".into(), history: 1, ..Default::default() })
        .await
        .unwrap();
    let later = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 3_600_000;
    let key = format!("h{}", hex::encode(sha2::Sha256::digest(b"order-old")));
    old.put(&key, format!(r#"{{"state":"completed","expires_ms":{later}}}"#).into()).await.unwrap();

    let text = worker("w", "[idempotency]\nkey = \"header:Nats-Msg-Id\"\n\n[store]\nbackend = \"nats-kv\"");
    let sluice = Sluice::start(&server, &[("w.toml", text)]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("out.>").await.unwrap();
    sync(&nc).await;
    publish_with_id(&nc, "work", "order-old", "publish:out.old").await;
    publish_with_id(&nc, "work", "order-new", "publish:out.new").await;
    let got = collect_quiet(&mut out, Duration::from_millis(700), Duration::from_secs(10)).await;
    let subjects: Vec<String> = got.iter().map(|m| m.subject.to_string()).collect();
    assert_eq!(subjects, ["out.new"], "the message handled before the upgrade ran again");
    let m = sluice.metrics();
    assert!(m.lines().any(|l| l.starts_with("sluice_messages_skipped_duplicate_total") && l.ends_with(" 1")), "{m}");
    // New records go to the handler's one bucket, not the old one.
    let new = js.get_key_value("sluice-kv-w").await.unwrap();
    let new_key = format!("h{}", hex::encode(sha2::Sha256::digest(b"order-new")));
    assert!(new.get(&new_key).await.unwrap().is_some());
    assert!(old.get(&new_key).await.unwrap().is_none());
    sluice.stop().await;
}
