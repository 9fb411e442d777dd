"""Sluice's Python guest SDK: a small layer over the bindings componentize-py generates from
wit/handler.wit (the `wit_world` package, generated at build time, never edited).

    import sluice

    @sluice.handler
    def handle(msg: sluice.Message) -> None:
        sluice.reply(b"hello, " + msg.payload)

`@sluice.handler` defines `WitWorld` in the handler's module, which is what componentize-py
exports. Build (the pinned tools from `make tools`):

    .tools/py/bin/componentize-py -d wit -w handler componentize \\
        -p guest-sdk/python -p DIR app -o app.wasm

How a handler fails: raise `Reject(reason)` (dead-lettered, never retried) or
`Retry(reason, after=seconds)` (retried following the manifest's policy). Any other exception
becomes a retry whose reason is the exception's type and message; its traceback is logged
once, as one warn record.
"""

import json as _json
import traceback as _traceback
import sys as _sys
from typing import Any, Callable, List, Optional, Tuple

from componentize_py_types import Err as _Err
from wit_world.imports import config as _config
from wit_world.imports import dedup as _dedup
from wit_world.imports import kv as _kv
from wit_world.imports import log as _log
from wit_world.imports import outbox as _outbox
try:
    from wit_world.imports import types as _types
except ImportError:
    # The handler-http world (sluice_http) imports wasi:http's `types` too: componentize-py
    # then names each after its package.
    from wit_world.imports import sluice_handler_types as _types

__all__ = [
    "Message", "Delivery", "Reject", "Retry", "PublishError", "StateError", "handler",
    "publish", "publish_json", "reply", "config", "log", "dedup", "kv",
]

Headers = List[Tuple[str, str]]


