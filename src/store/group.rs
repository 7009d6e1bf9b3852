//! Group commit for the embedded store's writes: event appends, the
//! saga's bookkeeping (timers, consumer checkpoints, notification records)
//! and the read models' batches, waiting for the single SQLite writer, go
//! into one transaction, so they share one commit (a commit writes every
//! page it touched to the WAL; the statements inside one cost a fraction of
//! it). A write is one statement, or several that apply together (a
//! savepoint), optionally guarded by its first statement changing a row.
//! A write that breaks a constraint — an append's taken sequence — or whose
//! guard changes nothing rolls back alone (SQLite undoes the failed
//! statement, the transaction goes on), so the others still commit. Any
//! other failure rolls the whole group back, and every write in it fails
//! (its caller tries again, as after a lost connection). A write is
//! answered after its group's COMMIT. A write of one statement alone runs
//! in autocommit. A group's appends share one INSERT; if one of them finds
//! its sequence taken, SQLite undoes that statement and each append runs
//! again alone.
//!
//! The writer task runs a group in one go, on its own thread, through
//! rusqlite on a connection of its own, with prepared statements kept
//! between groups — not through sqlx, whose SQLite connection answers each
//! statement from a worker thread: a round trip per statement, which under
//! load cost the single writer more than the statements themselves
//! (ARCHITECTURE.md, "Performance", "SQLite without a thread per
//! statement"). While it writes, it holds the sqlx writing pool's one
//! connection, so what writes through sqlx (migrations, a rebuild of the
//! read models) never runs beside a group.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use cqrs_es::persist::SerializedEvent;
use rusqlite::ffi;
use sqlx::error::{DatabaseError, ErrorKind};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::SqlitePool;
use sqlx::Sqlite;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::sql::{insert_sql, Param, COLUMNS};

/// Writes taken into one transaction at most.
const MAX_GROUP: usize = 256;

/// SQLite's limit on a statement's parameters (SQLITE_MAX_VARIABLE_NUMBER):
/// appends with more rows than fit are not shared in one INSERT.
const MAX_PARAMETERS: usize = 32_766;

/// How long the writer keeps sqlx's writing connection while writes keep
/// coming, before it lets the others writing through sqlx have it.
const HOLD: Duration = Duration::from_millis(10);

/// Prepared statements the writer keeps: one per shape of write, and one
/// per row count of the shared INSERT.
const PREPARED: usize = 128;

