//! After PAYMENT_WAIT, given/when/then on both backends with the manual
//! clock: payment results enter through the in-process bus (as `order-saga
//! payment simulate` sends them), the payment wait expires, and every race
//! the payment side can cause ends with no stock stranded.

use std::collections::HashMap;
use std::time::Duration;

use order_saga::saga::integration::{Body, IntegrationEvent, Topic};
use order_saga::saga::notifier::NotificationKind;
use order_saga::saga::payment::{self, PaymentInbox, PaymentResult, SimulatedPayment};
use order_saga_domain::stock::ReservationStatus;
use order_saga_domain::{CancelReason, OrderStatus, PaymentMethod};

use crate::helpers::Backend;
use crate::on_both_backends;
use crate::saga::{harness, Harness, MINUTE};

on_both_backends!(
    a_payment_of_the_total_sells_the_held_stock_and_completes_the_order,
    a_failed_payment_cancels_the_order_and_returns_its_stock,
    a_payment_wait_unpaid_for_30_minutes_expires_and_returns_its_stock,
    a_payment_after_expiry_is_refunded_and_changes_nothing_else,
    a_payment_of_another_amount_is_refunded_and_dead_lettered_and_the_wait_goes_on,
    a_repeated_payment_result_is_a_no_op,
    a_payment_for_an_unknown_order_is_dead_lettered,
    two_hundred_orders_end_completed_failed_or_expired_with_no_stock_held,
    the_simulate_command_sends_a_payment_through_the_log,
    the_upgrade_gives_orders_already_waiting_a_payment_deadline,
);

fn payment(order_id: &str, completed: bool) -> SimulatedPayment {
    SimulatedPayment {
        order_id: order_id.to_string(),
        completed,
        method: PaymentMethod::Card,
        amount: None,
        failure_reason: "card declined".into(),
        payment_id: None,
    }
}

impl Harness {
    /// An order for 2 × p-1 and 3 × p-2, waiting for its payment.
    async fn waiting_order(&self) -> String {
        let order = self.order(&[("p-1", 2), ("p-2", 3)]).await;
        self.run().await;
        assert_eq!(self.state(&order).await.status, OrderStatus::PaymentWait);
        order
    }

    async fn pay(&self, payment: SimulatedPayment) {
        payment::simulate(&self.t.store, None, payment)
            .await
            .expect("payment result sent");
    }

    /// The integration events of `topic` in the log, for the order.
    async fn published(&self, order_id: &str, topic: Topic) -> Vec<IntegrationEvent> {
        let mut found = Vec::new();
        let mut after = 0;
        loop {
            let entries = self.t.store.read_log(after, 1_000).await.expect("log");
            let Some(last) = entries.last() else {
                return found;
            };
            after = last.position;
            found.extend(
                entries
                    .iter()
                    .filter_map(|e| IntegrationEvent::from_log(e).ok().flatten())
                    .filter(|e| e.order_id == order_id && e.topic() == topic),
            );
        }
    }

    async fn assert_sold(&self, product_id: &str, available: u32, reserved: u64, sold: u64) {
        let p = self.product(product_id).await;
        assert_eq!(
            (p.available, p.reserved, p.sold),
            (available, reserved, sold),
            "{product_id} available/reserved/sold"
        );
    }
}

async fn a_payment_of_the_total_sells_the_held_stock_and_completes_the_order(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let order = h.waiting_order().await;
    assert_eq!(h.t.store.pending_timers().await.expect("timers"), 1);
    h.pay(payment(&order, true)).await;
    h.run().await;
    assert_eq!(h.state(&order).await.status, OrderStatus::OrderCompleted);
    assert_eq!(
        h.order_events(&order).await,
        [
            "OrderCreated",
            "OrderConfirmed",
            "PaymentWaitStarted",
            "PaymentCompleted",
            "OrderCompleted"
        ]
    );
    assert_eq!(h.reservation(&order).await, Some(ReservationStatus::Sold));
    h.assert_sold("p-1", 3, 0, 2).await;
    h.assert_sold("p-2", 97, 0, 3).await;
    let confirmed = h.published(&order, Topic::StockConfirmed).await;
    match &confirmed[..] {
        [event] => match &event.body {
            Body::StockConfirmed {
                confirmed_items, ..
            } => assert_eq!(confirmed_items.len(), 2),
            other => panic!("not stock.confirmed: {other:?}"),
        },
        other => panic!("one stock.confirmed, got {other:?}"),
    }
    assert!(h
        .notified()
        .contains(&(order.clone(), NotificationKind::OrderCompleted, None)));
    // The payment deadline went with the payment; nothing is pending.
    assert_eq!(h.t.store.pending_timers().await.expect("timers"), 0);
    // Expiry can no longer happen.
    h.advance(31 * MINUTE).await;
    h.run().await;
    assert_eq!(h.state(&order).await.status, OrderStatus::OrderCompleted);
    h.finish().await;
}

