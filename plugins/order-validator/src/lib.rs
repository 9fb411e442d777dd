//! Validates an order and publishes it, with its total, to `orders.validated`; an invalid
//! order is rejected with the reason (and so dead-lettered by the host).
//!
//! Input (JSON): `{"id": "o-1", "customer": "c-7", "currency": "EUR",
//!                 "items": [{"sku": "A1", "quantity": 2, "unit_price_cents": 1250}]}`

use serde::{Deserialize, Serialize};
use sluice_guest::{Error, Message, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Order {
    id: String,
    customer: String,
    currency: String,
    items: Vec<Item>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Item {
    sku: String,
    quantity: u32,
    unit_price_cents: u64,
}

#[derive(Serialize)]
struct Validated<'a> {
    id: &'a str,
    customer: &'a str,
    currency: &'a str,
    items: &'a [Item],
    total_cents: u64,
}

fn handle(msg: Message) -> Result {
    let order: Order = msg.json()?;
    let total_cents = validate(&order)?;
    sluice_guest::publish_json(
        "orders.validated",
        &Validated {
            id: &order.id,
            customer: &order.customer,
            currency: &order.currency,
            items: &order.items,
            total_cents,
        },
    )?;
    sluice_guest::log::info(format!("order {} validated: {total_cents} cents", order.id));
    Ok(())
}

/// The order's total in cents, or why it is not acceptable.
fn validate(order: &Order) -> Result<u64> {
    if order.id.trim().is_empty() {
        return Err(Error::reject("order has an empty id"));
    }
    if order.customer.trim().is_empty() {
        return Err(Error::reject(format!("order {}: empty customer", order.id)));
    }
    if let Some(currency) = sluice_guest::config("currency")
        && order.currency != currency
    {
        return Err(Error::reject(format!(
            "order {}: currency {} is not accepted (expected {currency})",
            order.id, order.currency
        )));
    }
    if order.items.is_empty() {
        return Err(Error::reject(format!("order {}: no items", order.id)));
    }
    let mut total: u64 = 0;
    for item in &order.items {
        if item.quantity == 0 {
            return Err(Error::reject(format!("order {}: item {} has quantity 0", order.id, item.sku)));
        }
        total = item
            .unit_price_cents
            .checked_mul(u64::from(item.quantity))
            .and_then(|line| total.checked_add(line))
            .ok_or_else(|| Error::reject(format!("order {}: total overflows", order.id)))?;
    }
    Ok(total)
}

sluice_guest::handler!(handle);
