//! The read models' tables (`order_views`, `order_history`,
//! `product_views`, `saga_stats`) and their checkpoint, on either backend:
//! the transaction a batch is applied in ([`ReadModelTx`]), the batched
//! writes, the rebuild's table swap, and the queries readers make. What
//! the rows mean is `src/read_models/`'s business.

use std::collections::BTreeMap;

use order_saga_domain::OrderStatus;
use order_saga_projections::{
    HistoryRecord, OrderFilter, OrderStatusView, ProductRecord, ReadOp, StageStart, StatRecord,
};
use sqlx::{Postgres, Row, Sqlite, Transaction};

use super::sql::{bind_params, values_placeholders, Param};
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
        include_str!("sql/save_checkpoint.sql").to_string(),
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

/// A batch's stock changes per product: the last available level and the
/// sum of the changes to `reserved` (one row per product: a multi-row
/// upsert may touch each row once).
pub(crate) type StockChanges = BTreeMap<String, (u32, i64)>;

/// Rows per multi-row INSERT (7 parameters each, well under both
/// databases' limits on bound parameters).
const ROWS_PER_INSERT: usize = 500;

/// A batch's changes to `order_views`: the new rows, and per order what
/// its later events set — written as one multi-row INSERT and one
/// multi-row UPDATE for the whole batch (a statement per event before).
/// Applying an order's changes in event order gives the same row as
/// applying only the last value of each column, which is what is kept.
#[derive(Default)]
pub(crate) struct OrderChanges {
    pub(crate) new: Vec<OrderInsert>,
    pub(crate) set: BTreeMap<String, OrderPatch>,
}

/// A new `order_views` row.
pub(crate) struct OrderInsert {
    pub(crate) order_id: String,
    pub(crate) position: i64,
    pub(crate) user_id: String,
    pub(crate) store_id: String,
    pub(crate) items: String,
    pub(crate) total_amount: String,
    pub(crate) at_ms: i64,
    pub(crate) version: i64,
}

/// The last value each column got in the batch; `None`: unchanged.
#[derive(Default)]
pub(crate) struct OrderPatch {
    /// Status, cancel reason (set together: NULL unless cancelled) and version.
    pub(crate) status: Option<(&'static str, Option<&'static str>, i64)>,
    pub(crate) stock_replied_at_ms: Option<i64>,
    pub(crate) confirmed_at_ms: Option<i64>,
    pub(crate) payment_wait_at_ms: Option<i64>,
    pub(crate) cancelled_at_ms: Option<i64>,
}

