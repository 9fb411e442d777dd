//! The `sluice` binary, end to end: `validate` on the shipped manifests and on a broken one,
//! and `run` + `request` in the embedded default (no NATS server given).

#![allow(clippy::unwrap_used)]

mod common;

use common::{Killed, build_plugins, repo_root};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn sluice() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.current_dir(repo_root());
    cmd
}

#[test]
fn validate_accepts_the_shipped_manifests() {
    build_plugins();
    let out = sluice().args(["validate", "manifests/"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ok: echo"), "{stdout}");
    assert!(stdout.contains("ok: order-validator"), "{stdout}");
}

#[test]
fn validate_points_at_the_broken_line() {
    build_plugins();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("broken.toml");
    let echo = repo_root().join("plugins/dist/echo.wasm");
    std::fs::write(
        &manifest,
        format!("[handler]\nname = \"echo\"\ncomponent = \"{}\"\n\n[source]\nsubject = \"echo\"\n\n[limits]\ntimeout = \"soon\"\n", echo.display()),
    )
    .unwrap();
    let out = sluice().arg("validate").arg(&manifest).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with(&format!("{}:9:11: invalid duration \"soon\"", manifest.display())), "{stderr}");
    assert!(stderr.contains("9 | timeout = \"soon\""), "{stderr}");
}

#[test]
fn engine_flags_are_read_from_the_environment_too() {
    // A bad value must be refused by name before anything starts, whichever way it came.
    let dir = tempfile::tempdir().unwrap();
    let out = sluice()
        .args(["run", &dir.path().display().to_string(), "--nats", "nats://127.0.0.1:1"])
        .env("SLUICE_GUEST_THREADS", "many")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("invalid value 'many'") && stderr.contains("--guest-threads"), "{stderr}");
}

#[test]
fn run_serves_a_request_to_echo_with_the_embedded_server() {
    build_plugins();
    // No --nats: Sluice uses 127.0.0.1:4222 if a server answers there, or starts its own.
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut child = sluice()
        .args(["run", "manifests/", "--admin", &admin.to_string()])
        .arg("--data-dir")
        .arg(data.path())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Killed(child);

    // Read the log until Sluice says it is ready, noting the URL it connected to.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut url = None;
    let mut log = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        if let Some(rest) = line.split("connected to NATS url=").nth(1) {
            url = rest.split_whitespace().next().map(str::to_owned);
        }
        let ready = line.contains("ready;");
        log.push(line);
        if ready {
            break;
        }
    }
    let url = url.unwrap_or_else(|| panic!("no NATS URL in the log:\n{}", log.join("\n")));

    let out = sluice().args(["request", "--nats", &url, "echo", "hello from the CLI"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from the CLI\n");

    // The admin listener answers, and `sluice status` reads it.
    let out = sluice().args(["status", "--admin", &format!("http://{admin}")]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.lines().any(|l| l.starts_with("echo ") && l.split_whitespace().rev().nth(5) == Some("1")), "{table}");
    assert!(table.contains("order-validator"), "{table}");

    // SIGTERM stops it gracefully.
    let status = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut child = child;
    let exit = wait_timeout(&mut child.0, Duration::from_secs(20));
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "sluice did not exit cleanly on SIGTERM");
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A manifest for `plugin` in `dir`, with `extra` TOML appended.
fn test_manifest(dir: &std::path::Path, name: &str, plugin: &str, extra: &str) -> std::path::PathBuf {
    let component = repo_root().join(format!("plugins/dist/{plugin}.wasm"));
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[handler]\nname = \"{name}\"\ncomponent = {:?}\n\n[source]\nsubject = \"{name}.*\"\n{extra}",
            component.display().to_string()
        ),
    )
    .unwrap();
    path
}

