//! A component that does not fit the world is refused at load time, naming what is wrong.

use sluice::{EngineOptions, LoadError, Runtime, RuntimeOptions};

fn load_error(component: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.wasm"), component).unwrap();
    let manifest = dir.path().join("h.toml");
    std::fs::write(&manifest, "[handler]\nname = \"h\"\ncomponent = \"c.wasm\"\n\n[source]\nsubject = \"s\"\n")
        .unwrap();
    match Runtime::load(
        std::slice::from_ref(&manifest),
        RuntimeOptions {
            engine: EngineOptions { max_memory: 1 << 30, max_instances: 16, ..EngineOptions::default() },
            ..RuntimeOptions::default()
        },
    ) {
        Ok(_) => panic!("loaded a bad component"),
        Err(LoadError::Invalid(errors)) => {
            let text = errors[0].to_string();
            // Located at the `component = ...` value.
            assert!(text.starts_with(&format!("{}:3:13: ", manifest.display())), "{text}");
            text
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn a_component_without_the_handle_export_is_refused() {
    let text = load_error(&wat::parse_str("(component)").unwrap());
    assert!(text.contains("does not implement world sluice:handler/handler@0.1.0"), "{text}");
    assert!(text.contains("handle"), "the missing export is named: {text}");
}

#[test]
fn a_component_importing_an_unknown_interface_is_refused() {
    let wat = r#"(component
        (import "acme:db/query@1.0.0" (instance (export "run" (func (param "q" string) (result string))))))"#;
    let text = load_error(&wat::parse_str(wat).unwrap());
    assert!(text.contains("imports `acme:db/query@1.0.0`, which Sluice does not provide"), "{text}");
    assert!(!text.contains("fetch-event"), "the wasi:http hint is for wasi:http only: {text}");
}

#[test]
fn a_component_importing_wasi_http_without_a_grant_is_refused_with_the_flag_that_drops_it() {
    // What componentize-js builds by default: an import of wasi:http, with its resources. The
    // manifest grants no HTTP destination, so the import would only ever be refused.
    let wat = r#"(component
        (import "wasi:http/types@0.2.10" (instance (export "fields" (type (sub resource))))))"#;
    let text = load_error(&wat::parse_str(wat).unwrap());
    assert!(text.contains("imports `wasi:http/types@0.2.10`, but the manifest grants no HTTP destination"), "{text}");
    assert!(text.contains("[capabilities]"), "the grant to add is named: {text}");
    assert!(text.contains("`-d http fetch-event`"), "the build flag is named: {text}");
}

#[test]
fn a_core_module_is_refused_with_a_hint() {
    let text = load_error(&wat::parse_str("(module)").unwrap());
    assert!(text.contains("core WebAssembly module, not a component"), "{text}");
    assert!(text.contains("wasm32-wasip2"), "{text}");
}

#[test]
fn a_file_that_is_not_webassembly_is_refused() {
    let text = load_error(b"#!/bin/sh\necho hi\n");
    assert!(text.contains("not a WebAssembly file"), "{text}");
}
