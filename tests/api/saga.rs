//! The saga, given/when/then, on both backends: given these orders and
//! stock, when these messages arrive (or the clock passes a deadline), then
//! these events, states and notifications follow. Time is a ManualClock;
//! nothing sleeps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use order_saga::saga::clock::{Clock, ManualClock};
use order_saga::saga::integration::{IntegrationEvent, Topic};
use order_saga::saga::notifier::{
    Notification, NotificationKind, Notifier, WebhookNotifier, WebhookSettings,
};
use order_saga::saga::transport::{
    Delivery, LogTransport, Subscription, Transport, TransportError,
};
use order_saga::saga::{FaultInjector, Saga, SagaConfig, SagaOptions, Side, Step};
use order_saga::service::{App, CreateOrderRequest, OrderView, ProductView};
use order_saga::store::Store;
use order_saga_domain::stock::ReservationStatus;
use order_saga_domain::{
    CancelReason, ItemRequest, Order, OrderCommand, OrderStatus, StockReservation,
};
use serde_json::Value;

use crate::helpers::{Backend, TestStore};
use crate::on_both_backends;

on_both_backends!(
    a_stocked_order_is_confirmed_then_waits_for_payment_and_the_customer_is_told,
    stock_shortage_cancels_the_order_and_notifies_the_customer,
    no_stock_reply_in_3_minutes_cancels_the_order_and_a_late_reservation_is_released,
    a_failing_confirmation_is_retried_twice_30s_apart_then_cancelled_with_stock_released,
    an_order_still_unconfirmed_2_minutes_after_its_stock_reply_gets_one_last_try_then_is_cancelled,
    a_failing_payment_wait_is_retried_3_times_1_min_apart_then_cancelled_with_stock_released,
    a_saga_not_finished_in_10_minutes_is_cancelled,
    a_cancellation_reaching_the_stock_side_before_the_order_leaves_no_stock_held,
    every_message_delivered_twice_changes_nothing_the_second_time,
    replaying_every_consumer_from_checkpoint_0_changes_nothing,
    a_poll_reads_past_a_stretch_with_nothing_for_its_group,
    an_undecodable_message_is_dead_lettered_and_the_saga_goes_on,
    the_webhook_is_retried_and_every_attempt_recorded_without_holding_up_the_saga,
    deadlines_survive_a_restart,
    two_instances_never_claim_the_same_timer,
);

/// Notifications as the customer would receive them.
#[derive(Default)]
pub(crate) struct RecordingNotifier {
    sent: Mutex<Vec<Notification>>,
}

#[async_trait]
impl Notifier for RecordingNotifier {
    async fn send(&self, notification: &Notification) -> Result<(), String> {
        self.sent
            .lock()
            .map_err(|e| e.to_string())?
            .push(notification.clone());
        Ok(())
    }
}

/// Fails the steps it is told to, and notes when each was tried.
pub(crate) struct ScriptedFaults {
    failing: Vec<Step>,
    clock: Arc<ManualClock>,
    tries: Mutex<Vec<(Step, DateTime<Utc>)>>,
}

impl FaultInjector for ScriptedFaults {
    fn check(&self, step: Step, _order_id: &str) -> Result<(), String> {
        self.tries
            .lock()
            .map_err(|e| e.to_string())?
            .push((step, self.clock.now()));
        if self.failing.contains(&step) {
            Err(format!("{step:?} is down"))
        } else {
            Ok(())
        }
    }
}

impl ScriptedFaults {
    /// When `step` was tried, in whole seconds after `start`.
    fn offsets(&self, step: Step, start: DateTime<Utc>) -> Vec<i64> {
        self.tries(step)
            .iter()
            .map(|t| (*t - start).num_seconds())
            .collect()
    }

    fn tries(&self, step: Step) -> Vec<DateTime<Utc>> {
        let tries = self.tries.lock().expect("tries");
        tries
            .iter()
            .filter(|(s, _)| *s == step)
            .map(|(_, at)| *at)
            .collect()
    }
}

