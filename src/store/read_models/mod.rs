//! The read models' tables (`order_views`, `order_history`,
//! `product_views`, `saga_stats`) and their checkpoint, on either backend:
//! the transaction a batch is applied in ([`ReadModelTx`]), the batched
//! writes, the rebuild's table swap, and the queries readers make. What
//! the rows mean is `src/read_models/`'s business.

mod queries;
mod writes;

use sqlx::{Postgres, Row, Sqlite, Transaction};

pub(crate) use writes::{
    add_history, add_orders, add_stats, add_stock, set_price, stage_start, OrderChanges,
    OrderInsert, Stats, StockChanges,
};

use super::sql::{bind_params, Param};
use super::{Lite, Store, StoreError};

/// The checkpoint of the read models.
pub const CHECKPOINT: &str = "projection.read_models";
/// The checkpoint of the read models being rebuilt beside the live ones.
pub(crate) const NEXT_CHECKPOINT: &str = "projection.read_models.next";
/// The read-model tables; a rebuild fills `<table>_next` and swaps.
const TABLES: [&str; 4] = [
    "order_views",
    "order_history",
    "product_views",
    "saga_stats",
];

/// Which set of read-model tables a batch is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// The tables readers read.
    Live,
    /// The shadow tables of a rebuild.
    Next,
}

impl Target {
    /// `sql` with the table names of this target.
    pub fn sql(self, sql: &str) -> String {
        match self {
            Target::Live => sql.to_string(),
            Target::Next => TABLES.iter().fold(sql.to_string(), |sql, table| {
                sql.replace(table, &format!("{table}_next"))
            }),
        }
    }

    pub fn checkpoint(self) -> &'static str {
        match self {
            Target::Live => CHECKPOINT,
            Target::Next => NEXT_CHECKPOINT,
        }
    }
}

