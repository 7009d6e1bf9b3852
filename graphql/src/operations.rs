//! The operator's types: dead letters and what a redrive did, and sagas
//! that have not ended in time.

use async_graphql::{Enum, Object, SimpleObject, ID};
use order_saga_projections::{DeadLetterRecord, StuckSagaRecord};

use crate::rfc3339;

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub(crate) enum DeadLetterStatus {
    /// Waiting for an operator.
    Pending,
    /// Handed back to its consumer, which handled it.
    Redriven,
    /// Set aside by an operator.
    Discarded,
}

impl DeadLetterStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DeadLetterStatus::Pending => "PENDING",
            DeadLetterStatus::Redriven => "REDRIVEN",
            DeadLetterStatus::Discarded => "DISCARDED",
        }
    }
}

/// A message a consumer gave up on after its retries.
pub(crate) struct DeadLetter(pub(crate) DeadLetterRecord);

#[Object]
impl DeadLetter {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    /// The consumer group that gave up on it.
    async fn consumer(&self) -> &str {
        &self.0.consumer
    }
    async fn topic(&self) -> &str {
        &self.0.topic
    }
    async fn event_id(&self) -> Option<&str> {
        self.0.event_id.as_deref()
    }
    /// Why it was given up on (the last redrive's error, after one failed).
    async fn error(&self) -> &str {
        &self.0.error
    }
    /// The message: the integration event as JSON, or its bytes as text
    /// when they did not decode.
    async fn payload(&self) -> &str {
        &self.0.payload
    }
    /// PENDING, REDRIVEN or DISCARDED.
    async fn status(&self) -> &str {
        &self.0.status
    }
    /// Redrives that failed.
    async fn redrives(&self) -> i64 {
        self.0.redrives
    }
    async fn recorded_at(&self) -> Option<String> {
        self.0.recorded_at_ms.map(rfc3339)
    }
    /// When it was redriven or discarded.
    async fn settled_at(&self) -> Option<String> {
        self.0.settled_at_ms.map(rfc3339)
    }
}

/// What a redrive did.
#[derive(SimpleObject)]
pub(crate) struct Redrive {
    /// HANDLED (now REDRIVEN), FAILED (still PENDING, with `error`) or
    /// NOT_PENDING (redriven or discarded already; nothing done).
    pub(crate) outcome: String,
    pub(crate) error: Option<String>,
    pub(crate) dead_letter: DeadLetter,
}

/// An order whose saga has not ended in time.
pub(crate) struct StuckSaga(pub(crate) StuckSagaRecord);

#[Object]
impl StuckSaga {
    async fn order_id(&self) -> ID {
        ID(self.0.order_id.clone())
    }
    async fn status(&self) -> &str {
        &self.0.status
    }
    async fn created_at(&self) -> String {
        rfc3339(self.0.created_at_ms)
    }
    /// The last event recorded for the order (its own or its stock
    /// reservation's).
    async fn last_step(&self) -> Option<&str> {
        self.0.last_step.as_deref()
    }
    async fn last_step_at(&self) -> Option<String> {
        self.0.last_step_at_ms.map(rfc3339)
    }
    /// Seconds since the last step.
    async fn last_step_age_seconds(&self) -> Option<i64> {
        let now = chrono::Utc::now().timestamp_millis();
        self.0.last_step_at_ms.map(|at| ((now - at) / 1000).max(0))
    }
}
