//! The read models of order-saga — order status, products, saga statistics
//! — and how each stored event changes them.
//!
//! This crate is pure: [`project`] turns one stored event into the
//! [`ReadOp`]s that bring the read models up to date, and the types here are
//! what readers (the GraphQL schema, the REST API) see. Where the rows live
//! and how the ops are applied — in one transaction with the projection's
//! checkpoint — is the service's business (`src/projections.rs`).

use chrono::{DateTime, Utc};
use order_saga_domain::{
    CancelReason, Money, OrderEvent, OrderLine, OrderStatus, ProductEvent, StockReservationEvent,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// One entry of the global log: a stored event with its metadata and its
/// global position. The one type for a log entry in the workspace: the
/// store reads it, the projections apply it, GraphQL and the analysts'
/// tools show it (as JSON: camelCase, the time in RFC 3339 with
/// microseconds).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    pub position: i64,
    pub event_id: Uuid,
    #[serde(serialize_with = "rfc3339_micros")]
    pub recorded_at: DateTime<Utc>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: Value,
}

impl LogEntry {
    /// When the event was stored, as milliseconds since the epoch.
    pub fn recorded_at_ms(&self) -> i64 {
        self.recorded_at.timestamp_millis()
    }

    /// When the event was stored, in RFC 3339 with microseconds.
    pub fn recorded_at_text(&self) -> String {
        self.recorded_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    }
}

fn rfc3339_micros<S: serde::Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

/// Which timestamp of an order a status change sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderTime {
    Confirmed,
    PaymentWait,
    Paid,
    Completed,
    Cancelled,
}

/// The saga's stages, timed from the order's timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Order created → stock reply (reserved or failed).
    Reservation,
    /// Stock reserved → order confirmed.
    Confirmation,
    /// Order confirmed → payment wait opened.
    PaymentWait,
    /// Order created → PAYMENT_WAIT or ORDER_CANCELLED.
    Saga,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::Reservation,
        Stage::Confirmation,
        Stage::PaymentWait,
        Stage::Saga,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Reservation => "RESERVATION",
            Stage::Confirmation => "CONFIRMATION",
            Stage::PaymentWait => "PAYMENT_WAIT",
            Stage::Saga => "SAGA",
        }
    }
}

/// Where a stage is timed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StageStart {
    Created,
    StockReplied,
    Confirmed,
}

/// One change to the read models.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadOp {
    /// A new order row.
    InsertOrder {
        order_id: String,
        position: i64,
        user_id: String,
        store_id: String,
        items: Vec<OrderLine>,
        total_amount: Money,
        at_ms: i64,
        version: i64,
    },
    /// The order's status moved on.
    SetStatus {
        order_id: String,
        status: OrderStatus,
        time: OrderTime,
        cancel_reason: Option<CancelReason>,
        at_ms: i64,
        version: i64,
    },
    /// An Order event that changes no status (a rejected payment): the
    /// row's version moves on all the same, so a reader waiting for the
    /// order's latest version finds it.
    OrderVersion { order_id: String, version: i64 },
    /// The stock side answered (reserved or failed).
    StockReplied { order_id: String, at_ms: i64 },
    /// One line of the order's history.
    History {
        order_id: String,
        position: i64,
        aggregate_type: String,
        sequence: i64,
        event_type: String,
        at_ms: i64,
        payload: Value,
    },
    /// A product's price (creating the row if new).
    ProductPrice { product_id: String, price: Money },
    /// A product's available stock, and how its reserved and sold stock
    /// moved.
    ProductStock {
        product_id: String,
        available: u32,
        reserved_delta: i64,
        sold_delta: i64,
    },
    /// A counter of the saga statistics.
    Count { metric: String },
    /// A stage finished at `at_ms`, timed from the order's `from` time.
    StageDone {
        order_id: String,
        stage: Stage,
        from: StageStart,
        at_ms: i64,
    },
}

