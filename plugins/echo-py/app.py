"""Replies to every request with its payload: the Python twin of plugins/echo, for the
benchmark rows sluice_core_echo_py and sluice_core_echo_py_warm."""

import sluice


@sluice.handler
def handle(msg: sluice.Message) -> None:
    if msg.reply_to is None:
        sluice.log.warn(f"message on {msg.subject} has no reply subject")
        return
    sluice.reply(msg.payload)
