//! Python and JavaScript handlers, built by scripts/build-plugins.sh with the pinned
//! toolchains over the SDKs in guest-sdk/, run end to end: their outputs, state and failures
//! behave as a Rust handler's do. One Sluice serves both languages per test, and the tests
//! stay few, since each component is large (its compile is cached across the suite).

use std::time::{Duration, Instant};

use futures::StreamExt;
use sluice_tests::{Sluice, client, header, manifest, nats, request, stream, stream_messages, sync, text};

const LANGS: [&str; 2] = ["py", "js"];

/// The probe of each language on subject `probe.LANG`, with `extra` manifest sections.
fn probes(extra: &str) -> Vec<(String, String)> {
    LANGS
        .iter()
        .map(|lang| {
            let name = format!("probe-{lang}");
            (format!("{name}.toml"), manifest(&name, &name, &format!("probe.{lang}"), extra))
        })
        .collect()
}

fn refs(manifests: &[(String, String)]) -> Vec<(&str, String)> {
    manifests.iter().map(|(file, text)| (file.as_str(), text.clone())).collect()
}

#[tokio::test]
async fn python_and_javascript_handlers_reply_publish_and_keep_state() {
    let server = nats();
    let extra =
        "[limits]\nmemory = \"64MiB\"\n\n[capabilities]\npublish = [\"probe.out\"]\n\n[store]\nbackend = \"memory\"";
    let sluice = Sluice::start(&server, &refs(&probes(extra))).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("probe.out").await.unwrap();
    sync(&nc).await;

    for lang in LANGS {
        let subject = format!("probe.{lang}");
        let echo = request(&nc, &subject, "hello").await;
        assert_eq!((text(&echo).as_str(), header(&echo, "Probe-Lang").as_deref()), ("hello", Some(lang)));

        assert_eq!(text(&request(&nc, &subject, "publish").await), "published", "{lang}");
        let published = tokio::time::timeout(Duration::from_secs(5), out.next()).await.unwrap().unwrap();
        assert_eq!(text(&published), format!("from {subject}"));
        assert_eq!(header(&published, "Probe-Lang").as_deref(), Some(lang));

        // kv and dedup state outlives the instance (each call gets a fresh one).
        assert_eq!(text(&request(&nc, &subject, "kv").await), "1", "{lang}");
        assert_eq!(text(&request(&nc, &subject, "kv").await), "2", "{lang}");
        assert_eq!(text(&request(&nc, &subject, "dedup k").await), "first", "{lang}");
        assert_eq!(text(&request(&nc, &subject, "dedup k").await), "seen", "{lang}");
    }
    sluice.stop().await;
}

#[tokio::test]
async fn python_and_javascript_failures_reach_the_reply_and_the_dead_letter_readably() {
    let server = nats();
    let js = stream(&server, "DLQ", &["dlq.>"]).await;
    // Backoff alone is 10 ms: a retry taking 300 ms shows the handler's own delay was kept.
    let extra = "[limits]\nmemory = \"64MiB\"\n\n[store]\nbackend = \"memory\"\n\n\
                 [retry]\nmax_attempts = 2\ninitial = \"10ms\"\njitter = \"none\"\n\n\
                 [dead_letter]\nsubject = \"dlq.probe\"\nstream = \"DLQ\"";
    let sluice = Sluice::start(&server, &refs(&probes(extra))).await;
    let nc = client(&server).await;

    let mut dead = 0;
    for lang in LANGS {
        let subject = format!("probe.{lang}");
        let reply = request(&nc, &subject, "reject").await;
        assert_eq!(header(&reply, "Sluice-Failure-Kind").as_deref(), Some("rejected"), "{lang}");
        assert_eq!(header(&reply, "Sluice-Failure-Reason").as_deref(), Some("rejected on purpose"));
        assert_eq!(header(&reply, "Sluice-Attempts").as_deref(), Some("1"));

        let started = Instant::now();
        let reply = request(&nc, &subject, "retry").await;
        assert!(started.elapsed() >= Duration::from_millis(300), "{lang}: retried after {:?}", started.elapsed());
        assert_eq!(header(&reply, "Sluice-Failure-Kind").as_deref(), Some("retries-exhausted"), "{lang}");
        assert_eq!(header(&reply, "Sluice-Last-Failure-Kind").as_deref(), Some("retry-requested"));
        assert_eq!(header(&reply, "Sluice-Failure-Reason").as_deref(), Some("not yet (attempt 2)"));

        // An uncaught exception is retried, and reads as what it was, not as a trap.
        let reply = request(&nc, &subject, "raise 42").await;
        let reason = if lang == "py" { "ValueError: bad value 42" } else { "RangeError: bad value 42" };
        assert_eq!(header(&reply, "Sluice-Failure-Kind").as_deref(), Some("retries-exhausted"), "{lang}");
        assert_eq!(header(&reply, "Sluice-Last-Failure-Kind").as_deref(), Some("retry-requested"), "{lang}");
        assert_eq!(header(&reply, "Sluice-Failure-Reason").as_deref(), Some(reason));
        assert_eq!(header(&reply, "Sluice-Attempts").as_deref(), Some("2"));

        dead += 3;
        let letters = stream_messages(&js, "DLQ", dead, Duration::from_secs(10)).await;
        let last = letters.last().unwrap();
        assert_eq!(last.headers.get("Sluice-Failure-Reason").map(|v| v.as_str()), Some(reason));
        assert_eq!(last.headers.get("Sluice-Handler").map(|v| v.as_str()), Some(format!("probe-{lang}").as_str()));
        assert_eq!(&last.payload[..], b"raise 42");
    }
    sluice.stop().await;
}

