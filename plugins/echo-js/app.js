// Replies to every request with its payload: the JavaScript twin of plugins/echo, for the
// benchmark rows sluice_core_echo_js and sluice_core_echo_js_warm.
import { handler, log, reply } from "../../guest-sdk/js/sluice.js";

export const handle = handler((msg) => {
  if (msg.replyTo == null) {
    log.warn(`message on ${msg.subject} has no reply subject`);
    return;
  }
  reply(msg.payload);
});