/// A batch's `order_views` changes: new rows first, then every order's
/// changes in one UPDATE (SQLite and PostgreSQL name a VALUES list's
/// columns `column1`, `column2`, …; the casts give every row's NULLs one type).
pub(crate) async fn add_orders(
    tx: &mut ReadModelTx,
    target: Target,
    orders: &OrderChanges,
) -> Result<(), StoreError> {
    for chunk in orders.new.chunks(ROWS_PER_INSERT) {
        let sql = target.sql(&format!(
            "INSERT INTO order_views (order_id, created_position, user_id, store_id, status, \
             items, total_amount, created_at_ms, version) VALUES {} \
             ON CONFLICT (order_id) DO NOTHING",
            values_placeholders(chunk.len(), 9, 0)
        ));
        let mut params = Vec::with_capacity(chunk.len() * 9);
        for o in chunk {
            params.extend([
                o.order_id.as_str().into(),
                o.position.into(),
                o.user_id.as_str().into(),
                o.store_id.as_str().into(),
                "ORDER_CREATED".into(),
                o.items.as_str().into(),
                o.total_amount.as_str().into(),
                o.at_ms.into(),
                o.version.into(),
            ]);
        }
        tx.run(sql, params).await?;
    }
    let set: Vec<_> = orders.set.iter().collect();
    for chunk in set.chunks(ROWS_PER_INSERT) {
        let rows = (0..chunk.len())
            .map(|row| {
                let p = |c: usize| row * 8 + c;
                format!(
                    "(CAST(${} AS TEXT), CAST(${} AS TEXT), CAST(${} AS TEXT), CAST(${} AS BIGINT), \
                     CAST(${} AS BIGINT), CAST(${} AS BIGINT), CAST(${} AS BIGINT), CAST(${} AS BIGINT))",
                    p(1), p(2), p(3), p(4), p(5), p(6), p(7), p(8)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = target.sql(&format!(
            "UPDATE order_views SET \
             status = COALESCE(v.column2, order_views.status), \
             cancel_reason = CASE WHEN v.column2 IS NULL THEN order_views.cancel_reason ELSE v.column3 END, \
             version = COALESCE(v.column4, order_views.version), \
             stock_replied_at_ms = COALESCE(v.column5, order_views.stock_replied_at_ms), \
             confirmed_at_ms = COALESCE(v.column6, order_views.confirmed_at_ms), \
             payment_wait_at_ms = COALESCE(v.column7, order_views.payment_wait_at_ms), \
             cancelled_at_ms = COALESCE(v.column8, order_views.cancelled_at_ms) \
             FROM (VALUES {rows}) AS v WHERE order_views.order_id = v.column1"
        ));
        let mut params = Vec::with_capacity(chunk.len() * 8);
        for (order_id, patch) in chunk {
            let (status, reason, version) = match patch.status {
                Some((status, reason, version)) => (Some(status), reason, Some(version)),
                None => (None, None, None),
            };
            // Numbers travel as text too: PostgreSQL keeps the parameter
            // types of a statement's first run, and a NULL is bound as text.
            let number = |n: Option<i64>| Param::from(n.map(|n| n.to_string()));
            params.extend([
                order_id.as_str().into(),
                status.into(),
                reason.into(),
                number(version),
                number(patch.stock_replied_at_ms),
                number(patch.confirmed_at_ms),
                number(patch.payment_wait_at_ms),
                number(patch.cancelled_at_ms),
            ]);
        }
        tx.run(sql, params).await?;
    }
    Ok(())
}

/// A batch's `order_history` rows, a few hundred per statement.
pub(crate) async fn add_history(
    tx: &mut ReadModelTx,
    target: Target,
    history: &[ReadOp],
) -> Result<(), StoreError> {
    for chunk in history.chunks(ROWS_PER_INSERT) {
        let sql = target.sql(&format!(
            "INSERT INTO order_history (order_id, position, aggregate_type, sequence, event_type, \
             recorded_at_ms, payload) VALUES {} ON CONFLICT DO NOTHING",
            values_placeholders(chunk.len(), 7, 0)
        ));
        let mut params = Vec::with_capacity(chunk.len() * 7);
        for op in chunk {
            if let ReadOp::History {
                order_id,
                position,
                aggregate_type,
                sequence,
                event_type,
                at_ms,
                payload,
            } = op
            {
                params.extend([
                    order_id.as_str().into(),
                    (*position).into(),
                    aggregate_type.as_str().into(),
                    (*sequence).into(),
                    event_type.as_str().into(),
                    (*at_ms).into(),
                    payload.to_string().into(),
                ]);
            }
        }
        tx.run(sql, params).await?;
    }
    Ok(())
}

/// A batch's stock changes: one upsert for all its products.
pub(crate) async fn add_stock(
    tx: &mut ReadModelTx,
    target: Target,
    stock: &StockChanges,
) -> Result<(), StoreError> {
    if stock.is_empty() {
        return Ok(());
    }
    // A new row's price stays NULL until the product's price is projected.
    let sql = target.sql(&format!(
        "INSERT INTO product_views (product_id, available, reserved) VALUES {} \
         ON CONFLICT (product_id) DO UPDATE SET available = excluded.available, \
         reserved = product_views.reserved + excluded.reserved",
        values_placeholders(stock.len(), 3, 0)
    ));
    let mut params = Vec::with_capacity(stock.len() * 3);
    for (product_id, (available, reserved_delta)) in stock {
        params.extend([
            product_id.as_str().into(),
            i64::from(*available).into(),
            (*reserved_delta).into(),
        ]);
    }
    tx.run(sql, params).await?;
    Ok(())
}

/// A batch's additions to `saga_stats`, per metric: count, total and
/// maximum milliseconds. Written once per metric and batch.
pub(crate) type Stats = BTreeMap<String, (i64, i64, i64)>;

/// Adds a batch's statistics: one statement for all its metrics.
pub(crate) async fn add_stats(
    tx: &mut ReadModelTx,
    target: Target,
    stats: &Stats,
) -> Result<(), StoreError> {
    if stats.is_empty() {
        return Ok(());
    }
    let sql = target.sql(&format!(
        "INSERT INTO saga_stats (metric, count, total_ms, max_ms) VALUES {} \
         ON CONFLICT (metric) DO UPDATE SET count = saga_stats.count + excluded.count, \
         total_ms = saga_stats.total_ms + excluded.total_ms, \
         max_ms = CASE WHEN excluded.max_ms > saga_stats.max_ms THEN excluded.max_ms ELSE saga_stats.max_ms END",
        values_placeholders(stats.len(), 4, 0)
    ));
    let mut params = Vec::with_capacity(stats.len() * 4);
    for (metric, (n, total_ms, max_ms)) in stats {
        params.extend([
            metric.as_str().into(),
            (*n).into(),
            (*total_ms).into(),
            (*max_ms).into(),
        ]);
    }
    tx.run(sql, params).await?;
    Ok(())
}

/// Sets a product's price, creating its row (no stock yet) if needed.
pub(crate) async fn set_price(
    tx: &mut ReadModelTx,
    target: Target,
    product_id: &str,
    price: &str,
) -> Result<(), StoreError> {
    tx.run(
        target.sql(
            "INSERT INTO product_views (product_id, price, available, reserved) \
             VALUES ($1, $2, 0, 0) \
             ON CONFLICT (product_id) DO UPDATE SET price = excluded.price",
        ),
        vec![product_id.into(), price.into()],
    )
    .await?;
    Ok(())
}

/// When the order reached a stage start, as its row holds it.
pub(crate) async fn stage_start(
    tx: &mut ReadModelTx,
    target: Target,
    order_id: &str,
    from: StageStart,
) -> Result<Option<i64>, StoreError> {
    let sql = format!(
        "SELECT {} FROM order_views WHERE order_id = $1",
        start_column(from)
    );
    Ok(tx
        .read_i64(&target.sql(&sql), vec![order_id.into()])
        .await?
        .flatten())
}

fn start_column(start: StageStart) -> &'static str {
    match start {
        StageStart::Created => "created_at_ms",
        StageStart::StockReplied => "stock_replied_at_ms",
        StageStart::Confirmed => "confirmed_at_ms",
    }
}

/// The read models' schema (the migration that creates them).
pub(crate) fn read_model_ddl(store: &Store) -> &'static str {
    match store {
        Store::Postgres(_) => include_str!("../../migrations/postgres/0003_read_models.sql"),
        Store::Sqlite(_) => include_str!("../../migrations/sqlite/0003_read_models.sql"),
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

impl Store {
    pub async fn order_view(&self, order_id: &str) -> Result<Option<OrderStatusView>, StoreError> {
        let row: Option<OrderRow> = on_read_pool!(self, |pool| sqlx::query_as(
            "SELECT * FROM order_views WHERE order_id = $1"
        )
        .bind(order_id)
        .fetch_optional(pool)
        .await)?;
        row.map(OrderRow::into_record).transpose()
    }

    /// Orders matching `filter`, oldest first, after the cursor position.
    pub async fn order_views(
        &self,
        filter: &OrderFilter,
        after: i64,
        limit: i64,
    ) -> Result<Vec<OrderStatusView>, StoreError> {
        let status = filter.status.map(|s| s.as_str());
        let rows: Vec<OrderRow> = on_read_pool!(self, |pool| sqlx::query_as(
            "SELECT * FROM order_views \
             WHERE (CAST($1 AS TEXT) IS NULL OR status = $1) \
               AND (CAST($2 AS TEXT) IS NULL OR user_id = $2) \
               AND (CAST($3 AS TEXT) IS NULL OR store_id = $3) \
               AND created_position > $4 \
             ORDER BY created_position LIMIT $5"
        )
        .bind(status)
        .bind(filter.user_id.as_deref())
        .bind(filter.store_id.as_deref())
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await)?;
        rows.into_iter().map(OrderRow::into_record).collect()
    }

    pub async fn order_history(&self, order_id: &str) -> Result<Vec<HistoryRecord>, StoreError> {
        let rows: Vec<(i64, String, i64, String, i64, String)> =
            on_read_pool!(self, |pool| sqlx::query_as(
                "SELECT position, aggregate_type, sequence, event_type, recorded_at_ms, payload \
             FROM order_history WHERE order_id = $1 ORDER BY position"
            )
            .bind(order_id)
            .fetch_all(pool)
            .await)?;
        rows.into_iter()
            .map(
                |(position, aggregate_type, sequence, event_type, recorded_at_ms, payload)| {
                    Ok(HistoryRecord {
                        position,
                        aggregate_type,
                        sequence,
                        event_type,
                        recorded_at_ms,
                        payload: serde_json::from_str(&payload)
                            .map_err(|e| StoreError::CorruptRow(e.to_string()))?,
                    })
                },
            )
            .collect()
    }

    pub async fn product_views(&self) -> Result<Vec<ProductRecord>, StoreError> {
        let rows: Vec<(String, Option<String>, i64, i64)> = on_read_pool!(self, |pool| {
            sqlx::query_as(
            "SELECT product_id, price, available, reserved FROM product_views ORDER BY product_id"
        )
        .fetch_all(pool)
        .await
        })?;
        rows.into_iter()
            .map(|(product_id, price, available, reserved)| {
                Ok(ProductRecord {
                    product_id,
                    price: price
                        .map(|p| p.parse())
                        .transpose()
                        .map_err(|e| StoreError::CorruptRow(format!("price: {e}")))?,
                    available,
                    reserved,
                })
            })
            .collect()
    }

    pub async fn saga_stats(&self) -> Result<Vec<StatRecord>, StoreError> {
        let rows: Vec<(String, i64, i64, i64)> = on_read_pool!(self, |pool| sqlx::query_as(
            "SELECT metric, count, total_ms, max_ms FROM saga_stats ORDER BY metric"
        )
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|(metric, count, total_ms, max_ms)| StatRecord {
                metric,
                count,
                total_ms,
                max_ms,
            })
            .collect())
    }
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    order_id: String,
    created_position: i64,
    user_id: String,
    store_id: String,
    status: String,
    items: String,
    total_amount: String,
    cancel_reason: Option<String>,
    created_at_ms: i64,
    stock_replied_at_ms: Option<i64>,
    confirmed_at_ms: Option<i64>,
    payment_wait_at_ms: Option<i64>,
    cancelled_at_ms: Option<i64>,
    version: i64,
}

impl OrderRow {
    fn into_record(self) -> Result<OrderStatusView, StoreError> {
        let bad =
            |what: &str| StoreError::CorruptRow(format!("order view {}: {what}", self.order_id));
        let status = match self.status.as_str() {
            "ORDER_CREATED" => OrderStatus::OrderCreated,
            "ORDER_CONFIRMED" => OrderStatus::OrderConfirmed,
            "PAYMENT_WAIT" => OrderStatus::PaymentWait,
            "ORDER_CANCELLED" => OrderStatus::OrderCancelled,
            _ => return Err(bad("unknown status")),
        };
        Ok(OrderStatusView {
            status,
            items: serde_json::from_str(&self.items).map_err(|e| bad(&e.to_string()))?,
            total_amount: self.total_amount.parse().map_err(|_| bad("total"))?,
            cancel_reason: self
                .cancel_reason
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|_| bad("cancel reason"))?,
            created_position: self.created_position,
            user_id: self.user_id,
            store_id: self.store_id,
            created_at_ms: self.created_at_ms,
            stock_replied_at_ms: self.stock_replied_at_ms,
            confirmed_at_ms: self.confirmed_at_ms,
            payment_wait_at_ms: self.payment_wait_at_ms,
            cancelled_at_ms: self.cancelled_at_ms,
            version: self.version,
            order_id: self.order_id,
        })
    }
}
