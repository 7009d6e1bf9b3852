//! The Order Creation SAGA, by choreography: three services — stock, order
//! and notifier — each a consumer group reacting to the others' integration
//! events, plus the durable timers that enforce deadlines and retries.
//!
//! ```text
//! order.created            -> stock: reserve all items  -> stock.reserved | stock.reservation.failed
//! order.created            -> order: start the stock-reply and saga deadlines
//! stock.reserved           -> order: confirm             -> order.confirmed
//! stock.reservation.failed -> order: cancel STOCK_SHORTAGE -> order.cancelled
//! order.confirmed          -> order: start payment wait  -> order.payment.waiting
//! order.cancelled          -> stock: release, if held    -> stock.released
//! order.confirmed | order.payment.waiting | order.cancelled -> notifier
//! ```
//!
//! Idempotency: every effect is an aggregate command that carries the
//! incoming event's id as its cause; the aggregate treats an exact repeat as
//! a no-op, so the record of what was handled is the effect's own event,
//! written in the same append. A message handled twice changes nothing.

pub mod avro;
pub mod clock;
pub mod integration;
pub mod kafka;
pub mod notify;
pub mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cqrs_es::{Aggregate, AggregateError};
use futures_util::StreamExt;
use order_saga_domain::{
    CancelReason, Order, OrderCommand, OrderError, OrderServices, OrderStatus, StockItem,
    StockReservation, StockReservationCommand, StockReservationError, StockServices,
};
use serde_json::json;
use tokio::sync::Mutex;
use tracing::Instrument;
use uuid::Uuid;

use self::clock::{Clock, SystemClock};
use self::integration::{Body, IntegrationEvent, Topic, CAUSATION_ID, CORRELATION_ID};
use self::notify::{LogNotifier, Notification, Notifier};

use self::transport::{DeadLetterSink, Delivery, Subscription, Transport, TransportError};
use crate::health::{pause, pause_until_append, Heartbeat, Shutdown, Tasks};
use crate::service::{store_ledger, StoreCatalog};
use crate::store::{Store, StoreError, Timer, TimerKind};

/// Every duration and count of SPEC §3, configurable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaConfig {
    pub stock_reply_timeout: Duration,
    pub confirmation_timeout: Duration,
    pub saga_timeout: Duration,
    pub confirm_retries: u32,
    pub confirm_retry_interval: Duration,
    pub payment_wait_retries: u32,
    pub payment_wait_retry_interval: Duration,
    pub notify_retries: u32,
    pub notify_retry_interval: Duration,
    /// Tries of a message whose handler keeps failing before it is
    /// dead-lettered.
    pub handler_attempts: u32,
    /// How long a claimed timer is held before another claimer may fire it.
    pub timer_lease: Duration,
    /// How often an idle consumer looks for work (besides waking on this
    /// process's appends).
    pub poll_interval: Duration,
    /// How often the timer loop looks for due timers: a timer fires up to
    /// this late (the saga's timers are seconds to minutes long).
    pub timer_poll_interval: Duration,
    pub batch_size: usize,
    /// Orders a consumer handles at once (one order's messages stay in order).
    pub handler_concurrency: usize,
}

impl Default for SagaConfig {
    fn default() -> Self {
        SagaConfig {
            stock_reply_timeout: Duration::from_secs(180),
            confirmation_timeout: Duration::from_secs(120),
            saga_timeout: Duration::from_secs(600),
            confirm_retries: 2,
            confirm_retry_interval: Duration::from_secs(30),
            payment_wait_retries: 3,
            payment_wait_retry_interval: Duration::from_secs(60),
            notify_retries: 3,
            notify_retry_interval: Duration::from_secs(10),
            handler_attempts: 5,
            timer_lease: Duration::from_secs(60),
            poll_interval: Duration::from_millis(10),
            timer_poll_interval: Duration::from_millis(100),
            batch_size: 256,
            handler_concurrency: 256,
        }
    }
}

