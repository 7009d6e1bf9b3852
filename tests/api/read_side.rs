//! The read side on both backends: GraphQL queries and mutations over the
//! projections, read-your-writes, cursor pagination, the status
//! subscription over a real WebSocket, bad input, projection rebuild,
//! readiness, and `/metrics` of the real binary.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use order_saga::saga::payment::{self, SimulatedPayment};
use order_saga::service::CreateOrderRequest;
use order_saga::store::Store;
use order_saga_domain::{ItemRequest, PaymentMethod};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use order_saga::health::{Heartbeat, Readiness};
use order_saga::http::HttpState;
use tower::ServiceExt;

use crate::binary::serve;
use crate::helpers::{
    create_order, follow_order_at, order_body, spawn_app, spawn_service, Backend, TestApp,
    TestStore,
};
use crate::on_both_backends;

on_both_backends!(
    an_order_created_through_graphql_or_rest_reads_back_at_once,
    a_customer_cancels_only_before_payment_wait,
    pagination_walks_250_orders_without_gaps_or_repeats,
    a_subscription_streams_each_status_of_an_order,
    bad_graphql_input_gets_an_error_code_and_stores_nothing,
    a_rebuild_from_position_0_gives_the_same_read_models,
    readiness_reports_the_store_and_the_background_loops,
    metrics_count_what_the_orders_did,
);

impl TestApp {
    async fn stock(&self, products: &[(&str, &str, u32)]) {
        for (id, price, stock) in products {
            self.set_product(id, price, *stock).await;
        }
    }

