//! Renders `bench/STORES.md`: method, machine, versions, durability settings, results. The
//! hand-written part below the marker line is kept when the file is regenerated.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use crate::{Args, Outcome};

pub const MARKER: &str = "<!-- Written by hand below this line; `make bench-stores` keeps it. -->";

pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() as f64 * p).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// The disk's own cost of a durable 4 KiB write: `pwrite` + `fdatasync`, median and p99 (ms).
pub fn probe_fsync(dir: &Path) -> (f64, f64) {
    let path = dir.join("sluice-store-bench-fsync-probe");
    let mut times = Vec::new();
    if let Ok(mut f) = std::fs::File::create(&path) {
        let block = [0x5au8; 4096];
        for _ in 0..200 {
            let t = Instant::now();
            if f.write_all(&block).and_then(|()| f.sync_data()).is_err() {
                break;
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let _ = std::fs::remove_file(&path);
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn machine(args: &Args) -> String {
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = read("/proc/meminfo")
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse::<u64>()
        .unwrap_or(0)
        / 1024
        / 1024;
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    let dir = std::fs::canonicalize(&args.dir).unwrap_or_else(|_| args.dir.clone());
    let mounts = read("/proc/mounts");
    let fs = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && dir.starts_with(f[1])).then(|| (f[1].len(), format!("{} on {} ({})", f[2], f[0], f[3])))
        })
        .max_by_key(|(n, _)| *n)
        .map_or_else(|| "unknown".to_owned(), |(_, s)| s);
    format!("{cores} cores ({cpu}), {mem} GiB RAM, Linux {kernel}; data directory {} on {fs}", dir.display())
}

fn versions() -> String {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap_or_default();
    let version = |name: &str| {
        let needle = format!("name = \"{name}\"\nversion = \"");
        lock.find(&needle).and_then(|i| lock[i + needle.len()..].split('"').next()).unwrap_or("?").to_owned()
    };
    format!(
        "redb {}, fjall {} (lsm-tree {}), rusqlite {} with bundled SQLite {} (libsqlite3-sys {})",
        version("redb"),
        version("fjall"),
        version("lsm-tree"),
        version("rusqlite"),
        rusqlite::version(),
        version("libsqlite3-sys")
    )
}

fn describe(name: &str) -> (&'static str, &'static str) {
    match name {
        "redb-random" => (
            "redb as today: dedup table keyed by the random key; (expires_ms, key) index table for the sweep; kv table; outbox table keyed by seq",
            "`Durability::Immediate` (the default), 1-phase commit with checksums, quick-repair off: one `fdatasync` per commit",
        ),
        "redb-log" => (
            "redb append log: dedup records keyed by a growing sequence (appends), looked up through an in-memory hash index of live keys rebuilt at open; kv and outbox tables as above",
            "as redb-random",
        ),
        "fjall" => (
            "fjall: keyspaces dedup, kv, outbox (handler-prefixed keys); one cross-keyspace `WriteBatch` per group; TTL by a compaction filter",
            "`WriteBatch::durability(Some(PersistMode::SyncData))`: the journal is written and `fdatasync`ed before `commit` returns",
        ),
        "sqlite" => (
            "SQLite: WITHOUT ROWID tables dedup (handler, key) with an index on expires, kv, outbox (handler, seq); one transaction per group",
            "`journal_mode=WAL`, `synchronous=FULL`: the WAL is synced (`fsync`: the bundled build has no `HAVE_FDATASYNC`) at every commit; automatic checkpoints (1000 pages) sync the database file",
        ),
        _ => ("", ""),
    }
}

/// Syncs per message, naming the call (SQLite's build uses `fsync`; redb and fjall's journal
/// `fdatasync`; fjall's flushes `fsync` new files and directories).
fn syncs(fsyncs: u64, fdatasyncs: u64, n: f64) -> String {
    match (fsyncs, fdatasyncs) {
        (0, 0) => "0".to_owned(),
        (f, 0) => format!("{:.3} fsync", f as f64 / n),
        (0, d) => format!("{:.3} fdatasync", d as f64 / n),
        (f, d) => format!("{:.3} ({:.3} fsync + {:.3} fdatasync)", (f + d) as f64 / n, f as f64 / n, d as f64 / n),
    }
}

fn kb(b: f64) -> String {
    if b >= 10_000.0 { format!("{:.1}k", b / 1000.0) } else { format!("{b:.0}") }
}

pub fn render(args: &Args, outcomes: &[Outcome], total_s: f64, probe_start: (f64, f64), previous: &str) -> String {
    let (fs_p50, fs_p99) = probe_fsync(&args.dir);
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# Embedded stores for the outbox commit\n");
    let _ = writeln!(
        w,
        "Generated by `make bench-stores` (`bench/stores/`, its own workspace: not built by `make test` or CI). \
         Issue 17 asks for the embedded store to be chosen by measurement; this is that measurement, of the commit \
         shape the transactional outbox will have. Hand-written conclusions follow the tables.\n"
    );
    let _ = writeln!(w, "## Method\n");
    let _ = writeln!(
        w,
        "Every candidate gets a fresh store preloaded with {} live dedup records (random 32-character hex keys), \
         then, for each group size B in {:?}, runs for about {} s of rounds. A round is B messages; each message:\n\n\
         1. on the hot path, one point lookup of its dedup key (a miss); one lookup in {} is a redelivery of a \
            stored key (a hit, dropped before any commit), so 5% of lookups hit;\n\
         2. then, with the other B-1 messages, **one atomic durable transaction** holding (a) its dedup record \
            (key -> 80 bytes: completed, expires_ms, 32-byte fingerprint), (b) one guest kv write (one of 1000 \
            counter keys, 16 bytes), (c) one outbox entry keyed by (handler, growing seq), 200 random bytes;\n\
         3. then **a second durable transaction** removing the B outbox entries, as the relay does after publishing.\n\n\
         A last run at B={} puts each group's removals into the next group's transaction instead (one durable \
         commit per group: what one writer thread serving both the handlers and the relay would do).\n\n\
         One thread runs lookups and commits in turn, so msg/s is the serial cost (a real writer overlaps lookups \
         with the fsync). Per message: CPU is `getrusage(RUSAGE_SELF)` user+sys over the run (all threads, the \
         engine's background workers included; \"of which user\" leaves out the kernel's share, which is mostly \
         the fsyncs' and depends most on the machine); fsyncs are every `fsync`/`fdatasync` any thread made (the benchmark \
         interposes both libc symbols and counts them), next to the commits it asked for; `write()` bytes is \
         `wchar` and block-layer bytes is `write_bytes` from `/proc/self/io` (the latter counts dirtied pages: \
         write amplification); work an engine defers is waited for at the end of each run and charged to it, in CPU, syncs and bytes but \
         not in msg/s (fjall: the memtable flushes and compactions under way; memtables still filling, 64 MiB each, \
         are flushed when full by a later run; SQLite: a WAL checkpoint); growth is the store directory's size change. Commit latency is the first \
         transaction's (begin to durable return). The caches are all {} MiB and the data set fits in RAM, so \
         reads are cached and the comparison is of write paths and CPU.\n",
        args.preload,
        args.batches,
        args.secs,
        crate::DUP_EVERY,
        crate::PIGGYBACK_BATCH,
        crate::model::CACHE_BYTES >> 20
    );
    let _ = writeln!(
        w,
        "After the runs: the TTL sweep expires the oldest half of the preload ({} records) with the clock moved \
         past them, and a crash check runs a child process on the same store that commits groups of {} (no \
         removal) and prints each durable commit's last sequence number; after one second it is killed with \
         SIGKILL, the store is reopened (timed) and every acknowledged message must have its outbox entry and its \
         dedup record, with no partial group. SIGKILL keeps the page cache: this checks the engine's commit \
         protocol under a process crash, not power loss (see the crash-safety section).\n",
        args.preload / 2 + 1,
        crate::CRASH_BATCH
    );
    let _ = writeln!(w, "## Machine and versions\n");
    let _ = writeln!(w, "- {}", machine(args));
    let _ = writeln!(
        w,
        "- this disk: an appended 4 KiB `write` + `fdatasync` took {:.2} ms median, {:.2} ms p99 before the run, \
         {fs_p50:.2} / {fs_p99:.2} ms after it (so msg/s at small B is mostly this number; CPU/msg and fsyncs/msg \
         carry over to other machines)",
        probe_start.0, probe_start.1
    );
    let _ = writeln!(w, "- {}", versions());
    let load = read("/proc/loadavg");
    let _ = writeln!(
        w,
        "- load average at the end {} (a shared machine: other builds run beside this; treat differences under ~20% as noise)",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let _ = writeln!(w, "- whole run: {total_s:.0} s, `--preload {} --secs {}`\n", args.preload, args.secs);
    let _ = writeln!(w, "## Candidates and their durability settings\n");
    let _ = writeln!(w, "| candidate | layout | durable commit |\n|---|---|---|");
    for o in outcomes {
        let (layout, durability) = describe(&o.name);
        let _ = writeln!(w, "| `{}` | {layout} | {durability} |", o.name);
    }
    let _ = writeln!(w, "\n## Results: one outbox commit per message, group-committed\n");
    let _ = writeln!(
        w,
        "| candidate | B | msgs | msg/s | CPU µs/msg | of which user | commits/msg | syncs/msg (any thread) | write() B/msg | block-layer B/msg | growth B/msg | lookup µs | commit p50 ms | commit p99 ms | removal p99 ms |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for o in outcomes {
        for c in &o.cells {
            let n = c.msgs.max(1) as f64;
            let _ = writeln!(
                w,
                "| `{}` | {}{} | {} | {:.0} | {:.1} | {:.1} | {:.3} | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {} |",
                o.name,
                c.batch,
                if c.piggyback { " (removal in next commit)" } else { "" },
                c.msgs,
                n / c.wall_s,
                c.cpu_us as f64 / n,
                c.user_us as f64 / n,
                c.commits as f64 / n,
                syncs(c.fsyncs, c.fdatasyncs, n),
                kb(c.wchar as f64 / n),
                kb(c.write_bytes as f64 / n),
                kb(c.growth as f64 / n),
                c.lookup_s * 1e6 / c.lookups.max(1) as f64,
                percentile(&c.commit_ms, 0.5),
                percentile(&c.commit_ms, 0.99),
                if c.piggyback { "-".to_owned() } else { format!("{:.2}", percentile(&c.remove_ms, 0.99)) },
            );
        }
    }
    let wrong: u64 = outcomes.iter().flat_map(|o| &o.cells).map(|c| c.wrong).sum();
    let hits: u64 = outcomes.iter().flat_map(|o| &o.cells).map(|c| c.hits).sum();
    let _ = writeln!(
        w,
        "\nLookups answered as expected: {hits} hits on stored keys, {wrong} wrong answers (a hit on a new key or a miss on a stored one).\n"
    );
    let _ = writeln!(w, "## Store, TTL sweep, restart and kill -9\n");
    let _ = writeln!(
        w,
        "| candidate | preload s | size after preload MiB | reopen (clean) ms | background settle ms | sweep: removed | sweep total ms | longest step ms (a writer pause, but for fjall) | how | today's full-scan sweep ms | in-memory index MiB | kill -9: acked msgs | lost acked | partial | reopen after kill ms |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|"
    );
    for o in outcomes {
        let crash = match &o.crash.error {
            Some(e) => format!("error: {e} | | |"),
            None => format!(
                "{} | {} | {} | {:.0}",
                o.crash.acked,
                o.crash.lost_acked,
                o.crash.holes + o.crash.torn,
                o.crash.reopen_ms
            ),
        };
        let _ = writeln!(
            w,
            "| `{}` | {:.1} | {:.0} | {:.0} | {:.0} | {}{} | {:.0} | {:.0} | {} | {} | {} | {} |",
            o.name,
            o.preload_s,
            o.size_after_preload as f64 / 1048576.0,
            o.reopen_clean_ms,
            o.settle_ms,
            o.sweep.removed,
            if o.sweep_check { "" } else { " (check failed)" },
            o.sweep.total_ms,
            o.sweep.longest_ms,
            if o.sweep.left > 0 {
                format!("{}; {} expired records still stored after it", o.sweep.how, o.sweep.left)
            } else {
                o.sweep.how.to_owned()
            },
            o.full_scan_ms.map_or_else(|| "-".to_owned(), |m| format!("{m:.0}")),
            if o.index_bytes > 0 { format!("{:.0}", o.index_bytes as f64 / 1048576.0) } else { "-".to_owned() },
            crash
        );
    }
    for o in outcomes {
        if let Some(ms) = o.compacting_ms {
            let _ = writeln!(
                w,
                "\n`{}` compacted in the background for {ms:.0} ms during the measured runs (in their CPU figures).",
                o.name
            );
        }
    }
    let _ = writeln!(w);
    let kept = previous.split_once(MARKER).map(|(_, rest)| rest.trim_start_matches('\n')).unwrap_or("");
    let _ = writeln!(w, "{MARKER}\n");
    if kept.is_empty() {
        let _ = writeln!(w, "## Recommendation\n\n(to be written)");
    } else {
        let _ = write!(w, "{kept}");
    }
    s
}
