//! The application's use cases over the event store: create and read
//! orders, set and show products. Also the adapters through which the
//! aggregates reach the rest of the store: the catalog the Order prices from,
//! the stock ledger the StockReservation holds stock through, and the hold
//! records a Product looks its orders' holds up in.
//!
//! Every refusal becomes an [`AppError`], which the HTTP layer and the CLI
//! turn into their own shapes.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use cqrs_es::AggregateError;
use order_saga_domain::order::MAX_ITEMS;
use order_saga_domain::{
    validate_id, CancelReason, Catalog, CatalogError, FieldError, HoldRecords, ItemRequest,
    LedgerError, Money, Order, OrderCommand, OrderError, OrderLine, OrderServices, OrderStatus,
    Product, ProductCommand, ProductError, ProductLedger, ProductServices, ProductStock,
    RecordsError,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::fault::Fault;
use crate::store::{Store, StoreError};

/// How often a command is retried when a concurrent writer changed its
/// aggregate first.
const CONFLICT_ATTEMPTS: u32 = 50;

/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{field}: unknown product '{product_id}'")]
    UnknownProduct { field: String, product_id: String },
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    /// The store is unreachable or full: a 503 naming which, with
    /// `Retry-After`.
    #[error("{}: {message}", fault.code())]
    Fault { fault: Fault, message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match Fault::of(&e) {
            Some(fault) => AppError::fault(fault, &e),
            None => AppError::Internal(e.to_string()),
        }
    }
}

impl AppError {
    fn fault(fault: Fault, e: &dyn std::fmt::Display) -> Self {
        AppError::Fault {
            fault,
            message: e.to_string(),
        }
    }

    /// A failure of the store reached through an adapter, as its text:
    /// a fault, the store unreachable unless the text says full.
    fn store_text(e: &dyn std::fmt::Display) -> Self {
        let message = e.to_string();
        let fault = Fault::in_text(&message).unwrap_or(Fault::StoreUnavailable);
        AppError::Fault { fault, message }
    }
}

fn from_aggregate<E: std::error::Error>(
    e: AggregateError<E>,
    user: impl FnOnce(E) -> AppError,
) -> AppError {
    match e {
        AggregateError::UserError(e) => user(e),
        AggregateError::AggregateConflict => {
            AppError::Conflict("changed concurrently, try again".into())
        }
        AggregateError::DatabaseConnectionError(e) => {
            AppError::fault(Fault::of(&*e).unwrap_or(Fault::StoreUnavailable), &e)
        }
        AggregateError::UnexpectedError(e) => match Fault::of(&*e) {
            Some(fault) => AppError::fault(fault, &e),
            None => AppError::Internal(e.to_string()),
        },
        AggregateError::DeserializationError(e) => AppError::Internal(e.to_string()),
    }
}

fn from_order_error(e: OrderError) -> AppError {
    match e {
        OrderError::Invalid(e) => AppError::Invalid(e),
        OrderError::UnknownProduct { field, product_id } => {
            AppError::UnknownProduct { field, product_id }
        }
        OrderError::NotFound => AppError::NotFound,
        OrderError::AlreadyExists | OrderError::InvalidTransition { .. } => {
            AppError::Conflict(e.to_string())
        }
        OrderError::Catalog(e) => AppError::store_text(&e),
    }
}

fn from_product_error(e: ProductError) -> AppError {
    match e {
        ProductError::Invalid(e) => AppError::Invalid(e),
        ProductError::UnknownProduct => AppError::NotFound,
        ProductError::InsufficientStock { .. } => AppError::Conflict(e.to_string()),
        ProductError::Records(e) => AppError::store_text(&e),
    }
}

/// `POST /api/v1/orders`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateOrderRequest {
    /// May be omitted by a customer (their token's `sub` is used); empty
    /// when omitted.
    #[serde(default)]
    pub user_id: String,
    pub store_id: String,
    pub items: Vec<ItemRequest>,
}

