//! Hot reload: versions swapped under load without losing or double-handling a message,
//! broken manifests and components that never replace the running version, handlers added
//! and removed while running.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sluice_tests::{Sluice, client, js_publish, nats, plugin, request, stream, stream_messages, text};

/// Writes `bytes` to `path` the way deploy tools do: a temporary file renamed over it.
fn deploy(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn versioned_manifest(component: &Path, source: &str) -> String {
    format!(
        "[handler]\nname = \"versioned\"\ncomponent = \"{}\"\n\n[source]\n{source}\n\n[capabilities]\npublish = [\"versioned.out\"]\n",
        component.display()
    )
}

async fn wait_for_digest(sluice: &Sluice, name: &str, digest: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sluice.status().handler(name).map(|h| h.digest) != Some(digest.to_owned()) {
        assert!(tokio::time::Instant::now() < deadline, "version {digest} of {name} never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn digest_of(path: &Path) -> String {
    sluice::testing::digest(&std::fs::read(path).unwrap())
}

#[tokio::test]
async fn a_component_replaced_under_load_switches_versions_without_losing_a_message() {
    let server = nats();
    let js = stream(&server, "IN", &["in.>"]).await;
    let out = stream(&server, "OUT", &["versioned.out"]).await;
    let components = tempfile::tempdir().unwrap();
    let component = components.path().join("handler.wasm");
    std::fs::copy(plugin("versioned"), &component).unwrap();
    let v2 = std::fs::read(plugin("versioned-v2")).unwrap();

    let mut sluice = Sluice::start(&server, &[("v.toml", versioned_manifest(&component, "stream = \"IN\""))]).await;
    sluice.watch();

    // At least N messages, and as many more as it takes for v2 to be seen serving (on a busy
    // machine the compile can outlast 2000 publishes), with 500 after that.
    const N: usize = 3000;
    const SWITCH_AT: usize = 1000;
    const AT_MOST: usize = 50_000;
    let mut published_after_switch = None;
    let mut i = 0;
    while i < N || published_after_switch.is_none_or(|at| i < at + 500) {
        assert!(i < AT_MOST, "v2 was not serving after {AT_MOST} messages");
        js_publish(&js, "in.x", &i.to_string()).await;
        if i == SWITCH_AT {
            deploy(&component, &v2);
        }
        // Once v2 serves, note where we were: every message published after this is v2's.
        if i > SWITCH_AT && published_after_switch.is_none() && i % 25 == 0 {
            let digest = sluice.status().handler("versioned").map(|h| h.digest);
            if digest == Some(sluice::testing::digest(&v2)) {
                published_after_switch = Some(i + 1);
            }
        }
        i += 1;
    }
    let total = i;
    let switched_at = published_after_switch.expect("v2 was not serving before the load ended");

    let outputs = stream_messages(&out, "OUT", total as u64, Duration::from_secs(60)).await;
    let mut handled: HashMap<usize, Vec<String>> = HashMap::new();
    for m in &outputs {
        let seq: usize = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        let version = m.headers.get("Version").unwrap().as_str().to_owned();
        handled.entry(seq).or_default().push(version);
    }
    assert_eq!(handled.len(), total, "messages were lost");
    let twice: Vec<_> = handled.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(twice.is_empty(), "messages handled more than once: {twice:?}");
    let v1 = handled.values().filter(|v| v[0] == "v1").count();
    assert!(v1 > SWITCH_AT / 2, "v1 handled too little before the switch: {v1}");
    for seq in switched_at..total {
        assert_eq!(handled[&seq], ["v2"], "message {seq}, published after the switch, was not handled by v2");
    }
    let info = js.get_stream("IN").await.unwrap().consumer_info("versioned").await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    sluice.stop().await;
}

#[tokio::test]
async fn broken_manifests_and_truncated_components_never_replace_the_running_version() {
    let server = nats();
    let components = tempfile::tempdir().unwrap();
    let component = components.path().join("handler.wasm");
    std::fs::copy(plugin("versioned"), &component).unwrap();
    let good = versioned_manifest(&component, "subject = \"work\"");
    let mut sluice = Sluice::start(&server, &[("v.toml", good.clone())]).await;
    sluice.watch();
    let nc = client(&server).await;
    let manifest = sluice.manifest_dir().join("v.toml");
    let v1_digest = digest_of(&component);

    // A manifest with a syntax error: reported with its location, v1 keeps serving.
    deploy(&manifest, good.replace("[source]", "[source").as_bytes());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while sluice.status().handler("versioned").and_then(|h| h.last_reload_error).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the broken manifest was not reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = sluice.status().handler("versioned").unwrap().last_reload_error.unwrap();
    assert!(error.contains("v.toml:5:8: unclosed table"), "the error names the line: {error}");
    assert_eq!(text(&request(&nc, "work", "still serving").await), "v1");

    // Fixed manifest, truncated component: reported, v1 keeps serving.
    deploy(&manifest, good.as_bytes());
    let v2 = std::fs::read(plugin("versioned-v2")).unwrap();
    deploy(&component, &v2[..v2.len() / 2]);
    let report = sluice.reloader().reload().await;
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(report.errors[0].to_string().contains("cannot compile component"), "{}", report.errors[0]);
    assert_eq!(sluice.status().handler("versioned").unwrap().digest, v1_digest);
    assert_eq!(text(&request(&nc, "work", "still serving").await), "v1");

    // The complete file is picked up.
    deploy(&component, &v2);
    wait_for_digest(&sluice, "versioned", &sluice::testing::digest(&v2)).await;
    assert_eq!(text(&request(&nc, "work", "new version").await), "v2");
    assert!(sluice.status().handler("versioned").unwrap().last_reload_error.is_none());
    sluice.stop().await;
}

#[tokio::test]
async fn handlers_are_added_and_removed_while_running() {
    let server = nats();
    let echo = |name: &str| {
        format!(
            "[handler]\nname = \"{name}\"\ncomponent = \"{}\"\n\n[source]\nsubject = \"{name}\"\n",
            plugin("echo").display()
        )
    };
    let sluice = Sluice::start(&server, &[("a.toml", echo("a"))]).await;
    let nc = client(&server).await;
    assert_eq!(text(&request(&nc, "a", "hi").await), "hi");

    std::fs::write(sluice.manifest_dir().join("b.toml"), echo("b")).unwrap();
    let report = sluice.reloader().reload().await;
    assert_eq!(report.started, ["b"]);
    assert_eq!(text(&request(&nc, "b", "hello b").await), "hello b");

    std::fs::remove_file(sluice.manifest_dir().join("a.toml")).unwrap();
    let report = sluice.reloader().reload().await;
    assert_eq!(report.stopped, ["a"]);
    assert!(nc.request("a", "anyone?".into()).await.is_err(), "a removed handler still answers");
    assert!(sluice.status().handler("a").is_none());
    assert_eq!(text(&request(&nc, "b", "still here").await), "still here");

    // Touching a file without changing it swaps nothing.
    let again = sluice.reloader().reload().await;
    assert!(again.started.is_empty() && again.updated.is_empty() && again.stopped.is_empty());
    sluice.stop().await;
}

#[tokio::test]
async fn a_changed_subject_rebinds() {
    let server = nats();
    let text_of = |subject: &str| {
        format!(
            "[handler]\nname = \"e\"\ncomponent = \"{}\"\n\n[source]\nsubject = \"{subject}\"\n",
            plugin("echo").display()
        )
    };
    let sluice = Sluice::start(&server, &[("e.toml", text_of("old"))]).await;
    let nc = client(&server).await;
    assert_eq!(text(&request(&nc, "old", "1").await), "1");
    std::fs::write(sluice.manifest_dir().join("e.toml"), text_of("new")).unwrap();
    assert_eq!(sluice.reloader().reload().await.updated, ["e"]);
    assert_eq!(text(&request(&nc, "new", "2").await), "2");
    assert!(nc.request("old", "3".into()).await.is_err(), "the old subject is still served");
    sluice.stop().await;
}

fn echo_with_tag(name: &str, tag: &str) -> String {
    format!(
        "[handler]\nname = \"{name}\"\ncomponent = \"{}\"\n\n[source]\nsubject = \"{name}\"\n\n[config]\ntag = \"{tag}\"\n",
        plugin("echo").display()
    )
}

async fn tag_of(nc: &async_nats::Client, subject: &str) -> String {
    sluice_tests::header(&request(nc, subject, "which?").await, "Test-Tag").unwrap_or_default()
}

/// The manifest changes again while its previous change is being compiled: the version put
/// in service is remembered with the text it was built from, so the next reload sees the
/// newer text as a change and applies it (it used to re-read the file after compiling, and
/// took the newer text for the one being served).
#[tokio::test]
async fn a_change_made_while_the_previous_one_compiles_is_applied_by_the_next_reload() {
    let server = nats();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifests/e.toml");
    let rewritten = Arc::new(AtomicBool::new(false));
    let mut options = sluice::RuntimeOptions::default();
    let (path, done) = (manifest.clone(), rewritten.clone());
    options.hooks.before_install = Some(Arc::new(move |name: &str| {
        // Between compiling version b and installing it, the file becomes version c.
        if name == "e" && !done.swap(true, Ordering::SeqCst) {
            std::fs::write(&path, echo_with_tag("e", "c")).unwrap();
        }
    }));
    let sluice = Sluice::start_with(&server, &[("e.toml", echo_with_tag("e", "a"))], dir, options).await.unwrap();
    let nc = client(&server).await;
    assert_eq!(tag_of(&nc, "e").await, "a");

    std::fs::write(&manifest, echo_with_tag("e", "b")).unwrap();
    assert_eq!(sluice.reloader().reload().await.updated, ["e"]);
    assert!(rewritten.load(Ordering::SeqCst), "the hook did not run");
    assert_eq!(tag_of(&nc, "e").await, "b", "the version compiled is the one served");

    let report = sluice.reloader().reload().await;
    assert_eq!(report.updated, ["e"], "the change made during the compile was taken for the served text");
    assert_eq!(tag_of(&nc, "e").await, "c");
    // And now it has settled: nothing left to apply.
    let again = sluice.reloader().reload().await;
    assert!(again.started.is_empty() && again.updated.is_empty() && again.stopped.is_empty(), "{again:?}");
    sluice.stop().await;
}

/// A deployment that starts with an empty folder and receives its manifests later.
#[tokio::test]
async fn an_empty_folder_serves_nothing_then_what_is_dropped_into_it() {
    let server = nats();
    let mut sluice = Sluice::start(&server, &[]).await;
    assert!(sluice.status().handlers().is_empty());
    sluice.watch();
    let nc = client(&server).await;

    std::fs::write(sluice.manifest_dir().join("late.toml"), echo_with_tag("late", "x")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while sluice.status().handler("late").is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the manifest dropped in was not started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(text(&request(&nc, "late", "hello").await), "hello");

    std::fs::remove_file(sluice.manifest_dir().join("late.toml")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while sluice.status().handler("late").is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the removed manifest's handler did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = nc.request("late", "anyone?".into()).await;
    assert!(
        matches!(&asked, Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders),
        "the removed handler still answers: {asked:?}"
    );
    sluice.stop().await;
}
