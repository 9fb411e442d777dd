//! A handler that does what its payload tells it to, good or bad. The runtime's sandbox,
//! retry and dead-letter tests use it.
//!
//! | payload                       | behaviour                                                   |
//! |-------------------------------|-------------------------------------------------------------|
//! | `ok`                          | answers `ok`                                                |
//! | `trap`                        | executes `unreachable`                                      |
//! | `panic`                       | panics                                                      |
//! | `loop`                        | spins forever                                               |
//! | `alloc`                       | allocates 1 MiB blocks until memory runs out                |
//! | `sleep:MS`                    | sleeps MS milliseconds (a WASI sleep), then answers `slept` |
//! | `publish:SUBJECT`             | publishes to SUBJECT, answers with what the host said       |
//! | `publish-then-reject:SUBJECT` | publishes to SUBJECT, then fails with `Error::Reject`       |
//! | `fail-until:K:SUBJECT`        | fails with `Error::Retry` on attempts 1..=K, then publishes `attempt N` to SUBJECT |
//! | `config-gate:SUBJECT`         | rejects while config `broken` is `true`, else publishes to SUBJECT |
//! | `work:MS:SUBJECT`             | sleeps MS milliseconds, then publishes `worked` to SUBJECT  |
//! | `kv-set:KEY:VALUE`            | sets KEY in the handler's kv, answers `set`                 |
//! | `kv-get:KEY`                  | answers the value of KEY, or `none`                         |
//! | `count-flaky:KEY`             | adds 1 to KEY in kv (compare-and-swap), checks it reads it back, fails (retry) on odd attempts, answers the count |
//! | `tally:KEY:SUBJECT`           | adds 1 to KEY in kv (compare-and-swap; retry when another message won) and publishes the new count to SUBJECT |
//! | `mark:KEY`                    | `dedup.check-and-mark(KEY, 1h)`: answers `first` or `seen`  |
//! | `trace:SUBJECT` (JSON)        | sleeps `sleep_us` microseconds (a field of the JSON payload), failing with `Error::Retry` on attempts 1..=`fail_attempts` and with `Error::Reject` when `poison` is true (unless config `fixed` is `true`); then publishes `{"key", "seq", "attempt", "start_ns", "end_ns"}` (the fields `key` and `seq` copied, the times of the call's start and end, wall clock) to SUBJECT |
//! | `recurse`                     | recurses until the stack overflows                          |
//! | `publish-big:N`               | publishes one N-byte message to `allowed.big`, answers what the host said |
//! | `publish-many:N`              | publishes N messages to `allowed.many`, answers how many were accepted |
//! | `escape`                      | tries a file, a socket and the environment; answers what happened |
//! | `log-flood:N`                 | writes N bytes of log lines to stderr, then answers `logged` |
//! | `publish-header:NAME`         | publishes to `allowed.header` with header NAME set to `x`, answers what the host said |
//! | `retry`                       | fails with `Error::Retry`                                   |
//! | `reject`                      | fails with `Error::Reject`                                  |
//! | `count`                       | answers how many messages this instance has handled, this one included (1 every time with fresh instances; 1, 2, 3, ... with warm ones) |
//!
//! A JSON payload `{"cmd": "COMMAND", ...}` runs COMMAND (the other fields are there for the
//! host to read, an idempotency key say).
//!
//! "Answers" means a reply when the message is a request. Publications carry a `Test-Tag`
//! header with the `tag` config value when one is set (tests use it to tell runtimes apart).

use sluice_guest::{Error, Headers, Message, Result};

