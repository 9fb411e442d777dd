//! `sluice::manifest::parse` on arbitrary text.
//!
//! Checked besides "no panic":
//! - an error's Display is non-empty and starts with the manifest path;
//! - a located error has line >= 1, column >= 1, width >= 1, its `line_text` is that line of
//!   the input, the caret starts within (or just past) that line, and Display's first line is
//!   `path:line:column: message`;
//! - an accepted manifest keeps the promises of its validation (component is a file, names
//!   non-empty, durations and sizes non-zero, retry max >= initial, JetStream ack_wait >
//!   timeout, max_ack_pending in range);
//! - the durations an accepted manifest hands the runtime survive the arithmetic the runtime
//!   does on them (`Instant::now() + timeout` in dispatch, `timeout + LEASE_GRACE` in the
//!   dedup lease, `ttl + timeout + LEASE_GRACE` for a nats-kv bucket, `Instant::now() +
//!   ack_wait / 2` for progress acks, ack_wait as i64 nanoseconds in the consumer config),
//!   and the retry policy gives a delay for any attempt.
//!
//! `SLUICE_FUZZ_SKIP_HUGE_DURATIONS=1` skips inputs holding a duration of 100 years or more
//! (the known overflow class, see fuzz/README.md), so a long run can look for anything else.
//!
//! The manifest "lives" in `<tmp>/sluice-fuzz-manifest/a/b/c/m.toml`, and the component files
//! the seed manifests name exist there (`../../../plugins/dist/echo.wasm`,
//! `../plugins/dist/*.wasm`, `c.wasm`), so mutated seeds get past the component check and
//! reach the source, retry, dead-letter, idempotency and store validation.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sluice::manifest::{self, Source};
use sluice::testing::LEASE_GRACE;
use sluice::testing::Backend;

fn manifest_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let root = std::env::temp_dir().join("sluice-fuzz-manifest");
        let dir = root.join("a/b/c");
        let files = [
            root.join("plugins/dist/echo.wasm"),
            root.join("plugins/dist/order-validator.wasm"),
            root.join("a/b/plugins/dist/echo.wasm"),
            root.join("a/b/plugins/dist/order-validator.wasm"),
            dir.join("c.wasm"),
            dir.join("not-a-component.txt"),
        ];
        for file in files {
            std::fs::create_dir_all(file.parent().expect("has a parent")).expect("create fuzz folder");
            if !file.is_file() {
                std::fs::write(&file, b"\0asm\x0d\0\x01\0").expect("write fuzz component");
            }
        }
        dir.join("m.toml")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if skip_huge_durations() && has_huge_duration(text) {
        return;
    }
    let path = manifest_path();
    match manifest::parse(path, text.to_owned()) {
        Err(e) => check_error(path, text, &e),
        Ok(m) => check_manifest(&m),
    }
});

fn skip_huge_durations() -> bool {
    static SKIP: OnceLock<bool> = OnceLock::new();
    *SKIP.get_or_init(|| std::env::var_os("SLUICE_FUZZ_SKIP_HUGE_DURATIONS").is_some_and(|v| v != "0"))
}

/// True when some string value in the TOML parses as a duration of 100 years or more.
fn has_huge_duration(text: &str) -> bool {
    fn walk(v: &toml::Value) -> bool {
        match v {
            toml::Value::String(s) => {
                humantime::parse_duration(s).is_ok_and(|d| d >= Duration::from_secs(100 * 365 * 86_400))
            }
            toml::Value::Array(a) => a.iter().any(walk),
            toml::Value::Table(t) => t.values().any(walk),
            _ => false,
        }
    }
    text.parse::<toml::Table>().is_ok_and(|t| t.values().any(walk))
}

