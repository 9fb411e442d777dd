//! The `sluice` binary's life cycle, as deployed: a folder served through a known sequence
//! of changes reloads exactly once per change and then stays quiet (no reload, no CPU), and a
//! shutdown ends: within its timeout when NATS is gone, at once on a second signal, saying
//! what it abandons.
//!
//! Separate processes, so that the CPU time read from `/proc` is Sluice's own.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Killed, build_plugins, repo_root};

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice::testing::NatsServer;

/// A `sluice run` child whose log lines are collected as they come.
struct Child {
    process: Killed,
    log: Arc<Mutex<Vec<String>>>,
}

impl Child {
    fn start(paths: &Path, nats: &str, extra: &[&str], rust_log: &str) -> Child {
        Self::start_in(paths, nats, &repo_root().join("target/test-lifecycle-data"), extra, rust_log)
    }

    fn start_in(paths: &Path, nats: &str, data: &Path, extra: &[&str], rust_log: &str) -> Child {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("run")
            .arg(paths)
            .args(["--nats", nats, "--data-dir"])
            .arg(data)
            .args(extra)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Child { process: Killed(child), log }
    }

    fn pid(&self) -> u32 {
        self.process.0.id()
    }

    fn count(&self, needle: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn wait_for_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.count(needle) == 0 {
            assert!(Instant::now() < deadline, "no {needle:?} in the log within {limit:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.pid().to_string()]).status().unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.process.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// User plus system CPU time of the process, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
}

fn manifest(name: &str, component: &Path, extra: &str) -> String {
    format!(
        "[handler]\nname = \"{name}\"\ncomponent = {:?}\n\n[source]\nsubject = \"{name}\"\n{extra}",
        component.display().to_string()
    )
}

fn plugin(name: &str) -> std::path::PathBuf {
    repo_root().join(format!("plugins/dist/{name}.wasm"))
}

const RELOADED: &str = "sluice::runtime: reloaded";
const WATCHER_RELOAD: &str = "files changed; reloading";

/// Waits until the log has `n` changing reloads.
fn wait_reloads(child: &Child, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.count(RELOADED) < n {
        assert!(Instant::now() < deadline, "{what}: no reload\n{}", child.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let anything that would follow (a reload looping on its own reads) show itself.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(child.count(RELOADED), n, "{what}: more than one reload\n{}", child.log_text());
}

#[test]
fn a_served_folder_reloads_once_per_change_and_is_quiet_in_between() {
    build_plugins();
    let server = NatsServer::start(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    let components = dir.path().join("components");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::create_dir_all(&components).unwrap();
    let echo = components.join("a.wasm");
    std::fs::copy(plugin("echo"), &echo).unwrap();
    let a = manifests.join("a.toml");
    std::fs::write(&a, manifest("a", &echo, "\n[config]\ntag = \"1\"\n")).unwrap();

    let child = Child::start(&manifests, &server.url(), &[], "info,sluice::reload=debug");
    child.wait_for_log("ready;", Duration::from_secs(120));

    // SIGHUP: one reload that finds nothing to do, and nothing after it.
    child.signal("HUP");
    child.wait_for_log("SIGHUP: reloading", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(child.count(RELOADED), 0, "{}", child.log_text());
    assert_eq!(child.count(WATCHER_RELOAD), 0, "the SIGHUP reload started others:\n{}", child.log_text());

    // Add, modify, delete, rename over: one reload each.
    let b = manifests.join("b.toml");
    std::fs::write(&b, manifest("b", &plugin("versioned"), "\n[capabilities]\npublish = [\"versioned.out\"]\n"))
        .unwrap();
    wait_reloads(&child, 1, "add");
    std::fs::write(&a, manifest("a", &echo, "\n[config]\ntag = \"2\"\n")).unwrap();
    wait_reloads(&child, 2, "modify");
    std::fs::remove_file(&b).unwrap();
    wait_reloads(&child, 3, "delete");
    let tmp = manifests.join(".a.toml.swp");
    std::fs::write(&tmp, manifest("a", &echo, "\n[config]\ntag = \"3\"\n")).unwrap();
    std::fs::rename(&tmp, &a).unwrap();
    wait_reloads(&child, 4, "rename over");

    // A component rewritten in place in 10 small writes: one reload, of the final content.
    let new_component = std::fs::read(plugin("versioned")).unwrap();
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&echo).unwrap();
        for chunk in new_component.chunks(new_component.len().div_ceil(10)) {
            file.write_all(chunk).unwrap();
            file.flush().unwrap();
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    wait_reloads(&child, 5, "component rewrite");
    assert_eq!(child.count("reload: the previous version keeps serving"), 0, "{}", child.log_text());

    // Quiet: no reload and next to no CPU for 5 s.
    let reloads = child.count(WATCHER_RELOAD);
    let before = child.cpu_ticks();
    std::thread::sleep(Duration::from_secs(5));
    let used = child.cpu_ticks() - before;
    assert_eq!(child.count(WATCHER_RELOAD), reloads, "reloads while nothing changed:\n{}", child.log_text());
    // 5% of one core over 5 s is 25 ticks at the usual 100 ticks a second.
    assert!(used <= 25, "{used} ticks of CPU in 5 quiet seconds");
    assert_eq!(child.count(RELOADED), 5, "{}", child.log_text());
    // Each change was one reload of the watcher (the SIGHUP one is counted apart).
    assert_eq!(reloads, 5, "{}", child.log_text());
}

fn slow_manifest() -> String {
    manifest("slow", &plugin("misbehave"), "\n[limits]\ntimeout = \"120s\"\n\n[retry]\nmax_attempts = 1\n")
}

/// Starts Sluice on a `slow` handler and leaves one 60 s call in flight.
async fn with_a_call_in_flight(server: &NatsServer, dir: &Path, extra: &[&str]) -> Child {
    std::fs::write(dir.join("slow.toml"), slow_manifest()).unwrap();
    let child = Child::start(dir, &server.url(), extra, "info");
    child.wait_for_log("ready;", Duration::from_secs(120));
    let nc = async_nats::connect(server.url()).await.unwrap();
    // A request nobody waits for: its call sleeps for a minute.
    nc.publish_with_reply("slow", nc.new_inbox(), "sleep:60000".into()).await.unwrap();
    nc.flush().await.unwrap();
    // Give the message time to reach the handler.
    tokio::time::sleep(Duration::from_millis(700)).await;
    child
}

#[tokio::test]
async fn shutdown_ends_within_its_timeout_when_nats_is_gone() {
    build_plugins();
    let server = NatsServer::start(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = with_a_call_in_flight(&server, dir.path(), &["--shutdown-timeout", "2s"]).await;
    drop(server);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    child.signal("TERM");
    let status = child.wait_exit(Duration::from_secs(12));
    let took = asked.elapsed();
    let log = child.log_text();
    let status = status.unwrap_or_else(|| panic!("still running 12 s after SIGTERM:\n{log}"));
    assert!(!status.success(), "an abandoned message must fail the exit: {status:?}\n{log}");
    assert!(took >= Duration::from_secs(2), "gave up before its timeout ({took:?}):\n{log}");
    assert!(log.contains("1 message(s) in flight abandoned; they are lost: core NATS does not redeliver"), "{log}");
    assert!(log.contains("the shutdown timeout (2s) passed"), "{log}");
}

#[tokio::test]
async fn a_second_signal_stops_at_once() {
    build_plugins();
    let server = NatsServer::start(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = with_a_call_in_flight(&server, dir.path(), &["--shutdown-timeout", "60s"]).await;
    child.signal("TERM");
    child.wait_for_log("shutting down", Duration::from_secs(10));
    // Draining: the call has most of a minute to go.
    assert!(child.wait_exit(Duration::from_millis(1000)).is_none(), "exited before its call finished");
    let asked = Instant::now();
    child.signal("INT");
    let status = child.wait_exit(Duration::from_secs(5));
    let log = child.log_text();
    let status = status.unwrap_or_else(|| panic!("still running 5 s after a second signal:\n{log}"));
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert!(!status.success(), "{status:?}\n{log}");
    assert!(log.contains("a second signal came") && log.contains("1 message(s) in flight abandoned"), "{log}");
}

/// kill -9 of `sluice run` twice while it works through a JetStream backlog: each message
/// adds 1 to its key's kv counter and publishes the new count (`tally`). Afterwards every
/// message has exactly one output in OUT (none lost; a re-send dropped by OUT's duplicate
/// window) and each key's published counts are exactly 1..n for its n messages (no kv write
/// of an interrupted or repeated call survived).
#[tokio::test]
async fn kill_9_under_load_loses_nothing_and_repeats_no_effect() {
    use async_nats::jetstream;
    build_plugins();
    let server = NatsServer::start(0).unwrap();
    let nc = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(nc.clone());
    for (name, subject) in [("WORK", "work"), ("OUT", "out.>")] {
        js.create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    const N: usize = 3000;
    const KEYS: usize = 100;
    let mut acks = Vec::new();
    for i in 0..N {
        let payload = format!(r#"{{"id": "m-{i}", "cmd": "tally:c{}:out.{i}"}}"#, i % KEYS);
        acks.push(js.publish("work", payload.into()).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let text = format!(
        "[handler]\nname = \"w\"\ncomponent = {:?}\n\n[source]\nstream = \"WORK\"\nack_wait = \"3s\"\n\n\
         [capabilities]\npublish = [\"out.>\"]\n\n[limits]\ntimeout = \"1s\"\nmax_concurrency = 16\n\n\
         [idempotency]\nkey = \"json:/id\"\n\n[retry]\nmax_attempts = 1000\ninitial = \"5ms\"\nmax = \"50ms\"\n",
        plugin("misbehave").display().to_string()
    );
    std::fs::write(dir.path().join("w.toml"), text).unwrap();
    let stored = |js: jetstream::Context| async move {
        js.get_stream("OUT").await.unwrap().info().await.unwrap().state.messages as usize
    };
    let wait_stored = |at_least: usize, limit: Duration, child: &Child| {
        let (js, log) = (js.clone(), child.log_text());
        async move {
            let deadline = Instant::now() + limit;
            while stored(js.clone()).await < at_least {
                assert!(Instant::now() < deadline, "OUT never reached {at_least}:\n{log}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    for round in 1..=2 {
        let mut child = Child::start_in(dir.path(), &server.url(), data.path(), &[], "info");
        wait_stored(round * N / 3, Duration::from_secs(120), &child).await;
        child.signal("KILL");
        assert!(child.wait_exit(Duration::from_secs(10)).is_some(), "kill -9 did not end it");
        let at = stored(js.clone()).await;
        eprintln!("round {round}: killed with {at} of {N} outputs stored");
    }
    let mut child = Child::start_in(dir.path(), &server.url(), data.path(), &[], "info");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let info = js.get_stream("WORK").await.unwrap().consumer_info("w").await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 && stored(js.clone()).await >= N {
            break;
        }
        assert!(Instant::now() < deadline, "the backlog never drained: {info:?}\n{}", child.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.signal("TERM");
    assert!(child.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()), "{}", child.log_text());

    assert_eq!(stored(js.clone()).await, N, "outputs lost or stored twice");
    let out = js.get_stream("OUT").await.unwrap();
    let mut counts: Vec<Vec<u64>> = vec![Vec::new(); KEYS];
    let mut seen = vec![false; N];
    let first = out.cached_info().state.first_sequence.max(1);
    for seq in first..first + N as u64 {
        let m = out.get_raw_message(seq).await.unwrap();
        let i: usize = m.subject.trim_start_matches("out.").parse().unwrap();
        assert!(!seen[i], "two outputs for message {i}");
        seen[i] = true;
        counts[i % KEYS].push(String::from_utf8_lossy(&m.payload).parse().unwrap());
    }
    for (k, mut c) in counts.into_iter().enumerate() {
        c.sort_unstable();
        let want: Vec<u64> = (1..=(N / KEYS) as u64).collect();
        assert_eq!(c, want, "key c{k}: a count was lost or repeated");
    }
}