/// Messages this instance has handled: a global, which only a warm instance keeps.
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn handle(msg: Message) -> Result {
    let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let text = msg.text()?.trim();
    let command = if text.starts_with('{') {
        let doc: serde_json::Value = msg.json()?;
        doc.get("cmd").and_then(|c| c.as_str()).ok_or_else(|| Error::reject("JSON payload without \"cmd\""))?.to_owned()
    } else {
        text.to_owned()
    };
    let (verb, arg) = command.split_once(':').unwrap_or((command.as_str(), ""));
    match verb {
        "ok" => answer(&msg, "ok")?,
        "count" => answer(&msg, &calls.to_string())?,
        "trap" => trap(),
        "panic" => panic!("asked to panic"),
        "loop" => spin(),
        "alloc" => hog(),
        "retry" => return Err(Error::retry("asked to retry")),
        "reject" => return Err(Error::reject("asked to reject")),
        "sleep" => {
            let ms: u64 = arg.parse().map_err(|_| Error::reject(format!("bad sleep command {command:?}")))?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
            answer(&msg, "slept")?;
        }
        "publish" => {
            let result = match publish(arg, "from misbehave") {
                Ok(()) => "published".to_owned(),
                Err(e) => format!("refused: {e}"),
            };
            answer(&msg, &result)?;
        }
        "publish-header" => {
            let mut headers = Headers::new();
            headers.insert(arg, "x");
            let result = match sluice_guest::publish_with_headers("allowed.header", &headers, "with a header") {
                Ok(()) => "published".to_owned(),
                Err(e) => format!("refused: {e}"),
            };
            answer(&msg, &result)?;
        }
        "publish-then-reject" => {
            publish(arg, "must not be sent")?;
            return Err(Error::reject("published, then rejected"));
        }
        "fail-until" => {
            let (k, subject) = arg.split_once(':').unwrap_or((arg, ""));
            let k: u32 = k.parse().map_err(|_| Error::reject(format!("bad fail-until command {command:?}")))?;
            let attempt = msg.delivery().attempt;
            if attempt <= k {
                return Err(Error::retry(format!("attempt {attempt} of {k} planned failures")));
            }
            publish(subject, &format!("attempt {attempt}"))?;
        }
        "work" => {
            let (ms, subject) = arg.split_once(':').unwrap_or((arg, ""));
            let ms: u64 = ms.parse().map_err(|_| Error::reject(format!("bad work command {command:?}")))?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
            publish(subject, "worked")?;
        }
        "kv-set" => {
            let (key, value) = arg.split_once(':').unwrap_or((arg, ""));
            sluice_guest::kv::set(key, value)?;
            answer(&msg, "set")?;
        }
        "count-flaky" => {
            // Counts this message in kv (a compare-and-swap: concurrent messages of one key
            // must not lose counts), then fails on odd attempts: the count must only stick
            // for the attempt that succeeds.
            let parse =
                |v: Option<&[u8]>| -> u64 { v.and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()).unwrap_or(0) };
            let before = sluice_guest::kv::get(arg)?;
            let n = parse(before.as_deref()) + 1;
            if !sluice_guest::kv::compare_and_swap(arg, before.as_deref(), n.to_string())? {
                return Err(Error::retry("another message changed the counter first"));
            }
            if parse(sluice_guest::kv::get(arg)?.as_deref()) != n {
                return Err(Error::reject("the call does not read its own write"));
            }
            let attempt = msg.delivery().attempt;
            if attempt % 2 == 1 {
                return Err(Error::retry(format!("planned failure after kv.set on attempt {attempt}")));
            }
            answer(&msg, &n.to_string())?;
        }
        "tally" => {
            // Counts this message under KEY in kv and publishes the count to SUBJECT: after
            // crashes and redeliveries, the counts published for a key must be exactly 1..n
            // for its n messages (a count that leaked from a failed or repeated call skips one).
            let (key, subject) = arg.split_once(':').unwrap_or((arg, ""));
            let before = sluice_guest::kv::get(key)?;
            let n = before.as_deref().and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok()).unwrap_or(0) + 1;
            if !sluice_guest::kv::compare_and_swap(key, before.as_deref(), n.to_string())? {
                return Err(Error::retry("another message changed the counter first"));
            }
            publish(subject, &n.to_string())?;
        }
        "kv-get" => {
            let value = sluice_guest::kv::get(arg)?;
            let text = value.map_or_else(|| "none".to_owned(), |v| String::from_utf8_lossy(&v).into_owned());
            answer(&msg, &text)?;
        }
        "mark" => {
            let first = sluice_guest::dedup::check_and_mark(arg, std::time::Duration::from_secs(3600))?;
            answer(&msg, if first { "first" } else { "seen" })?;
        }
        "trace" => {
            // For the ordering tests: when each message ran, so that a test can check that
            // no two messages of one key overlapped and that different keys did.
            let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let start = now();
            let doc: serde_json::Value = msg.json()?;
            let sleep_us = doc.get("sleep_us").and_then(serde_json::Value::as_u64).unwrap_or(0);
            std::thread::sleep(std::time::Duration::from_micros(sleep_us));
            let attempt = msg.delivery().attempt;
            let fail_attempts = doc.get("fail_attempts").and_then(serde_json::Value::as_u64).unwrap_or(0);
            if u64::from(attempt) <= fail_attempts {
                return Err(Error::retry(format!("planned failure on attempt {attempt}")));
            }
            let poison = doc.get("poison").and_then(serde_json::Value::as_bool).unwrap_or(false);
            if poison && sluice_guest::config("fixed").as_deref() != Some("true") {
                return Err(Error::reject("a poison message (until config `fixed` is true)"));
            }
            let record = serde_json::json!({
                "key": doc.get("key"),
                "seq": doc.get("seq"),
                "attempt": attempt,
                "start_ns": start.to_string(),
                "end_ns": now().to_string(),
            });
            publish(arg, &record.to_string())?;
        }
        "recurse" => {
            let depth = recurse(std::hint::black_box(0));
            answer(&msg, &depth.to_string())?;
        }
        "publish-big" => {
            let n: usize = arg.parse().map_err(|_| Error::reject("bad publish-big"))?;
            let result = match sluice_guest::publish("allowed.big", vec![b'x'; n]) {
                Ok(()) => "published".to_owned(),
                Err(e) => format!("refused: {e}"),
            };
            answer(&msg, &result)?;
        }
        "publish-many" => {
            let n: usize = arg.parse().map_err(|_| Error::reject("bad publish-many"))?;
            let accepted = (0..n).filter(|i| sluice_guest::publish("allowed.many", i.to_string()).is_ok()).count();
            answer(&msg, &format!("accepted {accepted}"))?;
        }
        "escape" => {
            let fs = match std::fs::read_to_string("/etc/passwd") {
                Ok(_) => "read".to_owned(),
                Err(e) => format!("denied ({e})"),
            };
            let net = match std::net::TcpStream::connect("127.0.0.1:4222") {
                Ok(_) => "connected".to_owned(),
                Err(e) => format!("denied ({e})"),
            };
            let env = std::env::vars().count();
            answer(&msg, &format!("fs={fs}; net={net}; env={env}"))?;
        }
        "log-flood" => {
            let n: usize = arg.parse().map_err(|_| Error::reject("bad log-flood"))?;
            let line = "x".repeat(1023);
            for _ in 0..n / 1024 {
                eprintln!("{line}");
            }
            answer(&msg, "logged")?;
        }
        "config-gate" => {
            if sluice_guest::config("broken").as_deref() == Some("true") {
                return Err(Error::reject("handler is broken"));
            }
            publish(arg, "fixed")?;
        }
        _ => return Err(Error::reject(format!("unknown command {command:?}"))),
    }
    Ok(())
}

fn answer(msg: &Message, text: &str) -> Result {
    if msg.reply_to().is_some() {
        sluice_guest::reply(text)?;
    }
    Ok(())
}

fn publish(subject: &str, text: &str) -> std::result::Result<(), sluice_guest::PublishError> {
    let mut headers = Headers::new();
    if let Some(tag) = sluice_guest::config("tag") {
        headers.insert("Test-Tag", tag);
    }
    sluice_guest::publish_with_headers(subject, &headers, text)
}

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 256];
    frame[0] = std::hint::black_box(depth as u8);
    recurse(std::hint::black_box(depth + 1)) + u64::from(frame[0])
}

fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    unreachable!("trap");
}

fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn hog() -> ! {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        // Touch every page so the memory is really used, not just reserved.
        blocks.push(vec![1u8; 1 << 20]);
        std::hint::black_box(&blocks);
    }
}

sluice_guest::handler!(handle);
