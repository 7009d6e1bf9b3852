//! The schema's output and input types: orders, their history, log
//! events, products, the saga's statistics, status changes.

use async_graphql::{Context, Enum, Error, InputObject, Json, Object, SimpleObject, ID};
use order_saga_domain as domain;
use order_saga_projections::{
    HistoryRecord, LogEntry, OrderStatusView, ProductRecord, Stage, StatRecord, StatusChange,
};

use crate::{backend, rfc3339};

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "OrderStatus")]
pub(crate) enum GqlOrderStatus {
    OrderCreated,
    OrderConfirmed,
    PaymentWait,
    PaymentCompleted,
    OrderCompleted,
    OrderCancelled,
}

impl From<domain::OrderStatus> for GqlOrderStatus {
    fn from(s: domain::OrderStatus) -> Self {
        match s {
            domain::OrderStatus::OrderCreated => GqlOrderStatus::OrderCreated,
            domain::OrderStatus::OrderConfirmed => GqlOrderStatus::OrderConfirmed,
            domain::OrderStatus::PaymentWait => GqlOrderStatus::PaymentWait,
            domain::OrderStatus::PaymentCompleted => GqlOrderStatus::PaymentCompleted,
            domain::OrderStatus::OrderCompleted => GqlOrderStatus::OrderCompleted,
            domain::OrderStatus::OrderCancelled => GqlOrderStatus::OrderCancelled,
        }
    }
}

impl From<GqlOrderStatus> for domain::OrderStatus {
    fn from(s: GqlOrderStatus) -> Self {
        match s {
            GqlOrderStatus::OrderCreated => domain::OrderStatus::OrderCreated,
            GqlOrderStatus::OrderConfirmed => domain::OrderStatus::OrderConfirmed,
            GqlOrderStatus::PaymentWait => domain::OrderStatus::PaymentWait,
            GqlOrderStatus::PaymentCompleted => domain::OrderStatus::PaymentCompleted,
            GqlOrderStatus::OrderCompleted => domain::OrderStatus::OrderCompleted,
            GqlOrderStatus::OrderCancelled => domain::OrderStatus::OrderCancelled,
        }
    }
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "CancelReason")]
pub(crate) enum GqlCancelReason {
    StockShortage,
    StockReservationTimeout,
    ConfirmationFailed,
    PaymentWaitFailed,
    SagaTimeout,
    CustomerRequest,
    PaymentFailed,
    PaymentTimeout,
}

impl From<domain::CancelReason> for GqlCancelReason {
    fn from(r: domain::CancelReason) -> Self {
        match r {
            domain::CancelReason::StockShortage => GqlCancelReason::StockShortage,
            domain::CancelReason::StockReservationTimeout => {
                GqlCancelReason::StockReservationTimeout
            }
            domain::CancelReason::ConfirmationFailed => GqlCancelReason::ConfirmationFailed,
            domain::CancelReason::PaymentWaitFailed => GqlCancelReason::PaymentWaitFailed,
            domain::CancelReason::SagaTimeout => GqlCancelReason::SagaTimeout,
            domain::CancelReason::CustomerRequest => GqlCancelReason::CustomerRequest,
            domain::CancelReason::PaymentFailed => GqlCancelReason::PaymentFailed,
            domain::CancelReason::PaymentTimeout => GqlCancelReason::PaymentTimeout,
        }
    }
}

/// One line of an order; money is a decimal string with two places.
#[derive(SimpleObject)]
pub(crate) struct OrderItem {
    pub(crate) product_id: ID,
    pub(crate) quantity: i32,
    pub(crate) unit_price: String,
}

/// An order as the read model has it.
pub(crate) struct Order(pub(crate) OrderStatusView);

