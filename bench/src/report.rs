//! The results of a run: raw numbers (`bench/results.json`), ratios to the native baselines,
//! the targets with pass/fail, the machine they were measured on, and the Markdown
//! (`BENCHMARKS.md`, also printed) that shows them side by side.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::latency::LatencyRun;
use crate::nats::Server;

/// One throughput measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub id: &'static str,
    pub label: &'static str,
    /// `core` or `jetstream`.
    pub transport: &'static str,
    /// The handler component, `-` for a native baseline.
    pub handler: &'static str,
    pub messages: u64,
    pub seconds: f64,
    pub per_sec: f64,
    pub warmup_messages: u64,
    pub method: &'static str,
    /// CPU time of the consuming process (native client or sluice) per message, in µs, from
    /// /proc/PID/stat (10 ms ticks), when measurable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer_cpu_us_per_msg: Option<f64>,
    /// JetStream: redeliveries the consumer reported (0 when every message was acked once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redelivered: Option<u64>,
    /// Rows with a state store: what the store did per message, from the counters Sluice
    /// logs at shutdown (over every message the measured process handled, warm-up included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreCost>,
    pub notes: Vec<String>,
}

/// A state store's work per message.
#[derive(Debug, Clone, Serialize)]
pub struct StoreCost {
    pub store: String,
    pub reads_per_msg: f64,
    /// Commits (redb) or KV writes (nats-kv) per message.
    pub writes_per_msg: f64,
    /// redb: durable transactions (one fsync each) per message; `None` for nats-kv (the
    /// server syncs its stream files on its own interval).
    pub fsyncs_per_msg: Option<f64>,
}

impl Throughput {
    pub fn new(
        id: &'static str,
        label: &'static str,
        transport: &'static str,
        handler: &'static str,
        messages: u64,
        took: Duration,
    ) -> Self {
        Throughput {
            id,
            label,
            transport,
            handler,
            messages,
            seconds: took.as_secs_f64(),
            per_sec: messages as f64 / took.as_secs_f64(),
            warmup_messages: 0,
            method: "",
            consumer_cpu_us_per_msg: None,
            redelivered: None,
            store: None,
            notes: Vec::new(),
        }
    }

    /// The warm-up that preceded the measurement, and how it was measured.
    pub fn how(mut self, warmup: u64, method: &'static str) -> Self {
        self.warmup_messages = warmup;
        self.method = method;
        self
    }

    /// The consuming process's CPU time during the measurement, in clock ticks.
    pub fn cpu(mut self, ticks: u64) -> Self {
        // USER_HZ is 100 on Linux: one tick is 10 ms.
        let us = ticks as f64 * 10_000.0;
        self.consumer_cpu_us_per_msg = Some(us / self.messages as f64);
        self
    }
}

/// A measurement that could not run, and why (the Extism peer when it is not built).
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub id: &'static str,
    pub transport: &'static str,
    pub reason: String,
}

/// The Extism peer's row (bench/peer-extism): the do-it-yourself alternative to Sluice.
pub const PEER_EXTISM: &str = "peer_extism_jetstream_noop";

/// Start-up and idle memory of `sluice run` with some handlers.
#[derive(Debug, Clone, Serialize)]
pub struct Startup {
    pub id: String,
    pub handlers: usize,
    /// `cold`: an empty data folder, so every component is compiled (and the compiled-component
    /// cache, where it exists, filled); `warm`: the folder a previous start filled.
    pub cache: &'static str,
    /// Spawn to the `ready` log line, per run.
    pub ready_s_runs: Vec<f64>,
    pub ready_s: f64,
    /// VmRSS one second after `ready`, per run.
    pub rss_kib_runs: Vec<u64>,
    pub rss_kib: u64,
    /// SIGTERM to exit, idle, per run.
    pub exit_s_runs: Vec<f64>,
    pub exit_s: f64,
}

