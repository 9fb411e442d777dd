//! One chaos round: a fresh cluster, K Sluice processes running order-validator with
//! `[idempotency]` on one store, N orders published while the faults are injected, then every
//! output and dead letter counted by an independent reader.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use bytes::Bytes;

use crate::cluster::Cluster;
use crate::nats;
use crate::sluice::Sluice;
use crate::{Env, Store};

/// The handler's `[limits] timeout`; its ack wait is Sluice's default, 2 × timeout + 1 s.
const TIMEOUT_S: u64 = 2;
const ACK_WAIT: Duration = Duration::from_secs(2 * TIMEOUT_S + 1);
/// The `nats-kv` lease of a delivery in progress: `timeout` + 10 s (README, Idempotency).
const LEASE: Duration = Duration::from_secs(TIMEOUT_S + 10);
/// How long the zombie is frozen: past its ack wait (the messages it holds go to another
/// process) and past its lease (the other process may take the key over), so the frozen
/// process wakes up to finish messages someone else has finished too.
pub const FREEZE: Duration = Duration::from_secs(LEASE.as_secs() + 3);

/// Every stream keeps ids this long: longer than any round, so a re-send is always dropped.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(30 * 60);

const SOURCE: &str = "ORDERS";
const SOURCE_SUBJECT: &str = "orders.created";
const OUTPUT: &str = "VALIDATED";
const OUTPUT_SUBJECT: &str = "orders.validated";
const DLQ: &str = "CHAOS_DLQ";
const DLQ_SUBJECT: &str = "chaos.dlq";
const HANDLER: &str = "order-validator";

/// What a round does.
#[derive(Debug, Clone)]
pub struct RoundSpec {
    /// The idempotency store.
    pub store: Store,
    /// Sluice processes.
    pub processes: usize,
    /// Orders published.
    pub messages: u64,
    /// Publication rate (per second); `None`: as fast as the cluster acknowledges.
    pub rate: Option<f64>,
    /// Inject the four faults.
    pub faults: bool,
    /// The round gives up when nothing moves for this long after the last fault.
    pub stall_limit: Duration,
    /// Seed of the fault targets and pauses.
    pub seed: u64,
}

/// A fault, as it happened.
#[derive(Debug, Clone)]
pub struct FaultEvent {
    /// Seconds since the first publication.
    pub at_s: f64,
    /// Outputs stored when it began.
    pub outputs_before: u64,
    /// What was done.
    pub what: String,
    /// How long until the fault was over (the process or node back and ready).
    pub took_s: f64,
}

/// What a round found.
#[derive(Debug, Clone)]
pub struct RoundResult {
    pub spec: RoundSpec,
    /// Orders the source stream acknowledged to the publisher.
    pub messages_in: u64,
    /// Messages in the source stream (must equal `messages_in`).
    pub source_messages: u64,
    /// Publications the publisher retried (lost acknowledgements during the faults).
    pub publish_retries: u64,
    /// Outputs in the output stream.
    pub outputs: u64,
    /// Distinct orders among them.
    pub unique: u64,
    /// Orders with no output.
    pub lost: u64,
    /// Outputs beyond the first of their order.
    pub duplicated: u64,
    /// Dead letters, by `Sluice-Failure-Kind`.
    pub dead_letters: Vec<(String, u64)>,
    /// Seconds from the first publication until every output was stored and the consumer had
    /// nothing pending (faults included); `None` when it never drained.
    pub drain_s: Option<f64>,
    /// Redeliveries the source consumer counted.
    pub redelivered: u64,
    /// The faults.
    pub faults: Vec<FaultEvent>,
    /// `sluice run` processes that exited before they were ready, and were started again.
    pub start_failures: Vec<String>,
    /// What went wrong besides the counts (a process that would not stop, a fault that
    /// could not be injected).
    pub errors: Vec<String>,
}

