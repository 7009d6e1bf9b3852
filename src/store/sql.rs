//! SQL shared by the store's modules and both backends: the event insert,
//! the values bound to a write ([`Param`]), multi-row placeholders, and
//! reading an event row as cqrs-es does. Every statement is written once
//! for both dialects where it can be (SQLite accepts `$1`-style
//! parameters too).

use cqrs_es::persist::SerializedEvent;
use rusqlite::types::{ToSqlOutput, ValueRef};
use serde_json::Value;
use uuid::Uuid;

use super::StoreError;

const INSERT_EVENTS: &str = "INSERT INTO events \
     (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, \
     event_id) VALUES ";

/// Columns bound per event by `bind_events`.
pub(super) const COLUMNS: usize = 8;

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

/// A value bound to a write's `$n` placeholder.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    Null,
    Int(i64),
    Text(String),
}

impl From<i64> for Param {
    fn from(value: i64) -> Self {
        Param::Int(value)
    }
}

impl From<String> for Param {
    fn from(value: String) -> Self {
        Param::Text(value)
    }
}

impl From<&str> for Param {
    fn from(value: &str) -> Self {
        Param::Text(value.to_string())
    }
}

impl<T: Into<Param>> From<Option<T>> for Param {
    fn from(value: Option<T>) -> Self {
        value.map_or(Param::Null, Into::into)
    }
}

impl rusqlite::ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Param::Null => ValueRef::Null,
            Param::Int(i) => ValueRef::Integer(*i),
            Param::Text(s) => ValueRef::Text(s.as_bytes()),
        }))
    }
}

/// Binds [`Param`]s to a statement through sqlx as the values they were
/// made from: an integer as a 64-bit integer, text and NULL as text.
pub fn bind_params<'q, DB>(
    query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    params: Vec<Param>,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    params.into_iter().fold(query, |query, param| match param {
        Param::Null => query.bind(None::<String>),
        Param::Int(i) => query.bind(i),
        Param::Text(s) => query.bind(s),
    })
}

/// `($n, $n+1, …), (…)`: `rows` groups of `columns` numbered parameters,
/// numbered after the statement's first `skip` — the VALUES of a multi-row
/// INSERT, for both backends.
pub fn values_placeholders(rows: usize, columns: usize, skip: usize) -> String {
    (0..rows)
        .map(|row| {
            let params: Vec<String> = (1..=columns)
                .map(|c| format!("${}", skip + row * columns + c))
                .collect();
            format!("({})", params.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// An event row as cqrs-es reads it, on either backend.
pub(super) fn serialized_event<R: sqlx::Row>(
    row: &R,
) -> Result<cqrs_es::persist::SerializedEvent, sqlx::Error>
where
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> sqlx::types::Json<Value>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let sequence: i64 = row.try_get("sequence")?;
    let payload: sqlx::types::Json<Value> = row.try_get("payload")?;
    let metadata: sqlx::types::Json<Value> = row.try_get("metadata")?;
    Ok(cqrs_es::persist::SerializedEvent::new(
        row.try_get("aggregate_id")?,
        usize::try_from(sequence).unwrap_or_default(),
        row.try_get("aggregate_type")?,
        row.try_get("event_type")?,
        row.try_get("event_version")?,
        payload.0,
        metadata.0,
    ))
}

pub(super) fn corrupt(position: i64, message: impl ToString) -> StoreError {
    StoreError::Corrupt {
        position,
        message: message.to_string(),
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
