// A test handler that exercises the JavaScript SDK, one command per message (the payload):
// `publish`, `kv` (counts in the kv bucket), `dedup KEY`, `reject`, `retry` (after 300 ms)
// and `raise` (an uncaught exception); anything else is echoed.
import { handler, publish, reply, kv, dedup, Reject, Retry } from "../../guest-sdk/js/sluice.js";

export const handle = handler((msg) => {
  const text = msg.text();
  const space = text.indexOf(" ");
  const command = space < 0 ? text : text.slice(0, space);
  const arg = space < 0 ? "" : text.slice(space + 1);
  switch (command) {
    case "publish":
      publish("probe.out", `from ${msg.subject}`, [["Probe-Lang", "js"]]);
      reply("published");
      break;
    case "kv": {
      const count = Number(kv.getText("count") ?? "0") + 1;
      kv.set("count", String(count));
      reply(String(count));
      break;
    }
    case "dedup":
      reply(dedup.checkAndMark(arg, 60) ? "first" : "seen");
      break;
    case "reject":
      throw new Reject("rejected on purpose");
    case "retry":
      throw new Retry(`not yet (attempt ${msg.delivery.attempt})`, { after: 0.3 });
    case "raise":
      throw new RangeError(`bad value ${arg}`);
    default:
      reply(msg.payload, [["Probe-Lang", "js"]]);
  }
});