impl RoundResult {
    /// Dead letters in all.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_letters.iter().map(|(_, n)| n).sum()
    }

    /// Orders handled per second, faults included.
    pub fn throughput(&self) -> Option<f64> {
        self.drain_s.map(|s| self.messages_in as f64 / s)
    }

    /// Whether the round met the targets: everything in, every output once, no dead letter
    /// (every order published is valid, so any dead letter was caused by a fault), drained.
    pub fn passed(&self) -> bool {
        self.messages_in == self.spec.messages
            && self.source_messages == self.spec.messages
            && self.lost == 0
            && self.duplicated == 0
            && self.dead_lettered() == 0
            && self.drain_s.is_some()
            && self.errors.is_empty()
    }

    /// One line for the console.
    pub fn summary(&self) -> String {
        format!(
            "{} × {} on {}: in {}, outputs {}, unique {}, lost {}, duplicated {}, dead-lettered {}, drain {}, redelivered {}{}",
            self.spec.processes,
            HANDLER,
            self.spec.store.name(),
            self.messages_in,
            self.outputs,
            self.unique,
            self.lost,
            self.duplicated,
            self.dead_lettered(),
            self.drain_s.map_or("never".to_owned(), |s| format!("{s:.1}s")),
            self.redelivered,
            if self.errors.is_empty() { String::new() } else { format!("; errors: {}", self.errors.join("; ")) }
        )
    }
}

/// A valid order for order-validator, its id carrying the sequence number.
pub fn order(seq: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"o-{seq:010}","customer":"c-7","currency":"EUR","items":[{{"sku":"A1","quantity":2,"unit_price_cents":1250}}]}}"#
    ))
}

/// The manifest of the round's handler.
fn manifest(component: &Path, store: Store) -> String {
    let component = serde_json::to_string(&component.display().to_string()).unwrap_or_default();
    let store = match store {
        Store::NatsKv => "[store]\nbackend = \"nats-kv\"\nreplicas = 3\n",
        Store::Redb => "[store]\nbackend = \"redb\"\n",
    };
    format!(
        "[handler]\nname = \"{HANDLER}\"\ncomponent = {component}\n\n[source]\nstream = \"{SOURCE}\"\n\n\
         [limits]\nmemory = \"32MiB\"\ntimeout = \"{TIMEOUT_S}s\"\nmax_concurrency = 32\n\n\
         [capabilities]\npublish = [\"{OUTPUT_SUBJECT}\"]\n\n[config]\ncurrency = \"EUR\"\n\n\
         [idempotency]\nkey = \"header:Nats-Msg-Id\"\n\n{store}\n\
         [dead_letter]\nsubject = \"{DLQ_SUBJECT}\"\nstream = \"{DLQ}\"\n"
    )
}

/// What the fault thread shares with the round.
struct Shared {
    cluster: Mutex<Cluster>,
    sluices: Vec<Mutex<Sluice>>,
    outputs: AtomicU64,
    published: Arc<AtomicU64>,
    faults_done: AtomicBool,
    started: Instant,
    start_failures: Mutex<Vec<String>>,
}

