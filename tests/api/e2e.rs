//! The whole saga under load, on both backends: 1,000 orders over 20
//! products whose stock covers about half the demand, created concurrently
//! through `POST /api/v1/orders` — in-process, and with the real binary
//! killed (SIGKILL) part-way and started again.
//!
//! Each run prints what it measured (orders/s, POST → PAYMENT_WAIT p50/p99);
//! those are measurements, not assertions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use order_saga::saga::transport::LogTransport;
use order_saga::saga::{Saga, SagaOptions};
use order_saga::service::App;
use order_saga::store::Store;
use order_saga_domain::{
    CancelReason, Order, OrderStatus, Product, StockReservation, StockReservationEvent,
};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::binary::serve;
use crate::helpers::{spawn_app, Backend, TestStore};
use crate::on_both_backends;

on_both_backends!(
    a_thousand_orders_for_half_the_stock_all_end_in_payment_wait_or_stock_shortage,
    the_saga_completes_every_order_after_the_service_is_killed_mid_run,
);

pub(crate) const ORDERS: usize = 1_000;
const PRODUCTS: usize = 20;
const IN_FLIGHT: usize = 32;

/// A deterministic mix of orders: 1–3 distinct products, 1–3 units each.
pub(crate) fn order_lines() -> Vec<Vec<(String, u32)>> {
    let mut seed: u64 = 0x5eed;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    (0..ORDERS)
        .map(|_| {
            let mut lines: Vec<(String, u32)> = Vec::new();
            for _ in 0..=next(3) {
                let product = format!("p-{:02}", next(PRODUCTS as u64));
                if lines.iter().all(|(p, _)| *p != product) {
                    lines.push((product, 1 + next(3) as u32));
                }
            }
            lines
        })
        .collect()
}

/// Stock for about half of each product's demand.
pub(crate) async fn stock_half_the_demand(
    store: &Store,
    orders: &[Vec<(String, u32)>],
) -> BTreeMap<String, u32> {
    let mut demand: BTreeMap<String, u32> = BTreeMap::new();
    for lines in orders {
        for (product, quantity) in lines {
            *demand.entry(product.clone()).or_default() += quantity;
        }
    }
    let app = App::new(store.clone());
    let mut stock = BTreeMap::new();
    for (product, wanted) in demand {
        let level = wanted / 2;
        app.set_product(&product, Some("10.00".parse().expect("price")), Some(level))
            .await
            .expect("set product");
        stock.insert(product, level);
    }
    stock
}

fn body(lines: &[(String, u32)]) -> Value {
    let items: Vec<Value> = lines
        .iter()
        .map(|(p, q)| json!({"productId": p, "quantity": q}))
        .collect();
    json!({"userId": "u-load", "storeId": "s-1", "items": items})
}

/// POSTs the orders whose slot is empty, `IN_FLIGHT` at a time, each with
/// its own Idempotency-Key; fills in the order id and the send time of those
/// that got their 201. Stops sending once `stop_after` have succeeded.
pub(crate) async fn post_orders(
    url: &str,
    orders: &[Vec<(String, u32)>],
    ids: &mut [Option<(String, DateTime<Utc>)>],
    stop_after: Option<usize>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let succeeded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, lines) in orders.iter().enumerate() {
        if ids[i].is_some() {
            continue;
        }
        let permit = permits.clone().acquire_owned().await.expect("permit");
        if stop_after.is_some_and(|n| succeeded.load(std::sync::atomic::Ordering::SeqCst) >= n) {
            break;
        }
        let (client, url, body, succeeded) = (
            client.clone(),
            url.to_string(),
            body(lines),
            succeeded.clone(),
        );
        tasks.spawn(async move {
            let _permit = permit;
            let sent = Utc::now();
            let response = client
                .post(format!("{url}/api/v1/orders"))
                .header("Idempotency-Key", format!("load-{i}"))
                .json(&body)
                .send()
                .await
                .ok()?;
            if response.status() != 201 {
                return None;
            }
            let created: Value = response.json().await.ok()?;
            succeeded.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Some((i, created["orderId"].as_str()?.to_string(), sent))
        });
    }
    while let Some(done) = tasks.join_next().await {
        if let Some((i, id, sent)) = done.expect("task") {
            ids[i] = Some((id, sent));
        }
    }
}