/// One write for the writer.
enum Statement {
    /// The events of one append, as one multi-row INSERT.
    Append {
        aggregate_type: &'static str,
        events: Vec<SerializedEvent>,
    },
    /// Any other write: its statements, run in order, each binding the
    /// `$n` it names from its parameters. Several statements apply together
    /// or not at all (a savepoint); a guarded write applies only if its
    /// first statement changes a row, and fails alone otherwise.
    Write {
        statements: Vec<(String, Vec<Param>)>,
        guarded: bool,
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
    /// Starts the writer task: it writes on `conn` while holding `pool`'s
    /// one connection (the sqlx side of the same single writer).
    pub(super) fn start(pool: SqlitePool, conn: rusqlite::Connection) -> Self {
        conn.set_prepared_statement_cache_capacity(PREPARED);
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(write_groups(pool, conn, waiting));
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

    /// Runs one write — its statements in order, all or none — answered
    /// once its group has committed. With `guarded`, only if the first
    /// statement changes a row: otherwise nothing is applied and the write
    /// fails with `RowNotFound`.
    pub(super) async fn execute(
        &self,
        statements: Vec<(String, Vec<Param>)>,
        guarded: bool,
    ) -> Result<(), sqlx::Error> {
        self.send(Statement::Write {
            statements,
            guarded,
        })
        .await
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

async fn write_groups(
    pool: SqlitePool,
    mut conn: rusqlite::Connection,
    mut waiting: mpsc::UnboundedReceiver<Write>,
) {
    // sqlx's one writing connection, held (unused) while groups are
    // written: the single writer. Kept from group to group while writes
    // keep coming, for at most `HOLD`: handing it back costs a round trip
    // to its thread (sqlx pings a connection it takes back), which once
    // per group had put two thread switches between every two groups.
    let mut held: Option<(PoolConnection<Sqlite>, Instant)> = None;
    while let Some(first) = waiting.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match waiting.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        metrics::counter!("order_saga_group_commits_total").increment(1);
        metrics::counter!("order_saga_group_commit_writes_total").increment(group.len() as u64);
        let (statements, answers): (Vec<_>, Vec<_>) =
            group.into_iter().map(|w| (w.statement, w.done)).unzip();
        if held.is_none() {
            held = match pool.acquire().await {
                Ok(writer) => Some((writer, Instant::now())),
                Err(e) => {
                    let why = e.to_string();
                    for done in answers {
                        let _ = done.send(Err(group_failed(&why)));
                    }
                    continue;
                }
            };
        }
        let results = write_group(&mut conn, statements);
        for (done, result) in answers.into_iter().zip(results) {
            // The caller may have gone (a dropped request): nothing to tell.
            let _ = done.send(result);
        }
        if waiting.is_empty()
            || held
                .as_ref()
                .is_some_and(|(_, since)| since.elapsed() >= HOLD)
        {
            // Others writing through sqlx (migrations, a rebuild, timer
            // claims) get their turn.
            held = None;
        }
    }
}

/// One transaction for the whole group; a result per write, in order.
/// A write of one statement alone runs in autocommit (atomic by itself).
fn write_group(
    conn: &mut rusqlite::Connection,
    group: Vec<Statement>,
) -> Vec<Result<(), sqlx::Error>> {
    match group.as_slice() {
        [Statement::Append { .. }] => {}
        [Statement::Write { statements, .. }] if statements.len() == 1 => {}
        _ => return in_transaction(conn, group),
    }
    group
        .into_iter()
        .map(|statement| run(statement, conn).map_err(sqlx_error))
        .collect()
}

fn in_transaction(
    conn: &mut rusqlite::Connection,
    group: Vec<Statement>,
) -> Vec<Result<(), sqlx::Error>> {
    let count = group.len();
    let fail_all = |why: &str| (0..count).map(|_| Err(group_failed(why))).collect();
    if let Err(e) = conn.execute_batch("BEGIN") {
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
        match insert(conn, &appends) {
            Ok(()) => {
                for (result, statement) in results.iter_mut().zip(&group) {
                    if matches!(statement, Statement::Append { .. }) {
                        *result = Some(Ok(()));
                    }
                }
            }
            Err(e) if fails_alone(&e) => {}
            Err(e) => return roll_back(conn, count, &e),
        }
    }
    drop(appends);
    for (result, statement) in results.iter_mut().zip(group) {
        if result.is_some() {
            continue;
        }
        match run(statement, conn) {
            Ok(()) => *result = Some(Ok(())),
            Err(e) if fails_alone(&e) => *result = Some(Err(sqlx_error(e))),
            Err(e) => return roll_back(conn, count, &e),
        }
    }
    match conn.execute_batch("COMMIT") {
        Ok(()) => results
            .into_iter()
            .map(|result| result.unwrap_or_else(|| Err(group_failed("not run"))))
            .collect(),
        Err(e) => {
            // A failed COMMIT can leave the transaction open.
            let _ = conn.execute_batch("ROLLBACK");
            fail_all(&e.to_string())
        }
    }
}

/// Undoes the group after a failure other than a broken constraint: every
/// write in it fails.
fn roll_back(
    conn: &mut rusqlite::Connection,
    count: usize,
    e: &rusqlite::Error,
) -> Vec<Result<(), sqlx::Error>> {
    let why = e.to_string();
    let _ = conn.execute_batch("ROLLBACK");
    tracing::warn!(error = %why, writes = count, "group write failed");
    (0..count).map(|_| Err(group_failed(&why))).collect()
}

/// A failure that undoes one write only, the transaction goes on: a broken
/// constraint (SQLite undoes the statement; a write of several statements
/// goes back to its savepoint), or a guard that changed no row.
fn fails_alone(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::QueryReturnedNoRows)
        || matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::ConstraintViolation)
        )
}

fn run(statement: Statement, conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    match statement {
        Statement::Append {
            aggregate_type,
            events,
        } => insert(conn, &[(aggregate_type, &events)]),
        Statement::Write {
            statements,
            guarded,
        } => {
            if statements.len() == 1 && !guarded {
                return statements
                    .iter()
                    .try_for_each(|(sql, params)| execute(conn, sql, params).map(|_| ()));
            }
            conn.execute_batch("SAVEPOINT write")?;
            let applied = statements
                .iter()
                .enumerate()
                .try_for_each(|(i, (sql, params))| match execute(conn, sql, params)? {
                    0 if guarded && i == 0 => Err(rusqlite::Error::QueryReturnedNoRows),
                    _ => Ok(()),
                });
            if applied.is_err() {
                conn.execute_batch("ROLLBACK TO write")?;
            }
            conn.execute_batch("RELEASE write")?;
            applied
        }
    }
}