/// One hot reload: from renaming the new component over the old to its first output.
#[derive(Debug, Clone, Serialize)]
pub struct Reload {
    pub round: usize,
    /// The version swapped in (`v1` or `v2` of plugins/versioned).
    pub to: &'static str,
    /// The first time this version is loaded: it is compiled; later rounds find it in the
    /// compiled-component cache.
    pub compiled: bool,
    pub seconds: f64,
}

/// Summarises runs of (ready seconds, RSS KiB, exit seconds).
pub fn startup(id: &str, handlers: usize, cache: &'static str, runs: Vec<(f64, u64, f64)>) -> Startup {
    let ready: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let rss: Vec<u64> = runs.iter().map(|r| r.1).collect();
    let exit: Vec<f64> = runs.iter().map(|r| r.2).collect();
    Startup {
        id: id.to_owned(),
        handlers,
        cache,
        ready_s: median(&ready),
        rss_kib: {
            let mut r = rss.clone();
            r.sort_unstable();
            r.get(r.len() / 2).copied().unwrap_or(0)
        },
        exit_s: median(&exit),
        ready_s_runs: ready,
        rss_kib_runs: rss,
        exit_s_runs: exit,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Sluice's rate over a native baseline's.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub sluice: &'static str,
    pub native: &'static str,
    pub ratio: f64,
}

/// What Sluice adds to native latency at one offered load.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    /// `sluice` (fresh instances) or `sluice_warm`.
    pub who: String,
    pub load: f64,
    pub offered_per_sec: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// One of the throughput, latency and start-up targets (issues 7 and 16).
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: &'static str,
    pub goal: &'static str,
    pub measured: Option<f64>,
    pub shown: String,
    /// `pass`, `fail`, or `not measurable` (the feature it needs does not exist yet).
    pub result: &'static str,
}

/// Where the numbers come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub date: String,
    pub nats_server: String,
    pub git_revision: String,
    pub git_uncommitted_changes: bool,
    pub rustc: String,
    pub wasmtime: String,
    pub async_nats: String,
    /// /proc/loadavg when the run started (it still shows a build that just finished).
    pub load_average_at_start: String,
    /// Share of all cores busy (/proc/stat) during 2 s before the run, while the harness did
    /// nothing: other work on the machine, which skews every figure.
    pub busy_before_run: f64,
    /// /proc/stat's total and steal ticks when the run started.
    #[serde(skip)]
    pub cpu_times_at_start: Option<CpuTimes>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub command: &'static str,
    pub machine: Machine,
    pub message_bytes: usize,
    pub seconds_per_measurement: f64,
    pub wall_seconds: f64,
    /// Slow consumers nats-server saw during the whole run (0: no message was dropped by it).
    pub server_slow_consumers: u64,
    /// /proc/loadavg when the run ended.
    pub load_average_at_end: String,
    /// Share of all cores busy during 2 s after the run (nats-server idle, no consumer).
    pub busy_after_run: f64,
    /// Share of the cores' time the hypervisor gave to other guests during the whole run
    /// (/proc/stat's `steal`; 0 on bare metal). Steal comes in bursts, and it lands in the
    /// latency tails of whichever responder was running.
    pub steal_during_run: f64,
    pub throughput: Vec<Throughput>,
    /// Measurements that were not run, and why.
    pub skipped: Vec<Skipped>,
    pub ratios: Vec<Ratio>,
    pub latency: Vec<LatencyRun>,
    pub added_latency: Vec<Added>,
    /// Cold starts, and warm ones when this Sluice has a compiled-component cache.
    pub startup: Vec<Startup>,
    /// Hot reloads under load: file write to first message on the new version.
    pub reload: Vec<Reload>,
    pub targets: Vec<Target>,
}

