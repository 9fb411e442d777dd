//! Measures candidate embedded stores for the transactional outbox commit (issue 17) and
//! writes `bench/STORES.md`. See `bench/stores/README.md`.
//!
//! Usage: `sluice-store-bench [--preload N] [--secs S] [--only a,b] [--batches 1,16] [--dir DIR] [--out FILE]`
//! (`make bench-stores`), and, for the crash check it runs itself,
//! `sluice-store-bench crash-child CANDIDATE DIR FIRST_SEQ`.

mod fjall_lsm;
mod model;
mod redb_log;
mod redb_random;
mod report;
mod sqlite;
mod sys;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use model::{CANDIDATES, Key, Msg, R, Store, Sweep, key_of};

/// Simulated clock: every preloaded record is live at `T0`; record `i` expires at `T0+1+i`.
const T0: u64 = 1_000_000_000_000;
/// Records written by the measured runs expire long after the sweep's clock.
const RUN_EXPIRES: u64 = T0 + 1_000_000_000_000;
const PRELOAD_SALT: u64 = 1;
const RUN_SALT: u64 = 2;
const CRASH_SALT: u64 = 3;
pub const BATCHES: &[usize] = &[1, 16, 64, 256];
/// The group size of the extra run where the relay's removals ride in the next commit.
pub const PIGGYBACK_BATCH: usize = 64;
/// One lookup in this many is a duplicate delivery of a stored key (a hit: 5%).
pub const DUP_EVERY: u64 = 20;
/// The crash child commits groups of this many messages.
pub const CRASH_BATCH: usize = 16;

