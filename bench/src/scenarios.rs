//! Every measurement of a run, each with its warm-up. See bench/README.md for why each one is
//! measured the way it is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull, stream};
use bytes::{BufMut, Bytes, BytesMut};

use crate::latency::{self, LatencyRun};
use crate::nats::{self, Counter, Server};
use crate::process::Proc;
use crate::report::{self, PEER_EXTISM, Reload, Results, Startup, Throughput};

/// Every message is this big (the payload; NATS adds the subject and protocol framing).
pub const MESSAGE_BYTES: usize = 128;

/// The most messages sent to Sluice's core subscription at once. async-nats buffers 64 Ki
/// messages per subscription (Sluice uses the default) and drops the excess as a slow
/// consumer, so a burst or a window must stay below that.
const CORE_WINDOW: u64 = 60_000;

/// The consumer settings Sluice uses by default (README, manifest reference), for the native
/// JetStream baseline.
const MAX_ACK_PENDING: i64 = 1000;

/// Offered loads of the latency runs, as fractions of Sluice's maximum request rate.
const LATENCY_LOADS: [f64; 2] = [0.2, 0.6];

/// Each latency measurement is split into this many slices, native and Sluice alternating.
const LATENCY_TURNS: usize = 4;

/// A benchmark run: the server, the binaries, the scratch folder.
#[derive(Debug)]
pub struct Bench {
    server: Server,
    root: PathBuf,
    sluice: PathBuf,
    exe: PathBuf,
    work: tempfile::TempDir,
    logs: PathBuf,
    secs: f64,
    /// Run only the measurements whose id contains one of these (all when empty).
    only: Vec<String>,
    started: Instant,
}

impl Bench {
    pub fn new(root: PathBuf, sluice: PathBuf, secs: f64, only: Vec<String>) -> anyhow::Result<Self> {
        if !sluice.is_file() {
            bail!(
                "{} not found: build it with `cargo build --release -p sluice` (or run `make bench`)",
                sluice.display()
            );
        }
        for plugin in ["noop", "echo", "order-validator", "versioned", "versioned-v2"] {
            let wasm = root.join(format!("plugins/dist/{plugin}.wasm"));
            if !wasm.is_file() {
                bail!("{} not found: run scripts/build-plugins.sh (or `make bench`)", wasm.display());
            }
        }
        let logs = root.join("target/bench-logs");
        std::fs::create_dir_all(&logs)?;
        let server = Server::start().context("cannot start nats-server")?;
        Ok(Bench {
            server,
            exe: std::env::current_exe()?,
            sluice,
            work: tempfile::Builder::new().prefix("sluice-bench-").tempdir()?,
            logs,
            secs,
            only,
            started: Instant::now(),
            root,
        })
    }

