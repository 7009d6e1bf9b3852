//! The event repositories of postgres-es and sqlite-es with a cheaper
//! append. Both libraries write an append as BEGIN, one INSERT per event,
//! COMMIT; an append without a snapshot is here one multi-row INSERT in
//! autocommit instead: one statement is atomic on both databases, so the
//! events are stored together or not at all, with the same optimistic check
//! (the `(aggregate_type, aggregate_id, sequence)` key) — one round trip
//! instead of three; and the appends arriving together share one INSERT
//! and commit (on PostgreSQL through `batch.rs`, on SQLite inside the group
//! commit of `group.rs`).
//! Appends that write a snapshot, and every read, go to the library's
//! repository unchanged.

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlite_es::SqliteEventRepository;
use sqlx::postgres::PgPool;
use std::sync::Arc;

use super::postgres::{Append, Batched};
use sqlx::sqlite::SqlitePool;
use uuid::Uuid;

use super::group::GroupCommit;

const INSERT_EVENTS: &str = "INSERT INTO events \
     (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, \
     event_id) VALUES ";

/// Columns bound per event by `bind_events`.
pub(super) const COLUMNS: usize = 8;

/// A library repository plus the pool its plain appends go to.
pub(super) struct Lean<R> {
    inner: R,
    pool: Pool,
}

enum Pool {
    Pg(Arc<Batched>),
    Lite(GroupCommit),
}

impl Lean<PostgresEventRepository> {
    pub(super) fn postgres(pool: &PgPool, batched: &Arc<Batched>) -> Self {
        Lean {
            inner: PostgresEventRepository::new(pool.clone()),
            pool: Pool::Pg(batched.clone()),
        }
    }
}

impl Lean<SqliteEventRepository> {
    pub(super) fn sqlite(pool: &SqlitePool, commits: &GroupCommit) -> Self {
        Lean {
            inner: SqliteEventRepository::new(pool.clone()),
            pool: Pool::Lite(commits.clone()),
        }
    }
}

/// `INSERT … VALUES ($1, …, $8), ($9, …)` for `rows` events; `uuid_cast`
/// follows the event id's placeholder (`::uuid` on PostgreSQL, whose column
/// is a uuid; nothing on SQLite, where it is text).
pub(super) fn insert_sql(rows: usize, uuid_cast: &str) -> String {
    let mut sql = String::from(INSERT_EVENTS);
    for row in 0..rows {
        let p = row * COLUMNS;
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 1..COLUMNS {
            sql.push_str(&format!("${}, ", p + column));
        }
        sql.push_str(&format!("${}{uuid_cast})", p + COLUMNS));
    }
    sql
}

/// Adds the events' rows to `query`'s arguments, in `insert_sql`'s order
/// (PostgreSQL; the embedded group commit binds the same values through
/// rusqlite, `group.rs`). Each event gets a new time-ordered (version 7) id: the `events_event_id`
/// index (and the notification records keyed by event id) then grow at
/// their end, where a random id lands on any page of an index that keeps
/// growing — more pages read and written per commit the longer the store
/// runs.
pub(super) fn bind_events<'q, DB>(
    query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    aggregate_type: &'static str,
    events: &'q [SerializedEvent],
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i32: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q Value: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    events.iter().fold(query, |query, event| {
        query
            .bind(aggregate_type)
            .bind(event.aggregate_id.as_str())
            .bind(event.sequence as i32)
            .bind(event.event_type.as_str())
            .bind(event.event_version.as_str())
            .bind(&event.payload)
            .bind(&event.metadata)
            .bind(Uuid::now_v7().to_string())
    })
}

/// The libraries' mapping: a taken sequence is the optimistic-lock failure
/// (another writer appended first).
fn persistence_error(e: sqlx::Error) -> PersistenceError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            PersistenceError::OptimisticLockError
        }
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => PersistenceError::ConnectionError(Box::new(e)),
        _ => PersistenceError::UnknownError(Box::new(e)),
    }
}

impl<R: PersistedEventRepository> PersistedEventRepository for Lean<R> {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.inner.get_events::<A>(aggregate_id).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.inner
            .get_last_events::<A>(aggregate_id, last_sequence)
            .await
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        self.inner.get_snapshot::<A>(aggregate_id).await
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        if snapshot_update.is_some() || events.is_empty() {
            return self.inner.persist::<A>(events, snapshot_update).await;
        }
        match &self.pool {
            Pool::Pg(batched) => batched
                .appends
                .run(Append {
                    aggregate_type: A::TYPE,
                    events: events.to_vec(),
                })
                .await
                .map_err(|e| PersistenceError::ConnectionError(Box::new(e)))?
                .map_err(persistence_error),
            Pool::Lite(commits) => commits
                .append(A::TYPE, events.to_vec())
                .await
                .map_err(persistence_error),
        }
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        self.inner.stream_events::<A>(aggregate_id).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        self.inner.stream_all_events::<A>().await
    }
}

#[cfg(test)]
mod tests {
    use super::insert_sql;

    #[test]
    fn one_placeholder_per_column_and_row() {
        assert_eq!(
            insert_sql(2, "::uuid"),
            format!(
                "{}($1, $2, $3, $4, $5, $6, $7, $8::uuid), \
                 ($9, $10, $11, $12, $13, $14, $15, $16::uuid)",
                super::INSERT_EVENTS
            )
        );
    }
}
