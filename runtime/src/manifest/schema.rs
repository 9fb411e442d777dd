//! The manifest as written: serde structs with `deny_unknown_fields`. Each field's doc shows
//! the TOML it parses. Values that can be checked on their own (names, subjects, durations,
//! sizes) are checked here, so their errors point at the value; checks that need more than
//! one value live in `manifest::mod`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;

use super::units::{ByteSize, HumanDuration};
use crate::subject::SubjectPattern;

/// A whole manifest file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    /// `[handler]`: what runs.
    pub handler: HandlerSection,
    /// `[source]`: where its messages come from.
    pub source: SourceSection,
    /// `[limits]`: what one call may use.
    #[serde(default)]
    pub limits: LimitsSection,
    /// `[capabilities]`: what the handler may reach.
    #[serde(default)]
    pub capabilities: CapabilitiesSection,
    /// `[config]`: values the handler reads with `config.get`.
    #[serde(default)]
    pub config: BTreeMap<String, ConfigValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSection {
    /// `name = "orders-validate"`: unique across the runtime; letters, digits, `-` and `_`.
    pub name: Spanned<HandlerName>,
    /// `component = "../plugins/dist/order-validator.wasm"`: relative to the manifest's folder.
    pub component: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// `subject = "orders.created"`: core NATS subject (wildcards allowed).
    pub subject: SubjectPattern,
    /// `queue = "orders-validate"`: queue group shared by every Sluice process running this
    /// handler; defaults to the handler name.
    pub queue: Option<QueueName>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// `memory = "64MiB"`: linear memory one instance may grow to.
    pub memory: Option<Spanned<ByteSize>>,
    /// `timeout = "2s"`: wall-clock time one call may take.
    pub timeout: Option<HumanDuration>,
    /// `max_concurrency = 64`: messages of this handler processed at once.
    pub max_concurrency: Option<Concurrency>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilitiesSection {
    /// `publish = ["orders.validated", "audit.>"]`: subjects `outbox.publish` may reach.
    /// Checked after parsing, so that an error points at the element, not the array.
    #[serde(default)]
    pub publish: Vec<Spanned<String>>,
}

/// A handler name: `[A-Za-z0-9][A-Za-z0-9_-]*`, at most 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandlerName(pub String);

impl<'de> Deserialize<'de> for HandlerName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        let valid_start = name.starts_with(|c: char| c.is_ascii_alphanumeric());
        let valid_rest = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_start || !valid_rest || name.len() > 64 {
            return Err(de::Error::custom(format!(
                "invalid handler name {name:?}; expected 1 to 64 letters, digits, '-' or '_', starting with a letter or digit"
            )));
        }
        Ok(HandlerName(name))
    }
}

/// A queue group name: non-empty, no whitespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueName(pub String);

impl<'de> Deserialize<'de> for QueueName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        if name.is_empty()
            || name
                .chars()
                .any(|c| c.is_whitespace() || c == '*' || c == '>')
        {
            return Err(de::Error::custom(format!(
                "invalid queue group {name:?}; expected a non-empty name without whitespace or wildcards"
            )));
        }
        Ok(QueueName(name))
    }
}

/// `max_concurrency`: 1 to 10 000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency(pub u32);

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Concurrency;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer from 1 to 10000")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Concurrency, E> {
                match u32::try_from(n) {
                    Ok(n @ 1..=10_000) => Ok(Concurrency(n)),
                    _ => Err(E::custom(format!(
                        "max_concurrency = {n} is out of range; expected an integer from 1 to 10000"
                    ))),
                }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Concurrency, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A `[config]` value: a string, number or boolean, handed to the guest as text.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigValue(pub String);

impl<'de> Deserialize<'de> for ConfigValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ConfigValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_string()))
            }
        }
        deserializer.deserialize_any(V)
    }
}
