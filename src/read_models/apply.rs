//! Log entries into read-model changes: each entry's [`ReadOp`]s
//! (`order-saga-projections`), gathered per batch into one write per table
//! and statement shape, timed stages counted into the statistics.

use order_saga_domain::CancelReason;
use order_saga_projections::{project, OrderTime, ReadOp, StageStart, StatusChange};

use super::StageStarts;
use crate::store::read_models::{
    add_history, add_orders, add_stats, add_stock, set_price, stage_start, OrderChanges,
    OrderInsert, ReadModelTx, Stats, StockChanges, Target,
};
use crate::store::{LogEntry, StoreError};

/// Applies log entries to `target`'s tables; returns the status changes.
pub(crate) async fn apply_entries(
    tx: &mut ReadModelTx,
    entries: &[LogEntry],
    target: Target,
    starts: &StageStarts,
) -> Result<Vec<StatusChange>, StoreError> {
    let mut changes = Vec::new();
    let mut stats = Stats::new();
    let mut history = Vec::new();
    let mut stock = StockChanges::new();
    let mut orders = OrderChanges::default();
    for entry in entries {
        match project(entry) {
            Ok(ops) => {
                for op in ops {
                    changes.extend(op.status_change());
                    match op {
                        // Written together after the loop: nothing in the
                        // batch reads them back.
                        ReadOp::History { .. } => history.push(op),
                        ReadOp::ProductStock {
                            product_id,
                            available,
                            reserved_delta,
                            sold_delta,
                        } => {
                            let change = stock.entry(product_id).or_insert((available, 0, 0));
                            change.0 = available;
                            change.1 += reserved_delta;
                            change.2 += sold_delta;
                        }
                        ReadOp::InsertOrder { .. }
                        | ReadOp::SetStatus { .. }
                        | ReadOp::OrderVersion { .. }
                        | ReadOp::StockReplied { .. } => orders.add(op, target, starts)?,
                        op => apply(tx, &op, target, &mut stats, starts, &orders).await?,
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "projection skipped an unreadable event"),
        }
    }
    add_orders(tx, target, &orders).await?;
    add_history(tx, target, &history).await?;
    add_stock(tx, target, &stock).await?;
    add_stats(tx, target, &stats).await?;
    Ok(changes)
}

impl OrderChanges {
    fn add(&mut self, op: ReadOp, target: Target, starts: &StageStarts) -> Result<(), StoreError> {
        match op {
            ReadOp::InsertOrder {
                order_id,
                position,
                user_id,
                store_id,
                items,
                total_amount,
                at_ms,
                version,
            } => {
                let items = serde_json::to_string(&items)
                    .map_err(|e| StoreError::CorruptRow(e.to_string()))?;
                starts.remember(target, &order_id, StageStart::Created, at_ms);
                self.new.push(OrderInsert {
                    order_id,
                    position,
                    user_id,
                    store_id,
                    items,
                    total_amount: total_amount.to_string(),
                    at_ms,
                    version,
                });
            }
            ReadOp::SetStatus {
                order_id,
                status,
                time,
                cancel_reason,
                at_ms,
                version,
            } => {
                if matches!(time, OrderTime::Confirmed) {
                    starts.remember(target, &order_id, StageStart::Confirmed, at_ms);
                }
                let patch = self.set.entry(order_id).or_default();
                patch.status = Some((status.as_str(), cancel_reason.map(CancelReason::as_str)));
                patch.version = patch.version.max(Some(version));
                *match time {
                    OrderTime::Confirmed => &mut patch.confirmed_at_ms,
                    OrderTime::PaymentWait => &mut patch.payment_wait_at_ms,
                    OrderTime::Paid => &mut patch.paid_at_ms,
                    OrderTime::Completed => &mut patch.completed_at_ms,
                    OrderTime::Cancelled => &mut patch.cancelled_at_ms,
                } = Some(at_ms);
            }
            ReadOp::OrderVersion { order_id, version } => {
                let patch = self.set.entry(order_id).or_default();
                patch.version = patch.version.max(Some(version));
            }
            ReadOp::StockReplied { order_id, at_ms } => {
                starts.remember(target, &order_id, StageStart::StockReplied, at_ms);
                self.set.entry(order_id).or_default().stock_replied_at_ms = Some(at_ms);
            }
            _ => {}
        }
        Ok(())
    }

    /// A stage's start set earlier in this batch, not yet written.
    fn start(&self, order_id: &str, from: StageStart) -> Option<i64> {
        match from {
            StageStart::Created => self
                .new
                .iter()
                .find(|o| o.order_id == order_id)
                .map(|o| o.at_ms),
            StageStart::StockReplied => self.set.get(order_id)?.stock_replied_at_ms,
            StageStart::Confirmed => self.set.get(order_id)?.confirmed_at_ms,
        }
    }
}

fn count(stats: &mut Stats, metric: &str, duration_ms: Option<i64>) {
    let ms = duration_ms.unwrap_or(0);
    let entry = stats.entry(metric.to_string()).or_insert((0, 0, 0));
    entry.0 += 1;
    entry.1 += ms;
    entry.2 = entry.2.max(ms);
}

async fn apply(
    tx: &mut ReadModelTx,
    op: &ReadOp,
    target: Target,
    stats: &mut Stats,
    starts: &StageStarts,
    pending: &OrderChanges,
) -> Result<(), StoreError> {
    match op {
        // Gathered by `apply_entries` into `OrderChanges`.
        ReadOp::InsertOrder { .. }
        | ReadOp::SetStatus { .. }
        | ReadOp::OrderVersion { .. }
        | ReadOp::StockReplied { .. } => {}
        ReadOp::ProductPrice { product_id, price } => {
            set_price(tx, target, product_id, &price.to_string()).await?;
        }
        // Batched by `apply_entries`.
        ReadOp::History { .. } | ReadOp::ProductStock { .. } => {}
        ReadOp::Count { metric } => count(stats, metric, None),
        ReadOp::StageDone {
            order_id,
            stage,
            from,
            at_ms,
        } => {
            let started = match starts
                .recall(target, order_id, *from)
                .or_else(|| pending.start(order_id, *from))
            {
                Some(started) => Some(started),
                None => stage_start(tx, target, order_id, *from).await?,
            };
            if let Some(started) = started {
                let metric = order_saga_projections::stage_metric(*stage);
                count(stats, &metric, Some((at_ms - started).max(0)));
            }
        }
    }
    Ok(())
}
