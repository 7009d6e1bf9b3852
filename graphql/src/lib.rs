//! The GraphQL schema of order-saga (async-graphql): queries over the read
//! models, mutations through the service's use cases, and a subscription to
//! an order's status changes.
//!
//! The schema knows nothing of stores or HTTP: everything it reads or does
//! goes through the [`Backend`] trait, which the service implements. Errors
//! carry `extensions.code` (`BAD_USER_INPUT`, `NOT_FOUND`, `CONFLICT`,
//! `INTERNAL`, `UNAVAILABLE`, `STORE_UNAVAILABLE`, `STORAGE_FULL`,
//! `UNAUTHENTICATED`, `FORBIDDEN`) and, for bad input, `extensions.field`.
//!
//! Every resolver asks the request's [`Caller`] (request or connection
//! data, set by the HTTP layer) what it may see: see [`access`].

pub mod access;
mod objects;
mod operations;
mod roots;

pub use access::Caller;
pub use roots::{MutationRoot, QueryRoot, SubscriptionRoot};

use std::sync::Arc;

use async_graphql::{Context, Error, ErrorExtensions, Schema};
use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use futures_util::stream::BoxStream;
use order_saga_domain as domain;
use order_saga_projections::{
    DeadLetterRecord, HistoryRecord, LogEntry, OrderFilter, OrderStatusView, ProductRecord,
    StatRecord, StatusChange, StuckSagaRecord,
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
    /// The store is unreachable; try again shortly.
    StoreUnavailable,
    /// The store has no space left; try again later.
    StorageFull,
    Internal,
    Unauthenticated,
    Forbidden,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadUserInput => "BAD_USER_INPUT",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::StoreUnavailable => "STORE_UNAVAILABLE",
            ErrorCode::StorageFull => "STORAGE_FULL",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
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

/// What a redrive did: HANDLED, FAILED (with the error) or NOT_PENDING,
/// and the dead letter after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedriveRecord {
    pub outcome: String,
    pub error: Option<String>,
    pub dead_letter: DeadLetterRecord,
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
    /// Dead letters, oldest first: all, or those in `status` (PENDING,
    /// REDRIVEN, DISCARDED).
    async fn dead_letters(
        &self,
        status: Option<&str>,
    ) -> Result<Vec<DeadLetterRecord>, BackendError>;
    async fn dead_letter(&self, id: i64) -> Result<Option<DeadLetterRecord>, BackendError>;
    /// Hands a pending dead letter back to its consumer; `None` if there is
    /// no such dead letter.
    async fn redrive_dead_letter(&self, id: i64) -> Result<Option<RedriveRecord>, BackendError>;
    /// Sets a pending dead letter aside (CONFLICT if it is not pending).
    async fn discard_dead_letter(&self, id: i64) -> Result<Option<DeadLetterRecord>, BackendError>;
    /// Sagas not ended `older_than` after they should have.
    async fn stuck_sagas(
        &self,
        older_than: std::time::Duration,
    ) -> Result<Vec<StuckSagaRecord>, BackendError>;
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

/// The request's caller; a request without one (never from the HTTP
/// layer) is refused.
fn caller<'a>(ctx: &'a Context<'_>) -> Result<&'a Caller, Error> {
    ctx.data_opt::<Caller>().ok_or_else(|| {
        BackendError::new(ErrorCode::Unauthenticated, "no caller on this request").into()
    })
}

/// NOT_FOUND for an order, unknown or another customer's alike.
fn order_not_found(order_id: &str) -> BackendError {
    BackendError::new(ErrorCode::NotFound, format!("order '{order_id}' not found"))
}

fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
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
