//! Durable timers: the saga's deadlines and scheduled retries, stored in the
//! `timers` table so they survive restarts and fire on whichever instance
//! claims them first.
//!
//! A timer is claimed with a lease (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so
//! instances never claim the same one) and deleted once its action is done;
//! if the claimer dies, the lease runs out and the timer fires again. Every
//! action is idempotent, so firing twice is harmless. Times come from the
//! saga's clock (`saga::clock`), never from the database.

use super::sql::{values_placeholders, Param};
use super::{Store, StoreError};
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimerKind {
    /// No stock reply within the timeout: cancel (STOCK_RESERVATION_TIMEOUT).
    StockReplyTimeout,
    /// Not confirmed in time after the stock reply: one last try, then
    /// cancel (CONFIRMATION_FAILED).
    ConfirmationDeadline,
    /// The whole saga took too long: cancel (SAGA_TIMEOUT).
    SagaTimeout,
    /// Try the confirmation again.
    ConfirmRetry,
    /// Try opening the payment wait again.
    PaymentWaitRetry,
    /// Try the customer notification again.
    NotifyRetry,
    /// No payment result within the payment wait: cancel (PAYMENT_TIMEOUT).
    PaymentTimeout,
}

impl TimerKind {
    pub const ALL: [TimerKind; 7] = [
        TimerKind::StockReplyTimeout,
        TimerKind::ConfirmationDeadline,
        TimerKind::SagaTimeout,
        TimerKind::ConfirmRetry,
        TimerKind::PaymentWaitRetry,
        TimerKind::NotifyRetry,
        TimerKind::PaymentTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TimerKind::StockReplyTimeout => "StockReplyTimeout",
            TimerKind::ConfirmationDeadline => "ConfirmationDeadline",
            TimerKind::SagaTimeout => "SagaTimeout",
            TimerKind::ConfirmRetry => "ConfirmRetry",
            TimerKind::PaymentWaitRetry => "PaymentWaitRetry",
            TimerKind::NotifyRetry => "NotifyRetry",
            TimerKind::PaymentTimeout => "PaymentTimeout",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        TimerKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timer {
    pub kind: TimerKind,
    /// What the timer is about: the order, or for notifications the event.
    pub subject: String,
    pub order_id: String,
    pub attempt: u32,
    pub due_at: DateTime<Utc>,
    /// The id the timer's action passes on as its cause (stable across
    /// re-fires, so the action's effect is applied once).
    pub causation_id: String,
    pub correlation_id: Option<String>,
    pub payload: Value,
}

impl Timer {
    /// One timer per kind, subject and attempt: scheduling it again is a
    /// no-op.
    pub fn id(&self) -> String {
        format!("{}:{}:{}", self.kind.as_str(), self.subject, self.attempt)
    }
}

const SCHEDULE_INTO: &str = "INSERT INTO timers (timer_id, kind, order_id, attempt, due_at_ms, \
     causation_id, correlation_id, payload) VALUES";

/// `rows` timers' VALUES rows and the conflict clause, parameters numbered
/// after the first `skip`.
fn schedule_values(rows: usize, skip: usize) -> String {
    format!(
        "{} ON CONFLICT (timer_id) DO NOTHING",
        values_placeholders(rows, 8, skip)
    )
}

pub(super) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// What a scheduling write drops before it stores its timers: the order's
/// pending timers of one kind, or every one of its creation saga's but one
/// kind (and its notification retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cancel {
    Kind(TimerKind),
    SagaBut(TimerKind),
}

/// One scheduling write: the timers to store (unless stored already), after
/// dropping the pending timers `cancel` names for its order. Durable, as
/// the schedule must be; on PostgreSQL a batched statement (`postgres.rs`).
#[derive(Debug)]
pub(super) struct TimerWrite {
    pub cancel: Option<(Cancel, String)>,
    pub timers: Vec<Timer>,
}

impl TimerWrite {
    /// The orders whose timers the write changes.
    pub(super) fn orders(&self) -> impl Iterator<Item = &str> {
        let cancelled = self.cancel.as_ref().map(|(_, order_id)| order_id.as_str());
        cancelled
            .into_iter()
            .chain(self.timers.iter().map(|t| t.order_id.as_str()))
    }
}

impl Store {
    /// Stores the timer unless one with its id exists.
    pub async fn schedule_timer(&self, timer: &Timer) -> Result<(), StoreError> {
        self.schedule_timers(std::slice::from_ref(timer)).await
    }

