//! Random command sequences through all three aggregates, wired the way the
//! saga wires them, checking after every step the invariants the domain
//! promises (SPEC §2):
//!
//! - stock never goes negative, and a product's available + reserved + sold
//!   changes only by an operator's restock;
//! - what the products hold is exactly what the reserved reservations say;
//! - stock is sold only for an order whose payment was recorded, and what
//!   a product sold is exactly what the sold reservations say;
//! - no order is both paid and cancelled;
//! - once every cancellation has reached the stock side, a cancelled order
//!   holds no stock — whatever order the messages arrived in, and however
//!   often they were repeated.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use order_saga_domain::*;
use proptest::prelude::*;
use tokio::sync::Mutex;
use uuid::Uuid;

const PRODUCTS: usize = 3;
const ORDERS: usize = 5;

/// Runs one command against an in-memory aggregate; on refusal the state is
/// left as it was, as the event store would.
async fn exec<A: Aggregate + Clone>(
    state: &mut A,
    command: A::Command,
    services: &A::Services,
) -> Result<Vec<A::Event>, A::Error> {
    let mut working = state.clone();
    let sink = EventSink::default();
    working.handle(command, services, &sink).await?;
    *state = working;
    Ok(sink.collect().await)
}

fn product_id(i: usize) -> String {
    format!("p-{i}")
}

/// Product stock in memory: the primitive the domain's `ProductLedger`
/// (the same ledger the service runs) is built on.
#[derive(Default)]
struct MemLedger {
    products: Mutex<BTreeMap<String, Product>>,
    holds: Arc<MemoryHolds>,
}

impl MemLedger {
    fn services(&self, product_id: &str) -> ProductServices {
        ProductServices::new(product_id, self.holds.clone())
    }
}

#[async_trait]
impl ProductStock for MemLedger {
    async fn product_command(
        &self,
        product_id: &str,
        command: ProductCommand,
    ) -> Result<Result<Product, ProductError>, LedgerError> {
        let mut products = self.products.lock().await;
        let product = products.entry(product_id.to_string()).or_default();
        let events = match exec(product, command, &self.services(product_id)).await {
            Ok(events) => events,
            Err(refused) => return Ok(Err(refused)),
        };
        for event in &events {
            self.holds.record(product_id, event);
        }
        Ok(Ok(product.clone()))
    }
}

#[async_trait]
impl Catalog for MemLedger {
    async fn unit_price(&self, product_id: &str) -> Result<Option<Money>, CatalogError> {
        Ok(self
            .products
            .lock()
            .await
            .get(product_id)
            .and_then(Product::orderable_price))
    }
}

