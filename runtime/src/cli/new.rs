//! `sluice new NAME --lang rust|python|js [--dir PATH]`: a handler to start from, in its own
//! folder: the source, a build script (`build.sh`, with the pinned toolchains), the manifest
//! (`NAME.toml`) and a test message (`message.txt`), so that `./build.sh` then
//! `sluice test NAME.toml --payload-file message.txt` works at once.
//!
//! The templates are in `runtime/templates/`, compiled into the binary. A Python or
//! JavaScript handler gets a copy of its SDK and of the WIT, so it builds anywhere with only
//! the toolchain. A Rust handler depends on the `sluice-guest` crate: by path when this
//! `sluice` belongs to a checkout (found from the executable, or where it was built), and
//! otherwise by git, from the project's repository at this version's tag.

use std::path::{Component, Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, ValueEnum};

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The handler's name: letters, digits, `-` and `_`, starting with a letter.
    pub name: String,
    /// The handler's language.
    #[arg(long, value_enum)]
    pub lang: Lang,
    /// The folder to create (it must not exist, or be empty). Default: ./NAME.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    #[value(alias = "py")]
    Python,
    #[value(alias = "javascript")]
    Js,
}

mod templates {
    pub const MANIFEST: &str = include_str!("../../templates/common/manifest.toml");
    pub const MESSAGE: &str = include_str!("../../templates/common/message.txt");
    pub const GITIGNORE: &str = include_str!("../../templates/common/gitignore");
    pub const RUST_CARGO: &str = include_str!("../../templates/rust/Cargo.toml");
    pub const RUST_LIB: &str = include_str!("../../templates/rust/lib.rs");
    pub const RUST_BUILD: &str = include_str!("../../templates/rust/build.sh");
    pub const PY_APP: &str = include_str!("../../templates/python/app.py");
    pub const PY_BUILD: &str = include_str!("../../templates/python/build.sh");
    pub const JS_APP: &str = include_str!("../../templates/js/app.js");
    pub const JS_BUILD: &str = include_str!("../../templates/js/build.sh");
    /// What the Python and JavaScript handlers build against: the SDKs and the contract of
    /// this version of Sluice.
    pub const PY_SDK: &str = include_str!("../../../guest-sdk/python/sluice.py");
    pub const JS_SDK: &str = include_str!("../../../guest-sdk/js/sluice.js");
    pub const WIT: &str = include_str!("../../../wit/handler.wit");
}

/// Runs the command.
pub fn run(args: &NewArgs) -> anyhow::Result<()> {
    check_name(&args.name)?;
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        anyhow::bail!("{} already exists and is not empty: choose another --dir", dir.display());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir_abs = std::fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let checkout = checkout();
    let files = scaffold(&args.name, args.lang, &dir_abs, checkout.as_deref())?;

    let lang = match args.lang {
        Lang::Rust => "Rust",
        Lang::Python => "Python",
        Lang::Js => "JavaScript",
    };
    println!("created handler {} ({lang}) in {}:", args.name, dir.display());
    for f in &files {
        println!("  {f}");
    }
    if args.lang == Lang::Rust
        && let Some(root) = workspace_root(&dir_abs)
    {
        let member = relative(&dir_abs, &root).unwrap_or_else(|| dir_abs.clone());
        println!(
            "\nthis folder is inside the Cargo workspace {}: add \"{}\" to its [workspace] members",
            root.join("Cargo.toml").display(),
            member.display()
        );
    }
    let name = &args.name;
    println!("\nnext:\n  cd {}\n  ./build.sh", dir.display());
    println!("  sluice test {name}.toml --payload-file message.txt");
    println!("  sluice run {name}.toml        # then, elsewhere: sluice request {name} Ada");
    Ok(())
}

/// A handler name that is also a valid crate name, subject token and file name.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    anyhow::ensure!(
        ok,
        "invalid handler name {name:?}: expected letters, digits, `-` and `_`, starting with a letter (at most 64)"
    );
    Ok(())
}