/// An order as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    pub order_id: String,
    pub status: OrderStatus,
    pub user_id: String,
    pub store_id: String,
    pub items: Vec<OrderLine>,
    pub total_amount: Money,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<CancelReason>,
    /// How many events the order has (its last sequence number).
    pub version: i64,
}

impl OrderView {
    /// The view of an order's state after `version` events.
    pub fn from_aggregate(order_id: &str, order: Order, version: i64) -> Option<Self> {
        Self::of(order_id, order, usize::try_from(version).ok()?)
    }

    fn of(order_id: &str, order: Order, version: usize) -> Option<Self> {
        Some(OrderView {
            version: i64::try_from(version).unwrap_or(i64::MAX),
            order_id: order_id.to_string(),
            status: order.status?,
            user_id: order.user_id,
            store_id: order.store_id,
            items: order.items,
            total_amount: order.total_amount,
            cancel_reason: order.cancel_reason,
        })
    }
}

/// A product as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductView {
    pub product_id: String,
    pub price: Option<Money>,
    pub available: u32,
    pub reserved: u64,
    /// Units sold to paid orders.
    pub sold: u64,
}

impl ProductView {
    fn of(product_id: &str, product: &Product) -> Self {
        ProductView {
            product_id: product_id.to_string(),
            price: product.price,
            available: product.available,
            reserved: product.reserved,
            sold: product.sold,
        }
    }
}

/// The order service's use cases.
pub struct App {
    store: Store,
    order_services: OrderServices,
}

