//! Sending what a successful call queued. A publication to a subject that a stream captures
//! goes through JetStream, and every acknowledgement is awaited (pipelined: all are sent
//! first, then all acks collected) before the source message is acked; other subjects and
//! replies are core NATS publishes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::jetstream::{self, context::PublishAckFuture};

use crate::host::Outputs;

/// How long "does a stream capture this subject?" is remembered.
const STREAM_LOOKUP_TTL: Duration = Duration::from_secs(10);

/// Sends outputs, knowing which subjects are stored by streams.
#[derive(Debug)]
pub struct OutputSender {
    client: Client,
    js: jetstream::Context,
    captured: Mutex<HashMap<String, (bool, Instant)>>,
}

impl OutputSender {
    pub fn new(client: Client) -> Self {
        OutputSender { js: jetstream::new(client.clone()), client, captured: Mutex::new(HashMap::new()) }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Sends `outputs` in order; Ok once every stream has acknowledged its messages.
    pub async fn send(&self, outputs: Outputs) -> Result<(), String> {
        let mut acks: Vec<(String, PublishAckFuture)> = Vec::new();
        for out in outputs.published {
            if self.is_captured(&out.subject).await {
                let ack = self
                    .js
                    .publish_with_headers(out.subject.clone(), out.headers, out.payload)
                    .await
                    .map_err(|e| format!("cannot publish to {}: {e}", out.subject))?;
                acks.push((out.subject, ack));
            } else {
                self.client
                    .publish_with_headers(out.subject.clone(), out.headers, out.payload)
                    .await
                    .map_err(|e| format!("cannot publish to {}: {e}", out.subject))?;
            }
        }
        for (subject, ack) in acks {
            ack.await.map_err(|e| format!("stream did not acknowledge the output to {subject}: {e}"))?;
        }
        // The reply goes last: a requester that got its answer may rely on the rest.
        if let Some(reply) = outputs.reply {
            self.client
                .publish_with_headers(reply.subject, reply.headers, reply.payload)
                .await
                .map_err(|e| format!("cannot send the reply: {e}"))?;
        }
        Ok(())
    }

    /// Whether a stream captures `subject`.
    async fn is_captured(&self, subject: &str) -> bool {
        if let Ok(cache) = self.captured.lock()
            && let Some((captured, at)) = cache.get(subject)
            && at.elapsed() < STREAM_LOOKUP_TTL
        {
            return *captured;
        }
        let captured = self.js.stream_by_subject(subject.to_owned()).await.is_ok();
        if let Ok(mut cache) = self.captured.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(subject.to_owned(), (captured, Instant::now()));
        }
        captured
    }
}
