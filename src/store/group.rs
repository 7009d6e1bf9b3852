//! Group commit for the embedded store's event appends: appends waiting for
//! the single SQLite writer go into one transaction, so they share one
//! commit (a commit writes every page it touched to the WAL; the inserts
//! inside one cost a fraction of it). Each append is one INSERT statement;
//! one that fails on a taken sequence rolls back alone (SQLite undoes the
//! failed statement, the transaction goes on), so the others still commit.
//! Any other failure rolls the whole group back, and every append in it
//! fails (its caller tries again, as after a lost connection).

use cqrs_es::persist::{PersistenceError, SerializedEvent};
use sqlx::sqlite::SqlitePool;
use tokio::sync::{mpsc, oneshot};

use super::lean::{bind_rows, insert_sql, persistence_error};

/// Appends taken into one transaction at most.
const MAX_GROUP: usize = 256;

struct Append {
    aggregate_type: &'static str,
    events: Vec<SerializedEvent>,
    done: oneshot::Sender<Result<(), PersistenceError>>,
}

/// The appends' queue to the writer task. Cheap to clone.
#[derive(Clone, Debug)]
pub(super) struct GroupCommit {
    queue: mpsc::UnboundedSender<Append>,
}

impl GroupCommit {
    /// Starts the writer task on `pool` (the one writing connection).
    pub(super) fn start(pool: SqlitePool) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(write_groups(pool, waiting));
        GroupCommit { queue }
    }

    /// Stores the events, once their group has committed.
    pub(super) async fn append(
        &self,
        aggregate_type: &'static str,
        events: Vec<SerializedEvent>,
    ) -> Result<(), PersistenceError> {
        let (done, result) = oneshot::channel();
        let append = Append {
            aggregate_type,
            events,
            done,
        };
        if self.queue.send(append).is_err() {
            return Err(stopped());
        }
        result.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> PersistenceError {
    PersistenceError::ConnectionError("the store's writer has stopped".into())
}

fn group_failed(why: &str) -> PersistenceError {
    PersistenceError::ConnectionError(format!("the append's group did not commit: {why}").into())
}

async fn write_groups(pool: SqlitePool, mut waiting: mpsc::UnboundedReceiver<Append>) {
    while let Some(first) = waiting.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match waiting.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let results = write_group(&pool, &group).await;
        for (append, result) in group.into_iter().zip(results) {
            // The caller may have gone (a dropped request): nothing to tell.
            let _ = append.done.send(result);
        }
    }
}

/// One transaction for the whole group; a result per append, in order.
/// An append alone is one statement in autocommit (atomic by itself).
async fn write_group(pool: &SqlitePool, group: &[Append]) -> Vec<Result<(), PersistenceError>> {
    if let [append] = group {
        return vec![insert(append, pool).await.map_err(persistence_error)];
    }
    let fail_all = |why: String| group.iter().map(|_| Err(group_failed(&why))).collect();
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return fail_all(e.to_string()),
    };
    let mut results = Vec::with_capacity(group.len());
    for append in group {
        match insert(append, &mut *tx).await {
            Ok(_) => results.push(Ok(())),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                results.push(Err(PersistenceError::OptimisticLockError))
            }
            Err(e) => {
                let why = e.to_string();
                let _ = tx.rollback().await;
                tracing::warn!(error = %why, appends = group.len(), "group append failed");
                return fail_all(why);
            }
        }
    }
    match tx.commit().await {
        Ok(()) => results,
        Err(e) => fail_all(persistence_error(e).to_string()),
    }
}

/// The append's one INSERT.
async fn insert<'e>(
    append: &Append,
    on: impl sqlx::Executor<'e, Database = sqlx::Sqlite>,
) -> Result<(), sqlx::Error> {
    let sql = insert_sql(append.events.len());
    bind_rows(&sql, append.aggregate_type, &append.events)
        .execute(on)
        .await
        .map(|_| ())
}