/// Counter names of the saga statistics.
pub const ORDERS_CREATED: &str = "orders.created";
pub const OUTCOME_PAYMENT_WAIT: &str = "outcome.PAYMENT_WAIT";
pub const OUTCOME_CANCELLED: &str = "outcome.ORDER_CANCELLED";
pub const RESERVATIONS_FAILED: &str = "reservations.failed";
pub const RESERVATIONS_OK: &str = "reservations.ok";
/// Payments the orders took, and orders completed after theirs.
pub const PAYMENTS_COMPLETED: &str = "payments.completed";
pub const ORDERS_COMPLETED: &str = "outcome.ORDER_COMPLETED";
/// Payments the orders did not take (refunded by the payment side).
pub const PAYMENTS_REJECTED: &str = "payments.rejected";

pub fn cancel_reason_metric(reason: CancelReason) -> String {
    format!("cancel_reason.{}", reason.as_str())
}

pub fn stage_metric(stage: Stage) -> String {
    format!("stage.{}", stage.as_str())
}

/// A stored event the projections cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProjectionError(pub String);

/// The read-model changes one stored event makes.
pub fn project(event: &LogEntry) -> Result<Vec<ReadOp>, ProjectionError> {
    let bad = |e: serde_json::Error| {
        ProjectionError(format!(
            "{} event at position {}: {e}",
            event.aggregate_type, event.position
        ))
    };
    let order_id = event.aggregate_id.clone();
    let at_ms = event.recorded_at_ms();
    let mut ops = Vec::new();
    match event.aggregate_type.as_str() {
        "Order" => {
            ops.push(history(event));
            match OrderEvent::deserialize(&event.payload).map_err(bad)? {
                OrderEvent::OrderCreated {
                    user_id,
                    store_id,
                    items,
                    total_amount,
                } => {
                    ops.insert(
                        0,
                        ReadOp::InsertOrder {
                            order_id,
                            position: event.position,
                            user_id,
                            store_id,
                            items,
                            total_amount,
                            at_ms,
                            version: event.sequence,
                        },
                    );
                    ops.push(ReadOp::Count {
                        metric: ORDERS_CREATED.into(),
                    });
                }
                OrderEvent::OrderConfirmed { .. } => {
                    ops.push(status(
                        event,
                        OrderStatus::OrderConfirmed,
                        OrderTime::Confirmed,
                        None,
                    ));
                    ops.push(ReadOp::StageDone {
                        order_id,
                        stage: Stage::Confirmation,
                        from: StageStart::StockReplied,
                        at_ms,
                    });
                }
                OrderEvent::PaymentWaitStarted { .. } => {
                    ops.push(status(
                        event,
                        OrderStatus::PaymentWait,
                        OrderTime::PaymentWait,
                        None,
                    ));
                    ops.push(ReadOp::Count {
                        metric: OUTCOME_PAYMENT_WAIT.into(),
                    });
                    for (stage, from) in [
                        (Stage::PaymentWait, StageStart::Confirmed),
                        (Stage::Saga, StageStart::Created),
                    ] {
                        ops.push(ReadOp::StageDone {
                            order_id: order_id.clone(),
                            stage,
                            from,
                            at_ms,
                        });
                    }
                }
                OrderEvent::OrderCancelled { reason, .. } => {
                    ops.push(status(
                        event,
                        OrderStatus::OrderCancelled,
                        OrderTime::Cancelled,
                        Some(reason),
                    ));
                    ops.push(ReadOp::Count {
                        metric: cancel_reason_metric(reason),
                    });
                    // A payment that failed or never came ends the payment
                    // wait: the creation saga ended when it opened.
                    if !reason.ends_payment_wait() {
                        ops.push(ReadOp::Count {
                            metric: OUTCOME_CANCELLED.into(),
                        });
                        ops.push(ReadOp::StageDone {
                            order_id,
                            stage: Stage::Saga,
                            from: StageStart::Created,
                            at_ms,
                        });
                    }
                }
                OrderEvent::PaymentCompleted { .. } => {
                    ops.push(status(
                        event,
                        OrderStatus::PaymentCompleted,
                        OrderTime::Paid,
                        None,
                    ));
                    ops.push(ReadOp::Count {
                        metric: PAYMENTS_COMPLETED.into(),
                    });
                }
                OrderEvent::OrderCompleted { .. } => {
                    ops.push(status(
                        event,
                        OrderStatus::OrderCompleted,
                        OrderTime::Completed,
                        None,
                    ));
                    ops.push(ReadOp::Count {
                        metric: ORDERS_COMPLETED.into(),
                    });
                }
                OrderEvent::PaymentRejected { .. } => {
                    ops.push(ReadOp::OrderVersion {
                        order_id,
                        version: event.sequence,
                    });
                    ops.push(ReadOp::Count {
                        metric: PAYMENTS_REJECTED.into(),
                    });
                }
                OrderEvent::PaymentWaitExpired { .. } => ops.push(ReadOp::OrderVersion {
                    order_id,
                    version: event.sequence,
                }),
            }
        }
        // Payment results entered through the in-process bus: part of the
        // order's history.
        "Payment" => ops.push(history(event)),
        "StockReservation" => {
            ops.push(history(event));
            match StockReservationEvent::deserialize(&event.payload).map_err(bad)? {
                StockReservationEvent::StockReserved { .. } => {
                    ops.push(ReadOp::Count {
                        metric: RESERVATIONS_OK.into(),
                    });
                    ops.extend(stock_replied(&order_id, at_ms));
                }
                StockReservationEvent::StockReservationFailed { .. } => {
                    ops.push(ReadOp::Count {
                        metric: RESERVATIONS_FAILED.into(),
                    });
                    ops.extend(stock_replied(&order_id, at_ms));
                }
                StockReservationEvent::StockReleased { .. }
                | StockReservationEvent::ReservationVoided { .. }
                | StockReservationEvent::StockConfirmed { .. } => {}
            }
        }
        "Product" => {
            let product_id = event.aggregate_id.clone();
            ops.push(
                match ProductEvent::deserialize(&event.payload).map_err(bad)? {
                    ProductEvent::PriceSet { price } => ReadOp::ProductPrice { product_id, price },
                    ProductEvent::StockLevelSet { available, .. } => ReadOp::ProductStock {
                        product_id,
                        available,
                        reserved_delta: 0,
                        sold_delta: 0,
                    },
                    ProductEvent::StockHeld {
                        quantity,
                        available_after,
                        ..
                    } => ReadOp::ProductStock {
                        product_id,
                        available: available_after,
                        reserved_delta: i64::from(quantity),
                        sold_delta: 0,
                    },
                    ProductEvent::StockReturned {
                        quantity,
                        available_after,
                        ..
                    } => ReadOp::ProductStock {
                        product_id,
                        available: available_after,
                        reserved_delta: -i64::from(quantity),
                        sold_delta: 0,
                    },
                    ProductEvent::StockSold {
                        quantity,
                        available_after,
                        ..
                    } => ReadOp::ProductStock {
                        product_id,
                        available: available_after,
                        reserved_delta: -i64::from(quantity),
                        sold_delta: i64::from(quantity),
                    },
                },
            );
        }
        _ => {}
    }
    Ok(ops)
}

