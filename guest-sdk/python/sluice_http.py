"""Outgoing HTTP for Python handlers: a small, blocking helper over the `wasi:http` bindings
componentize-py generates (`wasi:http/outgoing-handler`, as Sluice's host checks it against
the manifest's `[capabilities] http`).

    import sluice
    import sluice_http

    @sluice.handler
    def handle(msg: sluice.Message) -> None:
        r = sluice_http.fetch("https://api.example.com/charge", method="POST", body=msg.payload)
        sluice.publish("charged", f"{r.status} {r.text()}")

Such a handler targets the world `handler-http` (Sluice's `handler` world plus
`wasi:http/outgoing-handler`), in guest-sdk/python/wit-http:

    .tools/py/bin/componentize-py -d guest-sdk/python/wit-http -w handler-http componentize \\
        -p guest-sdk/python -p DIR app -o app.wasm

(scripts/build-plugins.sh does so for a plugin whose app.py starts with the line
`# sluice-build: wasi-http`.) The host adds `Idempotency-Key: <message key>/<n>` to every
request when the message has a key and the request sets none.

A refused or failed request raises `HttpError`, whose `code` is the wasi:http error code's
name as the host set it (`"HttpRequestDenied"`, `"DestinationIpProhibited"`,
`"HttpResponseBodySize"`, `"HttpResponseTimeout"`, `"TlsCertificateError"`, ...). Uncaught,
it becomes a retry like any other exception. Redirects are not followed (each hop is a request
of its own, checked again by the host): a 3xx is returned as is.

componentize-py's own `poll_loop` module (asyncio over wasi:io/poll) cannot be imported in this
world: it expects the interface `types` to be wasi:http's, and here that name is shared with
Sluice's, so componentize-py calls them `wasi_http_types` and `sluice_handler_types`.
"""

from typing import List, Optional, Sequence, Tuple, Union

from componentize_py_types import Err as _Err
from wit_world.imports import outgoing_handler as _outgoing
from wit_world.imports import streams as _streams
from wit_world.imports import wasi_http_types as _http

__all__ = ["HttpError", "Response", "fetch"]

# The largest write `blocking-write-and-flush` accepts, and the read size.
_CHUNK = 4096
_READ = 64 * 1024


class HttpError(Exception):
    """A request the host refused, or that failed: `code` names the wasi:http error code."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class Response:
    """`status` (int), `headers` ([(name, value bytes)]), `body` (bytes)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: List[Tuple[str, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        """The first value of header `name` (case-insensitive) as text, or None."""
        lower = name.lower()
        for k, v in self.headers:
            if k.lower() == lower:
                return v.decode("utf-8", "replace")
        return None

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def _code(e: object) -> HttpError:
    """The HttpError for an `error-code` value (`ErrorCode_HttpRequestDenied(...)`, ...)."""
    name = type(e).__name__
    name = name[len("ErrorCode_"):] if name.startswith("ErrorCode_") else name
    value = getattr(e, "value", None)
    return HttpError(name, "" if value is None else repr(value))


def _stream_error(e: _Err) -> HttpError:
    err = e.value
    if isinstance(err, _streams.StreamError_LastOperationFailed):
        code = _http.http_error_code(err.value)
        if code is not None:
            return _code(code)
        return HttpError("HttpProtocolError", err.value.to_debug_string())
    return HttpError("HttpResponseIncomplete", "stream closed")


_METHODS = {
    "GET": _http.Method_Get(), "HEAD": _http.Method_Head(), "POST": _http.Method_Post(),
    "PUT": _http.Method_Put(), "DELETE": _http.Method_Delete(), "PATCH": _http.Method_Patch(),
    "OPTIONS": _http.Method_Options(),
}


def fetch(
    url: str,
    method: str = "GET",
    headers: Sequence[Tuple[str, Union[str, bytes]]] = (),
    body: Union[bytes, str, None] = None,
) -> Response:
    """Sends one request and returns the whole response (its body read to the end, within the
    manifest's `[http] max_response_bytes`). Raises `HttpError` when it is refused or fails."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise HttpError("HttpRequestUriInvalid", f"not an http(s) URL: {url!r}")
    slash = rest.find("/")
    authority, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    if "?" in authority:
        authority, query = authority.split("?", 1)
        path = "/?" + query

    fields = _http.Fields()
    for name, value in headers:
        fields.append(name, value.encode() if isinstance(value, str) else value)
    request = _http.OutgoingRequest(fields)
    request.set_method(_METHODS.get(method.upper()) or _http.Method_Other(method))
    request.set_scheme(_http.Scheme_Https() if scheme == "https" else _http.Scheme_Http())
    request.set_authority(authority)
    request.set_path_with_query(path)
    outgoing = request.body()
    try:
        pending = _outgoing.handle(request, None)
    except _Err as e:
        raise _code(e.value) from None

    # A request the host refused (or that failed) closes its body: the response says why.
    written: Optional[HttpError] = None
    data = body.encode() if isinstance(body, str) else (body or b"")
    stream = outgoing.write()
    try:
        for i in range(0, len(data), _CHUNK):
            stream.blocking_write_and_flush(data[i:i + _CHUNK])
    except _Err as e:
        written = _stream_error(e)
    finally:
        stream.__exit__(None, None, None)
    if written is None:
        try:
            _http.OutgoingBody.finish(outgoing, None)
        except _Err as e:
            written = _code(e.value)

    pending.subscribe().block()
    got = pending.get()
    if got is None or isinstance(got, _Err):
        raise written or HttpError("HttpResponseIncomplete", "no response")
    result = got.value
    if isinstance(result, _Err):
        raise _code(result.value)
    if written is not None:
        raise written
    response = result.value
    status = response.status()
    response_headers = response.headers().entries()
    incoming = response.consume()
    reading = incoming.stream()
    chunks: List[bytes] = []
    try:
        while True:
            try:
                chunks.append(reading.blocking_read(_READ))
            except _Err as e:
                if isinstance(e.value, _streams.StreamError_Closed):
                    break
                raise _stream_error(e) from None
    finally:
        reading.__exit__(None, None, None)
    return Response(status, response_headers, b"".join(chunks))