    /// Whether the measurement `id` is part of this run (`--only`).
    fn wanted(&self, id: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| id.contains(o.as_str()))
    }

    fn say(&self, what: &str) {
        eprintln!("[{:6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    pub async fn run_all(self) -> anyhow::Result<Results> {
        let url = self.server.url();
        self.say(&format!("nats-server {} at {url}; logs in {}", self.server.version().await?, self.logs.display()));
        let machine = report::machine(&self.root, &self.server).await?;
        if machine.busy_before_run > 0.2 {
            self.say(&format!(
                "warning: {:.0}% of the CPU was busy before the run started; every figure will be lower than on an idle machine",
                machine.busy_before_run * 100.0
            ));
        }

        // Start-up first, with no traffic: 1 and 20 noop handlers, cold and warm. The cold
        // 1-handler runs also give the idle SIGTERM-to-exit time that the core noop
        // measurement subtracts.
        let mut startup = Vec::new();
        let mut exit_overhead = 0.0;
        if self.wanted("startup") || self.wanted("sluice_core_noop") {
            self.say("start-up and idle memory: 1 handler");
            let one = self.manifests("startup-1", &[self.noop_core_manifest("bench-noop")])?;
            startup = self.startup("startup_1_handler", &one, 1, 3).await?;
            exit_overhead = startup.first().map_or(0.0, |s| s.exit_s);
        }
        if self.wanted("startup") {
            self.say("start-up and idle memory: 20 handlers");
            let twenty: Vec<String> = self
                .variants("noop", 20)?
                .iter()
                .enumerate()
                .map(|(i, wasm)| {
                    manifest_with(&format!("bench-idle-{i:02}"), wasm, &format!("subject = \"bench.idle.{i}\""), "")
                })
                .collect();
            let twenty = self.manifests("startup-20", &twenty)?;
            startup.extend(self.startup("startup_20_handlers", &twenty, 20, 3).await?);
        }

        let mut reload = Vec::new();
        if self.wanted("reload") {
            self.say("hot reload: file write to first message on the new version");
            reload = self.reload().await?;
        }

        let mut throughput = Vec::new();
        if self.wanted("native_core") {
            self.say("native core subscriber");
            throughput.push(self.native_core().await?);
        }
        if self.wanted("native_jetstream") {
            self.say("native JetStream pull consumer");
            throughput.push(self.native_jetstream().await?);
        }
        let mut skipped = Vec::new();
        if self.wanted(PEER_EXTISM) {
            self.say("Extism peer: JetStream pull consumer calling a noop Extism plugin");
            match self.peer_extism_jetstream().await? {
                Ok(t) => throughput.push(t),
                Err(reason) => {
                    self.say(&format!("skipped {PEER_EXTISM}: {reason}"));
                    skipped.push(report::Skipped { id: PEER_EXTISM, transport: "jetstream", reason });
                }
            }
        }
        if self.wanted("sluice_core_noop") {
            self.say("Sluice core, noop");
            throughput.push(self.sluice_core_noop(exit_overhead, false).await?);
        }
        if self.wanted("sluice_core_noop_warm") {
            self.say("Sluice core, noop, warm instances");
            throughput.push(self.sluice_core_noop(exit_overhead, true).await?);
        }
        for case in JS_CASES.iter().filter(|c| c.plugin == "noop") {
            if self.wanted(case.id) {
                self.say(case.label);
                throughput.push(self.sluice_jetstream(case).await?);
            }
        }
        if self.wanted("sluice_core_order_validator") {
            self.say("Sluice core, order-validator");
            throughput.push(self.sluice_core_orders().await?);
        }
        for case in JS_CASES.iter().filter(|c| c.plugin != "noop") {
            if self.wanted(case.id) {
                self.say(case.label);
                throughput.push(self.sluice_jetstream(case).await?);
            }
        }
        let mut latency = Vec::new();
        if self.wanted("echo") || self.wanted("latency") {
            self.say("request/reply: native echo and Sluice echo, throughput and latency");
            let (native_echo, sluice_echo, sluice_echo_warm, runs) = self.echo().await?;
            throughput.push(native_echo);
            throughput.push(sluice_echo);
            throughput.push(sluice_echo_warm);
            latency = runs;
        }

        for lang in ["py", "js"] {
            let id = format!("sluice_core_echo_{lang}");
            if self.wanted(&id) || self.wanted(&format!("{id}_warm")) {
                self.say(&format!("request/reply: Sluice echo in {lang}, fresh and warm"));
                throughput.extend(self.echo_poly(lang).await?);
            }
        }

        let slow = self.server.slow_consumers().await?;
        let wall = self.started.elapsed().as_secs_f64();
        let busy_after = report::cpu_busy(Duration::from_secs(2)).await;
        self.say("done");
        Ok(report::results(
            machine,
            busy_after,
            MESSAGE_BYTES,
            self.secs,
            wall,
            slow,
            throughput,
            latency,
            startup,
            reload,
            skipped,
        ))
    }

    // ---- manifests and processes ----

    fn wasm(&self, plugin: &str) -> PathBuf {
        self.root.join(format!("plugins/dist/{plugin}.wasm"))
    }

    /// A manifest: handler `name` running `plugin`, with `source` lines and extra sections.
    fn manifest_text(&self, name: &str, plugin: &str, source: &str, extra: &str) -> String {
        manifest_with(name, &self.wasm(plugin), source, extra)
    }

    fn noop_core_manifest(&self, name: &str) -> String {
        self.manifest_text(name, "noop", "subject = \"bench.sluice.noop\"", "")
    }

    /// Writes manifests into a fresh folder of the scratch space.
    fn manifests(&self, folder: &str, texts: &[String]) -> anyhow::Result<PathBuf> {
        let dir = self.work.path().join(folder);
        std::fs::create_dir_all(&dir)?;
        for (i, text) in texts.iter().enumerate() {
            std::fs::write(dir.join(format!("h{i:02}.toml")), text)?;
        }
        Ok(dir)
    }

    /// Starts `sluice run DIR --nats URL` (logging at the default `info` level), with its
    /// state (compile cache, stores) in the run's scratch folder rather than the user's.
    fn spawn_sluice(&self, dir: &Path, log: &str) -> anyhow::Result<Proc> {
        self.spawn_sluice_with(dir, log, &self.work.path().join("data"))
    }

    /// Like [`spawn_sluice`](Self::spawn_sluice), with state in `data` (`SLUICE_DATA_DIR`,
    /// ignored by versions without one).
    fn spawn_sluice_with(&self, dir: &Path, log: &str, data: &Path) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(&self.sluice);
        cmd.arg("run")
            .arg(dir)
            .args(["--nats", &self.server.url()])
            .env("RUST_LOG", std::env::var("X_LOG").unwrap_or_else(|_| "info".into()))
            .env("SLUICE_DATA_DIR", data)
            .env_remove("SLUICE_NATS_URL");
        Proc::spawn(log, cmd, &self.logs.join(format!("{log}.log")))
    }

    async fn start_sluice(&self, dir: &Path, log: &str) -> anyhow::Result<Proc> {
        let mut proc = self.spawn_sluice(dir, log)?;
        proc.wait_line(is_ready, Duration::from_secs(60)).await?;
        Ok(proc)
    }

    /// Starts this binary as one of the native baselines and waits for its `ready`.
    async fn start_native(&self, role: &str, args: &[&str]) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg(role).args(["--url", &self.server.url()]).args(args);
        let mut proc = Proc::spawn(role, cmd, &self.logs.join(format!("{role}.log")))?;
        proc.wait_line(|l| l == "ready", Duration::from_secs(20)).await?;
        Ok(proc)
    }

    // ---- start-up ----

    /// Start-up of `runs` processes, each with an empty data folder (so an empty compile
    /// cache: every component compiled), then, if that filled a compiled-component cache,
    /// `runs` more reusing the last one's folder (warm cache).
    async fn startup(&self, id: &str, dir: &Path, handlers: usize, runs: usize) -> anyhow::Result<Vec<Startup>> {
        let mut cold = Vec::new();
        let mut data = PathBuf::new();
        for run in 0..runs {
            data = self.work.path().join(format!("data-{id}-{run}"));
            cold.push(self.start_once(dir, &data, &format!("{id}-cold-{run}")).await?);
        }
        let mut measured = vec![report::startup(&format!("{id}_cold"), handlers, "cold", cold)];
        if has_compiled_cache(&data) {
            let mut warm = Vec::new();
            for run in 0..runs {
                warm.push(self.start_once(dir, &data, &format!("{id}-warm-{run}")).await?);
            }
            measured.push(report::startup(&format!("{id}_warm"), handlers, "warm", warm));
        }
        Ok(measured)
    }

    /// One start: spawn to `ready`, VmRSS a second later, SIGTERM to exit.
    async fn start_once(&self, dir: &Path, data: &Path, log: &str) -> anyhow::Result<(f64, u64, f64)> {
        let mut proc = self.spawn_sluice_with(dir, log, data)?;
        let (at, _) = proc.wait_line(is_ready, Duration::from_secs(120)).await?;
        let ready = (at - proc.spawned_at).as_secs_f64();
        // Let it settle (epoch ticker, connection) before reading its memory.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = proc.rss_kib()?;
        let term = Instant::now();
        proc.terminate()?;
        let (gone, status) = proc.wait_exit(Duration::from_secs(30)).await?;
        if !status.success() {
            bail!("sluice exited with {status} after SIGTERM");
        }
        Ok((ready, rss, (gone - term).as_secs_f64()))
    }

    /// `count` copies of a plugin that differ only by a custom section, so that each has its
    /// own digest (and its own compilation and cache entry), like distinct handlers would.
    fn variants(&self, plugin: &str, count: usize) -> anyhow::Result<Vec<PathBuf>> {
        let wasm = std::fs::read(self.wasm(plugin))?;
        let dir = self.work.path().join("variants");
        std::fs::create_dir_all(&dir)?;
        (0..count)
            .map(|i| {
                let path = dir.join(format!("{plugin}-{i:02}.wasm"));
                let name = b"sluice-bench-variant";
                let content = format!("{i:02}");
                let size = 1 + name.len() + content.len();
                let mut bytes = wasm.clone();
                // A custom section (id 0): size, name length, name, content; all below 128,
                // so each LEB128 length is one byte.
                bytes.extend_from_slice(&[0, size as u8, name.len() as u8]);
                bytes.extend_from_slice(name);
                bytes.extend_from_slice(content.as_bytes());
                std::fs::write(&path, bytes)?;
                Ok(path)
            })
            .collect()
    }

    // ---- hot reload ----

    /// Time from replacing a running handler's component file to the first message handled
    /// by the new version. `sluice run` watches the folder; a sender publishes a message on
    /// the handler's core subject every millisecond; the `versioned` plugin tags each output
    /// with its build (`v1` or `v2`). Each round renames the other build over the component
    /// (how a deploy should write it: whole, in one step) and waits for its first output.
    /// The first round compiles v2; v1 was compiled at start-up, and later rounds find
    /// both in the compiled-component cache.
    async fn reload(&self) -> anyhow::Result<Vec<Reload>> {
        const ROUNDS: usize = 8;
        let dir = self.work.path().join("reload");
        std::fs::create_dir_all(&dir)?;
        let component = dir.join("versioned.wasm");
        let builds = [std::fs::read(self.wasm("versioned"))?, std::fs::read(self.wasm("versioned-v2"))?];
        std::fs::write(&component, &builds[0])?;
        let subject = "bench.reload.in";
        let extra = "\n[capabilities]\npublish = [\"versioned.out\"]\n";
        let manifest = manifest_with("bench-reload", &component, &format!("subject = \"{subject}\""), extra);
        std::fs::write(dir.join("reload.toml"), manifest)?;
        let proc = self.start_sluice(&dir, "sluice-reload").await?;

        let client = nats::connect(&self.server.url(), "bench-reload").await?;
        let mut outputs = client.subscribe("versioned.out").await?;
        client.flush().await?;
        let sender_client = client.clone();
        let sender = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            for seq in 0u64.. {
                tick.tick().await;
                if sender_client.publish(subject, Bytes::from(seq.to_le_bytes().to_vec())).await.is_err() {
                    break;
                }
            }
        });

        let mut rounds = Vec::new();
        let result = async {
            // v1 serves before the first swap.
            wait_version(&mut outputs, "v1", Duration::from_secs(20)).await?;
            for round in 0..ROUNDS {
                let (version, build) = if round % 2 == 0 { ("v2", &builds[1]) } else { ("v1", &builds[0]) };
                // Staged a second ahead, so that the staging write's own file events are
                // behind the watcher; the clock starts at the rename.
                let staged = dir.join(".versioned.wasm.new");
                std::fs::write(&staged, build)?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let written = Instant::now();
                std::fs::rename(&staged, &component)?;
                let seen = wait_version(&mut outputs, version, Duration::from_secs(30)).await?;
                rounds.push(Reload {
                    round: round + 1,
                    to: version,
                    compiled: round == 0,
                    seconds: (seen - written).as_secs_f64(),
                });
                // Let the old version's last calls drain before the next swap.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            anyhow::Ok(())
        }
        .await;
        sender.abort();
        self.stop(proc).await?;
        result?;
        Ok(rounds)
    }

    // ---- throughput: native ----

    async fn native_core(&self) -> anyhow::Result<Throughput> {
        let subject = "bench.native.core";
        let mut child = self.start_native("native-count", &["--subject", subject]).await?;
        let client = nats::connect(&self.server.url(), "bench-publisher").await?;
        let warm = 200_000;
        let d = native_count_round(&mut child, &client, subject, warm, 60.0).await?;
        let n = calibrate(warm as f64 / d.as_secs_f64(), self.secs, 200_000, 5_000_000);
        let ticks = child.cpu_ticks()?;
        let d = native_count_round(&mut child, &client, subject, n, 120.0).await?;
        let cpu = child.cpu_ticks()? - ticks;
        Ok(Throughput::new("native_core", "native core subscriber, counts (async-nats, no handler)", "core", "-", n, d)
            .how(warm, "burst: publish N as fast as possible, time until the subscriber has counted N")
            .cpu(cpu))
    }

    async fn native_jetstream(&self) -> anyhow::Result<Throughput> {
        let (name, subject, durable) = ("BENCH_NATIVE", "bench.native.js", "native");
        let js = jetstream::new(nats::connect(&self.server.url(), "bench-js").await?);
        let stream = nats::create_stream(&js, name, subject).await?;
        create_pull_consumer(&stream, durable).await?;
        let run = JsRun {
            js: &js,
            stream: &stream,
            consumer: durable,
            subject,
            counter: None,
            who: JsConsumer::Native { stream: name },
        };
        let m = self.js_measure(&run, (20_000, 20_000, 1_000_000), &blob).await?;
        let _ = js.delete_stream(name).await;
        let mut t = Throughput::new(
            "native_jetstream",
            "native JetStream durable pull consumer, acks each (async-nats, no handler)",
            "jetstream",
            "-",
            m.messages,
            m.took,
        )
        .how(m.warmup, JS_METHOD)
        .cpu(m.cpu_ticks);
        t.redelivered = Some(m.redelivered);
        Ok(t)
    }

    /// The Extism peer (bench/peer-extism): an async-nats pull consumer that calls a noop
    /// plugin through Extism, one long-lived plugin per worker, and acks each message. Its
    /// consumer is created by the harness with the native baseline's settings, and it is
    /// measured like the native baseline. `Ok(Err(reason))` when the peer is not built.
    async fn peer_extism_jetstream(&self) -> anyhow::Result<Result<Throughput, String>> {
        let peer = self.peer_extism();
        for file in [&peer.binary, &peer.plugin] {
            if !file.is_file() {
                return Ok(Err(format!(
                    "{} not found: build the peer with bench/peer-extism/build.sh (`make bench` does)",
                    file.strip_prefix(&self.root).unwrap_or(file).display()
                )));
            }
        }
        let (name, subject, durable) = ("BENCH_PEER_EXTISM", "bench.peer.extism.js", "peer-extism");
        let js = jetstream::new(nats::connect(&self.server.url(), "bench-js").await?);
        let stream = nats::create_stream(&js, name, subject).await?;
        create_pull_consumer(&stream, durable).await?;
        let run = JsRun {
            js: &js,
            stream: &stream,
            consumer: durable,
            subject,
            counter: None,
            who: JsConsumer::Peer { stream: name, peer: &peer },
        };
        let m = self.js_measure(&run, (20_000, 20_000, 1_000_000), &blob).await?;
        let _ = js.delete_stream(name).await;
        let mut t = Throughput::new(
            PEER_EXTISM,
            "Extism peer: async-nats pull consumer, noop plugin through Extism, one long-lived plugin per worker, acks each",
            "jetstream",
            "noop (Extism)",
            m.messages,
            m.took,
        )
        .how(m.warmup, JS_METHOD)
        .cpu(m.cpu_ticks);
        t.redelivered = Some(m.redelivered);
        t.notes.push(format!(
            "{} workers, each with its own plugin instance, on a tokio runtime with one thread per core; \
             extism {} on wasmtime {} (Sluice's wasmtime is in the machine table)",
            peer.workers,
            report::locked_version(&peer.lock, "extism"),
            report::locked_version(&peer.lock, "wasmtime"),
        ));
        Ok(Ok(t))
    }

    /// Where bench/peer-extism/build.sh puts the peer and its plugin.
    fn peer_extism(&self) -> PeerExtism {
        let dir = self.root.join("bench/peer-extism");
        PeerExtism {
            binary: dir.join("target/release/peer-extism"),
            plugin: dir.join("target/noop.wasm"),
            lock: std::fs::read_to_string(dir.join("Cargo.lock")).unwrap_or_default(),
            workers: sluice::manifest::DEFAULT_MAX_CONCURRENCY as usize,
        }
    }

    /// Starts the Extism peer on `stream`'s durable `consumer` and waits for its `ready`
    /// (every worker's plugin instantiated).
    async fn start_peer(&self, peer: &PeerExtism, stream: &str, consumer: &str, phase: &str) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(&peer.binary);
        cmd.args(["--url", &self.server.url(), "--stream", stream, "--consumer", consumer])
            .arg("--plugin")
            .arg(&peer.plugin)
            .args(["--function", "noop", "--workers", &peer.workers.to_string()]);
        let mut proc = Proc::spawn("peer-extism", cmd, &self.logs.join(format!("peer-extism-{phase}.log")))?;
        proc.wait_line(|l| l == "ready", Duration::from_secs(60)).await?;
        Ok(proc)
    }

    /// Times a JetStream consumer on messages stored before it starts. First a calibration
    /// run (pre-load `warm`, start the consumer, time until drained, stop it) sizes the
    /// measurement; then `warm + n` are pre-loaded with nothing consuming, a fresh consumer
    /// process starts, and the time runs from when its ack floor passes the first `warm`
    /// (its warm-up) until the consumer has nothing pending and nothing awaiting an ack.
    async fn js_measure(
        &self,
        run: &JsRun<'_>,
        (warm, min, max): (u64, u64, u64),
        payload: &impl Fn(u64) -> Bytes,
    ) -> anyhow::Result<JsMeasured> {
        let (stream, consumer) = (run.stream, run.consumer);
        // The stream is new: the calibration messages are sequences 1..=warm.
        nats::preload(run.js, run.subject, 0, warm, payload).await?;
        let proc = self.start_js_consumer(run, "calibration").await?;
        let t0 = Instant::now();
        let (t1, _) = nats::wait_drained(stream, consumer, Duration::from_secs(180)).await?;
        self.stop(proc).await?;
        let n = calibrate(warm as f64 / (t1 - t0).as_secs_f64(), self.secs, min, max);

        let total = warm + n;
        // Payloads the calibration did not use: with idempotency keyed by the payload, a
        // repeated one would warm up the duplicate path instead of the first-delivery one.
        nats::preload(run.js, run.subject, warm, total, payload).await?;
        let info = nats::consumer_info(stream, consumer).await?;
        if info.num_pending != total {
            bail!("consumer {consumer} has {} pending after pre-loading {total}", info.num_pending);
        }
        let done = run.counter.map(|c| c.expect(total)).transpose()?;
        let proc = self.start_js_consumer(run, "measured").await?;
        let warmed_up = warm + warm;
        let limit = Instant::now() + Duration::from_secs(180);
        let mut start: Option<(Instant, u64)> = None;
        let (end, ticks, info) = loop {
            let info = nats::consumer_info(stream, consumer).await?;
            let now = Instant::now();
            if start.is_none() && info.ack_floor.stream_sequence >= warmed_up {
                start = Some((now, proc.cpu_ticks()?));
            }
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                break (now, proc.cpu_ticks()?, info);
            }
            if now > limit {
                bail!(
                    "consumer {consumer} not drained after 180 s: {} pending, {} awaiting an ack",
                    info.num_pending,
                    info.num_ack_pending
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let (start, start_ticks) = start.unwrap_or((end, ticks));
        if let (Some(done), Some(counter)) = (done, run.counter) {
            nats::wait_count(done, counter, total, Duration::from_secs(10)).await?;
        }
        self.stop(proc).await?;
        Ok(JsMeasured {
            warmup: warm,
            messages: n,
            handled: total,
            took: end - start,
            cpu_ticks: ticks - start_ticks,
            redelivered: info.num_redelivered as u64,
        })
    }

    async fn start_js_consumer(&self, run: &JsRun<'_>, phase: &str) -> anyhow::Result<Proc> {
        match &run.who {
            JsConsumer::Native { stream } => {
                self.start_native("native-pull", &["--stream", stream, "--consumer", run.consumer]).await
            }
            JsConsumer::Sluice { dir } => self.start_sluice(dir, &format!("sluice-{}-{phase}", run.consumer)).await,
            JsConsumer::Peer { stream, peer } => self.start_peer(peer, stream, run.consumer, phase).await,
        }
    }

    /// SIGTERM, and wait for the exit.
    async fn stop(&self, mut proc: Proc) -> anyhow::Result<()> {
        proc.terminate()?;
        proc.wait_exit(Duration::from_secs(60)).await?;
        Ok(())
    }

    // ---- throughput: Sluice ----

    /// Core noop: the handler has no output, so completion is observed through Sluice's
    /// graceful shutdown, which handles every message already delivered before it exits.
    async fn sluice_core_noop(&self, exit_overhead: f64, warm: bool) -> anyhow::Result<Throughput> {
        let subject = "bench.sluice.noop";
        let (id, label, name) = match warm {
            false => ("sluice_core_noop", "Sluice, core subject, noop handler", "core-noop"),
            true => ("sluice_core_noop_warm", "Sluice, core subject, noop handler, warm instances", "core-noop-warm"),
        };
        let limits = if warm { WARM } else { "" };
        let manifest = self.manifest_text("bench-noop", "noop", &format!("subject = \"{subject}\""), limits);
        let dir = self.manifests(name, &[manifest])?;
        let mut proc = self.start_sluice(&dir, name).await?;
        let client = nats::connect(&self.server.url(), "bench-publisher").await?;

        // Warm-up: a burst, then wait until Sluice has used no CPU for 100 ms. That also
        // gives a rough rate, to size the measured burst.
        let warm = 5_000;
        let t0 = Instant::now();
        nats::publish_burst(&client, subject, None, warm, &blob).await?;
        let last_busy = proc.wait_idle(Duration::from_millis(100), Duration::from_secs(60)).await?;
        let rough = warm as f64 / (last_busy - t0).as_secs_f64();
        let n = calibrate(rough, self.secs, 5_000, CORE_WINDOW);

        let slow_before = self.server.slow_consumers().await?;
        let (out_before, _) = self.server.connection("sluice").await?;
        let t0 = Instant::now();
        nats::publish_burst(&client, subject, None, n, &blob).await?;
        // Every message written to Sluice's socket, nothing held back by the server...
        let limit = Instant::now() + Duration::from_secs(30);
        loop {
            let (out, pending) = self.server.connection("sluice").await?;
            if out - out_before >= n && pending == 0 {
                break;
            }
            if Instant::now() > limit {
                bail!("the server did not deliver {n} messages to sluice within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // ...and read by its client (what is still in the socket buffers takes a few ms).
        let ticks = proc.cpu_ticks()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let still_busy = proc.cpu_ticks()? != ticks;
        let term = Instant::now();
        proc.terminate()?;
        let (gone, status) = proc.wait_exit(Duration::from_secs(120)).await?;
        if !status.success() {
            bail!("sluice exited with {status} after SIGTERM");
        }
        let slow_after = self.server.slow_consumers().await?;
        if slow_after != slow_before {
            bail!("nats-server saw a slow consumer during the core noop run: messages were lost");
        }
        let elapsed = (gone - t0).as_secs_f64() - exit_overhead;
        let mut t = Throughput::new(id, label, "core", "noop", n, Duration::from_secs_f64(elapsed.max(1e-6)))
            .how(warm, DRAIN_METHOD);
        t.notes.push(format!(
            "SIGTERM sent {:.0} ms after the first publish; idle exit time subtracted: {:.1} ms",
            (term - t0).as_secs_f64() * 1000.0,
            exit_overhead * 1000.0
        ));
        if !still_busy {
            t.notes.push("sluice was already idle when SIGTERM was sent: the rate is a lower bound".into());
        }
        Ok(t)
    }

    async fn sluice_core_orders(&self) -> anyhow::Result<Throughput> {
        let subject = "bench.sluice.orders";
        let dir = self.manifests(
            "core-orders",
            &[self.manifest_text("bench-orders", "order-validator", &format!("subject = \"{subject}\""), ORDERS_EXTRA)],
        )?;
        let proc = self.start_sluice(&dir, "sluice-core-orders").await?;
        let (n, d, warm, cpu) =
            self.counted(&proc, subject, "orders.validated", false, (5_000, 5_000, 1_000_000), &order).await?;
        Ok(Throughput::new(
            "sluice_core_order_validator",
            "Sluice, core subject, order-validator (JSON parse + publish)",
            "core",
            "order-validator",
            n,
            d,
        )
        .how(warm, COUNTED_METHOD)
        .cpu(cpu))
    }

    /// A JetStream handler (Sluice creates its consumer when it starts), measured as
    /// [`js_measure`](Self::js_measure) says.
    async fn sluice_jetstream(&self, case: &JsCase) -> anyhow::Result<Throughput> {
        let js = jetstream::new(nats::connect(&self.server.url(), "bench-js").await?);
        let stream = nats::create_stream(&js, case.stream, case.subject).await?;
        let handler = format!("bench-{}", case.id.replace('_', "-"));
        let orders = case.plugin == "order-validator";
        let extra = match (orders, case.dedup_store) {
            (true, _) => ORDERS_EXTRA.to_owned(),
            (false, Some(DEFAULT_STORE)) => DEDUP.to_owned(),
            (false, Some(backend)) => format!("{DEDUP}\n[store]\nbackend = \"{backend}\"\n"),
            (false, None) => String::new(),
        } + case.limits;
        let dir = self.manifests(
            &format!("js-{}", case.id),
            &[self.manifest_text(&handler, case.plugin, &format!("stream = \"{}\"", case.stream), &extra)],
        )?;
        let observer = nats::connect(&self.server.url(), "bench-observer").await?;
        let counter = if orders { Some(Counter::start(&observer, "orders.validated").await?) } else { None };
        let run = JsRun {
            js: &js,
            stream: &stream,
            consumer: &handler,
            subject: case.subject,
            counter: counter.as_ref(),
            who: JsConsumer::Sluice { dir },
        };
        let payload = if orders {
            order
        } else if case.limits.contains("[ordering]") {
            keyed
        } else {
            blob
        };
        let m = self.js_measure(&run, (5_000, 5_000, 500_000), &payload).await?;
        let _ = js.delete_stream(case.stream).await;
        let mut t = Throughput::new(case.id, case.label, "jetstream", case.plugin, m.messages, m.took)
            .how(m.warmup, JS_METHOD)
            .cpu(m.cpu_ticks);
        t.redelivered = Some(m.redelivered);
        if case.dedup_store.is_some() {
            let log = self.logs.join(format!("sluice-{handler}-measured.log"));
            t.store = store_cost(&std::fs::read_to_string(&log).unwrap_or_default(), m.handled);
        }
        Ok(t)
    }

    /// Request/reply: native echo and Sluice's echo handler, maximum rate (replies counted),
    /// then latency at fixed fractions of Sluice's maximum, for both.
    async fn echo(&self) -> anyhow::Result<(Throughput, Throughput, Throughput, Vec<LatencyRun>)> {
        let native_subject = "bench.native.echo";
        let sluice_subject = "bench.sluice.echo";
        let warm_subject = "bench.sluice.echo.warm";
        let native_proc = self.start_native("native-echo", &["--subject", native_subject]).await?;
        let dir = self.manifests(
            "core-echo",
            // The benchmark counts replies on fixed subjects, not inboxes, so it accepts those.
            &[
                self.manifest_text(
                    "bench-echo",
                    "echo",
                    &format!("subject = \"{sluice_subject}\""),
                    "[capabilities]\nreply_to = [\"bench.echo.replies\", \"bench.latency.replies\"]",
                ),
                self.manifest_text(
                    "bench-echo-warm",
                    "echo",
                    &format!("subject = \"{warm_subject}\""),
                    &format!("[capabilities]\nreply_to = [\"bench.echo.replies\", \"bench.latency.replies\"]\n{WARM}"),
                ),
            ],
        )?;
        let sluice_proc = self.start_sluice(&dir, "sluice-core-echo").await?;

        let (n, d, warm, cpu) = self
            .counted(&native_proc, native_subject, "bench.echo.replies", true, (20_000, 20_000, 2_000_000), &blob)
            .await?;
        let native = Throughput::new(
            "native_echo",
            "native core request/reply responder (async-nats, replies with the payload)",
            "core",
            "-",
            n,
            d,
        )
        .how(warm, COUNTED_METHOD)
        .cpu(cpu);
        let (n, d, warm, cpu) = self
            .counted(&sluice_proc, sluice_subject, "bench.echo.replies", true, (5_000, 5_000, 1_000_000), &blob)
            .await?;
        let sluice = Throughput::new(
            "sluice_core_echo",
            "Sluice, core request/reply, echo handler (replies with the payload)",
            "core",
            "echo",
            n,
            d,
        )
        .how(warm, COUNTED_METHOD)
        .cpu(cpu);
        // The same handler with warm instances, in the same process (its CPU ticks include
        // the idle fresh handler's, which is nothing).
        let (n, d, warm, cpu) = self
            .counted(&sluice_proc, warm_subject, "bench.echo.replies", true, (5_000, 5_000, 1_000_000), &blob)
            .await?;
        let sluice_warm = Throughput::new(
            "sluice_core_echo_warm",
            "Sluice, core request/reply, echo handler, warm instances",
            "core",
            "echo",
            n,
            d,
        )
        .how(warm, COUNTED_METHOD)
        .cpu(cpu);

        let mut runs = Vec::new();
        let max = sluice.per_sec;
        for load in LATENCY_LOADS {
            let rate = max * load;
            // Enough samples for a meaningful p99.9, within a few seconds.
            let measure = (20_000.0 / rate).clamp(4.0, 8.0);
            self.say(&format!(
                "latency at {:.0}% ({rate:.0} req/s): native, sluice and sluice warm in turn, {measure:.0} s each",
                load * 100.0
            ));
            // Native and Sluice take turns, in LATENCY_TURNS slices each, so that a change in
            // whatever else runs on the machine hits both alike.
            let spec = latency::Spec {
                rate,
                warmup: Duration::from_millis(500),
                measure: Duration::from_secs_f64(measure / LATENCY_TURNS as f64),
                size: MESSAGE_BYTES,
            };
            let mut native = latency::Samples::default();
            let mut sluice = latency::Samples::default();
            let mut warm = latency::Samples::default();
            for _ in 0..LATENCY_TURNS {
                native.extend(latency::sample(&self.server.url(), native_subject, &spec).await?);
                sluice.extend(latency::sample(&self.server.url(), sluice_subject, &spec).await?);
                warm.extend(latency::sample(&self.server.url(), warm_subject, &spec).await?);
            }
            runs.push(latency::summarize("native", load, rate, measure, native));
            runs.push(latency::summarize("sluice", load, rate, measure, sluice));
            runs.push(latency::summarize("sluice_warm", load, rate, measure, warm));
        }
        Ok((native, sluice, sluice_warm, runs))
    }

    /// Request/reply with the echo handler's Python or JavaScript twin (`plugins/echo-py`,
    /// `plugins/echo-js`), fresh and warm instances, one process: what an interpreter in the
    /// component costs per call (a fresh instance restores its whole snapshotted heap).
    async fn echo_poly(&self, lang: &str) -> anyhow::Result<Vec<Throughput>> {
        let plugin = format!("echo-{lang}");
        let fresh_subject = format!("bench.sluice.echo.{lang}");
        let warm_subject = format!("bench.sluice.echo.{lang}.warm");
        // The interpreter needs more memory than a Rust handler (as manifests/*-py.toml say).
        let limits = "[limits]\nmemory = \"64MiB\"\n";
        let dir = self.manifests(
            &format!("core-echo-{lang}"),
            &[
                self.manifest_text(
                    &format!("bench-echo-{lang}"),
                    &plugin,
                    &format!("subject = \"{fresh_subject}\""),
                    &format!("{limits}[capabilities]\nreply_to = [\"bench.echo.replies\"]\n"),
                ),
                self.manifest_text(
                    &format!("bench-echo-{lang}-warm"),
                    &plugin,
                    &format!("subject = \"{warm_subject}\""),
                    &format!("{limits}instances = \"warm\"\n[capabilities]\nreply_to = [\"bench.echo.replies\"]\n"),
                ),
            ],
        )?;
        let proc = self.start_sluice(&dir, &format!("sluice-core-echo-{lang}")).await?;
        // (id, label, handler) of the fresh and the warm row.
        let rows: [(&'static str, &'static str, bool); 2] = match lang {
            "py" => [
                ("sluice_core_echo_py", "Sluice, core request/reply, echo handler in Python", false),
                (
                    "sluice_core_echo_py_warm",
                    "Sluice, core request/reply, echo handler in Python, warm instances",
                    true,
                ),
            ],
            _ => [
                ("sluice_core_echo_js", "Sluice, core request/reply, echo handler in JavaScript", false),
                (
                    "sluice_core_echo_js_warm",
                    "Sluice, core request/reply, echo handler in JavaScript, warm instances",
                    true,
                ),
            ],
        };
        let handler: &'static str = if lang == "py" { "echo-py" } else { "echo-js" };
        let mut measured = Vec::new();
        for (id, label, warm) in rows {
            if !self.wanted(id) {
                continue;
            }
            let subject = if warm { &warm_subject } else { &fresh_subject };
            // A fresh Python or JavaScript call takes about a millisecond: smaller counts
            // than the Rust echo's.
            let counts = if warm { (2_000, 5_000, 1_000_000) } else { (500, 1_000, 200_000) };
            let (n, d, warmup, cpu) = self.counted(&proc, subject, "bench.echo.replies", true, counts, &blob).await?;
            measured.push(Throughput::new(id, label, "core", handler, n, d).how(warmup, COUNTED_METHOD).cpu(cpu));
        }
        Ok(measured)
    }

    /// Sends to `subject` and counts what arrives on `counted` (replies when `request`,
    /// otherwise a handler's outputs) while `proc` consumes: a warm-up of `warm` messages,
    /// then about `secs` worth, between `min` and `max`. Returns the messages, the time, the
    /// warm-up and the consumer's CPU ticks.
    async fn counted(
        &self,
        proc: &Proc,
        subject: &str,
        counted: &str,
        request: bool,
        (warm, min, max): (u64, u64, u64),
        payload: &impl Fn(u64) -> Bytes,
    ) -> anyhow::Result<(u64, Duration, u64, u64)> {
        let observer = nats::connect(&self.server.url(), "bench-observer").await?;
        let counter = Counter::start(&observer, counted).await?;
        let client = nats::connect(&self.server.url(), "bench-publisher").await?;
        let reply = request.then_some(counted);
        let round = |n: u64| {
            let (counter, client) = (&counter, &client);
            async move {
                let done = counter.expect(n)?;
                let t0 = Instant::now();
                nats::publish_windowed(client, subject, reply, n, CORE_WINDOW, counter, payload).await?;
                let t1 = nats::wait_count(done, counter, n, Duration::from_secs(120)).await?;
                anyhow::Ok(t1 - t0)
            }
        };
        let d = round(warm).await?;
        let n = calibrate(warm as f64 / d.as_secs_f64(), self.secs, min, max);
        let ticks = proc.cpu_ticks()?;
        let d = round(n).await?;
        Ok((n, d, warm, proc.cpu_ticks()? - ticks))
    }
}

const COUNTED_METHOD: &str = "publish N with at most 60,000 unanswered (below the 64 Ki-message \
    subscription buffer), time until the N-th reply/output is counted";

const DRAIN_METHOD: &str = "burst of N (below the 64 Ki-message subscription buffer), SIGTERM \
    once the server has delivered all N to sluice, time from the first publish until sluice has \
    exited (its graceful shutdown handles every delivered message first) minus its idle \
    SIGTERM-to-exit time";

const JS_METHOD: &str = "pre-load W + N into the stream with nothing consuming, start the consumer \
    process, time from when its ack floor passes the first W (its warm-up) until the consumer \
    reports nothing pending and nothing awaiting an ack (W and N sized by a calibration run)";

/// The example manifest's settings (manifests/order-validator.toml).
const ORDERS_EXTRA: &str = "\n[limits]\nmemory = \"32MiB\"\ntimeout = \"2s\"\nmax_concurrency = 32\n\n\
    [capabilities]\npublish = [\"orders.validated\"]\n\n[config]\ncurrency = \"EUR\"\n";

/// Waits for the first output tagged `version`, and says when it arrived.
async fn wait_version(outputs: &mut async_nats::Subscriber, version: &str, limit: Duration) -> anyhow::Result<Instant> {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let msg = tokio::time::timeout_at(deadline, outputs.next())
            .await
            .map_err(|_| anyhow::anyhow!("no output from version {version} within {limit:?}"))?
            .ok_or_else(|| anyhow::anyhow!("the output subscription ended"))?;
        if msg.headers.as_ref().and_then(|h| h.get("Version")).map(|v| v.as_str()) == Some(version) {
            return Ok(Instant::now());
        }
    }
}

/// A Sluice JetStream measurement: which handler, on which stream, with which manifest
/// sections.
struct JsCase {
    id: &'static str,
    label: &'static str,
    plugin: &'static str,
    stream: &'static str,
    subject: &'static str,
    /// With host idempotency on this store backend.
    dedup_store: Option<&'static str>,
    /// Extra manifest sections (warm instances).
    limits: &'static str,
}

/// The `[limits]` of the warm rows.
const WARM: &str = "\n[limits]\ninstances = \"warm\"\n";

/// The ordered row: warm, and one key at a time per key of [`keyed`]'s payloads.
const ORDERED_WARM: &str = "\n[limits]\ninstances = \"warm\"\n\n[ordering]\nkey = \"json:/k\"\n";

/// The Sluice JetStream measurements, in the order they run: the noop handler bare, then with
/// host idempotency on each dedup store (a key per message, so every message is looked up,
/// leased and marked completed: the full cost of dedup), then order-validator.
const JS_CASES: &[JsCase] = &[
    JsCase {
        id: "sluice_jetstream_noop",
        label: "Sluice, JetStream, noop handler",
        plugin: "noop",
        stream: "BENCH_SLUICE_NOOP",
        subject: "bench.sluice.js.noop",
        dedup_store: None,
        limits: "",
    },
    JsCase {
        id: "sluice_jetstream_noop_warm",
        label: "Sluice, JetStream, noop handler, warm instances",
        plugin: "noop",
        stream: "BENCH_SLUICE_NOOP_WARM",
        subject: "bench.sluice.js.noop.warm",
        dedup_store: None,
        limits: WARM,
    },
    JsCase {
        id: "sluice_jetstream_noop_dedup_memory",
        label: "Sluice, JetStream, noop handler, idempotency on the memory store",
        plugin: "noop",
        stream: "BENCH_SLUICE_DEDUP_MEMORY",
        subject: "bench.sluice.js.dedup.memory",
        dedup_store: Some("memory"),
        limits: "",
    },
    JsCase {
        id: "sluice_jetstream_noop_dedup_redb",
        label: "Sluice, JetStream, noop handler, idempotency on the redb store",
        plugin: "noop",
        stream: "BENCH_SLUICE_DEDUP_REDB",
        subject: "bench.sluice.js.dedup.redb",
        dedup_store: Some("redb"),
        limits: "",
    },
    JsCase {
        id: "sluice_jetstream_noop_dedup_nats_kv",
        label: "Sluice, JetStream, noop handler, idempotency on the nats-kv store",
        plugin: "noop",
        stream: "BENCH_SLUICE_DEDUP_KV",
        subject: "bench.sluice.js.dedup.kv",
        dedup_store: Some("nats-kv"),
        limits: "",
    },
    JsCase {
        id: "sluice_jetstream_noop_dedup_local",
        label: "Sluice, JetStream, noop handler, idempotency on the default embedded store",
        plugin: "noop",
        stream: "BENCH_SLUICE_DEDUP_LOCAL",
        subject: "bench.sluice.js.dedup.local",
        dedup_store: Some(DEFAULT_STORE),
        limits: "",
    },
    JsCase {
        id: "sluice_jetstream_noop_dedup_local_warm",
        label: "Sluice, JetStream, noop handler, idempotency on the default embedded store, warm instances",
        plugin: "noop",
        stream: "BENCH_SLUICE_DEDUP_LOCAL_WARM",
        subject: "bench.sluice.js.dedup.local.warm",
        dedup_store: Some(DEFAULT_STORE),
        limits: WARM,
    },
    JsCase {
        id: "sluice_jetstream_noop_dedup_nats_kv_warm",
        label: "Sluice, JetStream, noop handler, idempotency on the nats-kv store, warm instances",
        plugin: "noop",
        stream: "BENCH_SLUICE_DEDUP_KV_WARM",
        subject: "bench.sluice.js.dedup.kv.warm",
        dedup_store: Some("nats-kv"),
        limits: WARM,
    },
    JsCase {
        id: "sluice_jetstream_ordered_warm",
        label: "Sluice, JetStream, noop handler, warm instances, ordered by a key (1,000 keys)",
        plugin: "noop",
        stream: "BENCH_SLUICE_ORDERED_WARM",
        subject: "bench.sluice.js.ordered.warm",
        dedup_store: None,
        limits: ORDERED_WARM,
    },
    JsCase {
        id: "sluice_jetstream_order_validator",
        label: "Sluice, JetStream, order-validator (JSON parse + publish)",
        plugin: "order-validator",
        stream: "BENCH_SLUICE_ORDERS",
        subject: "bench.sluice.js.orders",
        dedup_store: None,
        limits: "",
    },
];

/// The `_dedup_local` rows: no `[store]` section, so the default embedded store.
const DEFAULT_STORE: &str = "default";

/// Host idempotency keyed by the payload's SHA-256 (every benchmark payload is distinct).
const DEDUP: &str = "[idempotency]\nkey = \"payload-sha256\"\n";

/// A manifest: handler `name` running the component `wasm`, with `source` lines and extra
/// sections.
fn manifest_with(name: &str, wasm: &Path, source: &str, extra: &str) -> String {
    let component = serde_json::to_string(&wasm.display().to_string()).unwrap_or_default();
    format!("[handler]\nname = \"{name}\"\ncomponent = {component}\n\n[source]\n{source}\n{extra}")
}

/// The store's work per message, from the last `state store counters` line of a Sluice log
/// (`store="redb" reads=.. writes=.. transactions=..`) and the messages that process handled.
fn store_cost(log: &str, handled: u64) -> Option<report::StoreCost> {
    let line = log.lines().rev().find(|l| l.contains("state store counters"))?;
    let field = |name: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.trim_matches('"').parse().ok())
    };
    let store =
        line.split_whitespace().find_map(|w| w.strip_prefix("store=")).map(|v| v.trim_matches('"').to_owned())?;
    let per = |v: f64| v / handled.max(1) as f64;
    Some(report::StoreCost {
        reads_per_msg: per(field("reads")?),
        writes_per_msg: per(field("writes")?),
        fsyncs_per_msg: field("transactions").map(per),
        store,
    })
}

/// Whether a data folder holds compiled components (`*.cwasm`, or anything under
/// `compiled/`): the compiled-component cache exists in this version of Sluice.
fn has_compiled_cache(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let path = e.path();
        if path.is_dir() {
            has_compiled_cache(&path)
        } else {
            path.extension().is_some_and(|x| x == "cwasm")
                || path.parent().and_then(Path::file_name).is_some_and(|n| n == "compiled")
        }
    })
}