fn history(event: &LogEntry) -> ReadOp {
    ReadOp::History {
        order_id: event.aggregate_id.clone(),
        position: event.position,
        aggregate_type: event.aggregate_type.clone(),
        sequence: event.sequence,
        event_type: event.event_type.clone(),
        at_ms: event.recorded_at_ms(),
        payload: event.payload.clone(),
    }
}

fn status(
    event: &LogEntry,
    status: OrderStatus,
    time: OrderTime,
    cancel_reason: Option<CancelReason>,
) -> ReadOp {
    ReadOp::SetStatus {
        order_id: event.aggregate_id.clone(),
        status,
        time,
        cancel_reason,
        at_ms: event.recorded_at_ms(),
        version: event.sequence,
    }
}

fn stock_replied(order_id: &str, at_ms: i64) -> [ReadOp; 2] {
    [
        ReadOp::StockReplied {
            order_id: order_id.to_string(),
            at_ms,
        },
        ReadOp::StageDone {
            order_id: order_id.to_string(),
            stage: Stage::Reservation,
            from: StageStart::Created,
            at_ms,
        },
    ]
}

/// An order as its read model (`order_views`) holds it; the write side's
/// `service::OrderView` is built from the aggregate instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderStatusView {
    pub order_id: String,
    pub created_position: i64,
    pub user_id: String,
    pub store_id: String,
    pub status: OrderStatus,
    pub items: Vec<OrderLine>,
    pub total_amount: Money,
    pub cancel_reason: Option<CancelReason>,
    pub created_at_ms: i64,
    pub stock_replied_at_ms: Option<i64>,
    pub confirmed_at_ms: Option<i64>,
    pub payment_wait_at_ms: Option<i64>,
    pub paid_at_ms: Option<i64>,
    pub completed_at_ms: Option<i64>,
    pub cancelled_at_ms: Option<i64>,
    /// The last Order event applied (its aggregate sequence).
    pub version: i64,
}

