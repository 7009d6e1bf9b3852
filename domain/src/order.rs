//! The Order aggregate (id = orderId): `ORDER_CREATED → ORDER_CONFIRMED →
//! PAYMENT_WAIT`, and `ORDER_CREATED | ORDER_CONFIRMED → ORDER_CANCELLED`.
//!
//! Prices come from the [`Catalog`] behind [`OrderServices`], never from the
//! client. Events are self-contained (they carry the user, amounts and items
//! a consumer needs), so the integration events of the contract can be built
//! from one stored event without loading the aggregate.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::Money;
use crate::values::{validate_id, FieldError, StockItem};

/// At most this many lines in one order.
pub const MAX_ITEMS: usize = 100;
/// At most this many units of one product in one order.
pub const MAX_QUANTITY: i64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    OrderCreated,
    OrderConfirmed,
    PaymentWait,
    OrderCancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::OrderCreated => "ORDER_CREATED",
            OrderStatus::OrderConfirmed => "ORDER_CONFIRMED",
            OrderStatus::PaymentWait => "PAYMENT_WAIT",
            OrderStatus::OrderCancelled => "ORDER_CANCELLED",
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an order was cancelled (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CancelReason {
    StockShortage,
    StockReservationTimeout,
    ConfirmationFailed,
    PaymentWaitFailed,
    SagaTimeout,
    CustomerRequest,
}

impl CancelReason {
    pub const ALL: [CancelReason; 6] = [
        CancelReason::StockShortage,
        CancelReason::StockReservationTimeout,
        CancelReason::ConfirmationFailed,
        CancelReason::PaymentWaitFailed,
        CancelReason::SagaTimeout,
        CancelReason::CustomerRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::StockShortage => "STOCK_SHORTAGE",
            CancelReason::StockReservationTimeout => "STOCK_RESERVATION_TIMEOUT",
            CancelReason::ConfirmationFailed => "CONFIRMATION_FAILED",
            CancelReason::PaymentWaitFailed => "PAYMENT_WAIT_FAILED",
            CancelReason::SagaTimeout => "SAGA_TIMEOUT",
            CancelReason::CustomerRequest => "CUSTOMER_REQUEST",
        }
    }
}

impl FromStr for CancelReason {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CancelReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| FieldError::new("reason", format!("unknown cancel reason '{s}'")))
    }
}

/// One line as the client asks for it. The quantity is signed so that a
/// negative number reaches validation and gets a field error, not a parse
/// failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemRequest {
    pub product_id: String,
    pub quantity: i64,
}

/// One line of an accepted order, priced from the catalog at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    pub product_id: String,
    pub quantity: u32,
    pub unit_price: Money,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OrderCommand {
    CreateOrder {
        user_id: String,
        store_id: String,
        items: Vec<ItemRequest>,
    },
    /// `causation_id` is the integration event that caused the command; an
    /// exact repeat (same causation, already applied) is a no-op.
    ConfirmOrder {
        causation_id: Option<Uuid>,
    },
    StartPaymentWait {
        causation_id: Option<Uuid>,
    },
    CancelOrder {
        reason: CancelReason,
        causation_id: Option<Uuid>,
    },
}