pub(crate) enum ReadModelTx {
    Pg(Transaction<'static, Postgres>),
    Lite(Transaction<'static, Sqlite>),
    /// A live batch on SQLite: its statements are gathered, then written
    /// at commit as one write of the store's group commit, guarded by the
    /// checkpoint's claim. No connection is held while the batch is worked
    /// out: on the single writer, a transaction held across a round trip
    /// per statement kept every other write waiting.
    Gathered {
        db: Lite,
        guard: Option<(String, Vec<Param>)>,
        statements: Vec<(String, Vec<Param>)>,
    },
}

impl ReadModelTx {
    pub(crate) async fn begin(store: &Store) -> Result<Self, StoreError> {
        Ok(match store {
            Store::Postgres(db) => {
                let mut tx = db.pool.begin().await?;
                // Read models are rebuilt from the log with their
                // checkpoint: no need to wait for the disk.
                sqlx::query(super::RELAXED).execute(&mut *tx).await?;
                ReadModelTx::Pg(tx)
            }
            Store::Sqlite(db) => ReadModelTx::Lite(db.write.begin().await?),
        })
    }

    /// A transaction for one live batch: on SQLite, gathered.
    pub(crate) async fn begin_batch(store: &Store) -> Result<Self, StoreError> {
        match store {
            Store::Sqlite(db) => Ok(ReadModelTx::Gathered {
                db: db.clone(),
                guard: None,
                statements: Vec::new(),
            }),
            Store::Postgres(_) => ReadModelTx::begin(store).await,
        }
    }

    /// Runs a write statement; returns the rows it changed (0 when it is
    /// gathered for the commit).
    pub(crate) async fn run(&mut self, sql: String, params: Vec<Param>) -> Result<u64, StoreError> {
        Ok(match self {
            ReadModelTx::Pg(t) => bind_params(sqlx::query(&sql), params)
                .execute(&mut **t)
                .await?
                .rows_affected(),
            ReadModelTx::Lite(t) => bind_params(sqlx::query(&sql), params)
                .execute(&mut **t)
                .await?
                .rows_affected(),
            ReadModelTx::Gathered { statements, .. } => {
                statements.push((sql, params));
                0
            }
        })
    }

    /// The first column of the first row, an integer or NULL (none without
    /// a row). A gathered batch reads what is committed.
    pub(crate) async fn read_i64(
        &mut self,
        sql: &str,
        params: Vec<Param>,
    ) -> Result<Option<Option<i64>>, StoreError> {
        let row = match self {
            ReadModelTx::Pg(t) => bind_params(sqlx::query(sql), params)
                .fetch_optional(&mut **t)
                .await?
                .map(|row| row.try_get(0))
                .transpose()?,
            ReadModelTx::Lite(t) => bind_params(sqlx::query(sql), params)
                .fetch_optional(&mut **t)
                .await?
                .map(|row| row.try_get(0))
                .transpose()?,
            ReadModelTx::Gathered { db, .. } => bind_params(sqlx::query(sql), params)
                .fetch_optional(&db.read)
                .await?
                .map(|row| row.try_get(0))
                .transpose()?,
        };
        Ok(row)
    }

    /// Commits; false when a gathered batch's claim failed (another
    /// instance moved the checkpoint first) and nothing was written.
    pub(crate) async fn commit(self) -> Result<bool, StoreError> {
        match self {
            ReadModelTx::Pg(t) => t.commit().await?,
            ReadModelTx::Lite(t) => t.commit().await?,
            ReadModelTx::Gathered {
                db,
                guard,
                mut statements,
            } => {
                let guarded = guard.is_some();
                if let Some(guard) = guard {
                    statements.insert(0, guard);
                }
                if statements.is_empty() {
                    return Ok(true);
                }
                return match db.execute(statements, guarded).await {
                    Ok(()) => Ok(true),
                    Err(sqlx::Error::RowNotFound) => Ok(false),
                    Err(e) => Err(e.into()),
                };
            }
        }
        Ok(true)
    }
}

/// The SQL statements of a migration file.
pub(crate) fn statements(ddl: &str) -> impl Iterator<Item = &str> {
    ddl.split(';').filter(|s| {
        s.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
    })
}

pub(crate) async fn exec(tx: &mut ReadModelTx, sql: &str) -> Result<(), StoreError> {
    tx.run(sql.to_string(), Vec::new()).await?;
    Ok(())
}

pub(crate) async fn set_checkpoint(
    tx: &mut ReadModelTx,
    name: &str,
    position: i64,
) -> Result<(), StoreError> {
    tx.run(
        "INSERT INTO checkpoints (name, position) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET position = excluded.position"
            .to_string(),
        vec![name.into(), position.into()],
    )
    .await?;
    Ok(())
}

/// Creates the named checkpoint's row, at 0, unless it exists (in a
/// gathered batch at once: the batch's claim needs the row).
async fn ensure_checkpoint(tx: &mut ReadModelTx, name: &str) -> Result<(), StoreError> {
    let sql =
        "INSERT INTO checkpoints (name, position) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING";
    match tx {
        ReadModelTx::Gathered { db, .. } => {
            db.execute(vec![(sql.to_string(), vec![name.into()])], false)
                .await?;
        }
        _ => {
            tx.run(sql.to_string(), vec![name.into()]).await?;
        }
    }
    Ok(())
}

/// Locks the named checkpoint's row for the rest of the transaction and
/// returns its position.
pub(crate) async fn lock_checkpoint(tx: &mut ReadModelTx, name: &str) -> Result<i64, StoreError> {
    ensure_checkpoint(tx, name).await?;
    tx.run(
        "UPDATE checkpoints SET position = position WHERE name = $1".to_string(),
        vec![name.into()],
    )
    .await?;
    let position = tx
        .read_i64(
            "SELECT position FROM checkpoints WHERE name = $1",
            vec![name.into()],
        )
        .await?
        .flatten()
        .ok_or_else(|| StoreError::CorruptRow(format!("checkpoint {name} has no position")))?;
    Ok(position)
}

/// Moves the named checkpoint from `from` to `to` if it is still at `from`.
pub(crate) async fn claim(
    tx: &mut ReadModelTx,
    name: &str,
    from: i64,
    to: i64,
) -> Result<bool, StoreError> {
    // A checkpoint past 0 has its row already.
    if from == 0 {
        ensure_checkpoint(tx, name).await?;
    }
    let sql = "UPDATE checkpoints SET position = $3 WHERE name = $1 AND position = $2".to_string();
    let params = vec![name.into(), from.into(), to.into()];
    if let ReadModelTx::Gathered { guard, .. } = tx {
        // Decided at commit, where it guards the batch's writes.
        *guard = Some((sql, params));
        return Ok(true);
    }
    Ok(tx.run(sql, params).await? == 1)
}

/// The read models' schema (the migration that creates them).
pub(crate) fn read_model_ddl(store: &Store) -> &'static str {
    match store {
        Store::Postgres(_) => concat!(
            include_str!("../../../migrations/postgres/0003_read_models.sql"),
            include_str!("../../../migrations/postgres/0009_read_models_payment.sql")
        ),
        Store::Sqlite(_) => concat!(
            include_str!("../../../migrations/sqlite/0003_read_models.sql"),
            include_str!("../../../migrations/sqlite/0009_read_models_payment.sql")
        ),
    }
}

/// Makes empty `<table>_next` tables for a rebuild, with its checkpoint at 0.
pub(crate) async fn create_next_tables(store: &Store) -> Result<(), StoreError> {
    let ddl = Target::Next.sql(read_model_ddl(store));
    let mut tx = ReadModelTx::begin(store).await?;
    for table in TABLES {
        exec(&mut tx, &format!("DROP TABLE IF EXISTS {table}_next")).await?;
    }
    for statement in statements(&ddl) {
        exec(&mut tx, statement).await?;
    }
    set_checkpoint(&mut tx, NEXT_CHECKPOINT, 0).await?;
    tx.commit().await?;
    Ok(())
}

/// Replaces the live tables by the rebuilt ones in `tx`, and the live
/// checkpoint by `position`.
pub(crate) async fn swap_in_next_tables(
    tx: &mut ReadModelTx,
    store: &Store,
    position: i64,
) -> Result<(), StoreError> {
    for table in TABLES {
        exec(tx, &format!("DROP TABLE {table}")).await?;
        exec(tx, &format!("ALTER TABLE {table}_next RENAME TO {table}")).await?;
    }
    // Indexes keep the names they were created with: give them back the
    // live ones.
    for statement in statements(read_model_ddl(store)).filter(|s| s.contains("CREATE INDEX")) {
        if let Some(name) = statement
            .split_whitespace()
            .skip_while(|w| *w != "INDEX")
            .nth(1)
        {
            exec(
                tx,
                &format!("DROP INDEX IF EXISTS {}", Target::Next.sql(name)),
            )
            .await?;
            exec(tx, statement).await?;
        }
    }
    set_checkpoint(tx, CHECKPOINT, position).await?;
    exec(
        tx,
        &format!("DELETE FROM checkpoints WHERE name = '{NEXT_CHECKPOINT}'"),
    )
    .await?;
    Ok(())
}
