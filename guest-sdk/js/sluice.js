// Sluice's JavaScript guest SDK: a small layer over the imports jco generates from
// wit/handler.wit.
//
//   import { handler, reply } from "../../guest-sdk/js/sluice.js";
//   export const handle = handler((msg) => reply(`hello, ${msg.text()}`));
//
// Build from a directory that holds both app.js and this file (the pinned tools from
// `make tools`; `-d http fetch-event` drops the wasi:http imports added by default, which a
// handler without `[capabilities] http` may not import; a handler that calls `fetch` keeps
// them with `-d fetch-event` only, and its manifest grants the destinations):
//
//   .tools/js/node_modules/.bin/componentize-js app.js --wit wit -n handler \
//       -d http fetch-event -o app.wasm
//
// componentize-js's own CLI, not `jco componentize`: jco hands it the source text, so a
// relative `import` (this SDK) fails to resolve; given the file, it maps the working directory
// into the build and imports below it resolve.
//
// How a handler fails: throw `new Reject(reason)` (dead-lettered, never retried) or
// `new Retry(reason, { after: seconds })` (retried following the manifest's policy). Any other
// exception becomes a retry whose reason is its type and message; its stack is logged once,
// as one warn record.

import * as outbox from "sluice:handler/outbox@0.1.0";
import * as wlog from "sluice:handler/log@0.1.0";
import * as wconfig from "sluice:handler/config@0.1.0";
import * as wdedup from "sluice:handler/dedup@0.1.0";
import * as wkv from "sluice:handler/kv@0.1.0";

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/** A permanent failure: the message is dead-lettered with this reason, not retried. */
export class Reject extends Error {
  constructor(reason) {
    super(reason);
    this.name = "Reject";
    this.reason = String(reason);
  }
}

/** A transient failure, retried following the policy; not before `after` seconds if given. */
export class Retry extends Error {
  constructor(reason, { after } = {}) {
    super(reason);
    this.name = "Retry";
    this.reason = String(reason);
    this.after = after;
  }
}

/** The host refused an output (subject not granted, no reply subject): a `Reject`, since a
 * retry would not fix it, as in the Rust SDK. */
export class PublishError extends Reject {
  constructor(reason) {
    super(reason);
    this.name = "PublishError";
  }
}

/** The handler's store (dedup marks, kv) could not be reached. Uncaught, it is retried. */
export class StateError extends Error {
  constructor(reason) {
    super(reason);
    this.name = "StateError";
  }
}

/** One message: `subject`, `replyTo`, `headers` ([name, value] pairs in arrival order),
 * `payload` (Uint8Array), `delivery` ({ attempt, maxAttempts, idempotencyKey,
 * streamSequence }). */
export class Message {
  constructor(msg, delivery) {
    this.subject = msg.subject;
    this.replyTo = msg.replyTo ?? null;
    this.headers = msg.headers.map(([k, v]) => [k, v]);
    this.payload = msg.payload;
    this.delivery = {
      attempt: delivery.attempt,
      maxAttempts: delivery.maxAttempts,
      idempotencyKey: delivery.idempotencyKey ?? null,
      // A u64 arrives as a BigInt; a Number is exact up to 2^53, far past any stream.
      streamSequence: delivery.streamSequence == null ? null : Number(delivery.streamSequence),
    };
  }

  /** The first value of header `name` (case-insensitive), or null. */
  header(name) {
    const lower = name.toLowerCase();
    const found = this.headers.find(([k]) => k.toLowerCase() === lower);
    return found ? found[1] : null;
  }

  /** The payload as UTF-8 text; a payload that is not UTF-8 is rejected. */
  text() {
    try {
      return decoder.decode(this.payload);
    } catch (e) {
      throw new Reject(`payload is not UTF-8: ${e.message}`);
    }
  }

  /** The payload parsed as JSON; one that does not parse is rejected. */
  json() {
    const text = this.text();
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new Reject(`invalid JSON payload: ${e.message}`);
    }
  }
}

const bytes = (data) => (typeof data === "string" ? encoder.encode(data) : data);

// jco surfaces a WIT `result` error as a thrown ComponentError whose `payload` is the value.
const refusal = (e) => (e && e.payload !== undefined ? String(e.payload) : String(e));