pub(crate) struct Harness {
    pub(crate) t: TestStore,
    pub(crate) app: Arc<App>,
    pub(crate) saga: Arc<Saga>,
    pub(crate) clock: Arc<ManualClock>,
    notifier: Arc<RecordingNotifier>,
    faults: Arc<ScriptedFaults>,
}

const SECOND: Duration = Duration::from_secs(1);
pub(crate) const MINUTE: Duration = Duration::from_secs(60);

pub(crate) async fn harness(backend: Backend, failing: Vec<Step>) -> Harness {
    harness_with(backend, failing, SagaConfig::default()).await
}

pub(crate) async fn harness_with(
    backend: Backend,
    failing: Vec<Step>,
    config: SagaConfig,
) -> Harness {
    let t = TestStore::new(backend).await;
    let app = App::new(t.store.clone());
    for (product, price, stock) in [("p-1", "12900.00", 5), ("p-2", "0.10", 100)] {
        app.set_product(product, Some(price.parse().expect("price")), Some(stock))
            .await
            .expect("set product");
    }
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let notifier = Arc::new(RecordingNotifier::default());
    let faults = Arc::new(ScriptedFaults {
        failing,
        clock: clock.clone(),
        tries: Mutex::new(Vec::new()),
    });
    let saga = saga_with(
        &t.store,
        &LogTransport::new(t.store.clone()),
        &clock,
        notifier.clone(),
        Some(faults.clone()),
        config,
    )
    .await;
    Harness {
        t,
        app,
        saga,
        clock,
        notifier,
        faults,
    }
}

pub(crate) async fn saga_on(
    store: &Store,
    transport: &dyn Transport,
    clock: &Arc<ManualClock>,
    notifier: Arc<dyn Notifier>,
    faults: Option<Arc<ScriptedFaults>>,
) -> Arc<Saga> {
    saga_with(
        store,
        transport,
        clock,
        notifier,
        faults,
        SagaConfig::default(),
    )
    .await
}

pub(crate) async fn saga_with(
    store: &Store,
    transport: &dyn Transport,
    clock: &Arc<ManualClock>,
    notifier: Arc<dyn Notifier>,
    faults: Option<Arc<ScriptedFaults>>,
    config: SagaConfig,
) -> Arc<Saga> {
    let options = SagaOptions {
        clock: clock.clone(),
        config,
        notifier,
        faults: faults.map(|f| f as Arc<dyn FaultInjector>),
        ..SagaOptions::default()
    };
    Saga::new(store.clone(), transport, options)
        .await
        .expect("saga")
}

impl Harness {
    pub(crate) async fn order(&self, items: &[(&str, i64)]) -> String {
        let request = CreateOrderRequest {
            user_id: "u-1".into(),
            store_id: "s-1".into(),
            items: items
                .iter()
                .map(|(p, q)| ItemRequest {
                    product_id: p.to_string(),
                    quantity: *q,
                })
                .collect(),
        };
        self.app
            .create_order(request, None)
            .await
            .expect("create order")
            .order_id
    }

    pub(crate) async fn state(&self, order_id: &str) -> OrderView {
        self.app
            .order(order_id)
            .await
            .expect("load order")
            .expect("order exists")
    }

    pub(crate) async fn product(&self, product_id: &str) -> ProductView {
        self.app
            .product(product_id)
            .await
            .expect("load")
            .expect("product exists")
    }

    pub(crate) async fn run(&self) {
        self.saga.run_until_idle().await.expect("saga runs");
    }

    pub(crate) async fn run_only(&self, services: &[Side]) {
        self.saga
            .run_until_idle_for(services, true)
            .await
            .expect("saga runs");
    }

    pub(crate) async fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    pub(crate) fn notified(&self) -> Vec<(String, NotificationKind, Option<CancelReason>)> {
        let sent = self.notifier.sent.lock().expect("sent");
        sent.iter()
            .map(|n| (n.order_id.clone(), n.kind, n.reason))
            .collect()
    }

