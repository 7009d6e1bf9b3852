//! The Order aggregate (id = orderId): `ORDER_CREATED → ORDER_CONFIRMED →
//! PAYMENT_WAIT → PAYMENT_COMPLETED → ORDER_COMPLETED`, and
//! `ORDER_CREATED | ORDER_CONFIRMED | PAYMENT_WAIT → ORDER_CANCELLED` (from
//! PAYMENT_WAIT only for a failed or expired payment).
//!
//! The order is the arbiter of its payment: a payment result is recorded
//! only while the order waits for it; any other payment (after expiry or
//! cancellation, a second one, a wrong amount) is recorded as rejected, so
//! the payment side refunds it.
//!
//! Prices come from the [`Catalog`] behind [`OrderServices`], never from the
//! client. Events are self-contained (they carry the user, amounts and items
//! a consumer needs), so the integration events of the contract can be built
//! from one stored event without loading the aggregate.

use std::collections::{BTreeMap, BTreeSet};
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
    PaymentCompleted,
    OrderCompleted,
    OrderCancelled,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 6] = [
        OrderStatus::OrderCreated,
        OrderStatus::OrderConfirmed,
        OrderStatus::PaymentWait,
        OrderStatus::PaymentCompleted,
        OrderStatus::OrderCompleted,
        OrderStatus::OrderCancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::OrderCreated => "ORDER_CREATED",
            OrderStatus::OrderConfirmed => "ORDER_CONFIRMED",
            OrderStatus::PaymentWait => "PAYMENT_WAIT",
            OrderStatus::PaymentCompleted => "PAYMENT_COMPLETED",
            OrderStatus::OrderCompleted => "ORDER_COMPLETED",
            OrderStatus::OrderCancelled => "ORDER_CANCELLED",
        }
    }

    /// Whether the saga is over: the order is completed or cancelled.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OrderStatus::OrderCompleted | OrderStatus::OrderCancelled
        )
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
    /// The payment side reported the payment failed.
    PaymentFailed,
    /// No payment result within the payment wait.
    PaymentTimeout,
}

impl CancelReason {
    pub const ALL: [CancelReason; 8] = [
        CancelReason::StockShortage,
        CancelReason::StockReservationTimeout,
        CancelReason::ConfirmationFailed,
        CancelReason::PaymentWaitFailed,
        CancelReason::SagaTimeout,
        CancelReason::CustomerRequest,
        CancelReason::PaymentFailed,
        CancelReason::PaymentTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::StockShortage => "STOCK_SHORTAGE",
            CancelReason::StockReservationTimeout => "STOCK_RESERVATION_TIMEOUT",
            CancelReason::ConfirmationFailed => "CONFIRMATION_FAILED",
            CancelReason::PaymentWaitFailed => "PAYMENT_WAIT_FAILED",
            CancelReason::SagaTimeout => "SAGA_TIMEOUT",
            CancelReason::CustomerRequest => "CUSTOMER_REQUEST",
            CancelReason::PaymentFailed => "PAYMENT_FAILED",
            CancelReason::PaymentTimeout => "PAYMENT_TIMEOUT",
        }
    }

    /// Whether an order in `status` may be cancelled for this reason: the
    /// saga's own reasons until the payment wait opens, only the payment's
    /// outcome while it is open, nothing after.
    fn allowed_in(self, status: OrderStatus) -> bool {
        match status {
            OrderStatus::OrderCreated | OrderStatus::OrderConfirmed => !self.ends_payment_wait(),
            OrderStatus::PaymentWait => self.ends_payment_wait(),
            _ => false,
        }
    }

    /// A payment result's reason: the order was waiting for its payment
    /// (the creation saga had ended at PAYMENT_WAIT).
    pub fn ends_payment_wait(self) -> bool {
        matches!(
            self,
            CancelReason::PaymentFailed | CancelReason::PaymentTimeout
        )
    }
}

/// How the customer paid (the payment contract's `PaymentMethod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentMethod {
    Card,
    BankTransfer,
    KakaoPay,
    NaverPay,
    Toss,
}

impl PaymentMethod {
    pub const ALL: [PaymentMethod; 5] = [
        PaymentMethod::Card,
        PaymentMethod::BankTransfer,
        PaymentMethod::KakaoPay,
        PaymentMethod::NaverPay,
        PaymentMethod::Toss,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentMethod::Card => "CARD",
            PaymentMethod::BankTransfer => "BANK_TRANSFER",
            PaymentMethod::KakaoPay => "KAKAO_PAY",
            PaymentMethod::NaverPay => "NAVER_PAY",
            PaymentMethod::Toss => "TOSS",
        }
    }
}