#[allow(clippy::too_many_arguments)]
pub fn results(
    machine: Machine,
    busy_after_run: f64,
    message_bytes: usize,
    seconds_per_measurement: f64,
    wall_seconds: f64,
    server_slow_consumers: u64,
    throughput: Vec<Throughput>,
    latency: Vec<LatencyRun>,
    startup: Vec<Startup>,
    reload: Vec<Reload>,
    skipped: Vec<Skipped>,
) -> Results {
    let rate = |id: &str| throughput.iter().find(|t| t.id == id).map(|t| t.per_sec);
    let pairs = [
        ("sluice_core_noop", "native_core"),
        ("sluice_core_noop_warm", "native_core"),
        ("sluice_jetstream_noop", "native_jetstream"),
        ("sluice_jetstream_noop_warm", "native_jetstream"),
        ("sluice_jetstream_noop_dedup_memory", "native_jetstream"),
        ("sluice_jetstream_noop_dedup_redb", "native_jetstream"),
        ("sluice_jetstream_noop_dedup_nats_kv", "native_jetstream"),
        ("sluice_jetstream_noop_dedup_local", "native_jetstream"),
        ("sluice_jetstream_noop_dedup_local_warm", "native_jetstream"),
        ("sluice_jetstream_noop_dedup_nats_kv_warm", "native_jetstream"),
        ("sluice_jetstream_ordered_warm", "native_jetstream"),
        ("sluice_core_order_validator", "native_core"),
        ("sluice_jetstream_order_validator", "native_jetstream"),
        ("sluice_core_echo", "native_echo"),
        ("sluice_core_echo_warm", "native_echo"),
        ("sluice_core_echo_py", "native_echo"),
        ("sluice_core_echo_py_warm", "native_echo"),
        ("sluice_core_echo_js", "native_echo"),
        ("sluice_core_echo_js_warm", "native_echo"),
        (PEER_EXTISM, "native_jetstream"),
        // Against the peer (after the native pairs: a row's first ratio is its native one).
        ("sluice_jetstream_noop_warm", PEER_EXTISM),
        ("sluice_jetstream_noop", PEER_EXTISM),
        // What per-key order costs against the same handler unordered.
        ("sluice_jetstream_ordered_warm", "sluice_jetstream_noop_warm"),
    ];
    let ratios: Vec<Ratio> =
        pairs.iter().filter_map(|&(s, n)| Some(Ratio { sluice: s, native: n, ratio: rate(s)? / rate(n)? })).collect();
    let ratio = |s: &str| ratios.iter().find(|r| r.sluice == s).map(|r| r.ratio);

    let mut added = Vec::new();
    for native in latency.iter().filter(|l| l.who == "native") {
        for sluice in latency.iter().filter(|l| l.who != "native" && l.load == native.load) {
            added.push(Added {
                who: sluice.who.clone(),
                load: native.load,
                offered_per_sec: native.offered_per_sec,
                p50_us: sluice.p50_us - native.p50_us,
                p90_us: sluice.p90_us - native.p90_us,
                p99_us: sluice.p99_us - native.p99_us,
                p999_us: sluice.p999_us - native.p999_us,
            });
        }
    }

    let pass = |ok: bool| if ok { "pass" } else { "fail" };
    let mut targets = Vec::new();
    let ratio_targets = [
        ("sluice_core_noop", "core NATS throughput, noop handler, vs native core subscriber", ">= 15%", 0.15),
        ("sluice_jetstream_noop", "JetStream throughput, noop handler, vs native pull consumer", ">= 45%", 0.45),
        ("sluice_jetstream_noop_warm", "JetStream throughput, noop handler, warm instances, vs native", ">= 70%", 0.70),
        ("sluice_core_noop_warm", "core NATS throughput, noop handler, warm instances, vs native", ">= 30%", 0.30),
        ("sluice_core_echo_warm", "request/reply throughput, echo handler, warm instances, vs native", ">= 30%", 0.30),
        (
            "sluice_jetstream_noop_dedup_redb",
            "JetStream throughput, noop handler with the redb dedup store, vs native pull consumer",
            ">= 50%",
            0.50,
        ),
        (
            "sluice_jetstream_noop_dedup_local_warm",
            "JetStream, noop handler, idempotency on the default embedded store, warm instances, vs native",
            ">= 50%",
            0.50,
        ),
        (
            "sluice_jetstream_noop_dedup_local",
            "JetStream, noop handler, idempotency on the default embedded store, fresh instances, vs native",
            ">= 30%",
            0.30,
        ),
        (
            "sluice_jetstream_noop_dedup_nats_kv_warm",
            "JetStream, noop handler, idempotency on nats-kv, warm instances, vs native",
            ">= 20%",
            0.20,
        ),
    ];
    for (id, target, goal, min) in ratio_targets {
        let measured = ratio(id);
        targets.push(Target {
            target,
            goal,
            measured,
            shown: measured.map_or("-".into(), pct),
            result: measured.map_or("fail", |r| pass(r >= min)),
        });
    }
    let peer = "JetStream throughput, noop handler, warm instances, vs the Extism peer (bench/peer-extism)";
    let vs_peer =
        ratios.iter().find(|r| r.sluice == "sluice_jetstream_noop_warm" && r.native == PEER_EXTISM).map(|r| r.ratio);
    targets.push(match (vs_peer, skipped.iter().find(|s| s.id == PEER_EXTISM)) {
        (None, Some(skip)) => Target {
            target: peer,
            goal: ">= 1.0×",
            measured: None,
            shown: format!("peer skipped: {}", skip.reason),
            result: "not measurable",
        },
        (measured, _) => Target {
            target: peer,
            goal: ">= 1.0×",
            measured,
            shown: measured.map_or("-".into(), |r| format!("{r:.2}×")),
            result: measured.map_or("fail", |r| pass(r >= 1.0)),
        },
    });
    let warm_p50 = added.iter().find(|a| a.who == "sluice_warm" && (a.load - 0.2).abs() < 1e-9).map(|a| a.p50_us);
    targets.push(Target {
        target: "warm echo, added p50 latency over native at 20% load (request to reply)",
        goal: "<= 100 µs",
        measured: warm_p50,
        shown: warm_p50.map_or("-".into(), |v| format!("{v:+.0} µs")),
        result: warm_p50.map_or("fail", |v| pass(v <= 100.0)),
    });
    let p99 = added.iter().find(|a| a.who == "sluice" && (a.load - 0.2).abs() < 1e-9).map(|a| a.p99_us);
    targets.push(Target {
        target: "added p99 latency over native at 20% load (request to reply, fresh instances)",
        goal: "<= 100 µs",
        measured: p99,
        shown: p99.map_or("-".into(), |v| {
            if v < 0.0 {
                format!("{v:+.0} µs (native's own tail was worse in this run: noise, not a margin)")
            } else {
                format!("{v:+.0} µs")
            }
        }),
        result: p99.map_or("fail", |v| pass(v <= 100.0)),
    });
    let twenty = |cache: &str| startup.iter().find(|s| s.handlers == 20 && s.cache == cache).map(|s| s.ready_s);
    let cold = twenty("cold").map_or("-".into(), |s| format!("{s:.2} s"));
    targets.push(match twenty("warm") {
        Some(warm) => Target {
            target: "20 handlers start (spawn to ready), warm compiled-component cache",
            goal: "< 0.5 s",
            measured: Some(warm),
            shown: format!("{warm:.2} s (cold: {cold})"),
            result: pass(warm < 0.5),
        },
        None => Target {
            target: "20 handlers start (spawn to ready), warm compiled-component cache",
            goal: "< 0.5 s",
            measured: None,
            shown: format!("warm cache not implemented yet (cold: {cold})"),
            result: "not measurable",
        },
    });

    let steal_during_run = match (machine.cpu_times_at_start, CpuTimes::now()) {
        (Some(start), Some(end)) => end.steal_share_since(start),
        _ => f64::NAN,
    };
    Results {
        command: "make bench",
        machine,
        message_bytes,
        seconds_per_measurement,
        wall_seconds,
        server_slow_consumers,
        load_average_at_end: load_average(),
        busy_after_run,
        steal_during_run,
        throughput,
        skipped,
        ratios,
        latency,
        added_latency: added,
        startup,
        reload,
        targets,
    }
}