async fn a_failed_payment_cancels_the_order_and_returns_its_stock(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let order = h.waiting_order().await;
    h.pay(payment(&order, false)).await;
    h.run().await;
    let state = h.state(&order).await;
    assert_eq!(
        (state.status, state.cancel_reason),
        (
            OrderStatus::OrderCancelled,
            Some(CancelReason::PaymentFailed)
        )
    );
    assert_eq!(
        h.reservation(&order).await,
        Some(ReservationStatus::Released)
    );
    h.assert_sold("p-1", 5, 0, 0).await;
    assert!(h.notified().contains(&(
        order.clone(),
        NotificationKind::OrderCancelled,
        Some(CancelReason::PaymentFailed)
    )));
    assert_eq!(h.t.store.pending_timers().await.expect("timers"), 0);
    h.finish().await;
}

async fn a_payment_wait_unpaid_for_30_minutes_expires_and_returns_its_stock(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let order = h.waiting_order().await;
    h.advance(29 * MINUTE).await;
    h.run().await;
    assert_eq!(h.state(&order).await.status, OrderStatus::PaymentWait);
    h.advance(MINUTE + Duration::from_secs(1)).await;
    h.run().await;
    let state = h.state(&order).await;
    assert_eq!(
        (state.status, state.cancel_reason),
        (
            OrderStatus::OrderCancelled,
            Some(CancelReason::PaymentTimeout)
        )
    );
    assert_eq!(
        h.order_events(&order).await[3..],
        ["PaymentWaitExpired", "OrderCancelled"]
    );
    let expired = h.published(&order, Topic::OrderExpired).await;
    match &expired[..] {
        [event] => assert_eq!(
            event.body,
            Body::OrderExpired {
                user_id: "u-1".into(),
                expiration_reason: "payment time exceeded (30 min)".into(),
            }
        ),
        other => panic!("one order.expiration-notification, got {other:?}"),
    }
    h.assert_sold("p-1", 5, 0, 0).await;
    h.assert_sold("p-2", 100, 0, 0).await;
    assert!(h.notified().contains(&(
        order.clone(),
        NotificationKind::OrderCancelled,
        Some(CancelReason::PaymentTimeout)
    )));
    h.finish().await;
}

async fn a_payment_after_expiry_is_refunded_and_changes_nothing_else(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let order = h.waiting_order().await;
    h.advance(31 * MINUTE).await;
    h.run().await;
    let before = h.order_events(&order).await;
    h.pay(SimulatedPayment {
        payment_id: Some("pay-late".into()),
        ..payment(&order, true)
    })
    .await;
    h.run().await;
    let after = h.order_events(&order).await;
    assert_eq!(after[..before.len()], before[..]);
    assert_eq!(after[before.len()..], ["PaymentRejected"]);
    assert_eq!(h.state(&order).await.status, OrderStatus::OrderCancelled);
    let refunds = h.published(&order, Topic::StockConfirmationFailed).await;
    match &refunds[..] {
        [event] => assert_eq!(
            event.body,
            Body::StockConfirmationFailed {
                payment_id: "pay-late".into(),
                failure_reason: "order cancelled (PAYMENT_TIMEOUT)".into(),
            }
        ),
        other => panic!("one stock.confirmation.failed, got {other:?}"),
    }
    assert!(h.published(&order, Topic::StockConfirmed).await.is_empty());
    h.assert_sold("p-1", 5, 0, 0).await;
    assert!(h
        .t
        .store
        .dead_letters()
        .await
        .expect("dead letters")
        .is_empty());
    h.finish().await;
}