/// The three choreographed services, each its own consumer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Stock,
    Order,
    Notifier,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Stock, Service::Order, Service::Notifier];

    pub fn group(self) -> &'static str {
        match self {
            Service::Stock => "order-saga.stock",
            Service::Order => "order-saga.order",
            Service::Notifier => "order-saga.notifier",
        }
    }

    /// The aggregate types whose events its topics carry: an append of
    /// another type is nothing for it (in-process, the topics are the log).
    pub fn wakes_on(self) -> &'static [&'static str] {
        match self {
            Service::Stock | Service::Notifier => &["Order"],
            Service::Order => integration::SOURCES,
        }
    }

    pub fn topics(self) -> &'static [Topic] {
        match self {
            Service::Stock => &[Topic::OrderCreated, Topic::OrderCancelled],
            Service::Order => &[
                Topic::OrderCreated,
                Topic::StockReserved,
                Topic::StockReservationFailed,
                Topic::OrderConfirmed,
            ],
            Service::Notifier => &[
                Topic::OrderConfirmed,
                Topic::PaymentWaiting,
                Topic::OrderCancelled,
            ],
        }
    }
}

/// A saga step whose failure can be injected (see [`FaultInjector`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Confirm,
    PaymentWait,
}

/// Lets a test make a step fail, as a store outage or a payment service
/// that does not answer would. Production runs without one.
pub trait FaultInjector: Send + Sync {
    fn check(&self, step: Step, order_id: &str) -> Result<(), String>;
}

#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a handler failed: worth another try, or never going to work.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> Self {
        HandlerError::Transient(e.to_string())
    }
}

fn store_failure<E: std::error::Error>(e: AggregateError<E>) -> HandlerError {
    match e {
        AggregateError::DeserializationError(e) => HandlerError::Permanent(e.to_string()),
        other => HandlerError::Transient(other.to_string()),
    }
}

/// What the saga runs with besides the store and the transport.
pub struct SagaOptions {
    pub clock: Arc<dyn Clock>,
    pub config: SagaConfig,
    pub notifier: Arc<dyn Notifier>,
    pub faults: Option<Arc<dyn FaultInjector>>,
}

impl Default for SagaOptions {
    fn default() -> Self {
        SagaOptions {
            clock: Arc::new(SystemClock),
            config: SagaConfig::default(),
            notifier: Arc::new(LogNotifier),
            faults: None,
        }
    }
}

struct Consumer {
    service: Service,
    /// Whether an empty poll waited already ([`Subscription::waits`]).
    waits: bool,
    subscription: Mutex<Box<dyn Subscription>>,
    /// Failed tries per event id, for dead-lettering.
    failures: Mutex<HashMap<Uuid, u32>>,
}

pub struct Saga {
    store: Store,
    clock: Arc<dyn Clock>,
    config: SagaConfig,
    notifier: Arc<dyn Notifier>,
    faults: Option<Arc<dyn FaultInjector>>,
    order_services: OrderServices,
    stock_services: StockServices,
    consumers: Vec<Consumer>,
    heartbeat: Heartbeat,
    dead_letter_sink: Option<Arc<dyn DeadLetterSink>>,
}

impl Saga {
    /// Subscribes the three services to `transport`.
    pub async fn new(
        store: Store,
        transport: &dyn Transport,
        options: SagaOptions,
    ) -> Result<Arc<Self>, SagaError> {
        let mut consumers = Vec::new();
        for service in Service::ALL {
            let subscription = transport
                .subscribe(service.group(), service.topics())
                .await?;
            consumers.push(Consumer {
                service,
                waits: subscription.waits(),
                subscription: Mutex::new(subscription),
                failures: Mutex::new(HashMap::new()),
            });
        }
        Ok(Arc::new(Saga {
            order_services: OrderServices::new(Arc::new(StoreCatalog::new(store.clone()))),
            stock_services: StockServices::new(Arc::new(store_ledger(store.clone()))),
            store,
            clock: options.clock,
            config: options.config,
            notifier: options.notifier,
            faults: options.faults,
            consumers,
            heartbeat: Heartbeat::default(),
            dead_letter_sink: transport.dead_letters(),
        }))
    }