/// Facts about this machine and checkout.
pub async fn machine(root: &Path, server: &Server) -> anyhow::Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap_or_default();
    Ok(Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default(),
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        nats_server: server.version().await?,
        git_revision: output(Command::new("git").arg("-C").arg(root).args(["rev-parse", "HEAD"]))
            .unwrap_or_else(|| "unknown".into()),
        // diff-index only reads (status would refresh the index).
        git_uncommitted_changes: Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["diff-index", "--quiet", "HEAD", "--"])
            .status()
            .map(|s| !s.success())
            .unwrap_or(false),
        rustc: output(Command::new("rustc").arg("--version")).unwrap_or_else(|| "unknown".into()),
        wasmtime: locked_version(&lock, "wasmtime"),
        async_nats: locked_version(&lock, "async-nats"),
        load_average_at_start: load_average(),
        busy_before_run: cpu_busy(Duration::from_secs(2)).await,
        cpu_times_at_start: CpuTimes::now(),
    })
}

/// All cores' time, and the parts of it spent idle and stolen by the hypervisor, from the
/// first line of /proc/stat, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    total: u64,
    idle: u64,
    steal: u64,
}

impl CpuTimes {
    pub fn now() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    fn parse(stat: &str) -> Option<CpuTimes> {
        let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal; the guest times after them are
        // already counted in user and nice.
        let [_, _, _, idle, iowait, _, _, steal] = *fields.get(..8)? else { return None };
        Some(CpuTimes { total: fields[..8].iter().sum(), idle: idle + iowait, steal })
    }