#[Object]
impl Order {
    async fn order_id(&self) -> ID {
        ID(self.0.order_id.clone())
    }
    async fn user_id(&self) -> &str {
        &self.0.user_id
    }
    async fn store_id(&self) -> &str {
        &self.0.store_id
    }
    async fn status(&self) -> GqlOrderStatus {
        self.0.status.into()
    }
    async fn items(&self) -> Vec<OrderItem> {
        self.0
            .items
            .iter()
            .map(|l| OrderItem {
                product_id: ID(l.product_id.clone()),
                quantity: i32::try_from(l.quantity).unwrap_or(i32::MAX),
                unit_price: l.unit_price.to_string(),
            })
            .collect()
    }
    /// Decimal string with two places, e.g. "25800.00".
    async fn total_amount(&self) -> String {
        self.0.total_amount.to_string()
    }
    async fn cancel_reason(&self) -> Option<GqlCancelReason> {
        self.0.cancel_reason.map(Into::into)
    }
    /// RFC 3339 timestamps of each step reached.
    async fn created_at(&self) -> String {
        rfc3339(self.0.created_at_ms)
    }
    async fn confirmed_at(&self) -> Option<String> {
        self.0.confirmed_at_ms.map(rfc3339)
    }
    async fn payment_wait_at(&self) -> Option<String> {
        self.0.payment_wait_at_ms.map(rfc3339)
    }
    /// When the order's payment was recorded.
    async fn paid_at(&self) -> Option<String> {
        self.0.paid_at_ms.map(rfc3339)
    }
    async fn completed_at(&self) -> Option<String> {
        self.0.completed_at_ms.map(rfc3339)
    }
    async fn cancelled_at(&self) -> Option<String> {
        self.0.cancelled_at_ms.map(rfc3339)
    }
    /// The last order event applied (its sequence number).
    async fn version(&self) -> i64 {
        self.0.version
    }
    /// The order's events and its stock reservation's, in log order.
    async fn history(&self, ctx: &Context<'_>) -> Result<Vec<HistoryEvent>, Error> {
        let history = backend(ctx)?.history(&self.0.order_id).await?;
        Ok(history.into_iter().map(HistoryEvent).collect())
    }
}

pub(crate) struct HistoryEvent(pub(crate) HistoryRecord);

#[Object]
impl HistoryEvent {
    /// Position in the global log.
    async fn position(&self) -> i64 {
        self.0.position
    }
    async fn aggregate_type(&self) -> &str {
        &self.0.aggregate_type
    }
    async fn sequence(&self) -> i64 {
        self.0.sequence
    }
    async fn event_type(&self) -> &str {
        &self.0.event_type
    }
    async fn recorded_at(&self) -> String {
        rfc3339(self.0.recorded_at_ms)
    }
    async fn payload(&self) -> Json<serde_json::Value> {
        Json(self.0.payload.clone())
    }
}

/// An entry of the global log, for analysts.
pub(crate) struct LogEvent(pub(crate) LogEntry);

#[Object]
impl LogEvent {
    /// Position in the global log (pass the last one as `after`).
    async fn position(&self) -> i64 {
        self.0.position
    }
    async fn event_id(&self) -> String {
        self.0.event_id.to_string()
    }
    async fn recorded_at(&self) -> String {
        self.0.recorded_at_text()
    }
    async fn aggregate_type(&self) -> &str {
        &self.0.aggregate_type
    }
    async fn aggregate_id(&self) -> &str {
        &self.0.aggregate_id
    }
    async fn sequence(&self) -> i64 {
        self.0.sequence
    }
    async fn event_type(&self) -> &str {
        &self.0.event_type
    }
    async fn payload(&self) -> Json<serde_json::Value> {
        Json(self.0.payload.clone())
    }
    async fn metadata(&self) -> Json<serde_json::Value> {
        Json(self.0.metadata.clone())
    }
}

pub(crate) struct Product(pub(crate) ProductRecord);

#[Object]
impl Product {
    async fn product_id(&self) -> ID {
        ID(self.0.product_id.clone())
    }
    /// Unit price, a decimal string; null until one is set.
    async fn price(&self) -> Option<String> {
        self.0.price.map(|p| p.to_string())
    }
    async fn available(&self) -> i64 {
        self.0.available
    }
    async fn reserved(&self) -> i64 {
        self.0.reserved
    }
    /// Units sold to paid orders.
    async fn sold(&self) -> i64 {
        self.0.sold
    }
}

#[derive(SimpleObject)]
pub(crate) struct ReasonCount {
    pub(crate) reason: String,
    pub(crate) count: i64,
}

#[derive(SimpleObject)]
pub(crate) struct StageStats {
    pub(crate) stage: String,
    pub(crate) count: i64,
    pub(crate) average_ms: f64,
    pub(crate) max_ms: i64,
}

#[derive(SimpleObject)]
pub(crate) struct SagaStats {
    pub(crate) orders_created: i64,
    /// Sagas that reached PAYMENT_WAIT.
    pub(crate) completed: i64,
    pub(crate) cancelled: i64,
    pub(crate) in_progress: i64,
    pub(crate) reservations_ok: i64,
    pub(crate) reservations_failed: i64,
    /// Orders in PAYMENT_WAIT: reached it, and no payment result yet.
    pub(crate) awaiting_payment: i64,
    /// Payments the orders took.
    pub(crate) payments_completed: i64,
    /// Payments the orders did not take (after cancellation, a second
    /// payment, a wrong amount): refunded by the payment side.
    pub(crate) payments_rejected: i64,
    pub(crate) orders_completed: i64,
    pub(crate) cancel_reasons: Vec<ReasonCount>,
    pub(crate) stages: Vec<StageStats>,
}

