//! A misbehaving handler is contained: it ends that one call with a typed failure, and the
//! runtime, the handler's next message and other handlers keep being served.

use std::time::{Duration, Instant};

use sluice_tests::{Sluice, client, collect_quiet, header, manifest, nats, request, sync, text};

const LIMITS: &str = r#"
[limits]
memory = "32MiB"
timeout = "500ms"
max_concurrency = 8

[capabilities]
publish = ["allowed.>"]

# One attempt: each failure is reported as it happened (retries are tested elsewhere).
[retry]
max_attempts = 1
"#;

async fn start(server: &sluice::testing::NatsServer) -> Sluice {
    Sluice::start(
        server,
        &[
            ("misbehave.toml", manifest("misbehave", "misbehave", "misbehave", LIMITS)),
            ("echo.toml", manifest("echo", "echo", "echo", "")),
        ],
    )
    .await
}

/// Sends `command`, expects a failure reply of `kind`, then shows the handler still serves.
async fn expect_failure(nc: &async_nats::Client, command: &str, kind: &str) -> async_nats::Message {
    let reply = request(nc, "misbehave", command).await;
    assert_eq!(
        header(&reply, "Sluice-Failure-Kind").as_deref(),
        Some(kind),
        "{command}: reason {:?}",
        header(&reply, "Sluice-Failure-Reason")
    );
    assert_eq!(text(&request(nc, "misbehave", "ok").await), "ok", "not served after {command}");
    reply
}

#[tokio::test]
async fn traps_and_panics_end_only_their_call() {
    let server = nats();
    let sluice = start(&server).await;
    let nc = client(&server).await;

    let reply = expect_failure(&nc, "trap", "trap").await;
    assert!(header(&reply, "Sluice-Failure-Reason").unwrap().contains("unreachable"));
    expect_failure(&nc, "panic", "trap").await;
    assert!(header(&reply, "Sluice-Handler-Digest").unwrap().starts_with("sha256:"));
    sluice.stop().await;
}

