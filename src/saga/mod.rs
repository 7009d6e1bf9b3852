//! The Order Creation SAGA, by choreography: three sides — stock, order
//! and notifier — each a consumer group reacting to the others' integration
//! events, plus the durable timers that enforce deadlines and retries.
//!
//! ```text
//! order.created            -> stock: reserve all items  -> stock.reserved | stock.reservation.failed
//! order.created            -> order: start the stock-reply and saga deadlines
//! stock.reserved           -> order: confirm             -> order.confirmed
//! stock.reservation.failed -> order: cancel STOCK_SHORTAGE -> order.cancelled
//! order.confirmed          -> order: start payment wait (and its 30 min deadline) -> order.payment.waiting
//! order.cancelled          -> stock: release, if held    -> stock.released
//! payment.completed        -> order: record the payment  -> order.payment.completed
//!                                    | or reject it      -> stock.confirmation.failed
//! order.payment.completed  -> stock: sell what is held   -> stock.confirmed
//! stock.confirmed          -> order: complete            -> order.completed
//! payment.failed           -> order: cancel PAYMENT_FAILED -> order.cancelled
//! payment deadline         -> order: cancel PAYMENT_TIMEOUT -> order.expiration-notification, order.cancelled
//! order.confirmed | order.payment.waiting | order.cancelled | order.completed -> notifier
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
pub mod notifier;
mod order;
pub mod payment;
mod redrive;
pub use redrive::Redrive;
mod runtime;
mod stock;
mod timers;
pub mod transport;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use cqrs_es::{Aggregate, AggregateError};
use order_saga_domain::{CancelReason, OrderLine, OrderServices, OrderStatus, StockServices};
use tokio::sync::Mutex;
use uuid::Uuid;

use self::clock::{Clock, SystemClock};
use self::integration::{Body, IntegrationEvent, Topic, CAUSATION_ID, CORRELATION_ID};
use self::notifier::{LogNotifier, Notification, Notifier};

use self::runtime::Consumer;
use self::transport::{DeadLetterSink, Transport, TransportError};
use crate::fault::{self, Backoff, Fault};
use crate::health::{pause, pause_until_append, Heartbeat, Shutdown, Tasks};
use crate::leadership::Roles;
use crate::service::{store_ledger, StoreCatalog};
use crate::store::{Store, StoreError, TimerKind};

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
    /// How long an order waits for its payment before it is cancelled
    /// (PAYMENT_TIMEOUT), from when the wait opened.
    pub payment_timeout: Duration,
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
            payment_timeout: Duration::from_secs(30 * 60),
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

/// The saga's three reacting sides, each its own consumer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Stock,
    Order,
    Notifier,
}

impl Side {
    pub const ALL: [Side; 3] = [Side::Stock, Side::Order, Side::Notifier];

    pub fn group(self) -> &'static str {
        match self {
            Side::Stock => "order-saga.stock",
            Side::Order => "order-saga.order",
            Side::Notifier => "order-saga.notifier",
        }
    }

    /// The single-instance role consuming for this side with the
    /// in-process bus (named like its checkpoint).
    pub fn role(self) -> String {
        format!("consumer.{}", self.group())
    }

    /// The aggregate types whose events its topics carry: an append of
    /// another type is nothing for it (in-process, the topics are the log).
    pub fn wakes_on(self) -> &'static [&'static str] {
        match self {
            Side::Stock | Side::Notifier => &["Order"],
            Side::Order => integration::SOURCES,
        }
    }

    pub fn topics(self) -> &'static [Topic] {
        match self {
            Side::Stock => &[Topic::OrderCreated, Topic::OrderCancelled, Topic::OrderPaid],
            Side::Order => &[
                Topic::OrderCreated,
                Topic::StockReserved,
                Topic::StockReservationFailed,
                Topic::OrderConfirmed,
                Topic::PaymentCompleted,
                Topic::PaymentFailed,
                Topic::StockConfirmed,
            ],
            Side::Notifier => &[
                Topic::OrderConfirmed,
                Topic::PaymentWaitStarted,
                Topic::OrderCancelled,
                Topic::OrderCompleted,
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
    /// A handler met a store fault; the pass is tried again.
    #[error("waiting out a store fault: {}", .0.code())]
    Fault(Fault),
}

/// How a handler failed: the store is down or full (waited out, for as
/// long as it lasts), worth a few more tries, or never going to work.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("{1}")]
    Fault(Fault, String),
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

impl HandlerError {
    /// A failure known only by its text: a fault if the text names one.
    pub(super) fn transient(message: String) -> Self {
        match Fault::in_text(&message) {
            Some(fault) => HandlerError::Fault(fault, message),
            None => HandlerError::Transient(message),
        }
    }
}

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> Self {
        match Fault::of(&e) {
            Some(fault) => HandlerError::Fault(fault, e.to_string()),
            None => HandlerError::Transient(e.to_string()),
        }
    }
}