#[derive(Debug, Clone)]
pub struct Args {
    pub preload: u64,
    pub secs: f64,
    pub only: Vec<String>,
    pub dir: PathBuf,
    pub out: PathBuf,
    /// Group sizes to run (the piggybacked run is added when PIGGYBACK_BATCH is among them).
    pub batches: Vec<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct Cell {
    pub batch: usize,
    pub msgs: u64,
    pub wall_s: f64,
    /// Whether the relay's removals ride in the next group's commit instead of their own.
    pub piggyback: bool,
    pub cpu_us: u64,
    pub user_us: u64,
    pub commits: u64,
    pub fsyncs: u64,
    pub fdatasyncs: u64,
    pub wchar: u64,
    pub write_bytes: u64,
    pub growth: i64,
    pub lookups: u64,
    pub lookup_s: f64,
    pub hits: u64,
    pub wrong: u64,
    pub commit_ms: Vec<f64>,
    pub remove_ms: Vec<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct Crash {
    pub acked: u64,
    pub present: u64,
    pub lost_acked: u64,
    pub holes: u64,
    pub torn: u64,
    pub reopen_ms: f64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub name: String,
    pub preload_s: f64,
    pub settle_ms: f64,
    pub size_after_preload: u64,
    pub cells: Vec<Cell>,
    pub full_scan_ms: Option<f64>,
    pub sweep: Sweep,
    pub sweep_check: bool,
    pub index_bytes: u64,
    pub reopen_clean_ms: f64,
    /// Background compaction time during the measured runs (fjall), ms.
    pub compacting_ms: Option<f64>,
    pub crash: Crash,
    pub total_s: f64,
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = if argv.first().map(String::as_str) == Some("crash-child") {
        crash_child(&argv[1..])
    } else {
        parse(&argv).and_then(|args| run(&args))
    };
    if let Err(e) = result {
        eprintln!("sluice-store-bench: {e}");
        std::process::exit(1);
    }
}

fn parse(argv: &[String]) -> R<Args> {
    let mut args = Args {
        preload: 1_000_000,
        secs: 5.0,
        only: CANDIDATES.iter().map(|s| (*s).to_owned()).collect(),
        dir: std::env::temp_dir(),
        out: PathBuf::from("bench/STORES.md"),
        batches: BATCHES.to_vec(),
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--preload" => args.preload = value()?.parse()?,
            "--secs" => args.secs = value()?.parse()?,
            "--only" => args.only = value()?.split(',').map(str::to_owned).collect(),
            "--dir" => args.dir = value()?.into(),
            "--out" => args.out = value()?.into(),
            "--batches" => args.batches = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(args)
}

fn run(args: &Args) -> R<()> {
    let started = Instant::now();
    let probe_start = report::probe_fsync(&args.dir);
    let mut outcomes = Vec::new();
    for name in &args.only {
        eprintln!("== {name}");
        let outcome = candidate(name, args)?;
        eprintln!("   done in {:.0} s", outcome.total_s);
        outcomes.push(outcome);
    }
    let text = report::render(
        args,
        &outcomes,
        started.elapsed().as_secs_f64(),
        probe_start,
        &std::fs::read_to_string(&args.out).unwrap_or_default(),
    );
    std::fs::write(&args.out, text)?;
    eprintln!("wrote {} in {:.0} s", args.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

fn preload_keys(n: u64) -> impl Iterator<Item = (Key, u64)> {
    (0..n).map(|i| (key_of(i, PRELOAD_SALT), T0 + 1 + i))
}

fn candidate(name: &str, args: &Args) -> R<Outcome> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new().prefix(&format!("sluice-store-{name}-")).tempdir_in(&args.dir)?;
    let dir = tmp.path().to_path_buf();
    let mut out = Outcome { name: name.to_owned(), ..Outcome::default() };
    fjall_lsm::NOW_MS.store(T0, std::sync::atomic::Ordering::Relaxed);
    {
        let mut store = model::open(name, &dir)?;
        let t = Instant::now();
        store.preload(&mut preload_keys(args.preload))?;
        out.preload_s = t.elapsed().as_secs_f64();
        eprintln!("   preloaded {} records in {:.1} s", args.preload, out.preload_s);
        drop(store);
        // Reopen, as a restart would: the layout's start-up cost (the append log's index) shows.
        let t = Instant::now();
        let mut store = model::open(name, &dir)?;
        let reopen_ms = t.elapsed().as_secs_f64() * 1e3;
        out.reopen_clean_ms = reopen_ms;
        // fjall flushes and compacts the bulk load in the background; let that finish so it
        // is not charged to the first batch size (what runs later is charged, as in service).
        out.settle_ms = store.settle();
        out.size_after_preload = sys::dir_size(&dir);
        let compacting0 = store.background_ms();
        let mut next_seq = 0u64;
        let mut rng = fastrand::Rng::with_seed(42);
        let piggyback = args.batches.contains(&PIGGYBACK_BATCH).then_some((PIGGYBACK_BATCH, true));
        let shapes = args.batches.iter().map(|&b| (b, false)).chain(piggyback);
        for (batch, piggyback) in shapes {
            let cell = measure(store.as_mut(), &dir, (batch, piggyback), args, &mut next_seq, &mut rng)?;
            eprintln!(
                "   batch {batch:>3}{}: {:>6} msgs, {:>7.0} msg/s, {:>5.1} µs CPU/msg, p99 commit {:.2} ms",
                if piggyback { " (removal in next commit)" } else { "" },
                cell.msgs,
                cell.msgs as f64 / cell.wall_s,
                cell.cpu_us as f64 / cell.msgs as f64,
                report::percentile(&cell.commit_ms, 0.99)
            );
            out.cells.push(cell);
        }
        out.index_bytes = store.index_bytes();
        out.compacting_ms = store.background_ms().zip(compacting0).map(|(b, a)| b - a);
        out.full_scan_ms = store.full_scan_sweep(T0)?;
        let sweep_now = T0 + 1 + args.preload / 2;
        fjall_lsm::NOW_MS.store(sweep_now, std::sync::atomic::Ordering::Relaxed);
        out.sweep = store.sweep(sweep_now)?;
        out.sweep_check = store.lookup(&key_of(0, PRELOAD_SALT), sweep_now)?.is_none()
            && store.lookup(&key_of(args.preload - 1, PRELOAD_SALT), sweep_now)?.is_some();
        eprintln!(
            "   sweep: {} removed in {:.0} ms (longest step {:.0} ms)",
            out.sweep.removed, out.sweep.total_ms, out.sweep.longest_ms
        );
        fjall_lsm::NOW_MS.store(T0, std::sync::atomic::Ordering::Relaxed);
    }
    out.crash = crash_check(name, &dir).unwrap_or_else(|e| Crash { error: Some(e.to_string()), ..Crash::default() });
    eprintln!(
        "   kill -9: {} acked, {} lost, {} torn, reopened in {:.0} ms {}",
        out.crash.acked,
        out.crash.lost_acked,
        out.crash.torn,
        out.crash.reopen_ms,
        out.crash.error.as_deref().unwrap_or("")
    );
    out.total_s = started.elapsed().as_secs_f64();
    Ok(out)
}

fn measure(
    store: &mut dyn Store,
    dir: &Path,
    (batch, piggyback): (usize, bool),
    args: &Args,
    next_seq: &mut u64,
    rng: &mut fastrand::Rng,
) -> R<Cell> {
    let mut cell = Cell { batch, piggyback, ..Cell::default() };
    let mut pending: Vec<u64> = Vec::new();
    let size0 = sys::dir_size(dir) as i64;
    let (fs0, fds0) = sys::syncs();
    let (wc0, wb0) = sys::io();
    let (user0, sys0) = sys::cpu_us();
    let started = Instant::now();
    let budget = Duration::from_secs_f64(args.secs);
    let mut msgs = Vec::with_capacity(batch);
    let mut seqs = Vec::with_capacity(batch);
    while started.elapsed() < budget || cell.commits < 8 {
        msgs.clear();
        seqs.clear();
        for _ in 0..batch {
            let seq = *next_seq;
            *next_seq += 1;
            let m = Msg::new(seq, RUN_SALT, RUN_EXPIRES, rng);
            let t = Instant::now();
            if store.lookup(&m.key, T0)?.is_some() {
                cell.wrong += 1;
            }
            cell.lookups += 1;
            if seq.is_multiple_of(DUP_EVERY - 1) {
                // A redelivery of a stored message: found, and dropped before any commit.
                let old = key_of(rng.u64(..args.preload), PRELOAD_SALT);
                match store.lookup(&old, T0)? {
                    Some(_) => cell.hits += 1,
                    None => cell.wrong += 1,
                }
                cell.lookups += 1;
            }
            cell.lookup_s += t.elapsed().as_secs_f64();
            seqs.push(m.seq);
            msgs.push(m);
        }
        let t = Instant::now();
        if piggyback {
            // The relay published the previous group while this one ran: its removals go in
            // this group's transaction, one durable commit per group.
            store.commit(&msgs, &pending)?;
            cell.commit_ms.push(t.elapsed().as_secs_f64() * 1e3);
            pending.clone_from(&seqs);
            cell.commits += 1;
        } else {
            store.commit(&msgs, &[])?;
            cell.commit_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            store.remove_outbox(&seqs)?;
            cell.remove_ms.push(t.elapsed().as_secs_f64() * 1e3);
            cell.commits += 2;
        }
        cell.msgs += batch as u64;
    }
    if !pending.is_empty() {
        store.remove_outbox(&pending)?;
    }
    cell.wall_s = started.elapsed().as_secs_f64();
    // Deferred work is charged to the run that caused it: CPU, syncs and bytes, not wall time.
    store.finish_run()?;
    let (user1, sys1) = sys::cpu_us();
    cell.user_us = user1 - user0;
    cell.cpu_us = cell.user_us + (sys1 - sys0);
    let (fs1, fds1) = sys::syncs();
    let (wc1, wb1) = sys::io();
    cell.fsyncs = fs1 - fs0;
    cell.fdatasyncs = fds1 - fds0;
    cell.wchar = wc1 - wc0;
    cell.write_bytes = wb1 - wb0;
    cell.growth = sys::dir_size(dir) as i64 - size0;
    Ok(cell)
}

/// Runs a child that commits groups (no relay removal) on the store in `dir`, reporting
/// each durable commit's last sequence number; kills it with SIGKILL after a second; reopens
/// the store and checks that every acknowledged message's outbox entry and dedup record are
/// there and that nothing half of a group is.
fn crash_check(name: &str, dir: &Path) -> R<Crash> {
    const FIRST: u64 = 1 << 40;
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["crash-child", name, &dir.display().to_string(), &FIRST.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Wait for the child to open the store and start committing, then let it run a second.
    let mut last_acked: Option<u64> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(120)) {
        if line == "ready" || Instant::now() > deadline {
            break;
        }
    }
    let kill_at = Instant::now() + Duration::from_secs(1);
    while Instant::now() < kill_at {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(5)) {
            last_acked = line.parse().ok().or(last_acked);
        }
    }
    child.kill()?; // SIGKILL
    child.wait()?;
    let _ = reader.join();
    // Acks already in the pipe were durable before they were written.
    while let Ok(line) = rx.try_recv() {
        last_acked = line.parse().ok().or(last_acked);
    }
    let t = Instant::now();
    let mut store = model::open(name, dir)?;
    let reopen_ms = t.elapsed().as_secs_f64() * 1e3;
    let present = store.outbox_from(FIRST)?;
    let acked = last_acked.map_or(0, |l| l + 1 - FIRST);
    let mut crash = Crash { acked, present: present.len() as u64, reopen_ms, ..Crash::default() };
    let have: std::collections::HashSet<u64> = present.iter().copied().collect();
    crash.lost_acked = (FIRST..FIRST + acked).filter(|s| !have.contains(s)).count() as u64;
    if let Some(&max) = present.iter().max() {
        crash.holes = (FIRST..=max).filter(|s| !have.contains(s)).count() as u64;
        // A group is all or nothing: whole groups only, each message with its dedup record.
        if !(max + 1 - FIRST).is_multiple_of(CRASH_BATCH as u64) {
            crash.torn += 1;
        }
        for &s in &present {
            if store.lookup(&key_of(s, CRASH_SALT), T0)?.is_none() {
                crash.torn += 1;
            }
        }
    }
    Ok(crash)
}

fn crash_child(argv: &[String]) -> R<()> {
    let [name, dir, first] = argv else { return Err("crash-child CANDIDATE DIR FIRST_SEQ".into()) };
    let mut store = model::open(name, Path::new(dir))?;
    let mut seq: u64 = first.parse()?;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    loop {
        let msgs: Vec<Msg> =
            (0..CRASH_BATCH as u64).map(|i| Msg::new(seq + i, CRASH_SALT, RUN_EXPIRES, &mut rng)).collect();
        store.commit(&msgs, &[])?;
        seq += CRASH_BATCH as u64;
        writeln!(out, "{}", seq - 1)?;
        out.flush()?;
    }
}