    pub(crate) async fn reservation(&self, order_id: &str) -> Option<ReservationStatus> {
        self.t
            .store
            .load::<StockReservation>(order_id)
            .await
            .expect("load")
            .and_then(|(r, _)| r.status)
    }

    /// Event types of an aggregate's stream, in order.
    pub(crate) async fn order_events(&self, order_id: &str) -> Vec<String> {
        self.t
            .store
            .load_events::<Order>(order_id)
            .await
            .expect("events")
            .iter()
            .map(|e| {
                use cqrs_es::DomainEvent;
                e.payload.event_type()
            })
            .collect()
    }

    pub(crate) async fn stock_events(&self, order_id: &str) -> Vec<String> {
        self.t
            .store
            .load_events::<StockReservation>(order_id)
            .await
            .expect("events")
            .iter()
            .map(|e| {
                use cqrs_es::DomainEvent;
                e.payload.event_type()
            })
            .collect()
    }

    pub(crate) async fn assert_stock(&self, product_id: &str, available: u32, reserved: u64) {
        let p = self.product(product_id).await;
        assert_eq!(
            (p.available, p.reserved),
            (available, reserved),
            "{product_id} available/reserved"
        );
    }

    pub(crate) async fn finish(self) {
        drop(self.saga);
        self.t.cleanup().await;
    }
}

async fn a_stocked_order_is_confirmed_then_waits_for_payment_and_the_customer_is_told(
    backend: Backend,
) {
    let h = harness(backend, vec![]).await;
    let order = h.order(&[("p-1", 2), ("p-2", 3)]).await;
    h.run().await;
    assert_eq!(h.state(&order).await.status, OrderStatus::PaymentWait);
    assert_eq!(
        h.order_events(&order).await,
        ["OrderCreated", "OrderConfirmed", "PaymentWaitStarted"]
    );
    assert_eq!(
        h.reservation(&order).await,
        Some(ReservationStatus::Reserved)
    );
    h.assert_stock("p-1", 3, 2).await;
    h.assert_stock("p-2", 97, 3).await;
    assert_eq!(
        h.notified(),
        vec![
            (order.clone(), NotificationKind::OrderConfirmed, None),
            (order.clone(), NotificationKind::PaymentRequested, None)
        ]
    );
    // The saga timeout went with the success; only the payment wait's
    // deadline is pending.
    assert_eq!(h.t.store.pending_timers().await.expect("timers"), 1);
    h.finish().await;
}

async fn stock_shortage_cancels_the_order_and_notifies_the_customer(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let order = h.order(&[("p-2", 1), ("p-1", 6)]).await;
    h.run().await;
    let state = h.state(&order).await;
    assert_eq!(
        (state.status, state.cancel_reason),
        (
            OrderStatus::OrderCancelled,
            Some(CancelReason::StockShortage)
        )
    );
    assert_eq!(h.reservation(&order).await, Some(ReservationStatus::Failed));
    let (reservation, _) =
        h.t.store
            .load::<StockReservation>(&order)
            .await
            .expect("load")
            .expect("exists");
    assert_eq!(reservation.shortages.len(), 1);
    assert_eq!(
        (
            reservation.shortages[0].product_id.as_str(),
            reservation.shortages[0].requested,
            reservation.shortages[0].available
        ),
        ("p-1", 6, 5)
    );
    // All or nothing: p-2 was held and given back.
    h.assert_stock("p-1", 5, 0).await;
    h.assert_stock("p-2", 100, 0).await;
    assert_eq!(
        h.notified(),
        vec![(
            order.clone(),
            NotificationKind::OrderCancelled,
            Some(CancelReason::StockShortage)
        )]
    );
    h.finish().await;
}

