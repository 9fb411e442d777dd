//! How Sluice connects to a real NATS deployment: the `--nats`, `--context`, `--creds`,
//! `--nkey`, `--user`/`--password`, `--token`, `--tls-*` and `--inbox-prefix` flags (named as
//! the `nats` CLI names them), the `nats` CLI's context files, credentials inside a URL,
//! and the one-line error a refused connection gives.
//!
//! Secrets are kept out of everything printable: URLs are shown with their user info
//! replaced by `***` ([`redact`]), and the `Debug` of [`NatsArgs`] and [`Target`] shows
//! which secrets are set, never their values. Imports nothing of the runtime.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions};
use serde::Deserialize;

/// The NATS connection flags, shared by `run`, `publish`, `request` and `dlq`.
#[derive(Clone, Default, clap::Args)]
pub struct NatsArgs {
    /// NATS server URLs, comma-separated (a cluster); `user:password@` or `token@` in a URL
    /// is used and never printed. Default: nats://127.0.0.1:4222 (for `run`: an embedded
    /// server when nothing answers there).
    #[arg(long = "nats", env = "SLUICE_NATS_URL", value_delimiter = ',', hide_env_values = true)]
    pub urls: Vec<String>,
    /// A `nats` CLI context (~/.config/nats/context/NAME.json); flags given override it.
    #[arg(long, env = "SLUICE_NATS_CONTEXT")]
    pub context: Option<String>,
    /// A credentials file (user JWT and NKey seed).
    #[arg(long, env = "SLUICE_NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// A file holding an NKey seed (SU...).
    #[arg(long, env = "SLUICE_NATS_NKEY")]
    pub nkey: Option<PathBuf>,
    /// User name.
    #[arg(long, env = "SLUICE_NATS_USER")]
    pub user: Option<String>,
    /// Password (prefer the environment variable to the flag: flags show in `ps`).
    #[arg(long, env = "SLUICE_NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Authentication token.
    #[arg(long, env = "SLUICE_NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate(s) to trust for the server (PEM).
    #[arg(long, env = "SLUICE_NATS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), with --tls-key.
    #[arg(long, env = "SLUICE_NATS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM), with --tls-cert.
    #[arg(long, env = "SLUICE_NATS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Start TLS before the server's INFO (servers configured with `handshake_first`).
    #[arg(long, env = "SLUICE_NATS_TLS_FIRST")]
    pub tls_first: bool,
    /// A custom inbox prefix (instead of `_INBOX`), for accounts that permit only their own.
    #[arg(long, env = "SLUICE_NATS_INBOX_PREFIX")]
    pub inbox_prefix: Option<String>,
}

impl fmt::Debug for NatsArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsArgs")
            .field("urls", &self.urls.iter().map(|u| redact(u)).collect::<Vec<_>>())
            .field("context", &self.context)
            .field("creds", &self.creds)
            .field("nkey", &self.nkey)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_first", &self.tls_first)
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

impl NatsArgs {
    /// Nothing chosen: no URL, no context, no credentials, no TLS (`run` may then embed a
    /// server). With credentials given, a refusal at the default URL must be reported, not
    /// papered over by starting an open embedded server.
    pub fn is_default(&self) -> bool {
        self.urls.is_empty()
            && self.context.is_none()
            && self.creds.is_none()
            && self.nkey.is_none()
            && self.user.is_none()
            && self.password.is_none()
            && self.token.is_none()
            && self.tls_ca.is_none()
            && self.tls_cert.is_none()
            && !self.tls_first
    }