impl SagaStats {
    pub(crate) fn from_records(records: &[StatRecord]) -> Self {
        let count = |metric: &str| {
            records
                .iter()
                .find(|r| r.metric == metric)
                .map_or(0, |r| r.count)
        };
        let completed = count(order_saga_projections::OUTCOME_PAYMENT_WAIT);
        let cancelled = count(order_saga_projections::OUTCOME_CANCELLED);
        let created = count(order_saga_projections::ORDERS_CREATED);
        let paid = count(order_saga_projections::PAYMENTS_COMPLETED);
        let payment_cancels: i64 = domain::CancelReason::ALL
            .into_iter()
            .filter(|r| r.ends_payment_wait())
            .map(|r| count(&order_saga_projections::cancel_reason_metric(r)))
            .sum();
        SagaStats {
            awaiting_payment: completed - paid - payment_cancels,
            payments_completed: paid,
            payments_rejected: count(order_saga_projections::PAYMENTS_REJECTED),
            orders_completed: count(order_saga_projections::ORDERS_COMPLETED),
            orders_created: created,
            completed,
            cancelled,
            in_progress: created - completed - cancelled,
            reservations_ok: count(order_saga_projections::RESERVATIONS_OK),
            reservations_failed: count(order_saga_projections::RESERVATIONS_FAILED),
            cancel_reasons: records
                .iter()
                .filter_map(|r| {
                    let reason = r.metric.strip_prefix("cancel_reason.")?;
                    Some(ReasonCount {
                        reason: reason.to_string(),
                        count: r.count,
                    })
                })
                .collect(),
            stages: Stage::ALL
                .iter()
                .filter_map(|stage| {
                    let r = records
                        .iter()
                        .find(|r| r.metric == order_saga_projections::stage_metric(*stage))?;
                    Some(StageStats {
                        stage: stage.as_str().to_string(),
                        count: r.count,
                        average_ms: r.total_ms as f64 / r.count.max(1) as f64,
                        max_ms: r.max_ms,
                    })
                })
                .collect(),
        }
    }
}

#[derive(InputObject, Default)]
pub(crate) struct OrderFilterInput {
    pub(crate) status: Option<GqlOrderStatus>,
    pub(crate) user_id: Option<String>,
    pub(crate) store_id: Option<String>,
}

#[derive(InputObject)]
pub(crate) struct OrderItemInput {
    pub(crate) product_id: String,
    pub(crate) quantity: i64,
}

#[derive(InputObject)]
pub(crate) struct CreateOrderInput {
    /// Whose order: a customer's own when omitted (and only theirs).
    pub(crate) user_id: Option<String>,
    pub(crate) store_id: String,
    pub(crate) items: Vec<OrderItemInput>,
}

/// A status an order reached.
#[derive(SimpleObject)]
pub(crate) struct OrderStatusChange {
    pub(crate) order_id: ID,
    pub(crate) status: GqlOrderStatus,
    pub(crate) cancel_reason: Option<GqlCancelReason>,
    pub(crate) version: i64,
    pub(crate) at: String,
}

impl From<StatusChange> for OrderStatusChange {
    fn from(c: StatusChange) -> Self {
        OrderStatusChange {
            order_id: ID(c.order_id),
            status: c.status.into(),
            cancel_reason: c.cancel_reason.map(Into::into),
            version: c.version,
            at: rfc3339(c.at_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(metric: &str, count: i64) -> StatRecord {
        StatRecord {
            metric: metric.to_string(),
            count,
            total_ms: 0,
            max_ms: 0,
        }
    }

    #[test]
    fn saga_stats_count_the_payment_phase_apart_from_the_creation_saga() {
        let stats = SagaStats::from_records(&[
            stat("orders.created", 10),
            stat("outcome.PAYMENT_WAIT", 8),
            stat("outcome.ORDER_CANCELLED", 2),
            stat("payments.completed", 4),
            stat("payments.rejected", 1),
            stat("outcome.ORDER_COMPLETED", 3),
            stat("cancel_reason.STOCK_SHORTAGE", 2),
            stat("cancel_reason.PAYMENT_FAILED", 1),
            stat("cancel_reason.PAYMENT_TIMEOUT", 2),
        ]);
        assert_eq!(
            (stats.completed, stats.cancelled, stats.in_progress),
            (8, 2, 0)
        );
        assert_eq!(
            (
                stats.awaiting_payment,
                stats.payments_completed,
                stats.payments_rejected,
                stats.orders_completed
            ),
            (1, 4, 1, 3)
        );
    }
}