/// Runs one round in a fresh folder under `env.work`.
pub async fn run(env: &Env, spec: &RoundSpec, label: &str) -> anyhow::Result<RoundResult> {
    let dir = tempfile::Builder::new().prefix(&format!("chaos-{label}-")).tempdir_in(&env.work)?;
    let logs = env.logs.join(label);
    std::fs::create_dir_all(&logs)?;
    let cluster = Cluster::start(&env.nats_server, &dir.path().join("cluster"), 3)?;
    let urls = cluster.urls();
    let client = nats::connect(&urls, "chaos-harness").await?;
    let js = jetstream::new(client);
    nats::create_stream(&js, SOURCE, SOURCE_SUBJECT, 3, DUPLICATE_WINDOW).await?;
    nats::create_stream(&js, OUTPUT, OUTPUT_SUBJECT, 3, DUPLICATE_WINDOW).await?;
    nats::create_stream(&js, DLQ, DLQ_SUBJECT, 3, DUPLICATE_WINDOW).await?;

    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("order-validator.toml"), manifest(&env.plugin("order-validator"), spec.store))?;
    let mut sluices = Vec::new();
    for i in 0..spec.processes {
        let s = Sluice::new(
            &env.sluice,
            &manifests,
            &urls,
            dir.path().join(format!("data-{i}")),
            logs.join(format!("sluice-{i}.log")),
        );
        sluices.push(s);
    }
    let mut start_failures = Vec::new();
    for (i, s) in sluices.iter_mut().enumerate() {
        for f in s.start_supervised(Duration::from_secs(120), 3)? {
            start_failures.push(format!("sluice {i} at start-up: {f}"));
        }
    }

    let shared = Arc::new(Shared {
        cluster: Mutex::new(cluster),
        sluices: sluices.into_iter().map(Mutex::new).collect(),
        outputs: AtomicU64::new(0),
        published: Arc::new(AtomicU64::new(0)),
        faults_done: AtomicBool::new(!spec.faults),
        started: Instant::now(),
        start_failures: Mutex::new(start_failures),
    });
    let publisher = {
        let js = js.clone();
        let (n, rate, acked) = (spec.messages, spec.rate, shared.published.clone());
        tokio::spawn(async move { nats::publish_all(&js, SOURCE_SUBJECT, "chaos", n, rate, order, acked).await })
    };
    let faults = if spec.faults {
        let (shared, spec) = (shared.clone(), spec.clone());
        Some(tokio::task::spawn_blocking(move || inject(&shared, &spec)))
    } else {
        None
    };

    // Watch until drained: every output stored, nothing pending, the faults over.
    let mut errors = Vec::new();
    let mut drain_s = None;
    let mut last_move = Instant::now();
    let mut last_seen = (0, 0, 0);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let outputs = nats::stream_messages(&js, OUTPUT).await;
        if let Some(o) = outputs {
            shared.outputs.store(o, Ordering::Relaxed);
        }
        let info = nats::consumer_info(&js, SOURCE, HANDLER).await;
        let published = shared.published.load(Ordering::Relaxed);
        let floor = info.as_ref().map_or(0, |i| i.ack_floor.stream_sequence);
        let now = (published, outputs.unwrap_or(0), floor);
        if now != last_seen || !shared.faults_done.load(Ordering::Relaxed) {
            last_seen = now;
            last_move = Instant::now();
        }
        let done = publisher.is_finished()
            && shared.faults_done.load(Ordering::Relaxed)
            && outputs.is_some_and(|o| o >= spec.messages)
            && info.as_ref().is_some_and(|i| i.num_pending == 0 && i.num_ack_pending == 0);
        if done {
            drain_s = Some(shared.started.elapsed().as_secs_f64());
            break;
        }
        if last_move.elapsed() > spec.stall_limit {
            errors.push(format!(
                "not drained: nothing moved for {:?} ({published} published, {} outputs, {:?} pending, {:?} awaiting an ack)",
                spec.stall_limit,
                outputs.unwrap_or(0),
                info.as_ref().map(|i| i.num_pending),
                info.as_ref().map(|i| i.num_ack_pending),
            ));
            break;
        }
    }
    let published = publisher.await.context("the publisher panicked")?;
    let fault_events = match faults {
        Some(f) => match f.await.context("the fault thread panicked")? {
            Ok(events) => events,
            Err(e) => {
                errors.push(format!("fault injection failed: {e:#}"));
                Vec::new()
            }
        },
        None => Vec::new(),
    };

    // A zombie's late output would come now: give it a moment, then stop every process
    // gracefully (each must exit, and cleanly).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopper = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || {
            let mut errors = Vec::new();
            for (i, s) in shared.sluices.iter().enumerate() {
                let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = s.check_alive().and_then(|()| s.stop(Duration::from_secs(45))) {
                    errors.push(format!("sluice {i}: {e:#}"));
                }
            }
            errors
        })
    };
    errors.extend(stopper.await.context("stopping the processes panicked")?);

    let outputs = nats::read_all(&js, OUTPUT, "Sluice-Failure-Kind", order_id).await?;
    let dead = nats::read_all(&js, DLQ, "Sluice-Failure-Kind", |_| Some(String::new())).await?;
    let source_messages = nats::stream_messages(&js, SOURCE).await.unwrap_or(0);
    let redelivered = nats::consumer_info(&js, SOURCE, HANDLER).await.map_or(0, |i| i.num_redelivered as u64);
    let unique = (0..spec.messages).filter(|seq| outputs.per_key.contains_key(&format!("o-{seq:010}"))).count() as u64;
    let duplicated = outputs.per_key.values().map(|n| n.saturating_sub(1)).sum();
    let mut dead_letters: Vec<(String, u64)> = dead.by_header.into_iter().collect();
    let unlabelled = dead.total - dead_letters.iter().map(|(_, n)| n).sum::<u64>();
    if unlabelled > 0 {
        dead_letters.push(("(no kind)".to_owned(), unlabelled));
    }
    let result = RoundResult {
        spec: spec.clone(),
        messages_in: published.acked,
        source_messages,
        publish_retries: published.retries,
        outputs: outputs.total,
        unique,
        lost: spec.messages - unique,
        duplicated,
        dead_letters,
        drain_s,
        redelivered,
        faults: fault_events,
        start_failures: lock(&shared.start_failures).clone(),
        errors,
    };
    drop(shared);
    Ok(result)
}

