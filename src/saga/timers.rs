//! Firing the saga's durable timers (kept by `store::timers`): deadlines
//! that cancel an order, and scheduled retries of a step or a notification.
//! Times come from the saga's clock.

use order_saga_domain::{CancelReason, OrderStatus};
use uuid::Uuid;

use super::notifier::Notification;
use super::{Cause, HandlerError, Saga, SagaError};
use crate::store::{Timer, TimerKind};

impl Saga {
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
                // Left leased, like the rest of the pass: the loop backs
                // off and claims again.
                Err(HandlerError::Fault(fault, error)) => {
                    tracing::warn!(timer = %timer.id(), fault = fault.code(), %error, "timer action met a store fault; will retry");
                    return Err(SagaError::Fault(fault));
                }
            }
        }
        Ok(due.len())
    }

    pub(super) async fn fire(&self, timer: &Timer) -> Result<(), HandlerError> {
        let cause = Cause {
            causation: Uuid::parse_str(&timer.causation_id)
                .map_err(|e| HandlerError::Permanent(format!("timer cause: {e}")))?,
            correlation_id: timer.correlation_id.clone(),
            traceparent: crate::telemetry::current_traceparent(),
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
            TimerKind::PaymentTimeout => {
                if self.order_status(order_id).await? == Some(OrderStatus::PaymentWait) {
                    self.expire_payment_wait(&cause, order_id).await?;
                }
                Ok(())
            }
            TimerKind::NotifyRetry => {
                let notification: Notification = serde_json::from_value(timer.payload.clone())
                    .map_err(|e| HandlerError::Permanent(format!("notification timer: {e}")))?;
                self.notify(&notification, timer.attempt).await
            }
        }
    }
}