async fn no_stock_reply_in_3_minutes_cancels_the_order_and_a_late_reservation_is_released(
    backend: Backend,
) {
    let h = harness(backend, vec![]).await;
    let order = h.order(&[("p-1", 2)]).await;
    // The stock side is down.
    h.run_only(&[Side::Order, Side::Notifier]).await;
    h.advance(3 * MINUTE - SECOND).await;
    h.run_only(&[Side::Order, Side::Notifier]).await;
    assert_eq!(
        h.state(&order).await.status,
        OrderStatus::OrderCreated,
        "not before 3 minutes"
    );
    h.advance(SECOND).await;
    h.run_only(&[Side::Order, Side::Notifier]).await;
    let state = h.state(&order).await;
    assert_eq!(
        state.cancel_reason,
        Some(CancelReason::StockReservationTimeout)
    );

    // The stock side comes back: it reserves late, then handles the cancellation.
    h.run().await;
    assert_eq!(
        h.stock_events(&order).await,
        ["StockReserved", "StockReleased"]
    );
    h.assert_stock("p-1", 5, 0).await;
    assert_eq!(
        h.state(&order).await.status,
        OrderStatus::OrderCancelled,
        "a late stock.reserved confirms nothing"
    );
    h.finish().await;
}

async fn a_failing_confirmation_is_retried_twice_30s_apart_then_cancelled_with_stock_released(
    backend: Backend,
) {
    let h = harness(backend, vec![Step::Confirm]).await;
    let start = h.clock.now();
    let order = h.order(&[("p-1", 2)]).await;
    h.run().await;
    h.assert_stock("p-1", 3, 2).await;
    h.advance(30 * SECOND - Duration::from_millis(1)).await;
    h.run().await;
    assert_eq!(
        h.faults.tries(Step::Confirm).len(),
        1,
        "no retry before 30 s"
    );
    h.advance(Duration::from_millis(1)).await;
    h.run().await;
    h.advance(30 * SECOND).await;
    h.run().await;
    let offsets = h.faults.offsets(Step::Confirm, start);
    assert_eq!(
        offsets,
        vec![0, 30, 60],
        "first try and 2 retries, 30 s apart"
    );
    let state = h.state(&order).await;
    assert_eq!(state.cancel_reason, Some(CancelReason::ConfirmationFailed));
    h.assert_stock("p-1", 5, 0).await;
    assert_eq!(
        h.stock_events(&order).await,
        ["StockReserved", "StockReleased"]
    );
    // Later deadlines find the order cancelled and do nothing more.
    h.advance(15 * MINUTE).await;
    h.run().await;
    assert_eq!(h.faults.tries(Step::Confirm).len(), 3);
    assert_eq!(
        h.order_events(&order).await,
        ["OrderCreated", "OrderCancelled"]
    );
    h.finish().await;
}

async fn an_order_still_unconfirmed_2_minutes_after_its_stock_reply_gets_one_last_try_then_is_cancelled(
    backend: Backend,
) {
    // Given retries spaced wider than the deadline (so only the deadline
    // can act) and a confirmation that keeps failing,
    let config = SagaConfig {
        confirm_retry_interval: 5 * MINUTE,
        ..SagaConfig::default()
    };
    let h = harness_with(backend, vec![Step::Confirm], config).await;
    let start = h.clock.now();
    let order = h.order(&[("p-1", 2)]).await;
    h.run().await;
    h.assert_stock("p-1", 3, 2).await;
    // when 2 minutes pass after the stock reply, not a moment before,
    h.advance(2 * MINUTE - Duration::from_millis(1)).await;
    h.run().await;
    assert_eq!(h.state(&order).await.status, OrderStatus::OrderCreated);
    assert_eq!(
        h.faults.tries(Step::Confirm).len(),
        1,
        "nothing before 2 minutes"
    );
    h.advance(Duration::from_millis(1)).await;
    h.run().await;
    // then the confirmation is tried once more, and, failing, the order is
    // cancelled (CONFIRMATION_FAILED) and its stock released.
    let offsets = h.faults.offsets(Step::Confirm, start);
    assert_eq!(offsets, vec![0, 120], "the first try and the deadline's");
    let state = h.state(&order).await;
    assert_eq!(state.cancel_reason, Some(CancelReason::ConfirmationFailed));
    h.assert_stock("p-1", 5, 0).await;
    assert!(h.notified().contains(&(
        order.clone(),
        NotificationKind::OrderCancelled,
        Some(CancelReason::ConfirmationFailed)
    )));
    // The retry that was due later finds the order cancelled.
    h.advance(5 * MINUTE).await;
    h.run().await;
    assert_eq!(h.faults.tries(Step::Confirm).len(), 2);
    assert_eq!(
        h.order_events(&order).await,
        ["OrderCreated", "OrderCancelled"]
    );
    h.finish().await;
}

