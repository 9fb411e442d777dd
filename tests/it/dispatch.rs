//! Messages through handlers, end to end: request-reply, publishing downstream, graceful
//! shutdown.

use std::time::Duration;

use futures::StreamExt;
use sluice_tests::{Sluice, client, collect_quiet, header, manifest, nats, request, sync, text};

#[tokio::test]
async fn echo_replies_to_a_request() {
    let server = nats();
    let sluice = Sluice::start(&server, &[("echo.toml", manifest("echo", "echo", "echo", ""))]).await;
    let nc = client(&server).await;

    let reply = request(&nc, "echo", "hello, sluice").await;
    assert_eq!(text(&reply), "hello, sluice");
    assert_eq!(header(&reply, "Sluice-Failure-Kind"), None);

    // Every request gets its own reply.
    for i in 0..20 {
        assert_eq!(text(&request(&nc, "echo", &format!("m{i}")).await), format!("m{i}"));
    }
    sluice.stop().await;
}

const ORDER_VALIDATOR: &str = r#"
[capabilities]
publish = ["orders.validated"]

[config]
currency = "EUR"
"#;

#[tokio::test]
async fn order_validator_publishes_valid_orders_and_rejects_invalid_ones() {
    let server = nats();
    let sluice = Sluice::start(
        &server,
        &[("orders.toml", manifest("order-validator", "order-validator", "orders.created", ORDER_VALIDATOR))],
    )
    .await;
    let nc = client(&server).await;
    let mut validated = nc.subscribe("orders.validated").await.unwrap();
    sync(&nc).await;

    let order = r#"{"id":"o-1","customer":"c-7","currency":"EUR",
        "items":[{"sku":"A1","quantity":2,"unit_price_cents":1250},{"sku":"B2","quantity":1,"unit_price_cents":99}]}"#;
    nc.publish("orders.created", order.into()).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), validated.next()).await.unwrap().unwrap();
    let body: serde_json::Value = serde_json::from_slice(&out.payload).unwrap();
    assert_eq!(body["id"], "o-1");
    assert_eq!(body["total_cents"], 2599);
    assert_eq!(header(&out, "Content-Type").as_deref(), Some("application/json"));

    // An invalid order is rejected with its reason (seen here through a request, whose
    // failure reply carries it) and publishes nothing.
    let bad =
        r#"{"id":"o-2","customer":"c-7","currency":"EUR","items":[{"sku":"A1","quantity":0,"unit_price_cents":5}]}"#;
    let reply = request(&nc, "orders.created", bad).await;
    assert_eq!(header(&reply, "Sluice-Failure-Kind").as_deref(), Some("rejected"));
    assert_eq!(header(&reply, "Sluice-Failure-Reason").as_deref(), Some("order o-2: item A1 has quantity 0"));
    let wrong_currency =
        r#"{"id":"o-3","customer":"c-7","currency":"USD","items":[{"sku":"A1","quantity":1,"unit_price_cents":5}]}"#;
    let reply = request(&nc, "orders.created", wrong_currency).await;
    assert!(header(&reply, "Sluice-Failure-Reason").unwrap().contains("currency USD is not accepted"));
    let reply = request(&nc, "orders.created", "not json").await;
    assert!(header(&reply, "Sluice-Failure-Reason").unwrap().starts_with("invalid JSON payload"));

    let extra = collect_quiet(&mut validated, Duration::from_millis(300), Duration::from_secs(2)).await;
    assert!(extra.is_empty(), "rejected orders were published: {:?}", extra.iter().map(text).collect::<Vec<_>>());
    sluice.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_messages() {
    let server = nats();
    let sluice = Sluice::start(
        &server,
        &[("m.toml", manifest("misbehave", "misbehave", "work", "[limits]\ntimeout = \"10s\""))],
    )
    .await;
    let nc = client(&server).await;

    let in_flight = {
        let nc = nc.clone();
        tokio::spawn(async move { request(&nc, "work", "sleep:700").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    sluice.stop().await;

    // The message that was running when shutdown began was finished and answered...
    let reply = in_flight.await.unwrap();
    assert_eq!(text(&reply), "slept");
    // ...and after shutdown nothing serves the subject any more.
    let after = nc.request("work", "ok".into()).await;
    assert!(after.is_err(), "a stopped runtime still answered");
}
