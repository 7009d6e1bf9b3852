//! The operator's side of the dead letters: a redrive hands a pending dead
//! letter back to the consumer that gave up on it — the same handler, so
//! the same idempotent effects — and records how it went: REDRIVEN once
//! handled; still PENDING, with the new error, if it fails again. A store
//! fault records nothing (the operator tries again once it is over).

use serde::Serialize;

use super::integration::IntegrationEvent;
use super::{HandlerError, Saga, SagaError, Side};
use crate::store::{DeadLetter, DeadLetterStatus};

/// How a redrive went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Redrive {
    /// The consumer handled it: the dead letter is REDRIVEN.
    Handled,
    /// It failed again: the dead letter stays PENDING with this error.
    Failed { error: String },
    /// It was not pending (REDRIVEN or DISCARDED already): nothing done.
    NotPending { status: String },
}

impl Saga {
    /// Redrives dead letter `id`; `None` if there is none by that id.
    pub async fn redrive(&self, id: i64) -> Result<Option<Redrive>, SagaError> {
        let Some(dead) = self.store.dead_letter(id).await? else {
            return Ok(None);
        };
        if dead.status != DeadLetterStatus::Pending.as_str() {
            return Ok(Some(Redrive::NotPending {
                status: dead.status,
            }));
        }
        let result = match Self::message(&dead) {
            Ok((side, event)) => self.handle(side, &event).await,
            Err(error) => Err(HandlerError::Permanent(error)),
        };
        let outcome = match result {
            Ok(()) => {
                let now = self.clock.now().timestamp_millis();
                self.store
                    .settle_dead_letter(id, DeadLetterStatus::Redriven, now)
                    .await?;
                Redrive::Handled
            }
            Err(HandlerError::Fault(fault, _)) => return Err(SagaError::Fault(fault)),
            Err(HandlerError::Transient(error) | HandlerError::Permanent(error)) => {
                self.store.redrive_failed(id, &error).await?;
                Redrive::Failed { error }
            }
        };
        let label = match outcome {
            Redrive::Handled => "handled",
            _ => "failed",
        };
        metrics::counter!("order_saga_redrives_total", "outcome" => label).increment(1);
        tracing::info!(id, consumer = %dead.consumer, ?outcome, "dead letter redriven");
        Ok(Some(outcome))
    }

    /// The consumer and the event a dead letter holds.
    fn message(dead: &DeadLetter) -> Result<(Side, IntegrationEvent), String> {
        let side = Side::ALL
            .into_iter()
            .find(|side| side.group() == dead.consumer)
            .ok_or_else(|| format!("no consumer group {} in this version", dead.consumer))?;
        let event = serde_json::from_str(&dead.payload).map_err(|e| {
            format!(
                "the message never decoded ({e}); its bytes are kept on the broker's \
                 dead-letter topic {}.dlq for the producer to send again",
                dead.topic
            )
        })?;
        Ok((side, event))
    }
}
