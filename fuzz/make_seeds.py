#!/usr/bin/env python3
"""Writes the seed corpora of the `arbitrary`-typed targets (idempotency_key, subject_match).

Their inputs are decoded by `#[derive(Arbitrary)]` (arbitrary 1.x), so a readable seed has to
be encoded the way `Unstructured` reads it: for every `&str` field, its bytes at the front and
its length as one byte taken from the *end* of the input (true while the input is at most
256 bytes, which every seed here is); a `Vec` element is preceded by a byte whose low bit
says "one more"; a `bool` is one byte from the front; the last field takes the rest.

Check a seed with `cargo fuzz fmt <target> corpus/<target>/<file>`.
Run from fuzz/:  python3 make_seeds.py
"""

import os


class Enc:
    def __init__(self):
        self.front = bytearray()
        self.lengths = []

    def str(self, s):
        b = s.encode() if isinstance(s, str) else s
        self.front += b
        self.lengths.append(len(b))
        return self

    def byte(self, v):
        self.front.append(v)
        return self

    def rest(self, b):
        self.front += b.encode() if isinstance(b, str) else b
        return self

    def bytes(self):
        data = bytes(self.front) + bytes(reversed(self.lengths))
        assert len(data) <= 256, "seeds must stay at most 256 bytes (one-byte lengths)"
        return data


def idempotency(spec, subject, headers, payload, no_headers=False):
    e = Enc().str(spec).str(subject)
    for name, value in headers:
        e.byte(1).str(name).str(value)
    e.byte(0).byte(1 if no_headers else 0).rest(payload)
    return e.bytes()


def subject(pattern, subj):
    # The last field takes the rest: no length byte for it.
    e = Enc().str(pattern)
    e.rest(subj)
    return e.bytes()


ORDER = '{"order":{"id":"o-7","n":42,"tags":["a"],"x":null,"f":1.5e3}}'
IDEMPOTENCY = {
    "header-msg-id": idempotency("header:Nats-Msg-Id", "orders.created", [("Nats-Msg-Id", "m-1")], ""),
    "header-missing": idempotency("header:Nats-Msg-Id", "s", [], "", no_headers=True),
    "json-id": idempotency("json:/order/id", "orders.created", [], ORDER),
    "json-number": idempotency("json:/order/n", "s", [], ORDER),
    "json-array": idempotency("json:/order/tags", "s", [], ORDER),
    "json-escaped": idempotency("json:/a~1b/~0c", "s", [], '{"a/b":{"~c":"v"}}'),
    "json-not-json": idempotency("json:/order/id", "s", [], "not json"),
    "payload-sha256": idempotency("payload-sha256", "s", [], "hello"),
    "subject": idempotency("subject", "orders.created.eu", [], ""),
    "template": idempotency(
        "{subject}/{header:Tenant}/{json:/order/id}",
        "orders.created",
        [("Tenant", "acme"), ("Nats-Msg-Id", "m-1"), ("Tenant", "second")],
        ORDER,
    ),
    "template-literal-only": idempotency("{", "s", [], ""),
    "template-unmatched": idempotency("a}{subject}", "s", [], ""),
    "long-subject": idempotency("{subject}{subject}{subject}", "x" * 180, [], ""),
}

SUBJECT = {
    "literal": subject("orders.created", "orders.created"),
    "star": subject("orders.*", "orders.created"),
    "star-mid": subject("a.*.c", "a.b.c"),
    "gt": subject("orders.>", "orders.created.eu"),
    "gt-only": subject(">", "_INBOX.abc.1"),
    "gt-not-last": subject("a.>.b", "a.x.b"),
    "empty-token": subject("a..b", "a..b"),
    "whitespace": subject("a b", "a\u00a0b"),
    "partial-wildcard": subject("a.b*", "a.b*"),
}


def write(target, seeds):
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", target)
    os.makedirs(folder, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(folder, "seed-" + name), "wb") as f:
            f.write(data)


write("idempotency_key", IDEMPOTENCY)
write("subject_match", SUBJECT)