    /// The connection these flags describe, reading the context file if one is named.
    /// Without a URL anywhere, `default_url`.
    pub fn target(&self, default_url: &str) -> Result<Target, ConnectError> {
        let context = match &self.context {
            Some(name) => Some(Context::load(name)?),
            None => None,
        };
        let ctx = context.unwrap_or_default();
        let urls_text: Vec<String> = if !self.urls.is_empty() {
            self.urls.clone()
        } else if let Some(url) = ctx.url.filter(|u| !u.is_empty()) {
            url.split(',').map(str::to_owned).collect()
        } else {
            vec![default_url.to_owned()]
        };
        let mut target = Target {
            urls: Vec::new(),
            user: self.user.clone().or(ctx.user.filter(|s| !s.is_empty())),
            password: self.password.clone().or(ctx.password.filter(|s| !s.is_empty())),
            token: self.token.clone().or(ctx.token.filter(|s| !s.is_empty())),
            creds: self.creds.clone().or(ctx.creds.filter(|s| !s.is_empty()).map(expand_home)),
            nkey: self.nkey.clone().or(ctx.nkey.filter(|s| !s.is_empty()).map(expand_home)),
            tls_ca: self.tls_ca.clone().or(ctx.ca.filter(|s| !s.is_empty()).map(expand_home)),
            tls_cert: self.tls_cert.clone().or(ctx.cert.filter(|s| !s.is_empty()).map(expand_home)),
            tls_key: self.tls_key.clone().or(ctx.key.filter(|s| !s.is_empty()).map(expand_home)),
            tls_first: self.tls_first || ctx.tls_first,
            inbox_prefix: self.inbox_prefix.clone().or(ctx.inbox_prefix.filter(|s| !s.is_empty())),
        };
        for url in urls_text.iter().map(|u| u.trim()).filter(|u| !u.is_empty()) {
            let (bare, info) = split_user_info(url);
            // A URL's credentials count only when no flag or context gave any: explicit
            // settings win, as in the nats CLI.
            match info {
                Some(UserInfo::UserPassword(user, password))
                    if target.user.is_none() && target.token.is_none() && target.creds.is_none() =>
                {
                    target.user = Some(user);
                    target.password = Some(password);
                }
                Some(UserInfo::Token(token))
                    if target.user.is_none() && target.token.is_none() && target.creds.is_none() =>
                {
                    target.token = Some(token);
                }
                _ => {}
            }
            target.urls.push(bare);
        }
        if target.urls.is_empty() {
            return Err(ConnectError::Config("no NATS server URL given".to_owned()));
        }
        Ok(target)
    }
}

/// A resolved connection: where, and with which (secret) settings.
#[derive(Clone, Default)]
pub struct Target {
    /// Server URLs without user info (what the client is given, so that it never logs one).
    pub urls: Vec<String>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    creds: Option<PathBuf>,
    nkey: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_first: bool,
    inbox_prefix: Option<String>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("urls", &self.urls)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("creds", &self.creds)
            .field("nkey", &self.nkey)
            .field("tls", &(self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_first))
            .finish_non_exhaustive()
    }
}

impl Target {
    /// One plain URL (credentials in it are honoured as with `--nats`).
    pub fn url(url: &str) -> Self {
        let args = NatsArgs { urls: vec![url.to_owned()], ..NatsArgs::default() };
        // A single non-empty URL and no context cannot fail to resolve.
        args.target(url).unwrap_or_else(|_| Target { urls: vec![url.to_owned()], ..Target::default() })
    }

    /// Whether TLS is configured (a CA, a client certificate, TLS first, or a `tls://` URL).
    fn uses_tls(&self) -> bool {
        self.tls_ca.is_some()
            || self.tls_cert.is_some()
            || self.tls_first
            || self.urls.iter().any(|u| u.starts_with("tls://"))
    }

    /// The servers, for messages: comma-separated, without secrets.
    pub fn shown(&self) -> String {
        self.urls.join(",")
    }