/// One line of an order's history (its Order and StockReservation events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryRecord {
    pub position: i64,
    pub aggregate_type: String,
    pub sequence: i64,
    pub event_type: String,
    pub recorded_at_ms: i64,
    pub payload: Value,
}

impl HistoryRecord {
    /// The status change this history row of `order_id` made, if any: the
    /// row projected again ([`project`] reads neither the event id, its
    /// version nor its metadata, which the history does not keep).
    pub fn status_change(&self, order_id: &str) -> Option<StatusChange> {
        let entry = LogEntry {
            position: self.position,
            event_id: Uuid::nil(),
            recorded_at: DateTime::from_timestamp_millis(self.recorded_at_ms)?,
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: order_id.to_string(),
            sequence: self.sequence,
            event_type: self.event_type.clone(),
            event_version: String::new(),
            payload: self.payload.clone(),
            metadata: Value::Null,
        };
        project(&entry).ok()?.iter().find_map(ReadOp::status_change)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductRecord {
    pub product_id: String,
    pub price: Option<Money>,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
}

/// One counter or timing of the saga statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatRecord {
    pub metric: String,
    pub count: i64,
    pub total_ms: i64,
    pub max_ms: i64,
}

/// A message a consumer gave up on, as stored for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterRecord {
    pub id: i64,
    /// The consumer group that gave up on it.
    pub consumer: String,
    pub topic: String,
    pub event_id: Option<String>,
    /// Why it was given up on (the last redrive's error, after one failed).
    pub error: String,
    /// The message: the integration event as JSON, or the bytes as text
    /// when they did not decode.
    pub payload: String,
    /// PENDING, REDRIVEN or DISCARDED.
    pub status: String,
    /// Redrives that failed.
    pub redrives: i64,
    pub recorded_at_ms: Option<i64>,
    pub settled_at_ms: Option<i64>,
}

/// An order whose saga has not ended in time: created or confirmed past
/// the threshold, or waiting for its payment past the payment timeout and
/// the threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StuckSagaRecord {
    pub order_id: String,
    pub status: String,
    pub created_at_ms: i64,
    /// The order's last recorded event (its own or its stock reservation's).
    pub last_step: Option<String>,
    pub last_step_at_ms: Option<i64>,
}

/// Filters of an order listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderFilter {
    pub status: Option<OrderStatus>,
    pub user_id: Option<String>,
    pub store_id: Option<String>,
}

/// A status an order reached, as subscriptions report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusChange {
    pub order_id: String,
    pub status: OrderStatus,
    pub cancel_reason: Option<CancelReason>,
    pub version: i64,
    pub at_ms: i64,
}

