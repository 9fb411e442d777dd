//! Write [Sluice](https://github.com/sluice-rs/sluice) message handlers in Rust.
//!
//! A handler is one function from a [`Message`] to a [`Result`], registered with
//! [`handler!`]. Build the crate as a `cdylib` for `wasm32-wasip2` and the `.wasm` file is a
//! component that `sluice run` loads directly.
//!
//! ```no_run
//! use sluice_guest::{Error, Message, Result};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: String, total_cents: u64 }
//!
//! fn handle(msg: Message) -> Result {
//!     let order: Order = msg.json()?; // a payload that is not an order is rejected
//!     if order.total_cents == 0 {
//!         return Err(Error::reject(format!("order {} is empty", order.id)));
//!     }
//!     sluice_guest::log::info(format!("order {} accepted", order.id));
//!     sluice_guest::publish("orders.accepted", msg.payload())?;
//!     Ok(())
//! }
//!
//! sluice_guest::handler!(handle);
//! ```
//!
//! What the host guarantees around that function:
//! - every call runs in a fresh instance: globals and heap do not survive between messages,
//!   unless the manifest sets `[limits] instances = "warm"`. Then an instance serves many
//!   messages and keeps its globals: cache what comes from your code and `[config]` (a parsed
//!   setting, a compiled regex, a table), never what came with one message (it would reach
//!   the next sender), and never rely on a cache being there (an instance is replaced after
//!   a failure, after `recycle_after` messages and on reload);
//! - [`publish`] and [`reply`] are buffered and sent only if the handler returns `Ok`;
//! - `Err(Error::Retry {..})`, a panic, a trap or a timeout make the host retry the message
//!   following the manifest's retry policy; `Err(Error::Reject(..))` dead-letters it at once.

mod error;
mod message;
mod state;

pub mod log;

pub use error::{Error, PublishError, Result};
pub use message::{Delivery, Headers, Message};
pub use state::{StateError, dedup, kv};

// The generated bindings are an implementation detail: handler authors use the API above.
#[doc(hidden)]
#[allow(clippy::too_many_arguments, missing_debug_implementations)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler",
        pub_export_macro: true,
        export_macro_name: "__export_handler",
        default_bindings_module: "::sluice_guest::__bindings",
        runtime_path: "::sluice_guest::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

// Lets the generated code name this crate as `::sluice_guest` from inside it too.
extern crate self as sluice_guest;

use __bindings::sluice::handler::{config as wit_config, outbox};

/// Queues a message for `subject`, sent after the handler returns `Ok`.
///
/// The subject must be allowed by the manifest's `capabilities.publish`.
pub fn publish(subject: &str, payload: impl AsRef<[u8]>) -> std::result::Result<(), PublishError> {
    publish_with_headers(subject, &Headers::new(), payload)
}

/// Like [`publish`], with headers.
pub fn publish_with_headers(
    subject: &str,
    headers: &Headers,
    payload: impl AsRef<[u8]>,
) -> std::result::Result<(), PublishError> {
    outbox::publish(subject, &headers.to_wit(), payload.as_ref()).map_err(PublishError)
}

/// Serialises `value` as JSON and [`publish`]es it with `Content-Type: application/json`.
#[cfg(feature = "json")]
pub fn publish_json<T: serde::Serialize + ?Sized>(subject: &str, value: &T) -> Result {
    let payload =
        serde_json::to_vec(value).map_err(|e| Error::reject(format!("cannot encode JSON for {subject}: {e}")))?;
    let mut headers = Headers::new();
    headers.insert("Content-Type", "application/json");
    publish_with_headers(subject, &headers, payload)?;
    Ok(())
}

/// Queues the reply to the message being handled (request-reply), sent after the handler
/// returns `Ok`. Fails when the message has no reply subject or a reply is already queued.
pub fn reply(payload: impl AsRef<[u8]>) -> std::result::Result<(), PublishError> {
    reply_with_headers(&Headers::new(), payload)
}

/// Like [`reply`], with headers.
pub fn reply_with_headers(headers: &Headers, payload: impl AsRef<[u8]>) -> std::result::Result<(), PublishError> {
    outbox::reply(&headers.to_wit(), payload.as_ref()).map_err(PublishError)
}

/// The value of `key` in the manifest's `[config]` table.
pub fn config(key: &str) -> Option<String> {
    wit_config::get(key)
}

/// Registers `fn(Message) -> sluice_guest::Result` as this component's handler.
///
/// Call it once, at the top level of the plugin crate:
///
/// ```ignore
/// fn handle(msg: sluice_guest::Message) -> sluice_guest::Result {
///     sluice_guest::reply(msg.payload())?;
///     Ok(())
/// }
/// sluice_guest::handler!(handle);
/// ```
#[macro_export]
macro_rules! handler {
    ($handler:path) => {
        #[doc(hidden)]
        struct __SluiceHandler;

        impl $crate::__bindings::Guest for __SluiceHandler {
            fn handle(
                msg: $crate::__bindings::Message,
                delivery: $crate::__bindings::Delivery,
            ) -> ::core::result::Result<(), $crate::__bindings::Failure> {
                $crate::__private::call($handler, msg, delivery)
            }
        }

        $crate::__bindings::__export_handler!(__SluiceHandler);
    };
}

#[doc(hidden)]
pub mod __private {
    use crate::__bindings::{Delivery as WitDelivery, Failure, Message as WitMessage};

    /// The glue `handler!` expands to: WIT types in, Rust types to the user's function.
    pub fn call(
        handler: impl FnOnce(crate::Message) -> crate::Result,
        msg: WitMessage,
        delivery: WitDelivery,
    ) -> Result<(), Failure> {
        handler(crate::Message::from_wit(msg, delivery)).map_err(crate::Error::into_wit)
    }
}