async fn a_payment_of_another_amount_is_refunded_and_dead_lettered_and_the_wait_goes_on(
    backend: Backend,
) {
    let h = harness(backend, vec![]).await;
    let order = h.waiting_order().await;
    h.pay(SimulatedPayment {
        amount: Some("1.00".parse().expect("money")),
        payment_id: Some("pay-short".into()),
        ..payment(&order, true)
    })
    .await;
    h.run().await;
    assert_eq!(h.state(&order).await.status, OrderStatus::PaymentWait);
    assert_eq!(
        h.published(&order, Topic::StockConfirmationFailed)
            .await
            .len(),
        1
    );
    let dead = h.t.store.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0]
            .error
            .contains("amount paid 1.00 differs from the order total 25800.30"),
        "{}",
        dead[0].error
    );
    h.assert_sold("p-1", 3, 2, 0).await;
    // The right payment still completes the order.
    h.pay(payment(&order, true)).await;
    h.run().await;
    assert_eq!(h.state(&order).await.status, OrderStatus::OrderCompleted);
    h.assert_sold("p-1", 3, 0, 2).await;
    h.finish().await;
}

async fn a_repeated_payment_result_is_a_no_op(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let order = h.waiting_order().await;
    let twice = SimulatedPayment {
        payment_id: Some("pay-1".into()),
        ..payment(&order, true)
    };
    h.pay(twice.clone()).await;
    h.pay(twice).await;
    h.run().await;
    // The same payment again, and a failure reported after it.
    h.pay(SimulatedPayment {
        payment_id: Some("pay-1".into()),
        ..payment(&order, true)
    })
    .await;
    h.pay(payment(&order, false)).await;
    h.run().await;
    let events = h.order_events(&order).await;
    assert_eq!(
        events.iter().filter(|e| *e == "PaymentCompleted").count(),
        1
    );
    assert!(!events
        .iter()
        .any(|e| e == "PaymentRejected" || e == "OrderCancelled"));
    assert_eq!(h.state(&order).await.status, OrderStatus::OrderCompleted);
    h.assert_sold("p-1", 3, 0, 2).await;
    assert!(h
        .t
        .store
        .dead_letters()
        .await
        .expect("dead letters")
        .is_empty());
    h.finish().await;
}

async fn a_payment_for_an_unknown_order_is_dead_lettered(backend: Backend) {
    let h = harness(backend, vec![]).await;
    // The simulator refuses an unknown order by name …
    let refused = payment::simulate(&h.t.store, None, payment("o-nope", true))
        .await
        .expect_err("unknown order");
    assert!(
        refused.contains("orderId") && refused.contains("o-nope"),
        "{refused}"
    );
    // … but the payment service may still send one.
    let result = PaymentResult(Body::PaymentCompleted {
        payment_id: "pay-9".into(),
        user_id: "u-9".into(),
        total_amount: "1.00".parse().expect("money"),
        payment_method: PaymentMethod::Toss,
        pg_approval_number: "A-1".into(),
        completed_at: chrono::Utc::now(),
    });
    h.t.store
        .execute_retrying::<PaymentInbox>("o-nope", result, &(), HashMap::new(), 3)
        .await
        .expect("stored");
    h.run().await;
    let dead = h.t.store.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].error.contains("o-nope"), "{}", dead[0].error);
    assert!(h
        .published("o-nope", Topic::StockConfirmationFailed)
        .await
        .is_empty());
    h.finish().await;
}