/// Waits (polling the store) until every order has ended.
pub(crate) async fn wait_until_all_end(store: &Store, ids: &[String]) {
    wait_until_ended(store, ids, Instant::now(), Duration::from_secs(300)).await;
}

/// Waits until every order in `ids` has ended (payment wait or cancelled),
/// at most `within` after `since`; a load that fails (a store coming back)
/// is looked at again. Returns the time from `since`.
pub(crate) async fn wait_until_ended(
    store: &Store,
    ids: &[String],
    since: Instant,
    within: Duration,
) -> Duration {
    let ended = [OrderStatus::PaymentWait, OrderStatus::OrderCancelled];
    wait_until_in(store, ids, &ended, since, within).await
}

/// Waits until every order in `ids` is in one of `statuses`, at most
/// `within` after `since`. Returns the time from `since`.
pub(crate) async fn wait_until_in(
    store: &Store,
    ids: &[String],
    statuses: &[OrderStatus],
    since: Instant,
    within: Duration,
) -> Duration {
    let mut open: Vec<&String> = ids.iter().collect();
    while !open.is_empty() {
        let mut still = Vec::new();
        for id in open {
            let status = match store.load::<Order>(id).await {
                Ok(loaded) => loaded.and_then(|(o, _)| o.status),
                Err(_) => None,
            };
            if !status.is_some_and(|s| statuses.contains(&s)) {
                still.push(id);
            }
        }
        open = still;
        assert!(
            since.elapsed() < within,
            "{} of {} orders had not reached {statuses:?} within {within:?}",
            open.len(),
            ids.len()
        );
        if !open.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    since.elapsed()
}

/// Every outcome the spec demands, read back from the event store.
pub(crate) async fn assert_outcome(
    store: &Store,
    orders: &[Vec<(String, u32)>],
    ids: &[String],
    stock: &BTreeMap<String, u32>,
) -> usize {
    let mut held_by_waiting: HashMap<String, u64> = HashMap::new();
    let mut waiting = HashSet::new();
    for (lines, id) in orders.iter().zip(ids) {
        let (order, _) = store.load::<Order>(id).await.expect("load").expect("order");
        let events: Vec<String> = store
            .load_events::<Order>(id)
            .await
            .expect("events")
            .iter()
            .map(|e| e.payload.event_type())
            .collect();
        let reservation: Vec<StockReservationEvent> = store
            .load_events::<StockReservation>(id)
            .await
            .expect("events")
            .into_iter()
            .map(|e| e.payload)
            .collect();
        match order.status {
            Some(OrderStatus::PaymentWait) => {
                assert_eq!(
                    events,
                    ["OrderCreated", "OrderConfirmed", "PaymentWaitStarted"],
                    "{id}: each effect once"
                );
                assert!(
                    matches!(
                        reservation[..],
                        [StockReservationEvent::StockReserved { .. }]
                    ),
                    "{id}: {reservation:?}"
                );
                waiting.insert(id.clone());
                for (product, quantity) in lines {
                    *held_by_waiting.entry(product.clone()).or_default() += u64::from(*quantity);
                    assert_eq!(
                        store.held_for_order(product, id).await.expect("holds"),
                        Some(*quantity),
                        "{id} holds its line of {product}"
                    );
                }
            }
            Some(OrderStatus::OrderCancelled) => {
                assert_eq!(
                    order.cancel_reason,
                    Some(CancelReason::StockShortage),
                    "{id}"
                );
                assert_eq!(
                    events,
                    ["OrderCreated", "OrderCancelled"],
                    "{id}: each effect once"
                );
                match &reservation[..] {
                    [StockReservationEvent::StockReservationFailed { shortages, .. }] => {
                        assert!(!shortages.is_empty());
                        for s in shortages {
                            assert!(
                                s.available < s.requested,
                                "{id}: {s:?} was short when handled"
                            );
                        }
                    }
                    other => panic!("{id}: stock side {other:?}"),
                }
                for (product, _) in lines {
                    assert_eq!(
                        store.held_for_order(product, id).await.expect("holds"),
                        None,
                        "cancelled {id} holds nothing of {product}"
                    );
                }
            }
            other => panic!("{id} ended in {other:?}"),
        }
    }
    for (product, initial) in stock {
        let (p, _) = store
            .load::<Product>(product)
            .await
            .expect("load")
            .expect("product");
        assert_eq!(
            u64::from(p.available) + p.reserved,
            u64::from(*initial),
            "{product}: stock conserved"
        );
        assert_eq!(
            p.reserved,
            held_by_waiting.get(product).copied().unwrap_or(0),
            "{product}: held = waiting orders' lines"
        );
    }
    waiting.len()
}

/// Prints orders/s and POST → PAYMENT_WAIT percentiles.
pub(crate) async fn report(
    label: &str,
    store: &Store,
    sent: &HashMap<String, DateTime<Utc>>,
    elapsed: Duration,
    waiting: usize,
) {
    let mut latencies = Vec::new();
    let mut after = 0;
    loop {
        let batch = store.read_log(after, 10_000).await.expect("log");
        let Some(last) = batch.last() else { break };
        after = last.position;
        for entry in &batch {
            if entry.event_type == "PaymentWaitStarted" {
                if let Some(at) = sent.get(&entry.aggregate_id) {
                    latencies.push(
                        (entry.recorded_at - *at).num_microseconds().unwrap_or(0) as f64 / 1000.0,
                    );
                }
            }
        }
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "MEASURED {label}: {ORDERS} orders in {:.2} s = {:.0} orders/s end to end; {waiting} reached PAYMENT_WAIT; POST -> PAYMENT_WAIT p50 {:.1} ms, p99 {:.1} ms",
        elapsed.as_secs_f64(),
        ORDERS as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
    );
}

async fn a_thousand_orders_for_half_the_stock_all_end_in_payment_wait_or_stock_shortage(
    backend: Backend,
) {
    let t = TestStore::new(backend).await;
    let orders = order_lines();
    let stock = stock_half_the_demand(&t.store, &orders).await;
    let app = spawn_app(t.store.clone()).await;
    let saga = Saga::new(
        t.store.clone(),
        &LogTransport::new(t.store.clone()),
        SagaOptions::default(),
    )
    .await
    .expect("saga");
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let tasks = saga.spawn(shutdown);

    let started = Instant::now();
    let mut slots = vec![None; ORDERS];
    post_orders(&app.address, &orders, &mut slots, None).await;
    let ids: Vec<String> = slots
        .iter()
        .map(|s| s.clone().expect("every order accepted").0)
        .collect();
    wait_until_all_end(&t.store, &ids).await;
    let elapsed = started.elapsed();
    drop(tasks);

    let waiting = assert_outcome(&t.store, &orders, &ids, &stock).await;
    assert!(
        waiting > 0 && waiting < ORDERS,
        "some orders succeed and some are short: {waiting}"
    );
    let sent = slots.into_iter().flatten().collect();
    report(
        &format!("in-process {backend:?}"),
        &t.store,
        &sent,
        elapsed,
        waiting,
    )
    .await;
    drop(app);
    t.cleanup().await;
}

async fn the_saga_completes_every_order_after_the_service_is_killed_mid_run(backend: Backend) {
    let t = TestStore::new(backend).await;
    let orders = order_lines();
    let stock = stock_half_the_demand(&t.store, &orders).await;

    let started = Instant::now();
    let (mut server, url) = serve(&t).await;
    let mut slots = vec![None; ORDERS];
    post_orders(&url, &orders, &mut slots, Some(ORDERS * 2 / 5)).await;
    server.start_kill().expect("SIGKILL");
    server.wait().await.expect("killed");
    let before_kill = slots.iter().flatten().count();
    assert!(
        (ORDERS * 2 / 5..ORDERS).contains(&before_kill),
        "killed part-way: {before_kill}"
    );

    let (mut server, url) = serve(&t).await;
    post_orders(&url, &orders, &mut slots, None).await;
    let ids: Vec<String> = slots
        .iter()
        .map(|s| s.clone().expect("every order accepted").0)
        .collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ORDERS,
        "one order per Idempotency-Key"
    );
    wait_until_all_end(&t.store, &ids).await;
    let elapsed = started.elapsed();
    server.start_kill().expect("stop");
    let _ = server.wait().await;

    // Only the orders we asked for exist: retries after the crash made none twice.
    assert_eq!(
        t.store.aggregate_ids("Order").await.expect("ids").len(),
        ORDERS
    );
    let waiting = assert_outcome(&t.store, &orders, &ids, &stock).await;
    let sent = slots.into_iter().flatten().collect();
    report(
        &format!("binary {backend:?} with a SIGKILL"),
        &t.store,
        &sent,
        elapsed,
        waiting,
    )
    .await;
    t.cleanup().await;
}
