//! The analysts' tools on both backends: `events`, `order --as-of`,
//! `replay` (jsonl, Avro read back by fastavro, filters, --follow),
//! `product history` / `show --format jsonl`, GraphQL `events`, and
//! `projections rebuild` while queries keep answering.

use std::process::Stdio;
use std::time::{Duration, Instant};

use order_saga::saga::transport::LogTransport;
use order_saga::saga::{Saga, SagaOptions};
use order_saga::service::{App, CreateOrderRequest};
use order_saga_domain::ItemRequest;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::helpers::{spawn_app, spawn_service, Backend, TestStore};
use crate::on_both_backends;

on_both_backends!(
    events_lists_an_orders_history_as_a_table_or_json_lines,
    order_as_of_shows_the_state_before_and_after_cancellation,
    replay_as_avro_reads_back_with_fastavro_as_the_json_lines_say,
    replay_filters_by_position_time_and_type,
    replay_follow_streams_events_as_they_are_committed,
    product_history_lists_stock_movements_with_their_orders,
    graphql_events_pages_through_the_log,
    projections_rebuild_while_orders_queries_keep_answering,
);

fn cli(t: &TestStore) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_order-saga"));
    command
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .envs(t.env())
        .kill_on_drop(true);
    command
}

async fn run(t: &TestStore, args: &[&str]) -> (bool, String, String) {
    let output = cli(t).args(args).output().await.expect("run order-saga");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

fn jsonl(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// A store with products and `orders` (product, quantity) run through the
/// whole saga; returns the order ids.
async fn with_orders(t: &TestStore, orders: &[(&str, i64)]) -> Vec<String> {
    let app = App::new(t.store.clone());
    app.set_product("p-1", Some("5.00".parse().expect("price")), Some(4))
        .await
        .expect("stock");
    app.set_product("p-2", Some("0.50".parse().expect("price")), Some(100))
        .await
        .expect("stock");
    let mut ids = Vec::new();
    for (product, quantity) in orders {
        let request = CreateOrderRequest {
            user_id: "u-1".into(),
            store_id: "s-1".into(),
            items: vec![ItemRequest {
                product_id: product.to_string(),
                quantity: *quantity,
            }],
        };
        ids.push(
            app.create_order(request, None)
                .await
                .expect("create")
                .order_id,
        );
    }
    let saga = Saga::new(
        t.store.clone(),
        &LogTransport::new(t.store.clone()),
        SagaOptions::default(),
    )
    .await
    .expect("saga");
    saga.run_until_idle().await.expect("saga runs");
    ids
}

async fn events_lists_an_orders_history_as_a_table_or_json_lines(backend: Backend) {
    let t = TestStore::new(backend).await;
    let ids = with_orders(&t, &[("p-1", 2)]).await;
    let (ok, out, err) = run(&t, &["events", &ids[0], "--format", "jsonl"]).await;
    assert!(ok, "{err}");
    let lines = jsonl(&out);
    let types: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["eventType"].as_str())
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
    let positions: Vec<i64> = lines
        .iter()
        .filter_map(|l| l["position"].as_i64())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "in log order: {positions:?}"
    );
    assert!(lines.iter().all(|l| l["recordedAt"].is_string()
        && l["payload"].is_object()
        && l["sequence"].is_i64()));
    // Piped without --format: JSON lines too.
    assert_eq!(jsonl(&run(&t, &["events", &ids[0]]).await.1).len(), 4);
    let (ok, table, _) = run(&t, &["events", &ids[0], "--format", "table"]).await;
    assert!(
        ok && table.starts_with(" POSITION") && table.contains("StockReservation"),
        "{table}"
    );
    let (ok, _, err) = run(&t, &["events", "no-such-order"]).await;
    assert!(!ok && err.contains("orderId"), "{err}");
    t.cleanup().await;
}

async fn order_as_of_shows_the_state_before_and_after_cancellation(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = App::new(t.store.clone());
    app.set_product("p-1", Some("5.00".parse().expect("price")), Some(4))
        .await
        .expect("stock");
    let request = CreateOrderRequest {
        user_id: "u-1".into(),
        store_id: "s-1".into(),
        items: vec![ItemRequest {
            product_id: "p-1".into(),
            quantity: 1,
        }],
    };
    let id = app
        .create_order(request, None)
        .await
        .expect("create")
        .order_id;
    let created_at = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await; // two distinct recorded-at times
    app.cancel_order(&id).await.expect("cancel");
    let log = t.store.read_log(0, 100).await.expect("log");
    let created = log
        .iter()
        .find(|e| e.event_type == "OrderCreated")
        .expect("created")
        .position;
    let head = log.last().expect("events").position;

    let state = |as_of: String| {
        let t = &t;
        let id = id.clone();
        async move {
            let (ok, out, err) = run(t, &["order", &id, "--as-of", &as_of]).await;
            assert!(ok, "{err}");
            serde_json::from_str::<Value>(&out).expect("json")
        }
    };
    assert_eq!(state(created.to_string()).await["status"], "ORDER_CREATED");
    assert_eq!(state(head.to_string()).await["status"], "ORDER_CANCELLED");
    assert_eq!(
        state(head.to_string()).await["cancelReason"],
        "CUSTOMER_REQUEST"
    );
    assert_eq!(
        state(created_at.to_rfc3339()).await["status"],
        "ORDER_CREATED",
        "by time, before the cancellation"
    );
    let (ok, _, err) = run(&t, &["order", &id, "--as-of", &(created - 1).to_string()]).await;
    assert!(!ok && err.contains("did not exist"), "{err}");
    let (ok, _, err) = run(&t, &["order", &id, "--as-of", "yesterday"]).await;
    assert!(!ok && err.contains("--as-of"), "{err}");
    t.cleanup().await;
}

