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
//! - [`saga`]: the Order Creation SAGA — consumers, timers, notifications —
//!   fed from the global log through a transport seam;
//! - [`read_models`]: the read models, kept up to date from the global log;
//! - [`leadership`]: which single-instance roles (relay, in-process
//!   consumers, projection) this process holds, elected through PostgreSQL;
//! - [`http`]: the REST API (axum);
//! - [`analytics`]: the analysts' history, time-travel and replay tools;
//! - [`fault`]: which failures are infrastructure faults, waited out;
//! - [`cli`]: the command line and its settings (clap).

pub mod analytics;
pub mod auth;
pub mod cli;
pub mod fault;
pub mod graphql_backend;
pub mod health;
pub mod http;
pub mod leadership;
pub mod read_models;
pub mod saga;
pub mod service;
pub mod store;
pub mod telemetry;
