//! Logging through the host: each line is tagged with the handler name and the message
//! subject, and filtered by the host's log level (`RUST_LOG`).
//!
//! Writing to stdout or stderr works too (the host logs each line), but these functions
//! carry a level.

use crate::__bindings::sluice::handler::log::log;
use crate::__bindings::sluice::handler::types::Level;

/// Logs at trace level.
pub fn trace(message: impl AsRef<str>) {
    log(Level::Trace, message.as_ref());
}

/// Logs at debug level.
pub fn debug(message: impl AsRef<str>) {
    log(Level::Debug, message.as_ref());
}

/// Logs at info level.
pub fn info(message: impl AsRef<str>) {
    log(Level::Info, message.as_ref());
}

/// Logs at warn level.
pub fn warn(message: impl AsRef<str>) {
    log(Level::Warn, message.as_ref());
}

/// Logs at error level.
pub fn error(message: impl AsRef<str>) {
    log(Level::Error, message.as_ref());
}