#[tokio::test]
async fn a_looping_handler_is_interrupted_at_its_timeout() {
    let server = nats();
    let sluice = start(&server).await;
    let nc = client(&server).await;

    // While one call spins, the other handler and other calls of this one are served.
    let spinning = {
        let nc = nc.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = request(&nc, "misbehave", "loop").await;
            (reply, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(text(&request(&nc, "echo", "still here").await), "still here");
    assert_eq!(text(&request(&nc, "misbehave", "ok").await), "ok");

    let (reply, elapsed) = spinning.await.unwrap();
    assert_eq!(header(&reply, "Sluice-Failure-Kind").as_deref(), Some("timeout"));
    assert!(elapsed >= Duration::from_millis(500), "interrupted before its timeout: {elapsed:?}");
    // Generous: the point is that it was interrupted at all, on a shared, noisy machine.
    assert!(elapsed < Duration::from_secs(8), "not interrupted near its timeout: {elapsed:?}");

    // A guest waiting in a host call (a WASI sleep) is interrupted too.
    expect_failure(&nc, "sleep:5000", "timeout").await;
    sluice.stop().await;
}

#[tokio::test]
async fn a_memory_hungry_handler_hits_its_memory_limit() {
    let server = nats();
    let sluice = start(&server).await;
    let nc = client(&server).await;

    let reply = expect_failure(&nc, "alloc", "memory-limit").await;
    assert!(header(&reply, "Sluice-Failure-Reason").unwrap().contains("32 MiB"));
    // And again: each message gets a fresh instance with the full budget.
    expect_failure(&nc, "alloc", "memory-limit").await;
    sluice.stop().await;
}

#[tokio::test]
async fn publishing_outside_the_allowlist_is_refused() {
    let server = nats();
    let sluice = start(&server).await;
    let nc = client(&server).await;
    let mut forbidden = nc.subscribe("forbidden.>").await.unwrap();
    let mut allowed = nc.subscribe("allowed.>").await.unwrap();
    sync(&nc).await;

    let reply = request(&nc, "misbehave", "publish:forbidden.secrets").await;
    let answer = text(&reply);
    assert!(answer.starts_with("refused: publishing to \"forbidden.secrets\" is not allowed"), "{answer}");
    assert!(answer.contains("\"allowed.>\""), "the error names what is allowed: {answer}");

    let reply = request(&nc, "misbehave", "publish:allowed.audit.1").await;
    assert_eq!(text(&reply), "published");

    let got = collect_quiet(&mut allowed, Duration::from_millis(300), Duration::from_secs(5)).await;
    assert_eq!(got.iter().map(|m| m.subject.to_string()).collect::<Vec<_>>(), ["allowed.audit.1"]);
    let leaked = collect_quiet(&mut forbidden, Duration::from_millis(100), Duration::from_secs(1)).await;
    assert!(leaked.is_empty(), "a refused publish was sent");
    sluice.stop().await;
}

#[tokio::test]
async fn outputs_of_a_failed_call_are_not_sent() {
    let server = nats();
    let sluice = start(&server).await;
    let nc = client(&server).await;

    let mut allowed = nc.subscribe("allowed.>").await.unwrap();
    sync(&nc).await;

    // The handler queues a publication, then fails: the publication is dropped.
    let reply = expect_failure(&nc, "publish-then-reject:allowed.x", "rejected").await;
    assert_eq!(header(&reply, "Sluice-Failure-Reason").as_deref(), Some("published, then rejected"));
    assert!(reply.payload.is_empty());
    expect_failure(&nc, "retry", "retry-requested").await;
    let leaked = collect_quiet(&mut allowed, Duration::from_millis(300), Duration::from_secs(2)).await;
    assert!(leaked.is_empty(), "a failed call's output was sent");

    // The same publication from a successful call is sent, so the check above can fail.
    assert_eq!(text(&request(&nc, "misbehave", "publish:allowed.x").await), "published");
    let sent = collect_quiet(&mut allowed, Duration::from_millis(300), Duration::from_secs(5)).await;
    assert_eq!(sent.len(), 1);
    sluice.stop().await;
}

#[tokio::test]
async fn runaway_recursion_is_a_trap() {
    let server = nats();
    let sluice = start(&server).await;
    let nc = client(&server).await;
    let reply = expect_failure(&nc, "recurse", "trap").await;
    let reason = header(&reply, "Sluice-Failure-Reason").unwrap();
    assert!(reason.contains("stack"), "the reason says what happened: {reason}");
    sluice.stop().await;
}

#[tokio::test]
async fn outputs_over_the_limits_fail_the_call_with_output_limit() {
    let server = nats();
    let extra =
        format!("{LIMITS}\n").replace("[limits]\n", "[limits]\nmax_outputs = 10\nmax_output_bytes = \"64KiB\"\n");
    let sluice = Sluice::start(&server, &[("m.toml", manifest("misbehave", "misbehave", "misbehave", &extra))]).await;
    let nc = client(&server).await;
    let mut allowed = nc.subscribe("allowed.>").await.unwrap();
    sync(&nc).await;

    // Thousands of publications: the 11th is refused, and the call fails even though the
    // handler shrugged the refusals off and returned Ok.
    let reply = expect_failure(&nc, "publish-many:5000", "output-limit").await;
    assert!(header(&reply, "Sluice-Failure-Reason").unwrap().contains("more than 10 outputs"));
    // One huge payload: refused the same way.
    let reply = expect_failure(&nc, "publish-big:1000000", "output-limit").await;
    assert!(header(&reply, "Sluice-Failure-Reason").unwrap().contains("max_output_bytes"));
    // Within the limits all is well, and only that was sent.
    assert_eq!(text(&request(&nc, "misbehave", "publish-many:10").await), "accepted 10");
    let sent = collect_quiet(&mut allowed, Duration::from_millis(300), Duration::from_secs(5)).await;
    assert_eq!(sent.len(), 10);
    sluice.stop().await;
}

#[tokio::test]
async fn a_handler_cannot_reach_files_sockets_or_the_environment() {
    let server = nats();
    let sluice = start(&server).await;
    let nc = client(&server).await;
    let answer = text(&request(&nc, "misbehave", "escape").await);
    assert!(answer.contains("fs=denied"), "{answer}");
    assert!(answer.contains("net=denied"), "{answer}");
    assert!(answer.contains("env=0"), "{answer}");
    sluice.stop().await;
}

#[tokio::test]
async fn a_flood_of_logs_is_cut_at_the_budget_and_the_call_goes_on() {
    let server = nats();
    let extra = "[limits]\ntimeout = \"8s\"\nmax_log_bytes = \"16KiB\"\n\n[retry]\nmax_attempts = 1";
    let sluice = Sluice::start(&server, &[("m.toml", manifest("misbehave", "misbehave", "misbehave", extra))]).await;
    let nc = client(&server).await;
    // 4 MB of stderr: 16 KiB reach the log, the rest is dropped, the call completes.
    assert_eq!(text(&request(&nc, "misbehave", "log-flood:4000000").await), "logged");
    assert_eq!(text(&request(&nc, "misbehave", "ok").await), "ok");
    sluice.stop().await;
}

#[tokio::test]
async fn a_payload_over_max_payload_is_refused_without_running_the_handler() {
    let server = nats();
    let extra = LIMITS.replace("[limits]\n", "[limits]\nmax_payload = \"1KiB\"\n");
    let sluice = Sluice::start(&server, &[("m.toml", manifest("misbehave", "misbehave", "misbehave", &extra))]).await;
    let nc = client(&server).await;
    let big = format!("ok{}", " ".repeat(2048));
    let reply = request(&nc, "misbehave", &big).await;
    assert_eq!(header(&reply, "Sluice-Failure-Kind").as_deref(), Some("payload-too-large"));
    assert_eq!(text(&request(&nc, "misbehave", "ok").await), "ok");
    sluice.stop().await;
}
