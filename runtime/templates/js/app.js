// Handler {{name}}: answers a name with a greeting, and says so on `{{name}}.greeted`.
import { handler, config, log, reply, publish, Reject } from "./sluice.js";

export const handle = handler((msg) => {
  const name = msg.text().trim();
  if (!name) {
    // Permanent: dead-lettered, never retried. `throw new Retry(reason, { after: 1 })` asks
    // for another try; any other exception is a retry too, its stack logged.
    throw new Reject("no name given");
  }
  log.info(`greeting ${name}`);
  // Outputs are sent only when the handler returns.
  reply(`${config("greeting", "Hello")}, ${name}!`);
  publish("{{name}}.greeted", name);
});
