//! The GraphQL schema of order-saga (async-graphql): queries over the read
//! models, mutations through the service's use cases, and a subscription to
//! an order's status changes.
//!
//! The schema knows nothing of stores or HTTP: everything it reads or does
//! goes through the [`Backend`] trait, which the service implements. Errors
//! carry `extensions.code` (`BAD_USER_INPUT`, `NOT_FOUND`, `CONFLICT`,
//! `INTERNAL`, `UNAVAILABLE`) and, for bad input, `extensions.field`.

use std::sync::Arc;

use async_graphql::connection::{query, Connection, Edge};
use async_graphql::{
    Context, Enum, Error, ErrorExtensions, InputObject, Json, Object, Schema, SimpleObject,
    Subscription, ID,
};
use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use futures_util::stream::{BoxStream, Stream, StreamExt};
use order_saga_domain as domain;
use order_saga_projections::{
    HistoryRecord, LogEntry, OrderFilter, OrderStatusView, ProductRecord, Stage, StatRecord,
    StatusChange,
};

/// Most orders one page may ask for.
pub const MAX_PAGE: i32 = 100;
/// Query depth and complexity limits.
pub const MAX_DEPTH: usize = 16;
pub const MAX_COMPLEXITY: usize = 2_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadUserInput,
    NotFound,
    Conflict,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadUserInput => "BAD_USER_INPUT",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

/// A refusal or failure from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError {
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
}

impl BackendError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        BackendError {
            code,
            message: message.into(),
            field: None,
        }
    }

    fn bad_input(field: &str, message: impl Into<String>) -> Self {
        BackendError {
            code: ErrorCode::BadUserInput,
            message: message.into(),
            field: Some(field.to_string()),
        }
    }
}

impl From<BackendError> for Error {
    fn from(e: BackendError) -> Self {
        Error::new(e.message).extend_with(|_, ext| {
            ext.set("code", e.code.as_str());
            if let Some(field) = &e.field {
                ext.set("field", field.as_str());
            }
        })
    }
}

/// A new order as a client asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub user_id: String,
    pub store_id: String,
    pub items: Vec<domain::ItemRequest>,
}

/// Most log events one `events` query returns.
pub const MAX_EVENTS: i32 = 1_000;

/// What the schema reads and does; implemented by the service.
#[async_trait]
pub trait Backend: Send + Sync {
    async fn order(&self, order_id: &str) -> Result<Option<OrderStatusView>, BackendError>;
    async fn orders(
        &self,
        filter: &OrderFilter,
        after: i64,
        limit: i64,
    ) -> Result<Vec<OrderStatusView>, BackendError>;
    async fn history(&self, order_id: &str) -> Result<Vec<HistoryRecord>, BackendError>;
    async fn product(&self, product_id: &str) -> Result<Option<ProductRecord>, BackendError>;
    async fn stats(&self) -> Result<Vec<StatRecord>, BackendError>;
    /// Up to `first` log entries after `after`, of the given event types
    /// (all when empty), in position order.
    async fn events(
        &self,
        after: i64,
        first: i64,
        types: &[String],
    ) -> Result<Vec<LogEntry>, BackendError>;
    /// Creates the order and returns it once the read model has it.
    async fn create_order(&self, order: NewOrder) -> Result<OrderStatusView, BackendError>;
    /// Cancels (CUSTOMER_REQUEST) and returns it once the read model has it.
    async fn cancel_order(&self, order_id: &str) -> Result<OrderStatusView, BackendError>;
    async fn set_product(
        &self,
        product_id: &str,
        price: Option<domain::Money>,
        stock: Option<u32>,
    ) -> Result<ProductRecord, BackendError>;
    /// Every status the order has had, then each new one as it is projected;
    /// ends after a final status (PAYMENT_WAIT or ORDER_CANCELLED).
    fn status_changes(&self, order_id: &str) -> BoxStream<'static, StatusChange>;
}

pub type OrderSagaSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// The schema with its limits; `backend` may be `None` for printing the SDL.
pub fn schema(backend: Option<Arc<dyn Backend>>) -> OrderSagaSchema {
    let builder = Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .limit_depth(MAX_DEPTH)
        .limit_complexity(MAX_COMPLEXITY);
    match backend {
        Some(backend) => builder.data(backend).finish(),
        None => builder.finish(),
    }
}

fn backend<'a>(ctx: &'a Context<'_>) -> Result<&'a Arc<dyn Backend>, Error> {
    ctx.data::<Arc<dyn Backend>>()
}

fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "OrderStatus")]
pub enum GqlOrderStatus {
    OrderCreated,
    OrderConfirmed,
    PaymentWait,
    OrderCancelled,
}

impl From<domain::OrderStatus> for GqlOrderStatus {
    fn from(s: domain::OrderStatus) -> Self {
        match s {
            domain::OrderStatus::OrderCreated => GqlOrderStatus::OrderCreated,
            domain::OrderStatus::OrderConfirmed => GqlOrderStatus::OrderConfirmed,
            domain::OrderStatus::PaymentWait => GqlOrderStatus::PaymentWait,
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
            GqlOrderStatus::OrderCancelled => domain::OrderStatus::OrderCancelled,
        }
    }
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "CancelReason")]
pub enum GqlCancelReason {
    StockShortage,
    StockReservationTimeout,
    ConfirmationFailed,
    PaymentWaitFailed,
    SagaTimeout,
    CustomerRequest,
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
        }
    }
}

/// One line of an order; money is a decimal string with two places.
#[derive(SimpleObject)]
pub struct OrderItem {
    product_id: ID,
    quantity: i32,
    unit_price: String,
}

/// An order as the read model has it.
pub struct Order(OrderStatusView);

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

pub struct HistoryEvent(HistoryRecord);

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
pub struct LogEvent(LogEntry);

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

pub struct Product(ProductRecord);

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
}

#[derive(SimpleObject)]
pub struct ReasonCount {
    reason: String,
    count: i64,
}

#[derive(SimpleObject)]
pub struct StageStats {
    stage: String,
    count: i64,
    average_ms: f64,
    max_ms: i64,
}

#[derive(SimpleObject)]
pub struct SagaStats {
    orders_created: i64,
    /// Sagas that reached PAYMENT_WAIT.
    completed: i64,
    cancelled: i64,
    in_progress: i64,
    reservations_ok: i64,
    reservations_failed: i64,
    cancel_reasons: Vec<ReasonCount>,
    stages: Vec<StageStats>,
}