    /// [`Store::schedule_timer`] for several timers, in one statement.
    pub async fn schedule_timers(&self, timers: &[Timer]) -> Result<(), StoreError> {
        if timers.is_empty() {
            return Ok(());
        }
        self.write_timers(TimerWrite {
            cancel: None,
            timers: timers.to_vec(),
        })
        .await
    }

    /// Drops the order's pending timers of kind `cancel` and schedules
    /// `timer`, in one write.
    pub async fn cancel_and_schedule(
        &self,
        cancel: TimerKind,
        timer: &Timer,
    ) -> Result<(), StoreError> {
        self.write_timers(TimerWrite {
            cancel: Some((Cancel::Kind(cancel), timer.order_id.clone())),
            timers: vec![timer.clone()],
        })
        .await
    }

    /// Drops the order's pending timers of the creation saga (as
    /// [`Store::cancel_saga_timers`]) and schedules `timer`, the payment
    /// wait's deadline, in one write as [`Store::cancel_and_schedule`].
    pub async fn end_saga_and_schedule(&self, timer: &Timer) -> Result<(), StoreError> {
        self.write_timers(TimerWrite {
            cancel: Some((Cancel::SagaBut(timer.kind), timer.order_id.clone())),
            timers: vec![timer.clone()],
        })
        .await
    }

    /// Runs a scheduling write: on PostgreSQL in the next batched
    /// statement, with the writes of other orders that arrive together (one
    /// commit for all); on SQLite as its statements, in order, in one write
    /// of the group commit (their `$n` count over both).
    async fn write_timers(&self, write: TimerWrite) -> Result<(), StoreError> {
        match self {
            Store::Postgres(db) => Ok(db.schedule_timers(write).await??),
            Store::Sqlite(db) => {
                let params = scheduling_params(&write.timers, write.cancel.as_ref());
                let skip = if write.cancel.is_some() { 2 } else { 0 };
                let schedule = format!(
                    "{SCHEDULE_INTO} {}",
                    schedule_values(write.timers.len(), skip)
                );
                let statements = match write.cancel {
                    None => vec![schedule],
                    Some((Cancel::Kind(_), _)) => vec![
                        "DELETE FROM timers WHERE kind = $1 AND order_id = $2".to_string(),
                        schedule,
                    ],
                    // $1 is the kind kept besides notification retries.
                    Some((Cancel::SagaBut(_), _)) => vec![
                        format!(
                            "DELETE FROM timers WHERE order_id = $2 AND kind <> $1 AND kind <> '{}'",
                            TimerKind::NotifyRetry.as_str()
                        ),
                        schedule,
                    ],
                };
                let statements = statements
                    .into_iter()
                    .map(|sql| (sql, params.clone()))
                    .collect();
                Ok(db.execute(statements, false).await?)
            }
        }
    }

    /// Drops every pending timer of this kind for the order. A cancel lost
    /// in a database crash is harmless (store::RELAXED): every timer action
    /// first checks that it is still due.
    pub async fn cancel_timers(&self, kind: TimerKind, order_id: &str) -> Result<(), StoreError> {
        let sql = match self {
            Store::Postgres(_) => {
                "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) \
                 DELETE FROM timers USING relaxed WHERE kind = $1 AND order_id = $2"
            }
            Store::Sqlite(_) => "DELETE FROM timers WHERE kind = $1 AND order_id = $2",
        };
        write_statement!(self, sql, [kind.as_str(), order_id.to_string()])?;
        Ok(())
    }

    /// Drops every pending timer of the creation saga for the order: not
    /// its notification retries, nor its payment wait's deadline (a
    /// redelivered step must not drop it; it goes once a payment result
    /// ends the wait), as [`Store::cancel_timers`] does for one kind.
    pub async fn cancel_saga_timers(&self, order_id: &str) -> Result<(), StoreError> {
        let sql = match self {
            Store::Postgres(_) => {
                "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) \
                 DELETE FROM timers USING relaxed WHERE order_id = $1 AND kind <> $2 AND kind <> $3"
            }
            Store::Sqlite(_) => {
                "DELETE FROM timers WHERE order_id = $1 AND kind <> $2 AND kind <> $3"
            }
        };
        write_statement!(
            self,
            sql,
            [
                order_id.to_string(),
                TimerKind::NotifyRetry.as_str(),
                TimerKind::PaymentTimeout.as_str()
            ]
        )?;
        Ok(())
    }

