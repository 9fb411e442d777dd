//! Does nothing and succeeds: the benchmark's measure of what Sluice itself costs per message
//! (a fresh instance, the call, the ack), with no handler work on top.

use sluice_guest::{Message, Result};

fn handle(_msg: Message) -> Result {
    Ok(())
}

sluice_guest::handler!(handle);
