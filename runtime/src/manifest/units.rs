//! Human-readable durations ("250ms", "2s", "1h 30m") and sizes ("64MiB", "512KiB") as they
//! appear in manifests. Parsing is done by `humantime` and `bytesize`; these newtypes add the
//! error text a manifest author needs, and reject zero where zero makes no sense.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer};

/// The longest duration a manifest may write. Longer ones make no sense for any key, and
/// the runtime adds and multiplies them (deadlines, leases, ack waits in nanoseconds), which
/// must not overflow: the fuzzer found that an unbounded `timeout` panicked every message.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A duration written as a string: `timeout = "2s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match humantime::parse_duration(&text) {
            Ok(d) if d.is_zero() => Err(de::Error::custom(format!(
                "duration {text:?} is zero; expected a positive duration like \"500ms\" or \"2s\""
            ))),
            Ok(d) if d > MAX_DURATION => Err(de::Error::custom(format!(
                "duration {text:?} is too long; at most 10 years (\"3650d\") is accepted"
            ))),
            Ok(d) => Ok(HumanDuration(d)),
            Err(e) => Err(de::Error::custom(format!(
                "invalid duration {text:?} ({e}); expected a number and a unit, like \"500ms\", \"2s\", \"1m\" or \"24h\""
            ))),
        }
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A size in bytes written as a string: `memory = "64MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let hint = "expected a number and a unit, like \"64MiB\", \"512KiB\" or \"1GiB\"";
        if !text.trim_start().starts_with(|c: char| c.is_ascii_digit()) {
            return Err(de::Error::custom(format!("invalid size {text:?}; {hint}")));
        }
        match text.parse::<bytesize::ByteSize>() {
            Ok(size) if size.as_u64() == 0 => Err(de::Error::custom(format!("size {text:?} is zero; {hint}"))),
            Ok(size) => Ok(ByteSize(size.as_u64())),
            Err(_) => Err(de::Error::custom(format!("invalid size {text:?}; {hint}"))),
        }
    }
}

impl fmt::Display for ByteSize {
    /// Whole units where the size is a whole number of them ("64 MiB"), otherwise bytesize's
    /// rounded form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, name) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{} {name}", self.0 / unit);
            }
        }
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Doc {
        d: Option<HumanDuration>,
        s: Option<ByteSize>,
    }

    fn parse(text: &str) -> Result<Doc, String> {
        toml::from_str(text).map_err(|e| e.message().to_owned())
    }

    #[test]
    fn durations() {
        assert_eq!(parse("d = \"250ms\"").unwrap().d, Some(HumanDuration(Duration::from_millis(250))));
        assert_eq!(parse("d = \"1h 30m\"").unwrap().d, Some(HumanDuration(Duration::from_secs(5400))));
        assert!(parse("d = \"0s\"").unwrap_err().contains("is zero"));
        assert!(parse("d = \"2 parsecs\"").unwrap_err().contains("expected a number and a unit"));
        assert!(parse("d = 2").is_err());
        assert!(parse("d = \"9999999999999999999s\"").unwrap_err().contains("too long"));
        assert!(parse("d = \"3650d\"").is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse("s = \"64MiB\"").unwrap().s, Some(ByteSize(64 << 20)));
        assert_eq!(parse("s = \"512 KiB\"").unwrap().s, Some(ByteSize(512 << 10)));
        assert!(parse("s = \"lots\"").unwrap_err().contains("invalid size"));
        assert!(parse("s = \"0MiB\"").unwrap_err().contains("is zero"));
    }
}