/// `sluice test ARGS`, with a compile cache kept between runs; (exit code, stdout, stderr).
fn sluice_test(args: &[&str]) -> (Option<i32>, String, String) {
    let out = sluice()
        .arg("test")
        .args(args)
        .arg("--data-dir")
        .arg(repo_root().join("target/test-cli-data"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn test_runs_a_handler_once_and_shows_its_reply_outputs_and_logs() {
    build_plugins();
    let dir = tempfile::tempdir().unwrap();
    let echo = test_manifest(dir.path(), "echo", "echo", "\n[config]\ntag = \"t-1\"\n");
    let (code, out, err) = sluice_test(&[echo.to_str().unwrap(), "--payload", "hello\nworld", "-H", "X-A=1"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("outcome: success"), "{out}");
    assert!(out.contains("reply: to _INBOX.sluice-test\n  Test-Tag: t-1\n  | hello\n  | world\n"), "{out}");
    assert!(out.contains("outputs: none"), "{out}");

    // No reply subject: the echo plugin logs a warning and succeeds; the log is shown, with
    // the subject the manifest's wildcard made concrete.
    let (code, out, err) = sluice_test(&[echo.to_str().unwrap(), "--reply-to", ""]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("reply: none"), "{out}");
    assert!(out.contains("logs:\n  warn   message on echo.test has no reply subject"), "{out}");

    // A payload from a file, and an explicit subject.
    let payload = dir.path().join("payload.bin");
    std::fs::write(&payload, "from a file").unwrap();
    let (code, out, _) =
        sluice_test(&[echo.to_str().unwrap(), "--payload-file", payload.to_str().unwrap(), "--subject", "echo.x"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("  | from a file\n"), "{out}");
}

#[test]
fn test_exits_1_when_the_handler_fails_and_2_on_bad_input() {
    build_plugins();
    let dir = tempfile::tempdir().unwrap();
    let misbehave = test_manifest(
        dir.path(),
        "misbehave",
        "misbehave",
        "\n[limits]\ntimeout = \"300ms\"\n\n[capabilities]\npublish = [\"allowed.>\"]\n",
    );
    let (code, out, err) = sluice_test(&[misbehave.to_str().unwrap(), "--payload", "trap"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.starts_with("outcome: failed (trap)"), "{out}");
    assert!(out.contains("outputs: none sent"), "{out}");
    let (code, out, _) = sluice_test(&[misbehave.to_str().unwrap(), "--payload", "loop"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("outcome: failed (timeout)"), "{out}");

    // A broken manifest: located, exit 2.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[handler]\nname = \"x\"\ncomponent = \"missing.wasm\"\n\n[source]\nsubject = \"x\"\n")
        .unwrap();
    let (code, _, err) = sluice_test(&[broken.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("broken.toml:3:"), "{err}");
    // An unreadable payload file, a bad header: exit 2.
    let (code, _, err) = sluice_test(&[misbehave.to_str().unwrap(), "--payload-file", "/nonexistent/payload"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot read the payload file"), "{err}");
    let (code, _, err) = sluice_test(&[misbehave.to_str().unwrap(), "-H", "Bad Name=1"]);
    assert_eq!(code, Some(2), "{err}");
}

#[test]
fn test_runs_a_python_handler_with_its_state_and_shows_a_traceback() {
    build_plugins();
    let dir = tempfile::tempdir().unwrap();
    let probe = test_manifest(
        dir.path(),
        "prober",
        "probe-py",
        "\n[limits]\nmemory = \"64MiB\"\n\n[capabilities]\npublish = [\"probe.out\"]\n\n[store]\nbackend = \"memory\"\n",
    );
    let probe = probe.to_str().unwrap();
    let (code, out, err) = sluice_test(&[probe, "--payload", "publish"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("output 1: probe.out\n  Probe-Lang: py\n  | from prober.test\n"), "{out}");
    // kv works (in memory, for this one call).
    let (code, out, _) = sluice_test(&[probe, "--payload", "kv"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("  | 1\n"), "{out}");
    // An uncaught exception: a retry with a readable reason, its traceback in the logs.
    let (code, out, _) = sluice_test(&[probe, "--payload", "raise 42"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("outcome: failed (retry-requested)"), "{out}");
    assert!(out.contains("ValueError: bad value 42"), "{out}");
    assert!(out.contains("Traceback"), "{out}");
    let (code, out, _) = sluice_test(&[probe, "--payload", "reject"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("outcome: failed (rejected)") && out.contains("rejected on purpose"), "{out}");
}

#[test]
fn new_refuses_a_bad_name_and_a_folder_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let out = sluice().args(["new", "2fast", "--lang", "rust", "--dir"]).arg(dir.path().join("a")).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid handler name"));
    std::fs::write(dir.path().join("taken"), "").unwrap();
    let out = sluice().args(["new", "greeter", "--lang", "python", "--dir"]).arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"), "{}", String::from_utf8_lossy(&out.stderr));
}
