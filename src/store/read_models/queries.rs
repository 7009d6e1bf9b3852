//! What readers ask of the read-model tables.

use order_saga_domain::OrderStatus;
use order_saga_projections::{
    HistoryRecord, OrderFilter, OrderStatusView, ProductRecord, StatRecord, StuckSagaRecord,
};

use crate::store::{Store, StoreError};

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

    /// Sagas that have not ended in time, oldest first (at most `limit`):
    /// orders created or confirmed before `started_before_ms`, and orders
    /// waiting for their payment since before `waiting_before_ms`.
    pub async fn stuck_sagas(
        &self,
        started_before_ms: i64,
        waiting_before_ms: i64,
        limit: i64,
    ) -> Result<Vec<StuckSagaRecord>, StoreError> {
        type Row = (String, String, i64, Option<String>, Option<i64>);
        let rows: Vec<Row> = on_read_pool!(self, |pool| sqlx::query_as(
            "SELECT v.order_id, v.status, v.created_at_ms, \
                        (SELECT h.event_type FROM order_history h WHERE h.order_id = v.order_id \
                          ORDER BY h.position DESC LIMIT 1), \
                        (SELECT MAX(h.recorded_at_ms) FROM order_history h \
                          WHERE h.order_id = v.order_id) \
                 FROM order_views v \
                 WHERE (v.status IN ('ORDER_CREATED', 'ORDER_CONFIRMED') AND v.created_at_ms < $1) \
                    OR (v.status = 'PAYMENT_WAIT' AND v.payment_wait_at_ms < $2) \
                 ORDER BY v.created_position LIMIT $3"
        )
        .bind(started_before_ms)
        .bind(waiting_before_ms)
        .bind(limit)
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(
                |(order_id, status, created_at_ms, last_step, last_step_at_ms)| StuckSagaRecord {
                    order_id,
                    status,
                    created_at_ms,
                    last_step,
                    last_step_at_ms,
                },
            )
            .collect())
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
        let rows: Vec<(String, Option<String>, i64, i64, i64)> = on_read_pool!(self, |pool| {
            sqlx::query_as(
            "SELECT product_id, price, available, reserved, sold FROM product_views ORDER BY product_id"
        )
        .fetch_all(pool)
        .await
        })?;
        rows.into_iter()
            .map(|(product_id, price, available, reserved, sold)| {
                Ok(ProductRecord {
                    product_id,
                    price: price
                        .map(|p| p.parse())
                        .transpose()
                        .map_err(|e| StoreError::CorruptRow(format!("price: {e}")))?,
                    available,
                    reserved,
                    sold,
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
    paid_at_ms: Option<i64>,
    completed_at_ms: Option<i64>,
}

impl OrderRow {
    fn into_record(self) -> Result<OrderStatusView, StoreError> {
        let bad =
            |what: &str| StoreError::CorruptRow(format!("order view {}: {what}", self.order_id));
        let status = OrderStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == self.status)
            .ok_or_else(|| bad("unknown status"))?;
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
            paid_at_ms: self.paid_at_ms,
            completed_at_ms: self.completed_at_ms,
            cancelled_at_ms: self.cancelled_at_ms,
            version: self.version,
            order_id: self.order_id,
        })
    }
}