async fn a_failing_payment_wait_is_retried_3_times_1_min_apart_then_cancelled_with_stock_released(
    backend: Backend,
) {
    let h = harness(backend, vec![Step::PaymentWait]).await;
    let start = h.clock.now();
    let order = h.order(&[("p-1", 1)]).await;
    h.run().await;
    assert_eq!(h.state(&order).await.status, OrderStatus::OrderConfirmed);
    for _ in 0..3 {
        h.advance(MINUTE).await;
        h.run().await;
    }
    let offsets = h.faults.offsets(Step::PaymentWait, start);
    assert_eq!(
        offsets,
        vec![0, 60, 120, 180],
        "first try and 3 retries, 1 min apart"
    );
    let state = h.state(&order).await;
    assert_eq!(state.cancel_reason, Some(CancelReason::PaymentWaitFailed));
    h.assert_stock("p-1", 5, 0).await;
    assert_eq!(
        h.order_events(&order).await,
        ["OrderCreated", "OrderConfirmed", "OrderCancelled"]
    );
    h.finish().await;
}

async fn a_saga_not_finished_in_10_minutes_is_cancelled(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let order = h.order(&[("p-1", 1)]).await;
    // The order is confirmed, then the order side stops before opening the
    // payment wait.
    h.run_only(&[Side::Order]).await;
    h.run_only(&[Side::Stock]).await;
    h.saga
        .run_once_for(&[Side::Order], false)
        .await
        .expect("one pass");
    assert_eq!(h.state(&order).await.status, OrderStatus::OrderConfirmed);
    h.advance(10 * MINUTE - SECOND).await;
    h.saga.run_until_idle_for(&[], true).await.expect("timers");
    assert_eq!(
        h.state(&order).await.status,
        OrderStatus::OrderConfirmed,
        "not before 10 minutes"
    );
    h.advance(SECOND).await;
    h.saga.run_until_idle_for(&[], true).await.expect("timers");
    assert_eq!(
        h.state(&order).await.cancel_reason,
        Some(CancelReason::SagaTimeout)
    );
    // Everyone catches up: the payment wait is refused, the stock released.
    h.run().await;
    assert_eq!(
        h.order_events(&order).await,
        ["OrderCreated", "OrderConfirmed", "OrderCancelled"]
    );
    h.assert_stock("p-1", 5, 0).await;
    h.finish().await;
}

/// The integration events of the log so far, by topic.
async fn published(store: &Store) -> Vec<IntegrationEvent> {
    let log = store.read_log(0, 10_000).await.expect("log");
    log.iter()
        .filter_map(|e| IntegrationEvent::from_log(e).expect("decodes"))
        .collect()
}

async fn a_cancellation_reaching_the_stock_side_before_the_order_leaves_no_stock_held(
    backend: Backend,
) {
    let h = harness(backend, vec![]).await;
    let order = h.order(&[("p-1", 2)]).await;
    h.t.store
        .execute::<Order>(
            &order,
            OrderCommand::CancelOrder {
                reason: CancelReason::CustomerRequest,
                causation_id: None,
            },
            &order_services(&h.t.store),
            HashMap::new(),
        )
        .await
        .expect("cancel");
    let events = published(&h.t.store).await;
    let created = events
        .iter()
        .find(|e| e.topic() == Topic::OrderCreated)
        .expect("order.created");
    let cancelled = events
        .iter()
        .find(|e| e.topic() == Topic::OrderCancelled)
        .expect("order.cancelled");
    h.saga
        .handle(Side::Stock, cancelled)
        .await
        .expect("cancelled first");
    h.saga
        .handle(Side::Stock, created)
        .await
        .expect("created second");
    assert_eq!(h.reservation(&order).await, Some(ReservationStatus::Voided));
    h.assert_stock("p-1", 5, 0).await;
    h.finish().await;
}