    fn since(self, start: CpuTimes) -> Option<CpuTimes> {
        let total = self.total.checked_sub(start.total).filter(|t| *t > 0)?;
        Some(CpuTimes {
            total,
            idle: self.idle.saturating_sub(start.idle),
            steal: self.steal.saturating_sub(start.steal),
        })
    }

    /// The share of the time since `start` that was stolen.
    pub fn steal_share_since(self, start: CpuTimes) -> f64 {
        self.since(start).map_or(f64::NAN, |d| d.steal as f64 / d.total as f64)
    }

    /// The share of the time since `start` that the cores were busy (not idle, not waiting
    /// for I/O).
    fn busy_share_since(self, start: CpuTimes) -> f64 {
        self.since(start).map_or(f64::NAN, |d| 1.0 - d.idle as f64 / d.total as f64)
    }
}

/// The share of all cores that were busy (not idle, not waiting for I/O) over `sample`.
pub async fn cpu_busy(sample: Duration) -> f64 {
    let before = CpuTimes::now();
    tokio::time::sleep(sample).await;
    match (before, CpuTimes::now()) {
        (Some(start), Some(end)) => end.busy_share_since(start),
        _ => f64::NAN,
    }
}

/// The 1, 5 and 15-minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub fn locked_version(lock: &str, name: &str) -> String {
    let wanted = format!("name = \"{name}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == wanted
            && let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = "))
        {
            return v.trim_matches('"').to_owned();
        }
    }
    "unknown".into()
}

/// Writes BENCHMARKS.md and results.json.
pub fn write(results: &Results, markdown_path: &Path, json_path: &Path) -> anyhow::Result<()> {
    std::fs::write(markdown_path, markdown(results))?;
    std::fs::write(json_path, serde_json::to_string_pretty(results)? + "\n")?;
    Ok(())
}

fn pct(r: f64) -> String {
    format!("{:.1}%", r * 100.0)
}

/// 1234567.8 -> "1,234,568".
fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