async fn replay_as_avro_reads_back_with_fastavro_as_the_json_lines_say(backend: Backend) {
    let t = TestStore::new(backend).await;
    with_orders(&t, &[("p-1", 2), ("p-1", 9), ("p-2", 3)]).await;
    let dir = &t.data_dir;
    std::fs::create_dir_all(dir).expect("output directory");
    let avro = dir.join("replay.avro");
    let lines = dir.join("replay.jsonl");
    let (ok, _, err) = run(
        &t,
        &[
            "replay",
            "--format",
            "avro",
            "--out",
            avro.to_str().expect("path"),
        ],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, _, err) = run(
        &t,
        &[
            "replay",
            "--format",
            "jsonl",
            "--out",
            lines.to_str().expect("path"),
        ],
    )
    .await;
    assert!(ok, "{err}");
    let python = std::env::var("TEST_KAFKA_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/order-saga/venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let output = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/replay_check.py"
        ))
        .args([&avro, &lines])
        .output()
        .await
        .expect("run fastavro check");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("report");
    assert_eq!(report["avro"], report["expected"], "{report}");
    assert!(report["avro"].as_i64().is_some_and(|n| n >= 9), "{report}");
    assert_eq!(report["mismatches"], json!([]), "{report}");
    t.cleanup().await;
}

async fn replay_filters_by_position_time_and_type(backend: Backend) {
    let t = TestStore::new(backend).await;
    with_orders(&t, &[("p-1", 1), ("p-2", 2)]).await;
    let all = jsonl(&run(&t, &["replay"]).await.1);
    let head = all.last().expect("events")["position"]
        .as_i64()
        .expect("position");
    assert_eq!(all.len() as i64, head, "every event, dense positions");
    let middle = jsonl(&run(&t, &["replay", "--from", "3", "--to", "7"]).await.1);
    let positions: Vec<i64> = middle
        .iter()
        .filter_map(|l| l["position"].as_i64())
        .collect();
    assert_eq!(positions, vec![4, 5, 6, 7]);
    let created = jsonl(
        &run(
            &t,
            &[
                "replay",
                "--type",
                "OrderCreated",
                "--type",
                "PaymentWaitStarted",
            ],
        )
        .await
        .1,
    );
    assert_eq!(created.len(), 4);
    assert!(created
        .iter()
        .all(|l| l["eventType"] == "OrderCreated" || l["eventType"] == "PaymentWaitStarted"));
    let later = all[all.len() / 2]["recordedAt"]
        .as_str()
        .expect("time")
        .to_string();
    let since = jsonl(&run(&t, &["replay", "--since", &later]).await.1);
    assert!(!since.is_empty() && since.len() < all.len());
    assert!(since.iter().all(|l| l["recordedAt"]
        .as_str()
        .is_some_and(|r| r >= later.as_str())));
    t.cleanup().await;
}

