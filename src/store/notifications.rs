//! The record of every notification attempt (`notification_attempts`).
//! An attempt is claimed — its row written as `sending` — before it is
//! sent, so of all the instances and deliveries that handle the same event
//! exactly one sends each attempt; the outcome then completes the row. A
//! claim never completed (its claimer died while sending) may be taken
//! again after [`CLAIM_LEASE_MS`].

use super::{Store, StoreError};

/// How long a claim of a notification attempt holds without an outcome:
/// far longer than a webhook call may take (its timeout is 5 s).
pub const CLAIM_LEASE_MS: i64 = 60_000;

/// What claiming a notification attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This caller sends it now.
    Taken,
    /// Made already (or delivered, or a later attempt was made): nothing to do.
    Done,
    /// Another caller is sending it; its claim lapses at this clock time
    /// (millis) if it never completes.
    HeldUntil(i64),
}

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
    /// Records the outcome of one attempt at a notification, completing its
    /// claim; an attempt already completed stays as it is.
    pub async fn record_notification_attempt(&self, row: AttemptRow) -> Result<(), StoreError> {
        match self {
            // PostgreSQL records the attempts made together in one statement.
            Store::Postgres(db) => db.record_notification_attempt(row).await?,
            Store::Sqlite(db) => write_statement!(
                @sqlite db,
                "INSERT INTO notification_attempts \
                 (event_id, attempt, order_id, kind, outcome, error, attempted_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id, attempt) DO UPDATE \
                 SET outcome = excluded.outcome, error = excluded.error, \
                 attempted_at_ms = excluded.attempted_at_ms \
                 WHERE notification_attempts.outcome = 'sending'",
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

    /// Claims attempt `row.attempt` of the notification `row.event_id` at
    /// `row.attempted_at_ms` (clock millis) before it is sent; `row.outcome`
    /// is ignored. Taken unless the attempt was made or claimed already (a
    /// claim older than [`CLAIM_LEASE_MS`] without an outcome is taken over),
    /// or the notification was delivered.
    pub async fn claim_notification(&self, row: AttemptRow) -> Result<Claim, StoreError> {
        let (event_id, attempt) = (row.event_id.clone(), row.attempt);
        let taken = match self {
            Store::Postgres(db) => db.claim_notification(row).await?,
            Store::Sqlite(_) => on_pool!(self, |pool| {
                sqlx::query_scalar::<_, i64>(include_str!("sql/claim_notification.sql"))
                    .bind(row.event_id)
                    .bind(row.attempt)
                    .bind(row.order_id)
                    .bind(row.kind)
                    .bind(row.attempted_at_ms)
                    .bind(CLAIM_LEASE_MS)
                    .fetch_optional(pool)
                    .await
            })?
            .is_some(),
        };
        if taken {
            return Ok(Claim::Taken);
        }
        let held: Option<(String, i64)> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT outcome, attempted_at_ms FROM notification_attempts \
                 WHERE event_id = $1 AND attempt = $2",
            )
            .bind(&event_id)
            .bind(attempt)
            .fetch_optional(pool)
            .await
        })?;
        Ok(match held {
            Some((outcome, at_ms)) if outcome == "sending" => {
                Claim::HeldUntil(at_ms.saturating_add(CLAIM_LEASE_MS))
            }
            _ => Claim::Done,
        })
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
