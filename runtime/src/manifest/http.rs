//! `[capabilities] http` and the `[http]` limits: which destinations a handler's outgoing
//! HTTP requests may reach, and how much one call may send, receive and wait. Parsed and
//! checked here; the host (`host/http.rs`) applies them to every request before it connects.
//!
//! A grant is `scheme://host[:port][/path]`:
//!
//! - `scheme` is `http` or `https`;
//! - `host` is a name (`api.example.com`), a name under a domain (`*.example.com`, which
//!   needs at least two labels after the `*`: no `*` or `*.com`), or an IP literal
//!   (`127.0.0.1`, `[::1]`);
//! - `port` defaults to the scheme's (80, 443); requests must use exactly that port;
//! - `path`, when given, is a prefix: `/hooks` admits `/hooks` and `/hooks/...` (not
//!   `/hooksx`); `/hooks/*` admits what starts with `/hooks/`.
//!
//! A name's resolved addresses must be public: loopback, private, link-local (the cloud
//! metadata service at 169.254.169.254) and other special addresses are reached only through a
//! grant naming that IP literally, or, for private ranges (10/8, 172.16/12, 192.168/16,
//! 100.64/10, fc00::/7) only, with `http_private = true`.

use std::net::IpAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::error::{ManifestError, SourceText};
use super::schema::{CapabilitiesSection, HttpSection};

/// Requests one call may make when the manifest does not say.
pub const DEFAULT_HTTP_MAX_REQUESTS: u32 = 16;
/// Request body bytes (each request) when the manifest does not say.
pub const DEFAULT_HTTP_MAX_REQUEST_BYTES: u64 = 1 << 20;
/// Response body bytes (each response) when the manifest does not say.
pub const DEFAULT_HTTP_MAX_RESPONSE_BYTES: u64 = 4 << 20;
/// Time to connect (TCP and TLS) when the manifest does not say.
pub const DEFAULT_HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time one request may take, connect to last body byte, when the manifest does not say
/// (never more than the call's `limits.timeout`).
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A handler's outbound HTTP: its grants and limits. `None` in the manifest: no HTTP.
#[derive(Debug)]
pub struct HttpPolicy {
    /// `[capabilities] http`: the destinations granted.
    pub grants: Vec<HttpGrant>,
    /// `http_private = true`: named grants may resolve to private (not loopback, not
    /// link-local) addresses.
    pub private: bool,
    /// Requests one call may make.
    pub max_requests: u32,
    /// Request body bytes, each request.
    pub max_request_bytes: u64,
    /// Response body bytes, each response.
    pub max_response_bytes: u64,
    /// Time to connect (TCP and TLS).
    pub connect_timeout: Duration,
    /// Per request, already capped at the call's `limits.timeout`.
    pub timeout: Duration,
    /// `http_ca`: PEM certificates trusted besides the system's roots.
    pub extra_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// The TLS client configuration, built on first use (the host fills it).
    pub tls: OnceLock<Arc<rustls::ClientConfig>>,
}

/// One `[capabilities] http` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGrant {
    /// As written, for messages.
    pub text: String,
    /// `https` (else `http`).
    pub https: bool,
    /// The host the grant reaches.
    pub host: GrantHost,
    /// The one port requests may use.
    pub port: u16,
    /// The paths it admits.
    pub path: GrantPath,
}

/// The host part of a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantHost {
    /// A name, lower-cased.
    Name(String),
    /// `*.example.com`: any name ending in `.example.com` (stored with the leading dot).
    Under(String),
    /// An IP literal (the only way to reach a loopback or link-local address).
    Ip(IpAddr),
}

/// The path part of a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantPath {
    /// No path given: every path.
    Any,
    /// `/hooks`: `/hooks` itself or below `/hooks/`.
    Segment(String),
    /// `/hooks/*`: anything starting with `/hooks/`.
    Prefix(String),
}

/// How an address may be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Any other address.
    Public,
    /// RFC 1918, CGNAT, IPv6 unique local.
    Private,
    /// Loopback, link-local (the metadata service), unspecified, multicast, broadcast,
    /// documentation and other reserved ranges: only an IP-literal grant reaches one.
    Special,
}