    /// Claims up to `limit` timers due at `now`, leasing them until
    /// `lease_until`.
    pub async fn claim_due_timers(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Timer>, StoreError> {
        let sql = match self {
            Store::Postgres(_) => include_str!("sql/pg_claim_timers.sql"),
            Store::Sqlite(_) => include_str!("sql/sqlite_claim_timers.sql"),
        };
        let rows: Vec<TimerRow> = on_pool!(self, |pool| {
            sqlx::query_as(sql)
                .bind(millis(now))
                .bind(millis(lease_until))
                .bind(limit)
                .fetch_all(pool)
                .await
        })?;
        rows.into_iter().map(TimerRow::into_timer).collect()
    }

    /// Removes a timer whose action is done.
    pub async fn complete_timer(&self, timer: &Timer) -> Result<(), StoreError> {
        let sql = match self {
            Store::Postgres(_) => {
                "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) \
                 DELETE FROM timers USING relaxed WHERE timer_id = $1"
            }
            Store::Sqlite(_) => "DELETE FROM timers WHERE timer_id = $1",
        };
        write_statement!(self, sql, [timer.id()])?;
        Ok(())
    }

    /// How many timers are waiting (for the pending-timers metric and tests).
    pub async fn pending_timers(&self) -> Result<i64, StoreError> {
        Ok(self.timer_counts(i64::MIN).await?.0)
    }

    /// How many timers are pending, and how many of those fell due before
    /// `overdue_before_ms` (and have not fired: none of the instances got
    /// round to them).
    pub async fn timer_counts(&self, overdue_before_ms: i64) -> Result<(i64, i64), StoreError> {
        let counts = on_read_pool!(self, |pool| {
            sqlx::query_as("SELECT COUNT(*), COUNT(*) FILTER (WHERE due_at_ms < $1) FROM timers")
                .bind(overdue_before_ms)
                .fetch_one(pool)
                .await
        })?;
        Ok(counts)
    }
}

#[derive(sqlx::FromRow)]
struct TimerRow {
    timer_id: String,
    kind: String,
    order_id: String,
    attempt: i64,
    due_at_ms: i64,
    causation_id: String,
    correlation_id: Option<String>,
    payload: String,
}

impl TimerRow {
    fn into_timer(self) -> Result<Timer, StoreError> {
        let bad = |what: &str| StoreError::CorruptRow(format!("timer {}: {what}", self.timer_id));
        // The subject is the middle part of the id: kind:subject:attempt.
        let subject = self
            .timer_id
            .split_once(':')
            .and_then(|(_, rest)| rest.rsplit_once(':'))
            .map(|(subject, _)| subject.to_string())
            .ok_or_else(|| bad("malformed id"))?;
        Ok(Timer {
            kind: TimerKind::parse(&self.kind).ok_or_else(|| bad("unknown kind"))?,
            subject,
            attempt: u32::try_from(self.attempt).map_err(|_| bad("attempt out of range"))?,
            due_at: from_millis(self.due_at_ms),
            payload: serde_json::from_str(&self.payload).map_err(|e| bad(&e.to_string()))?,
            order_id: self.order_id,
            causation_id: self.causation_id,
            correlation_id: self.correlation_id,
        })
    }
}

/// The values of a SQLite scheduling write: the cancelled kind and order
/// (if any), then each timer's columns in `SCHEDULE_INTO`'s order. Owned,
/// so they can travel to SQLite's writer task.
fn scheduling_params(timers: &[Timer], cancel: Option<&(Cancel, String)>) -> Vec<Param> {
    let mut params = Vec::with_capacity(2 + timers.len() * 8);
    if let Some((Cancel::Kind(kind) | Cancel::SagaBut(kind), order_id)) = cancel {
        params.push(kind.as_str().into());
        params.push(order_id.clone().into());
    }
    for timer in timers {
        params.extend([
            timer.id().into(),
            timer.kind.as_str().into(),
            timer.order_id.clone().into(),
            i64::from(timer.attempt).into(),
            millis(timer.due_at).into(),
            timer.causation_id.clone().into(),
            timer.correlation_id.clone().into(),
            timer.payload.to_string().into(),
        ]);
    }
    params
}