impl FromStr for PaymentMethod {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PaymentMethod::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = PaymentMethod::ALL.iter().map(|m| m.as_str()).collect();
                FieldError::new(
                    "paymentMethod",
                    format!("unknown payment method '{s}' (one of {})", known.join(", ")),
                )
            })
    }
}

/// Why a payment was not taken for the order (the payment side refunds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentRejection {
    /// The amount paid is not the order's total.
    AmountMismatch,
    /// The order was cancelled (or its payment wait expired) first.
    OrderCancelled,
    /// The order was already paid by another payment.
    AlreadyPaid,
    /// The order was not waiting for a payment yet.
    NotAwaitingPayment,
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

impl OrderLine {
    /// The product and quantity, as the stock side counts them.
    pub fn stock_item(&self) -> StockItem {
        StockItem {
            product_id: self.product_id.clone(),
            quantity: self.quantity,
        }
    }
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
    /// From `payment.completed`: records the payment if the order waits
    /// for it and the amount is its total, else records its rejection. A
    /// payment already recorded or rejected (by its id) is a no-op.
    CompletePayment {
        payment_id: String,
        amount: Money,
        method: PaymentMethod,
        causation_id: Option<Uuid>,
    },
    /// The payment wait ran out: cancels the order (PAYMENT_TIMEOUT) and
    /// records the expiry with its reason text.
    ExpirePaymentWait {
        expiration_reason: String,
        causation_id: Option<Uuid>,
    },
    /// From `stock.confirmed`: the paid order's stock is sold.
    CompleteOrder {
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
            OrderCommand::CompletePayment { .. } => "CompletePayment",
            OrderCommand::ExpirePaymentWait { .. } => "ExpirePaymentWait",
            OrderCommand::CompleteOrder { .. } => "CompleteOrder",
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
    /// The payment was taken for the order; `items` are what it buys.
    #[serde(rename_all = "camelCase")]
    PaymentCompleted {
        user_id: String,
        payment_id: String,
        total_amount: Money,
        method: PaymentMethod,
        items: Vec<StockItem>,
        causation_id: Option<Uuid>,
    },
    /// A payment that the order does not take (the status is unchanged).
    #[serde(rename_all = "camelCase")]
    PaymentRejected {
        user_id: String,
        payment_id: String,
        rejection: PaymentRejection,
        reason: String,
        causation_id: Option<Uuid>,
    },
    /// The payment wait ran out; an `OrderCancelled` (PAYMENT_TIMEOUT)
    /// follows in the same append.
    #[serde(rename_all = "camelCase")]
    PaymentWaitExpired {
        user_id: String,
        expiration_reason: String,
        causation_id: Option<Uuid>,
    },
    #[serde(rename_all = "camelCase")]
    OrderCompleted {
        user_id: String,
        payment_id: String,
        total_amount: Money,
        causation_id: Option<Uuid>,
    },
}

domain_event!(OrderEvent {
    OrderCreated,
    OrderConfirmed,
    PaymentWaitStarted,
    OrderCancelled,
    PaymentCompleted,
    PaymentRejected,
    PaymentWaitExpired,
    OrderCompleted
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
    /// The payment recorded for the order.
    pub payment_id: Option<String>,
    confirmed_by: Option<Uuid>,
    payment_wait_by: Option<Uuid>,
    cancelled_by: Option<Uuid>,
    completed_by: Option<Uuid>,
    /// Payments rejected so far, why (a repeat of one is a no-op).
    #[serde(default)]
    rejected_payments: BTreeMap<String, (PaymentRejection, String)>,
}

impl Order {
    fn is_repeat(applied: Option<Uuid>, causation_id: Option<Uuid>) -> bool {
        causation_id.is_some() && applied == causation_id
    }

    /// Why the order rejected this payment, if it did.
    pub fn rejection_of(&self, payment_id: &str) -> Option<(PaymentRejection, String)> {
        self.rejected_payments.get(payment_id).cloned()
    }

    fn items(&self) -> Vec<StockItem> {
        self.items.iter().map(OrderLine::stock_item).collect()
    }

    /// What a payment result does to the order: nothing (a payment seen
    /// before), its record, or its rejection.
    fn payment(
        &self,
        payment_id: &str,
        amount: Money,
        method: PaymentMethod,
        causation_id: Option<Uuid>,
    ) -> Result<Option<OrderEvent>, OrderError> {
        let Some(status) = self.status else {
            return Err(OrderError::NotFound);
        };
        if self.payment_id.as_deref() == Some(payment_id)
            || self.rejected_payments.contains_key(payment_id)
        {
            return Ok(None);
        }
        let rejection = match status {
            OrderStatus::PaymentWait if amount == self.total_amount => {
                return Ok(Some(OrderEvent::PaymentCompleted {
                    user_id: self.user_id.clone(),
                    payment_id: payment_id.to_string(),
                    total_amount: amount,
                    method,
                    items: self.items(),
                    causation_id,
                }))
            }
            OrderStatus::PaymentWait => (
                PaymentRejection::AmountMismatch,
                format!(
                    "amount paid {amount} differs from the order total {}",
                    self.total_amount
                ),
            ),
            OrderStatus::OrderCancelled => (
                PaymentRejection::OrderCancelled,
                match self.cancel_reason {
                    Some(reason) => format!("order cancelled ({})", reason.as_str()),
                    None => "order cancelled".to_string(),
                },
            ),
            OrderStatus::PaymentCompleted | OrderStatus::OrderCompleted => (
                PaymentRejection::AlreadyPaid,
                format!(
                    "order already paid by payment {}",
                    self.payment_id.as_deref().unwrap_or("?")
                ),
            ),
            OrderStatus::OrderCreated | OrderStatus::OrderConfirmed => (
                PaymentRejection::NotAwaitingPayment,
                format!("order is {status}, not waiting for a payment"),
            ),
        };
        Ok(Some(OrderEvent::PaymentRejected {
            user_id: self.user_id.clone(),
            payment_id: payment_id.to_string(),
            rejection: rejection.0,
            reason: rejection.1,
            causation_id,
        }))
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
                Some(status),
            ) if reason.allowed_in(status) => OrderEvent::OrderCancelled {
                user_id: self.user_id.clone(),
                reason: *reason,
                items: self.items(),
                causation_id: *causation_id,
            },
            (
                OrderCommand::CompletePayment {
                    payment_id,
                    amount,
                    method,
                    causation_id,
                },
                _,
            ) => match self.payment(payment_id, *amount, *method, *causation_id)? {
                Some(event) => event,
                None => return Ok(()),
            },
            (OrderCommand::ExpirePaymentWait { causation_id, .. }, _)
                if Self::is_repeat(self.cancelled_by, *causation_id) =>
            {
                return Ok(())
            }
            (
                OrderCommand::ExpirePaymentWait {
                    expiration_reason,
                    causation_id,
                },
                Some(PaymentWait),
            ) => {
                let expired = OrderEvent::PaymentWaitExpired {
                    user_id: self.user_id.clone(),
                    expiration_reason: expiration_reason.clone(),
                    causation_id: *causation_id,
                };
                sink.write(expired, self).await;
                OrderEvent::OrderCancelled {
                    user_id: self.user_id.clone(),
                    reason: CancelReason::PaymentTimeout,
                    items: self.items(),
                    causation_id: *causation_id,
                }
            }
            (OrderCommand::CompleteOrder { causation_id }, _)
                if Self::is_repeat(self.completed_by, *causation_id) =>
            {
                return Ok(())
            }
            (OrderCommand::CompleteOrder { causation_id }, Some(PaymentCompleted)) => {
                OrderEvent::OrderCompleted {
                    user_id: self.user_id.clone(),
                    payment_id: self.payment_id.clone().unwrap_or_default(),
                    total_amount: self.total_amount,
                    causation_id: *causation_id,
                }
            }
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
            OrderEvent::PaymentCompleted { payment_id, .. } => {
                self.status = Some(OrderStatus::PaymentCompleted);
                self.payment_id = Some(payment_id);
            }
            OrderEvent::PaymentRejected {
                payment_id,
                rejection,
                reason,
                ..
            } => {
                self.rejected_payments
                    .insert(payment_id, (rejection, reason));
            }
            OrderEvent::PaymentWaitExpired { .. } => {}
            OrderEvent::OrderCompleted { causation_id, .. } => {
                self.status = Some(OrderStatus::OrderCompleted);
                self.completed_by = causation_id;
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

    fn waiting() -> Vec<OrderEvent> {
        vec![created(), confirmed(None), payment_wait(None)]
    }

    fn pay(payment_id: &str, amount: &str, by: Option<Uuid>) -> OrderCommand {
        OrderCommand::CompletePayment {
            payment_id: payment_id.into(),
            amount: money(amount),
            method: PaymentMethod::KakaoPay,
            causation_id: by,
        }
    }

    fn paid(payment_id: &str, by: Option<Uuid>) -> OrderEvent {
        OrderEvent::PaymentCompleted {
            user_id: "u-1".into(),
            payment_id: payment_id.into(),
            total_amount: money("25800.30"),
            method: PaymentMethod::KakaoPay,
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

    fn rejected(
        payment_id: &str,
        rejection: PaymentRejection,
        reason: &str,
        by: Option<Uuid>,
    ) -> OrderEvent {
        OrderEvent::PaymentRejected {
            user_id: "u-1".into(),
            payment_id: payment_id.into(),
            rejection,
            reason: reason.into(),
            causation_id: by,
        }
    }

    #[tokio::test]
    async fn a_payment_of_the_total_is_recorded_while_waiting() {
        let cause = Some(Uuid::new_v4());
        OrderTestFramework::with(services())
            .given(waiting())
            .when_async(pay("pay-1", "25800.30", cause))
            .await
            .then_expect_events(vec![paid("pay-1", cause)]);
    }

    #[tokio::test]
    async fn a_repeated_payment_is_a_no_op() {
        let mut given = waiting();
        given.push(paid("pay-1", None));
        OrderTestFramework::with(services())
            .given(given)
            .when_async(pay("pay-1", "25800.30", Some(Uuid::new_v4())))
            .await
            .then_expect_events(vec![]);
        let mut given = waiting();
        given.push(rejected(
            "pay-1",
            PaymentRejection::AmountMismatch,
            "amount paid 1.00 differs from the order total 25800.30",
            None,
        ));
        OrderTestFramework::with(services())
            .given(given)
            .when_async(pay("pay-1", "1.00", None))
            .await
            .then_expect_events(vec![]);
    }

    #[tokio::test]
    async fn a_payment_of_another_amount_is_rejected_and_the_wait_goes_on() {
        let cause = Some(Uuid::new_v4());
        OrderTestFramework::with(services())
            .given(waiting())
            .when_async(pay("pay-1", "25800.29", cause))
            .await
            .then_expect_events(vec![rejected(
                "pay-1",
                PaymentRejection::AmountMismatch,
                "amount paid 25800.29 differs from the order total 25800.30",
                cause,
            )]);
        let mut given = waiting();
        given.push(rejected(
            "pay-1",
            PaymentRejection::AmountMismatch,
            "amount paid 25800.29 differs from the order total 25800.30",
            None,
        ));
        OrderTestFramework::with(services())
            .given(given)
            .when_async(pay("pay-2", "25800.30", cause))
            .await
            .then_expect_events(vec![paid("pay-2", cause)]);
    }

    #[tokio::test]
    async fn a_payment_after_cancellation_or_a_second_payment_is_rejected() {
        let mut given = waiting();
        given.push(cancelled(CancelReason::PaymentTimeout, None));
        OrderTestFramework::with(services())
            .given(given)
            .when_async(pay("pay-1", "25800.30", None))
            .await
            .then_expect_events(vec![rejected(
                "pay-1",
                PaymentRejection::OrderCancelled,
                "order cancelled (PAYMENT_TIMEOUT)",
                None,
            )]);
        let mut given = waiting();
        given.push(paid("pay-1", None));
        OrderTestFramework::with(services())
            .given(given)
            .when_async(pay("pay-2", "25800.30", None))
            .await
            .then_expect_events(vec![rejected(
                "pay-2",
                PaymentRejection::AlreadyPaid,
                "order already paid by payment pay-1",
                None,
            )]);
        OrderTestFramework::with(services())
            .given(vec![created()])
            .when_async(pay("pay-1", "25800.30", None))
            .await
            .then_expect_events(vec![rejected(
                "pay-1",
                PaymentRejection::NotAwaitingPayment,
                "order is ORDER_CREATED, not waiting for a payment",
                None,
            )]);
    }

    #[tokio::test]
    async fn a_payment_for_an_unknown_order_is_refused() {
        OrderTestFramework::with(services())
            .given_no_previous_events()
            .when_async(pay("pay-1", "1.00", None))
            .await
            .then_expect_error(OrderError::NotFound);
    }

    #[tokio::test]
    async fn a_failed_payment_cancels_a_waiting_order_only() {
        let cause = Some(Uuid::new_v4());
        OrderTestFramework::with(services())
            .given(waiting())
            .when_async(OrderCommand::CancelOrder {
                reason: CancelReason::PaymentFailed,
                causation_id: cause,
            })
            .await
            .then_expect_events(vec![cancelled(CancelReason::PaymentFailed, cause)]);
        let mut given = waiting();
        given.push(paid("pay-1", None));
        OrderTestFramework::with(services())
            .given(given)
            .when_async(OrderCommand::CancelOrder {
                reason: CancelReason::PaymentFailed,
                causation_id: cause,
            })
            .await
            .then_expect_error(OrderError::InvalidTransition {
                command: "CancelOrder",
                status: OrderStatus::PaymentCompleted,
            });
        OrderTestFramework::with(services())
            .given(vec![created()])
            .when_async(OrderCommand::CancelOrder {
                reason: CancelReason::PaymentTimeout,
                causation_id: cause,
            })
            .await
            .then_expect_error(OrderError::InvalidTransition {
                command: "CancelOrder",
                status: OrderStatus::OrderCreated,
            });
    }

    #[tokio::test]
    async fn an_expired_payment_wait_cancels_the_order_and_records_why() {
        let cause = Some(Uuid::new_v4());
        let expire = || OrderCommand::ExpirePaymentWait {
            expiration_reason: "payment time exceeded (30 min)".into(),
            causation_id: cause,
        };
        let expired = OrderEvent::PaymentWaitExpired {
            user_id: "u-1".into(),
            expiration_reason: "payment time exceeded (30 min)".into(),
            causation_id: cause,
        };
        OrderTestFramework::with(services())
            .given(waiting())
            .when_async(expire())
            .await
            .then_expect_events(vec![
                expired.clone(),
                cancelled(CancelReason::PaymentTimeout, cause),
            ]);
        let mut given = waiting();
        given.extend([expired, cancelled(CancelReason::PaymentTimeout, cause)]);
        OrderTestFramework::with(services())
            .given(given)
            .when_async(expire())
            .await
            .then_expect_events(vec![]);
        let mut given = waiting();
        given.push(paid("pay-1", None));
        OrderTestFramework::with(services())
            .given(given)
            .when_async(expire())
            .await
            .then_expect_error(OrderError::InvalidTransition {
                command: "ExpirePaymentWait",
                status: OrderStatus::PaymentCompleted,
            });
    }

    #[tokio::test]
    async fn the_sold_stock_completes_a_paid_order() {
        let cause = Some(Uuid::new_v4());
        let completed = OrderEvent::OrderCompleted {
            user_id: "u-1".into(),
            payment_id: "pay-1".into(),
            total_amount: money("25800.30"),
            causation_id: cause,
        };
        let mut given = waiting();
        given.push(paid("pay-1", None));
        OrderTestFramework::with(services())
            .given(given.clone())
            .when_async(OrderCommand::CompleteOrder {
                causation_id: cause,
            })
            .await
            .then_expect_events(vec![completed.clone()]);
        given.push(completed);
        OrderTestFramework::with(services())
            .given(given)
            .when_async(OrderCommand::CompleteOrder {
                causation_id: cause,
            })
            .await
            .then_expect_events(vec![]);
        OrderTestFramework::with(services())
            .given(waiting())
            .when_async(OrderCommand::CompleteOrder {
                causation_id: cause,
            })
            .await
            .then_expect_error(OrderError::InvalidTransition {
                command: "CompleteOrder",
                status: OrderStatus::PaymentWait,
            });
    }

    #[test]
    fn payment_methods_round_trip_their_names() {
        for method in PaymentMethod::ALL {
            assert_eq!(method.as_str().parse::<PaymentMethod>(), Ok(method));
        }
        assert_eq!(
            "CASH".parse::<PaymentMethod>().unwrap_err().field,
            "paymentMethod"
        );
    }

    #[test]
    fn cancel_reasons_round_trip_their_names() {
        for reason in CancelReason::ALL {
            assert_eq!(reason.as_str().parse::<CancelReason>(), Ok(reason));
        }
        assert_eq!("NOPE".parse::<CancelReason>().unwrap_err().field, "reason");
    }
}