pub fn markdown(r: &Results) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let rev = format!(
        "{}{}",
        m.git_revision.get(..12).unwrap_or(&m.git_revision),
        if m.git_uncommitted_changes { " with uncommitted changes" } else { "" }
    );
    let _ = writeln!(s, "# Sluice benchmarks\n");
    let _ = writeln!(
        s,
        "Measured by `make bench` (the harness in [`bench/`](bench/README.md), which explains the \
         method) on {}, at revision `{rev}`. The raw numbers are in \
         [`bench/results.json`](bench/results.json). This file is generated: rerun `make bench` \
         rather than editing it. What each change to the dispatch path bought, and where the \
         time goes, is in [`bench/HISTORY.md`](bench/HISTORY.md).\n",
        m.date
    );
    let _ = writeln!(
        s,
        "Every message carries a {}-byte payload; all traffic is on 127.0.0.1. nats-server, the \
         load generator and the consumer under test (a native async-nats client or `sluice run`) \
         are separate processes sharing this machine's {} cores, so every figure includes their \
         competition for CPU: they say what this machine does with all three on it, and the \
         ratios compare Sluice and native under the same constraint. Sluice runs with its \
         defaults (`RUST_LOG=info`, `max_concurrency` 32) and a fresh instance per message, \
         except in the rows marked \"warm instances\" (`[limits] instances = \"warm\"`).\n",
        r.message_bytes, m.cores
    );

    let _ = writeln!(s, "## Machine\n\n| | |\n|---|---|");
    let _ = writeln!(s, "| CPU | {} |", m.cpu);
    let _ = writeln!(s, "| cores | {} (shared by nats-server, the load generator and the consumer) |", m.cores);
    let _ = writeln!(s, "| memory | {:.1} GiB |", m.memory_gib);
    let _ = writeln!(s, "| kernel | {} |", m.kernel);
    let _ = writeln!(s, "| nats-server | {} (JetStream, file storage in a temporary folder) |", m.nats_server);
    let _ = writeln!(s, "| Sluice revision | `{rev}` |");
    let _ = writeln!(s, "| wasmtime, async-nats | {}, {} |", m.wasmtime, m.async_nats);
    let _ = writeln!(s, "| rustc | {} |", m.rustc);
    let _ = writeln!(s, "| date | {} |", m.date);
    let _ = writeln!(
        s,
        "| other CPU use | {} of the cores busy during 2 s before the run, {} during 2 s after it (the harness idle both times: other work on the machine, which slows every figure) |",
        pct(m.busy_before_run),
        pct(r.busy_after_run)
    );
    let _ = writeln!(
        s,
        "| CPU steal | {} of the cores' time during the run went to other guests of the hypervisor (/proc/stat; it arrives in bursts and lands in latency tails) |",
        pct(r.steal_during_run)
    );
    let _ = writeln!(
        s,
        "| load average (1, 5, 15 min) | {} at the start, {} at the end |",
        m.load_average_at_start, r.load_average_at_end
    );
    let _ = writeln!(
        s,
        "| whole run | {:.0} s, {} s per throughput measurement after a warm-up |\n",
        r.wall_seconds, r.seconds_per_measurement
    );

    let _ = writeln!(s, "## Targets (issues 7 and 16)\n\n| target | goal | measured | result |\n|---|---|---|---|");
    for t in &r.targets {
        let _ = writeln!(s, "| {} | {} | {} | **{}** |", t.target, t.goal, t.shown, t.result);
    }

    let _ = writeln!(
        s,
        "\n## Throughput\n\n| scenario | transport | messages | seconds | msg/s | vs native, vs the Extism peer | consumer CPU µs/msg |\n|---|---|---:|---:|---:|---|---:|"
    );
    for t in &r.throughput {
        let vs: Vec<String> = r
            .ratios
            .iter()
            .filter(|x| x.sluice == t.id)
            .map(|x| match x.native {
                PEER_EXTISM => format!("{:.2}× `{}`", x.ratio, x.native),
                _ => format!("{} of `{}`", pct(x.ratio), x.native),
            })
            .collect();
        let vs = if vs.is_empty() { "baseline".to_owned() } else { vs.join("; ") };
        let _ = writeln!(
            s,
            "| {} (`{}`) | {} | {} | {:.2} | {} | {} | {} |",
            t.label,
            t.id,
            t.transport,
            thousands(t.messages as f64),
            t.seconds,
            thousands(t.per_sec),
            vs,
            t.consumer_cpu_us_per_msg.map_or("-".to_owned(), |c| format!("{c:.1}"))
        );
    }
    for skip in &r.skipped {
        let _ = writeln!(s, "| `{}` | {} | - | - | - | skipped: {} | - |", skip.id, skip.transport, skip.reason);
    }
    let notes: Vec<String> = r
        .throughput
        .iter()
        .flat_map(|t| t.notes.iter().map(move |n| format!("- `{}`: {n}", t.id)))
        .chain(
            r.throughput
                .iter()
                .filter_map(|t| t.redelivered.filter(|&n| n > 0).map(|n| format!("- `{}`: {n} redeliveries", t.id))),
        )
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(s, "\n{}", notes.join("\n"));
    }
    let stores: Vec<&Throughput> = r.throughput.iter().filter(|t| t.store.is_some()).collect();
    if !stores.is_empty() {
        let _ = writeln!(
            s,
            "\n### What the state store did per message\n\nFrom the counters Sluice logs at shutdown \
             (`state store counters`), over every message the measured process handled. redb: a \
             write is one commit (a message's record, kv writes and outbox entries together), a \
             transaction is one durable group commit (one fsync); nats-kv: a write is one KV \
             operation (a round trip and a write to the bucket's stream, which the server syncs on \
             its own interval).\n\n| scenario | store | reads/msg | writes/msg | fsyncs/msg | CPU µs/msg |\n|---|---|---:|---:|---:|---:|"
        );
        for t in stores {
            if let Some(c) = &t.store {
                let _ = writeln!(
                    s,
                    "| `{}` | {} | {:.2} | {:.2} | {} | {} |",
                    t.id,
                    c.store,
                    c.reads_per_msg,
                    c.writes_per_msg,
                    c.fsyncs_per_msg.map_or("n/a".to_owned(), |f| format!("{f:.3}")),
                    t.consumer_cpu_us_per_msg.map_or("-".to_owned(), |c| format!("{c:.1}"))
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\nnats-server reported {} slow consumer(s) during the run (0 means it dropped nothing).",
        r.server_slow_consumers
    );

    let _ = writeln!(s, "\n## Latency: request to reply, open loop\n");
    let _ = writeln!(
        s,
        "A paced sender publishes requests at a fixed rate whatever the replies do; each \
         128-byte payload carries its send time, and the responder (a native async-nats \
         responder, or Sluice's `echo` handler, which replies with the payload once the handler \
         has returned `Ok`: `sluice` with fresh instances, `sluice_warm` with warm ones) sends it back. Latency is publish to reply received, so it includes \
         two trips through nats-server and the requester's own client; \"added\" is Sluice minus \
         native at the same rate. The rates are 20% and 60% of Sluice echo's maximum request rate \
         measured above (fresh instances; the same rates for the warm handler). The responders take \
         turns in 4 slices each (every slice after 0.5 s of warm-up at its rate), so that a change \
         in whatever else runs on the machine hits all alike; \"seconds\" is the measured total per responder.\n"
    );
    let _ = writeln!(
        s,
        "| load | rate (req/s) | responder | seconds | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | replies |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for l in &r.latency {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {}/{} |",
            pct(l.load),
            thousands(l.offered_per_sec),
            l.who,
            l.seconds,
            l.p50_us,
            l.p90_us,
            l.p99_us,
            l.p999_us,
            l.max_us,
            thousands(l.received as f64),
            thousands(l.sent as f64)
        );
    }
    let _ = writeln!(
        s,
        "\n| load | responder | added p50 µs | added p90 µs | added p99 µs | added p99.9 µs |\n|---|---|---:|---:|---:|---:|"
    );
    for a in &r.added_latency {
        let _ = writeln!(
            s,
            "| {} | {} | {:+.0} | {:+.0} | {:+.0} | {:+.0} |",
            pct(a.load),
            a.who,
            a.p50_us,
            a.p90_us,
            a.p99_us,
            a.p999_us
        );
    }

    let _ = writeln!(
        s,
        "\n## Start-up and idle memory\n\n`sluice run DIR --nats URL` with noop handlers on core \
         subjects (each handler its own copy of the component, so its own digest and compilation), \
         from spawn to its `ready` log line (every component loaded, every subscription \
         registered), median of 3 runs; RSS is VmRSS one second after `ready`. Cold: an empty \
         data folder, so every component is compiled; warm: the folder (compiled-component \
         cache) a cold start filled.\n"
    );
    let _ = writeln!(
        s,
        "| handlers | compiled-component cache | start to ready | RSS idle | SIGTERM to exit | runs (ready, s) |\n|---:|---|---:|---:|---:|---|"
    );
    for handlers in [1, 20] {
        for cache in ["cold", "warm"] {
            let Some(st) = r.startup.iter().find(|s| s.handlers == handlers && s.cache == cache) else {
                let _ = writeln!(
                    s,
                    "| {handlers} | {cache} | **not implemented yet** (this Sluice has no compiled-component cache) | - | - | - |"
                );
                continue;
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} s | {:.1} MiB | {:.1} ms | {} |",
                st.handlers,
                if cache == "cold" { "cold (empty: everything compiled)" } else { "warm (filled by a cold start)" },
                st.ready_s,
                st.rss_kib as f64 / 1024.0,
                st.exit_s * 1000.0,
                st.ready_s_runs.iter().map(|v| format!("{v:.3}")).collect::<Vec<_>>().join(", ")
            );
        }
    }

    let _ = writeln!(
        s,
        "\n## Hot reload\n\n`sluice run` serving the `versioned` plugin on a core subject while a \
         sender publishes a message every millisecond; each round renames the other build (`v1` or \
         `v2`) over the component file and times until the first output tagged with the new \
         version arrives. This includes the watcher's 300 ms debounce (which waits for a write to \
         settle), reading and checking the component, compiling it (the first time each version \
         is seen) or loading it from the compiled-component cache, and the swap.\n"
    );
    if r.reload.is_empty() {
        let _ = writeln!(s, "(not measured in this run)");
    } else {
        let _ = writeln!(s, "| round | to | compiled | write to first message |\n|---:|---|---|---:|");
        for x in &r.reload {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} ms |",
                x.round,
                x.to,
                if x.compiled { "yes (first load)" } else { "no (cached)" },
                x.seconds * 1000.0
            );
        }
        let cached: Vec<f64> = r.reload.iter().filter(|x| !x.compiled).map(|x| x.seconds).collect();
        let compiled: Vec<f64> = r.reload.iter().filter(|x| x.compiled).map(|x| x.seconds).collect();
        let _ = writeln!(
            s,
            "\nMedian: {:.0} ms when the version is compiled, {:.0} ms when it is cached.",
            median(&compiled) * 1000.0,
            median(&cached) * 1000.0
        );
    }

    let _ = writeln!(s, "\n## How each throughput figure is measured\n");
    let mut seen = Vec::new();
    for t in &r.throughput {
        if !seen.contains(&t.method) {
            seen.push(t.method);
            let ids: Vec<String> =
                r.throughput.iter().filter(|x| x.method == t.method).map(|x| format!("`{}`", x.id)).collect();
            let _ = writeln!(s, "- {}: {}.", ids.join(", "), t.method);
        }
    }
    let _ = writeln!(
        s,
        "\nEach throughput figure follows a warm-up run of the same kind, whose rate also sizes \
         the measured run to about {} s. See [`bench/README.md`](bench/README.md) for why.",
        r.seconds_per_measurement
    );
    s
}

#[cfg(test)]
mod tests {
    use super::CpuTimes;

    #[test]
    fn cpu_times_give_busy_and_stolen_shares() {
        let start =
            CpuTimes::parse("cpu  3413060 111001 390884 1175694 14449 0 25755 26152 0 0\ncpu0 1 2 3\n").unwrap();
        let end = CpuTimes::parse("cpu  3415764 111001 391877 1179034 14522 0 25897 26388 0 0\n").unwrap();
        // 2704 + 993 + 3340 + 73 + 142 + 236 = 7488 ticks, 236 stolen, 3413 idle or waiting.
        assert!((end.steal_share_since(start) - 236.0 / 7488.0).abs() < 1e-9);
        assert!((end.busy_share_since(start) - (1.0 - 3413.0 / 7488.0)).abs() < 1e-9);
        assert!(start.steal_share_since(start).is_nan(), "no time elapsed");
        assert_eq!(CpuTimes::parse("cpu 1 2 3\n"), None, "too few fields");
    }
}
