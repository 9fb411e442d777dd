//! Warm instances (`[limits] instances = "warm"`): a handler's globals survive from one message
//! to the next, until a failure other than its own reject or retry, `recycle_after` messages,
//! or a reload retire the instance. Fresh instances (the default) never keep anything.

use sluice_tests::{Sluice, client, header, manifest, nats, request, text};

fn limits(instances: &str) -> String {
    // One call at a time, so that every message meets the same idle instance.
    format!(
        "[limits]\nmemory = \"32MiB\"\ntimeout = \"500ms\"\nmax_concurrency = 1\n{instances}\n\n[retry]\nmax_attempts = 1\n"
    )
}

async fn count(nc: &async_nats::Client) -> u64 {
    let reply = request(nc, "counter", "count").await;
    assert_eq!(header(&reply, "Sluice-Failure-Kind"), None, "{:?}", header(&reply, "Sluice-Failure-Reason"));
    text(&reply).parse().unwrap()
}

async fn counts(nc: &async_nats::Client, n: usize) -> Vec<u64> {
    let mut all = Vec::new();
    for _ in 0..n {
        all.push(count(nc).await);
    }
    all
}

async fn fail(nc: &async_nats::Client, command: &str, kind: &str) {
    let reply = request(nc, "counter", command).await;
    assert_eq!(header(&reply, "Sluice-Failure-Kind").as_deref(), Some(kind), "{command}");
}

#[tokio::test]
async fn fresh_instances_keep_nothing_between_messages() {
    let server = nats();
    let sluice = Sluice::start(&server, &[("c.toml", manifest("counter", "misbehave", "counter", &limits("")))]).await;
    let nc = client(&server).await;
    assert_eq!(counts(&nc, 4).await, [1, 1, 1, 1]);
    sluice.stop().await;
}

#[tokio::test]
async fn a_warm_instance_keeps_its_globals_until_a_failure_retires_it() {
    let server = nats();
    let warm = limits("instances = \"warm\"");
    let sluice = Sluice::start(&server, &[("c.toml", manifest("counter", "misbehave", "counter", &warm))]).await;
    let nc = client(&server).await;
    assert_eq!(counts(&nc, 3).await, [1, 2, 3]);

    // The handler's own reject and retry are normal endings: the instance stays.
    fail(&nc, "reject", "rejected").await;
    fail(&nc, "retry", "retry-requested").await;
    assert_eq!(count(&nc).await, 6);

    // A trap, a timeout and a memory-limit hit each retire it: the next message meets a new one.
    for (command, kind) in [("trap", "trap"), ("loop", "timeout"), ("alloc", "memory-limit")] {
        assert!(count(&nc).await > 1);
        fail(&nc, command, kind).await;
        assert_eq!(counts(&nc, 2).await, [1, 2], "after {command}");
    }
    sluice.stop().await;
}

#[tokio::test]
async fn a_warm_instance_is_recycled_on_schedule_and_on_reload() {
    let server = nats();
    let warm = limits("instances = \"warm\"\nrecycle_after = 3");
    let sluice = Sluice::start(&server, &[("c.toml", manifest("counter", "misbehave", "counter", &warm))]).await;
    let nc = client(&server).await;
    assert_eq!(counts(&nc, 7).await, [1, 2, 3, 1, 2, 3, 1]);

    // A reload that changes the handler swaps the version, and its instances with it.
    let changed = manifest("counter", "misbehave", "counter", &format!("{warm}\n[config]\ntag = \"v2\"\n"));
    std::fs::write(sluice.manifest_dir().join("c.toml"), changed).unwrap();
    assert_eq!(sluice.reloader().reload().await.updated, ["counter"]);
    assert_eq!(counts(&nc, 2).await, [1, 2]);
    sluice.stop().await;
}