async fn two_hundred_orders_end_completed_failed_or_expired_with_no_stock_held(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let products = ["p-a", "p-b", "p-c", "p-d"];
    for product in products {
        h.app
            .set_product(product, Some("10.00".parse().expect("price")), Some(1_000))
            .await
            .expect("stock");
    }
    let mut orders = Vec::new();
    for i in 0..200 {
        let items = [
            (products[i % 4], 1 + (i % 3) as i64),
            (products[(i + 1) % 4], 2),
        ];
        orders.push(h.order(&items).await);
    }
    h.run().await;
    for order in &orders {
        assert_eq!(h.state(order).await.status, OrderStatus::PaymentWait);
    }
    for (i, order) in orders.iter().enumerate() {
        match i % 4 {
            0 | 1 => h.pay(payment(order, true)).await,
            2 => h.pay(payment(order, false)).await,
            _ => {}
        }
    }
    h.run().await;
    h.advance(31 * MINUTE).await;
    h.run().await;
    let mut ends: HashMap<(OrderStatus, Option<CancelReason>), usize> = HashMap::new();
    for (i, order) in orders.iter().enumerate() {
        let state = h.state(order).await;
        let end = (state.status, state.cancel_reason);
        let expected = match i % 4 {
            0 | 1 => (OrderStatus::OrderCompleted, None),
            2 => (
                OrderStatus::OrderCancelled,
                Some(CancelReason::PaymentFailed),
            ),
            _ => (
                OrderStatus::OrderCancelled,
                Some(CancelReason::PaymentTimeout),
            ),
        };
        assert_eq!(end, expected, "order {i}");
        *ends.entry(end).or_default() += 1;
    }
    println!("200 orders ended: {ends:?}");
    for product in products {
        let p = h.product(product).await;
        assert_eq!(p.reserved, 0, "{product}: no stock stays held");
        assert_eq!(
            u64::from(p.available) + p.reserved + p.sold,
            1_000,
            "{product}: available + reserved + sold = the stock set"
        );
    }
    let sold: u64 = {
        let mut sold = 0;
        for product in products {
            sold += h.product(product).await.sold;
        }
        sold
    };
    // Half the orders paid, each for 1..=3 + 2 units.
    let expected: u64 = (0..200usize)
        .filter(|i| i % 4 < 2)
        .map(|i| 1 + (i % 3) as u64 + 2)
        .sum();
    assert_eq!(sold, expected);
    assert_eq!(h.t.store.pending_timers().await.expect("timers"), 0);
    h.finish().await;
}

/// `order-saga payment simulate` without a broker puts the result in the
/// log, where the in-process bus delivers it; it refuses what it cannot
/// send, naming the field.
async fn the_simulate_command_sends_a_payment_through_the_log(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let order = h.waiting_order().await;
    let run = |args: Vec<String>| {
        let mut command = crate::binary::order_saga(&h.t);
        command.env_remove("KAFKA_BROKERS").args(args);
        async move { command.output().await.expect("run order-saga") }
    };
    let simulate = |order: &str, more: &[&str]| {
        let mut args: Vec<String> = ["payment", "simulate", order, "--result", "completed"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(more.iter().map(|s| s.to_string()));
        args
    };
    let unknown = run(simulate("o-nope", &[])).await;
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("orderId: unknown order 'o-nope'"));
    let bad = run(simulate(&order, &["--amount", "1.234"])).await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--amount"));
    let sent = run(simulate(&order, &["--method", "NAVER_PAY"])).await;
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let sent: serde_json::Value = serde_json::from_slice(&sent.stdout).expect("JSON");
    assert_eq!(
        (
            &sent["topic"],
            &sent["via"],
            &sent["event"]["paymentMethod"]
        ),
        (
            &"payment.completed".into(),
            &"log".into(),
            &"NAVER_PAY".into()
        )
    );
    // Another process appended it: the log shows it once numbered (on
    // PostgreSQL a reader numbers others' appends at least every 100 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        h.run().await;
        if h.state(&order).await.status == OrderStatus::OrderCompleted {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the payment never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.finish().await;
}

/// Migration 0011 gives an order that was waiting for its payment before
/// the payment deadline existed (here: its deadline removed) a deadline 30
/// minutes after its wait opened, and one that has a deadline keeps it.
async fn the_upgrade_gives_orders_already_waiting_a_payment_deadline(backend: Backend) {
    use order_saga::store::Store;
    let h = harness(backend, vec![]).await;
    let order = h.waiting_order().await;
    order_saga::read_models::ReadModels::new(h.t.store.clone())
        .catch_up()
        .await
        .expect("read models");
    let delete = "DELETE FROM timers WHERE kind = 'PaymentTimeout'";
    let backfill = match &h.t.store {
        Store::Postgres(_) => {
            include_str!("../../migrations/postgres/0011_payment_deadlines_of_waiting_orders.sql")
        }
        Store::Sqlite(_) => {
            include_str!("../../migrations/sqlite/0011_payment_deadlines_of_waiting_orders.sql")
        }
    };
    for sql in [delete, backfill, backfill] {
        crate::helpers::raw_sql(&h.t.store, sql).await;
    }
    assert_eq!(h.t.store.pending_timers().await.expect("timers"), 1);
    h.advance(31 * MINUTE).await;
    h.run().await;
    let state = h.state(&order).await;
    assert_eq!(
        (state.status, state.cancel_reason),
        (
            OrderStatus::OrderCancelled,
            Some(CancelReason::PaymentTimeout)
        )
    );
    h.assert_sold("p-1", 5, 0, 0).await;
    h.finish().await;
}
