//! Throughput with 1, 2 and 3 Sluice processes on the cluster, no faults: the JetStream noop
//! handler bare and with `[idempotency]` on `nats-kv` (3 replicas). Each run pre-loads N
//! messages into a fresh R3 stream, starts K processes on it, and times from when every one
//! is ready (the ack floor then is the warm-up) until nothing is pending or awaiting an ack.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::bail;
use async_nats::jetstream;
use bytes::Bytes;

use crate::cluster::Cluster;
use crate::nats;
use crate::sluice::Sluice;
use crate::{Env, Store};

/// One case of the scaling table.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub id: &'static str,
    pub label: &'static str,
    pub store: Option<Store>,
}

/// The two rows the issue asks for.
pub const CASES: [Case; 2] = [
    Case { id: "jetstream_noop", label: "JetStream, noop handler", store: None },
    Case {
        id: "jetstream_noop_dedup_nats_kv",
        label: "JetStream, noop, idempotency on nats-kv (R3)",
        store: Some(Store::NatsKv),
    },
];

/// A measurement.
#[derive(Debug, Clone)]
pub struct Measured {
    pub case: Case,
    pub processes: usize,
    /// Messages timed (N minus the warm-up).
    pub messages: u64,
    pub seconds: f64,
}

impl Measured {
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }
}

/// Runs every case with each process count, on one cluster.
pub async fn run(env: &Env, messages: u64, counts: &[usize]) -> anyhow::Result<Vec<Measured>> {
    let dir = tempfile::Builder::new().prefix("chaos-scaling-").tempdir_in(&env.work)?;
    let logs = env.logs.join("scaling");
    std::fs::create_dir_all(&logs)?;
    let cluster = Cluster::start(&env.nats_server, &dir.path().join("cluster"), 3)?;
    let urls = cluster.urls();
    let js = jetstream::new(nats::connect(&urls, "chaos-scaling").await?);
    let mut out = Vec::new();
    for case in CASES {
        for &k in counts {
            let name = format!("scale-{}-{k}", case.id.replace('_', "-"));
            let stream = name.to_uppercase().replace('-', "_");
            let subject = format!("scale.{}.{k}", case.id);
            nats::create_stream(&js, &stream, &subject, 3, Duration::from_secs(120)).await?;
            let tag = name.clone();
            nats::publish_all(&js, &subject, &tag, messages, None, blob, Arc::new(AtomicU64::new(0))).await;
            let manifests = dir.path().join(&name);
            std::fs::create_dir_all(&manifests)?;
            std::fs::write(manifests.join("h.toml"), manifest(env, &name, &stream, case.store))?;
            let mut procs: Vec<Sluice> = (0..k)
                .map(|i| {
                    Sluice::new(
                        &env.sluice,
                        &manifests,
                        &urls,
                        dir.path().join(format!("{name}-data-{i}")),
                        logs.join(format!("{name}-{i}.log")),
                    )
                })
                .collect();
            for p in &mut procs {
                p.spawn()?;
            }
            // Timed from when every process is ready (the first ones start consuming before).
            for p in &mut procs {
                p.wait_ready(Duration::from_secs(120))?;
            }
            let m = measure(&js, &stream, &name, messages).await;
            for p in &mut procs {
                p.stop(Duration::from_secs(45))?;
            }
            let (timed, seconds) = m?;
            eprintln!("scaling {} × {k}: {:.0} msg/s", case.id, timed as f64 / seconds);
            out.push(Measured { case, processes: k, messages: timed, seconds });
            let _ = js.delete_stream(&stream).await;
        }
    }
    drop(cluster);
    Ok(out)
}

async fn measure(js: &jetstream::Context, stream: &str, consumer: &str, n: u64) -> anyhow::Result<(u64, f64)> {
    let warmup = 0;
    let start = Instant::now();
    let mut begun: Option<(Instant, u64)> = None;
    loop {
        if let Some(info) = nats::consumer_info(js, stream, consumer).await {
            let floor = info.ack_floor.stream_sequence;
            if floor >= n && begun.is_none() {
                bail!("{consumer} handled all {n} messages before every process was ready: use more messages");
            }
            if begun.is_none() && floor >= warmup {
                begun = Some((Instant::now(), floor));
            }
            if let Some((t0, f0)) = begun
                && info.num_pending == 0
                && info.num_ack_pending == 0
                && floor >= n
            {
                return Ok((n - f0, t0.elapsed().as_secs_f64()));
            }
        }
        if start.elapsed() > Duration::from_secs(900) {
            bail!("{consumer} did not drain {n} messages within 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn manifest(env: &Env, name: &str, stream: &str, store: Option<Store>) -> String {
    let component = serde_json::to_string(&env.plugin("noop").display().to_string()).unwrap_or_default();
    let dedup = match store {
        Some(s) => format!(
            "\n[idempotency]\nkey = \"header:Nats-Msg-Id\"\n\n[store]\nbackend = \"{}\"\nreplicas = 3\n",
            s.name()
        ),
        None => String::new(),
    };
    format!("[handler]\nname = \"{name}\"\ncomponent = {component}\n\n[source]\nstream = \"{stream}\"\n{dedup}")
}

/// A 128-byte opaque payload (as the benchmark's).
fn blob(seq: u64) -> Bytes {
    let mut v = seq.to_le_bytes().to_vec();
    v.resize(128, b'x');
    Bytes::from(v)
}