/// Classifies `ip` (an IPv4-mapped IPv6 address as its IPv4 address).
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || o[0] >= 240
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
            {
                AddressClass::Special
            } else if v4.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
                AddressClass::Private
            } else {
                AddressClass::Public
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify(IpAddr::V4(v4));
            }
            let s = v6.segments();
            if v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x0064 && s[1] == 0xff9b)
                || s[0] == 0x2002
                || (s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0)
            {
                AddressClass::Special
            } else if (s[0] & 0xfe00) == 0xfc00 {
                AddressClass::Private
            } else {
                AddressClass::Public
            }
        }
    }
}

impl HttpGrant {
    /// Parses one grant, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<HttpGrant, String> {
        let expected = "expected \"https://host[:port][/path]\" (scheme http or https)";
        let (scheme, rest) =
            text.split_once("://").ok_or_else(|| format!("invalid http grant {text:?}: no scheme; {expected}"))?;
        let https = match scheme {
            "https" => true,
            "http" => false,
            _ => return Err(format!("invalid http grant {text:?}: scheme {scheme:?}; {expected}")),
        };
        if rest.contains(['?', '#', '@']) || rest.contains(char::is_whitespace) {
            return Err(format!("invalid http grant {text:?}: a grant has no user, query or fragment; {expected}"));
        }
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        let (host_text, port) = split_port(authority).map_err(|e| format!("invalid http grant {text:?}: {e}"))?;
        let port = port.unwrap_or(if https { 443 } else { 80 });
        let host = parse_host(host_text).map_err(|e| format!("invalid http grant {text:?}: {e}"))?;
        let path = match path {
            "" | "/" | "/*" => GrantPath::Any,
            p if p.ends_with("/*") => GrantPath::Prefix(p[..p.len() - 1].to_owned()),
            p if p.contains('*') => {
                return Err(format!("invalid http grant {text:?}: `*` only ends a path (`/hooks/*`)"));
            }
            p => GrantPath::Segment(p.trim_end_matches('/').to_owned()),
        };
        if let GrantPath::Segment(p) | GrantPath::Prefix(p) = &path
            && has_dot_segment(p)
        {
            return Err(format!("invalid http grant {text:?}: `.` and `..` path segments are not allowed"));
        }
        Ok(HttpGrant { text: text.to_owned(), https, host, port, path })
    }

    /// Whether this grant admits a request to `host` (lower-cased, IPv6 without brackets),
    /// `port` and `path` over `https` or not. Addresses are checked separately.
    pub fn admits(&self, https: bool, host: &str, port: u16, path: &str) -> bool {
        if self.https != https || self.port != port {
            return false;
        }
        let host_ok = match &self.host {
            GrantHost::Name(n) => n == host,
            GrantHost::Under(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
            GrantHost::Ip(ip) => host.parse::<IpAddr>().is_ok_and(|h| h == *ip),
        };
        host_ok
            && match &self.path {
                GrantPath::Any => true,
                GrantPath::Prefix(p) => path.starts_with(p.as_str()),
                GrantPath::Segment(p) => {
                    path == p || path.strip_prefix(p.as_str()).is_some_and(|rest| rest.starts_with(['/', '?']))
                }
            }
    }

    /// Whether a connection admitted by this grant may go to `ip`.
    pub fn reaches(&self, ip: IpAddr, private: bool) -> bool {
        match (&self.host, classify(ip)) {
            (GrantHost::Ip(granted), _) => canonical(*granted) == canonical(ip),
            (_, AddressClass::Public) => true,
            (_, AddressClass::Private) => private,
            (_, AddressClass::Special) => false,
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `path` has a `.` or `..` segment, percent-encoded or not: servers resolve them,
/// so `/hooks/../admin` would escape a `/hooks` grant.
pub fn has_dot_segment(path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or("");
    path.split('/').any(|seg| {
        let s = seg.to_ascii_lowercase().replace("%2e", ".");
        s == "." || s == ".."
    })
}

/// `host[:port]`, IPv6 in brackets.
fn split_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']').ok_or("unclosed `[` in the host")?;
        let after = &rest[end + 1..];
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("unexpected text after `]`")?),
        };
        (&authority[..end + 2], port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(format!("invalid port {p:?}; expected 1 to 65535")),
        },
    };
    Ok((host, port))
}