#[derive(Debug, Clone)]
enum Step {
    Create {
        order: usize,
        items: Vec<(usize, u32)>,
    },
    /// `order.created` reaches the stock side.
    Reserve {
        order: usize,
    },
    /// The stock side's reply reaches the order side.
    Reply {
        order: usize,
    },
    /// `order.confirmed` reaches the payment-wait handler.
    StartPaymentWait {
        order: usize,
    },
    /// A timeout or the customer cancels.
    Cancel {
        order: usize,
        reason: usize,
    },
    /// `order.cancelled` reaches the stock side.
    Release {
        order: usize,
    },
    Restock {
        product: usize,
        stock: u32,
    },
    /// A `payment.completed` reaches the order side: one of two payments,
    /// for the order's total or not.
    Pay {
        order: usize,
        payment: u8,
        exact: bool,
    },
    /// A `payment.failed` reaches the order side.
    FailPayment {
        order: usize,
    },
    /// The payment wait's deadline fires.
    Expire {
        order: usize,
    },
    /// `order.payment.completed` reaches the stock side.
    Sell {
        order: usize,
    },
    /// `stock.confirmed` reaches the order side.
    Complete {
        order: usize,
    },
    /// The order's next message on the happy path arrives (so that random
    /// sequences reach the payment's steps often).
    Advance {
        order: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let order = 0..ORDERS;
    prop_oneof![
        1 => (
            order.clone(),
            prop::collection::vec((0..PRODUCTS, 1..6u32), 1..=PRODUCTS)
        )
            .prop_map(|(order, items)| Step::Create { order, items }),
        1 => order.clone().prop_map(|order| Step::Reserve { order }),
        1 => order.clone().prop_map(|order| Step::Reply { order }),
        1 => order
            .clone()
            .prop_map(|order| Step::StartPaymentWait { order }),
        1 => (order.clone(), 0..CancelReason::ALL.len())
            .prop_map(|(order, reason)| Step::Cancel { order, reason }),
        1 => order.clone().prop_map(|order| Step::Release { order }),
        1 => (0..PRODUCTS, 0..12u32).prop_map(|(product, stock)| Step::Restock { product, stock }),
        1 => (order.clone(), 0..2u8, any::<bool>())
            .prop_map(|(order, payment, exact)| Step::Pay { order, payment, exact }),
        1 => order.clone().prop_map(|order| Step::FailPayment { order }),
        1 => order.clone().prop_map(|order| Step::Expire { order }),
        1 => order.clone().prop_map(|order| Step::Sell { order }),
        1 => order.clone().prop_map(|order| Step::Complete { order }),
        8 => order.prop_map(|order| Step::Advance { order }),
    ]
}

struct World {
    ledger: Arc<MemLedger>,
    order_services: OrderServices,
    stock_services: StockServices,
    orders: Vec<Order>,
    order_events: Vec<Vec<OrderEvent>>,
    reservations: Vec<StockReservation>,
    /// Whether the order's `order.cancelled` has reached the stock side.
    release_delivered: Vec<bool>,
    /// available + reserved + sold each product must have: moved only by
    /// restocks.
    expected_total: BTreeMap<String, u64>,
}

impl World {
    async fn new() -> Self {
        let ledger = Arc::new(MemLedger::default());
        let mut expected_total = BTreeMap::new();
        {
            let mut products = ledger.products.lock().await;
            for i in 0..PRODUCTS {
                let mut product = Product::default();
                let command = ProductCommand::SetProduct {
                    price: Some("1.00".parse().expect("price")),
                    stock: Some(4),
                };
                exec(&mut product, command, &ledger.services(&product_id(i)))
                    .await
                    .expect("stock the product");
                products.insert(product_id(i), product);
                expected_total.insert(product_id(i), 4);
            }
        }
        World {
            order_services: OrderServices::new(ledger.clone()),
            stock_services: StockServices::new(Arc::new(ProductLedger::new(ledger.clone()))),
            ledger,
            orders: vec![Order::default(); ORDERS],
            order_events: vec![Vec::new(); ORDERS],
            reservations: vec![StockReservation::default(); ORDERS],
            release_delivered: vec![false; ORDERS],
            expected_total,
        }
    }

    fn order_id(order: usize) -> String {
        format!("o-{order}")
    }

    fn stock_items(&self, order: usize) -> Vec<StockItem> {
        self.orders[order]
            .items
            .iter()
            .map(OrderLine::stock_item)
            .collect()
    }

    async fn order_command(&mut self, order: usize, command: OrderCommand) {
        if let Ok(events) = exec(&mut self.orders[order], command, &self.order_services).await {
            self.order_events[order].extend(events);
        }
    }

    async fn stock_command(&mut self, order: usize, command: StockReservationCommand) {
        let _ = exec(&mut self.reservations[order], command, &self.stock_services).await;
    }

    /// A fixed causation id per (order, kind), so redeliveries are exact
    /// repeats.
    fn cause(order: usize, kind: u8) -> Option<Uuid> {
        Some(Uuid::from_u128(((order as u128) << 8) | u128::from(kind)))
    }

    /// The step that delivers the order's next happy-path message.
    fn next_step(&self, order: usize) -> Option<Step> {
        use stock::ReservationStatus as R;
        let reservation = self.reservations[order].status;
        Some(match (self.orders[order].status, reservation) {
            (None, _) => Step::Create {
                order,
                items: vec![(order % PRODUCTS, 1)],
            },
            (Some(OrderStatus::OrderCreated), None) => Step::Reserve { order },
            (Some(OrderStatus::OrderCreated), Some(_)) => Step::Reply { order },
            (Some(OrderStatus::OrderConfirmed), _) => Step::StartPaymentWait { order },
            (Some(OrderStatus::PaymentWait), _) => Step::Pay {
                order,
                payment: 0,
                exact: true,
            },
            (Some(OrderStatus::PaymentCompleted), Some(R::Sold)) => Step::Complete { order },
            (Some(OrderStatus::PaymentCompleted), _) => Step::Sell { order },
            (Some(OrderStatus::OrderCancelled), _) if !self.release_delivered[order] => {
                Step::Release { order }
            }
            _ => return None,
        })
    }

