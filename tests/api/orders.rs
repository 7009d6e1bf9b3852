//! The REST API on both backends: orders are accepted and priced from the
//! catalog, read back at once and after a restart; bad input is refused by
//! field and stores nothing; an Idempotency-Key makes retries safe.

use order_saga::service::OrderView;
use order_saga_domain::OrderStatus;
use serde_json::{json, Value};

use crate::helpers::{order_body, spawn_app, Backend, TestStore};
use crate::on_both_backends;

on_both_backends!(
    an_order_is_accepted_priced_from_the_catalog_and_read_back,
    an_accepted_order_survives_a_restart,
    bad_input_is_refused_by_field_and_stores_nothing,
    an_unknown_order_is_not_found,
    a_retry_with_the_same_idempotency_key_returns_the_same_order,
);

async fn stocked_app(t: &TestStore) -> crate::helpers::TestApp {
    let app = spawn_app(t.store.clone()).await;
    app.set_product("p-1", "12900.00", 15).await;
    app.set_product("p-2", "0.10", 100).await;
    app
}

async fn an_order_is_accepted_priced_from_the_catalog_and_read_back(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = stocked_app(&t).await;
    // A client-sent price is ignored: prices come from the catalog.
    let body = json!({
        "userId": "u-1",
        "storeId": "s-1",
        "items": [
            {"productId": "p-1", "quantity": 2, "unitPrice": "0.01"},
            {"productId": "p-2", "quantity": 3}
        ]
    });
    let response = app.post_order(&body).await;
    assert_eq!(response.status(), 201);
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .expect("Location header");
    let created: Value = response.json().await.expect("json");
    let order_id = created["orderId"].as_str().expect("orderId").to_string();
    assert_eq!(created["status"], "ORDER_CREATED");
    assert_eq!(location, format!("/api/v1/orders/{order_id}"));

    let response = app.get_order(&order_id).await;
    assert_eq!(response.status(), 200);
    let order: OrderView = response.json().await.expect("order json");
    assert_eq!(order.status, OrderStatus::OrderCreated);
    assert_eq!(
        (order.user_id.as_str(), order.store_id.as_str()),
        ("u-1", "s-1")
    );
    let prices: Vec<(String, u32, String)> = order
        .items
        .iter()
        .map(|l| (l.product_id.clone(), l.quantity, l.unit_price.to_string()))
        .collect();
    assert_eq!(
        prices,
        vec![
            ("p-1".to_string(), 2, "12900.00".to_string()),
            ("p-2".to_string(), 3, "0.10".to_string())
        ]
    );
    assert_eq!(order.total_amount.to_string(), "25800.30");
    drop(app);
    t.cleanup().await;
}

async fn an_accepted_order_survives_a_restart(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = stocked_app(&t).await;
    let created: Value = app
        .post_order(&order_body(&[("p-1", 1)]))
        .await
        .json()
        .await
        .expect("json");
    let order_id = created["orderId"].as_str().expect("orderId").to_string();
    drop(app);
    t.store.close().await;

    let app = spawn_app(t.open().await).await;
    let order: OrderView = app
        .get_order(&order_id)
        .await
        .json()
        .await
        .expect("order json");
    assert_eq!(order.order_id, order_id);
    assert_eq!(order.total_amount.to_string(), "12900.00");
    app.app.store().close().await;
    drop(app);
    t.cleanup().await;
}