/// Runs one statement, binding each `$n` it names to `params[n - 1]`;
/// returns the rows it changed.
fn execute(conn: &rusqlite::Connection, sql: &str, params: &[Param]) -> rusqlite::Result<usize> {
    let mut prepared = conn.prepare_cached(&numbered(sql))?;
    for index in 1..=prepared.parameter_count() {
        let param = params
            .get(index - 1)
            .ok_or(rusqlite::Error::InvalidParameterCount(index, params.len()))?;
        prepared.raw_bind_parameter(index, param)?;
    }
    prepared.raw_execute()
}

/// `sql` with each `$n` written `?n`. SQLite reads `$n` as a name, and
/// binding by name looks every name up in a list — quadratic in a
/// multi-row INSERT's thousands of parameters; `?n` is bound at index `n`.
/// Quoted text is left as it is.
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => quoted = !quoted,
            '$' if !quoted && chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push('?');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// The rows of these appends as one multi-row INSERT, bound as sqlx binds
/// them for the library's reads: JSON as text, the event id as a
/// hyphenated time-ordered (version 7) UUID (see `lean::bind_events`).
fn insert(
    conn: &rusqlite::Connection,
    appends: &[(&'static str, &[SerializedEvent])],
) -> rusqlite::Result<()> {
    let rows = appends.iter().map(|(_, events)| events.len()).sum();
    let mut prepared = conn.prepare_cached(&insert_sql(rows, ""))?;
    let mut index = 0;
    let mut bind = |value: &dyn rusqlite::ToSql| {
        index += 1;
        prepared.raw_bind_parameter(index, value)
    };
    for &(aggregate_type, events) in appends {
        for event in events {
            bind(&aggregate_type)?;
            bind(&event.aggregate_id)?;
            bind(&i64::try_from(event.sequence).unwrap_or(i64::MAX))?;
            bind(&event.event_type)?;
            bind(&event.event_version)?;
            bind(&event.payload.to_string())?;
            bind(&event.metadata.to_string())?;
            bind(&Uuid::now_v7().to_string())?;
        }
    }
    prepared.raw_execute().map(|_| ())
}

/// Opens the group writer's connection to the store's file, set up as the
/// sqlx pools' connections are (see `sqlite::open`).
pub(super) fn open_writer(
    path: &std::path::Path,
    busy_timeout: std::time::Duration,
    cache_size: &str,
) -> Result<rusqlite::Connection, sqlx::Error> {
    let conn = rusqlite::Connection::open(path).map_err(sqlx_error)?;
    conn.busy_timeout(busy_timeout).map_err(sqlx_error)?;
    conn.execute_batch(&format!(
        "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA cache_size = {cache_size};"
    ))
    .map_err(sqlx_error)?;
    Ok(conn)
}

/// rusqlite's failure as the sqlx error the store's callers read (a
/// database error keeps SQLite's extended code, so a taken sequence is
/// still a unique violation).
pub(super) fn sqlx_error(e: rusqlite::Error) -> sqlx::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, message) => {
            sqlx::Error::Database(Box::new(LiteError {
                message: message.unwrap_or_else(|| code.to_string()),
                code: code.extended_code,
            }))
        }
        rusqlite::Error::QueryReturnedNoRows => sqlx::Error::RowNotFound,
        other => sqlx::Error::Io(std::io::Error::other(other.to_string())),
    }
}

/// A database error from the group writer's connection.
#[derive(Debug)]
struct LiteError {
    message: String,
    code: i32,
}

impl std::fmt::Display for LiteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for LiteError {}

impl DatabaseError for LiteError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.code.to_string()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

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

    #[test]
    fn placeholders_are_numbered_outside_quoted_text() {
        assert_eq!(
            numbered("UPDATE t SET a = $12, b = '$1' WHERE c = $2 AND d = '$x'"),
            "UPDATE t SET a = ?12, b = '$1' WHERE c = ?2 AND d = '$x'"
        );
    }

    /// Three appends in one group, the middle one on a taken sequence: the
    /// shared INSERT fails, and each append then runs alone — the conflict
    /// fails by itself, the others are stored, positions stay dense.
    #[tokio::test]
    async fn a_conflict_in_a_shared_insert_fails_alone() {
        // A file, not memory: the group writer opens a connection of its own.
        let dir = std::env::temp_dir().join(format!("order-saga-group-{}", Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let path = dir.join("store.sqlite");
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal),
            )
            .await
            .expect("database file");
        sqlx::raw_sql(include_str!("../../migrations/sqlite/0001_event_store.sql"))
            .execute(&pool)
            .await
            .expect("schema");
        let writer = open_writer(&path, std::time::Duration::from_secs(1), "-1024")
            .expect("writer connection");
        let commits = GroupCommit::start(pool.clone(), writer);
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
        pool.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
