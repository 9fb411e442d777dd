//! `sluice test MANIFEST`: one message through the manifest's handler, in this process, with
//! no NATS server: the call path of `run` (`dispatch::dispatch`, the manifest's limits), an
//! in-memory store for the handler's dedup and kv, and then a report of what happened (the
//! outcome, the outputs and the reply it would send, and its logs).
//!
//! Exit status: 0 when the handler succeeded, 1 when it failed (rejected, asked for a retry,
//! trapped, timed out, ...), 2 when the input is unusable (a manifest or component error, an
//! unreadable payload file, a bad header).
//!
//! Imports the engine, the handler, the dispatch call, the memory store and the outputs; no
//! source, no NATS.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::Args;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use crate::bindings::{Delivery, Message};
use crate::dispatch::{Outcome, dispatch};
use crate::engine::{Engine, EngineOptions};
use crate::handler::Handler;
use crate::manifest::{self, Source};
use crate::outputs::Output;
use crate::store::{MemoryStore, Scope, Store};

/// The reply subject a test message carries unless `--reply-to` says otherwise: an inbox, so
/// that a handler's reply is accepted and shown.
pub const TEST_REPLY_TO: &str = "_INBOX.sluice-test";

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The handler's manifest.
    pub manifest: PathBuf,
    /// The payload, as text (default: empty).
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload from this file (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
    /// A header, as NAME=VALUE (or NAME:VALUE); repeatable.
    #[arg(short = 'H', long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// The message's subject (default: the manifest's source subject, with `*` and `>`
    /// replaced by `test`).
    #[arg(long)]
    pub subject: Option<String>,
    /// The message's reply subject; `--reply-to ''` sends a message nobody waits for.
    #[arg(long, default_value = TEST_REPLY_TO)]
    pub reply_to: String,
    /// The attempt this delivery is (1 is the first).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub attempt: u32,
    #[command(flatten)]
    pub engine: super::EngineArgs,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    // A header name holds neither `=` nor `:`, so the first of them ends it.
    let at = text.find(['=', ':']).ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))?;
    Ok((text[..at].trim().to_owned(), text[at + 1..].trim().to_owned()))
}

/// Runs the command; returns the exit status.
pub async fn run(args: TestArgs) -> u8 {
    let prepared = match prepare(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 2;
        }
    };
    let report = tokio::task::spawn_blocking(move || call(prepared)).await;
    match report {
        Ok(Ok(report)) => {
            print!("{}", report.render());
            u8::from(!report.succeeded())
        }
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            2
        }
        Err(e) => {
            eprintln!("error: the call ended abnormally: {e}");
            1
        }
    }
}

/// Everything a call needs, checked.
struct Prepared {
    engine: Arc<Engine>,
    handler: Handler,
    scope: Option<Scope>,
    msg: Message,
    delivery: Delivery,
    /// What the report says about the message beyond what it shows of the outcome.
    notes: Vec<String>,
}

fn prepare(args: &TestArgs) -> anyhow::Result<Prepared> {
    let manifest = manifest::load(&args.manifest).map_err(|e| anyhow::anyhow!("{e}"))?;
    let payload = match (&args.payload, &args.payload_file) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(file)) if file.as_os_str() == "-" => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                .context("cannot read the payload from stdin")?;
            bytes
        }
        (None, Some(file)) => {
            std::fs::read(file).with_context(|| format!("cannot read the payload file {}", file.display()))?
        }
        (None, None) => Vec::new(),
    };
    let headers = crate::outputs::header_map(args.headers.iter().cloned()).map_err(anyhow::Error::msg)?;
    let subject = match &args.subject {
        Some(s) => {
            crate::subject::validate_literal(s).map_err(|e| anyhow::anyhow!("--subject {s:?}: {e}"))?;
            s.clone()
        }
        None => default_subject(&manifest.source),
    };
    let reply_to = (!args.reply_to.is_empty()).then(|| args.reply_to.clone());

    let mut notes = Vec::new();
    if let Some(to) = &reply_to
        && !to.starts_with("_INBOX.")
        && !manifest.reply_to.iter().any(|p| p.matches(to))
    {
        notes.push(format!(
            "`run` would not send a reply to {to}: replies go only to reply inboxes (_INBOX.>) and to \
             subjects [capabilities] reply_to grants"
        ));
    }
    let idempotency_key = match &manifest.idempotency {
        Some(idem) => match idem.key.derive(&subject, Some(&headers), &payload) {
            Ok(key) => Some(key),
            Err(e) => {
                notes.push(format!("no idempotency key ({e}); `run` would {} such a message", idem.on_missing));
                None
            }
        },
        None => None,
    };
    let delivery = Delivery {
        attempt: args.attempt,
        max_attempts: manifest.retry.max_attempts,
        idempotency_key,
        stream_sequence: matches!(manifest.source, Source::JetStream(_)).then_some(1),
    };

    // The engine `run` would make, with the call where it is made (no guest threads), and
    // the compile cache as `run` has it (a Python or JavaScript component takes seconds to
    // compile: the next test of the same component does not).
    let options = EngineOptions { guest_threads: Some(0), ..args.engine.options() };
    let engine = Engine::new(options)?;
    let handler = Handler::load(&engine, manifest).map_err(|e| anyhow::anyhow!("{e}"))?;
    let scope = handler.needs_state().then(|| {
        let store = Store::Memory(Arc::new(MemoryStore::new(handler.spec.manifest.store.max_entries)));
        Scope::new(store, handler.spec.name.clone())
    });
    let msg = Message { subject, reply_to, headers: args.headers.clone(), payload };
    Ok(Prepared { engine, handler, scope, msg, delivery, notes })
}