async fn bad_input_is_refused_by_field_and_stores_nothing(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = stocked_app(&t).await;
    let log_before = t.store.read_log(0, 1000).await.expect("log").len();
    let too_many: Vec<(&str, i64)> = vec![("p-1", 1); 101];
    let long_id = "u".repeat(65);
    let cases: Vec<(String, u16, Option<&str>)> = vec![
        ("{not json".into(), 400, None),
        (json!({"userId": "u-1", "items": [{"productId": "p-1", "quantity": 1}]}).to_string(), 400, Some("storeId")),
        (json!({"userId": "u-1", "storeId": "s-1", "items": [{"productId": "p-1"}]}).to_string(), 400, Some("items[0].quantity")),
        (json!({"userId": "u-1", "storeId": "s-1", "items": [{"productId": "p-1", "quantity": "two"}]}).to_string(), 400, Some("items[0].quantity")),
        (order_body(&[("p-1", -1)]).to_string(), 422, Some("items[0].quantity")),
        (order_body(&[("p-1", 0)]).to_string(), 422, Some("items[0].quantity")),
        (order_body(&[("p-1", 10_001)]).to_string(), 422, Some("items[0].quantity")),
        (order_body(&[]).to_string(), 422, Some("items")),
        (order_body(&too_many).to_string(), 422, Some("items")),
        (order_body(&[("p-1", 1), ("nope", 1)]).to_string(), 422, Some("items[1].productId")),
        (order_body(&[("p-1", 1), ("p-1", 2)]).to_string(), 422, Some("items[1].productId")),
        (json!({"userId": "", "storeId": "s-1", "items": [{"productId": "p-1", "quantity": 1}]}).to_string(), 422, Some("userId")),
        (json!({"userId": long_id, "storeId": "s-1", "items": [{"productId": "p-1", "quantity": 1}]}).to_string(), 422, Some("userId")),
        ("x".repeat(order_saga::http::MAX_BODY_BYTES + 1), 413, None),
    ];
    for (body, status, field) in cases {
        let shown: String = body.chars().take(80).collect();
        let response = app.post_order_raw(body, Some("key-for-bad-input")).await;
        assert_eq!(response.status(), status, "status for {shown}");
        if status != 413 {
            let error: Value = response.json().await.expect("error json");
            assert_eq!(error["error"]["code"], "BAD_USER_INPUT", "{shown}");
            assert_eq!(
                error["error"]["field"].as_str(),
                field,
                "field for {shown}: {error}"
            );
            assert!(error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
    }
    assert!(
        t.store
            .aggregate_ids("Order")
            .await
            .expect("ids")
            .is_empty(),
        "no order stored"
    );
    assert_eq!(
        t.store.read_log(0, 1000).await.expect("log").len(),
        log_before,
        "no event stored"
    );
    // The refused requests did not keep the key: a good one can use it.
    let good = app
        .post_order_raw(
            order_body(&[("p-1", 1)]).to_string(),
            Some("key-for-bad-input"),
        )
        .await;
    assert_eq!(good.status(), 201);
    drop(app);
    t.cleanup().await;
}

async fn an_unknown_order_is_not_found(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = spawn_app(t.store.clone()).await;
    let response = app.get_order("00000000-0000-0000-0000-000000000000").await;
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.expect("error json");
    assert_eq!(error["error"]["code"], "NOT_FOUND");
    drop(app);
    t.cleanup().await;
}

async fn a_retry_with_the_same_idempotency_key_returns_the_same_order(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = stocked_app(&t).await;
    let body = order_body(&[("p-1", 2)]).to_string();
    // Concurrent retries of one request, and a late one.
    let (a, b) = tokio::join!(
        app.post_order_raw(body.clone(), Some("retry-1")),
        app.post_order_raw(body.clone(), Some("retry-1"))
    );
    let c = app.post_order_raw(body.clone(), Some("retry-1")).await;
    let mut ids = Vec::new();
    for response in [a, b, c] {
        assert_eq!(response.status(), 201);
        let created: Value = response.json().await.expect("json");
        ids.push(created["orderId"].as_str().expect("orderId").to_string());
    }
    assert!(
        ids.iter().all(|id| id == &ids[0]),
        "same order every time: {ids:?}"
    );
    assert_eq!(
        t.store.aggregate_ids("Order").await.expect("ids"),
        vec![ids[0].clone()]
    );

    // The same key for a different request is refused.
    let other = app
        .post_order_raw(order_body(&[("p-2", 1)]).to_string(), Some("retry-1"))
        .await;
    assert_eq!(other.status(), 422);
    let error: Value = other.json().await.expect("error json");
    assert_eq!(error["error"]["field"], "Idempotency-Key");
    // Without a key, each request is a new order.
    let fresh: Value = app
        .post_order_raw(body, None)
        .await
        .json()
        .await
        .expect("json");
    assert_ne!(fresh["orderId"].as_str(), Some(ids[0].as_str()));
    drop(app);
    t.cleanup().await;
}