impl App {
    pub fn new(store: Store) -> Arc<Self> {
        let catalog = Arc::new(StoreCatalog::new(store.clone()));
        Arc::new(App {
            order_services: OrderServices::new(catalog),
            store,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Accepts an order at once (stock is the saga's business). With an
    /// idempotency key, a retry of the same request returns the order the
    /// first one created; the same key with a different request is refused.
    pub async fn create_order(
        &self,
        request: CreateOrderRequest,
        idempotency_key: Option<&str>,
    ) -> Result<OrderView, AppError> {
        validate_request_shape(&request)?;
        // Time-ordered (UUID v7): new orders' rows land at the end of the
        // indexes keyed by order id instead of at random pages of them.
        let fresh_id = Uuid::now_v7().to_string();
        let order_id = match idempotency_key {
            None => fresh_id.clone(),
            Some(key) => self.claim_key(key, &fresh_id, &request).await?,
        };
        let command = OrderCommand::CreateOrder {
            user_id: request.user_id,
            store_id: request.store_id,
            items: request.items,
        };
        // The order's saga is correlated by one id across all its events,
        // and traced from the request that created it.
        let mut metadata = HashMap::from([(
            crate::saga::integration::CORRELATION_ID.to_string(),
            Uuid::new_v4().to_string(),
        )]);
        if let Some(traceparent) = crate::telemetry::current_traceparent() {
            metadata.insert(crate::telemetry::TRACEPARENT.to_string(), traceparent);
        }
        let services = &self.order_services;
        let result = if order_id == fresh_id {
            // An id made just now names no stored order: nothing to load.
            self.store
                .execute_new::<Order>(&order_id, command, services, metadata)
                .await
        } else {
            self.store
                .execute::<Order>(&order_id, command, services, metadata)
                .await
        };
        match result {
            Ok(done) => {
                metrics::counter!("order_saga_orders_created_total").increment(1);
                let version = done.events.last().map_or(0, |e| e.sequence);
                OrderView::of(&order_id, done.aggregate, version)
                    .ok_or_else(|| AppError::Internal("created order has no status".into()))
            }
            // The first request with this key got there before us.
            Err(AggregateError::UserError(OrderError::AlreadyExists))
            | Err(AggregateError::AggregateConflict)
                if idempotency_key.is_some() =>
            {
                self.order(&order_id).await?.ok_or(AppError::NotFound)
            }
            Err(e) => {
                metrics::counter!("order_saga_orders_rejected_total").increment(1);
                if let (Some(key), true) = (idempotency_key, order_id == fresh_id) {
                    self.store.release_idempotency_key(key, &order_id).await?;
                }
                Err(from_aggregate(e, from_order_error))
            }
        }
    }

    async fn claim_key(
        &self,
        key: &str,
        fresh_id: &str,
        request: &CreateOrderRequest,
    ) -> Result<String, AppError> {
        if key.is_empty()
            || key.len() > MAX_IDEMPOTENCY_KEY_LEN
            || key.chars().any(char::is_control)
        {
            return Err(FieldError::new(
                "Idempotency-Key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable characters"),
            )
            .into());
        }
        let fingerprint =
            serde_json::to_string(request).map_err(|e| AppError::Internal(e.to_string()))?;
        let (order_id, claimed_for) = self
            .store
            .claim_idempotency_key(key, fresh_id, &fingerprint)
            .await?;
        if claimed_for != fingerprint {
            return Err(
                FieldError::new("Idempotency-Key", "already used for a different request").into(),
            );
        }
        Ok(order_id)
    }

    pub async fn order(&self, order_id: &str) -> Result<Option<OrderView>, AppError> {
        let loaded = self
            .store
            .load::<Order>(order_id)
            .await
            .map_err(|e| from_aggregate(e, from_order_error))?;
        Ok(loaded.and_then(|(order, version)| OrderView::of(order_id, order, version)))
    }

    /// Cancels an order at the customer's request, which is allowed until
    /// it waits for payment. Returns the order as it now is.
    pub async fn cancel_order(&self, order_id: &str) -> Result<OrderView, AppError> {
        let command = OrderCommand::CancelOrder {
            reason: CancelReason::CustomerRequest,
            causation_id: None,
        };
        let done = self
            .store
            .execute_retrying::<Order>(
                order_id,
                command,
                &self.order_services,
                HashMap::new(),
                CONFLICT_ATTEMPTS,
            )
            .await
            .map_err(|e| {
                from_aggregate(e, |e| match e {
                    OrderError::InvalidTransition { status, .. } => AppError::Conflict(format!(
                        "order is {status}: only an order not yet waiting for payment can be cancelled"
                    )),
                    other => from_order_error(other),
                })
            })?;
        let version = done.events.last().map_or(0, |e| e.sequence);
        OrderView::of(order_id, done.aggregate, version).ok_or(AppError::NotFound)
    }

    /// Sets a product's price and/or stock level, creating it if new.
    pub async fn set_product(
        &self,
        product_id: &str,
        price: Option<Money>,
        stock: Option<u32>,
    ) -> Result<ProductView, AppError> {
        let product_id = validate_id("productId", product_id)?;
        let done = self
            .store
            .execute_retrying::<Product>(
                &product_id,
                ProductCommand::SetProduct { price, stock },
                &product_services(&self.store, &product_id),
                HashMap::new(),
                CONFLICT_ATTEMPTS,
            )
            .await
            .map_err(|e| from_aggregate(e, from_product_error))?;
        Ok(ProductView::of(&product_id, &done.aggregate))
    }

    pub async fn product(&self, product_id: &str) -> Result<Option<ProductView>, AppError> {
        let loaded = self
            .store
            .load::<Product>(product_id)
            .await
            .map_err(|e| from_aggregate(e, from_product_error))?;
        Ok(loaded.map(|(product, _)| ProductView::of(product_id, &product)))
    }

    /// Sagas that have not ended in time, oldest first (at most 1,000):
    /// created or confirmed more than `older_than` ago, or waiting for
    /// their payment more than `payment_timeout` + `older_than`.
    pub async fn stuck_sagas(
        &self,
        older_than: std::time::Duration,
        payment_timeout: std::time::Duration,
    ) -> Result<Vec<order_saga_projections::StuckSagaRecord>, AppError> {
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let now = chrono::Utc::now().timestamp_millis();
        let started_before = now.saturating_sub(ms(older_than));
        let waiting_before = started_before.saturating_sub(ms(payment_timeout));
        Ok(self
            .store
            .stuck_sagas(started_before, waiting_before, 1_000)
            .await?)
    }

    pub async fn products(&self) -> Result<Vec<ProductView>, AppError> {
        let mut views = Vec::new();
        for id in self
            .store
            .aggregate_ids(<Product as cqrs_es::Aggregate>::TYPE)
            .await?
        {
            if let Some(view) = self.product(&id).await? {
                views.push(view);
            }
        }
        Ok(views)
    }
}

/// Cheap checks that need no catalog, made before anything is stored (the
/// aggregate repeats them; this keeps a bad request from claiming a key).
fn validate_request_shape(request: &CreateOrderRequest) -> Result<(), FieldError> {
    validate_id("userId", &request.user_id)?;
    validate_id("storeId", &request.store_id)?;
    if request.items.is_empty() || request.items.len() > MAX_ITEMS {
        return Err(FieldError::new(
            "items",
            format!(
                "must have 1 to {MAX_ITEMS} items, got {}",
                request.items.len()
            ),
        ));
    }
    Ok(())
}

/// The catalog the Order prices from: the Product aggregates in the store.
pub struct StoreCatalog {
    store: Store,
}

impl StoreCatalog {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

#[async_trait]
impl Catalog for StoreCatalog {
    async fn unit_price(&self, product_id: &str) -> Result<Option<Money>, CatalogError> {
        let loaded = self
            .store
            .load::<Product>(product_id)
            .await
            .map_err(|e| CatalogError(e.to_string()))?;
        Ok(loaded.and_then(|(product, _)| product.orderable_price()))
    }

    /// One read for all the products this process has in memory.
    async fn unit_prices(
        &self,
        product_ids: &[String],
    ) -> Result<Vec<Option<Money>>, CatalogError> {
        let loaded = self
            .store
            .load_many::<Product>(product_ids)
            .await
            .map_err(|e| CatalogError(e.to_string()))?;
        Ok(loaded
            .into_iter()
            .map(|loaded| loaded.and_then(|(product, _)| product.orderable_price()))
            .collect())
    }
}

/// Product stock in the event store, for the domain's [`ProductLedger`]:
/// each command runs on its Product aggregate, retried when concurrent
/// orders for the same product get there first.
pub struct StoreProducts {
    store: Store,
}

impl StoreProducts {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

#[async_trait]
impl ProductStock for StoreProducts {
    async fn product_command(
        &self,
        product_id: &str,
        command: ProductCommand,
    ) -> Result<Result<Product, ProductError>, LedgerError> {
        match self
            .store
            .execute_retrying::<Product>(
                product_id,
                command,
                &product_services(&self.store, product_id),
                HashMap::new(),
                CONFLICT_ATTEMPTS,
            )
            .await
        {
            Ok(done) => Ok(Ok(done.aggregate)),
            Err(AggregateError::UserError(e)) => Ok(Err(e)),
            Err(e) => Err(LedgerError(e.to_string())),
        }
    }
}

/// A product's hold records: its stored events.
pub struct StoreHolds {
    store: Store,
}

#[async_trait]
impl HoldRecords for StoreHolds {
    async fn held(&self, product_id: &str, order_id: &str) -> Result<Option<u32>, RecordsError> {
        self.store
            .held_for_order(product_id, order_id)
            .await
            .map_err(|e| RecordsError(e.to_string()))
    }
}

/// What a command on `product_id` runs with.
pub fn product_services(store: &Store, product_id: &str) -> ProductServices {
    let records = Arc::new(StoreHolds {
        store: store.clone(),
    });
    ProductServices::new(product_id, records)
}

/// The stock ledger the saga's stock side uses.
pub type StoreLedger = ProductLedger<StoreProducts>;

/// The stock ledger over `store`'s products.
pub fn store_ledger(store: Store) -> StoreLedger {
    ProductLedger::new(StoreProducts::new(store))
}