/// `sluice run` logs `ready; stop with Ctrl-C or SIGTERM` once every handler is subscribed.
fn is_ready(line: &str) -> bool {
    line.contains(" ready")
}

/// Messages for about `secs` at `rate`, within bounds, rounded to a thousand.
fn calibrate(rate: f64, secs: f64, min: u64, max: u64) -> u64 {
    let n = (rate * secs) as u64;
    (n.clamp(min, max) / 1000).max(1) * 1000
}

/// A 128-byte opaque payload.
fn blob(seq: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(MESSAGE_BYTES);
    b.put_u64_le(seq);
    b.resize(MESSAGE_BYTES, b'x');
    b.freeze()
}

/// A 128-byte JSON payload whose `k` is one of 1,000 ordering keys (round robin).
fn keyed(seq: u64) -> Bytes {
    let head = format!(r#"{{"k":"{:03}","pad":""#, seq % 1000);
    let pad = MESSAGE_BYTES.saturating_sub(head.len() + 2);
    Bytes::from(format!("{head}{}\"}}", "x".repeat(pad)))
}

/// A valid 128-byte order for order-validator (plugins/order-validator/src/lib.rs).
fn order(seq: u64) -> Bytes {
    let head = format!(r#"{{"id":"o-{seq:010}","customer":"c"#);
    let tail = r#"","currency":"EUR","items":[{"sku":"A1","quantity":2,"unit_price_cents":1250}]}"#;
    let pad = MESSAGE_BYTES.saturating_sub(head.len() + tail.len());
    Bytes::from(format!("{head}{}{tail}", "7".repeat(pad)))
}

async fn native_count_round(
    child: &mut Proc,
    client: &async_nats::Client,
    subject: &str,
    n: u64,
    limit_s: f64,
) -> anyhow::Result<Duration> {
    child.send(&format!("expect {n}"))?;
    child.wait_line(|l| l == "ok", Duration::from_secs(10)).await?;
    let t0 = Instant::now();
    nats::publish_burst(client, subject, None, n, &blob).await?;
    let (t1, _) = child
        .wait_line(|l| l.starts_with("done"), Duration::from_secs_f64(limit_s))
        .await
        .context("the native subscriber did not count every message (slow consumer?)")?;
    Ok(t1 - t0)
}

/// Who consumes in a JetStream measurement.
enum JsConsumer<'a> {
    /// The native pull consumer, on this stream.
    Native { stream: &'a str },
    /// `sluice run` on this manifest folder.
    Sluice { dir: PathBuf },
    /// The Extism peer, on this stream.
    Peer { stream: &'a str, peer: &'a PeerExtism },
}

/// The Extism peer, as bench/peer-extism/build.sh builds it.
struct PeerExtism {
    binary: PathBuf,
    plugin: PathBuf,
    /// Its Cargo.lock (the extism and wasmtime versions it runs).
    lock: String,
    /// Its workers, each with one plugin instance: Sluice's default `max_concurrency`.
    workers: usize,
}

/// A durable pull consumer with Sluice's default settings (explicit acks, `max_ack_pending`
/// 1000, no redelivery limit), for the native baseline and the peer.
async fn create_pull_consumer(stream: &stream::Stream, durable: &str) -> anyhow::Result<()> {
    stream
        .create_consumer(pull::Config {
            durable_name: Some(durable.to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: MAX_ACK_PENDING,
            max_deliver: -1,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot create the {durable} consumer"))?;
    Ok(())
}

/// A JetStream measurement: the stream, the durable consumer, who consumes.
struct JsRun<'a> {
    js: &'a jetstream::Context,
    stream: &'a stream::Stream,
    consumer: &'a str,
    subject: &'a str,
    /// Counts the handler's outputs, when it has some.
    counter: Option<&'a Counter>,
    who: JsConsumer<'a>,
}

struct JsMeasured {
    warmup: u64,
    messages: u64,
    /// Messages the measured process handled (warm-up included).
    handled: u64,
    took: Duration,
    cpu_ticks: u64,
    redelivered: u64,
}