#[tokio::test]
async fn the_python_and_javascript_order_validators_match_the_rust_one() {
    let server = nats();
    let extra = "[limits]\nmemory = \"64MiB\"\n\n[capabilities]\npublish = [\"orders.validated\"]\n\n\
                 [config]\ncurrency = \"EUR\"";
    let manifests: Vec<(String, String)> = ["order-validator", "order-validator-py", "order-validator-js"]
        .iter()
        .map(|name| (format!("{name}.toml"), manifest(name, name, &format!("orders.{name}"), extra)))
        .collect();
    let sluice = Sluice::start(&server, &refs(&manifests)).await;
    let nc = client(&server).await;
    let mut validated = nc.subscribe("orders.validated").await.unwrap();
    sync(&nc).await;

    let order = r#"{"items":[{"unit_price_cents":1250,"quantity":2,"sku":"A1"},{"sku":"B2","quantity":1,"unit_price_cents":99}],
        "currency":"EUR","customer":"c-7","id":"o-1"}"#;
    let bad = [
        r#"{"id":"o-2","customer":"c-7","currency":"EUR","items":[{"sku":"A1","quantity":0,"unit_price_cents":5}]}"#,
        r#"{"id":"o-3","customer":"c-7","currency":"USD","items":[{"sku":"A1","quantity":1,"unit_price_cents":5}]}"#,
        r#"{"id":"o-4","customer":" ","currency":"EUR","items":[]}"#,
        r#"{"id":"o-5","customer":"c-7","currency":"EUR","items":[]}"#,
    ];
    let mut outputs = Vec::new();
    let mut reasons = Vec::new();
    for (name, _) in &manifests {
        let subject = format!("orders.{}", name.trim_end_matches(".toml"));
        nc.publish(subject.clone(), order.into()).await.unwrap();
        let out = tokio::time::timeout(Duration::from_secs(10), validated.next()).await.unwrap().unwrap();
        assert_eq!(header(&out, "Content-Type").as_deref(), Some("application/json"), "{name}");
        outputs.push(text(&out));
        let mut these = Vec::new();
        for payload in bad {
            let reply = request(&nc, &subject, payload).await;
            assert_eq!(header(&reply, "Sluice-Failure-Kind").as_deref(), Some("rejected"), "{name}: {payload}");
            these.push(header(&reply, "Sluice-Failure-Reason").unwrap());
        }
        reasons.push(these);
        let reply = request(&nc, &subject, "not json").await;
        assert!(header(&reply, "Sluice-Failure-Reason").unwrap().starts_with("invalid JSON payload"), "{name}");
    }
    // The same bytes out, and the same reasons, from all three languages.
    assert!(outputs[0].contains(r#""total_cents":2599"#), "{}", outputs[0]);
    assert_eq!(outputs[1], outputs[0], "Python output differs");
    assert_eq!(outputs[2], outputs[0], "JavaScript output differs");
    assert_eq!(reasons[1], reasons[0], "Python reasons differ");
    assert_eq!(reasons[2], reasons[0], "JavaScript reasons differ");
    sluice.stop().await;
}
