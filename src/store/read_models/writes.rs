//! A batch's writes to the read-model tables: every table's changes in as
//! few multi-row statements as fit, on either backend.

use std::collections::BTreeMap;

use order_saga_projections::{ReadOp, StageStart};

use super::{ReadModelTx, Target};
use crate::store::sql::{values_placeholders, Param};
use crate::store::StoreError;

/// A batch's stock changes per product: the last available level and the
/// sums of the changes to `reserved` and `sold` (one row per product: a
/// multi-row upsert may touch each row once).
pub(crate) type StockChanges = BTreeMap<String, (u32, i64, i64)>;

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
    /// Status and cancel reason (set together: NULL unless cancelled).
    pub(crate) status: Option<(&'static str, Option<&'static str>)>,
    /// The last Order event applied.
    pub(crate) version: Option<i64>,
    pub(crate) stock_replied_at_ms: Option<i64>,
    pub(crate) confirmed_at_ms: Option<i64>,
    pub(crate) payment_wait_at_ms: Option<i64>,
    pub(crate) paid_at_ms: Option<i64>,
    pub(crate) completed_at_ms: Option<i64>,
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
                let p = |c: usize| row * 10 + c;
                format!(
                    "(CAST(${} AS TEXT), CAST(${} AS TEXT), CAST(${} AS TEXT), CAST(${} AS BIGINT), \
                     CAST(${} AS BIGINT), CAST(${} AS BIGINT), CAST(${} AS BIGINT), CAST(${} AS BIGINT), \
                     CAST(${} AS BIGINT), CAST(${} AS BIGINT))",
                    p(1), p(2), p(3), p(4), p(5), p(6), p(7), p(8), p(9), p(10)
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
             cancelled_at_ms = COALESCE(v.column8, order_views.cancelled_at_ms), \
             paid_at_ms = COALESCE(v.column9, order_views.paid_at_ms), \
             completed_at_ms = COALESCE(v.column10, order_views.completed_at_ms) \
             FROM (VALUES {rows}) AS v WHERE order_views.order_id = v.column1"
        ));
        let mut params = Vec::with_capacity(chunk.len() * 10);
        for (order_id, patch) in chunk {
            let (status, reason) = match patch.status {
                Some((status, reason)) => (Some(status), reason),
                None => (None, None),
            };
            // Numbers travel as text too: PostgreSQL keeps the parameter
            // types of a statement's first run, and a NULL is bound as text.
            let number = |n: Option<i64>| Param::from(n.map(|n| n.to_string()));
            params.extend([
                order_id.as_str().into(),
                status.into(),
                reason.into(),
                number(patch.version),
                number(patch.stock_replied_at_ms),
                number(patch.confirmed_at_ms),
                number(patch.payment_wait_at_ms),
                number(patch.cancelled_at_ms),
                number(patch.paid_at_ms),
                number(patch.completed_at_ms),
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
        "INSERT INTO product_views (product_id, available, reserved, sold) VALUES {} \
         ON CONFLICT (product_id) DO UPDATE SET available = excluded.available, \
         reserved = product_views.reserved + excluded.reserved, \
         sold = product_views.sold + excluded.sold",
        values_placeholders(stock.len(), 4, 0)
    ));
    let mut params = Vec::with_capacity(stock.len() * 4);
    for (product_id, (available, reserved_delta, sold_delta)) in stock {
        params.extend([
            product_id.as_str().into(),
            i64::from(*available).into(),
            (*reserved_delta).into(),
            (*sold_delta).into(),
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
