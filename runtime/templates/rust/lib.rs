//! Handler {{name}}: answers a name with a greeting, and says so on `{{name}}.greeted`.

use sluice_guest::{Error, Message, Result};

fn handle(msg: Message) -> Result {
    let name = msg.text()?.trim();
    if name.is_empty() {
        // Permanent: dead-lettered, never retried. `Error::retry(..)` asks for another try.
        return Err(Error::reject("no name given"));
    }
    let greeting = sluice_guest::config("greeting").unwrap_or_else(|| "Hello".into());
    sluice_guest::log::info(format!("greeting {name}"));
    // Outputs are sent only when the handler returns Ok.
    sluice_guest::reply(format!("{greeting}, {name}!"))?;
    sluice_guest::publish("{{name}}.greeted", name)?;
    Ok(())
}

sluice_guest::handler!(handle);