impl ReadOp {
    /// The status change this op reports, if it is one.
    pub fn status_change(&self) -> Option<StatusChange> {
        match self {
            ReadOp::InsertOrder {
                order_id,
                at_ms,
                version,
                ..
            } => Some(StatusChange {
                order_id: order_id.clone(),
                status: OrderStatus::OrderCreated,
                cancel_reason: None,
                version: *version,
                at_ms: *at_ms,
            }),
            ReadOp::SetStatus {
                order_id,
                status,
                cancel_reason,
                at_ms,
                version,
                ..
            } => Some(StatusChange {
                order_id: order_id.clone(),
                status: *status,
                cancel_reason: *cancel_reason,
                version: *version,
                at_ms: *at_ms,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(aggregate_type: &str, sequence: i64, payload: Value) -> LogEntry {
        LogEntry {
            position: 7,
            event_id: Uuid::nil(),
            recorded_at: DateTime::from_timestamp_millis(1_000).unwrap_or_default(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: "o-1".into(),
            sequence,
            event_type: "x".into(),
            event_version: "1".into(),
            payload,
            metadata: Value::Null,
        }
    }

    #[test]
    fn a_cancellation_sets_status_counts_the_reason_and_times_the_saga() {
        let payload = json!({"orderCancelled": {"userId": "u", "reason": "STOCK_SHORTAGE", "items": [], "causationId": null}});
        let ops = project(&stored("Order", 2, payload)).expect("projects");
        assert!(ops.iter().any(|op| matches!(
            op,
            ReadOp::SetStatus {
                status: OrderStatus::OrderCancelled,
                cancel_reason: Some(CancelReason::StockShortage),
                version: 2,
                ..
            }
        )));
        assert!(ops.contains(&ReadOp::Count {
            metric: "cancel_reason.STOCK_SHORTAGE".into()
        }));
        assert!(ops.iter().any(|op| matches!(
            op,
            ReadOp::StageDone {
                stage: Stage::Saga,
                ..
            }
        )));
        assert!(ops.iter().any(|op| matches!(op, ReadOp::History { .. })));
    }

    #[test]
    fn a_stock_hold_moves_available_to_reserved() {
        let payload = json!({"stockHeld": {"orderId": "o-1", "quantity": 3, "availableAfter": 7}});
        let ops = project(&stored("Product", 4, payload)).expect("projects");
        assert_eq!(
            ops,
            vec![ReadOp::ProductStock {
                product_id: "o-1".into(),
                available: 7,
                reserved_delta: 3,
                sold_delta: 0,
            }]
        );
    }

    #[test]
    fn a_sale_moves_reserved_to_sold() {
        let payload = json!({"stockSold": {"orderId": "o-1", "quantity": 3, "availableAfter": 7}});
        let ops = project(&stored("Product", 5, payload)).expect("projects");
        assert_eq!(
            ops,
            vec![ReadOp::ProductStock {
                product_id: "o-1".into(),
                available: 7,
                reserved_delta: -3,
                sold_delta: 3,
            }]
        );
    }

    #[test]
    fn a_payment_cancellation_ends_no_creation_saga() {
        let payload = json!({"orderCancelled": {"userId": "u-1", "reason": "PAYMENT_TIMEOUT", "items": [], "causationId": null}});
        let ops = project(&stored("Order", 5, payload)).expect("projects");
        assert!(ops.iter().any(
            |op| matches!(op, ReadOp::Count { metric } if metric == "cancel_reason.PAYMENT_TIMEOUT")
        ));
        assert!(!ops
            .iter()
            .any(|op| matches!(op, ReadOp::Count { metric } if metric == OUTCOME_CANCELLED)));
        assert!(!ops.iter().any(|op| matches!(op, ReadOp::StageDone { .. })));
    }

    #[test]
    fn a_garbled_event_is_an_error_naming_its_position() {
        let err = project(&stored("Order", 1, json!({"nope": 1}))).unwrap_err();
        assert!(err.0.contains("position 7"), "{}", err.0);
    }
}
