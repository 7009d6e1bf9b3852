//! The pure domain of order-saga: the Order, Product and StockReservation
//! aggregates, their commands, events and refusals, and the value types they
//! share (ids, money).
//!
//! Nothing here does IO. Whatever an aggregate needs from the outside world —
//! the catalog's prices, the stock ledger, a product's hold records — reaches it through the
//! aggregate's `Services`, defined here as traits and implemented by the
//! adapters in the `order-saga` crate. The tests next to each aggregate are
//! cqrs-es `TestFramework` given/when/then tests; `tests/invariants.rs`
//! drives random command sequences through all three aggregates.

/// Implements cqrs-es's `DomainEvent` for an event enum: each variant's
/// name is its event type (`OrderCreated`), and every event is at version
/// 1.0. The variants are listed so that a new one fails to compile until it
/// is named here.
macro_rules! domain_event {
    ($event:ident { $($variant:ident),+ $(,)? }) => {
        impl cqrs_es::DomainEvent for $event {
            fn event_type(&self) -> String {
                match self {
                    $($event::$variant { .. } => stringify!($variant),)+
                }
                .to_string()
            }

            fn event_version(&self) -> String {
                "1.0".to_string()
            }
        }
    };
}

pub mod money;
pub mod order;
pub mod product;
pub mod stock;
pub mod values;

pub use money::{Money, MoneyError};
pub use order::{
    CancelReason, Catalog, CatalogError, ItemRequest, Order, OrderCommand, OrderError, OrderEvent,
    OrderLine, OrderServices, OrderStatus, PaymentMethod, PaymentRejection,
};
pub use product::{
    HoldRecords, MemoryHolds, Product, ProductCommand, ProductError, ProductEvent, ProductServices,
    RecordsError,
};
pub use stock::{
    LedgerError, ProductLedger, ProductStock, ReservedLine, Shortage, StockLedger,
    StockReservation, StockReservationCommand, StockReservationError, StockReservationEvent,
    StockServices,
};
pub use values::{validate_id, FieldError, StockItem};
