//! The StockReservation aggregate (id = orderId): the stock side's record of
//! one order — reserved (all items), failed (with the shortages), released,
//! voided because the order was cancelled before anything was reserved, or
//! sold once the order's payment was taken.
//!
//! Stock itself is held per product (the [`Product`](crate::Product)
//! aggregate). Reserving across products goes through the [`StockLedger`]
//! service, which holds every item or none; it must be idempotent per order
//! (holding again for an order that already holds is a no-op), so a
//! redelivered request after a crash converges instead of double-holding.
//!
//! The void marker is what makes the race "`order.cancelled` reaches the
//! stock side before `order.created`" come out right: once voided, a later
//! reservation request reserves nothing.

use std::sync::Arc;

use async_trait::async_trait;
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::product::{Product, ProductCommand, ProductError};
use crate::values::{FieldError, StockItem};

/// One product held for the order, with the stock left available after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReservedLine {
    pub product_id: String,
    pub quantity: u32,
    pub available_after: u32,
}

impl ReservedLine {
    pub fn stock_item(&self) -> StockItem {
        StockItem {
            product_id: self.product_id.clone(),
            quantity: self.quantity,
        }
    }
}

/// A product that could not be held: requested vs available when handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shortage {
    pub product_id: String,
    pub requested: u32,
    pub available: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stock ledger unavailable: {0}")]
pub struct LedgerError(pub String);

/// Holds and returns stock on the products. Implemented over the Product
/// aggregates by the service, and in memory by the tests.
#[async_trait]
pub trait StockLedger: Send + Sync {
    /// Holds every item for `order_id`, or none: `Ok(Err(shortages))` names
    /// every product that was short, and nothing stays held.
    async fn reserve_all(
        &self,
        order_id: &str,
        items: &[StockItem],
    ) -> Result<Result<Vec<ReservedLine>, Vec<Shortage>>, LedgerError>;

    /// Returns whatever `order_id` holds on these products (none is fine).
    async fn release_all(&self, order_id: &str, items: &[StockItem]) -> Result<(), LedgerError>;

    /// Sells whatever `order_id` holds on these products (none is fine).
    async fn sell_all(&self, order_id: &str, items: &[StockItem]) -> Result<(), LedgerError>;
}

/// One product's stock, as the ledger reaches it: runs a command on the
/// product (retrying a concurrent writer's conflict itself) and returns the
/// product as it then is, or the product's refusal. Implemented over the
/// event store by the service, and in memory by the tests.
#[async_trait]
pub trait ProductStock: Send + Sync {
    async fn product_command(
        &self,
        product_id: &str,
        command: ProductCommand,
    ) -> Result<Result<Product, ProductError>, LedgerError>;
}

#[async_trait]
impl<P: ProductStock + ?Sized> ProductStock for Arc<P> {
    async fn product_command(
        &self,
        product_id: &str,
        command: ProductCommand,
    ) -> Result<Result<Product, ProductError>, LedgerError> {
        (**self).product_command(product_id, command).await
    }
}

/// The stock ledger over per-product stock: holds each item on its product
/// (so orders for different products never contend; an order's products all
/// at once), and on any shortage returns what it held, so an order ends with
/// all of its items or none.
pub struct ProductLedger<P> {
    products: P,
}

impl<P: ProductStock> ProductLedger<P> {
    pub fn new(products: P) -> Self {
        Self { products }
    }
}

#[async_trait]
impl<P: ProductStock> StockLedger for ProductLedger<P> {
    async fn reserve_all(
        &self,
        order_id: &str,
        items: &[StockItem],
    ) -> Result<Result<Vec<ReservedLine>, Vec<Shortage>>, LedgerError> {
        // Every product at once: each is its own aggregate (its own lock and
        // append), so an order's holds need not wait for one another.
        let outcomes = join_all(items.iter().map(|item| {
            let command = ProductCommand::ReserveStock {
                order_id: order_id.to_string(),
                quantity: item.quantity,
            };
            self.products.product_command(&item.product_id, command)
        }))
        .await;
        let mut lines = Vec::with_capacity(items.len());
        let mut shortages = Vec::new();
        for (item, outcome) in items.iter().zip(outcomes) {
            match outcome? {
                Ok(product) => lines.push(ReservedLine {
                    product_id: item.product_id.clone(),
                    quantity: item.quantity,
                    available_after: product.available,
                }),
                Err(ProductError::InsufficientStock {
                    requested,
                    available,
                }) => shortages.push(Shortage {
                    product_id: item.product_id.clone(),
                    requested,
                    available,
                }),
                Err(ProductError::UnknownProduct) => shortages.push(Shortage {
                    product_id: item.product_id.clone(),
                    requested: item.quantity,
                    available: 0,
                }),
                Err(e @ (ProductError::Invalid(_) | ProductError::Records(_))) => {
                    return Err(LedgerError(e.to_string()))
                }
            }
        }
        if shortages.is_empty() {
            return Ok(Ok(lines));
        }
        let held: Vec<StockItem> = lines.iter().map(ReservedLine::stock_item).collect();
        self.release_all(order_id, &held).await?;
        Ok(Err(shortages))
    }

