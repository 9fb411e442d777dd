//! Profiling aid: runs one component's `handle` N times in-process, a fresh instance each
//! time (or, with a third argument `warm`, warm instances), and prints the time per call. No
//! NATS involved.
//!
//! It calls internals, through the `testing` feature:
//!
//!     cargo run --release -p sluice --features testing --example dispatch_loop -- plugins/dist/noop.wasm 100000 [warm]

use std::time::Instant;

use sluice::EngineOptions;
use sluice::testing::{Delivery, Engine, Handler, Message, Outcome, dispatch};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let component = args.next().unwrap_or_else(|| "plugins/dist/noop.wasm".into());
    let n: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(100_000);
    let limits = match args.next().as_deref() {
        Some("warm") => "\n[limits]\ninstances = \"warm\"\n",
        _ => "",
    };
    let component = std::fs::canonicalize(component)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.toml");
    let text = format!(
        "[handler]\nname = \"bench\"\ncomponent = {:?}\n\n[source]\nsubject = \"bench\"\n{limits}",
        component.display().to_string()
    );
    std::fs::write(&path, &text)?;
    let manifest = sluice::manifest::parse(&path, text)?;
    let engine = Engine::new(EngineOptions::default())?;
    let handler = Handler::load(&engine, manifest)?;
    let msg = Message { subject: "bench".into(), reply_to: None, headers: vec![], payload: vec![7; 128] };
    let delivery = Delivery { attempt: 1, max_attempts: 1, idempotency_key: None, stream_sequence: None };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let probe = dispatch(&engine, &handler, None, &msg, &delivery);
    println!("dispatch future: {} bytes", size_of_val(&probe));
    drop(probe);
    rt.block_on(async {
        for _ in 0..1000 {
            dispatch(&engine, &handler, None, &msg, &delivery).await;
        }
        let start = Instant::now();
        for _ in 0..n {
            match dispatch(&engine, &handler, None, &msg, &delivery).await {
                Outcome::Success(..) => {}
                Outcome::Failed(f) => anyhow::bail!("call failed: {f:?}"),
            }
        }
        let elapsed = start.elapsed();
        println!("{n} calls in {elapsed:?}: {:.2} µs per call", elapsed.as_secs_f64() * 1e6 / f64::from(n));
        Ok(())
    })
}
