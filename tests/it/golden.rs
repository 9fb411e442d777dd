//! Golden files of invalid manifests: each `golden/manifests/NAME.toml` (or folder `NAME/`,
//! loaded as a whole) sits next to `NAME.err`, the exact error Sluice must print, with file,
//! line and column. `UPDATE_GOLDEN=1 cargo test golden` rewrites the `.err` files.

use std::path::{Path, PathBuf};

use sluice::{EngineOptions, LoadError, Runtime, RuntimeOptions};

#[test]
fn invalid_manifests_give_the_expected_located_errors() {
    // Relative paths (cargo runs tests in the package folder), so the expected text does not
    // depend on where the checkout lives.
    sluice_tests::plugin("echo"); // some cases point at a real component
    let dir = Path::new("golden/manifests");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() || p.extension().is_some_and(|e| e == "toml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "golden cases went missing: {}", cases.len());

    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for case in &cases {
        let options = RuntimeOptions {
            engine: EngineOptions { max_memory: 1 << 30, max_instances: 16, ..EngineOptions::default() },
            ..RuntimeOptions::default()
        };
        let actual = match Runtime::load(std::slice::from_ref(case), options) {
            Ok(_) => "(no error)".to_owned(),
            Err(LoadError::Invalid(errors)) => errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n\n"),
            Err(other) => format!("unexpected error kind: {other}"),
        };
        let expected_path = case.with_extension("err");
        if update {
            std::fs::write(&expected_path, format!("{actual}\n")).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if expected.trim_end() != actual.trim_end() {
            mismatches.push(format!(
                "== {}\n-- expected:\n{}\n-- actual:\n{actual}\n",
                case.display(),
                expected.trim_end()
            ));
        }
    }
    assert!(mismatches.is_empty(), "{} golden mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
}

/// A FIFO named as the component is reported as such, at once: it is never opened for a
/// blocking read (that would wait for a writer forever).
#[test]
fn a_fifo_as_component_is_a_located_error_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("handler.wasm");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo failed");
    let manifest = dir.path().join("fifo.toml");
    std::fs::write(
        &manifest,
        "[handler]\nname = \"fifo\"\ncomponent = \"handler.wasm\"\n\n[source]\nsubject = \"f\"\n",
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let loaded = Runtime::load(&[manifest], RuntimeOptions::default());
        let _ = tx.send(loaded.err().map(|e| e.to_string()));
    });
    let error = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("loading a manifest whose component is a FIFO hangs")
        .expect("a FIFO was accepted as a component");
    assert!(error.contains("fifo.toml:3:13: component path") && error.contains("is a FIFO"), "{error}");
}