fn order_services(store: &Store) -> order_saga_domain::OrderServices {
    order_saga_domain::OrderServices::new(Arc::new(order_saga::service::StoreCatalog::new(
        store.clone(),
    )))
}

/// Delivers every message twice in a row.
struct Twice(LogTransport);

struct TwiceSubscription(Box<dyn Subscription>);

#[async_trait]
impl Transport for Twice {
    async fn subscribe(
        &self,
        group: &str,
        topics: &[Topic],
    ) -> Result<Box<dyn Subscription>, TransportError> {
        Ok(Box::new(TwiceSubscription(
            self.0.subscribe(group, topics).await?,
        )))
    }
}

#[async_trait]
impl Subscription for TwiceSubscription {
    async fn poll(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError> {
        let deliveries = self.0.poll(max).await?;
        Ok(deliveries
            .into_iter()
            .flat_map(|d| [d.clone(), d])
            .collect())
    }

    async fn commit(&mut self, handled: &[Delivery]) -> Result<(), TransportError> {
        self.0.commit(handled).await
    }

    async fn rewind(&mut self) -> Result<(), TransportError> {
        self.0.rewind().await
    }
}

async fn every_message_delivered_twice_changes_nothing_the_second_time(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let saga = saga_on(
        &h.t.store,
        &Twice(LogTransport::new(h.t.store.clone())),
        &h.clock,
        h.notifier.clone(),
        None,
    )
    .await;
    let ok = h.order(&[("p-1", 2)]).await;
    let short = h.order(&[("p-1", 6)]).await;
    saga.run_until_idle().await.expect("saga");
    assert_eq!(
        h.order_events(&ok).await,
        ["OrderCreated", "OrderConfirmed", "PaymentWaitStarted"]
    );
    assert_eq!(
        h.order_events(&short).await,
        ["OrderCreated", "OrderCancelled"]
    );
    assert_eq!(h.stock_events(&ok).await, ["StockReserved"]);
    assert_eq!(h.stock_events(&short).await, ["StockReservationFailed"]);
    h.assert_stock("p-1", 3, 2).await;
    assert_eq!(
        h.notified().len(),
        3,
        "one notification per event: {:?}",
        h.notified()
    );
    h.finish().await;
}

/// A group's poll does not come back empty-handed from a stretch of the
/// log that holds only other groups' events while the log goes on: after a
/// burst, the stock service's first new order waited for every such
/// stretch, a pause between each.
async fn a_poll_reads_past_a_stretch_with_nothing_for_its_group(backend: Backend) {
    let h = harness(backend, vec![]).await;
    h.order(&[("p-1", 1)]).await;
    h.order(&[("p-1", 1)]).await;
    h.run().await;
    let log = h.t.store.read_log(0, 10_000).await.expect("log");
    let waiting: Vec<_> = log
        .iter()
        .filter(|e| e.event_type == "PaymentWaitStarted")
        .map(|e| (e.position, e.aggregate_id.clone()))
        .collect();
    assert_eq!(waiting.len(), 2, "{log:?}");
    let before = log.iter().filter(|e| e.position < waiting[0].0).count();
    assert!(
        before > 1,
        "nothing to read past before the first payment wait"
    );

    let mut subscription = LogTransport::new(h.t.store.clone())
        .subscribe("late-reader", &[Topic::PaymentWaitStarted])
        .await
        .expect("subscribe");
    // One entry at a time: every stretch before the first payment wait
    // holds nothing for this group.
    let polled = subscription.poll(1).await.expect("poll");
    let polled: Vec<_> = polled
        .iter()
        .map(|d| (d.offset.offset, d.key.clone()))
        .collect();
    assert_eq!(polled, [waiting[0].clone()]);
    h.finish().await;
}

async fn replaying_every_consumer_from_checkpoint_0_changes_nothing(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let ok = h.order(&[("p-1", 2)]).await;
    h.order(&[("p-1", 9)]).await;
    h.run().await;
    let log_before = h.t.store.read_log(0, 10_000).await.expect("log").len();
    assert_eq!(
        h.t.store.pending_timers().await.expect("timers"),
        1,
        "the sagas ended: only the payment wait's deadline is left"
    );
    let attempts_before =
        h.t.store
            .notification_attempts(&ok)
            .await
            .expect("attempts");
    for service in Side::ALL {
        h.t.store
            .reset_checkpoint(&format!("consumer.{}", service.group()), 0)
            .await
            .expect("reset");
    }
    let replay = saga_on(
        &h.t.store,
        &LogTransport::new(h.t.store.clone()),
        &h.clock,
        h.notifier.clone(),
        None,
    )
    .await;
    replay.run_until_idle().await.expect("replay");
    assert_eq!(
        h.t.store.read_log(0, 10_000).await.expect("log").len(),
        log_before,
        "no new events"
    );
    assert_eq!(
        h.t.store.pending_timers().await.expect("timers"),
        1,
        "no deadline set again for an ended saga"
    );
    assert_eq!(
        h.t.store
            .notification_attempts(&ok)
            .await
            .expect("attempts"),
        attempts_before
    );
    assert_eq!(h.notified().len(), 3, "nobody notified twice");
    h.assert_stock("p-1", 3, 2).await;
    h.finish().await;
}

/// Stores an `OrderCreated` event no version of the saga can read.
pub(crate) async fn store_a_garbled_order_event(store: &Store) {
    crate::helpers::raw_sql(
        store,
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('Order', 'garbled', 1, 'OrderCreated', '1.0', '{\"nonsense\": true}', '{}')",
    )
    .await;
}

async fn an_undecodable_message_is_dead_lettered_and_the_saga_goes_on(backend: Backend) {
    let h = harness(backend, vec![]).await;
    store_a_garbled_order_event(&h.t.store).await;
    let order = h.order(&[("p-1", 1)]).await;
    h.run().await;
    assert_eq!(h.state(&order).await.status, OrderStatus::PaymentWait);
    let dead = h.t.store.dead_letters().await.expect("dead letters");
    let groups: Vec<&str> = dead.iter().map(|dead| dead.consumer.as_str()).collect();
    assert_eq!(
        groups,
        vec![
            "order-saga.stock",
            "order-saga.order",
            "order-saga.notifier"
        ]
    );
    assert!(dead.iter().all(|dead| dead.topic == "Order.OrderCreated"
        && dead.event_id.is_some()
        && dead.error.contains("Order event")));
    h.finish().await;
}

/// A customer's push endpoint: fails the first request, then accepts.
async fn fake_webhook() -> (String, Arc<Mutex<Vec<Value>>>, tokio::task::JoinHandle<()>) {
    use axum::{extract::State, http::StatusCode, routing::post, Json, Router};
    let received = Arc::new(Mutex::new(Vec::<Value>::new()));
    let router = Router::new()
        .route(
            "/push",
            post(|State(received): State<Arc<Mutex<Vec<Value>>>>, Json(body): Json<Value>| async move {
                let mut received = received.lock().expect("lock");
                received.push(body);
                if received.len() == 1 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::NO_CONTENT }
            }),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/push", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (url, received, server)
}

async fn the_webhook_is_retried_and_every_attempt_recorded_without_holding_up_the_saga(
    backend: Backend,
) {
    let h = harness(backend, vec![]).await;
    let (url, received, server) = fake_webhook().await;
    let settings = WebhookSettings {
        url,
        ..WebhookSettings::default()
    };
    let webhook =
        Arc::new(WebhookNotifier::new(settings, Duration::from_secs(5)).expect("notifier"));
    let saga = saga_on(
        &h.t.store,
        &LogTransport::new(h.t.store.clone()),
        &h.clock,
        webhook,
        None,
    )
    .await;
    let order = h.order(&[("p-1", 1)]).await;
    saga.run_until_idle().await.expect("saga");
    assert_eq!(
        h.state(&order).await.status,
        OrderStatus::PaymentWait,
        "the saga did not wait for the customer"
    );
    h.advance(10 * SECOND).await;
    saga.run_until_idle().await.expect("saga");
    let attempts: Vec<(String, i64, String)> =
        h.t.store
            .notification_attempts(&order)
            .await
            .expect("attempts")
            .into_iter()
            .map(|a| (a.kind, a.attempt, a.outcome))
            .collect();
    assert_eq!(
        attempts,
        vec![
            ("ORDER_CONFIRMED".to_string(), 0, "failed".to_string()),
            ("PAYMENT_REQUESTED".to_string(), 0, "delivered".to_string()),
            ("ORDER_CONFIRMED".to_string(), 1, "delivered".to_string()),
        ]
    );
    let bodies = received.lock().expect("lock").clone();
    assert_eq!(bodies.len(), 3);
    assert_eq!(bodies[0]["orderId"], order.as_str());
    assert_eq!(bodies[0]["kind"], "ORDER_CONFIRMED");
    assert_eq!(
        bodies[0], bodies[2],
        "the retry sends the same notification"
    );
    server.abort();
    h.finish().await;
}

async fn deadlines_survive_a_restart(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let order = h.order(&[("p-1", 1)]).await;
    // The order side schedules its deadlines; the stock side is down; the
    // process stops.
    h.run_only(&[Side::Order]).await;
    h.saga
        .run_until_idle_for(&[], false)
        .await
        .expect("nothing");
    let restarted_store = h.t.open().await;
    let restarted = saga_on(
        &restarted_store,
        &LogTransport::new(restarted_store.clone()),
        &h.clock,
        h.notifier.clone(),
        None,
    )
    .await;
    h.advance(3 * MINUTE).await;
    restarted
        .run_until_idle_for(&[Side::Order], true)
        .await
        .expect("restarted saga");
    assert_eq!(
        h.state(&order).await.cancel_reason,
        Some(CancelReason::StockReservationTimeout)
    );
    restarted_store.close().await;
    h.finish().await;
}

async fn two_instances_never_claim_the_same_timer(backend: Backend) {
    use order_saga::store::{Timer, TimerKind};
    let t = TestStore::new(backend).await;
    let now = Utc::now();
    for i in 0..60 {
        let timer = Timer {
            kind: TimerKind::SagaTimeout,
            subject: format!("o-{i}"),
            order_id: format!("o-{i}"),
            attempt: 0,
            due_at: now,
            causation_id: uuid::Uuid::new_v4().to_string(),
            correlation_id: None,
            payload: serde_json::json!({}),
        };
        t.store.schedule_timer(&timer).await.expect("schedule");
    }
    let other = t.open().await;
    let lease = now + chrono::Duration::seconds(60);
    let claim = |store: Store| async move {
        let mut ids = Vec::new();
        for _ in 0..6 {
            let claimed = store.claim_due_timers(now, lease, 7).await.expect("claim");
            ids.extend(claimed.iter().map(Timer::id));
        }
        ids
    };
    let (a, b) = tokio::join!(claim(t.store.clone()), claim(other.clone()));
    let all: std::collections::HashSet<&String> = a.iter().chain(&b).collect();
    assert_eq!(a.len() + b.len(), 60, "every due timer claimed once");
    assert_eq!(all.len(), 60, "no timer claimed by both");
    // A leased timer is not claimable until its lease runs out.
    assert!(t
        .store
        .claim_due_timers(now, lease, 100)
        .await
        .expect("claim")
        .is_empty());
    let after_lease = lease + chrono::Duration::milliseconds(1);
    assert_eq!(
        t.store
            .claim_due_timers(after_lease, after_lease, 100)
            .await
            .expect("claim")
            .len(),
        60
    );
    other.close().await;
    t.cleanup().await;
}
