//! Replies to every request with its payload. With `tag` set in the manifest's `[config]`,
//! the reply carries a `Test-Tag` header naming it (tests use it to tell runtimes apart).

use sluice_guest::{Headers, Message, Result};

fn handle(msg: Message) -> Result {
    if msg.reply_to().is_none() {
        sluice_guest::log::warn(format!("message on {} has no reply subject", msg.subject()));
        return Ok(());
    }
    let mut headers = Headers::new();
    if let Some(tag) = sluice_guest::config("tag") {
        headers.insert("Test-Tag", tag);
    }
    sluice_guest::reply_with_headers(&headers, msg.payload())?;
    Ok(())
}

sluice_guest::handler!(handle);
