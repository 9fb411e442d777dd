//! The benchmark's `nats-server` (with its HTTP monitoring port, read for connection and
//! slow-consumer statistics), the load generator's publishing, counting what arrives, and
//! JetStream helpers: streams, pre-loading, pausing a consumer and watching it drain.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::Client;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use sluice::testing::NatsServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// `nats-server` with JetStream (file storage, in a temporary folder) on 127.0.0.1.
#[derive(Debug)]
pub struct Server {
    nats: NatsServer,
    monitor: u16,
}

impl Server {
    pub fn start() -> anyhow::Result<Self> {
        let monitor = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port();
        let nats = NatsServer::start_with_args(0, &["-m", &monitor.to_string()])?;
        Ok(Server { nats, monitor })
    }

    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// GETs a monitoring endpoint (`/varz`, `/connz`, ...) as JSON.
    pub async fn monitor(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let mut tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.monitor)).await?;
        tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await?;
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .ok_or_else(|| anyhow::anyhow!("malformed HTTP response from {path}"))?;
        serde_json::from_str(body).with_context(|| format!("monitoring {path}"))
    }

    pub async fn version(&self) -> anyhow::Result<String> {
        let varz = self.monitor("/varz").await?;
        Ok(varz["version"].as_str().unwrap_or("unknown").to_owned())
    }

    /// Slow consumers the server has seen (it cut off a client that did not read fast enough).
    pub async fn slow_consumers(&self) -> anyhow::Result<u64> {
        Ok(self.monitor("/varz").await?["slow_consumers"].as_u64().unwrap_or(0))
    }

    /// Messages the server has written towards the connection named `name`, and the bytes it
    /// still holds for it.
    pub async fn connection(&self, name: &str) -> anyhow::Result<(u64, u64)> {
        let connz = self.monitor("/connz?limit=1024").await?;
        let conns = connz["connections"].as_array().cloned().unwrap_or_default();
        let conn = conns
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
            .ok_or_else(|| anyhow::anyhow!("no connection named {name} in /connz"))?;
        Ok((conn["out_msgs"].as_u64().unwrap_or(0), conn["pending_bytes"].as_u64().unwrap_or(0)))
    }
}

/// A load-generator or observer connection. Its subscriptions buffer up to a million
/// messages: the generator must never be the one dropping messages.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<Client> {
    async_nats::ConnectOptions::new()
        .name(name)
        .subscription_capacity(1 << 20)
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// Publishes `n` messages as fast as the client takes them, then flushes.
pub async fn publish_burst(
    client: &Client,
    subject: &str,
    reply: Option<&str>,
    n: u64,
    payload: &impl Fn(u64) -> Bytes,
) -> anyhow::Result<()> {
    for i in 0..n {
        match reply {
            Some(r) => client.publish_with_reply(subject.to_owned(), r.to_owned(), payload(i)).await?,
            None => client.publish(subject.to_owned(), payload(i)).await?,
        }
    }
    client.flush().await?;
    Ok(())
}

/// Publishes `n` messages, never more than `window` ahead of what `counter` has seen come
/// back: sustained maximum throughput without overflowing any subscriber's buffer.
pub async fn publish_windowed(
    client: &Client,
    subject: &str,
    reply: Option<&str>,
    n: u64,
    window: u64,
    counter: &Counter,
    payload: &impl Fn(u64) -> Bytes,
) -> anyhow::Result<()> {
    for i in 0..n {
        while i.saturating_sub(counter.count()) >= window {
            client.flush().await?;
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        match reply {
            Some(r) => client.publish_with_reply(subject.to_owned(), r.to_owned(), payload(i)).await?,
            None => client.publish(subject.to_owned(), payload(i)).await?,
        }
    }
    client.flush().await?;
    Ok(())
}

#[derive(Debug, Default)]
struct CountState {
    count: u64,
    target: u64,
    done: Option<oneshot::Sender<Instant>>,
}

/// Counts the messages arriving on a subject (outputs of a handler, replies).
#[derive(Debug)]
pub struct Counter {
    state: Arc<Mutex<CountState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Counter {
    pub async fn start(client: &Client, subject: &str) -> anyhow::Result<Self> {
        let mut sub = client.subscribe(subject.to_owned()).await?;
        client.flush().await?;
        let state = Arc::new(Mutex::new(CountState::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while sub.next().await.is_some() {
                let Ok(mut s) = shared.lock() else { break };
                s.count += 1;
                if s.count == s.target
                    && let Some(done) = s.done.take()
                {
                    let _ = done.send(Instant::now());
                }
            }
        });
        Ok(Counter { state, task })
    }

    /// Resets the count; the receiver gets the moment the `n`-th message arrives.
    pub fn expect(&self, n: u64) -> anyhow::Result<oneshot::Receiver<Instant>> {
        let (tx, rx) = oneshot::channel();
        let mut s = self.state.lock().map_err(|_| anyhow::anyhow!("counter poisoned"))?;
        s.count = 0;
        s.target = n;
        s.done = Some(tx);
        Ok(rx)
    }

    pub fn count(&self) -> u64 {
        self.state.lock().map(|s| s.count).unwrap_or(0)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits for a counter's `n`-th message.
pub async fn wait_count(
    done: oneshot::Receiver<Instant>,
    counter: &Counter,
    n: u64,
    limit: Duration,
) -> anyhow::Result<Instant> {
    match tokio::time::timeout(limit, done).await {
        Ok(Ok(at)) => Ok(at),
        _ => bail!("only {} of {n} messages arrived within {limit:?}", counter.count()),
    }
}

/// Creates (or re-creates, empty) a file-backed stream capturing `subject`.
pub async fn create_stream(js: &jetstream::Context, name: &str, subject: &str) -> anyhow::Result<stream::Stream> {
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .with_context(|| format!("cannot create stream {name}"))
}

/// Publishes `n` messages into a stream, the payloads of `from..from + n`, with up to 1000
/// acknowledgements outstanding, and waits for every acknowledgement.
pub async fn preload(
    js: &jetstream::Context,
    subject: &str,
    from: u64,
    n: u64,
    payload: &impl Fn(u64) -> Bytes,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut acks = VecDeque::new();
    for i in from..from + n {
        acks.push_back(js.publish(subject.to_owned(), payload(i)).await?);
        if acks.len() >= 1000
            && let Some(ack) = acks.pop_front()
        {
            ack.await?;
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok(start.elapsed())
}

pub async fn consumer_info(stream: &stream::Stream, name: &str) -> anyhow::Result<consumer::Info> {
    stream.consumer_info(name).await.with_context(|| format!("consumer {name}"))
}

/// Polls the consumer every 5 ms until nothing is pending and nothing awaits an ack.
pub async fn wait_drained(
    stream: &stream::Stream,
    name: &str,
    limit: Duration,
) -> anyhow::Result<(Instant, consumer::Info)> {
    let start = Instant::now();
    loop {
        let info = consumer_info(stream, name).await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return Ok((Instant::now(), info));
        }
        if start.elapsed() > limit {
            bail!(
                "consumer {name} not drained after {limit:?}: {} pending, {} awaiting an ack",
                info.num_pending,
                info.num_ack_pending
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
