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
