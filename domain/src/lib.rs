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

pub mod money;
pub mod order;
pub mod product;
pub mod stock;
pub mod values;

pub use money::{Money, MoneyError};
pub use order::{
    CancelReason, Catalog, CatalogError, ItemRequest, Order, OrderCommand, OrderError, OrderEvent,
    OrderLine, OrderServices, OrderStatus,
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