impl SagaStats {
    fn from_records(records: &[StatRecord]) -> Self {
        let count = |metric: &str| {
            records
                .iter()
                .find(|r| r.metric == metric)
                .map_or(0, |r| r.count)
        };
        let completed = count(order_saga_projections::OUTCOME_PAYMENT_WAIT);
        let cancelled = count(order_saga_projections::OUTCOME_CANCELLED);
        let created = count(order_saga_projections::ORDERS_CREATED);
        SagaStats {
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
pub struct OrderFilterInput {
    status: Option<GqlOrderStatus>,
    user_id: Option<String>,
    store_id: Option<String>,
}

#[derive(InputObject)]
pub struct OrderItemInput {
    product_id: String,
    quantity: i64,
}

#[derive(InputObject)]
pub struct CreateOrderInput {
    user_id: String,
    store_id: String,
    items: Vec<OrderItemInput>,
}

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// One order, from the read model.
    async fn order(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Order>, Error> {
        Ok(backend(ctx)?.order(&id).await?.map(Order))
    }

    /// Orders, oldest first, filtered; Relay-style cursor pagination
    /// (`first` at most 100, default 20).
    async fn orders(
        &self,
        ctx: &Context<'_>,
        filter: Option<OrderFilterInput>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<i64, Order>, Error> {
        let backend = backend(ctx)?.clone();
        let filter = filter.unwrap_or_default();
        let filter = OrderFilter {
            status: filter.status.map(Into::into),
            user_id: filter.user_id,
            store_id: filter.store_id,
        };
        let first = first.unwrap_or(20);
        if !(0..=MAX_PAGE).contains(&first) {
            return Err(BackendError::bad_input(
                "first",
                format!("first: must be between 0 and {MAX_PAGE}"),
            )
            .into());
        }
        query(
            after,
            None,
            Some(first),
            None,
            |after: Option<i64>, _before: Option<i64>, first, _last| async move {
                let limit = first.unwrap_or(20) as i64;
                let mut records = backend
                    .orders(&filter, after.unwrap_or(0), limit + 1)
                    .await?;
                let has_next = records.len() as i64 > limit;
                records.truncate(limit as usize);
                let mut connection = Connection::new(after.is_some(), has_next);
                connection.edges.extend(
                    records
                        .into_iter()
                        .map(|r| Edge::new(r.created_position, Order(r))),
                );
                Ok::<_, Error>(connection)
            },
        )
        .await
    }

    /// The order's history: its events and its stock reservation's.
    async fn order_history(&self, ctx: &Context<'_>, id: ID) -> Result<Vec<HistoryEvent>, Error> {
        let backend = backend(ctx)?;
        if backend.order(&id).await?.is_none() {
            return Err(BackendError::new(
                ErrorCode::NotFound,
                format!("order '{}' not found", id.as_str()),
            )
            .into());
        }
        Ok(backend
            .history(&id)
            .await?
            .into_iter()
            .map(HistoryEvent)
            .collect())
    }

    async fn product(&self, ctx: &Context<'_>, product_id: ID) -> Result<Option<Product>, Error> {
        Ok(backend(ctx)?.product(&product_id).await?.map(Product))
    }

    /// The global log after a position, for analysts' notebooks: at most
    /// `first` (≤ 1000) events, optionally only of the given event types.
    async fn events(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 0)] after: i64,
        #[graphql(default = 100)] first: i32,
        #[graphql(name = "type")] types: Option<Vec<String>>,
    ) -> Result<Vec<LogEvent>, Error> {
        if !(1..=MAX_EVENTS).contains(&first) {
            return Err(BackendError::bad_input(
                "first",
                format!("first: must be between 1 and {MAX_EVENTS}"),
            )
            .into());
        }
        let events = backend(ctx)?
            .events(after, i64::from(first), &types.unwrap_or_default())
            .await?;
        Ok(events.into_iter().map(LogEvent).collect())
    }

    /// Counts per outcome and cancel reason, and per-stage durations.
    async fn saga_stats(&self, ctx: &Context<'_>) -> Result<SagaStats, Error> {
        Ok(SagaStats::from_records(&backend(ctx)?.stats().await?))
    }
}

pub struct MutationRoot;

#[Object]
impl MutationRoot {
    /// Accepts an order (prices come from the catalog); the saga runs on.
    async fn create_order(
        &self,
        ctx: &Context<'_>,
        input: CreateOrderInput,
    ) -> Result<Order, Error> {
        let order = NewOrder {
            user_id: input.user_id,
            store_id: input.store_id,
            items: input
                .items
                .into_iter()
                .map(|i| domain::ItemRequest {
                    product_id: i.product_id,
                    quantity: i.quantity,
                })
                .collect(),
        };
        Ok(Order(backend(ctx)?.create_order(order).await?))
    }

    /// Cancels an order at the customer's request (CUSTOMER_REQUEST); only
    /// before it waits for payment.
    async fn cancel_order(&self, ctx: &Context<'_>, id: ID) -> Result<Order, Error> {
        Ok(Order(backend(ctx)?.cancel_order(&id).await?))
    }

    /// Sets a product's price (decimal string) and/or available stock.
    async fn set_product(
        &self,
        ctx: &Context<'_>,
        product_id: ID,
        price: Option<String>,
        stock: Option<i64>,
    ) -> Result<Product, Error> {
        let price = price
            .map(|p| p.parse::<domain::Money>())
            .transpose()
            .map_err(|e| BackendError::bad_input("price", format!("price: {e}")))?;
        let stock = stock.map(u32::try_from).transpose().map_err(|_| {
            BackendError::bad_input("stock", "stock: must be between 0 and 1000000000")
        })?;
        Ok(Product(
            backend(ctx)?.set_product(&product_id, price, stock).await?,
        ))
    }
}

/// A status an order reached.
#[derive(SimpleObject)]
pub struct OrderStatusChange {
    order_id: ID,
    status: GqlOrderStatus,
    cancel_reason: Option<GqlCancelReason>,
    version: i64,
    at: String,
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

pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// Every status the order has had, then each new one as it happens; the
    /// stream ends after PAYMENT_WAIT or ORDER_CANCELLED.
    async fn order_status_changed(
        &self,
        ctx: &Context<'_>,
        order_id: ID,
    ) -> Result<impl Stream<Item = OrderStatusChange>, Error> {
        let backend = backend(ctx)?;
        if backend.order(&order_id).await?.is_none() {
            return Err(BackendError::new(
                ErrorCode::NotFound,
                format!("order '{}' not found", order_id.as_str()),
            )
            .into());
        }
        Ok(backend
            .status_changes(&order_id)
            .map(OrderStatusChange::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed SDL is the schema's: regenerate with
    /// `UPDATE_SCHEMA=1 cargo test -p order-saga-graphql`.
    #[test]
    fn the_committed_sdl_matches_the_code() {
        let sdl = schema(None).sdl();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql");
        if std::env::var_os("UPDATE_SCHEMA").is_some() {
            std::fs::write(path, &sdl).expect("write schema.graphql");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == sdl,
            "graphql/schema.graphql differs from the code; run UPDATE_SCHEMA=1 cargo test -p order-saga-graphql"
        );
    }
}