/// Writes the files of a `lang` handler into `dir`; returns their names.
fn scaffold(name: &str, lang: Lang, dir: &Path, checkout: Option<&Path>) -> anyhow::Result<Vec<String>> {
    let tools = checkout.map_or_else(|| ".tools".to_owned(), |c| c.join(".tools").display().to_string());
    let limits = match lang {
        Lang::Rust => "",
        Lang::Python | Lang::Js => {
            "\n# An interpreter comes with the component: it needs more than a Rust handler.\nmemory = \"64MiB\""
        }
    };
    let fill = |template: &str, extra: &[(&str, &str)]| {
        let mut text = template.replace("{{name}}", name).replace("{{tools}}", &tools).replace("{{limits}}", limits);
        for (key, value) in extra {
            text = text.replace(&format!("{{{{{key}}}}}"), value);
        }
        text
    };
    let mut files: Vec<(String, String, bool)> = vec![
        (format!("{name}.toml"), fill(templates::MANIFEST, &[]), false),
        ("message.txt".into(), templates::MESSAGE.into(), false),
        (".gitignore".into(), templates::GITIGNORE.into(), false),
    ];
    match lang {
        Lang::Rust => {
            let (dependency, comment) = sdk_dependency(dir, checkout);
            let in_workspace = workspace_root(dir).is_some();
            let workspace = if in_workspace {
                ""
            } else {
                "\n# A workspace of its own: this crate builds wherever it is.\n[workspace]\n"
            };
            let crate_name = name.replace('-', "_");
            let extra = [
                ("sdk_dependency", dependency.as_str()),
                ("sdk_comment", comment.as_str()),
                ("workspace", workspace),
                ("crate", crate_name.as_str()),
            ];
            files.push(("Cargo.toml".into(), fill(templates::RUST_CARGO, &extra), false));
            files.push(("src/lib.rs".into(), fill(templates::RUST_LIB, &extra), false));
            files.push(("build.sh".into(), fill(templates::RUST_BUILD, &extra), true));
            // The checkout's lock file, outside a workspace: the same dependency versions as
            // the SDK was tested with (and no registry look-up when they are cached).
            if !in_workspace
                && let Some(lock) = checkout.and_then(|c| std::fs::read_to_string(c.join("Cargo.lock")).ok())
            {
                files.push(("Cargo.lock".into(), lock, false));
            }
        }
        Lang::Python => {
            files.push(("app.py".into(), fill(templates::PY_APP, &[]), false));
            files.push(("sluice.py".into(), templates::PY_SDK.into(), false));
            files.push(("wit/handler.wit".into(), templates::WIT.into(), false));
            files.push(("build.sh".into(), fill(templates::PY_BUILD, &[]), true));
        }
        Lang::Js => {
            files.push(("app.js".into(), fill(templates::JS_APP, &[]), false));
            files.push(("sluice.js".into(), templates::JS_SDK.into(), false));
            files.push(("wit/handler.wit".into(), templates::WIT.into(), false));
            files.push(("build.sh".into(), fill(templates::JS_BUILD, &[]), true));
        }
    }
    for (file, text, executable) in &files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        #[cfg(unix)]
        if *executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot make {} executable", path.display()))?;
        }
        #[cfg(not(unix))]
        let _ = executable;
    }
    Ok(files.into_iter().map(|(f, _, _)| f).collect())
}

/// The `sluice-guest` dependency line, and a comment saying where it points.
fn sdk_dependency(dir: &Path, checkout: Option<&Path>) -> (String, String) {
    match checkout {
        Some(root) => {
            let sdk = root.join("guest-sdk");
            // Inside the checkout, a relative path: the checkout can move.
            let path = if dir.starts_with(root) { relative(&sdk, dir).unwrap_or(sdk) } else { sdk };
            (
                format!("{{ path = {:?} }}", path.display().to_string()),
                "A path into the Sluice checkout; point it elsewhere if the checkout moves.".to_owned(),
            )
        }
        None => (
            format!("{{ git = {:?}, tag = \"v{}\" }}", env!("CARGO_PKG_REPOSITORY"), env!("CARGO_PKG_VERSION")),
            "No Sluice checkout was found: the project's repository at this version's tag; \
             `{ path = \"CHECKOUT/guest-sdk\" }` works too."
                .to_owned(),
        ),
    }
}

/// The Sluice checkout this binary belongs to (a folder with `guest-sdk/Cargo.toml` and
/// `wit/handler.wit`): an ancestor of the executable (`target/release/sluice`), else the
/// one it was built from, if it is still there.
fn checkout() -> Option<PathBuf> {
    let is_checkout = |d: &Path| d.join("guest-sdk/Cargo.toml").is_file() && d.join("wit/handler.wit").is_file();
    let exe = std::env::current_exe().ok().and_then(|e| std::fs::canonicalize(e).ok());
    if let Some(found) = exe.as_deref().and_then(|e| e.ancestors().find(|d| is_checkout(d))) {
        return Some(found.to_owned());
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    is_checkout(built).then(|| std::fs::canonicalize(built).unwrap_or_else(|_| built.to_owned()))
}

/// The root of the Cargo workspace `dir` is inside (not counting `dir` itself), if any.
fn workspace_root(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().skip(1).find_map(|d| {
        let text = std::fs::read_to_string(d.join("Cargo.toml")).ok()?;
        text.lines().any(|l| l.trim() == "[workspace]").then(|| d.to_owned())
    })
}

/// `path` relative to `base`, when they share an ancestor other than the root (both
/// absolute and canonical).
fn relative(path: &Path, base: &Path) -> Option<PathBuf> {
    let path: Vec<Component> = path.components().collect();
    let base: Vec<Component> = base.components().collect();
    let common = path.iter().zip(&base).take_while(|(a, b)| a == b).count();
    if common <= 1 {
        return None;
    }
    let mut out = PathBuf::new();
    for _ in common..base.len() {
        out.push("..");
    }
    for c in &path[common..] {
        out.push(c);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("greeter").is_ok());
        assert!(check_name("order-validator_2").is_ok());
        for bad in ["", "2fast", "a.b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn relative_paths() {
        assert_eq!(relative(Path::new("/a/b/guest-sdk"), Path::new("/a/b/plugins/x")), Some("../../guest-sdk".into()));
        assert_eq!(relative(Path::new("/a/guest-sdk"), Path::new("/tmp/x")), None);
    }
}
