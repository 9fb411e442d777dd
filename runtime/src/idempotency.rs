//! Idempotency keys: what makes two deliveries "the same message", derived by the host from
//! the message as the manifest says.
//!
//! | `key =` | the key |
//! |---|---|
//! | `"header:Nats-Msg-Id"` (the default) | the first value of that header |
//! | `"json:/order/id"` | the value at that JSON pointer in the payload (text as is, numbers and booleans as written, objects and arrays as compact JSON) |
//! | `"payload-sha256"` | the SHA-256 of the payload, in hex |
//! | `"subject"` | the subject |
//! | a template, like `"{subject}:{header:Tenant}:{json:/order/id}"` | the parts above, between literal text |
//!
//! A key longer than 512 bytes is replaced by `sha256:<hex of the key>`.

use std::fmt;
use std::time::Duration;

use async_nats::HeaderMap;
use serde::de::{self, Deserialize, Deserializer};
use sha2::{Digest, Sha256};

/// Keys longer than this are hashed.
const MAX_KEY: usize = 512;

/// How the key is derived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Header(String),
    Json(String),
    PayloadSha256,
    Subject,
}

impl Default for KeySpec {
    /// `header:Nats-Msg-Id`: the id JetStream itself deduplicates publishes by.
    fn default() -> Self {
        KeySpec(vec![Part::Header("Nats-Msg-Id".to_owned())])
    }
}

impl KeySpec {
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts =
            if text.contains('{') || text.contains('}') { parse_template(text)? } else { vec![parse_part(text)?] };
        if !parts.iter().any(|p| !matches!(p, Part::Literal(_))) {
            return Err(format!("key template {text:?} uses no part of the message"));
        }
        Ok(KeySpec(parts))
    }

    /// The key of a message, or why it has none.
    pub fn derive(&self, subject: &str, headers: Option<&HeaderMap>, payload: &[u8]) -> Result<String, String> {
        let mut json: Option<Result<serde_json::Value, String>> = None;
        let mut key = String::new();
        for part in &self.0 {
            match part {
                Part::Literal(text) => key.push_str(text),
                Part::Subject => key.push_str(subject),
                Part::PayloadSha256 => key.push_str(sha256_hex(payload).as_str()),
                Part::Header(name) => {
                    let value = headers
                        .and_then(|h| h.get(name.as_str()))
                        .map(|v| v.as_str())
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| format!("the message has no {name} header"))?;
                    key.push_str(value);
                }
                Part::Json(pointer) => {
                    let doc = json.get_or_insert_with(|| {
                        serde_json::from_slice(payload).map_err(|e| format!("the payload is not JSON ({e})"))
                    });
                    let doc = doc.as_ref().map_err(Clone::clone)?;
                    match doc.pointer(pointer) {
                        None | Some(serde_json::Value::Null) => {
                            return Err(format!("the payload has no value at {pointer}"));
                        }
                        Some(serde_json::Value::String(s)) => key.push_str(s),
                        Some(other) => key.push_str(&other.to_string()),
                    }
                }
            }
        }
        if key.is_empty() {
            return Err("the key is empty".to_owned());
        }
        if key.len() > MAX_KEY {
            key = format!("sha256:{}", sha256_hex(key.as_bytes()).as_str());
        }
        Ok(key)
    }
}

fn parse_part(text: &str) -> Result<Part, String> {
    let hint = "expected \"header:NAME\", \"json:/pointer\", \"payload-sha256\", \"subject\", or a template like \"{subject}/{header:NAME}\"";
    if let Some(name) = text.strip_prefix("header:") {
        if name.is_empty() || name.contains(|c: char| !c.is_ascii_graphic() || c == ':') {
            return Err(format!("invalid header name {name:?} in key {text:?}"));
        }
        return Ok(Part::Header(name.to_owned()));
    }
    if let Some(pointer) = text.strip_prefix("json:") {
        if !pointer.starts_with('/') {
            return Err(format!(
                "invalid JSON pointer {pointer:?} in key {text:?}: a pointer starts with '/', like \"/order/id\""
            ));
        }
        return Ok(Part::Json(pointer.to_owned()));
    }
    match text {
        "payload-sha256" => Ok(Part::PayloadSha256),
        "subject" => Ok(Part::Subject),
        _ => Err(format!("unknown key source {text:?}; {hint}")),
    }
}

