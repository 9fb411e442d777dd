//! `sluice::testing::SubjectPattern::parse`, `SubjectPattern::matches` and
//! `sluice::testing::validate_literal` on an arbitrary pattern and subject.
//!
//! Checked besides "no panic":
//! - a subject `validate_literal` accepts is also a valid pattern, and matches itself;
//! - `>` matches every valid literal subject, and `*` exactly the one-token ones;
//! - for a valid pattern and a valid literal subject, `matches` agrees with the NATS rule
//!   written out token by token (`*` one token, `>` one or more trailing tokens);
//! - a valid pattern round-trips through `as_str`/`Display`.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sluice::testing::{SubjectPattern, validate_literal};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    pattern: &'a str,
    subject: &'a str,
}

/// The NATS matching rule, independent of Sluice's implementation.
fn reference(pattern: &[&str], subject: &[&str]) -> bool {
    match (pattern.split_first(), subject.split_first()) {
        (None, None) => true,
        (Some((&">", _)), Some(_)) => true,
        (Some((p, prest)), Some((s, srest))) if *p == "*" || p == s => reference(prest, srest),
        _ => false,
    }
}

fuzz_target!(|input: Input<'_>| {
    let literal_ok = validate_literal(input.subject).is_ok();
    if literal_ok {
        let own = SubjectPattern::parse(input.subject).expect("a valid literal subject is a valid pattern");
        assert!(own.matches(input.subject), "{:?} does not match itself", input.subject);
        assert!(SubjectPattern::parse(">").expect("valid").matches(input.subject));
        let one_token = !input.subject.contains('.');
        assert_eq!(SubjectPattern::parse("*").expect("valid").matches(input.subject), one_token);
    }
    match SubjectPattern::parse(input.pattern) {
        Ok(p) => {
            assert_eq!(p.as_str(), input.pattern);
            assert_eq!(p.to_string(), input.pattern);
            // `matches` is only ever given literal subjects, but must not panic on others.
            let got = p.matches(input.subject);
            if literal_ok {
                let want = reference(
                    &input.pattern.split('.').collect::<Vec<_>>(),
                    &input.subject.split('.').collect::<Vec<_>>(),
                );
                assert_eq!(got, want, "{:?} matches {:?}", input.pattern, input.subject);
            }
        }
        Err(reason) => {
            assert!(!reason.is_empty());
            assert!(validate_literal(input.pattern).is_err(), "{:?}: literal but not a pattern", input.pattern);
        }
    }
});