    async fn run(&mut self, step: &Step) {
        if let Step::Advance { order } = *step {
            if let Some(next) = self.next_step(order) {
                Box::pin(self.run(&next)).await;
            }
            return;
        }
        match *step {
            Step::Create { order, ref items } => {
                let mut seen = std::collections::BTreeSet::new();
                let items = items
                    .iter()
                    .filter(|(p, _)| seen.insert(*p))
                    .map(|&(p, q)| ItemRequest {
                        product_id: product_id(p),
                        quantity: i64::from(q),
                    })
                    .collect();
                let command = OrderCommand::CreateOrder {
                    user_id: "u-1".into(),
                    store_id: "s-1".into(),
                    items,
                };
                self.order_command(order, command).await;
            }
            Step::Reserve { order } => {
                if self.orders[order].status.is_none() {
                    return; // no order.created exists yet
                }
                let command = StockReservationCommand::ReserveStock {
                    order_id: Self::order_id(order),
                    items: self.stock_items(order),
                    causation_id: Self::cause(order, 1),
                };
                self.stock_command(order, command).await;
            }
            Step::Reply { order } => {
                let command = match self.reservations[order].status {
                    Some(stock::ReservationStatus::Reserved) => OrderCommand::ConfirmOrder {
                        causation_id: Self::cause(order, 2),
                    },
                    Some(stock::ReservationStatus::Failed) => OrderCommand::CancelOrder {
                        reason: CancelReason::StockShortage,
                        causation_id: Self::cause(order, 3),
                    },
                    _ => return,
                };
                self.order_command(order, command).await;
            }
            Step::StartPaymentWait { order } => {
                let command = OrderCommand::StartPaymentWait {
                    causation_id: Self::cause(order, 4),
                };
                self.order_command(order, command).await;
            }
            Step::Cancel { order, reason } => {
                let command = OrderCommand::CancelOrder {
                    reason: CancelReason::ALL[reason],
                    causation_id: Self::cause(order, 5),
                };
                self.order_command(order, command).await;
            }
            Step::Release { order } => {
                if self.orders[order].status != Some(OrderStatus::OrderCancelled) {
                    return; // no order.cancelled exists yet
                }
                let command = StockReservationCommand::ReleaseStock {
                    order_id: Self::order_id(order),
                    items: self.stock_items(order),
                    causation_id: Self::cause(order, 6),
                };
                self.stock_command(order, command).await;
                self.release_delivered[order] = true;
            }
            Step::Restock { product, stock } => {
                let mut products = self.ledger.products.lock().await;
                let p = products.entry(product_id(product)).or_default();
                let before = u64::from(p.available);
                let command = ProductCommand::SetProduct {
                    price: None,
                    stock: Some(stock),
                };
                let services = self.ledger.services(&product_id(product));
                exec(p, command, &services).await.expect("restock");
                let total = self.expected_total.entry(product_id(product)).or_default();
                *total = *total - before + u64::from(stock);
            }
            Step::Pay {
                order,
                payment,
                exact,
            } => {
                let total = self.orders[order].total_amount;
                let amount = match exact {
                    true => total,
                    false => total
                        .checked_add("0.01".parse().expect("cent"))
                        .expect("sum"),
                };
                let command = OrderCommand::CompletePayment {
                    payment_id: format!("pay-{order}-{payment}"),
                    amount,
                    method: PaymentMethod::Card,
                    causation_id: Self::cause(order, 7 + payment),
                };
                self.order_command(order, command).await;
            }
            Step::FailPayment { order } => {
                let command = OrderCommand::CancelOrder {
                    reason: CancelReason::PaymentFailed,
                    causation_id: Self::cause(order, 9),
                };
                self.order_command(order, command).await;
            }
            Step::Expire { order } => {
                let command = OrderCommand::ExpirePaymentWait {
                    expiration_reason: "payment time exceeded (30 min)".into(),
                    causation_id: Self::cause(order, 10),
                };
                self.order_command(order, command).await;
            }
            Step::Sell { order } => {
                let Some(payment_id) = self.orders[order].payment_id.clone() else {
                    return; // no order.payment.completed exists yet
                };
                let command = StockReservationCommand::SellStock {
                    order_id: Self::order_id(order),
                    payment_id,
                    causation_id: Self::cause(order, 11),
                };
                self.stock_command(order, command).await;
            }
            Step::Complete { order } => {
                if self.reservations[order].status != Some(stock::ReservationStatus::Sold) {
                    return; // no stock.confirmed exists yet
                }
                let command = OrderCommand::CompleteOrder {
                    causation_id: Self::cause(order, 12),
                };
                self.order_command(order, command).await;
            }
            Step::Advance { .. } => {}
        }
    }

