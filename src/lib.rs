//! order-saga: an event-sourced order service running the Order Creation
//! SAGA.
//!
//! This crate wires the pure domain (`order-saga-domain`) to the outside
//! world:
//! - [`store`]: the event store (PostgreSQL or embedded SQLite) and its
//!   global log;
//! - [`service`]: the application's use cases — create and read orders, set
//!   and show products — and the adapters the aggregates' services need
//!   (catalog, stock ledger);
//! - [`http`]: the REST API (axum);
//! - [`cli`]: the command line and its settings (clap).

pub mod cli;
pub mod http;
pub mod service;
pub mod store;
