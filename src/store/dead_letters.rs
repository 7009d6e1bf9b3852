//! Dead letters: messages a consumer could not handle after its retries,
//! kept with the error for an operator to look at, then redrive (hand back
//! to the consumer) or discard. A dead letter is never deleted: it keeps
//! its outcome.

use order_saga_projections::DeadLetterRecord;
use serde::Serialize;

use super::{Store, StoreError};

/// Where a dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeadLetterStatus {
    /// Waiting for an operator.
    Pending,
    /// Handed back to its consumer, which handled it.
    Redriven,
    /// Set aside by an operator.
    Discarded,
}

impl DeadLetterStatus {
    pub const ALL: [DeadLetterStatus; 3] = [
        DeadLetterStatus::Pending,
        DeadLetterStatus::Redriven,
        DeadLetterStatus::Discarded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterStatus::Pending => "PENDING",
            DeadLetterStatus::Redriven => "REDRIVEN",
            DeadLetterStatus::Discarded => "DISCARDED",
        }
    }
}

/// One dead letter, as stored.
pub type DeadLetter = DeadLetterRecord;

type DeadLetterRow = (
    i64,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
);

fn record(row: DeadLetterRow) -> DeadLetter {
    let (id, consumer, topic, event_id, error, payload, status, redrives, recorded, settled) = row;
    DeadLetterRecord {
        id,
        consumer,
        topic,
        event_id,
        error,
        payload,
        status,
        redrives,
        recorded_at_ms: recorded,
        settled_at_ms: settled,
    }
}

const COLUMNS: &str = "id, consumer, topic, event_id, error, payload, status, redrives, \
                       recorded_at_ms, settled_at_ms";

impl Store {
    /// Keeps a message its consumer gave up on, with the reason; `false`
    /// when the group had dead-lettered this event already (another
    /// instance gave up on it too).
    pub async fn record_dead_letter(
        &self,
        consumer: &str,
        topic: &str,
        event_id: Option<&str>,
        error: &str,
        payload: &str,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let inserted = on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO dead_letters \
                 (consumer, topic, event_id, error, payload, recorded_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (consumer, event_id) WHERE event_id IS NOT NULL DO NOTHING",
            )
            .bind(consumer)
            .bind(topic)
            .bind(event_id)
            .bind(error)
            .bind(payload)
            .bind(at_ms)
            .execute(pool)
            .await
            .map(|done| done.rows_affected() > 0)
        })?;
        Ok(inserted)
    }

    /// Dead letters, oldest first: all of them, or those in `status`.
    pub async fn dead_letters_in(
        &self,
        status: Option<DeadLetterStatus>,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM dead_letters WHERE $1 IS NULL OR status = $1 ORDER BY id"
        );
        let rows: Vec<DeadLetterRow> = on_read_pool!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(status.map(DeadLetterStatus::as_str))
                .fetch_all(pool)
                .await
        })?;
        Ok(rows.into_iter().map(record).collect())
    }

    /// Every dead letter, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead_letters_in(None).await
    }

    /// How many dead letters wait for an operator.
    pub async fn pending_dead_letters(&self) -> Result<i64, StoreError> {
        let n = on_read_pool!(self, |pool| {
            sqlx::query_scalar("SELECT COUNT(*) FROM dead_letters WHERE status = 'PENDING'")
                .fetch_one(pool)
                .await
        })?;
        Ok(n)
    }

    pub async fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1");
        let row: Option<DeadLetterRow> = on_pool!(self, |pool| {
            sqlx::query_as(&sql).bind(id).fetch_optional(pool).await
        })?;
        Ok(row.map(record))
    }

    /// Settles a pending dead letter as `status`; `false` if it was not
    /// pending (settled already, by another operator or instance).
    pub async fn settle_dead_letter(
        &self,
        id: i64,
        status: DeadLetterStatus,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let settled = on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE dead_letters SET status = $2, settled_at_ms = $3 \
                 WHERE id = $1 AND status = 'PENDING'",
            )
            .bind(id)
            .bind(status.as_str())
            .bind(at_ms)
            .execute(pool)
            .await
            .map(|done| done.rows_affected() > 0)
        })?;
        Ok(settled)
    }

    /// Discards pending dead letter `id`: the record after, or why not —
    /// `Err(None)`: no such dead letter; `Err(Some(status))`: not pending.
    pub async fn discard_dead_letter(
        &self,
        id: i64,
        at_ms: i64,
    ) -> Result<Result<DeadLetter, Option<String>>, StoreError> {
        let settled = self
            .settle_dead_letter(id, DeadLetterStatus::Discarded, at_ms)
            .await?;
        Ok(match self.dead_letter(id).await? {
            Some(dead) if settled => Ok(dead),
            Some(dead) => Err(Some(dead.status)),
            None => Err(None),
        })
    }

    /// A redrive of a pending dead letter failed with `error`: it stays
    /// pending, with that error.
    pub async fn redrive_failed(&self, id: i64, error: &str) -> Result<(), StoreError> {
        on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE dead_letters SET error = $2, redrives = redrives + 1 \
                 WHERE id = $1 AND status = 'PENDING'",
            )
            .bind(id)
            .bind(error)
            .execute(pool)
            .await
            .map(|_| ())
        })?;
        Ok(())
    }
}