    /// Starts a loop per consumer and one for the timers; they stop after
    /// their current pass when `shutdown` turns true.
    pub fn spawn(self: &Arc<Self>, shutdown: Shutdown) -> Tasks {
        let mut tasks = Tasks::default();
        for index in 0..=self.consumers.len() {
            let saga = self.clone();
            let mut shutdown = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                let mut appends = match saga.consumers.get(index) {
                    Some(consumer) => saga.store.appends_of(consumer.service.wakes_on()),
                    None => saga.store.appends(),
                };
                loop {
                    saga.heartbeat.beat();
                    appends.mark();
                    let pass = match saga.consumers.get(index) {
                        Some(consumer) => saga.run_consumer(consumer).await,
                        None => saga.run_timers().await,
                    };
                    let (idle, failed) = match pass {
                        Ok(n) => (n == 0, false),
                        Err(e) => {
                            tracing::warn!(error = %e, "saga loop failed; retrying");
                            (true, true)
                        }
                    };
                    // Consumers of the in-process transport wake on an
                    // append; a broker's consumer polled with a wait
                    // already (but pauses after a failure); the timers
                    // only poll.
                    let consumer = saga.consumers.get(index);
                    let stop = match idle {
                        false => false,
                        true if !failed && consumer.is_some_and(|c| c.waits) => false,
                        true if consumer.is_some() => {
                            pause_until_append(
                                saga.config.poll_interval,
                                &mut shutdown,
                                &mut appends,
                            )
                            .await
                        }
                        true => pause(saga.config.timer_poll_interval, &mut shutdown).await,
                    };
                    if stop {
                        break;
                    }
                    if *shutdown.borrow() {
                        break;
                    }
                }
            }));
        }
        tasks
    }

    /// Beats while the saga's loops run.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// One pass: each of `services` handles what is waiting for it, then due
    /// timers fire (if `timers`). Returns how much work was done.
    pub async fn run_once_for(
        &self,
        services: &[Service],
        timers: bool,
    ) -> Result<usize, SagaError> {
        let mut done = 0;
        for consumer in self
            .consumers
            .iter()
            .filter(|c| services.contains(&c.service))
        {
            done += self.run_consumer(consumer).await?;
        }
        if timers {
            done += self.run_timers().await?;
        }
        Ok(done)
    }

    /// Runs passes until one finds nothing to do: everything delivered is
    /// handled and no timer is due on the saga's clock.
    pub async fn run_until_idle_for(
        &self,
        services: &[Service],
        timers: bool,
    ) -> Result<(), SagaError> {
        for _ in 0..10_000 {
            if self.run_once_for(services, timers).await? == 0 {
                return Ok(());
            }
        }
        Ok(())
    }

    pub async fn run_until_idle(&self) -> Result<(), SagaError> {
        self.run_until_idle_for(&Service::ALL, true).await
    }

    /// Polls one batch and handles it: one order's messages in order, up to
    /// `handler_concurrency` orders at a time. The batch is committed when
    /// every message in it is done; otherwise it is delivered again (what
    /// was done is then a no-op).
    async fn run_consumer(&self, consumer: &Consumer) -> Result<usize, SagaError> {
        let mut subscription = consumer.subscription.lock().await;
        let deliveries = subscription.poll(self.config.batch_size).await?;
        if deliveries.is_empty() {
            return Ok(0);
        }
        let mut by_key: Vec<Vec<Delivery>> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for delivery in &deliveries {
            let slot = *index.entry(delivery.key.as_str()).or_insert_with(|| {
                by_key.push(Vec::new());
                by_key.len() - 1
            });
            by_key[slot].push(delivery.clone());
        }
        let outcomes: Vec<Result<bool, SagaError>> = futures_util::stream::iter(by_key)
            .map(|group| self.deliver_in_order(consumer, group))
            .buffer_unordered(self.config.handler_concurrency.max(1))
            .collect()
            .await;
        let mut all_done = true;
        for outcome in outcomes {
            all_done &= outcome?;
        }
        if all_done {
            subscription.commit(&deliveries).await?;
        } else {
            subscription.rewind().await?;
        }
        Ok(deliveries.len())
    }

    /// Handles one order's deliveries in order; `Ok(false)` when one must be
    /// delivered again.
    async fn deliver_in_order(
        &self,
        consumer: &Consumer,
        group: Vec<Delivery>,
    ) -> Result<bool, SagaError> {
        for delivery in &group {
            if !self.deliver(consumer, delivery).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Handles one delivery. `Ok(false)`: it failed for now and must be
    /// delivered again; a message that cannot work is dead-lettered.
    async fn deliver(&self, consumer: &Consumer, delivery: &Delivery) -> Result<bool, SagaError> {
        let event = match &delivery.event {
            Ok(event) => event,
            Err(undecodable) => {
                self.dead_letter(
                    consumer.service,
                    delivery,
                    undecodable.event_id.as_deref(),
                    &undecodable.error,
                    &undecodable.payload,
                )
                .await?;
                return Ok(true);
            }
        };
        let span = tracing::info_span!(
            "handle",
            group = consumer.service.group(),
            topic = %delivery.topic,
            order_id = %event.order_id,
            event_id = %event.event_id,
            correlation_id = event.correlation_id.as_deref().unwrap_or(""),
        );
        let started = self.clock.now();
        let result = self.handle(consumer.service, event).instrument(span).await;
        let payload = || serde_json::to_string(event).unwrap_or_default();
        match result {
            Ok(()) => {
                consumer.failures.lock().await.remove(&event.event_id);
                let age = (started - event.occurred_at).to_std().unwrap_or_default();
                metrics::histogram!("order_saga_stage_seconds", "stage" => delivery.topic.clone())
                    .record(age.as_secs_f64());
                Ok(true)
            }
            Err(HandlerError::Permanent(error)) => {
                let id = event.event_id.to_string();
                self.dead_letter(consumer.service, delivery, Some(&id), &error, &payload())
                    .await?;
                Ok(true)
            }
            Err(HandlerError::Transient(error)) => {
                let mut failures = consumer.failures.lock().await;
                let tries = failures.entry(event.event_id).or_default();
                *tries += 1;
                if *tries < self.config.handler_attempts {
                    tracing::warn!(tries = *tries, %error, "handler failed; will retry");
                    return Ok(false);
                }
                failures.remove(&event.event_id);
                drop(failures);
                let id = event.event_id.to_string();
                self.dead_letter(consumer.service, delivery, Some(&id), &error, &payload())
                    .await?;
                Ok(true)
            }
        }
    }

    async fn dead_letter(
        &self,
        service: Service,
        delivery: &Delivery,
        event_id: Option<&str>,
        error: &str,
        payload: &str,
    ) -> Result<(), StoreError> {
        tracing::error!(group = service.group(), topic = %delivery.topic, error, "dead-lettered");
        metrics::counter!("order_saga_dead_letters_total", "consumer" => service.group())
            .increment(1);
        if let Some(sink) = &self.dead_letter_sink {
            if let Err(e) = sink.send(delivery, error).await {
                tracing::warn!(error = %e, "could not publish the dead letter; it is in the store");
            }
        }
        self.store
            .record_dead_letter(service.group(), &delivery.topic, event_id, error, payload)
            .await
    }

    /// What each service does with each integration event. Public so tests
    /// can deliver events in any order.
    pub async fn handle(
        &self,
        service: Service,
        event: &IntegrationEvent,
    ) -> Result<(), HandlerError> {
        match (service, &event.body) {
            (Service::Stock, Body::OrderCreated { items, .. }) => {
                let items = items
                    .iter()
                    .map(|l| StockItem {
                        product_id: l.product_id.clone(),
                        quantity: l.quantity,
                    })
                    .collect();
                self.reserve_stock(event, items).await
            }
            (Service::Stock, Body::OrderCancelled { items, .. }) => {
                self.release_stock(event, items.clone()).await
            }
            (Service::Order, Body::OrderCreated { .. }) => self.start_deadlines(event).await,
            (Service::Order, Body::StockReserved { .. }) => {
                let deadline = self.timer(
                    TimerKind::ConfirmationDeadline,
                    &event.order_id,
                    self.config.confirm_retries,
                    self.config.confirmation_timeout,
                    event.event_id,
                    event.correlation_id.clone(),
                );
                self.store
                    .cancel_and_schedule(TimerKind::StockReplyTimeout, &deadline)
                    .await?;
                let cause = Cause::of(event);
                self.try_confirm(&event.order_id, &cause, 0).await
            }
            (Service::Order, Body::StockReservationFailed { .. }) => {
                self.store
                    .cancel_timers(TimerKind::StockReplyTimeout, &event.order_id)
                    .await?;
                let cause = Cause::of(event);
                self.cancel_order(&event.order_id, CancelReason::StockShortage, &cause)
                    .await
            }
            // The confirmation deadline is dropped with the other saga
            // timers once the payment wait is open (or the order cancelled);
            // until then it finds the order confirmed and does nothing.
            (Service::Order, Body::OrderConfirmed { .. }) => {
                self.try_payment_wait(&event.order_id, &Cause::of(event), 0)
                    .await
            }
            (Service::Notifier, _) => match Notification::for_event(event) {
                Some(notification) => self.notify(&notification, 0).await,
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    async fn reserve_stock(
        &self,
        event: &IntegrationEvent,
        items: Vec<StockItem>,
    ) -> Result<(), HandlerError> {
        let command = StockReservationCommand::ReserveStock {
            order_id: event.order_id.clone(),
            items,
            causation_id: Some(event.event_id),
        };
        let done = self
            .stock_command(&event.order_id, command, &Cause::of(event))
            .await?;
        if let Some(envelope) = done.events.first() {
            let outcome = envelope.payload_type();
            metrics::counter!("order_saga_stock_reservations_total", "outcome" => outcome)
                .increment(1);
        }
        Ok(())
    }

    async fn release_stock(
        &self,
        event: &IntegrationEvent,
        items: Vec<StockItem>,
    ) -> Result<(), HandlerError> {
        let command = StockReservationCommand::ReleaseStock {
            order_id: event.order_id.clone(),
            items,
            causation_id: Some(event.event_id),
        };
        self.stock_command(&event.order_id, command, &Cause::of(event))
            .await?;
        Ok(())
    }

    async fn stock_command(
        &self,
        order_id: &str,
        command: StockReservationCommand,
        cause: &Cause,
    ) -> Result<crate::store::Executed<StockReservation>, HandlerError> {
        self.store
            .execute_retrying::<StockReservation>(
                order_id,
                command,
                &self.stock_services,
                cause.metadata(),
                20,
            )
            .await
            .map_err(|e| match e {
                AggregateError::UserError(StockReservationError::Invalid(e)) => {
                    HandlerError::Permanent(e.to_string())
                }
                AggregateError::UserError(StockReservationError::Ledger(e)) => {
                    HandlerError::Transient(e.to_string())
                }
                other => store_failure(other),
            })
    }

    async fn start_deadlines(&self, event: &IntegrationEvent) -> Result<(), HandlerError> {
        // Deadlines count from when the order side learns of the order.
        let timers = [
            (
                TimerKind::StockReplyTimeout,
                self.config.stock_reply_timeout,
            ),
            (TimerKind::SagaTimeout, self.config.saga_timeout),
        ]
        .map(|(kind, after)| {
            self.timer(
                kind,
                &event.order_id,
                0,
                after,
                Uuid::new_v4(),
                event.correlation_id.clone(),
            )
        });
        self.store.schedule_timers(&timers).await?;
        Ok(())
    }

    /// A saga timer of the order, due `after` from now on the saga's clock.
    fn timer(
        &self,
        kind: TimerKind,
        order_id: &str,
        attempt: u32,
        after: Duration,
        causation: Uuid,
        correlation_id: Option<String>,
    ) -> Timer {
        Timer {
            kind,
            subject: order_id.to_string(),
            order_id: order_id.to_string(),
            attempt,
            due_at: self.clock.now()
                + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX),
            causation_id: causation.to_string(),
            correlation_id,
            payload: json!({}),
        }
    }

    async fn order_status(&self, order_id: &str) -> Result<Option<OrderStatus>, HandlerError> {
        let loaded = self
            .store
            .load::<Order>(order_id)
            .await
            .map_err(store_failure)?;
        Ok(loaded.and_then(|(order, _)| order.status))
    }

    async fn order_command(
        &self,
        order_id: &str,
        command: OrderCommand,
        cause: &Cause,
    ) -> Result<Result<(), OrderError>, HandlerError> {
        match self
            .store
            .execute_retrying::<Order>(
                order_id,
                command,
                &self.order_services,
                cause.metadata(),
                20,
            )
            .await
        {
            Ok(_) => Ok(Ok(())),
            Err(AggregateError::UserError(e)) => Ok(Err(e)),
            Err(e) => Err(store_failure(e)),
        }
    }

    fn fault(&self, step: Step, order_id: &str) -> Result<(), String> {
        match &self.faults {
            Some(faults) => faults.check(step, order_id),
            None => Ok(()),
        }
    }

    /// Confirms the order, or schedules the next try, or — out of tries —
    /// cancels it (CONFIRMATION_FAILED).
    async fn try_confirm(
        &self,
        order_id: &str,
        cause: &Cause,
        attempt: u32,
    ) -> Result<(), HandlerError> {
        self.try_step(Step::Confirm, order_id, cause, attempt).await
    }

    /// Opens the payment wait, or schedules the next try, or — out of tries
    /// — cancels the order (PAYMENT_WAIT_FAILED).
    async fn try_payment_wait(
        &self,
        order_id: &str,
        cause: &Cause,
        attempt: u32,
    ) -> Result<(), HandlerError> {
        self.try_step(Step::PaymentWait, order_id, cause, attempt)
            .await
    }

    /// One try of a retried saga step (SPEC §3's retry table): the order
    /// command, or on failure the next try on a timer, or — out of tries —
    /// the cancellation. An order that has moved on (cancelled meanwhile —
    /// its stock is then released by the stock side — or already past this
    /// step) needs nothing more.
    async fn try_step(
        &self,
        step: Step,
        order_id: &str,
        cause: &Cause,
        attempt: u32,
    ) -> Result<(), HandlerError> {
        let causation_id = Some(cause.causation);
        let (command, retries, interval, retry, exhausted) = match step {
            Step::Confirm => (
                OrderCommand::ConfirmOrder { causation_id },
                self.config.confirm_retries,
                self.config.confirm_retry_interval,
                TimerKind::ConfirmRetry,
                CancelReason::ConfirmationFailed,
            ),
            Step::PaymentWait => (
                OrderCommand::StartPaymentWait { causation_id },
                self.config.payment_wait_retries,
                self.config.payment_wait_retry_interval,
                TimerKind::PaymentWaitRetry,
                CancelReason::PaymentWaitFailed,
            ),
        };
        let failure = match self.fault(step, order_id) {
            Err(injected) => injected,
            Ok(()) => match self.order_command(order_id, command, cause).await {
                Ok(Ok(())) => {
                    if step == Step::PaymentWait {
                        // Counted once its timers are gone: a finished saga
                        // leaves nothing pending.
                        self.store.cancel_saga_timers(order_id).await?;
                        metrics::counter!("order_saga_sagas_completed_total", "outcome" => "PAYMENT_WAIT")
                            .increment(1);
                    }
                    return Ok(());
                }
                Ok(Err(OrderError::InvalidTransition { .. })) => return Ok(()),
                Ok(Err(e)) => return Err(HandlerError::Permanent(e.to_string())),
                Err(e) => e.to_string(),
            },
        };
        tracing::warn!(order_id, ?step, attempt, error = %failure, "saga step failed");
        if attempt < retries {
            let next = self.timer(
                retry,
                order_id,
                attempt + 1,
                interval,
                cause.causation,
                cause.correlation_id.clone(),
            );
            self.store.schedule_timer(&next).await?;
            Ok(())
        } else {
            self.cancel_order(order_id, exhausted, cause).await
        }
    }

    /// The compensating transaction's first step: cancel the order (the
    /// stock side releases on order.cancelled). A no-op for an order that is
    /// already cancelled or waiting for payment.
    async fn cancel_order(
        &self,
        order_id: &str,
        reason: CancelReason,
        cause: &Cause,
    ) -> Result<(), HandlerError> {
        let command = OrderCommand::CancelOrder {
            reason,
            causation_id: Some(cause.causation),
        };
        match self.order_command(order_id, command, cause).await? {
            Ok(()) => {
                metrics::counter!("order_saga_compensations_total", "reason" => reason.as_str())
                    .increment(1);
                self.store.cancel_saga_timers(order_id).await?;
                metrics::counter!("order_saga_sagas_completed_total", "outcome" => "ORDER_CANCELLED").increment(1);
                Ok(())
            }
            Err(OrderError::InvalidTransition { .. }) => Ok(()),
            Err(e) => Err(HandlerError::Permanent(e.to_string())),
        }
    }

    /// Sends attempt `attempt` of a notification unless it was made already;
    /// a failure schedules the next attempt. Never fails the saga.
    async fn notify(&self, notification: &Notification, attempt: u32) -> Result<(), HandlerError> {
        let (made, delivered) = self
            .store
            .notification_progress(&notification.event_id)
            .await?;
        if delivered || made > attempt {
            return Ok(());
        }
        let result = self.notifier.send(notification).await;
        let now = self.clock.now();
        self.store
            .record_notification_attempt(notification.attempt(
                attempt,
                &result,
                now.timestamp_millis(),
            ))
            .await?;
        let outcome = if result.is_ok() {
            "delivered"
        } else {
            "failed"
        };
        metrics::counter!("order_saga_notifications_total", "outcome" => outcome).increment(1);
        if let Err(error) = result {
            tracing::warn!(order_id = %notification.order_id, attempt, %error, "notification failed");
            if attempt < self.config.notify_retries {
                let timer = Timer {
                    kind: TimerKind::NotifyRetry,
                    subject: notification.event_id.clone(),
                    order_id: notification.order_id.clone(),
                    attempt: attempt + 1,
                    due_at: now
                        + chrono::Duration::from_std(self.config.notify_retry_interval)
                            .unwrap_or(chrono::Duration::MAX),
                    causation_id: notification.event_id.clone(),
                    correlation_id: None,
                    payload: serde_json::to_value(notification)
                        .map_err(|e| HandlerError::Permanent(e.to_string()))?,
                };
                self.store.schedule_timer(&timer).await?;
            }
        }
        Ok(())
    }

    /// Fires the timers due on the saga's clock.
    pub async fn run_timers(&self) -> Result<usize, SagaError> {
        let now = self.clock.now();
        let lease =
            chrono::Duration::from_std(self.config.timer_lease).unwrap_or(chrono::Duration::MAX);
        let due = self
            .store
            .claim_due_timers(now, now + lease, self.config.batch_size as i64)
            .await?;
        for timer in &due {
            metrics::counter!("order_saga_timers_fired_total", "kind" => timer.kind.as_str())
                .increment(1);
            match self.fire(timer).await {
                Ok(()) => self.store.complete_timer(timer).await?,
                Err(HandlerError::Permanent(error)) => {
                    tracing::error!(timer = %timer.id(), %error, "timer action failed for good");
                    self.store.complete_timer(timer).await?;
                }
                // Left leased: it fires again when the lease runs out.
                Err(HandlerError::Transient(error)) => {
                    tracing::warn!(timer = %timer.id(), %error, "timer action failed; will retry");
                }
            }
        }
        Ok(due.len())
    }

    async fn fire(&self, timer: &Timer) -> Result<(), HandlerError> {
        let cause = Cause {
            causation: Uuid::parse_str(&timer.causation_id)
                .map_err(|e| HandlerError::Permanent(format!("timer cause: {e}")))?,
            correlation_id: timer.correlation_id.clone(),
        };
        let order_id = timer.order_id.as_str();
        match timer.kind {
            TimerKind::StockReplyTimeout => {
                if self.order_status(order_id).await? == Some(OrderStatus::OrderCreated) {
                    self.cancel_order(order_id, CancelReason::StockReservationTimeout, &cause)
                        .await?;
                }
                Ok(())
            }
            TimerKind::SagaTimeout => {
                if matches!(
                    self.order_status(order_id).await?,
                    Some(OrderStatus::OrderCreated | OrderStatus::OrderConfirmed)
                ) {
                    self.cancel_order(order_id, CancelReason::SagaTimeout, &cause)
                        .await?;
                }
                Ok(())
            }
            // Still not confirmed: one last try (attempt = the last one).
            TimerKind::ConfirmationDeadline => {
                if self.order_status(order_id).await? == Some(OrderStatus::OrderCreated) {
                    self.try_confirm(order_id, &cause, self.config.confirm_retries)
                        .await?;
                }
                Ok(())
            }
            TimerKind::ConfirmRetry => self.try_confirm(order_id, &cause, timer.attempt).await,
            TimerKind::PaymentWaitRetry => {
                self.try_payment_wait(order_id, &cause, timer.attempt).await
            }
            TimerKind::NotifyRetry => {
                let notification: Notification = serde_json::from_value(timer.payload.clone())
                    .map_err(|e| HandlerError::Permanent(format!("notification timer: {e}")))?;
                self.notify(&notification, timer.attempt).await
            }
        }
    }
}

/// The cause passed on to an effect: the id of the event (or timer) that
/// caused it, and the saga's correlation id.
struct Cause {
    causation: Uuid,
    correlation_id: Option<String>,
}

impl Cause {
    fn of(event: &IntegrationEvent) -> Self {
        Cause {
            causation: event.event_id,
            correlation_id: event.correlation_id.clone(),
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        let mut metadata = HashMap::from([(CAUSATION_ID.to_string(), self.causation.to_string())]);
        if let Some(correlation) = &self.correlation_id {
            metadata.insert(CORRELATION_ID.to_string(), correlation.clone());
        }
        metadata
    }
}

/// The event type of a stored envelope, for metric labels.
trait PayloadType {
    fn payload_type(&self) -> String;
}

impl<A: Aggregate> PayloadType for cqrs_es::EventEnvelope<A> {
    fn payload_type(&self) -> String {
        use cqrs_es::DomainEvent;
        self.payload.event_type()
    }
}
