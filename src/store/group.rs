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
//!
//! Writes that are several statements (the read models' batches) take the
//! pool's connection themselves, between groups.

use cqrs_es::persist::SerializedEvent;
use sqlx::error::ErrorKind;
use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::lean::{bind_rows, insert_sql};

/// Writes taken into one transaction at most.
const MAX_GROUP: usize = 256;

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
    let mut results = Vec::with_capacity(count);
    for statement in group {
        match run(statement, &mut conn).await {
            Ok(()) => results.push(Ok(())),
            Err(e) if breaks_constraint(&e) => results.push(Err(e)),
            Err(e) => {
                let why = e.to_string();
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                tracing::warn!(error = %why, writes = count, "group write failed");
                return fail_all(&why);
            }
        }
    }
    match sqlx::query("COMMIT").execute(&mut *conn).await {
        Ok(_) => results,
        Err(e) => {
            // A failed COMMIT can leave the transaction open.
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            fail_all(&e.to_string())
        }
    }
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
        } => {
            let sql = insert_sql(events.len(), "");
            bind_rows(&sql, aggregate_type, &events)
                .execute(conn)
                .await
                .map(|_| ())
        }
        Statement::Write { sql, arguments } => sqlx::query_with(&sql, arguments)
            .execute(conn)
            .await
            .map(|_| ()),
    }
}
