"""A test handler that exercises the Python SDK, one command per message (the payload):
`publish`, `kv` (counts in the kv bucket), `dedup KEY`, `reject`, `retry` (after 300 ms) and
`raise` (an uncaught exception); anything else is echoed."""

import sluice


@sluice.handler
def handle(msg: sluice.Message) -> None:
    command, _, arg = msg.text().partition(" ")
    if command == "publish":
        sluice.publish("probe.out", f"from {msg.subject}", [("Probe-Lang", "py")])
        sluice.reply("published")
    elif command == "kv":
        count = int(sluice.kv.get("count") or b"0") + 1
        sluice.kv.set("count", str(count))
        sluice.reply(str(count))
    elif command == "dedup":
        sluice.reply("first" if sluice.dedup.check_and_mark(arg, 60) else "seen")
    elif command == "reject":
        raise sluice.Reject("rejected on purpose")
    elif command == "retry":
        raise sluice.Retry(f"not yet (attempt {msg.delivery.attempt})", after=0.3)
    elif command == "raise":
        raise ValueError(f"bad value {arg}")
    else:
        sluice.reply(msg.payload, [("Probe-Lang", "py")])