/// The order id of an output (`{"id": "o-...", ...}`).
fn order_id(payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v.get("id")?.as_str().map(str::to_owned)
}

/// The fault schedule, on its own thread: each fault starts once the outputs pass a fraction
/// of N, and the next waits until the previous is over.
fn inject(shared: &Shared, spec: &RoundSpec) -> anyhow::Result<Vec<FaultEvent>> {
    let result = inject_all(shared, spec);
    shared.faults_done.store(true, Ordering::Relaxed);
    result
}

fn inject_all(shared: &Shared, spec: &RoundSpec) -> anyhow::Result<Vec<FaultEvent>> {
    let mut rng = fastrand::Rng::with_seed(spec.seed);
    let mut events = Vec::new();
    let k = shared.sluices.len();
    let nodes = lock(&shared.cluster).len();
    for (i, fraction) in [0.1, 0.3, 0.5, 0.7].into_iter().enumerate() {
        let target = (spec.messages as f64 * fraction) as u64;
        while shared.outputs.load(Ordering::Relaxed) < target {
            if shared.started.elapsed() > Duration::from_secs(3600) {
                anyhow::bail!("outputs never reached {target}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let begin = Instant::now();
        let at_s = shared.started.elapsed().as_secs_f64();
        let outputs_before = shared.outputs.load(Ordering::Relaxed);
        let what = match i {
            0 => {
                let p = rng.usize(..k);
                let pause = Duration::from_millis(rng.u64(500..3000));
                let mut s = lock(&shared.sluices[p]);
                s.kill()?;
                std::thread::sleep(pause);
                for f in s.start_supervised(Duration::from_secs(120), 3)? {
                    lock(&shared.start_failures).push(format!("sluice {p} after its kill: {f}"));
                }
                format!("kill -9 of sluice {p}, restarted after {:.1} s", pause.as_secs_f64())
            }
            1 => {
                let n = rng.usize(..nodes);
                let pause = Duration::from_millis(rng.u64(3000..8000));
                let mut c = lock(&shared.cluster);
                c.kill(n)?;
                std::thread::sleep(pause);
                c.restart(n, Duration::from_secs(120))?;
                format!("kill -9 of nats-server {}, restarted after {:.1} s", c.name(n), pause.as_secs_f64())
            }
            2 => {
                let p = rng.usize(..k);
                lock(&shared.sluices[p]).freeze()?;
                std::thread::sleep(FREEZE);
                lock(&shared.sluices[p]).thaw()?;
                format!(
                    "SIGSTOP of sluice {p} for {} s (ack wait {} s, lease {} s), then SIGCONT",
                    FREEZE.as_secs(),
                    ACK_WAIT.as_secs(),
                    LEASE.as_secs()
                )
            }
            _ => {
                let mut c = lock(&shared.cluster);
                for n in 0..nodes {
                    c.stop(n, Duration::from_secs(30))?;
                    c.restart(n, Duration::from_secs(120))?;
                }
                "rolling restart of the 3 nats-servers (SIGTERM, start, healthy, next)".to_owned()
            }
        };
        events.push(FaultEvent { at_s, outputs_before, what, took_s: begin.elapsed().as_secs_f64() });
    }
    Ok(events)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The logs folder of a round.
pub fn logs_of(env: &Env, label: &str) -> PathBuf {
    env.logs.join(label)
}
