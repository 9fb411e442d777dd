"""Validates an order and publishes it, with its total, to `orders.validated`; an invalid
order is rejected with the reason (and so dead-lettered by the host). The Python twin of
plugins/order-validator: same input, output and reasons.

Input (JSON): {"id": "o-1", "customer": "c-7", "currency": "EUR",
               "items": [{"sku": "A1", "quantity": 2, "unit_price_cents": 1250}]}
"""

import sluice
from sluice import Reject

U64_MAX = 2**64 - 1
ORDER_KEYS = {"id", "customer", "currency", "items"}
ITEM_KEYS = {"sku", "quantity", "unit_price_cents"}


def _shape(order):
    """Rejects what serde would refuse in the Rust version: missing, unknown or mistyped fields."""
    if not isinstance(order, dict) or set(order) != ORDER_KEYS:
        raise Reject(f"invalid JSON payload: expected the fields {sorted(ORDER_KEYS)}")
    for key in ("id", "customer", "currency"):
        if not isinstance(order[key], str):
            raise Reject(f"invalid JSON payload: {key} must be a string")
    if not isinstance(order["items"], list):
        raise Reject("invalid JSON payload: items must be an array")
    for item in order["items"]:
        if not isinstance(item, dict) or set(item) != ITEM_KEYS or not isinstance(item["sku"], str):
            raise Reject(f"invalid JSON payload: an item needs exactly {sorted(ITEM_KEYS)}")
        for key in ("quantity", "unit_price_cents"):
            if type(item[key]) is not int or item[key] < 0:
                raise Reject(f"invalid JSON payload: {key} must be a non-negative integer")


def validate(order) -> int:
    """The order's total in cents, or a Reject saying why it is not acceptable."""
    oid = order["id"]
    if not oid.strip():
        raise Reject("order has an empty id")
    if not order["customer"].strip():
        raise Reject(f"order {oid}: empty customer")
    currency = sluice.config("currency")
    if currency is not None and order["currency"] != currency:
        raise Reject(f"order {oid}: currency {order['currency']} is not accepted (expected {currency})")
    if not order["items"]:
        raise Reject(f"order {oid}: no items")
    total = 0
    for item in order["items"]:
        if item["quantity"] == 0:
            raise Reject(f"order {oid}: item {item['sku']} has quantity 0")
        total += item["unit_price_cents"] * item["quantity"]
        if total > U64_MAX:
            raise Reject(f"order {oid}: total overflows")
    return total


@sluice.handler
def handle(msg: sluice.Message) -> None:
    order = msg.json()
    _shape(order)
    total = validate(order)
    # Field by field, in the Rust version's order, so the three publish the same bytes.
    items = [{"sku": i["sku"], "quantity": i["quantity"], "unit_price_cents": i["unit_price_cents"]} for i in order["items"]]
    validated = {"id": order["id"], "customer": order["customer"], "currency": order["currency"], "items": items}
    sluice.publish_json("orders.validated", {**validated, "total_cents": total})
    sluice.log.info(f"order {order['id']} validated: {total} cents")