    async fn release_all(&self, order_id: &str, items: &[StockItem]) -> Result<(), LedgerError> {
        self.on_every_product(items, || ProductCommand::ReleaseStock {
            order_id: order_id.to_string(),
        })
        .await
    }

    async fn sell_all(&self, order_id: &str, items: &[StockItem]) -> Result<(), LedgerError> {
        self.on_every_product(items, || ProductCommand::SellStock {
            order_id: order_id.to_string(),
        })
        .await
    }
}

impl<P: ProductStock> ProductLedger<P> {
    /// Runs `command` on every item's product at once; any refusal fails.
    async fn on_every_product(
        &self,
        items: &[StockItem],
        command: impl Fn() -> ProductCommand,
    ) -> Result<(), LedgerError> {
        let outcomes = join_all(
            items
                .iter()
                .map(|item| self.products.product_command(&item.product_id, command())),
        )
        .await;
        for outcome in outcomes {
            if let Err(e) = outcome? {
                return Err(LedgerError(e.to_string()));
            }
        }
        Ok(())
    }
}

pub struct StockServices {
    pub ledger: Arc<dyn StockLedger>,
}

impl StockServices {
    pub fn new(ledger: Arc<dyn StockLedger>) -> Self {
        Self { ledger }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum StockReservationCommand {
    /// From `order.created`: hold every item of the order.
    ReserveStock {
        order_id: String,
        items: Vec<StockItem>,
        causation_id: Option<Uuid>,
    },
    /// From `order.cancelled`: return what the order holds, if anything.
    ReleaseStock {
        order_id: String,
        items: Vec<StockItem>,
        causation_id: Option<Uuid>,
    },
    /// From `order.payment.completed`: sell what the order holds.
    SellStock {
        order_id: String,
        payment_id: String,
        causation_id: Option<Uuid>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StockReservationEvent {
    #[serde(rename_all = "camelCase")]
    StockReserved {
        lines: Vec<ReservedLine>,
        causation_id: Option<Uuid>,
    },
    #[serde(rename_all = "camelCase")]
    StockReservationFailed {
        shortages: Vec<Shortage>,
        causation_id: Option<Uuid>,
    },
    #[serde(rename_all = "camelCase")]
    StockReleased {
        items: Vec<StockItem>,
        causation_id: Option<Uuid>,
    },
    /// The order was cancelled before its stock was reserved.
    #[serde(rename_all = "camelCase")]
    ReservationVoided { causation_id: Option<Uuid> },
    /// The order was paid: what it held is sold (`stock.confirmed`).
    #[serde(rename_all = "camelCase")]
    StockConfirmed {
        payment_id: String,
        items: Vec<StockItem>,
        causation_id: Option<Uuid>,
    },
}

domain_event!(StockReservationEvent {
    StockReserved,
    StockReservationFailed,
    StockReleased,
    ReservationVoided,
    StockConfirmed
});

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StockReservationError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Selling stock the order does not hold (never reserved, released).
    #[error("order holds no stock to sell (reservation {0})")]
    NothingHeld(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReservationStatus {
    Reserved,
    Failed,
    Released,
    Voided,
    Sold,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Reserved => "RESERVED",
            ReservationStatus::Failed => "FAILED",
            ReservationStatus::Released => "RELEASED",
            ReservationStatus::Voided => "VOIDED",
            ReservationStatus::Sold => "SOLD",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockReservation {
    pub status: Option<ReservationStatus>,
    pub lines: Vec<ReservedLine>,
    pub shortages: Vec<Shortage>,
}

impl StockReservation {
    /// Whether this order holds stock right now.
    pub fn holds_stock(&self) -> bool {
        self.status == Some(ReservationStatus::Reserved)
    }

    /// What the reservation holds, product by product.
    fn held_items(&self) -> Vec<StockItem> {
        self.lines.iter().map(ReservedLine::stock_item).collect()
    }
}

impl Aggregate for StockReservation {
    const TYPE: &'static str = "StockReservation";
    type Command = StockReservationCommand;
    type Event = StockReservationEvent;
    type Error = StockReservationError;
    type Services = StockServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command {
            StockReservationCommand::ReserveStock {
                order_id,
                items,
                causation_id,
            } => {
                // Already reserved, failed, released or voided: a repeat or a
                // request for a cancelled order — nothing to hold.
                if self.status.is_some() {
                    return Ok(());
                }
                if items.is_empty() {
                    return Err(FieldError::new("items", "nothing to reserve").into());
                }
                let event = match services.ledger.reserve_all(&order_id, &items).await? {
                    Ok(lines) => StockReservationEvent::StockReserved {
                        lines,
                        causation_id,
                    },
                    Err(shortages) => StockReservationEvent::StockReservationFailed {
                        shortages,
                        causation_id,
                    },
                };
                sink.write(event, self).await;
            }
            StockReservationCommand::ReleaseStock {
                order_id,
                items,
                causation_id,
            } => match self.status {
                Some(ReservationStatus::Reserved) => {
                    services.ledger.release_all(&order_id, &items).await?;
                    let event = StockReservationEvent::StockReleased {
                        items: self.held_items(),
                        causation_id,
                    };
                    sink.write(event, self).await;
                }
                None => {
                    // A reservation that crashed half-way may have left holds
                    // behind; returning them is harmless when there are none.
                    services.ledger.release_all(&order_id, &items).await?;
                    sink.write(
                        StockReservationEvent::ReservationVoided { causation_id },
                        self,
                    )
                    .await;
                }
                // Sold cannot happen (a paid order is never cancelled).
                Some(
                    ReservationStatus::Failed
                    | ReservationStatus::Released
                    | ReservationStatus::Voided
                    | ReservationStatus::Sold,
                ) => {}
            },
            StockReservationCommand::SellStock {
                order_id,
                payment_id,
                causation_id,
            } => match self.status {
                Some(ReservationStatus::Sold) => {}
                Some(ReservationStatus::Reserved) => {
                    let items = self.held_items();
                    services.ledger.sell_all(&order_id, &items).await?;
                    let event = StockReservationEvent::StockConfirmed {
                        payment_id,
                        items,
                        causation_id,
                    };
                    sink.write(event, self).await;
                }
                other => {
                    let status = other.map_or("missing", ReservationStatus::as_str);
                    return Err(StockReservationError::NothingHeld(status.to_string()));
                }
            },
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            StockReservationEvent::StockReserved { lines, .. } => {
                self.status = Some(ReservationStatus::Reserved);
                self.lines = lines;
            }
            StockReservationEvent::StockReservationFailed { shortages, .. } => {
                self.status = Some(ReservationStatus::Failed);
                self.shortages = shortages;
            }
            StockReservationEvent::StockReleased { .. } => {
                self.status = Some(ReservationStatus::Released);
            }
            StockReservationEvent::ReservationVoided { .. } => {
                self.status = Some(ReservationStatus::Voided);
            }
            StockReservationEvent::StockConfirmed { .. } => {
                self.status = Some(ReservationStatus::Sold);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use cqrs_es::test::TestFramework;

    use super::*;

    /// Records what it was asked and answers as told.
    #[derive(Default)]
    struct ScriptedLedger {
        shortages: Vec<Shortage>,
        calls: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl StockLedger for ScriptedLedger {
        async fn reserve_all(
            &self,
            order_id: &str,
            items: &[StockItem],
        ) -> Result<Result<Vec<ReservedLine>, Vec<Shortage>>, LedgerError> {
            self.calls
                .lock()
                .map_err(|e| LedgerError(e.to_string()))?
                .push(format!("reserve {order_id}"));
            if !self.shortages.is_empty() {
                return Ok(Err(self.shortages.clone()));
            }
            Ok(Ok(items
                .iter()
                .map(|i| line(&i.product_id, i.quantity, 10))
                .collect()))
        }

        async fn release_all(
            &self,
            order_id: &str,
            _items: &[StockItem],
        ) -> Result<(), LedgerError> {
            self.calls
                .lock()
                .map_err(|e| LedgerError(e.to_string()))?
                .push(format!("release {order_id}"));
            Ok(())
        }

        async fn sell_all(&self, order_id: &str, _items: &[StockItem]) -> Result<(), LedgerError> {
            self.calls
                .lock()
                .map_err(|e| LedgerError(e.to_string()))?
                .push(format!("sell {order_id}"));
            Ok(())
        }
    }

    type StockTestFramework = TestFramework<StockReservation>;

    fn services(ledger: ScriptedLedger) -> StockServices {
        StockServices::new(Arc::new(ledger))
    }

    fn line(product_id: &str, quantity: u32, available_after: u32) -> ReservedLine {
        ReservedLine {
            product_id: product_id.into(),
            quantity,
            available_after,
        }
    }

    fn items() -> Vec<StockItem> {
        vec![StockItem {
            product_id: "p-1".into(),
            quantity: 2,
        }]
    }

    fn reserve() -> StockReservationCommand {
        StockReservationCommand::ReserveStock {
            order_id: "o-1".into(),
            items: items(),
            causation_id: None,
        }
    }

    fn release() -> StockReservationCommand {
        StockReservationCommand::ReleaseStock {
            order_id: "o-1".into(),
            items: items(),
            causation_id: None,
        }
    }

    fn reserved() -> StockReservationEvent {
        StockReservationEvent::StockReserved {
            lines: vec![line("p-1", 2, 10)],
            causation_id: None,
        }
    }

    #[tokio::test]
    async fn reserve_stock_holds_every_item() {
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given_no_previous_events()
            .when_async(reserve())
            .await
            .then_expect_events(vec![reserved()]);
    }

    #[tokio::test]
    async fn reserve_stock_short_of_a_product_fails_naming_it() {
        let shortage = Shortage {
            product_id: "p-1".into(),
            requested: 2,
            available: 1,
        };
        let ledger = ScriptedLedger {
            shortages: vec![shortage.clone()],
            ..Default::default()
        };
        StockTestFramework::with(services(ledger))
            .given_no_previous_events()
            .when_async(reserve())
            .await
            .then_expect_events(vec![StockReservationEvent::StockReservationFailed {
                shortages: vec![shortage],
                causation_id: None,
            }]);
    }

    #[tokio::test]
    async fn a_repeated_reservation_is_a_no_op() {
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given(vec![reserved()])
            .when_async(reserve())
            .await
            .then_expect_events(vec![]);
    }

    #[tokio::test]
    async fn release_stock_returns_a_reservation() {
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given(vec![reserved()])
            .when_async(release())
            .await
            .then_expect_events(vec![StockReservationEvent::StockReleased {
                items: items(),
                causation_id: None,
            }]);
    }

    #[tokio::test]
    async fn a_cancellation_that_arrives_first_voids_the_reservation() {
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given_no_previous_events()
            .when_async(release())
            .await
            .then_expect_events(vec![StockReservationEvent::ReservationVoided {
                causation_id: None,
            }]);
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given(vec![StockReservationEvent::ReservationVoided {
                causation_id: None,
            }])
            .when_async(reserve())
            .await
            .then_expect_events(vec![]);
    }

    #[tokio::test]
    async fn releasing_a_failed_or_released_reservation_is_a_no_op() {
        let failed = StockReservationEvent::StockReservationFailed {
            shortages: vec![],
            causation_id: None,
        };
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given(vec![failed])
            .when_async(release())
            .await
            .then_expect_events(vec![]);
        let released = StockReservationEvent::StockReleased {
            items: items(),
            causation_id: None,
        };
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given(vec![reserved(), released])
            .when_async(release())
            .await
            .then_expect_events(vec![]);
    }

    fn sell() -> StockReservationCommand {
        StockReservationCommand::SellStock {
            order_id: "o-1".into(),
            payment_id: "pay-1".into(),
            causation_id: None,
        }
    }

    #[tokio::test]
    async fn sell_stock_sells_a_reservation_once() {
        let sold = StockReservationEvent::StockConfirmed {
            payment_id: "pay-1".into(),
            items: items(),
            causation_id: None,
        };
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given(vec![reserved()])
            .when_async(sell())
            .await
            .then_expect_events(vec![sold.clone()]);
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given(vec![reserved(), sold.clone()])
            .when_async(sell())
            .await
            .then_expect_events(vec![]);
        // A cancellation that comes after the sale returns nothing.
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given(vec![reserved(), sold])
            .when_async(release())
            .await
            .then_expect_events(vec![]);
    }

    #[tokio::test]
    async fn selling_what_is_not_held_is_refused() {
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given_no_previous_events()
            .when_async(sell())
            .await
            .then_expect_error(StockReservationError::NothingHeld("missing".into()));
        let released = StockReservationEvent::StockReleased {
            items: items(),
            causation_id: None,
        };
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given(vec![reserved(), released])
            .when_async(sell())
            .await
            .then_expect_error(StockReservationError::NothingHeld("RELEASED".into()));
    }

    #[tokio::test]
    async fn reserve_stock_with_no_items_is_refused() {
        StockTestFramework::with(services(ScriptedLedger::default()))
            .given_no_previous_events()
            .when_async(StockReservationCommand::ReserveStock {
                order_id: "o-1".into(),
                items: vec![],
                causation_id: None,
            })
            .await
            .then_expect_error(StockReservationError::Invalid(FieldError::new(
                "items",
                "nothing to reserve",
            )));
    }
}
