//! Guest stdout and stderr: each line becomes a log event tagged with the handler name, up to
//! a byte budget per call (a chatty or hostile guest cannot flood the host's log).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// What one call may still log (stdout, stderr and the log interface together).
#[derive(Debug, Clone)]
pub struct LogBudget(Arc<Mutex<(u64, u64)>>);

impl LogBudget {
    pub fn new(bytes: u64) -> Self {
        LogBudget(Arc::new(Mutex::new((bytes, 0))))
    }

    /// How many of `len` bytes may be logged; the rest is counted as dropped.
    pub fn take(&self, len: usize) -> usize {
        let Ok(mut b) = self.0.lock() else { return 0 };
        let (left, dropped) = &mut *b;
        let taken = (len as u64).min(*left);
        *left -= taken;
        *dropped += len as u64 - taken;
        usize::try_from(taken).unwrap_or(0)
    }

    /// Bytes dropped so far.
    pub fn dropped(&self) -> u64 {
        self.0.lock().map_or(0, |b| b.1)
    }

    /// A new call's budget (a warm instance's streams keep this same budget).
    pub fn reset(&self, bytes: u64) {
        if let Ok(mut b) = self.0.lock() {
            *b = (bytes, 0);
        }
    }
}

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
    budget: LogBudget,
}

impl GuestOutput {
    pub fn new(handler: Arc<str>, stream: &'static str, budget: LogBudget) -> Self {
        GuestOutput(Arc::new(Mutex::new(LineLog { handler, stream, partial: Vec::new(), budget })))
    }

    fn append(&self, bytes: &[u8]) {
        // A poisoned lock means a panic while logging; the bytes are simply not logged.
        if let Ok(mut log) = self.0.lock() {
            log.write(bytes);
        }
    }
}

impl LineLog {
    fn write(&mut self, mut buf: &[u8]) {
        let taken = self.budget.take(buf.len());
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

    /// A synchronous stream: a write goes straight into the line log. The default adapter
    /// hands every write to a background task and makes the guest wait for it, so a guest
    /// printing line by line paid a scheduler round trip per line (400 lines took over
    /// 500 ms on a busy runtime).
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
