//! The developer loop of the README, for each language: `sluice new` scaffolds a handler into
//! a temporary folder (outside this repository), its `build.sh` builds it with the installed
//! toolchains (cargo for wasm32-wasip2; componentize-py and componentize-js from `.tools/`),
//! and `sluice test` runs it on the scaffolded test message, with no NATS server.
//!
//! The Rust build shares one target folder between runs (`target/scaffold`), so only the
//! first run compiles the SDK's dependencies.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)] // the shared helpers this suite does not need
mod common;

use common::repo_root;

use std::path::Path;
use std::process::Command;

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

fn check(what: &str, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Scaffolds `name` in `lang` under a temporary folder, builds it, and checks `sluice test`.
fn scaffold_build_and_test(name: &str, lang: &str, build_env: &[(&str, &Path)], build_args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    let out = sluice().args(["new", name, "--lang", lang, "--dir"]).arg(&dir).output().unwrap();
    check("sluice new", &out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("./build.sh") && said.contains(&format!("sluice test {name}.toml")), "{said}");
    for file in [format!("{name}.toml"), "message.txt".into(), "build.sh".into()] {
        assert!(dir.join(&file).is_file(), "{file} missing");
    }

    let mut build = Command::new(dir.join("build.sh"));
    build.args(build_args);
    for (key, value) in build_env {
        build.env(key, value);
    }
    check("build.sh", &build.output().unwrap());
    assert!(dir.join(format!("{name}.wasm")).is_file());

    // The test message: a greeting back, and one output.
    let data = repo_root().join("target/test-cli-data");
    let out = sluice()
        .current_dir(&dir)
        .args(["test", &format!("{name}.toml"), "--payload-file", "message.txt", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    check("sluice test", &out);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.starts_with("outcome: success"), "{report}");
    assert!(report.contains(&format!("output 1: {name}.greeted\n  | Ada\n")), "{report}");
    assert!(report.contains("reply: to _INBOX.sluice-test\n  | Hello, Ada!\n"), "{report}");
    assert!(report.contains("info   greeting Ada"), "{report}");

    // An empty name is rejected: exit code 1, nothing sent.
    let out = sluice()
        .current_dir(&dir)
        .args(["test", &format!("{name}.toml"), "--payload", " ", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.starts_with("outcome: failed (rejected)") && report.contains("no name given"), "{report}");
}

#[test]
fn a_scaffolded_rust_handler_builds_and_passes_sluice_test() {
    // A target folder of its own (the workspace's is locked by this very `cargo test`), kept
    // between runs; offline: the copied Cargo.lock names what the workspace already fetched.
    let target = repo_root().join("target/scaffold");
    scaffold_build_and_test("greeter", "rust", &[("CARGO_TARGET_DIR", &target)], &["--offline"]);
}

#[test]
fn a_scaffolded_python_handler_builds_and_passes_sluice_test() {
    scaffold_build_and_test("greeter-py", "python", &[], &[]);
}

#[test]
fn a_scaffolded_javascript_handler_builds_and_passes_sluice_test() {
    scaffold_build_and_test("greeter-js", "js", &[], &[]);
}

#[test]
fn a_rust_handler_scaffolded_inside_a_workspace_says_to_add_it_as_a_member() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
    let dir = tmp.path().join("plugins/inner");
    let out = sluice().args(["new", "inner", "--lang", "rust", "--dir"]).arg(&dir).output().unwrap();
    check("sluice new", &out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("add \"plugins/inner\" to its [workspace] members"), "{said}");
    let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(!cargo.contains("[workspace]"), "{cargo}");
    assert!(cargo.contains("sluice-guest = { path = "), "{cargo}");
}
