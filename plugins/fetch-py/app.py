# sluice-build: wasi-http
"""The Python twin of plugins/fetch, with sluice_http (the SDK's helper over wasi:http): sends
the payload to `[config] url` (without one: the payload's first line is the URL, the rest the
body) and publishes what came back to `[config] output` (default `fetch.out`):
`"<status> <body>"`, or `"error <code>"` when the request failed or was refused (the wasi:http
error code's name, as plugins/fetch prints it). `[config] method` defaults to POST.

The first line tells scripts/build-plugins.sh to build it for the world `handler-http`."""

import sluice
import sluice_http


@sluice.handler
def handle(msg: sluice.Message) -> None:
    url = sluice.config("url")
    body = msg.payload
    if url is None:
        first, _, rest = body.partition(b"\n")
        url, body = first.decode("utf-8", "replace"), rest
    output = sluice.config("output") or "fetch.out"
    method = sluice.config("method") or "POST"
    try:
        r = sluice_http.fetch(
            url, method=method, headers=[("content-type", "application/octet-stream")], body=body
        )
        text = f"{r.status} {r.text()}"
    except sluice_http.HttpError as e:
        text = f"error {e.code}"
    sluice.publish(output, text)