    /// Waits until every order the store has is final (the saga is done).
    async fn settle(&self, orders: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for id in orders {
            loop {
                let order = self.app.order(id).await.expect("load").expect("order");
                if matches!(
                    order.status,
                    order_saga_domain::OrderStatus::PaymentWait
                        | order_saga_domain::OrderStatus::OrderCancelled
                ) {
                    break;
                }
                assert!(Instant::now() < deadline, "{id} never finished");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.projections.catch_up().await.expect("catch up");
    }
}

const ORDER_FIELDS: &str = "orderId userId storeId status totalAmount cancelReason version createdAt confirmedAt paymentWaitAt cancelledAt items { productId quantity unitPrice } history { position aggregateType eventType }";

async fn an_order_created_through_graphql_or_rest_reads_back_at_once(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = spawn_service(t.store.clone()).await;
    app.stock(&[("p-1", "12900.00", 15)]).await;

    let created = app
        .graphql(
            &format!("mutation($input: CreateOrderInput!) {{ createOrder(input: $input) {{ {ORDER_FIELDS} }} }}"),
            json!({"input": {"userId": "u-1", "storeId": "s-1", "items": [{"productId": "p-1", "quantity": 2}]}}),
        )
        .await;
    assert!(created["errors"].is_null(), "{created}");
    let order = &created["data"]["createOrder"];
    assert_eq!(order["totalAmount"], "25800.00");
    assert_eq!(order["items"][0]["unitPrice"], "12900.00");
    let graphql_id = order["orderId"].as_str().expect("id").to_string();

    let rest: Value = app
        .post_order(&order_body(&[("p-1", 1)]))
        .await
        .json()
        .await
        .expect("json");
    let rest_id = rest["orderId"].as_str().expect("id").to_string();
    // Read back at once, through GraphQL, whichever way it was created.
    for id in [&graphql_id, &rest_id] {
        let read = app
            .graphql(
                &format!("query($id: ID!) {{ order(id: $id) {{ {ORDER_FIELDS} }} }}"),
                json!({"id": id}),
            )
            .await;
        assert_eq!(read["data"]["order"]["orderId"], id.as_str(), "{read}");
        assert_eq!(read["data"]["order"]["userId"], "u-1");
    }
    // Later the saga has moved both on, with timestamps and history.
    app.settle(&[graphql_id.clone(), rest_id.clone()]).await;
    let read = app
        .graphql(
            &format!("query($id: ID!) {{ order(id: $id) {{ {ORDER_FIELDS} }} }}"),
            json!({"id": graphql_id}),
        )
        .await;
    let order = &read["data"]["order"];
    assert_eq!(order["status"], "PAYMENT_WAIT");
    assert!(
        order["confirmedAt"].is_string()
            && order["paymentWaitAt"].is_string()
            && order["cancelledAt"].is_null()
    );
    let types: Vec<&str> = order["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["eventType"].as_str())
        .collect();
    assert_eq!(
        types,
        [
            "OrderCreated",
            "StockReserved",
            "OrderConfirmed",
            "PaymentWaitStarted"
        ]
    );
    let history = app
        .graphql(
            "query($id: ID!) { orderHistory(id: $id) { eventType } }",
            json!({"id": graphql_id}),
        )
        .await;
    assert_eq!(
        history["data"]["orderHistory"].as_array().map(Vec::len),
        Some(4)
    );

    let product = app
        .graphql(
            r#"{ product(productId: "p-1") { productId price available reserved } }"#,
            json!({}),
        )
        .await;
    assert_eq!(
        product["data"]["product"],
        json!({"productId": "p-1", "price": "12900.00", "available": 12, "reserved": 3})
    );
    let stats = app
        .graphql(
            "{ sagaStats { ordersCreated completed cancelled inProgress stages { stage count } } }",
            json!({}),
        )
        .await;
    assert_eq!(stats["data"]["sagaStats"]["ordersCreated"], 2, "{stats}");
    drop(app);
    t.cleanup().await;
}

async fn a_customer_cancels_only_before_payment_wait(backend: Backend) {
    let t = TestStore::new(backend).await;
    // No saga: the order stays ORDER_CREATED until cancelled.
    let app = spawn_app(t.store.clone()).await;
    let projections = app.projections.clone();
    let runner = tokio::spawn(async move {
        loop {
            let _ = projections.run_once().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    app.stock(&[("p-1", "1.00", 5)]).await;
    let created: Value = app
        .post_order(&order_body(&[("p-1", 1)]))
        .await
        .json()
        .await
        .expect("json");
    let id = created["orderId"].as_str().expect("id").to_string();
    let cancel = "mutation($id: ID!) { cancelOrder(id: $id) { status cancelReason cancelledAt } }";
    let cancelled = app.graphql(cancel, json!({"id": id})).await;
    assert_eq!(
        cancelled["data"]["cancelOrder"]["status"], "ORDER_CANCELLED",
        "{cancelled}"
    );
    assert_eq!(
        cancelled["data"]["cancelOrder"]["cancelReason"],
        "CUSTOMER_REQUEST"
    );
    let again = app.graphql(cancel, json!({"id": id})).await;
    assert_eq!(
        again["errors"][0]["extensions"]["code"], "CONFLICT",
        "{again}"
    );
    let unknown = app.graphql(cancel, json!({"id": "nope"})).await;
    assert_eq!(
        unknown["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "{unknown}"
    );
    runner.abort();
    drop(app);
    t.cleanup().await;
}

async fn pagination_walks_250_orders_without_gaps_or_repeats(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = spawn_app(t.store.clone()).await;
    app.stock(&[("p-1", "1.00", 10)]).await;
    let mut created = Vec::new();
    for i in 0..250 {
        let request = CreateOrderRequest {
            user_id: format!("u-{}", i % 3),
            store_id: "s-1".into(),
            items: vec![ItemRequest {
                product_id: "p-1".into(),
                quantity: 1,
            }],
        };
        created.push(
            app.app
                .create_order(request, None)
                .await
                .expect("create")
                .order_id,
        );
    }
    app.projections.catch_up().await.expect("catch up");

    let page = "query($after: String, $filter: OrderFilterInput) { orders(first: 40, after: $after, filter: $filter) { edges { cursor node { orderId } } pageInfo { hasNextPage endCursor } } }";
    let walk = |filter: Value| {
        let app = &app;
        async move {
            let mut seen = Vec::new();
            let mut after = Value::Null;
            loop {
                let response = app
                    .graphql(page, json!({"after": after, "filter": filter}))
                    .await;
                let orders = &response["data"]["orders"];
                for edge in orders["edges"].as_array().expect("edges") {
                    seen.push(edge["node"]["orderId"].as_str().expect("id").to_string());
                }
                if orders["pageInfo"]["hasNextPage"] != true {
                    return seen;
                }
                after = orders["pageInfo"]["endCursor"].clone();
            }
        }
    };
    let all = walk(Value::Null).await;
    assert_eq!(all, created, "every order once, oldest first");
    let of_user_1 = walk(json!({"userId": "u-1", "status": "ORDER_CREATED"})).await;
    let expected: Vec<String> = created
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 1)
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(of_user_1, expected);
    assert!(walk(json!({"status": "PAYMENT_WAIT"})).await.is_empty());
    let too_big = app
        .graphql("{ orders(first: 101) { edges { cursor } } }", json!({}))
        .await;
    assert_eq!(
        too_big["errors"][0]["extensions"]["field"], "first",
        "{too_big}"
    );
    drop(app);
    t.cleanup().await;
}

/// Subscribes over graphql-transport-ws and collects the statuses until the
/// server completes the stream (at ORDER_COMPLETED or ORDER_CANCELLED); the
/// order is paid once it waits for its payment.
pub async fn statuses_over_websocket(
    address: &str,
    store: &Store,
    order_id: &str,
) -> Vec<(String, Value)> {
    let (mut socket, sent) = follow_order_at(
        address,
        json!({}),
        order_id,
        "orderId status cancelReason version",
    )
    .await;
    sent.expect("subscribe");
    let mut statuses = Vec::new();
    let deadline = Duration::from_secs(60);
    loop {
        let message = tokio::time::timeout(deadline, socket.next())
            .await
            .expect("the server kept talking")
            .expect("socket open")
            .expect("message");
        let Message::Text(text) = message else {
            continue;
        };
        let message: Value = serde_json::from_str(&text).expect("json");
        match message["type"].as_str() {
            Some("connection_ack") => {}
            Some("next") => {
                let change = &message["payload"]["data"]["orderStatusChanged"];
                let status = change["status"].as_str().expect("status").to_string();
                if status == "PAYMENT_WAIT" {
                    let payment = SimulatedPayment {
                        order_id: order_id.to_string(),
                        completed: true,
                        method: PaymentMethod::NaverPay,
                        amount: None,
                        failure_reason: String::new(),
                        payment_id: None,
                    };
                    payment::simulate(store, None, payment).await.expect("pay");
                }
                statuses.push((status, change["cancelReason"].clone()));
            }
            Some("complete") => return statuses,
            other => panic!("unexpected {other:?}: {message}"),
        }
    }
}

async fn a_subscription_streams_each_status_of_an_order(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = spawn_service(t.store.clone()).await;
    app.stock(&[("p-1", "5.00", 3)]).await;
    let stocked: Value = app
        .post_order(&order_body(&[("p-1", 2)]))
        .await
        .json()
        .await
        .expect("json");
    let short: Value = app
        .post_order(&order_body(&[("p-1", 9)]))
        .await
        .json()
        .await
        .expect("json");
    let stocked = statuses_over_websocket(
        &app.address,
        &t.store,
        stocked["orderId"].as_str().expect("id"),
    )
    .await;
    assert_eq!(
        stocked,
        vec![
            ("ORDER_CREATED".to_string(), Value::Null),
            ("ORDER_CONFIRMED".to_string(), Value::Null),
            ("PAYMENT_WAIT".to_string(), Value::Null),
            ("PAYMENT_COMPLETED".to_string(), Value::Null),
            ("ORDER_COMPLETED".to_string(), Value::Null)
        ]
    );
    let short = statuses_over_websocket(
        &app.address,
        &t.store,
        short["orderId"].as_str().expect("id"),
    )
    .await;
    assert_eq!(
        short,
        vec![
            ("ORDER_CREATED".to_string(), Value::Null),
            ("ORDER_CANCELLED".to_string(), json!("STOCK_SHORTAGE"))
        ]
    );
    drop(app);
    t.cleanup().await;
}

async fn bad_graphql_input_gets_an_error_code_and_stores_nothing(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = spawn_service(t.store.clone()).await;
    app.stock(&[("p-1", "5.00", 3)]).await;
    let create = "mutation($input: CreateOrderInput!) { createOrder(input: $input) { orderId } }";
    let item = |p: &str, q: i64| json!({"productId": p, "quantity": q});
    let input =
        |items: Vec<Value>| json!({"input": {"userId": "u-1", "storeId": "s-1", "items": items}});
    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        (
            "missing field",
            json!({"input": {"userId": "u-1", "items": [item("p-1", 1)]}}),
            None,
        ),
        (
            "negative quantity",
            input(vec![item("p-1", -2)]),
            Some("items[0].quantity"),
        ),
        (
            "101 items",
            input((0..101).map(|i| item(&format!("p-{i}"), 1)).collect()),
            Some("items"),
        ),
        (
            "unknown product",
            input(vec![item("p-404", 1)]),
            Some("items[0].productId"),
        ),
    ];
    for (what, variables, field) in cases {
        let response = app.graphql(create, variables).await;
        assert_eq!(
            response["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
            "{what}: {response}"
        );
        if let Some(field) = field {
            assert_eq!(
                response["errors"][0]["extensions"]["field"], field,
                "{what}: {response}"
            );
        }
    }
    let unknown = app
        .graphql("{ orderHistory(id: \"nope\") { eventType } }", json!({}))
        .await;
    assert_eq!(
        unknown["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "{unknown}"
    );
    assert!(app
        .graphql("{ order(id: \"nope\") { orderId } }", json!({}))
        .await["data"]["order"]
        .is_null());

    let deep = format!(
        "{{ __schema {{ types {{ {} name {} }} }} }}",
        "fields { type { ofType { ".repeat(8),
        "} } } ".repeat(8)
    );
    let response = app.graphql(&deep, json!({})).await;
    assert!(
        response["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nested too deep")),
        "{response}"
    );
    assert_eq!(
        response["errors"][0]["extensions"]["code"],
        "BAD_USER_INPUT"
    );

    let malformed = app
        .client
        .post(format!("{}/graphql", app.address))
        .body("{\"query\": ")
        .send()
        .await
        .expect("post");
    assert_eq!(malformed.status(), 400);
    let oversized = app
        .client
        .post(format!("{}/graphql", app.address))
        .body(format!(
            "{{\"query\": \"{}\"}}",
            " ".repeat(order_saga::http::MAX_BODY_BYTES)
        ))
        .send()
        .await
        .expect("post");
    assert_eq!(oversized.status(), 413);
    assert!(
        t.store
            .aggregate_ids("Order")
            .await
            .expect("ids")
            .is_empty(),
        "nothing stored"
    );
    drop(app);
    t.cleanup().await;
}

/// Every read-model table, as rows of JSON, in a stable order.
async fn dump(app: &TestApp, orders: &[String]) -> Value {
    let p = &app.projections;
    let mut out = BTreeMap::new();
    for id in orders {
        out.insert(format!("order {id}"), json!({"order": p.order(id).await.expect("order"), "history": p.history(id).await.expect("history")}));
    }
    out.insert(
        "products".into(),
        json!(p.products().await.expect("products")),
    );
    out.insert("stats".into(), json!(p.stats().await.expect("stats")));
    json!(out)
}

async fn a_rebuild_from_position_0_gives_the_same_read_models(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = spawn_service(t.store.clone()).await;
    app.stock(&[("p-1", "5.00", 4), ("p-2", "1.25", 50)]).await;
    let mut orders = Vec::new();
    for (p, q) in [("p-1", 2), ("p-2", 3), ("p-1", 3), ("p-1", 1), ("p-2", 60)] {
        let created: Value = app
            .post_order(&order_body(&[(p, q)]))
            .await
            .json()
            .await
            .expect("json");
        orders.push(created["orderId"].as_str().expect("id").to_string());
    }
    app.settle(&orders).await;
    let before = dump(&app, &orders).await;
    app.projections.rebuild(|_, _| {}).await.expect("rebuild");
    let after = dump(&app, &orders).await;
    assert_eq!(before, after);
    assert!(before["stats"].as_array().is_some_and(|s| !s.is_empty()));
    drop(app);
    t.cleanup().await;
}

async fn readiness_reports_the_store_and_the_background_loops(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = spawn_service(t.store.clone()).await;
    let get = |path: &'static str| {
        let app = &app;
        async move {
            app.client
                .get(format!("{}{path}", app.address))
                .send()
                .await
                .expect("GET")
                .status()
        }
    };
    assert_eq!(get("/healthz").await, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get("/readyz").await != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let page = app
        .client
        .get(format!("{}/graphql", app.address))
        .send()
        .await
        .expect("GET");
    assert!(page.text().await.expect("html").contains("graphiql"));
    // A saga loop that never beats makes the service not ready.
    let stalled = Readiness {
        components: vec![("saga", Heartbeat::default())],
    };
    let state = HttpState::new(app.app.clone(), app.projections.clone(), stalled);
    let response = order_saga::http::router(state)
        .oneshot(
            axum::http::Request::get("/readyz")
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(response.status(), 503);
    drop(app);
    t.cleanup().await;
}

/// `name{labels} value` lines of the Prometheus text format.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

async fn metrics_count_what_the_orders_did(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = order_saga::service::App::new(t.store.clone());
    app.set_product("p-1", Some("1.00".parse().expect("price")), Some(10))
        .await
        .expect("stock");
    let (mut server, url) = serve(&t).await;
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    // Five orders of 2 fill the 10 units exactly; three of 11 are always short.
    for q in [2, 2, 2, 2, 2, 11, 11, 11] {
        ids.push(create_order(&client, &url, &order_body(&[("p-1", q)])).await);
    }
    let bad = client
        .post(format!("{url}/api/v1/orders"))
        .json(&order_body(&[("p-9", 1)]))
        .send()
        .await
        .expect("POST");
    assert_eq!(bad.status(), 422);
    let scrape = || async {
        let text = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .expect("GET")
            .text()
            .await
            .expect("text");
        parse_metrics(&text)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = scrape().await;
        let done = metrics
            .get("order_saga_sagas_completed_total{outcome=\"PAYMENT_WAIT\"}")
            .copied()
            .unwrap_or(0.0)
            + metrics
                .get("order_saga_sagas_completed_total{outcome=\"ORDER_CANCELLED\"}")
                .copied()
                .unwrap_or(0.0);
        if done >= ids.len() as f64 && metrics.get("order_saga_projection_lag_events") == Some(&0.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sagas never finished: {metrics:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A scrape sets its gauges before it renders the counters, so the one
    // that saw the last saga counted may have measured the pending timers
    // just before that saga dropped them. Every gauge of the next scrape is
    // measured after every saga finished.
    let metrics = scrape().await;
    server.start_kill().expect("stop");
    let mut waiting = 0.0;
    for id in &ids {
        let (order, _) = t
            .store
            .load::<order_saga_domain::Order>(id)
            .await
            .expect("load")
            .expect("order");
        if order.status == Some(order_saga_domain::OrderStatus::PaymentWait) {
            waiting += 1.0;
        }
    }
    let short = ids.len() as f64 - waiting;
    assert_eq!(waiting, 5.0);
    let expect =
        |name: &str, value: f64| assert_eq!(metrics.get(name).copied(), Some(value), "{name}");
    expect("order_saga_orders_created_total", ids.len() as f64);
    expect("order_saga_orders_rejected_total", 1.0);
    expect(
        "order_saga_sagas_completed_total{outcome=\"PAYMENT_WAIT\"}",
        waiting,
    );
    expect(
        "order_saga_sagas_completed_total{outcome=\"ORDER_CANCELLED\"}",
        short,
    );
    expect(
        "order_saga_compensations_total{reason=\"STOCK_SHORTAGE\"}",
        short,
    );
    expect(
        "order_saga_stock_reservations_total{outcome=\"StockReservationFailed\"}",
        short,
    );
    expect(
        "order_saga_stock_reservations_total{outcome=\"StockReserved\"}",
        waiting,
    );
    // Only the payment deadlines of the orders waiting for payment.
    expect("order_saga_pending_timers", waiting);
    expect("order_saga_dead_letters", 0.0);
    assert!(
        metrics
            .keys()
            .any(|k| k.starts_with("order_saga_stage_seconds_bucket")),
        "stage histograms"
    );
    assert!(metrics
        .keys()
        .any(|k| k.starts_with("order_saga_consumer_lag_events")));
    let names: HashSet<&str> = metrics
        .keys()
        .map(|k| k.split('{').next().unwrap_or(k))
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("order_saga_")),
        "{names:?}"
    );
    let _ = server.wait().await;
    t.cleanup().await;
}
