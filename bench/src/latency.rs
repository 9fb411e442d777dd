//! Latency at a fixed offered rate: open-loop request/reply. A paced thread publishes
//! requests whose 128-byte payload carries a sequence number and the send time; the responder
//! (native echo or Sluice's echo handler) sends the payload back, and the reply's arrival
//! closes the measurement: publish to handler completion, as the requester sees it.
//!
//! Open loop: the sender keeps its schedule whatever the replies do (a late reply does not
//! delay the next request), so queueing shows up in the tail instead of being hidden.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use serde::Serialize;

use crate::nats;

/// One latency run.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRun {
    /// `native` or `sluice`.
    pub who: String,
    /// The offered rate as a fraction of the maximum it is derived from.
    pub load: f64,
    pub offered_per_sec: f64,
    pub seconds: f64,
    /// Requests sent in the measured part (after warm-up).
    pub sent: u64,
    pub received: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

const REPLY_SUBJECT: &str = "bench.latency.replies";

fn payload(seq: u64, sent_ns: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size);
    b.put_u64_le(seq);
    b.put_u64_le(sent_ns);
    b.resize(size, b'x');
    b.freeze()
}

fn decode(p: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(p.get(0..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(p.get(8..16)?.try_into().ok()?);
    Some((seq, sent))
}

/// What to send in one run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Requests per second.
    pub rate: f64,
    /// Sent first, not recorded.
    pub warmup: Duration,
    /// Then recorded.
    pub measure: Duration,
    /// Payload size.
    pub size: usize,
}

/// What one run recorded: requests sent after the warm-up, and the latency of each reply
/// (nanoseconds) that came back.
#[derive(Debug, Default)]
pub struct Samples {
    pub sent: u64,
    pub latencies: Vec<u64>,
}

impl Samples {
    pub fn extend(&mut self, other: Samples) {
        self.sent += other.sent;
        self.latencies.extend(other.latencies);
    }
}

/// Sends requests to `subject` as `spec` says and records the latency of each reply.
pub async fn sample(url: &str, subject: &str, spec: &Spec) -> anyhow::Result<Samples> {
    let Spec { rate, warmup, measure, size } = *spec;
    let client = nats::connect(url, "bench-latency").await?;
    let mut replies = client.subscribe(REPLY_SUBJECT).await?;
    client.flush().await?;

    let warm_n = (rate * warmup.as_secs_f64()).ceil() as u64;
    let measured_n = (rate * measure.as_secs_f64()).ceil() as u64;
    let total = warm_n + measured_n;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let base = Instant::now();

    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<()>();
    let receiver = tokio::spawn(async move {
        let mut latencies: Vec<u64> = Vec::with_capacity(measured_n as usize);
        let mut stop = std::pin::pin!(async move {
            // Once everything is sent, late replies get one more second.
            let _ = sent_rx.await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let mut seen = 0;
        loop {
            tokio::select! {
                msg = replies.next() => {
                    let Some(msg) = msg else { break };
                    let now = base.elapsed().as_nanos() as u64;
                    let Some((seq, sent)) = decode(&msg.payload) else { continue };
                    seen += 1;
                    if seq >= warm_n {
                        latencies.push(now.saturating_sub(sent));
                    }
                    if seen == total {
                        break;
                    }
                }
                _ = &mut stop => break,
            }
        }
        latencies
    });

    // A thread, not a task: tokio's timer has a millisecond resolution, which would send
    // requests in bursts; a thread sleeping until each send time does not.
    let handle = tokio::runtime::Handle::current();
    let subject = subject.to_owned();
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        for seq in 0..total {
            let due = base + interval.mul_f64(seq as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let sent = base.elapsed().as_nanos() as u64;
            handle.block_on(client.publish_with_reply(
                subject.clone(),
                REPLY_SUBJECT.to_owned(),
                payload(seq, sent, size),
            ))?;
        }
        handle.block_on(client.flush())?;
        Ok(())
    });
    let sent = tokio::task::spawn_blocking(move || sender.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the latency sender thread panicked"))?;
    let _ = sent_tx.send(());
    sent.context("sending requests")?;
    let latencies = receiver.await?;
    Ok(Samples { sent: measured_n, latencies })
}

/// Percentiles of `samples`, for the report.
pub fn summarize(who: &str, load: f64, rate: f64, seconds: f64, samples: Samples) -> LatencyRun {
    let Samples { sent, mut latencies } = samples;
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as f64 / 1000.0
    };
    let mean = if latencies.is_empty() {
        f64::NAN
    } else {
        latencies.iter().sum::<u64>() as f64 / latencies.len() as f64 / 1000.0
    };
    LatencyRun {
        who: who.to_owned(),
        load,
        offered_per_sec: rate,
        seconds,
        sent,
        received: latencies.len() as u64,
        p50_us: pct(0.50),
        p90_us: pct(0.90),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        max_us: pct(1.0),
        mean_us: mean,
    }
}