class Reject(Exception):
    """A permanent failure: the message is dead-lettered with this reason, not retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Retry(Exception):
    """A transient failure: the host runs the message again following the retry policy,
    waiting at least `after` seconds when given (clamped to the policy's maximum delay)."""

    def __init__(self, reason: str, after: Optional[float] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after = after


class PublishError(Reject):
    """The host refused an output (a subject outside `capabilities.publish`, a reply to a
    message without a reply subject). A `Reject`, since a retry would not fix it, as in the
    Rust SDK."""


class StateError(Exception):
    """The handler's store (dedup marks, kv) could not be reached. Uncaught, it is retried."""


class Delivery:
    """What the host knows about this delivery: `attempt` (1 first), `max_attempts`,
    `idempotency_key` and `stream_sequence` (None when not configured / not JetStream)."""

    __slots__ = ("attempt", "max_attempts", "idempotency_key", "stream_sequence")

    def __init__(self, d: "_types.Delivery") -> None:
        self.attempt = d.attempt
        self.max_attempts = d.max_attempts
        self.idempotency_key = d.idempotency_key
        self.stream_sequence = d.stream_sequence


class Message:
    """One message: `subject`, `reply_to`, `headers` (a list of (name, value) pairs in arrival
    order; a name may repeat), `payload` (bytes) and `delivery`."""

    __slots__ = ("subject", "reply_to", "headers", "payload", "delivery")

    def __init__(self, msg: "_types.Message", delivery: "_types.Delivery") -> None:
        self.subject = msg.subject
        self.reply_to = msg.reply_to
        self.headers: Headers = list(msg.headers)
        self.payload: bytes = bytes(msg.payload)
        self.delivery = Delivery(delivery)

    def header(self, name: str) -> Optional[str]:
        """The first value of header `name` (names compare case-insensitively), or None."""
        lower = name.lower()
        for k, v in self.headers:
            if k.lower() == lower:
                return v
        return None

    def text(self) -> str:
        """The payload as UTF-8 text; a payload that is not UTF-8 is rejected."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Reject(f"payload is not UTF-8: {e}") from None

    def json(self) -> Any:
        """The payload parsed as JSON; one that does not parse is rejected (a retry would not
        fix it)."""
        try:
            return _json.loads(self.payload)
        except ValueError as e:
            raise Reject(f"invalid JSON payload: {e}") from None


def _bytes(data: "bytes | str") -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def publish(subject: str, payload: "bytes | str", headers: Optional[Headers] = None) -> None:
    """Queue a message for `subject`, sent only if the handler succeeds. Raises
    `PublishError` when the manifest does not allow the subject."""
    try:
        _outbox.publish(subject, list(headers or []), _bytes(payload))
    except _Err as e:
        raise PublishError(str(e.value)) from None


def publish_json(subject: str, value: Any, headers: Optional[Headers] = None) -> None:
    """`publish` with `value` serialised as compact JSON and `Content-Type: application/json`
    (as the Rust SDK's `publish_json`)."""
    all_headers = [("Content-Type", "application/json"), *(headers or [])]
    publish(subject, _json.dumps(value, separators=(",", ":")), all_headers)


def reply(payload: "bytes | str", headers: Optional[Headers] = None) -> None:
    """Queue the reply to the message being handled (request-reply)."""
    try:
        _outbox.reply(list(headers or []), _bytes(payload))
    except _Err as e:
        raise PublishError(str(e.value)) from None


def config(key: str, default: Optional[str] = None) -> Optional[str]:
    """A value of the manifest's `[config]` table, as text, or `default`."""
    value = _config.get(key)
    return default if value is None else value


class _Log:
    """Logs through the host, tagged with the handler name: `sluice.log.info("...")`."""

    def trace(self, message: str) -> None:
        _log.log(_types.Level.TRACE, message)

    def debug(self, message: str) -> None:
        _log.log(_types.Level.DEBUG, message)

    def info(self, message: str) -> None:
        _log.log(_types.Level.INFO, message)

    def warn(self, message: str) -> None:
        _log.log(_types.Level.WARN, message)

    def error(self, message: str) -> None:
        _log.log(_types.Level.ERROR, message)


log = _Log()


def _state(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except _Err as e:
        raise StateError(str(e.value)) from None


class _Dedup:
    """The handler's own dedup marks, for side effects the host cannot see."""

    def check_and_mark(self, key: str, ttl: float) -> bool:
        """Marks `key` for `ttl` seconds: True the first time, False when already marked."""
        return _state(lambda: _dedup.check_and_mark(key, max(0, int(ttl * 1000))))

    def forget(self, key: str) -> None:
        _state(lambda: _dedup.forget(key))


class _Kv:
    """A small key-value bucket of the handler's own."""

    def get(self, key: str) -> Optional[bytes]:
        value = _state(lambda: _kv.get(key))
        return None if value is None else bytes(value)

    def set(self, key: str, value: "bytes | str") -> None:
        _state(lambda: _kv.set(key, _bytes(value)))

    def delete(self, key: str) -> None:
        _state(lambda: _kv.delete(key))

    def compare_and_swap(self, key: str, expected: "Optional[bytes | str]", value: "bytes | str") -> bool:
        """Sets `value` if the current value is `expected` (None: absent); False otherwise."""
        exp = None if expected is None else _bytes(expected)
        return _state(lambda: _kv.compare_and_swap(key, exp, _bytes(value)))


dedup = _Dedup()
kv = _Kv()


def _failure(e: BaseException) -> "_types.Failure":
    """The failure the host gets for exception `e` (logging its traceback when uncaught)."""
    if isinstance(e, Reject):
        return _types.Failure_Reject(e.reason)
    if isinstance(e, Retry):
        after_ms = None if e.after is None else max(0, int(e.after * 1000))
        return _types.Failure_Retry(_types.RetryHint(e.reason, after_ms))
    # An uncaught exception is a bug or a transient fault, not a verdict on the message: retry
    # it, with a reason that says what it was (the traceback goes to the log, not into
    # every dead-letter header). One record, so the lines stay together in any log sink.
    # The first frame is the SDK's own wrapper: start at the handler's.
    tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
    trace = "".join(_traceback.format_exception(type(e), e, tb)).rstrip()
    _log.log(_types.Level.WARN, f"uncaught exception in handler\n{trace}")
    name = type(e).__qualname__
    if type(e).__module__ not in ("builtins", "__main__"):
        name = f"{type(e).__module__}.{name}"
    text = str(e)
    return _types.Failure_Retry(_types.RetryHint(f"{name}: {text}" if text else name, None))


def handler(fn: Callable[[Message], None]) -> Callable[[Message], None]:
    """Makes `fn(msg)` the module's handler: defines `WitWorld` in `fn`'s module (what
    componentize-py exports), turning `Reject`, `Retry` and any other exception into the
    failure the host expects."""

    class WitWorld:
        def handle(self, msg: "_types.Message", delivery: "_types.Delivery") -> None:
            try:
                fn(Message(msg, delivery))
            # BaseException too: a `sys.exit()` escaping would trap the component, whose
            # toolchain then logs its own panic, which reads like a Sluice bug.
            except BaseException as e:  # noqa: BLE001 - every exception must become a failure
                raise _Err(_failure(e)) from None

    WitWorld.__qualname__ = "WitWorld"
    setattr(_sys.modules[fn.__module__], "WitWorld", WitWorld)
    return fn
