// sluice-build: wasi-http
//
// The JavaScript twin of plugins/fetch, with the standard `fetch` (ComponentizeJS implements
// it over wasi:http/outgoing-handler, so the host checks it against the manifest's grants like
// any other request): sends the payload to `[config] url` (without one: the payload's first
// line is the URL, the rest the body) and publishes what came back to `[config] output`
// (default `fetch.out`): `"<status> <body>"`, or `"error <message>"` when the request failed
// or was refused. `[config] method` defaults to POST.
//
// The first line above tells scripts/build-plugins.sh to keep ComponentizeJS's `http`
// feature (the wasi:http imports), which it drops for every other JavaScript handler.
import { handler, config, publish } from "../../guest-sdk/js/sluice.js";

export const handle = handler(async (msg) => {
  let url = config("url");
  let body = msg.payload;
  if (url == null) {
    const end = body.indexOf(10); // '\n'
    url = new TextDecoder().decode(end < 0 ? body : body.subarray(0, end));
    body = end < 0 ? new Uint8Array(0) : body.subarray(end + 1);
  }
  const output = config("output", "fetch.out");
  const method = config("method", "POST");
  let text;
  try {
    const response = await fetch(url, {
      method,
      headers: { "content-type": "application/octet-stream" },
      body: method === "GET" ? undefined : body,
    });
    text = `${response.status} ${await response.text()}`;
  } catch (e) {
    text = `error ${e && e.message ? e.message : e}`;
  }
  publish(output, text);
});