fn parse_host(host: &str) -> Result<GrantHost, String> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<IpAddr>().map(GrantHost::Ip).map_err(|_| format!("invalid IPv6 address {inner:?}"));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(GrantHost::Ip(ip));
    }
    let host = host.to_ascii_lowercase();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    };
    if host == "*" || host.is_empty() {
        return Err("it covers every host; name the hosts the handler calls".to_owned());
    }
    if let Some(domain) = host.strip_prefix("*.") {
        if !valid_name(domain) {
            return Err(format!("invalid host {host:?}"));
        }
        if domain.split('.').count() < 2 {
            return Err(format!(
                "`*.{domain}` covers a whole top-level domain; a wildcard needs at least two labels after `*.` \
                 (`*.example.com`)"
            ));
        }
        return Ok(GrantHost::Under(format!(".{domain}")));
    }
    if host.contains('*') {
        return Err("`*` is allowed only as the first label (`*.example.com`)".to_owned());
    }
    if !valid_name(&host) {
        return Err(format!("invalid host {host:?}"));
    }
    Ok(GrantHost::Name(host))
}

/// Resolves `[capabilities] http`, `http_ca`, `http_private` and `[http]`, against
/// `call_timeout`. `None` when no grant is given (and nothing else is, which is an error).
pub(super) fn resolve(
    file: &SourceText,
    dir: &Path,
    caps: &CapabilitiesSection,
    raw: Option<toml::Spanned<HttpSection>>,
    call_timeout: Duration,
) -> Result<Option<Arc<HttpPolicy>>, ManifestError> {
    let mut grants = Vec::with_capacity(caps.http.len());
    for g in &caps.http {
        grants.push(HttpGrant::parse(g.get_ref()).map_err(|e| ManifestError::at(file, g.span(), e))?);
    }
    if grants.is_empty() {
        let stray: Option<Range<usize>> = raw
            .as_ref()
            .map(toml::Spanned::span)
            .or_else(|| caps.http_ca.as_ref().map(toml::Spanned::span))
            .or_else(|| caps.http_private.as_ref().map(toml::Spanned::span));
        if let Some(span) = stray {
            return Err(ManifestError::at(
                file,
                span,
                "HTTP settings without a grant: add `http = [\"https://host\"]` to [capabilities], the destinations \
                 the handler may call",
            ));
        }
        return Ok(None);
    }
    let extra_roots = match &caps.http_ca {
        None => Vec::new(),
        Some(ca) => read_ca(&dir.join(ca.get_ref())).map_err(|e| ManifestError::at(file, ca.span(), e))?,
    };
    let raw = raw.map(toml::Spanned::into_inner).unwrap_or_default();
    let max_requests = match raw.max_requests {
        Some(n) => match u32::try_from(*n.get_ref()) {
            Ok(v @ 1..=10_000) => v,
            _ => {
                return Err(ManifestError::at(
                    file,
                    n.span(),
                    format!("max_requests = {} is out of range; expected 1 to 10000", n.get_ref()),
                ));
            }
        },
        None => DEFAULT_HTTP_MAX_REQUESTS,
    };
    let timeout = raw.timeout.as_ref().map_or(DEFAULT_HTTP_TIMEOUT, |t| t.get_ref().0);
    if let Some(t) = &raw.timeout
        && t.get_ref().0 > call_timeout
    {
        return Err(ManifestError::at(
            file,
            t.span(),
            format!(
                "[http] timeout {} is longer than the call's limits.timeout ({}); a request cannot outlive its call",
                t.get_ref(),
                super::HumanDuration(call_timeout)
            ),
        ));
    }
    let connect_timeout = raw.connect_timeout.map_or(DEFAULT_HTTP_CONNECT_TIMEOUT, |t| t.0);
    Ok(Some(Arc::new(HttpPolicy {
        grants,
        private: caps.http_private.as_ref().is_some_and(|p| *p.get_ref()),
        max_requests,
        max_request_bytes: raw.max_request_bytes.map_or(DEFAULT_HTTP_MAX_REQUEST_BYTES, |b| b.0),
        max_response_bytes: raw.max_response_bytes.map_or(DEFAULT_HTTP_MAX_RESPONSE_BYTES, |b| b.0),
        timeout: timeout.min(call_timeout),
        connect_timeout: connect_timeout.min(timeout).min(call_timeout),
        extra_roots,
        tls: OnceLock::new(),
    })))
}

