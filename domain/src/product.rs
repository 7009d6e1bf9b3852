//! The Product aggregate (id = productId): the catalog entry operators set —
//! unit price and stock — and the stock held for each order.
//!
//! Stock is counted in two buckets: `available` and the per-order `held`
//! reservations. Reserving moves units from available to held, releasing
//! moves them back; only an operator's stock level changes their sum. Both
//! are unsigned and every move is checked, so stock can never go negative.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::money::Money;
use crate::values::FieldError;

/// Orders' holds on a product. A persistent map: copying a product — as
/// every command does, to run on a copy — shares it instead of copying
/// every order's entry, so a product stays cheap however many orders hold
/// it.
pub type Holds = imbl::OrdMap<String, u32>;

/// Highest stock level an operator may set; keeps available + held far from
/// `u32::MAX`.
pub const MAX_STOCK: u32 = 1_000_000_000;

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
}

impl DomainEvent for ProductEvent {
    fn event_type(&self) -> String {
        match self {
            ProductEvent::PriceSet { .. } => "PriceSet",
            ProductEvent::StockLevelSet { .. } => "StockLevelSet",
            ProductEvent::StockHeld { .. } => "StockHeld",
            ProductEvent::StockReturned { .. } => "StockReturned",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProductError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("unknown product")]
    UnknownProduct,
    #[error("insufficient stock: requested {requested}, available {available}")]
    InsufficientStock { requested: u32, available: u32 },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub known: bool,
    pub price: Option<Money>,
    pub available: u32,
    pub held: Holds,
}

impl Product {
    /// Units held for all orders together.
    pub fn reserved(&self) -> u64 {
        self.held.values().map(|&q| u64::from(q)).sum()
    }

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
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
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
                if self.held.contains_key(&order_id) {
                    return Ok(());
                }
                if quantity == 0 {
                    return Err(FieldError::new("quantity", "must be at least 1").into());
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
                if let Some(&quantity) = self.held.get(&order_id) {
                    let event = ProductEvent::StockReturned {
                        order_id,
                        quantity,
                        available_after: self.available + quantity,
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
                order_id,
                quantity,
                available_after,
            } => {
                self.available = available_after;
                self.held.insert(order_id, quantity);
            }
            ProductEvent::StockReturned {
                order_id,
                available_after,
                ..
            } => {
                self.available = available_after;
                self.held.remove(&order_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type ProductTestFramework = TestFramework<Product>;

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
        ProductTestFramework::with(())
            .given_no_previous_events()
            .when_async(ProductCommand::SetProduct {
                price: Some(price("12900.00")),
                stock: Some(15),
            })
            .await
            .then_expect_events(stocked(15));
    }

    #[tokio::test]
    async fn set_product_changes_only_what_differs() {
        ProductTestFramework::with(())
            .given(stocked(15))
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
        ProductTestFramework::with(())
            .given_no_previous_events()
            .when_async(ProductCommand::SetProduct {
                price: None,
                stock: None,
            })
            .await
            .then_expect_error(ProductError::Invalid(FieldError::new(
                "price",
                "give a price, a stock level or both",
            )));
        ProductTestFramework::with(())
            .given_no_previous_events()
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
        ProductTestFramework::with(())
            .given(stocked(5))
            .when_async(reserve("o-1", 2))
            .await
            .then_expect_events(vec![held("o-1", 2, 3)]);
    }

    #[tokio::test]
    async fn reserve_stock_beyond_what_is_available_is_refused() {
        ProductTestFramework::with(())
            .given(stocked(5))
            .and(vec![held("o-1", 4, 1)])
            .when_async(reserve("o-2", 2))
            .await
            .then_expect_error(ProductError::InsufficientStock {
                requested: 2,
                available: 1,
            });
    }

    #[tokio::test]
    async fn reserve_stock_twice_for_one_order_is_a_no_op() {
        ProductTestFramework::with(())
            .given(stocked(5))
            .and(vec![held("o-1", 2, 3)])
            .when_async(reserve("o-1", 2))
            .await
            .then_expect_events(vec![]);
    }

    #[tokio::test]
    async fn reserve_stock_of_an_unknown_product_is_refused() {
        ProductTestFramework::with(())
            .given_no_previous_events()
            .when_async(reserve("o-1", 1))
            .await
            .then_expect_error(ProductError::UnknownProduct);
    }

    #[tokio::test]
    async fn release_stock_returns_what_the_order_held() {
        ProductTestFramework::with(())
            .given(stocked(5))
            .and(vec![held("o-1", 2, 3)])
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
    async fn release_stock_of_an_order_holding_nothing_is_a_no_op() {
        ProductTestFramework::with(())
            .given(stocked(5))
            .when_async(ProductCommand::ReleaseStock {
                order_id: "o-9".into(),
            })
            .await
            .then_expect_events(vec![]);
    }
}
