//! The hostile handler suite against the `sluice` binary, as deployed: while the `misbehave`
//! plugin loops, sleeps, allocates, recurses, traps, panics, floods its outbox and its logs and
//! tries to escape, over and over, the process's memory stays bounded (it returns to where it
//! was once the storm passes, and a second storm does not raise it), every hostile call ends
//! with its own failure kind, and a well-behaved handler running alongside keeps serving (no
//! 3 s without an answer). Its throughput during the storm, as a ratio of its throughput
//! before, is printed and held only loosely (these machines are shared). A burst of Python
//! or JavaScript calls (plugins/probe-py, probe-js: an interpreter per instance) leaves memory
//! bounded the same way.
//!
//! A separate process (rather than the in-process fixture of `tests/`) so that its RSS is
//! Sluice's own and not that of a test binary running other tests at the same time.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use common::{Killed, build_plugins, repo_root};

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice::testing::NatsServer;

/// Hostile commands of plugins/misbehave and the failure kind each must end with (`None`:
/// the call succeeds, having been refused what it tried).
const STORM: &[(&str, Option<&str>)] = &[
    ("loop", Some("timeout")),
    ("alloc", Some("memory-limit")),
    ("recurse", Some("trap")),
    ("trap", Some("trap")),
    ("panic", Some("trap")),
    ("sleep:5000", Some("timeout")),
    ("publish-many:5000", Some("output-limit")),
    ("publish-big:1000000", Some("output-limit")),
    ("publish:forbidden.secrets", None),
    ("escape", None),
    ("log-flood:400000", None),
];

const MEMORY_LIMIT_MIB: u64 = 32;
const HOSTILE_CONCURRENCY: u64 = 8;

fn manifest(name: &str, plugin: &str, subject: &str, extra: &str) -> String {
    let component = repo_root().join(format!("plugins/dist/{plugin}.wasm"));
    format!(
        "[handler]\nname = \"{name}\"\ncomponent = {:?}\n\n[source]\nsubject = \"{subject}\"\n{extra}",
        component.display().to_string()
    )
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn header(msg: &async_nats::Message, name: &str) -> Option<String> {
    msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned())
}

async fn request(nc: &async_nats::Client, subject: &str, body: &str) -> async_nats::Message {
    let asked = nc.request(subject.to_owned(), body.to_owned().into());
    tokio::time::timeout(Duration::from_secs(30), asked)
        .await
        .unwrap_or_else(|_| panic!("no answer to {body:?} on {subject} within 30 s"))
        .unwrap_or_else(|e| panic!("request {body:?} on {subject}: {e}"))
}

/// Echo requests one after another for `length`, counting the replies; also checks that no
/// 3 s pass without one.
async fn echo_for(nc: &async_nats::Client, length: Duration) -> u64 {
    let start = Instant::now();
    let mut last = start;
    let mut served = 0;
    while start.elapsed() < length {
        let reply = request(nc, "echo", "still here").await;
        assert_eq!(&reply.payload[..], b"still here");
        let gap = last.elapsed();
        assert!(gap < Duration::from_secs(3), "the well-behaved handler went {gap:?} without an answer");
        last = Instant::now();
        served += 1;
    }
    served
}

