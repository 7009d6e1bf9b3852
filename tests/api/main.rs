//! Integration tests, one binary (compiled once) with a module per area.
//! Every test runs on both backends — the embedded SQLite store in a fresh
//! directory and PostgreSQL in a fresh schema — against the real
//! application (started on port 0) or the real binary.
//!
//! PostgreSQL is found at `TEST_DATABASE_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/test`.

mod analytics;
mod auth;
mod bench;
mod binary;
mod contract;
mod dead_letters;
mod e2e;
mod faults;
mod helpers;
mod instances;
mod kafka;
mod ops;
mod orders;
mod payment;
mod read_side;
mod saga;
mod stock;
mod store;
mod traces;
mod webhooks;