    async fn check(&self) -> Result<(), TestCaseError> {
        let products = self.ledger.products.lock().await;
        let holds = self.ledger.holds.all();
        for (id, product) in products.iter() {
            let total = u64::from(product.available) + product.reserved + product.sold;
            prop_assert_eq!(
                Some(&total),
                self.expected_total.get(id),
                "conservation of {}",
                id
            );
            let recorded: u64 = holds
                .iter()
                .filter(|((product_id, _), _)| product_id == id)
                .map(|(_, q)| u64::from(*q))
                .sum();
            prop_assert_eq!(product.reserved, recorded, "{} reserved = its holds", id);
            let sold: u64 = self
                .reservations
                .iter()
                .filter(|r| r.status == Some(stock::ReservationStatus::Sold))
                .flat_map(|r| r.lines.iter())
                .filter(|l| l.product_id == *id)
                .map(|l| u64::from(l.quantity))
                .sum();
            prop_assert_eq!(product.sold, sold, "{} sold = its sold reservations", id);
        }
        for (order, reservation) in self.reservations.iter().enumerate() {
            if reservation.status == Some(stock::ReservationStatus::Sold) {
                prop_assert!(
                    self.orders[order].payment_id.is_some(),
                    "o-{} sold stock without a recorded payment",
                    order
                );
            }
        }
        for ((id, order_id), held) in holds {
            let order: usize = order_id[2..].parse().expect("order index");
            let reservation = &self.reservations[order];
            prop_assert!(
                reservation.holds_stock(),
                "{} holds {} of {} without a reservation",
                order_id,
                held,
                id
            );
            let line = reservation.lines.iter().find(|l| l.product_id == id);
            prop_assert_eq!(line.map(|l| l.quantity), Some(held));
        }
        for (order, events) in self.order_events.iter().enumerate() {
            let paid = events
                .iter()
                .any(|e| matches!(e, OrderEvent::PaymentCompleted { .. }));
            let cancelled = events
                .iter()
                .any(|e| matches!(e, OrderEvent::OrderCancelled { .. }));
            prop_assert!(!(paid && cancelled), "o-{} both paid and cancelled", order);
            let completed = events
                .iter()
                .any(|e| matches!(e, OrderEvent::OrderCompleted { .. }));
            prop_assert!(
                !completed || paid,
                "o-{} completed without a payment",
                order
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn stock_and_order_invariants_hold_for_any_delivery_order(steps in prop::collection::vec(step(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(async {
            let mut world = World::new().await;
            for step in &steps {
                world.run(step).await;
                world.check().await?;
            }
            // Eventually every order.cancelled reaches the stock side — once:
            // a handler that already processed it skips a redelivery.
            for order in 0..ORDERS {
                if !world.release_delivered[order] {
                    world.run(&Step::Release { order }).await;
                }
            }
            world.check().await?;
            let holds = world.ledger.holds.all();
            for order in 0..ORDERS {
                if world.orders[order].status == Some(OrderStatus::OrderCancelled) {
                    let id = World::order_id(order);
                    prop_assert!(
                        holds.iter().all(|((_, holder), _)| *holder != id),
                        "cancelled {} still holds stock",
                        id
                    );
                }
            }
            Ok(())
        })?;
    }
}
