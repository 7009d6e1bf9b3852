//! Payment results (SPEC §2's "next saga, payment"): how they reach the
//! order side, and what it does with them.
//!
//! With Kafka they arrive on the payment service's topics. With the
//! in-process bus they are appended to the log as events of the `Payment`
//! stream of the order ([`PaymentInbox`]), which is what `order-saga payment
//! simulate` does; either way the order side reads the same integration
//! events.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, AggregateError, DomainEvent};
use order_saga_domain::{
    CancelReason, FieldError, Money, Order, OrderCommand, OrderError, PaymentMethod,
    PaymentRejection,
};
use serde::{Deserialize, Serialize};

use super::avro::Contract;
use super::integration::{Body, IntegrationEvent, PAYMENT_INBOX};
use super::kafka::KafkaConfig;
use super::{store_failure, Cause, HandlerError, Saga};
use crate::store::{Store, TimerKind};

/// A payment result as stored in the in-process log: the integration
/// event's body as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PaymentResult(pub Body);

impl DomainEvent for PaymentResult {
    fn event_type(&self) -> String {
        match self.0 {
            Body::PaymentCompleted { .. } => "PaymentCompleted",
            _ => "PaymentFailed",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// The stream of payment results of one order (id = orderId), for the
/// in-process bus: every result is appended as it comes; the order side
/// tells repeats apart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PaymentInbox;

impl Aggregate for PaymentInbox {
    const TYPE: &'static str = PAYMENT_INBOX;
    type Command = PaymentResult;
    type Event = PaymentResult;
    type Error = FieldError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command.0.topic().is_inbound() {
            true => sink.write(command, self).await,
            false => {
                return Err(FieldError::new(
                    "result",
                    format!("{} is not a payment result", command.0.topic()),
                ))
            }
        }
        Ok(())
    }

    fn apply(&mut self, _event: Self::Event) {}
}

/// A payment result made up for development (`order-saga payment
/// simulate`).
#[derive(Debug, Clone)]
pub struct SimulatedPayment {
    pub order_id: String,
    pub completed: bool,
    pub method: PaymentMethod,
    /// `None`: the order's total.
    pub amount: Option<Money>,
    pub failure_reason: String,
    /// `None`: a new payment id.
    pub payment_id: Option<String>,
}

/// Sends a payment result for an existing order, as the payment service
/// would: to its topic with Kafka, else into the store's log (the
/// `Payment` stream of the order). Returns what was sent.
pub async fn simulate(
    store: &Store,
    kafka: Option<&KafkaConfig>,
    payment: SimulatedPayment,
) -> Result<Body, String> {
    let order = store
        .load::<Order>(&payment.order_id)
        .await
        .map_err(|e| format!("loading the order: {e}"))?
        .map(|(order, _)| order)
        .filter(|order| order.status.is_some())
        .ok_or_else(|| format!("orderId: unknown order '{}'", payment.order_id))?;
    let now = chrono::Utc::now();
    let payment_id = payment
        .payment_id
        .unwrap_or_else(|| format!("pay-{}", uuid::Uuid::new_v4()));
    let body = match payment.completed {
        true => Body::PaymentCompleted {
            payment_id,
            user_id: order.user_id.clone(),
            total_amount: payment.amount.unwrap_or(order.total_amount),
            payment_method: payment.method,
            pg_approval_number: format!("SIM-{}", now.timestamp_millis()),
            completed_at: now,
        },
        false => Body::PaymentFailed {
            payment_id,
            user_id: order.user_id.clone(),
            failure_reason: payment.failure_reason,
            failed_at: now,
        },
    };
    let event = IntegrationEvent {
        event_id: uuid::Uuid::new_v4(),
        order_id: payment.order_id.clone(),
        occurred_at: now,
        correlation_id: None,
        causation_id: None,
        traceparent: crate::telemetry::current_traceparent(),
        body: body.clone(),
    };
    match kafka {
        Some(config) => {
            let contract = Contract::load()?;
            super::kafka::publish_one(config, &contract, &event)
                .await
                .map_err(|e| e.to_string())?;
            Ok(body)
        }
        None => {
            let done = store
                .execute_retrying::<PaymentInbox>(
                    &payment.order_id,
                    PaymentResult(body.clone()),
                    &(),
                    std::collections::HashMap::new(),
                    20,
                )
                .await
                .map_err(|e| format!("storing the payment result: {e}"))?;
            if done.events.is_empty() {
                return Err("the payment result was not stored".into());
            }
            Ok(body)
        }
    }
}

impl Saga {
    /// `payment.completed`: the order records the payment or its rejection.
    /// A rejection tells the payment side to refund (`stock.confirmation.failed`,
    /// from the stored rejection); one for a wrong amount is also a dead
    /// letter, as is a payment for an order that does not exist.
    pub(super) async fn complete_payment(
        &self,
        event: &IntegrationEvent,
    ) -> Result<(), HandlerError> {
        let Body::PaymentCompleted {
            payment_id,
            total_amount,
            payment_method,
            ..
        } = &event.body
        else {
            return Ok(());
        };
        let cause = Cause::of(event);
        let command = OrderCommand::CompletePayment {
            payment_id: payment_id.clone(),
            amount: *total_amount,
            method: *payment_method,
            causation_id: Some(cause.causation),
        };
        let done = match self
            .store
            .execute_retrying::<Order>(
                &event.order_id,
                command,
                &self.order_services,
                cause.metadata(),
                20,
            )
            .await
        {
            Ok(done) => done,
            Err(AggregateError::UserError(OrderError::NotFound)) => {
                return Err(HandlerError::Permanent(format!(
                    "payment {payment_id} is for order {}, which does not exist",
                    event.order_id
                )))
            }
            Err(AggregateError::UserError(e)) => {
                return Err(HandlerError::Permanent(e.to_string()))
            }
            Err(e) => return Err(store_failure(e)),
        };
        if done.aggregate.payment_id.as_deref() == Some(payment_id.as_str()) {
            self.store
                .cancel_timers(TimerKind::PaymentTimeout, &event.order_id)
                .await?;
        }
        let rejection = done.aggregate.rejection_of(payment_id);
        if !done.events.is_empty() {
            let outcome = match rejection {
                Some(_) => "REJECTED",
                None => "PAID",
            };
            metrics::counter!("order_saga_payments_total", "outcome" => outcome).increment(1);
        }
        match rejection {
            Some((PaymentRejection::AmountMismatch, reason)) => Err(HandlerError::Permanent(
                format!("payment {payment_id}: {reason}"),
            )),
            _ => Ok(()),
        }
    }

    /// `payment.failed`: the waiting order is cancelled (PAYMENT_FAILED);
    /// for an order that moved on it is nothing.
    /// An unknown order is dead-lettered (the cancellation's refusal).
    pub(super) async fn fail_payment(&self, event: &IntegrationEvent) -> Result<(), HandlerError> {
        self.cancel_order(
            &event.order_id,
            CancelReason::PaymentFailed,
            &Cause::of(event),
        )
        .await
    }

    /// `stock.confirmed`: the paid order is complete.
    pub(super) async fn complete_order(
        &self,
        event: &IntegrationEvent,
    ) -> Result<(), HandlerError> {
        let command = OrderCommand::CompleteOrder {
            causation_id: Some(event.event_id),
        };
        match self
            .order_command(&event.order_id, command, &Cause::of(event))
            .await?
        {
            Ok(appended) => {
                if appended.0 {
                    metrics::counter!("order_saga_payments_total", "outcome" => "COMPLETED")
                        .increment(1);
                }
                Ok(())
            }
            Err(OrderError::InvalidTransition { .. }) => Ok(()),
            Err(e) => Err(HandlerError::Permanent(e.to_string())),
        }
    }

    /// The payment wait ran out: cancel (PAYMENT_TIMEOUT), which publishes
    /// `order.expiration-notification` and `order.cancelled`.
    pub(super) async fn expire_payment_wait(
        &self,
        cause: &Cause,
        order_id: &str,
    ) -> Result<(), HandlerError> {
        let minutes = self.config.payment_timeout.as_secs().div_ceil(60);
        let command = OrderCommand::ExpirePaymentWait {
            expiration_reason: format!("payment time exceeded ({minutes} min)"),
            causation_id: Some(cause.causation),
        };
        match self.order_command(order_id, command, cause).await? {
            Ok(appended) => {
                if appended.0 {
                    metrics::counter!("order_saga_payments_total", "outcome" => "EXPIRED")
                        .increment(1);
                    metrics::counter!("order_saga_compensations_total", "reason" => CancelReason::PaymentTimeout.as_str())
                        .increment(1);
                }
                Ok(())
            }
            Err(OrderError::InvalidTransition { .. }) => Ok(()),
            Err(e) => Err(HandlerError::Permanent(e.to_string())),
        }
    }
}
