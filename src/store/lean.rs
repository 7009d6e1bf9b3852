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

use super::group::GroupCommit;

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