async fn replay_follow_streams_events_as_they_are_committed(backend: Backend) {
    let t = TestStore::new(backend).await;
    with_orders(&t, &[("p-2", 1)]).await;
    let mut child = cli(&t)
        .args(["replay", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let later = App::new(t.store.clone())
        .create_order(
            CreateOrderRequest {
                user_id: "u-9".into(),
                store_id: "s-1".into(),
                items: vec![ItemRequest {
                    product_id: "p-2".into(),
                    quantity: 1,
                }],
            },
            None,
        )
        .await
        .expect("create")
        .order_id;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = tokio::time::timeout(deadline - Instant::now(), lines.next_line())
            .await
            .expect("the new order arrives")
            .expect("read")
            .expect("a line");
        let entry: Value = serde_json::from_str(&line).expect("json");
        if entry["aggregateId"] == later.as_str() {
            assert_eq!(entry["eventType"], "OrderCreated");
            break;
        }
    }
    child.start_kill().expect("stop following");
    let _ = child.wait().await;
    t.cleanup().await;
}

async fn product_history_lists_stock_movements_with_their_orders(backend: Backend) {
    let t = TestStore::new(backend).await;
    let ids = with_orders(&t, &[("p-1", 3), ("p-1", 2)]).await;
    let (ok, out, err) = run(&t, &["product", "history", "p-1", "--format", "jsonl"]).await;
    assert!(ok, "{err}");
    let moves = jsonl(&out);
    let types: Vec<&str> = moves
        .iter()
        .filter_map(|l| l["eventType"].as_str())
        .collect();
    assert_eq!(&types[..2], ["PriceSet", "StockLevelSet"]);
    let held: Vec<&Value> = moves
        .iter()
        .filter(|l| l["eventType"] == "StockHeld")
        .collect();
    assert_eq!(held.len(), 1, "one order held p-1, the other was short");
    assert!(ids
        .iter()
        .any(|id| held[0]["payload"]["stockHeld"]["orderId"] == id.as_str()));
    let shown = jsonl(&run(&t, &["product", "show", "--format", "jsonl"]).await.1);
    assert_eq!(shown.len(), 2);
    // Which of the two orders won the 4 units depends on timing.
    let held_quantity = held[0]["payload"]["stockHeld"]["quantity"]
        .as_i64()
        .expect("quantity");
    assert_eq!(
        shown[0],
        json!({"productId": "p-1", "price": "5.00", "available": 4 - held_quantity, "reserved": held_quantity, "sold": 0})
    );
    let (ok, _, err) = run(&t, &["product", "history", "p-404"]).await;
    assert!(!ok && err.contains("productId"), "{err}");
    t.cleanup().await;
}

async fn graphql_events_pages_through_the_log(backend: Backend) {
    let t = TestStore::new(backend).await;
    with_orders(&t, &[("p-1", 1), ("p-2", 1), ("p-2", 2)]).await;
    let app = spawn_app(t.store.clone()).await;
    let query = "query($after: Int!, $type: [String!]) { events(after: $after, first: 2, type: $type) { position eventType aggregateId payload } }";
    let post = |variables: Value| app.graphql(query, variables);
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = post(json!({"after": after, "type": ["OrderCreated"]})).await;
        let events = page["data"]["events"].as_array().expect("events").clone();
        if events.is_empty() {
            break;
        }
        after = events.last().expect("last")["position"]
            .as_i64()
            .expect("position");
        seen.extend(
            events
                .into_iter()
                .map(|e| e["eventType"].as_str().unwrap_or_default().to_string()),
        );
    }
    assert_eq!(seen, vec!["OrderCreated"; 3]);
    let first = post(json!({"after": 0})).await;
    assert_eq!(first["data"]["events"][0]["position"], 1);
    drop(app);
    t.cleanup().await;
}

async fn projections_rebuild_while_orders_queries_keep_answering(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = spawn_service(t.store.clone()).await;
    app.set_product("p-2", "0.50", 10_000).await;
    let mut ids = Vec::new();
    for _ in 0..60 {
        let created: Value = app
            .post_order(&crate::helpers::order_body(&[("p-2", 1)]))
            .await
            .json()
            .await
            .expect("json");
        ids.push(created["orderId"].as_str().expect("id").to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        app.projections.catch_up().await.expect("catch up");
        let waiting = app
            .projections
            .orders(
                &order_saga_projections::OrderFilter {
                    status: Some(order_saga_domain::OrderStatus::PaymentWait),
                    ..Default::default()
                },
                0,
                100,
            )
            .await
            .expect("orders");
        if waiting.len() == ids.len() {
            break;
        }
        assert!(Instant::now() < deadline, "saga never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = app
        .projections
        .orders(&Default::default(), 0, 100)
        .await
        .expect("orders");

    let rebuild = cli(&t).args(["projections", "rebuild"]).output();
    let queries = async {
        let mut answered = 0;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) || answered < 5 {
            let page = app
                .graphql(
                    "{ orders(first: 100) { edges { node { orderId status } } } }",
                    json!({}),
                )
                .await;
            assert!(page["errors"].is_null(), "{page}");
            assert_eq!(
                page["data"]["orders"]["edges"].as_array().map(Vec::len),
                Some(60),
                "{page}"
            );
            answered += 1;
        }
        answered
    };
    let (rebuilt, answered) = tokio::join!(rebuild, queries);
    let rebuilt = rebuilt.expect("run rebuild");
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    assert!(String::from_utf8_lossy(&rebuilt.stdout).contains("rebuilt and switched"));
    assert!(answered >= 5);
    let after = app
        .projections
        .orders(&Default::default(), 0, 100)
        .await
        .expect("orders");
    assert_eq!(before, after, "the rebuilt read models are the same");
    drop(app);
    t.cleanup().await;
}
