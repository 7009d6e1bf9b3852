//! The order side: starts the saga's deadlines, confirms the order once its
//! stock is reserved, opens the payment wait, and cancels it when stock is
//! short or a deadline passes — retrying a failed step on a timer.

use std::time::Duration;

use cqrs_es::AggregateError;
use order_saga_domain::{CancelReason, Order, OrderCommand, OrderError, OrderStatus};
use serde_json::json;
use uuid::Uuid;

use super::integration::IntegrationEvent;
use super::{store_failure, Cause, HandlerError, Saga, Step};
use crate::store::{Timer, TimerKind};

impl Saga {
    pub(super) async fn start_deadlines(
        &self,
        event: &IntegrationEvent,
    ) -> Result<(), HandlerError> {
        // A redelivered or replayed order.created of a saga that moved on
        // schedules nothing: its deadlines are done with.
        if self.order_status(&event.order_id).await? != Some(OrderStatus::OrderCreated) {
            return Ok(());
        }
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
    pub(super) fn timer(
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

    pub(super) async fn order_status(
        &self,
        order_id: &str,
    ) -> Result<Option<OrderStatus>, HandlerError> {
        let loaded = self
            .store
            .load::<Order>(order_id)
            .await
            .map_err(store_failure)?;
        Ok(loaded.and_then(|(order, _)| order.status))
    }

    /// Runs a command on the order; `Appended(false)` when it was a no-op
    /// (the same cause handled before).
    pub(super) async fn order_command(
        &self,
        order_id: &str,
        command: OrderCommand,
        cause: &Cause,
    ) -> Result<Result<Appended, OrderError>, HandlerError> {
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
            Ok(done) => Ok(Ok(Appended(!done.events.is_empty()))),
            Err(AggregateError::UserError(e)) => Ok(Err(e)),
            Err(e) => Err(store_failure(e)),
        }
    }

    pub(super) fn fault(&self, step: Step, order_id: &str) -> Result<(), String> {
        match &self.faults {
            Some(faults) => faults.check(step, order_id),
            None => Ok(()),
        }
    }

    /// Confirms the order, or schedules the next try, or — out of tries —
    /// cancels it (CONFIRMATION_FAILED).
    pub(super) async fn try_confirm(
        &self,
        order_id: &str,
        cause: &Cause,
        attempt: u32,
    ) -> Result<(), HandlerError> {
        self.try_step(Step::Confirm, order_id, cause, attempt).await
    }

    /// Opens the payment wait, or schedules the next try, or — out of tries
    /// — cancels the order (PAYMENT_WAIT_FAILED).
    pub(super) async fn try_payment_wait(
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
    pub(super) async fn try_step(
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
                Ok(Ok(Appended(appended))) => {
                    if step == Step::Confirm && appended {
                        metrics::counter!("order_saga_orders_confirmed_total").increment(1);
                    }
                    if step == Step::PaymentWait {
                        // The creation saga's timers give way to the payment
                        // wait's deadline, in one write; a redelivery (the
                        // first delivery may have crashed before it) writes
                        // it too, unless the order moved on. Counted once
                        // its timers are gone, by the delivery that appended
                        // the event only, so a redelivery or a replay changes
                        // no figure.
                        if appended
                            || self.order_status(order_id).await? == Some(OrderStatus::PaymentWait)
                        {
                            self.schedule_payment_deadline(order_id, cause).await?;
                        } else {
                            self.store.cancel_saga_timers(order_id).await?;
                        }
                        if appended {
                            metrics::counter!("order_saga_sagas_completed_total", "outcome" => "PAYMENT_WAIT")
                                .increment(1);
                        }
                    }
                    return Ok(());
                }
                Ok(Err(OrderError::InvalidTransition { .. })) => return Ok(()),
                Ok(Err(e)) => return Err(HandlerError::Permanent(e.to_string())),
                // Waited out, not a try of the step: an outage must not
                // use the step's tries up and cancel the order.
                Err(e @ HandlerError::Fault(..)) => return Err(e),
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
            self.cancel_order(order_id, exhausted, cause).await?;
            // The last try may have opened the wait after all (an error
            // after the write): then it needs its deadline.
            if step == Step::PaymentWait
                && self.order_status(order_id).await? == Some(OrderStatus::PaymentWait)
            {
                self.schedule_payment_deadline(order_id, cause).await?;
            }
            Ok(())
        }
    }

    /// The payment wait's deadline, in the write that drops the creation
    /// saga's timers.
    async fn schedule_payment_deadline(
        &self,
        order_id: &str,
        cause: &Cause,
    ) -> Result<(), HandlerError> {
        let deadline = self.timer(
            TimerKind::PaymentTimeout,
            order_id,
            0,
            self.config.payment_timeout,
            cause.causation,
            cause.correlation_id.clone(),
        );
        self.store.end_saga_and_schedule(&deadline).await?;
        Ok(())
    }

    /// The compensating transaction's first step: cancel the order (the
    /// stock side releases on order.cancelled). A no-op for an order that is
    /// already cancelled, or that `reason` does not apply to any more (a
    /// saga deadline once the payment wait is open, a failed payment once
    /// the order is paid).
    pub(super) async fn cancel_order(
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
            Ok(Appended(appended)) => {
                self.store.cancel_saga_timers(order_id).await?;
                if reason == CancelReason::PaymentFailed {
                    self.store
                        .cancel_timers(TimerKind::PaymentTimeout, order_id)
                        .await?;
                }
                if appended {
                    metrics::counter!("order_saga_compensations_total", "reason" => reason.as_str())
                        .increment(1);
                    // A failed payment ends the payment wait; the creation
                    // saga was counted when the wait opened.
                    match reason {
                        CancelReason::PaymentFailed => {
                            metrics::counter!("order_saga_payments_total", "outcome" => "FAILED")
                                .increment(1)
                        }
                        _ => metrics::counter!("order_saga_sagas_completed_total", "outcome" => "ORDER_CANCELLED").increment(1),
                    }
                }
                Ok(())
            }
            Err(OrderError::InvalidTransition { .. }) => Ok(()),
            Err(e) => Err(HandlerError::Permanent(e.to_string())),
        }
    }
}

/// Whether a command appended events (or found its effect already there).
pub(super) struct Appended(pub(super) bool);
