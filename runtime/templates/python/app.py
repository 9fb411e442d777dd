"""Handler {{name}}: answers a name with a greeting, and says so on `{{name}}.greeted`."""

import sluice
from sluice import Reject


@sluice.handler
def handle(msg: sluice.Message) -> None:
    name = msg.text().strip()
    if not name:
        # Permanent: dead-lettered, never retried. `raise sluice.Retry(reason, after=1.0)`
        # asks for another try; any other exception is a retry too, its traceback logged.
        raise Reject("no name given")
    greeting = sluice.config("greeting", "Hello")
    sluice.log.info(f"greeting {name}")
    # Outputs are sent only when the handler returns.
    sluice.reply(f"{greeting}, {name}!")
    sluice.publish("{{name}}.greeted", name)
