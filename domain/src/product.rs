//! The Product aggregate (id = productId): the catalog entry operators set —
//! unit price and stock — and how much of the stock orders hold.
//!
//! Stock is counted in three buckets: `available`, `reserved` (held for
//! orders) and `sold` (held for orders that were paid). Reserving moves
//! units from available to reserved, releasing moves them back, selling
//! moves them on to sold; only an operator's stock level changes
//! available. All are unsigned and every move is checked, so stock can
//! never go negative.
//!
//! What each order holds is not kept in the aggregate — a product's state
//! would grow with every order it ever sold (orders waiting for payment hold
//! for ever). The product's own stored events are the record: a command
//! asks [`HoldRecords`] (its `Services`) what the order holds here, which
//! keeps a repeated hold a no-op and a release exact.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use crate::money::Money;
use crate::values::FieldError;

/// Highest stock level an operator may set; keeps available + reserved far
/// from `u32::MAX`.
pub const MAX_STOCK: u32 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stock records unavailable: {0}")]
pub struct RecordsError(pub String);

/// What an order holds on a product, by the product's stored events: the
/// quantity of its last `StockHeld` unless a `StockReturned` followed.
/// Implemented over the event store by the service, and in memory
/// ([`MemoryHolds`]) by the tests.
#[async_trait]
pub trait HoldRecords: Send + Sync {
    async fn held(&self, product_id: &str, order_id: &str) -> Result<Option<u32>, RecordsError>;
}

/// The Product's services: its own id (an aggregate is not told it) and
/// where its holds are recorded.
#[derive(Clone)]
pub struct ProductServices {
    product_id: String,
    records: Arc<dyn HoldRecords>,
}

impl ProductServices {
    pub fn new(product_id: impl Into<String>, records: Arc<dyn HoldRecords>) -> Self {
        Self {
            product_id: product_id.into(),
            records,
        }
    }

    async fn held(&self, order_id: &str) -> Result<Option<u32>, ProductError> {
        self.records
            .held(&self.product_id, order_id)
            .await
            .map_err(ProductError::Records)
    }
}

/// Holds in memory, fed the events a product emitted: the tests' record.
#[derive(Debug, Default)]
pub struct MemoryHolds {
    holds: Mutex<BTreeMap<(String, String), u32>>,
}

impl MemoryHolds {
    /// Notes what `event`, emitted by `product_id`, does to its holds.
    pub fn record(&self, product_id: &str, event: &ProductEvent) {
        let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            ProductEvent::StockHeld {
                order_id, quantity, ..
            } => {
                holds.insert((product_id.to_string(), order_id.clone()), *quantity);
            }
            ProductEvent::StockReturned { order_id, .. }
            | ProductEvent::StockSold { order_id, .. } => {
                holds.remove(&(product_id.to_string(), order_id.clone()));
            }
            ProductEvent::PriceSet { .. } | ProductEvent::StockLevelSet { .. } => {}
        }
    }

    /// Every hold: ((productId, orderId), quantity).
    pub fn all(&self) -> Vec<((String, String), u32)> {
        let holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        holds.iter().map(|(k, &q)| (k.clone(), q)).collect()
    }
}