fn check_error(path: &Path, text: &str, e: &manifest::ManifestError) {
    let shown = e.to_string();
    let prefix = path.display().to_string();
    assert!(!shown.is_empty(), "empty error display for {e:?}");
    assert!(shown.starts_with(&prefix), "error display does not start with the path: {shown:?}");
    assert!(!e.message.is_empty(), "empty error message: {e:?}");
    let Some(loc) = &e.location else { return };
    assert!(loc.line >= 1 && loc.column >= 1 && loc.width >= 1, "bad location {loc:?}");
    // The line the error names, as `locate` should have cut it.
    let line = text.split('\n').nth(loc.line - 1);
    let Some(line) = line else {
        panic!("error names line {} but the text has {} lines: {e:?}", loc.line, text.split('\n').count());
    };
    assert_eq!(loc.line_text, line.trim_end_matches('\r'), "line_text is not line {} of the text", loc.line);
    assert!(
        loc.column - 1 <= line.chars().count(),
        "column {} is past the end of line {} ({} chars)",
        loc.column,
        loc.line,
        line.chars().count()
    );
    let first = shown.lines().next().unwrap_or_default();
    let head = format!("{prefix}:{}:{}: ", loc.line, loc.column);
    assert!(first.starts_with(&head), "first line {first:?} does not start with {head:?}");
}

fn check_manifest(m: &manifest::Manifest) {
    assert!(!m.name.is_empty());
    assert!(m.component.is_file(), "accepted a manifest whose component is not a file: {m:?}");
    assert!(m.limits.memory > 0 && !m.limits.timeout.is_zero() && m.limits.max_concurrency >= 1);
    assert!(m.retry.max_attempts >= 1 && m.retry.max >= m.retry.initial, "retry policy {:?}", m.retry);
    match &m.source {
        Source::Core { queue, .. } => assert!(!queue.is_empty()),
        Source::JetStream(js) => {
            assert!(!js.stream.is_empty() && !js.consumer.is_empty());
            assert!(js.ack_wait > m.limits.timeout, "ack_wait {:?} <= timeout {:?}", js.ack_wait, m.limits.timeout);
            assert!((1..=1_000_000).contains(&js.max_ack_pending), "max_ack_pending {}", js.max_ack_pending);
        }
    }
    // What the runtime computes from these durations must not overflow (each of these is an
    // unchecked `+`/`*` in runtime/src, which panics on overflow).
    let timeout = m.limits.timeout;
    assert!(
        Instant::now().checked_add(timeout).is_some(),
        "dispatch.rs: Instant::now() + timeout {timeout:?} overflows"
    );
    let lease = timeout.checked_add(LEASE_GRACE);
    assert!(lease.is_some(), "source/mod.rs: timeout {timeout:?} + LEASE_GRACE overflows");
    if m.store.backend == Backend::NatsKv {
        let ttl = m.idempotency.as_ref().map_or(manifest::DEFAULT_IDEMPOTENCY_TTL, |i| i.ttl);
        let max_age = ttl.checked_add(timeout).and_then(|d| d.checked_add(LEASE_GRACE));
        assert!(max_age.is_some(), "runtime.rs: ttl {ttl:?} + timeout {timeout:?} + LEASE_GRACE overflows");
    }
    if let Source::JetStream(js) = &m.source {
        let period = js.ack_wait / 2;
        assert!(
            tokio_like_instant_add(period),
            "source/jetstream.rs: Instant::now() + ack_wait/2 ({period:?}) overflows"
        );
        assert!(
            i64::try_from(js.ack_wait.as_nanos()).is_ok(),
            "ack_wait {:?} does not fit the consumer config's i64 nanoseconds",
            js.ack_wait
        );
    }
    for attempt in [1, 2, 10, 1000, u32::MAX] {
        for hint in [None, Some(m.retry.initial), Some(Duration::MAX)] {
            let d = m.retry.delay(attempt, hint);
            assert!(d <= m.retry.max, "retry delay {d:?} above max {:?}", m.retry.max);
        }
    }
    if let Some(dl) = &m.dead_letter {
        assert!(sluice::testing::validate_literal(&dl.subject).is_ok(), "dead-letter subject {:?}", dl.subject);
        assert!(!dl.create_stream || dl.stream.is_some());
    }
    for p in &m.publish {
        assert!(sluice::testing::SubjectPattern::parse(p.as_str()).is_ok());
    }
    // Spans recorded for later errors must lie within the text (they are sliced by `locate`).
    let len = m.file.text.len();
    assert!(m.spans.name.end <= len && m.spans.component.end <= len);
    let _ = m.error_at(m.spans.name.clone(), "x").to_string();
    let _ = m.error_at(m.spans.component.clone(), "x").to_string();
}

/// `tokio::time::Instant + Duration` is `std::time::Instant + Duration` underneath.
fn tokio_like_instant_add(d: Duration) -> bool {
    Instant::now().checked_add(d).is_some()
}
