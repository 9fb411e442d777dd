//! Guest stdout and stderr: each line becomes a log event tagged with the handler name, up to
//! a byte budget per call (a chatty or hostile guest cannot flood the host's log).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Bytes of stdout or stderr one call may log; the rest is counted and dropped.
pub const LOG_BUDGET: usize = 64 * 1024;

/// One guest output stream (stdout or stderr) of one call.
#[derive(Clone)]
pub struct GuestOutput(Arc<Mutex<LineLog>>);

impl std::fmt::Debug for GuestOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GuestOutput")
    }
}

struct LineLog {
    handler: Arc<str>,
    stream: &'static str,
    partial: Vec<u8>,
    budget: usize,
    dropped: usize,
}

impl GuestOutput {
    pub fn new(handler: Arc<str>, stream: &'static str) -> Self {
        GuestOutput(Arc::new(Mutex::new(LineLog {
            handler,
            stream,
            partial: Vec::new(),
            budget: LOG_BUDGET,
            dropped: 0,
        })))
    }
}

impl LineLog {
    fn write(&mut self, mut buf: &[u8]) {
        let taken = buf.len().min(self.budget);
        self.dropped += buf.len() - taken;
        self.budget -= taken;
        buf = &buf[..taken];
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&buf[..nl]);
            self.emit();
            buf = &buf[nl + 1..];
        }
        self.partial.extend_from_slice(buf);
    }

    fn emit(&mut self) {
        let line = String::from_utf8_lossy(&self.partial);
        let line = line.trim_end_matches('\r');
        tracing::info!(target: "sluice::guest", handler = &*self.handler, stream = self.stream, "{line}");
        self.partial.clear();
    }
}

impl Drop for LineLog {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            self.emit();
        }
        if self.dropped > 0 {
            tracing::warn!(
                target: "sluice::guest",
                handler = &*self.handler,
                stream = self.stream,
                "{} bytes of guest {} dropped: over the {LOG_BUDGET}-byte budget per message",
                self.dropped,
                self.stream
            );
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // A poisoned lock means a panic while logging; the bytes are simply not logged.
        if let Ok(mut log) = self.0.lock() {
            log.write(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