impl OrderCommand {
    fn name(&self) -> &'static str {
        match self {
            OrderCommand::CreateOrder { .. } => "CreateOrder",
            OrderCommand::ConfirmOrder { .. } => "ConfirmOrder",
            OrderCommand::StartPaymentWait { .. } => "StartPaymentWait",
            OrderCommand::CancelOrder { .. } => "CancelOrder",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OrderEvent {
    #[serde(rename_all = "camelCase")]
    OrderCreated {
        user_id: String,
        store_id: String,
        items: Vec<OrderLine>,
        total_amount: Money,
    },
    #[serde(rename_all = "camelCase")]
    OrderConfirmed {
        user_id: String,
        total_amount: Money,
        causation_id: Option<Uuid>,
    },
    #[serde(rename_all = "camelCase")]
    PaymentWaitStarted {
        user_id: String,
        total_amount: Money,
        causation_id: Option<Uuid>,
    },
    #[serde(rename_all = "camelCase")]
    OrderCancelled {
        user_id: String,
        reason: CancelReason,
        items: Vec<StockItem>,
        causation_id: Option<Uuid>,
    },
}

domain_event!(OrderEvent {
    OrderCreated,
    OrderConfirmed,
    PaymentWaitStarted,
    OrderCancelled
});

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{field}: unknown product '{product_id}'")]
    UnknownProduct { field: String, product_id: String },
    #[error("order already exists")]
    AlreadyExists,
    #[error("order not found")]
    NotFound,
    #[error("{command} is not allowed in status {status}")]
    InvalidTransition {
        command: &'static str,
        status: OrderStatus,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// The catalog could not be asked (store down, …): not the client's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("catalog unavailable: {0}")]
pub struct CatalogError(pub String);

/// Where unit prices come from. `Ok(None)`: no such product, or it has no
/// price yet, so it cannot be ordered.
#[async_trait]
pub trait Catalog: Send + Sync {
    async fn unit_price(&self, product_id: &str) -> Result<Option<Money>, CatalogError>;

    /// [`Catalog::unit_price`] of every product, in order (a catalog that
    /// can look them up together overrides this).
    async fn unit_prices(
        &self,
        product_ids: &[String],
    ) -> Result<Vec<Option<Money>>, CatalogError> {
        let mut prices = Vec::with_capacity(product_ids.len());
        for product_id in product_ids {
            prices.push(self.unit_price(product_id).await?);
        }
        Ok(prices)
    }
}

pub struct OrderServices {
    pub catalog: Arc<dyn Catalog>,
}

impl OrderServices {
    pub fn new(catalog: Arc<dyn Catalog>) -> Self {
        Self { catalog }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub status: Option<OrderStatus>,
    pub user_id: String,
    pub store_id: String,
    pub items: Vec<OrderLine>,
    pub total_amount: Money,
    pub cancel_reason: Option<CancelReason>,
    confirmed_by: Option<Uuid>,
    payment_wait_by: Option<Uuid>,
    cancelled_by: Option<Uuid>,
}

impl Order {
    fn is_repeat(applied: Option<Uuid>, causation_id: Option<Uuid>) -> bool {
        causation_id.is_some() && applied == causation_id
    }

    fn refuse(&self, command: &OrderCommand) -> OrderError {
        match self.status {
            None => OrderError::NotFound,
            Some(status) => OrderError::InvalidTransition {
                command: command.name(),
                status,
            },
        }
    }

    /// Validates the client's request in field order and prices every line.
    async fn create(
        user_id: &str,
        store_id: &str,
        items: &[ItemRequest],
        catalog: &dyn Catalog,
    ) -> Result<OrderEvent, OrderError> {
        let user_id = validate_id("userId", user_id)?;
        let store_id = validate_id("storeId", store_id)?;
        if items.is_empty() || items.len() > MAX_ITEMS {
            return Err(FieldError::new(
                "items",
                format!("must have 1 to {MAX_ITEMS} items, got {}", items.len()),
            )
            .into());
        }
        // Every line is checked before the catalog is asked, once, for all
        // of them.
        let mut seen = BTreeSet::new();
        let mut product_ids = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let field = format!("items[{i}].productId");
            let product_id = validate_id(&field, &item.product_id)?;
            if !seen.insert(product_id.clone()) {
                return Err(FieldError::new(field, "product appears twice in the order").into());
            }
            if !(1..=MAX_QUANTITY).contains(&item.quantity) {
                return Err(FieldError::new(
                    format!("items[{i}].quantity"),
                    format!("must be between 1 and {MAX_QUANTITY}"),
                )
                .into());
            }
            product_ids.push(product_id);
        }
        let prices = catalog.unit_prices(&product_ids).await?;
        let mut lines = Vec::with_capacity(items.len());
        let mut total = Money::ZERO;
        for (i, ((product_id, item), price)) in product_ids
            .into_iter()
            .zip(items)
            .zip(prices.into_iter().chain(std::iter::repeat(None)))
            .enumerate()
        {
            let unit_price = price.ok_or_else(|| OrderError::UnknownProduct {
                field: format!("items[{i}].productId"),
                product_id: product_id.clone(),
            })?;
            // In range 1..=10_000 by the check above.
            let quantity = item.quantity as u32;
            total = unit_price
                .times(quantity)
                .and_then(|line| total.checked_add(line))
                .map_err(|e| FieldError::new("items", format!("order total: {e}")))?;
            lines.push(OrderLine {
                product_id,
                quantity,
                unit_price,
            });
        }
        Ok(OrderEvent::OrderCreated {
            user_id,
            store_id,
            items: lines,
            total_amount: total,
        })
    }
}

impl Aggregate for Order {
    const TYPE: &'static str = "Order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;
    type Services = OrderServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        use OrderStatus::*;
        let event = match (&command, self.status) {
            (OrderCommand::CreateOrder { .. }, Some(_)) => return Err(OrderError::AlreadyExists),
            (
                OrderCommand::CreateOrder {
                    user_id,
                    store_id,
                    items,
                },
                None,
            ) => Self::create(user_id, store_id, items, services.catalog.as_ref()).await?,
            (OrderCommand::ConfirmOrder { causation_id }, _)
                if Self::is_repeat(self.confirmed_by, *causation_id) =>
            {
                return Ok(())
            }
            (OrderCommand::ConfirmOrder { causation_id }, Some(OrderCreated)) => {
                OrderEvent::OrderConfirmed {
                    user_id: self.user_id.clone(),
                    total_amount: self.total_amount,
                    causation_id: *causation_id,
                }
            }
            (OrderCommand::StartPaymentWait { causation_id }, _)
                if Self::is_repeat(self.payment_wait_by, *causation_id) =>
            {
                return Ok(())
            }
            (OrderCommand::StartPaymentWait { causation_id }, Some(OrderConfirmed)) => {
                OrderEvent::PaymentWaitStarted {
                    user_id: self.user_id.clone(),
                    total_amount: self.total_amount,
                    causation_id: *causation_id,
                }
            }
            (OrderCommand::CancelOrder { causation_id, .. }, _)
                if Self::is_repeat(self.cancelled_by, *causation_id) =>
            {
                return Ok(())
            }
            (
                OrderCommand::CancelOrder {
                    reason,
                    causation_id,
                },
                Some(OrderCreated | OrderConfirmed),
            ) => OrderEvent::OrderCancelled {
                user_id: self.user_id.clone(),
                reason: *reason,
                items: self
                    .items
                    .iter()
                    .map(|line| StockItem {
                        product_id: line.product_id.clone(),
                        quantity: line.quantity,
                    })
                    .collect(),
                causation_id: *causation_id,
            },
            _ => return Err(self.refuse(&command)),
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            OrderEvent::OrderCreated {
                user_id,
                store_id,
                items,
                total_amount,
            } => {
                self.status = Some(OrderStatus::OrderCreated);
                self.user_id = user_id;
                self.store_id = store_id;
                self.items = items;
                self.total_amount = total_amount;
            }
            OrderEvent::OrderConfirmed { causation_id, .. } => {
                self.status = Some(OrderStatus::OrderConfirmed);
                self.confirmed_by = causation_id;
            }
            OrderEvent::PaymentWaitStarted { causation_id, .. } => {
                self.status = Some(OrderStatus::PaymentWait);
                self.payment_wait_by = causation_id;
            }
            OrderEvent::OrderCancelled {
                reason,
                causation_id,
                ..
            } => {
                self.status = Some(OrderStatus::OrderCancelled);
                self.cancel_reason = Some(reason);
                self.cancelled_by = causation_id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use cqrs_es::test::TestFramework;

    use super::*;

    type OrderTestFramework = TestFramework<Order>;

    struct FixedCatalog(HashMap<String, Money>);

    #[async_trait]
    impl Catalog for FixedCatalog {
        async fn unit_price(&self, product_id: &str) -> Result<Option<Money>, CatalogError> {
            Ok(self.0.get(product_id).copied())
        }
    }

    fn catalog<'a>(prices: impl IntoIterator<Item = (String, &'a str)>) -> OrderServices {
        let prices = prices.into_iter().map(|(id, p)| (id, money(p))).collect();
        OrderServices::new(Arc::new(FixedCatalog(prices)))
    }

    fn services() -> OrderServices {
        catalog([
            ("p-1".to_string(), "12900.00"),
            ("p-2".to_string(), "0.10"),
            ("p-max".to_string(), "99999999.99"),
        ])
    }

    fn money(s: &str) -> Money {
        s.parse().expect("test money")
    }

    fn item(product_id: &str, quantity: i64) -> ItemRequest {
        ItemRequest {
            product_id: product_id.into(),
            quantity,
        }
    }

    fn create(items: Vec<ItemRequest>) -> OrderCommand {
        OrderCommand::CreateOrder {
            user_id: "u-1".into(),
            store_id: "s-1".into(),
            items,
        }
    }

    fn created() -> OrderEvent {
        OrderEvent::OrderCreated {
            user_id: "u-1".into(),
            store_id: "s-1".into(),
            items: vec![
                OrderLine {
                    product_id: "p-1".into(),
                    quantity: 2,
                    unit_price: money("12900.00"),
                },
                OrderLine {
                    product_id: "p-2".into(),
                    quantity: 3,
                    unit_price: money("0.10"),
                },
            ],
            total_amount: money("25800.30"),
        }
    }

    fn confirmed(by: Option<Uuid>) -> OrderEvent {
        OrderEvent::OrderConfirmed {
            user_id: "u-1".into(),
            total_amount: money("25800.30"),
            causation_id: by,
        }
    }

    fn payment_wait(by: Option<Uuid>) -> OrderEvent {
        OrderEvent::PaymentWaitStarted {
            user_id: "u-1".into(),
            total_amount: money("25800.30"),
            causation_id: by,
        }
    }

    fn cancelled(reason: CancelReason, by: Option<Uuid>) -> OrderEvent {
        OrderEvent::OrderCancelled {
            user_id: "u-1".into(),
            reason,
            items: vec![
                StockItem {
                    product_id: "p-1".into(),
                    quantity: 2,
                },
                StockItem {
                    product_id: "p-2".into(),
                    quantity: 3,
                },
            ],
            causation_id: by,
        }
    }

    fn invalid(field: &str, message: &str) -> OrderError {
        OrderError::Invalid(FieldError::new(field, message))
    }

    #[tokio::test]
    async fn create_order_prices_each_item_from_the_catalog() {
        OrderTestFramework::with(services())
            .given_no_previous_events()
            .when_async(create(vec![item("p-1", 2), item("p-2", 3)]))
            .await
            .then_expect_events(vec![created()]);
    }

    #[tokio::test]
    async fn create_order_twice_is_refused() {
        OrderTestFramework::with(services())
            .given(vec![created()])
            .when_async(create(vec![item("p-1", 2)]))
            .await
            .then_expect_error(OrderError::AlreadyExists);
    }

    #[tokio::test]
    async fn create_order_refuses_an_unknown_product() {
        OrderTestFramework::with(services())
            .given_no_previous_events()
            .when_async(create(vec![item("p-1", 1), item("nope", 1)]))
            .await
            .then_expect_error(OrderError::UnknownProduct {
                field: "items[1].productId".into(),
                product_id: "nope".into(),
            });
    }

    #[tokio::test]
    async fn create_order_refuses_bad_quantities() {
        for quantity in [0, -1, 10_001] {
            OrderTestFramework::with(services())
                .given_no_previous_events()
                .when_async(create(vec![item("p-1", quantity)]))
                .await
                .then_expect_error(invalid("items[0].quantity", "must be between 1 and 10000"));
        }
    }

    #[tokio::test]
    async fn create_order_accepts_the_boundaries() {
        let hundred: Vec<_> = (0..100).map(|i| item(&format!("q-{i}"), 1)).collect();
        let prices = (0..100).map(|i| (format!("q-{i}"), "1.00"));
        let result = OrderTestFramework::with(catalog(prices))
            .given_no_previous_events()
            .when_async(create(hundred))
            .await
            .inspect_result();
        match result {
            Ok(events) => match &events[..] {
                [OrderEvent::OrderCreated {
                    total_amount,
                    items,
                    ..
                }] => {
                    assert_eq!(items.len(), 100);
                    assert_eq!(*total_amount, money("100.00"));
                }
                other => panic!("unexpected events {other:?}"),
            },
            Err(e) => panic!("refused: {e}"),
        }
        let ok = OrderTestFramework::with(services())
            .given_no_previous_events()
            .when_async(create(vec![item("p-2", 10_000)]))
            .await
            .inspect_result();
        assert!(ok.is_ok());
    }

    #[tokio::test]
    async fn create_order_refuses_empty_and_oversized_item_lists() {
        OrderTestFramework::with(services())
            .given_no_previous_events()
            .when_async(create(vec![]))
            .await
            .then_expect_error(invalid("items", "must have 1 to 100 items, got 0"));
        let too_many = (0..101).map(|i| item(&format!("p-{i}"), 1)).collect();
        OrderTestFramework::with(services())
            .given_no_previous_events()
            .when_async(create(too_many))
            .await
            .then_expect_error(invalid("items", "must have 1 to 100 items, got 101"));
    }

    #[tokio::test]
    async fn create_order_refuses_bad_ids_and_duplicate_lines() {
        OrderTestFramework::with(services())
            .given_no_previous_events()
            .when_async(OrderCommand::CreateOrder {
                user_id: String::new(),
                store_id: "s-1".into(),
                items: vec![item("p-1", 1)],
            })
            .await
            .then_expect_error(invalid("userId", "must not be empty"));
        OrderTestFramework::with(services())
            .given_no_previous_events()
            .when_async(OrderCommand::CreateOrder {
                user_id: "u-1".into(),
                store_id: "s".repeat(65),
                items: vec![item("p-1", 1)],
            })
            .await
            .then_expect_error(invalid("storeId", "must be at most 64 characters"));
        OrderTestFramework::with(services())
            .given_no_previous_events()
            .when_async(create(vec![item("p-1", 1), item("p-1", 2)]))
            .await
            .then_expect_error(invalid(
                "items[1].productId",
                "product appears twice in the order",
            ));
    }

    #[tokio::test]
    async fn create_order_refuses_a_total_beyond_decimal_10_2() {
        OrderTestFramework::with(services())
            .given_no_previous_events()
            .when_async(create(vec![item("p-max", 2)]))
            .await
            .then_expect_error(invalid(
                "items",
                "order total: amount exceeds 99999999.99 (decimal(10,2))",
            ));
    }

    #[tokio::test]
    async fn confirm_order_confirms_a_created_order() {
        let cause = Some(Uuid::new_v4());
        OrderTestFramework::with(services())
            .given(vec![created()])
            .when_async(OrderCommand::ConfirmOrder {
                causation_id: cause,
            })
            .await
            .then_expect_events(vec![confirmed(cause)]);
    }

    #[tokio::test]
    async fn a_repeated_confirmation_is_a_no_op() {
        let cause = Some(Uuid::new_v4());
        OrderTestFramework::with(services())
            .given(vec![created(), confirmed(cause)])
            .when_async(OrderCommand::ConfirmOrder {
                causation_id: cause,
            })
            .await
            .then_expect_events(vec![]);
    }

    #[tokio::test]
    async fn a_different_confirmation_of_a_confirmed_order_is_refused() {
        OrderTestFramework::with(services())
            .given(vec![created(), confirmed(Some(Uuid::new_v4()))])
            .when_async(OrderCommand::ConfirmOrder {
                causation_id: Some(Uuid::new_v4()),
            })
            .await
            .then_expect_error(OrderError::InvalidTransition {
                command: "ConfirmOrder",
                status: OrderStatus::OrderConfirmed,
            });
    }

    #[tokio::test]
    async fn commands_on_a_missing_order_are_refused() {
        OrderTestFramework::with(services())
            .given_no_previous_events()
            .when_async(OrderCommand::ConfirmOrder { causation_id: None })
            .await
            .then_expect_error(OrderError::NotFound);
    }

    #[tokio::test]
    async fn start_payment_wait_follows_confirmation() {
        let cause = Some(Uuid::new_v4());
        OrderTestFramework::with(services())
            .given(vec![created(), confirmed(None)])
            .when_async(OrderCommand::StartPaymentWait {
                causation_id: cause,
            })
            .await
            .then_expect_events(vec![payment_wait(cause)]);
        OrderTestFramework::with(services())
            .given(vec![created(), confirmed(None), payment_wait(cause)])
            .when_async(OrderCommand::StartPaymentWait {
                causation_id: cause,
            })
            .await
            .then_expect_events(vec![]);
    }

    #[tokio::test]
    async fn start_payment_wait_before_confirmation_is_refused() {
        OrderTestFramework::with(services())
            .given(vec![created()])
            .when_async(OrderCommand::StartPaymentWait { causation_id: None })
            .await
            .then_expect_error(OrderError::InvalidTransition {
                command: "StartPaymentWait",
                status: OrderStatus::OrderCreated,
            });
    }

    #[tokio::test]
    async fn cancel_order_is_allowed_while_created_or_confirmed() {
        let cause = Some(Uuid::new_v4());
        OrderTestFramework::with(services())
            .given(vec![created()])
            .when_async(OrderCommand::CancelOrder {
                reason: CancelReason::StockShortage,
                causation_id: cause,
            })
            .await
            .then_expect_events(vec![cancelled(CancelReason::StockShortage, cause)]);
        OrderTestFramework::with(services())
            .given(vec![created(), confirmed(None)])
            .when_async(OrderCommand::CancelOrder {
                reason: CancelReason::PaymentWaitFailed,
                causation_id: None,
            })
            .await
            .then_expect_events(vec![cancelled(CancelReason::PaymentWaitFailed, None)]);
    }

    #[tokio::test]
    async fn cancel_order_after_payment_wait_or_cancellation_is_refused() {
        OrderTestFramework::with(services())
            .given(vec![created(), confirmed(None), payment_wait(None)])
            .when_async(OrderCommand::CancelOrder {
                reason: CancelReason::SagaTimeout,
                causation_id: None,
            })
            .await
            .then_expect_error(OrderError::InvalidTransition {
                command: "CancelOrder",
                status: OrderStatus::PaymentWait,
            });
        OrderTestFramework::with(services())
            .given(vec![
                created(),
                cancelled(CancelReason::CustomerRequest, None),
            ])
            .when_async(OrderCommand::CancelOrder {
                reason: CancelReason::CustomerRequest,
                causation_id: None,
            })
            .await
            .then_expect_error(OrderError::InvalidTransition {
                command: "CancelOrder",
                status: OrderStatus::OrderCancelled,
            });
    }

    #[tokio::test]
    async fn a_repeated_cancellation_is_a_no_op() {
        let cause = Some(Uuid::new_v4());
        OrderTestFramework::with(services())
            .given(vec![
                created(),
                cancelled(CancelReason::StockShortage, cause),
            ])
            .when_async(OrderCommand::CancelOrder {
                reason: CancelReason::StockShortage,
                causation_id: cause,
            })
            .await
            .then_expect_events(vec![]);
    }

    #[tokio::test]
    async fn confirming_a_cancelled_order_is_refused() {
        OrderTestFramework::with(services())
            .given(vec![created(), cancelled(CancelReason::SagaTimeout, None)])
            .when_async(OrderCommand::ConfirmOrder {
                causation_id: Some(Uuid::new_v4()),
            })
            .await
            .then_expect_error(OrderError::InvalidTransition {
                command: "ConfirmOrder",
                status: OrderStatus::OrderCancelled,
            });
    }

    #[test]
    fn cancel_reasons_round_trip_their_names() {
        for reason in CancelReason::ALL {
            assert_eq!(reason.as_str().parse::<CancelReason>(), Ok(reason));
        }
        assert_eq!("NOPE".parse::<CancelReason>().unwrap_err().field, "reason");
    }
}