fn store_failure<E: std::error::Error>(e: AggregateError<E>) -> HandlerError {
    match e {
        AggregateError::DeserializationError(e) => HandlerError::Permanent(e.to_string()),
        AggregateError::DatabaseConnectionError(e) => HandlerError::Fault(
            Fault::of(&*e).unwrap_or(Fault::StoreUnavailable),
            e.to_string(),
        ),
        AggregateError::UnexpectedError(e) => match Fault::of(&*e) {
            Some(fault) => HandlerError::Fault(fault, e.to_string()),
            None => HandlerError::Transient(e.to_string()),
        },
        other => HandlerError::transient(other.to_string()),
    }
}

/// What the saga runs with besides the store and the transport.
pub struct SagaOptions {
    pub clock: Arc<dyn Clock>,
    pub config: SagaConfig,
    pub notifier: Arc<dyn Notifier>,
    pub faults: Option<Arc<dyn FaultInjector>>,
    /// Which single-instance roles this process holds (all, unless elected).
    pub roles: Roles,
}

impl Default for SagaOptions {
    fn default() -> Self {
        SagaOptions {
            clock: Arc::new(SystemClock),
            config: SagaConfig::default(),
            notifier: Arc::new(LogNotifier),
            faults: None,
            roles: Roles::solo(),
        }
    }
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
    roles: Roles,
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
        for side in Side::ALL {
            let subscription = transport.subscribe(side.group(), side.topics()).await?;
            consumers.push(Consumer {
                side,
                role: side.role(),
                standby: AtomicBool::new(true),
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
            roles: options.roles,
            dead_letter_sink: transport.dead_letters(),
        }))
    }

    /// The deadlines and retries it runs with.
    pub fn config(&self) -> &SagaConfig {
        &self.config
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
                    Some(consumer) => saga.store.appends_of(consumer.side.wakes_on()),
                    None => saga.store.appends(),
                };
                let name = saga
                    .consumers
                    .get(index)
                    .map_or("timers", |consumer| consumer.side.group());
                // A pass that fails (the store or the broker down) is tried
                // again with backoff, for as long as it lasts.
                let mut backoff = Backoff::default();
                loop {
                    saga.heartbeat.beat();
                    appends.mark();
                    let pass = match saga.consumers.get(index) {
                        Some(consumer) => saga.run_consumer(consumer).await,
                        None => saga.run_timers().await,
                    };
                    let idle = match pass {
                        Ok(n) => {
                            if backoff.waited() {
                                backoff.reset();
                                fault::waiting(name, None);
                            }
                            n == 0
                        }
                        Err(e) => {
                            let wait = backoff.next_wait();
                            let fault = match &e {
                                SagaError::Store(e) => Fault::of(e),
                                SagaError::Fault(fault) => Some(*fault),
                                SagaError::Transport(_) => None,
                            };
                            fault::waiting(name, fault);
                            tracing::warn!(loop = name, error = %e, ?wait, "saga loop failed; retrying");
                            if pause(wait, &mut shutdown).await {
                                break;
                            }
                            continue;
                        }
                    };
                    // Consumers of the in-process transport wake on an
                    // append; a broker's consumer polled with a wait
                    // already (but pauses after a failure); the timers
                    // only poll.
                    let consumer = saga.consumers.get(index);
                    let stop = match idle {
                        false => false,
                        true if consumer.is_some_and(|c| c.waits) => false,
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
    pub async fn run_once_for(&self, sides: &[Side], timers: bool) -> Result<usize, SagaError> {
        let mut done = 0;
        for consumer in self.consumers.iter().filter(|c| sides.contains(&c.side)) {
            done += self.run_consumer(consumer).await?;
        }
        if timers {
            done += self.run_timers().await?;
        }
        Ok(done)
    }

    /// Runs passes until one finds nothing to do: everything delivered is
    /// handled and no timer is due on the saga's clock.
    pub async fn run_until_idle_for(&self, sides: &[Side], timers: bool) -> Result<(), SagaError> {
        for _ in 0..10_000 {
            if self.run_once_for(sides, timers).await? == 0 {
                return Ok(());
            }
        }
        Ok(())
    }

    pub async fn run_until_idle(&self) -> Result<(), SagaError> {
        self.run_until_idle_for(&Side::ALL, true).await
    }

    /// What each service does with each integration event. Public so tests
    /// can deliver events in any order.
    pub async fn handle(&self, side: Side, event: &IntegrationEvent) -> Result<(), HandlerError> {
        match (side, &event.body) {
            (Side::Stock, Body::OrderCreated { items, .. }) => {
                let items = items.iter().map(OrderLine::stock_item).collect();
                self.reserve_stock(event, items).await
            }
            (Side::Stock, Body::OrderCancelled { items, .. }) => {
                self.release_stock(event, items.clone()).await
            }
            (Side::Stock, Body::OrderPaid { payment_id, .. }) => {
                self.sell_stock(event, payment_id.clone()).await
            }
            (Side::Order, Body::OrderCreated { .. }) => self.start_deadlines(event).await,
            (Side::Order, Body::StockReserved { .. }) => {
                let cause = Cause::of(event);
                // Redelivered or replayed once the order moved on: the
                // confirmation is a no-op, and no deadline is set again.
                if self.order_status(&event.order_id).await? != Some(OrderStatus::OrderCreated) {
                    return self.try_confirm(&event.order_id, &cause, 0).await;
                }
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
                self.try_confirm(&event.order_id, &cause, 0).await
            }
            (Side::Order, Body::StockReservationFailed { .. }) => {
                self.store
                    .cancel_timers(TimerKind::StockReplyTimeout, &event.order_id)
                    .await?;
                let cause = Cause::of(event);
                self.cancel_order(&event.order_id, CancelReason::StockShortage, &cause)
                    .await
            }
            // The confirmation deadline is dropped with the other saga
            // timers once the payment wait is open (its own deadline takes
            // their place) or the order cancelled; until then it finds the
            // order confirmed and does nothing.
            (Side::Order, Body::OrderConfirmed { .. }) => {
                self.try_payment_wait(&event.order_id, &Cause::of(event), 0)
                    .await
            }
            (Side::Order, Body::PaymentCompleted { .. }) => self.complete_payment(event).await,
            (Side::Order, Body::PaymentFailed { .. }) => self.fail_payment(event).await,
            (Side::Order, Body::StockConfirmed { .. }) => self.complete_order(event).await,
            (Side::Notifier, _) => match Notification::for_event(event) {
                Some(notification) => self.notify(&notification, 0).await,
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }
}
/// The cause passed on to an effect: the id of the event (or timer) that
/// caused it, and the saga's correlation id.
struct Cause {
    causation: Uuid,
    correlation_id: Option<String>,
    /// The handling span's trace context, for the events it appends.
    traceparent: Option<String>,
}

impl Cause {
    fn of(event: &IntegrationEvent) -> Self {
        Cause {
            causation: event.event_id,
            correlation_id: event.correlation_id.clone(),
            traceparent: crate::telemetry::current_traceparent(),
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        let mut metadata = HashMap::from([(CAUSATION_ID.to_string(), self.causation.to_string())]);
        if let Some(correlation) = &self.correlation_id {
            metadata.insert(CORRELATION_ID.to_string(), correlation.clone());
        }
        if let Some(traceparent) = &self.traceparent {
            metadata.insert(
                crate::telemetry::TRACEPARENT.to_string(),
                traceparent.clone(),
            );
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
