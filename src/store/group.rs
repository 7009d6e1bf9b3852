//! Group commit for the embedded store's writes: event appends and the
//! single-statement writes of the saga's bookkeeping (timers, consumer
//! checkpoints, notification records) waiting for the single SQLite writer
//! go into one transaction, so they share one commit (a commit writes every
//! page it touched to the WAL; the statements inside one cost a fraction of
//! it). Each write is one statement; one that breaks a constraint — an
//! append's taken sequence — rolls back alone (SQLite undoes the failed
//! statement, the transaction goes on), so the others still commit. Any
//! other failure rolls the whole group back, and every write in it fails
//! (its caller tries again, as after a lost connection). A write is answered
//! after its group's COMMIT. A write alone is one statement in autocommit.
//! A group's appends share one INSERT; if one of them finds its sequence
//! taken, SQLite undoes that statement and each append runs again alone.
//!
//! Writes that are several statements (the read models' batches) take the
//! pool's connection themselves, between groups.

use cqrs_es::persist::SerializedEvent;
use sqlx::error::ErrorKind;
use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::lean::{bind_events, insert_sql, COLUMNS};

/// Writes taken into one transaction at most.
const MAX_GROUP: usize = 256;

/// SQLite's limit on a statement's parameters (SQLITE_MAX_VARIABLE_NUMBER):
/// appends with more rows than fit are not shared in one INSERT.
const MAX_PARAMETERS: usize = 32_766;

/// One statement for the writer.
enum Statement {
    /// The events of one append, as one multi-row INSERT.
    Append {
        aggregate_type: &'static str,
        events: Vec<SerializedEvent>,
    },
    /// Any other write, with its arguments bound.
    Write {
        sql: String,
        arguments: SqliteArguments<'static>,
    },
}

struct Write {
    statement: Statement,
    done: oneshot::Sender<Result<(), sqlx::Error>>,
}

/// The writes' queue to the writer task. Cheap to clone.
#[derive(Clone, Debug)]
pub(super) struct GroupCommit {
    queue: mpsc::UnboundedSender<Write>,
}

impl GroupCommit {
    /// Starts the writer task on `pool` (the one writing connection).
    pub(super) fn start(pool: SqlitePool) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(write_groups(pool, waiting));
        GroupCommit { queue }
    }

    /// Stores the events, once their group has committed. A taken sequence
    /// is the statement's unique violation.
    pub(super) async fn append(
        &self,
        aggregate_type: &'static str,
        events: Vec<SerializedEvent>,
    ) -> Result<(), sqlx::Error> {
        self.send(Statement::Append {
            aggregate_type,
            events,
        })
        .await
    }

    /// Runs one write statement, answered once its group has committed.
    pub(super) async fn execute(
        &self,
        sql: String,
        arguments: SqliteArguments<'static>,
    ) -> Result<(), sqlx::Error> {
        self.send(Statement::Write { sql, arguments }).await
    }

    async fn send(&self, statement: Statement) -> Result<(), sqlx::Error> {
        let (done, result) = oneshot::channel();
        if self.queue.send(Write { statement, done }).is_err() {
            return Err(stopped());
        }
        result.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::other("the store's writer has stopped"))
}

fn group_failed(why: &str) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::other(format!(
        "the write's group did not commit: {why}"
    )))
}

async fn write_groups(pool: SqlitePool, mut waiting: mpsc::UnboundedReceiver<Write>) {
    while let Some(first) = waiting.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match waiting.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let (statements, answers): (Vec<_>, Vec<_>) =
            group.into_iter().map(|w| (w.statement, w.done)).unzip();
        let results = write_group(&pool, statements).await;
        for (done, result) in answers.into_iter().zip(results) {
            // The caller may have gone (a dropped request): nothing to tell.
            let _ = done.send(result);
        }
    }
}

