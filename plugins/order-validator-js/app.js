// Validates an order and publishes it, with its total, to `orders.validated`; an invalid
// order is rejected with the reason (and so dead-lettered by the host). The JavaScript twin
// of plugins/order-validator: same input, output and reasons.
//
// Input (JSON): {"id": "o-1", "customer": "c-7", "currency": "EUR",
//                "items": [{"sku": "A1", "quantity": 2, "unit_price_cents": 1250}]}
import { handler, config, log, publishJson, Reject } from "../../guest-sdk/js/sluice.js";

const U64_MAX = 2n ** 64n - 1n;
const ORDER_KEYS = ["currency", "customer", "id", "items"];
const ITEM_KEYS = ["quantity", "sku", "unit_price_cents"];
const sameKeys = (o, keys) => JSON.stringify(Object.keys(o).sort()) === JSON.stringify(keys);

// Rejects what serde refuses in the Rust version: missing, unknown or mistyped fields.
function shape(order) {
  if (typeof order !== "object" || order === null || !sameKeys(order, ORDER_KEYS)) {
    throw new Reject(`invalid JSON payload: expected the fields ${ORDER_KEYS.join(", ")}`);
  }
  for (const key of ["id", "customer", "currency"]) {
    if (typeof order[key] !== "string") throw new Reject(`invalid JSON payload: ${key} must be a string`);
  }
  if (!Array.isArray(order.items)) throw new Reject("invalid JSON payload: items must be an array");
  for (const item of order.items) {
    if (typeof item !== "object" || item === null || !sameKeys(item, ITEM_KEYS) || typeof item.sku !== "string") {
      throw new Reject(`invalid JSON payload: an item needs exactly ${ITEM_KEYS.join(", ")}`);
    }
    for (const key of ["quantity", "unit_price_cents"]) {
      if (!Number.isSafeInteger(item[key]) || item[key] < 0) {
        throw new Reject(`invalid JSON payload: ${key} must be a non-negative integer`);
      }
    }
  }
}

// The order's total in cents (a BigInt, as u64 arithmetic is in Rust), or a Reject.
function validate(order) {
  const id = order.id;
  if (!id.trim()) throw new Reject("order has an empty id");
  if (!order.customer.trim()) throw new Reject(`order ${id}: empty customer`);
  const currency = config("currency");
  if (currency !== null && order.currency !== currency) {
    throw new Reject(`order ${id}: currency ${order.currency} is not accepted (expected ${currency})`);
  }
  if (order.items.length === 0) throw new Reject(`order ${id}: no items`);
  let total = 0n;
  for (const item of order.items) {
    if (item.quantity === 0) throw new Reject(`order ${id}: item ${item.sku} has quantity 0`);
    total += BigInt(item.unit_price_cents) * BigInt(item.quantity);
    if (total > U64_MAX) throw new Reject(`order ${id}: total overflows`);
  }
  return total;
}

export const handle = handler((msg) => {
  const order = msg.json();
  shape(order);
  const total = validate(order);
  // Field by field, in the Rust version's order, so the three publish the same bytes; the
  // total as a JSON number, exact below 2^53 cents.
  const items = order.items.map(({ sku, quantity, unit_price_cents }) => ({ sku, quantity, unit_price_cents }));
  const { id, customer, currency } = order;
  publishJson("orders.validated", { id, customer, currency, items, total_cents: Number(total) });
  log.info(`order ${order.id} validated: ${total} cents`);
});