/// A message subject the source would deliver: its subject (or first filter) with every
/// wildcard token made `test`.
fn default_subject(source: &Source) -> String {
    let pattern = match source {
        Source::Core { subject, .. } => Some(subject.as_str()),
        Source::JetStream(js) => js.filters.first().map(crate::subject::SubjectPattern::as_str),
    };
    let Some(pattern) = pattern else { return "test".to_owned() };
    pattern.split('.').map(|t| if t == "*" || t == ">" { "test" } else { t }).collect::<Vec<_>>().join(".")
}

/// Calls the handler once on a thread of its own, collecting the logs the call writes.
fn call(prepared: Prepared) -> anyhow::Result<Report> {
    let Prepared { engine, handler, scope, msg, delivery, notes } = prepared;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start an async runtime")?;
    let logs = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Capture(logs.clone()));
    let started = std::time::Instant::now();
    let outcome = tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(dispatch(&engine, &handler, scope, &msg, &delivery))
    });
    let elapsed = started.elapsed();
    drop(handler);
    let logs = std::mem::take(&mut *logs.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    Ok(Report { outcome, logs, notes, elapsed })
}

/// One log record of the call.
#[derive(Debug)]
struct LogLine {
    level: Level,
    /// `stdout` or `stderr` for what the guest printed; `None` for the log interface (and
    /// for the host's own warnings).
    stream: Option<String>,
    /// The host's own record (a warning about the call), not the guest's.
    host: bool,
    message: String,
}

/// Collects the guest's records (every level) and the host's warnings.
struct Capture(Arc<Mutex<Vec<LogLine>>>);

impl<S: Subscriber> Layer<S> for Capture {
    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        metadata.target().starts_with("sluice::guest") || *metadata.level() <= Level::WARN
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let line = LogLine {
            level: *meta.level(),
            stream: fields.stream,
            host: !meta.target().starts_with("sluice::guest"),
            message: fields.message,
        };
        if let Ok(mut logs) = self.0.lock() {
            logs.push(line);
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    stream: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            "stream" => self.stream = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "stream" => self.stream = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

/// What the call did, for the terminal.
struct Report {
    outcome: Outcome,
    logs: Vec<LogLine>,
    notes: Vec<String>,
    elapsed: std::time::Duration,
}

impl Report {
    fn succeeded(&self) -> bool {
        matches!(self.outcome, Outcome::Success(..))
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let ms = self.elapsed.as_secs_f64() * 1000.0;
        match &self.outcome {
            Outcome::Success(outputs, writes) => {
                let _ = writeln!(out, "outcome: success ({ms:.1} ms)");
                if !writes.is_empty() {
                    let _ = writeln!(out, "state: {} kv or dedup writes, committed with the message", writes.len());
                }
                if outputs.published.is_empty() {
                    out.push_str("outputs: none\n");
                }
                for (i, o) in outputs.published.iter().enumerate() {
                    let _ = writeln!(out, "output {}: {}", i + 1, o.subject);
                    render_message(&mut out, o);
                }
                match &outputs.reply {
                    Some(reply) => {
                        let _ = writeln!(out, "reply: to {}", reply.subject);
                        render_message(&mut out, reply);
                    }
                    None => out.push_str("reply: none\n"),
                }
            }
            Outcome::Failed(f) => {
                let _ = writeln!(out, "outcome: failed ({}) after {ms:.1} ms: {}", f.kind, f.reason);
                if let Some(after) = f.retry_after {
                    let _ = writeln!(out, "retry after: {}", humantime::format_duration(after));
                }
                out.push_str("outputs: none sent (a failed call sends nothing)\n");
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        if self.logs.is_empty() {
            out.push_str("logs: none\n");
        } else {
            out.push_str("logs:\n");
            for l in &self.logs {
                let what = match (&l.stream, l.host) {
                    (Some(stream), _) => stream.clone(),
                    (None, true) => format!("sluice {}", l.level.as_str().to_lowercase()),
                    (None, false) => l.level.as_str().to_lowercase(),
                };
                let mut lines = l.message.lines();
                let first = lines.next().unwrap_or("");
                let _ = writeln!(out, "  {what:<6} {first}");
                // A multi-line record (a traceback) stays together, indented under its level.
                for more in lines {
                    let _ = writeln!(out, "         {more}");
                }
            }
        }
        out
    }
}

fn render_message(out: &mut String, o: &Output) {
    for (name, values) in o.headers.iter() {
        for v in values {
            let _ = writeln!(out, "  {name}: {}", v.as_str());
        }
    }
    match std::str::from_utf8(&o.payload) {
        Ok(text) if !text.is_empty() => {
            for line in text.lines() {
                let _ = writeln!(out, "  | {line}");
            }
        }
        Ok(_) => out.push_str("  (empty payload)\n"),
        Err(_) => {
            let _ = writeln!(out, "  ({} bytes, not UTF-8) {:?}", o.payload.len(), o.payload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_take_equals_or_colon() {
        assert_eq!(parse_header("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_header("Nats-Msg-Id: m-1"), Ok(("Nats-Msg-Id".into(), "m-1".into())));
        assert!(parse_header("nothing").is_err());
    }
}