fn parse_template(text: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            None => {
                parts.push(Part::Literal(rest.to_owned()));
                break;
            }
            Some(i) if rest.as_bytes()[i] == b'}' => {
                return Err(format!("unmatched '}}' in key template {text:?}"));
            }
            Some(i) => {
                if i > 0 {
                    parts.push(Part::Literal(rest[..i].to_owned()));
                }
                let close = rest[i..].find('}').ok_or_else(|| format!("unclosed '{{' in key template {text:?}"))?;
                parts.push(parse_part(&rest[i + 1..i + close])?);
                rest = &rest[i + close + 1..];
            }
        }
    }
    Ok(parts)
}

impl<'de> Deserialize<'de> for KeySpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        KeySpec::parse(&text).map_err(de::Error::custom)
    }
}

/// What to do with a message that has no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnMissing {
    /// Process it without dedup.
    Process,
    /// Dead-letter it with kind `missing-idempotency-key`.
    DeadLetter,
}

impl fmt::Display for OnMissing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnMissing::Process => "process",
            OnMissing::DeadLetter => "dead-letter",
        })
    }
}

/// A handler's idempotency settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: KeySpec,
    /// How long a completed key is remembered.
    pub ttl: Duration,
    pub on_missing: OnMissing,
    /// Keep a fingerprint of the payload: the same key with another payload is a conflict.
    pub fingerprint: bool,
}

/// The lowercase hex of a SHA-256, on the stack: `hex::encode` builds its string a char at
/// a time, and a key derived from the payload is made for every message.
struct Hex([u8; 64]);

impl Hex {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

fn sha256_hex(bytes: &[u8]) -> Hex {
    let mut out = [0u8; 64];
    // 32 bytes always fit 64 hex digits.
    let _ = hex::encode_to_slice(Sha256::digest(bytes), &mut out);
    Hex(out)
}

/// The SHA-256 of a payload, in hex.
pub fn fingerprint(payload: &[u8]) -> String {
    sha256_hex(payload).as_str().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_hash_is_lowercase_hex_of_its_sha256() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(fingerprint(b"abc"), abc);
        assert_eq!(fingerprint(b"\xff\x00"), hex::encode(Sha256::digest(b"\xff\x00")));
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, *v);
        }
        h
    }

    #[test]
    fn sources() {
        let h = headers(&[("Nats-Msg-Id", "m-1"), ("Tenant", "acme")]);
        let payload = br#"{"order":{"id":"o-7","n":42,"tags":["a"]}}"#;
        let derive = |spec: &str| KeySpec::parse(spec).unwrap().derive("orders.created", Some(&h), payload);
        assert_eq!(derive("header:Nats-Msg-Id").unwrap(), "m-1");
        assert_eq!(derive("json:/order/id").unwrap(), "o-7");
        assert_eq!(derive("json:/order/n").unwrap(), "42");
        assert_eq!(derive("json:/order/tags").unwrap(), r#"["a"]"#);
        assert_eq!(derive("subject").unwrap(), "orders.created");
        assert_eq!(derive("payload-sha256").unwrap(), fingerprint(payload));
        assert_eq!(derive("{subject}/{header:Tenant}/{json:/order/id}").unwrap(), "orders.created/acme/o-7");
    }

    #[test]
    fn missing_keys_say_why() {
        let spec = KeySpec::parse("json:/order/id").unwrap();
        assert!(spec.derive("s", None, b"not json").unwrap_err().contains("not JSON"));
        assert!(spec.derive("s", None, b"{}").unwrap_err().contains("no value at /order/id"));
        let spec = KeySpec::parse("header:Nats-Msg-Id").unwrap();
        assert_eq!(spec.derive("s", None, b"").unwrap_err(), "the message has no Nats-Msg-Id header");
    }

    #[test]
    fn long_keys_are_hashed() {
        let long = "x".repeat(2000);
        let h = headers(&[("K", long.as_str())]);
        let key = KeySpec::parse("header:K").unwrap().derive("s", Some(&h), b"").unwrap();
        assert!(key.starts_with("sha256:") && key.len() == 7 + 64);
    }

    #[test]
    fn bad_specs() {
        for bad in ["nats-msg-id", "json:order", "header:", "{subject", "a}b", "static-text", "{nope}"] {
            assert!(KeySpec::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
