//! `sluice::testing::KeySpec::parse` and `KeySpec::derive` on an arbitrary spec and
//! message (subject, headers, payload).
//!
//! Checked besides "no panic":
//! - a derived key is non-empty and either at most 512 bytes or exactly `sha256:` followed by
//!   64 lowercase hex digits;
//! - derive is deterministic: the same spec and message give the same result, and so does
//!   a spec parsed again from the same text;
//! - a refusal (parse or derive) has a non-empty reason.
//!
//! Headers are built only from names and values async-nats accepts (`HeaderName::from_str`,
//! `HeaderValue::from_str`): `HeaderMap::insert` with an invalid name or value panics by
//! design in async-nats, and a received message never has one. The spec's own header name is
//! passed to `HeaderMap::get` by Sluice, which panics on a name async-nats refuses, so that
//! path is exercised with whatever name `KeySpec::parse` lets through.
#![no_main]

use std::str::FromStr;

use arbitrary::Arbitrary;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use sluice::testing::KeySpec;

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    spec: &'a str,
    subject: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    /// `None` for a message without headers; `Some` even when `headers` is empty.
    no_headers: bool,
    payload: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let spec = match KeySpec::parse(input.spec) {
        Ok(spec) => spec,
        Err(reason) => {
            assert!(!reason.is_empty(), "empty parse error for {:?}", input.spec);
            return;
        }
    };
    let mut map = HeaderMap::new();
    for (name, value) in &input.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::from_str(name), HeaderValue::from_str(value)) {
            map.append(n, v);
        }
    }
    let headers = if input.no_headers { None } else { Some(&map) };

    let first = spec.derive(input.subject, headers, input.payload);
    let again = spec.derive(input.subject, headers, input.payload);
    assert_eq!(first, again, "derive is not deterministic");
    let reparsed = KeySpec::parse(input.spec).expect("parsed once, parses again");
    assert_eq!(reparsed, spec);
    assert_eq!(reparsed.derive(input.subject, headers, input.payload), first);

    match first {
        Ok(key) => {
            assert!(!key.is_empty(), "empty key");
            let hashed = key.len() == 7 + 64
                && key.starts_with("sha256:")
                && key[7..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            assert!(key.len() <= 512 || hashed, "key of {} bytes that is not a sha256: key", key.len());
        }
        Err(reason) => assert!(!reason.is_empty(), "empty derive error"),
    }
});