    /// Client options: Sluice's name and a short connect timeout, plus authentication and
    /// TLS. Reads the creds and NKey files, so a missing one fails here, naming it.
    pub async fn options(&self) -> Result<ConnectOptions, ConnectError> {
        let mut options = match (&self.creds, &self.nkey) {
            (Some(creds), _) => ConnectOptions::with_credentials_file(creds.clone()).await.map_err(|e| {
                ConnectError::File { what: "credentials file", path: creds.clone(), reason: e.to_string() }
            })?,
            (None, Some(nkey)) => {
                let seed = read_seed(nkey)?;
                ConnectOptions::with_nkey(seed)
            }
            (None, None) => ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        } else if let Some(user) = &self.user {
            options = options.user_and_password(user.clone(), String::new());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        for (what, path) in [("TLS CA", &self.tls_ca), ("TLS certificate", &self.tls_cert), ("TLS key", &self.tls_key)]
        {
            if let Some(path) = path
                && !path.is_file()
            {
                return Err(ConnectError::File { what, path: path.clone(), reason: "no such file".to_owned() });
            }
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
        }
        if self.tls_first {
            options = options.tls_first();
        }
        if let Some(prefix) = &self.inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
        Ok(options.name("sluice").connection_timeout(Duration::from_secs(2)))
    }

    /// Connects with `options` (from [`options`](Self::options), perhaps with an event
    /// callback added). One attempt per server: a refused connection is an error at once,
    /// not a reconnect loop.
    pub async fn connect(&self, options: ConnectOptions) -> Result<async_nats::Client, ConnectError> {
        options
            .connect(self.urls.clone())
            .await
            .map_err(|e| ConnectError::Refused { servers: self.shown(), why: describe(&e, self.uses_tls()) })
    }
}

/// Why connecting failed. `Display` is one line naming the servers (without secrets) and
/// what was refused; the CLI exits with code 2 on it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server(s) refused or could not be reached.
    #[error("cannot connect to NATS at {servers}: {why}")]
    Refused {
        /// The servers tried (credentials redacted).
        servers: String,
        /// Why the connection failed.
        why: String,
    },
    /// A file the flags name cannot be read.
    #[error("cannot read the {what} {}: {reason}", path.display())]
    File {
        /// What the file is (credentials, nkey seed, TLS certificate, ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        reason: String,
    },
    /// The flags or the context are not usable.
    #[error("NATS connection settings: {0}")]
    Config(String),
}

/// `tls`: TLS was asked for, so an I/O failure during the connect is most likely the
/// handshake (rustls reports a refused certificate as an I/O error).
fn describe(e: &async_nats::ConnectError, tls: bool) -> String {
    let detail = std::error::Error::source(e).map(ToString::to_string);
    let what = match e.kind() {
        ConnectErrorKind::AuthorizationViolation => {
            "authorization violation: the server refused these credentials (user/password, token, NKey or creds)"
        }
        ConnectErrorKind::Authentication => "authentication failed: the NKey or credentials could not sign the nonce",
        ConnectErrorKind::Tls => "TLS refused",
        ConnectErrorKind::TimedOut => "timed out",
        ConnectErrorKind::Dns => "DNS lookup failed",
        ConnectErrorKind::ServerParse => "invalid server URL",
        ConnectErrorKind::Io if tls => "connection or TLS handshake failed",
        ConnectErrorKind::Io => "connection failed",
        ConnectErrorKind::MaxReconnects => "no server answered",
    };
    // The source says more for TLS and I/O failures (which certificate, which address); for
    // a refusal it only repeats the kind.
    let repeats = matches!(e.kind(), ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::TimedOut);
    let line = match detail {
        Some(d) if !d.is_empty() && !repeats => format!("{what} ({d})"),
        _ => what.to_owned(),
    };
    line.replace(['\n', '\r'], " ")
}

fn read_seed(path: &Path) -> Result<String, ConnectError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConnectError::File {
        what: "NKey seed file",
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    // The file may hold comments (as `nsc` writes them); the seed is the line starting "SU".
    text.lines().map(str::trim).find(|l| l.starts_with("SU")).map(str::to_owned).ok_or_else(|| ConnectError::File {
        what: "NKey seed file",
        path: path.to_owned(),
        reason: "no user seed (a line starting with SU) in it".to_owned(),
    })
}

enum UserInfo {
    UserPassword(String, String),
    Token(String),
}

