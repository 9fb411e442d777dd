//! Publishes each message's payload to `versioned.out`, with a `Version` header saying
//! which build handled it (`v1`, or `v2` when built with the `v2` feature). The hot-reload
//! tests use the two builds as two versions of one handler.

use sluice_guest::{Headers, Message, Result};

const VERSION: &str = if cfg!(feature = "v2") { "v2" } else { "v1" };

fn handle(msg: Message) -> Result {
    let mut headers = Headers::new();
    headers.insert("Version", VERSION);
    sluice_guest::publish_with_headers("versioned.out", &headers, msg.payload())?;
    if msg.reply_to().is_some() {
        sluice_guest::reply(VERSION)?;
    }
    Ok(())
}

sluice_guest::handler!(handle);