#[async_trait]
impl HoldRecords for MemoryHolds {
    async fn held(&self, product_id: &str, order_id: &str) -> Result<Option<u32>, RecordsError> {
        let holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(holds
            .get(&(product_id.to_string(), order_id.to_string()))
            .copied())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProductCommand {
    /// Operator's `product set`: price and/or stock level (the available
    /// quantity after the command).
    SetProduct {
        price: Option<Money>,
        stock: Option<u32>,
    },
    /// Holds `quantity` units for `order_id`; a repeat for an order that
    /// already holds stock here is a no-op.
    ReserveStock { order_id: String, quantity: u32 },
    /// Returns what `order_id` holds; a no-op when it holds nothing.
    ReleaseStock { order_id: String },
    /// Sells what `order_id` holds (its payment was taken); a no-op when
    /// it holds nothing.
    SellStock { order_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProductEvent {
    #[serde(rename_all = "camelCase")]
    PriceSet { price: Money },
    #[serde(rename_all = "camelCase")]
    StockLevelSet { available: u32, previous: u32 },
    #[serde(rename_all = "camelCase")]
    StockHeld {
        order_id: String,
        quantity: u32,
        available_after: u32,
    },
    #[serde(rename_all = "camelCase")]
    StockReturned {
        order_id: String,
        quantity: u32,
        available_after: u32,
    },
    /// What the order held is sold: it leaves reserved for sold
    /// (available is unchanged, and recorded as it is).
    #[serde(rename_all = "camelCase")]
    StockSold {
        order_id: String,
        quantity: u32,
        available_after: u32,
    },
}

domain_event!(ProductEvent {
    PriceSet,
    StockLevelSet,
    StockHeld,
    StockReturned,
    StockSold
});

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProductError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("unknown product")]
    UnknownProduct,
    #[error("insufficient stock: requested {requested}, available {available}")]
    InsufficientStock { requested: u32, available: u32 },
    #[error(transparent)]
    Records(RecordsError),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub known: bool,
    pub price: Option<Money>,
    pub available: u32,
    /// Units held for all orders together.
    pub reserved: u64,
    /// Units sold (held for orders that were paid).
    #[serde(default)]
    pub sold: u64,
}

impl Product {
    /// A product can be ordered once it has a price.
    pub fn orderable_price(&self) -> Option<Money> {
        self.price
    }
}

impl Aggregate for Product {
    const TYPE: &'static str = "Product";
    type Command = ProductCommand;
    type Event = ProductEvent;
    type Error = ProductError;
    type Services = ProductServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command {
            ProductCommand::SetProduct { price, stock } => {
                if price.is_none() && stock.is_none() {
                    return Err(
                        FieldError::new("price", "give a price, a stock level or both").into(),
                    );
                }
                if let Some(stock) = stock.filter(|&s| s > MAX_STOCK) {
                    return Err(FieldError::new(
                        "stock",
                        format!("{stock} exceeds the maximum of {MAX_STOCK}"),
                    )
                    .into());
                }
                if let Some(price) = price.filter(|&p| Some(p) != self.price) {
                    sink.write(ProductEvent::PriceSet { price }, self).await;
                }
                if let Some(available) = stock.filter(|&s| s != self.available || !self.known) {
                    let previous = self.available;
                    sink.write(
                        ProductEvent::StockLevelSet {
                            available,
                            previous,
                        },
                        self,
                    )
                    .await;
                }
            }
            ProductCommand::ReserveStock { order_id, quantity } => {
                if !self.known {
                    return Err(ProductError::UnknownProduct);
                }
                if quantity == 0 {
                    return Err(FieldError::new("quantity", "must be at least 1").into());
                }
                if services.held(&order_id).await?.is_some() {
                    return Ok(());
                }
                let Some(available_after) = self.available.checked_sub(quantity) else {
                    return Err(ProductError::InsufficientStock {
                        requested: quantity,
                        available: self.available,
                    });
                };
                let event = ProductEvent::StockHeld {
                    order_id,
                    quantity,
                    available_after,
                };
                sink.write(event, self).await;
            }
            ProductCommand::ReleaseStock { order_id } => {
                if let Some(quantity) = services.held(&order_id).await? {
                    let event = ProductEvent::StockReturned {
                        order_id,
                        quantity,
                        available_after: self.available + quantity,
                    };
                    sink.write(event, self).await;
                }
            }
            ProductCommand::SellStock { order_id } => {
                if let Some(quantity) = services.held(&order_id).await? {
                    let event = ProductEvent::StockSold {
                        order_id,
                        quantity,
                        available_after: self.available,
                    };
                    sink.write(event, self).await;
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ProductEvent::PriceSet { price } => {
                self.known = true;
                self.price = Some(price);
            }
            ProductEvent::StockLevelSet { available, .. } => {
                self.known = true;
                self.available = available;
            }
            ProductEvent::StockHeld {
                quantity,
                available_after,
                ..
            } => {
                self.available = available_after;
                self.reserved += u64::from(quantity);
            }
            ProductEvent::StockReturned {
                quantity,
                available_after,
                ..
            } => {
                self.available = available_after;
                self.reserved = self.reserved.saturating_sub(u64::from(quantity));
            }
            ProductEvent::StockSold { quantity, .. } => {
                self.reserved = self.reserved.saturating_sub(u64::from(quantity));
                self.sold += u64::from(quantity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type ProductTestFramework = TestFramework<Product>;

    /// The framework given `events`, with hold records as a store holding
    /// those events would answer.
    fn given(events: Vec<ProductEvent>) -> cqrs_es::test::AggregateTestExecutor<Product> {
        let holds = MemoryHolds::default();
        for event in &events {
            holds.record("p-1", event);
        }
        ProductTestFramework::with(ProductServices::new("p-1", Arc::new(holds))).given(events)
    }

    fn given_no_previous_events() -> cqrs_es::test::AggregateTestExecutor<Product> {
        given(Vec::new())
    }

    fn price(s: &str) -> Money {
        s.parse().expect("test price")
    }

    fn stocked(available: u32) -> Vec<ProductEvent> {
        vec![
            ProductEvent::PriceSet {
                price: price("12900.00"),
            },
            ProductEvent::StockLevelSet {
                available,
                previous: 0,
            },
        ]
    }

    fn held(order_id: &str, quantity: u32, available_after: u32) -> ProductEvent {
        ProductEvent::StockHeld {
            order_id: order_id.into(),
            quantity,
            available_after,
        }
    }

    fn reserve(order_id: &str, quantity: u32) -> ProductCommand {
        ProductCommand::ReserveStock {
            order_id: order_id.into(),
            quantity,
        }
    }

    #[tokio::test]
    async fn set_product_sets_price_and_stock() {
        given_no_previous_events()
            .when_async(ProductCommand::SetProduct {
                price: Some(price("12900.00")),
                stock: Some(15),
            })
            .await
            .then_expect_events(stocked(15));
    }

    #[tokio::test]
    async fn set_product_changes_only_what_differs() {
        given(stocked(15))
            .when_async(ProductCommand::SetProduct {
                price: Some(price("12900.00")),
                stock: Some(20),
            })
            .await
            .then_expect_events(vec![ProductEvent::StockLevelSet {
                available: 20,
                previous: 15,
            }]);
    }

    #[tokio::test]
    async fn set_product_needs_something_to_set_and_a_sane_stock() {
        given_no_previous_events()
            .when_async(ProductCommand::SetProduct {
                price: None,
                stock: None,
            })
            .await
            .then_expect_error(ProductError::Invalid(FieldError::new(
                "price",
                "give a price, a stock level or both",
            )));
        given_no_previous_events()
            .when_async(ProductCommand::SetProduct {
                price: None,
                stock: Some(MAX_STOCK + 1),
            })
            .await
            .then_expect_error(ProductError::Invalid(FieldError::new(
                "stock",
                "1000000001 exceeds the maximum of 1000000000",
            )));
    }

    #[tokio::test]
    async fn reserve_stock_holds_units_for_the_order() {
        given(stocked(5))
            .when_async(reserve("o-1", 2))
            .await
            .then_expect_events(vec![held("o-1", 2, 3)]);
    }

    #[tokio::test]
    async fn reserve_stock_beyond_what_is_available_is_refused() {
        given([stocked(5), vec![held("o-1", 4, 1)]].concat())
            .when_async(reserve("o-2", 2))
            .await
            .then_expect_error(ProductError::InsufficientStock {
                requested: 2,
                available: 1,
            });
    }

    #[tokio::test]
    async fn reserve_stock_twice_for_one_order_is_a_no_op() {
        given([stocked(5), vec![held("o-1", 2, 3)]].concat())
            .when_async(reserve("o-1", 2))
            .await
            .then_expect_events(vec![]);
    }

    #[tokio::test]
    async fn reserve_stock_of_an_unknown_product_is_refused() {
        given_no_previous_events()
            .when_async(reserve("o-1", 1))
            .await
            .then_expect_error(ProductError::UnknownProduct);
    }

    #[tokio::test]
    async fn release_stock_returns_what_the_order_held() {
        given([stocked(5), vec![held("o-1", 2, 3)]].concat())
            .when_async(ProductCommand::ReleaseStock {
                order_id: "o-1".into(),
            })
            .await
            .then_expect_events(vec![ProductEvent::StockReturned {
                order_id: "o-1".into(),
                quantity: 2,
                available_after: 5,
            }]);
    }

    #[tokio::test]
    async fn sell_stock_sells_what_the_order_held_once() {
        let sold = ProductEvent::StockSold {
            order_id: "o-1".into(),
            quantity: 2,
            available_after: 3,
        };
        given([stocked(5), vec![held("o-1", 2, 3)]].concat())
            .when_async(ProductCommand::SellStock {
                order_id: "o-1".into(),
            })
            .await
            .then_expect_events(vec![sold.clone()]);
        // Sold is no longer held: neither sold again nor returned.
        for command in [
            ProductCommand::SellStock {
                order_id: "o-1".into(),
            },
            ProductCommand::ReleaseStock {
                order_id: "o-1".into(),
            },
        ] {
            given([stocked(5), vec![held("o-1", 2, 3), sold.clone()]].concat())
                .when_async(command)
                .await
                .then_expect_events(vec![]);
        }
        let mut product = Product::default();
        for event in [stocked(5), vec![held("o-1", 2, 3), sold]].concat() {
            product.apply(event);
        }
        assert_eq!(
            (product.available, product.reserved, product.sold),
            (3, 0, 2)
        );
    }

    #[tokio::test]
    async fn release_stock_of_an_order_holding_nothing_is_a_no_op() {
        given(stocked(5))
            .when_async(ProductCommand::ReleaseStock {
                order_id: "o-9".into(),
            })
            .await
            .then_expect_events(vec![]);
    }

    #[tokio::test]
    async fn a_hold_returned_earlier_is_not_returned_again() {
        let returned = ProductEvent::StockReturned {
            order_id: "o-1".into(),
            quantity: 2,
            available_after: 5,
        };
        given([stocked(5), vec![held("o-1", 2, 3), returned]].concat())
            .when_async(ProductCommand::ReleaseStock {
                order_id: "o-1".into(),
            })
            .await
            .then_expect_events(vec![]);
    }

    #[tokio::test]
    async fn reserved_counts_what_orders_hold() {
        let mut product = Product::default();
        for event in [
            stocked(5),
            vec![
                held("o-1", 2, 3),
                held("o-2", 1, 2),
                ProductEvent::StockReturned {
                    order_id: "o-1".into(),
                    quantity: 2,
                    available_after: 4,
                },
            ],
        ]
        .concat()
        {
            product.apply(event);
        }
        assert_eq!((product.available, product.reserved), (4, 1));
    }

    struct Unreachable;

    #[async_trait]
    impl HoldRecords for Unreachable {
        async fn held(&self, _: &str, _: &str) -> Result<Option<u32>, RecordsError> {
            Err(RecordsError("connection refused".into()))
        }
    }

    #[tokio::test]
    async fn unreadable_hold_records_refuse_the_command() {
        ProductTestFramework::with(ProductServices::new("p-1", Arc::new(Unreachable)))
            .given(stocked(5))
            .when_async(reserve("o-1", 1))
            .await
            .then_expect_error(ProductError::Records(RecordsError(
                "connection refused".into(),
            )));
    }
}
