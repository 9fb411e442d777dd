//! NATS subjects and subject patterns: validation (for manifests) and wildcard matching (for
//! the publish allowlist).
//!
//! A subject is dot-separated tokens, none empty, none with whitespace. A pattern may also
//! use `*` (exactly one token) and `>` (one or more tokens, last position only).
//!
//! A wildcard never matches a `$`-prefixed token: `$JS.`, `$KV.`, `$O.`, `$SYS.` and the
//! like are NATS's control namespaces (stream, consumer and bucket administration), and a
//! grant such as `publish = [">"]` must not quietly include them. Such a subject is reached
//! only by a pattern that spells the `$` token out.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer};

/// A validated subject pattern (wildcards allowed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubjectPattern(String);

impl SubjectPattern {
    /// Validates `text` as a subject pattern.
    pub fn parse(text: &str) -> Result<Self, String> {
        validate(text, true)?;
        Ok(SubjectPattern(text.to_owned()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `subject` (a literal subject) is matched by this pattern. Wildcards do not
    /// match `$`-prefixed tokens (see the module doc).
    pub fn matches(&self, subject: &str) -> bool {
        let mut want = self.0.split('.');
        let mut have = subject.split('.');
        loop {
            match (want.next(), have.next()) {
                (Some(">"), Some(h)) => return !is_reserved(h) && have.all(|t| !is_reserved(t)),
                (Some("*"), Some(h)) if !is_reserved(h) => {}
                (Some(w), Some(h)) if w != "*" && w == h => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// True when some literal subject is matched by both patterns (for example `orders.*`
    /// and `*.created`), with the same `$` rule as [`matches`](Self::matches).
    pub fn overlaps(&self, other: &SubjectPattern) -> bool {
        let mut a = self.0.split('.');
        let mut b = other.0.split('.');
        loop {
            match (a.next(), b.next()) {
                (Some(">"), Some(t)) | (Some(t), Some(">")) => return !is_reserved(t),
                (Some("*"), Some(t)) | (Some(t), Some("*")) if !is_reserved(t) => {}
                (Some(x), Some(y)) if x == y => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// Whether the pattern names a `$`-namespace explicitly (any token starting with `$`).
    pub fn names_reserved(&self) -> bool {
        self.0.split('.').any(is_reserved)
    }
}

/// A token of NATS's control namespaces (`$JS`, `$KV`, `$SYS`, ...): any `$`-prefixed one.
fn is_reserved(token: &str) -> bool {
    token.starts_with('$')
}

impl fmt::Display for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SubjectPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        SubjectPattern::parse(&text).map_err(de::Error::custom)
    }
}

/// Checks that `subject` is a literal subject a message can be published to.
pub fn validate_literal(subject: &str) -> Result<(), String> {
    validate(subject, false)
}

fn validate(text: &str, wildcards: bool) -> Result<(), String> {
    const HINT: &str = "a subject is dot-separated tokens like \"orders.created\"";
    if text.is_empty() {
        return Err(format!("empty subject; {HINT}"));
    }
    if text.len() > 1024 {
        return Err(format!("subject is {} bytes long; at most 1024 are accepted", text.len()));
    }
    let tokens: Vec<&str> = text.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!("invalid subject {text:?}: empty token; {HINT}"));
        }
        if token.chars().any(char::is_whitespace) {
            return Err(format!("invalid subject {text:?}: whitespace is not allowed; {HINT}"));
        }
        let has_wildcard = token.contains('*') || token.contains('>');
        if has_wildcard && !wildcards {
            return Err(format!("invalid subject {text:?}: wildcards are not allowed here"));
        }
        if has_wildcard && *token != "*" && *token != ">" {
            return Err(format!(
                "invalid subject {text:?}: a wildcard must be a whole token (\"*\" or \">\"), not {token:?}"
            ));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Err(format!("invalid subject {text:?}: \">\" may only be the last token"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> SubjectPattern {
        SubjectPattern::parse(s).unwrap()
    }

    #[test]
    fn matching() {
        assert!(p("orders.created").matches("orders.created"));
        assert!(!p("orders.created").matches("orders.created.eu"));
        assert!(p("orders.*").matches("orders.created"));
        assert!(!p("orders.*").matches("orders"));
        assert!(!p("orders.*").matches("orders.created.eu"));
        assert!(p("orders.>").matches("orders.created.eu"));
        assert!(!p("orders.>").matches("orders"));
        assert!(p(">").matches("anything.at.all"));
        assert!(p("a.*.c").matches("a.b.c"));
        assert!(!p("a.*.c").matches("a.b.d"));
    }

    #[test]
    fn wildcards_never_reach_dollar_namespaces() {
        for subject in ["$JS.API.STREAM.DELETE.ORDERS", "$KV.prices.x", "$O.b.c", "$SYS.REQ.SERVER.PING", "$NRG.x"] {
            assert!(!p(">").matches(subject), "> matched {subject}");
            assert!(!p("*.>").matches(subject), "*.> matched {subject}");
        }
        assert!(!p("a.>").matches("a.$x.y"));
        assert!(!p("a.*").matches("a.$x"));
        assert!(p("$KV.prices.>").matches("$KV.prices.x"));
        assert!(p("$JS.API.*").matches("$JS.API.INFO"));
        assert!(p("$KV.prices.>").names_reserved());
        assert!(!p("orders.>").names_reserved());
    }

    #[test]
    fn overlapping() {
        assert!(p("orders.*").overlaps(&p("*.created")));
        assert!(p(">").overlaps(&p("orders.created")));
        assert!(p("orders.>").overlaps(&p("orders.a.b")));
        assert!(!p("orders.>").overlaps(&p("orders")));
        assert!(!p("orders.*").overlaps(&p("audit.*")));
        assert!(!p("a.*").overlaps(&p("a.b.c")));
        assert!(!p(">").overlaps(&p("$JS.API.>")));
        assert!(p("echo").overlaps(&p("echo")));
    }

    #[test]
    fn validation() {
        for bad in ["", "a..b", ".a", "a.", "a b", "a.>.b", "a.b*", "a.>x"] {
            assert!(SubjectPattern::parse(bad).is_err(), "{bad:?} should be invalid");
        }
        assert!(validate_literal("a.*").is_err());
        assert!(validate_literal("_INBOX.abc.1").is_ok());
    }
}