/// Sends the storm's commands round-robin, `HOSTILE_CONCURRENCY` at a time, until `stop`, and
/// checks each outcome. Returns how many hostile calls ended.
async fn storm(nc: async_nats::Client, stop: Arc<AtomicBool>) -> u64 {
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..HOSTILE_CONCURRENCY {
        let (nc, stop, done) = (nc.clone(), stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut i = w as usize;
            while !stop.load(Ordering::Relaxed) {
                let (command, kind) = STORM[i % STORM.len()];
                let reply = request(&nc, "misbehave", command).await;
                assert_eq!(
                    header(&reply, "Sluice-Failure-Kind").as_deref(),
                    kind,
                    "{command}: {:?}",
                    header(&reply, "Sluice-Failure-Reason")
                );
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    done.load(Ordering::Relaxed)
}

/// One storm of `length` with echo traffic alongside; returns (echo replies, hostile calls,
/// peak RSS in KiB sampled every 50 ms).
async fn storm_with_echo(nc: &async_nats::Client, pid: u32, length: Duration) -> (u64, u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let hostile = tokio::spawn(storm(nc.clone(), stop.clone()));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let served = echo_for(nc, length).await;
    stop.store(true, Ordering::Relaxed);
    let calls = hostile.await.unwrap();
    sampler.await.unwrap();
    (served, calls, peak.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_handlers_leave_memory_bounded_and_a_neighbour_serving() {
    build_plugins();
    // One after the other, not as two tests at once: two storms on 2 cores would starve the
    // neighbour for reasons of their own.
    storm_run("fresh").await;
    // Warm instances: a hostile call that fails retires its instance; the bounds are the same.
    storm_run("warm").await;
}

async fn storm_run(instances: &str) {
    println!("instances = {instances}");
    let server = NatsServer::start(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let limits = format!(
        "\n[limits]\ninstances = \"{instances}\"\nmemory = \"{MEMORY_LIMIT_MIB}MiB\"\ntimeout = \"500ms\"\nmax_concurrency = {HOSTILE_CONCURRENCY}\n\
         max_outputs = 10\nmax_output_bytes = \"64KiB\"\n\n[capabilities]\npublish = [\"allowed.>\"]\n\n\
         [retry]\nmax_attempts = 1\n\n[store]\nbackend = \"memory\"\n"
    );
    std::fs::write(dir.path().join("misbehave.toml"), manifest("misbehave", "misbehave", "misbehave", &limits))
        .unwrap();
    std::fs::write(dir.path().join("echo.toml"), manifest("echo", "echo", "echo", "")).unwrap();
    // Ready when both handlers answer (compiling them may take a while in a debug build).
    let (child, pid, nc) = serve(&server, dir.path(), "echo", Duration::from_secs(120)).await;

    // Warm-up: every command once, so that pool slots, buffers and caches exist before the
    // baseline is read.
    for (command, _) in STORM {
        request(&nc, "misbehave", command).await;
    }
    echo_for(&nc, Duration::from_millis(500)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = rss_kib(pid);

    let calm = echo_for(&nc, Duration::from_secs(2)).await;
    let (stormy, calls_1, peak_1) = storm_with_echo(&nc, pid, Duration::from_secs(4)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_1 = rss_kib(pid);
    let (_, calls_2, peak_2) = storm_with_echo(&nc, pid, Duration::from_secs(4)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_2 = rss_kib(pid);

    let mib = |kib: u64| kib as f64 / 1024.0;
    let ratio = (stormy as f64 / 4.0) / (calm as f64 / 2.0);
    println!(
        "RSS: baseline {:.1} MiB; storm 1 peak {:.1} MiB, after {:.1} MiB; storm 2 peak {:.1} MiB, after {:.1} MiB",
        mib(baseline),
        mib(peak_1),
        mib(after_1),
        mib(peak_2),
        mib(after_2)
    );
    println!(
        "echo: {:.0}/s alone, {:.0}/s during the storm ({:.0}% of alone); hostile calls ended: {calls_1} + {calls_2}",
        calm as f64 / 2.0,
        stormy as f64 / 4.0,
        ratio * 100.0
    );

    assert!(calls_1 > STORM.len() as u64 && calls_2 > STORM.len() as u64, "the storm did not get through its commands");
    // At most every hostile instance at its memory limit at once, plus slack for buffers.
    let bound = baseline + HOSTILE_CONCURRENCY * MEMORY_LIMIT_MIB * 1024 + 64 * 1024;
    assert!(peak_1 <= bound && peak_2 <= bound, "RSS went past {:.1} MiB", mib(bound));
    // Nothing kept: once the storm passes, memory is back near the baseline, and a second
    // storm ends where the first did.
    assert!(after_1 <= baseline + 64 * 1024, "storm 1 left {:.1} MiB behind", mib(after_1 - baseline));
    assert!(
        after_2 <= after_1 + 32 * 1024,
        "memory grew from storm to storm: {:.1} -> {:.1} MiB",
        mib(after_1),
        mib(after_2)
    );
    // Served throughout (echo_for checks the gaps). The ratio is held only loosely: about 45%
    // on 2 cores with guest calls on their own threads (the default), about 2% when they
    // shared the I/O threads; 5% tells the two apart with a wide margin for a busy machine.
    assert!(ratio > 0.05, "the well-behaved handler was starved: {:.1}% of its calm rate", ratio * 100.0);

    let mut child = child;
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let exited = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        matches!(child.0.try_wait(), Ok(Some(_)))
    });
    assert!(exited, "sluice did not exit on SIGTERM after the storms");
}

/// Interpreter calls at once in the bursts below.
const BURST_CONCURRENCY: u64 = 16;
/// Calls per burst.
const BURST_CALLS: u64 = 1500;

/// A burst of `BURST_CALLS` calls of the probe plugin, `BURST_CONCURRENCY` at a time, each answered as it
/// should be; returns the peak RSS in KiB sampled every 50 ms.
async fn probe_burst(nc: &async_nats::Client, pid: u32) -> u64 {
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut workers = Vec::new();
    for _ in 0..BURST_CONCURRENCY {
        let (nc, next) = (nc.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < BURST_CALLS {
                // probe-py and probe-js echo what is not one of their commands.
                let reply = request(&nc, "probe", "hello from the burst").await;
                assert_eq!(
                    &reply.payload[..],
                    b"hello from the burst",
                    "{:?}",
                    header(&reply, "Sluice-Failure-Reason")
                );
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    peak.load(Ordering::Relaxed)
}

/// The issue this answers: RSS grew from 25 MB to 247 MB after a burst of interpreter calls.
/// Bounds are loose (a shared machine, allocator caches), but a leak per call fails them:
/// after a burst, memory is back near where it was; a second burst ends where the first did.
/// Python (plugins/probe-py), then JavaScript (plugins/probe-js), one process each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_python_or_javascript_calls_leaves_memory_bounded() {
    build_plugins();
    burst_run("probe-py").await;
    burst_run("probe-js").await;
}

async fn burst_run(plugin: &str) {
    let server = NatsServer::start(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let limits = format!("\n[limits]\nmemory = \"64MiB\"\ntimeout = \"5s\"\nmax_concurrency = {BURST_CONCURRENCY}\n");
    std::fs::write(dir.path().join("probe.toml"), manifest("probe", plugin, "probe", &limits)).unwrap();
    // Ready when it answers (compiling an 18 MB component in a debug build takes a while).
    let (_child, pid, nc) = serve(&server, dir.path(), "probe", Duration::from_secs(300)).await;
    // Warm-up: pool slots for every concurrent call, then a rest.
    let before_warm_up = rss_kib(pid);
    probe_burst(&nc, pid).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = rss_kib(pid);

    let peak_1 = probe_burst(&nc, pid).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_1 = rss_kib(pid);
    let peak_2 = probe_burst(&nc, pid).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_2 = rss_kib(pid);

    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "{plugin}: RSS with {BURST_CALLS} calls per burst, {BURST_CONCURRENCY} at once: ready {:.1} MiB, after warm-up {:.1} MiB; \
         burst 1 peak {:.1} MiB, after {:.1} MiB; burst 2 peak {:.1} MiB, after {:.1} MiB",
        mib(before_warm_up),
        mib(baseline),
        mib(peak_1),
        mib(after_1),
        mib(peak_2),
        mib(after_2)
    );
    // At most every concurrent instance at its memory limit at once, plus slack.
    let bound = baseline + BURST_CONCURRENCY * 64 * 1024 + 128 * 1024;
    assert!(peak_1 <= bound && peak_2 <= bound, "RSS went past {:.1} MiB", mib(bound));
    // A leak of even 100 KiB per call would be 150 MiB per burst: these fail it.
    assert!(after_1 <= baseline + 96 * 1024, "burst 1 left {:.1} MiB behind", mib(after_1.saturating_sub(baseline)));
    assert!(
        after_2 <= after_1 + 64 * 1024,
        "memory grew from burst to burst: {:.1} -> {:.1} MiB",
        mib(after_1),
        mib(after_2)
    );
}

/// Starts `sluice run` on the manifests in `dir` (logging warnings only; compiled components
/// kept between runs of this suite, debug builds compile slowly) and waits until `subject`
/// answers a `ping` with `ping`, for at most `limit`.
async fn serve(
    server: &NatsServer,
    dir: &std::path::Path,
    subject: &str,
    limit: Duration,
) -> (Killed, u32, async_nats::Client) {
    let data = repo_root().join("target/test-hostile-data");
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(dir)
        .args(["--nats", &server.url(), "--no-watch", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Killed(child);
    let pid = child.0.id();
    let nc = async_nats::connect(server.url()).await.unwrap();
    let deadline = Instant::now() + limit;
    loop {
        let ping = nc.request(subject.to_owned(), "ping".into());
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(2), ping).await
            && &reply.payload[..] == b"ping"
        {
            break;
        }
        assert!(Instant::now() < deadline, "sluice did not start serving within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (child, pid, nc)
}