/** Queue a message for `subject`, sent only if the handler succeeds. */
export function publish(subject, payload, headers = []) {
  try {
    outbox.publish(subject, headers, bytes(payload));
  } catch (e) {
    throw new PublishError(refusal(e));
  }
}

/** `publish` with `value` as JSON and `Content-Type: application/json` (as the Rust SDK). */
export function publishJson(subject, value, headers = []) {
  publish(subject, JSON.stringify(value), [["Content-Type", "application/json"], ...headers]);
}

/** Queue the reply to the message being handled (request-reply). */
export function reply(payload, headers = []) {
  try {
    outbox.reply(headers, bytes(payload));
  } catch (e) {
    throw new PublishError(refusal(e));
  }
}

/** A value of the manifest's `[config]`, as text, or `fallback`. */
export function config(key, fallback = null) {
  return wconfig.get(key) ?? fallback;
}

/** Logs through the host, tagged with the handler name. */
export const log = {
  trace: (m) => wlog.log("trace", String(m)),
  debug: (m) => wlog.log("debug", String(m)),
  info: (m) => wlog.log("info", String(m)),
  warn: (m) => wlog.log("warn", String(m)),
  error: (m) => wlog.log("error", String(m)),
};

function state(call) {
  try {
    return call();
  } catch (e) {
    throw new StateError(refusal(e));
  }
}

/** The handler's own dedup marks, for side effects the host cannot see. */
export const dedup = {
  /** Marks `key` for `ttl` seconds: true the first time, false when already marked. */
  checkAndMark: (key, ttl) =>
    state(() => wdedup.checkAndMark(key, BigInt(Math.max(0, Math.round(ttl * 1000))))),
  forget: (key) => state(() => wdedup.forget(key)),
};

/** A small key-value bucket of the handler's own; values are Uint8Array (strings accepted). */
export const kv = {
  get: (key) => state(() => wkv.get(key)) ?? null,
  getText: (key) => {
    const v = state(() => wkv.get(key));
    return v == null ? null : new TextDecoder().decode(v);
  },
  set: (key, value) => state(() => wkv.set(key, bytes(value))),
  delete: (key) => state(() => wkv.delete(key)),
  compareAndSwap: (key, expected, value) =>
    state(() => wkv.compareAndSwap(key, expected == null ? undefined : bytes(expected), bytes(value))),
};

function failure(e) {
  if (e instanceof Reject) {
    return { tag: "reject", val: e.reason };
  }
  if (e instanceof Retry) {
    const afterMs = e.after == null ? undefined : BigInt(Math.max(0, Math.round(e.after * 1000)));
    return { tag: "retry", val: { reason: e.reason, afterMs } };
  }
  // An uncaught exception is a bug or a transient fault, not a verdict on the message: retry
  // it, with a reason that says what it was (the stack goes to the log, once, as one record).
  const isError = e instanceof Error;
  const name = isError ? e.name || e.constructor.name : typeof e;
  const text = isError ? e.message : String(e);
  // The stack's frames below the handler are the SDK's and the toolchain's glue: cut them.
  const frames = isError && e.stack ? e.stack.trimEnd().split("\n") : [];
  const glue = frames.findIndex((f) => f.includes("sluice.js:"));
  const own = glue < 0 ? frames : frames.slice(0, glue);
  const stack = [`${name}: ${text}`, ...own].join("\n");
  wlog.log("warn", `uncaught exception in handler\n${stack}`);
  return { tag: "retry", val: { reason: text ? `${name}: ${text}` : name, afterMs: undefined } };
}

/** Wraps `fn(msg)` as the component's `handle` export: `export const handle = handler(fn)`.
 * `Reject`, `Retry` and any other exception become the failure the host expects. `fn` may be
 * `async` (to `await fetch(...)`): componentize-js then runs the event loop until the promise
 * settles, within the call's `limits.timeout`. */
export function handler(fn) {
  return function handle(msg, delivery) {
    let result;
    try {
      result = fn(new Message(msg, delivery));
    } catch (e) {
      // componentize-js turns a thrown value into the `err` of the result: it must be the
      // WIT `failure` variant itself, or the call traps ("invalid variant tag value").
      throw failure(e);
    }
    if (result != null && typeof result.then === "function") {
      // The same for a promise: its rejection becomes the `err`.
      return result.then(
        () => undefined,
        (e) => {
          throw failure(e);
        },
      );
    }
  };
}