/// Splits `scheme://user:password@host:port` into the URL without user info and the user
/// info (`user:password` or a `token`), percent-decoded.
fn split_user_info(url: &str) -> (String, Option<UserInfo>) {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((info, host)) = authority.rsplit_once('@') else {
        return (url.to_owned(), None);
    };
    let bare = match scheme {
        Some(s) => format!("{s}://{host}{path}"),
        None => format!("{host}{path}"),
    };
    let info = match info.split_once(':') {
        Some((user, password)) => UserInfo::UserPassword(percent_decode(user), percent_decode(password)),
        None => UserInfo::Token(percent_decode(info)),
    };
    (bare, Some(info))
}

/// A URL as it may be shown: its user info, if any, replaced by `***`.
pub fn redact(url: &str) -> String {
    let (bare, info) = split_user_info(url);
    if info.is_none() {
        return bare;
    }
    match bare.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://***@{rest}"),
        None => format!("***@{bare}"),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The fields of a `nats` CLI context file that say how to connect (others are ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Context {
    url: Option<String>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    creds: Option<String>,
    nkey: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    ca: Option<String>,
    tls_first: bool,
    inbox_prefix: Option<String>,
}

impl Context {
    /// Reads `$XDG_CONFIG_HOME/nats/context/NAME.json` (default `~/.config/...`), where the
    /// `nats` CLI keeps its contexts.
    fn load(name: &str) -> Result<Context, ConnectError> {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(ConnectError::Config(format!("invalid context name {name:?}")));
        }
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .ok_or_else(|| ConnectError::Config("neither $XDG_CONFIG_HOME nor $HOME is set".to_owned()))?;
        let path = config.join("nats/context").join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path).map_err(|e| ConnectError::File {
            what: "NATS context",
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // serde_json's message says where, not what the value was: no secret in it.
        serde_json::from_str(&text).map_err(|e| ConnectError::File {
            what: "NATS context",
            path,
            reason: e.to_string(),
        })
    }
}

/// `~/x` as the nats CLI writes paths in contexts.
fn expand_home(path: String) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_is_split_off_and_redacted() {
        let args = NatsArgs {
            urls: vec!["nats://sluice:p%40ss@127.0.0.1:4222".into(), "tls://tok3n@n2:4222".into(), "n3:4222".into()],
            ..NatsArgs::default()
        };
        let t = args.target("nats://127.0.0.1:4222").unwrap();
        assert_eq!(t.urls, ["nats://127.0.0.1:4222", "tls://n2:4222", "n3:4222"]);
        assert_eq!(t.user.as_deref(), Some("sluice"));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        assert!(t.token.is_none(), "user/password came first");
        let shown = format!("{t:?} {} {args:?}", t.shown());
        assert!(!shown.contains("p%40ss") && !shown.contains("p@ss") && !shown.contains("tok3n"), "{shown}");
        assert_eq!(redact("nats://a:b@h:1"), "nats://***@h:1");
        assert_eq!(redact("tok@h:1"), "***@h:1");
        assert_eq!(redact("nats://h:1"), "nats://h:1");
    }

    #[test]
    fn flags_win_over_the_url() {
        let args = NatsArgs { urls: vec!["nats://u:p@h:1".into()], token: Some("t".into()), ..NatsArgs::default() };
        let t = args.target("x").unwrap();
        assert_eq!((t.user.as_deref(), t.token.as_deref()), (None, Some("t")));
    }

    #[test]
    fn a_context_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let contexts = dir.path().join("nats/context");
        std::fs::create_dir_all(&contexts).unwrap();
        std::fs::write(
            contexts.join("prod.json"),
            r#"{"description": "x", "url": "nats://a:4222,nats://b:4222", "user": "sluice", "password": "pw", "inbox_prefix": "_I.sluice"}"#,
        )
        .unwrap();
        let ctx: Context = serde_json::from_str(&std::fs::read_to_string(contexts.join("prod.json")).unwrap()).unwrap();
        assert_eq!(ctx.url.as_deref(), Some("nats://a:4222,nats://b:4222"));
        assert_eq!(ctx.inbox_prefix.as_deref(), Some("_I.sluice"));
        assert!(Context::load("../etc").is_err());
    }
}
