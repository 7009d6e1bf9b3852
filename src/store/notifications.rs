//! The record of every notification attempt (`notification_attempts`):
//! what the notifier checks before sending — a notification delivered once
//! is not sent again — and what its retries count.

use super::{Store, StoreError};

/// One notification attempt to record.
#[derive(Debug)]
pub struct AttemptRow {
    pub event_id: String,
    pub attempt: i64,
    pub order_id: String,
    pub kind: &'static str,
    pub outcome: &'static str,
    pub error: Option<String>,
    pub attempted_at_ms: i64,
}

/// One recorded attempt.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct NotificationAttempt {
    pub event_id: String,
    pub attempt: i64,
    pub order_id: String,
    pub kind: String,
    pub outcome: String,
    pub error: Option<String>,
}

impl Store {
    /// Records one attempt at a notification; an attempt already recorded
    /// stays as it is.
    pub async fn record_notification_attempt(&self, row: AttemptRow) -> Result<(), StoreError> {
        match self {
            // PostgreSQL records the attempts made together in one statement.
            Store::Postgres(db) => db.record_notification_attempt(row).await?,
            Store::Sqlite(db) => write_statement!(
                @sqlite db,
                "INSERT INTO notification_attempts \
                 (event_id, attempt, order_id, kind, outcome, error, attempted_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id, attempt) DO NOTHING",
                [
                    row.event_id,
                    row.attempt,
                    row.order_id,
                    row.kind,
                    row.outcome,
                    row.error,
                    row.attempted_at_ms,
                ]
            )?,
        }
        Ok(())
    }

    /// Every attempt for an order, oldest first.
    pub async fn notification_attempts(
        &self,
        order_id: &str,
    ) -> Result<Vec<NotificationAttempt>, StoreError> {
        let rows = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT event_id, attempt, order_id, kind, outcome, error \
                 FROM notification_attempts WHERE order_id = $1 \
                 ORDER BY attempted_at_ms, attempt, kind",
            )
            .bind(order_id)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// Attempts made so far for one event's notification, and whether one
    /// of them delivered it.
    pub async fn notification_progress(&self, event_id: &str) -> Result<(u32, bool), StoreError> {
        let (attempts, delivered) = match self {
            Store::Postgres(db) => db.notification_progress(event_id).await?,
            Store::Sqlite(db) => db.notification_progress(
                "SELECT COUNT(*), \
                 COALESCE(SUM(CASE WHEN outcome = 'delivered' THEN 1 ELSE 0 END), 0) \
                 FROM notification_attempts WHERE event_id = $1",
                event_id,
            )?,
        };
        Ok((u32::try_from(attempts).unwrap_or(u32::MAX), delivered > 0))
    }
}
