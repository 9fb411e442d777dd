//! What the process costs, from the kernel: CPU (getrusage), bytes written (/proc/self/io),
//! and every fsync/fdatasync any thread or library of this process makes (counted by
//! interposing the two libc symbols: Rust's std, redb, fjall and the bundled SQLite all call
//! them through libc, and the executable's own definition wins at link time).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

static FSYNCS: AtomicU64 = AtomicU64::new(0);
static FDATASYNCS: AtomicU64 = AtomicU64::new(0);

/// `fsync(2)`, counted.
///
/// # Safety
/// As `fsync(2)`: any fd value is allowed; the kernel checks it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fsync(fd: libc::c_int) -> libc::c_int {
    FSYNCS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: a raw syscall with an integer argument; errno is set by the libc wrapper.
    unsafe { libc::syscall(libc::SYS_fsync, fd) as libc::c_int }
}

/// `fdatasync(2)`, counted.
///
/// # Safety
/// As `fdatasync(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdatasync(fd: libc::c_int) -> libc::c_int {
    FDATASYNCS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_fdatasync, fd) as libc::c_int }
}

/// (fsync calls, fdatasync calls) so far, all threads.
pub fn syncs() -> (u64, u64) {
    (FSYNCS.load(Ordering::Relaxed), FDATASYNCS.load(Ordering::Relaxed))
}

/// (user, system) CPU of the whole process (all threads, background workers included), µs.
pub fn cpu_us() -> (u64, u64) {
    // SAFETY: getrusage writes into the struct we hand it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return (0, 0);
    }
    let us = |t: libc::timeval| (t.tv_sec as u64) * 1_000_000 + t.tv_usec as u64;
    (us(usage.ru_utime), us(usage.ru_stime))
}

/// From /proc/self/io: (`wchar`: bytes handed to write-like syscalls, `write_bytes`: bytes
/// this process caused to be sent to the block layer, counted when pages are dirtied).
pub fn io() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/self/io") else { return (0, 0) };
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<u64>().ok())).unwrap_or(0)
    };
    (field("wchar:"), field("write_bytes:"))
}

/// Apparent size of every file under `dir`, bytes.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