/// One transaction for the whole group; a result per write, in order.
/// A write alone is one statement in autocommit (atomic by itself).
async fn write_group(pool: &SqlitePool, group: Vec<Statement>) -> Vec<Result<(), sqlx::Error>> {
    let count = group.len();
    let fail_all = |why: &str| (0..count).map(|_| Err(group_failed(why))).collect();
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => return fail_all(&e.to_string()),
    };
    if count == 1 {
        let mut group = group;
        return match group.pop() {
            Some(statement) => vec![run(statement, &mut conn).await],
            None => Vec::new(),
        };
    }
    if let Err(e) = sqlx::query("BEGIN").execute(&mut *conn).await {
        return fail_all(&e.to_string());
    }
    let mut results: Vec<Option<Result<(), sqlx::Error>>> = (0..count).map(|_| None).collect();
    // The group's appends first, as one INSERT: a write waits for its
    // group's COMMIT anyway, so the order inside a group is free. If one
    // of them finds its sequence taken, SQLite undoes the whole statement
    // and each append runs again alone below, to fail alone.
    let appends: Vec<(&'static str, &[SerializedEvent])> = group
        .iter()
        .filter_map(|statement| match statement {
            Statement::Append {
                aggregate_type,
                events,
            } => Some((*aggregate_type, events.as_slice())),
            Statement::Write { .. } => None,
        })
        .collect();
    let rows: usize = appends.iter().map(|(_, events)| events.len()).sum();
    if appends.len() > 1 && rows * COLUMNS <= MAX_PARAMETERS {
        match insert(&mut conn, &appends).await {
            Ok(_) => {
                for (result, statement) in results.iter_mut().zip(&group) {
                    if matches!(statement, Statement::Append { .. }) {
                        *result = Some(Ok(()));
                    }
                }
            }
            Err(e) if breaks_constraint(&e) => {}
            Err(e) => return roll_back(&mut conn, count, &e).await,
        }
    }
    drop(appends);
    for (result, statement) in results.iter_mut().zip(group) {
        if result.is_some() {
            continue;
        }
        match run(statement, &mut conn).await {
            Ok(()) => *result = Some(Ok(())),
            Err(e) if breaks_constraint(&e) => *result = Some(Err(e)),
            Err(e) => return roll_back(&mut conn, count, &e).await,
        }
    }
    match sqlx::query("COMMIT").execute(&mut *conn).await {
        Ok(_) => results
            .into_iter()
            .map(|result| result.unwrap_or_else(|| Err(group_failed("not run"))))
            .collect(),
        Err(e) => {
            // A failed COMMIT can leave the transaction open.
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            fail_all(&e.to_string())
        }
    }
}

/// Undoes the group after a failure other than a broken constraint: every
/// write in it fails.
async fn roll_back(
    conn: &mut SqliteConnection,
    count: usize,
    e: &sqlx::Error,
) -> Vec<Result<(), sqlx::Error>> {
    let why = e.to_string();
    let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
    tracing::warn!(error = %why, writes = count, "group write failed");
    (0..count).map(|_| Err(group_failed(&why))).collect()
}

/// A failure SQLite undoes by itself, statement only: the transaction goes on.
fn breaks_constraint(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(
        db.kind(),
        ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation
    ))
}

async fn run(statement: Statement, conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    match statement {
        Statement::Append {
            aggregate_type,
            events,
        } => insert(conn, &[(aggregate_type, &events)]).await,
        Statement::Write { sql, arguments } => sqlx::query_with(&sql, arguments)
            .execute(conn)
            .await
            .map(|_| ()),
    }
}

/// The rows of these appends as one multi-row INSERT.
async fn insert(
    conn: &mut SqliteConnection,
    appends: &[(&'static str, &[SerializedEvent])],
) -> Result<(), sqlx::Error> {
    let rows = appends.iter().map(|(_, events)| events.len()).sum();
    let sql = insert_sql(rows, "");
    appends
        .iter()
        .fold(sqlx::query(&sql), |query, &(aggregate_type, events)| {
            bind_events(query, aggregate_type, events)
        })
        .execute(conn)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::SqlitePoolOptions;

    fn event(aggregate_id: &str, sequence: usize) -> Vec<SerializedEvent> {
        vec![SerializedEvent::new(
            aggregate_id.to_string(),
            sequence,
            "Thing".to_string(),
            "Happened".to_string(),
            "1".to_string(),
            serde_json::json!({}),
            serde_json::json!({}),
        )]
    }

    /// Three appends in one group, the middle one on a taken sequence: the
    /// shared INSERT fails, and each append then runs alone — the conflict
    /// fails by itself, the others are stored, positions stay dense.
    #[tokio::test]
    async fn a_conflict_in_a_shared_insert_fails_alone() {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .expect("in-memory database");
        sqlx::raw_sql(include_str!("../../migrations/sqlite/0001_event_store.sql"))
            .execute(&pool)
            .await
            .expect("schema");
        let commits = GroupCommit::start(pool.clone());
        commits.append("Thing", event("a", 1)).await.expect("first");

        // On this single-threaded runtime all three are queued before the
        // writer task runs, so they form one group.
        let (b, a, c) = tokio::join!(
            commits.append("Thing", event("b", 1)),
            commits.append("Thing", event("a", 1)),
            commits.append("Thing", event("c", 1)),
        );
        assert!(b.is_ok() && c.is_ok(), "{b:?} {c:?}");
        assert!(
            matches!(&a, Err(sqlx::Error::Database(db)) if db.is_unique_violation()),
            "{a:?}"
        );
        let stored: Vec<(String, i64)> =
            sqlx::query_as("SELECT aggregate_id, position FROM events ORDER BY position")
                .fetch_all(&pool)
                .await
                .expect("events");
        assert_eq!(
            stored,
            vec![("a".into(), 1), ("b".into(), 2), ("c".into(), 3)]
        );
    }
}