fn read_ca(path: &Path) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read http_ca {}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("http_ca {} is not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("http_ca {} holds no certificate (expected PEM `BEGIN CERTIFICATE`)", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_and_admit_what_they_say() {
        let g = HttpGrant::parse("https://api.example.com").unwrap();
        assert!(g.admits(true, "api.example.com", 443, "/v1/charges"));
        assert!(!g.admits(false, "api.example.com", 443, "/"), "scheme");
        assert!(!g.admits(true, "api.example.com", 8443, "/"), "port");
        assert!(!g.admits(true, "evil.example.com", 443, "/"), "host");

        let g = HttpGrant::parse("http://127.0.0.1:8080/hooks/*").unwrap();
        assert!(g.admits(false, "127.0.0.1", 8080, "/hooks/a?x=1"));
        assert!(!g.admits(false, "127.0.0.1", 8080, "/hooks"));
        assert!(!g.admits(false, "127.0.0.1", 8080, "/admin"));

        let g = HttpGrant::parse("http://h.example.com/hooks").unwrap();
        assert!(g.admits(false, "h.example.com", 80, "/hooks"));
        assert!(g.admits(false, "h.example.com", 80, "/hooks/x"));
        assert!(g.admits(false, "h.example.com", 80, "/hooks?x"));
        assert!(!g.admits(false, "h.example.com", 80, "/hooksx"));

        let g = HttpGrant::parse("https://*.example.com").unwrap();
        assert!(g.admits(true, "a.example.com", 443, "/"));
        assert!(!g.admits(true, "example.com", 443, "/"));
        assert!(!g.admits(true, "aexample.com", 443, "/"));

        let g = HttpGrant::parse("http://[::1]:9000").unwrap();
        assert!(g.admits(false, "::1", 9000, "/"));
    }

    #[test]
    fn grants_covering_every_host_or_malformed_are_refused() {
        for bad in [
            "*",
            "http://*",
            "https://*:443",
            "https://*.com",
            "https://a.*.com",
            "ftp://x.example.com",
            "https://user@x.example.com",
            "https://x.example.com/a/../b",
            "https://x.example.com:0",
            "https://x.example.com/a*b",
        ] {
            assert!(HttpGrant::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn addresses_are_classified_and_reached_only_as_granted() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(classify(ip("8.8.8.8")), AddressClass::Public);
        assert_eq!(classify(ip("10.1.2.3")), AddressClass::Private);
        assert_eq!(classify(ip("127.0.0.1")), AddressClass::Special);
        assert_eq!(classify(ip("169.254.169.254")), AddressClass::Special);
        assert_eq!(classify(ip("::ffff:127.0.0.1")), AddressClass::Special);
        assert_eq!(classify(ip("::1")), AddressClass::Special);
        assert_eq!(classify(ip("fd00::1")), AddressClass::Private);
        assert_eq!(classify(ip("2606:4700::1111")), AddressClass::Public);

        let named = HttpGrant::parse("http://localhost:8080").unwrap();
        assert!(!named.reaches(ip("127.0.0.1"), true), "a name never reaches loopback");
        assert!(!named.reaches(ip("10.0.0.1"), false));
        assert!(named.reaches(ip("10.0.0.1"), true));
        let literal = HttpGrant::parse("http://127.0.0.1:8080").unwrap();
        assert!(literal.reaches(ip("127.0.0.1"), false));
        assert!(literal.reaches(ip("::ffff:127.0.0.1"), false));
        assert!(!literal.reaches(ip("127.0.0.2"), false));
    }

    #[test]
    fn dot_segments_are_found_encoded_or_not() {
        assert!(has_dot_segment("/hooks/../admin"));
        assert!(has_dot_segment("/hooks/%2E%2e/admin"));
        assert!(has_dot_segment("/hooks/./x"));
        assert!(!has_dot_segment("/hooks/a.b/..c"));
    }
}
