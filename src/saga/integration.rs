//! Integration events: what the services tell each other (SPEC §4), built
//! from stored domain events. Each keeps the stored event's id as its
//! `eventId`, so a re-delivery of the same stored event is recognisably the
//! same message; the key is always the `orderId`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use order_saga_domain::{
    CancelReason, Money, OrderEvent, OrderLine, ReservedLine, Shortage, StockItem,
    StockReservationEvent,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::store::LogEntry;

/// Metadata keys on stored events.
pub const CORRELATION_ID: &str = "correlation_id";
pub const CAUSATION_ID: &str = "causation_id";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Topic {
    #[serde(rename = "order.created")]
    OrderCreated,
    #[serde(rename = "order.confirmed")]
    OrderConfirmed,
    #[serde(rename = "order.cancelled")]
    OrderCancelled,
    #[serde(rename = "order.payment.waiting")]
    PaymentWaitStarted,
    #[serde(rename = "stock.reserved")]
    StockReserved,
    #[serde(rename = "stock.reservation.failed")]
    StockReservationFailed,
    #[serde(rename = "stock.released")]
    StockReleased,
}

impl Topic {
    pub const ALL: [Topic; 7] = [
        Topic::OrderCreated,
        Topic::OrderConfirmed,
        Topic::OrderCancelled,
        Topic::PaymentWaitStarted,
        Topic::StockReserved,
        Topic::StockReservationFailed,
        Topic::StockReleased,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Topic::OrderCreated => "order.created",
            Topic::OrderConfirmed => "order.confirmed",
            Topic::OrderCancelled => "order.cancelled",
            Topic::PaymentWaitStarted => "order.payment.waiting",
            Topic::StockReserved => "stock.reserved",
            Topic::StockReservationFailed => "stock.reservation.failed",
            Topic::StockReleased => "stock.released",
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Topic {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Topic::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown topic '{s}'"))
    }
}

/// The body of an integration event, by topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Body {
    #[serde(rename_all = "camelCase")]
    OrderCreated {
        user_id: String,
        store_id: String,
        items: Vec<OrderLine>,
        total_amount: Money,
    },
    #[serde(rename_all = "camelCase")]
    OrderConfirmed {
        user_id: String,
        total_amount: Money,
    },
    #[serde(rename_all = "camelCase")]
    OrderCancelled {
        user_id: String,
        items: Vec<StockItem>,
        reason: CancelReason,
    },
    #[serde(rename_all = "camelCase")]
    PaymentWaitStarted {
        user_id: String,
        total_amount: Money,
    },
    #[serde(rename_all = "camelCase")]
    StockReserved { reserved_items: Vec<ReservedLine> },
    #[serde(rename_all = "camelCase")]
    StockReservationFailed {
        failed_items: Vec<Shortage>,
        failure_reason: String,
    },
    #[serde(rename_all = "camelCase")]
    StockReleased { released_items: Vec<StockItem> },
}

impl Body {
    pub fn topic(&self) -> Topic {
        match self {
            Body::OrderCreated { .. } => Topic::OrderCreated,
            Body::OrderConfirmed { .. } => Topic::OrderConfirmed,
            Body::OrderCancelled { .. } => Topic::OrderCancelled,
            Body::PaymentWaitStarted { .. } => Topic::PaymentWaitStarted,
            Body::StockReserved { .. } => Topic::StockReserved,
            Body::StockReservationFailed { .. } => Topic::StockReservationFailed,
            Body::StockReleased { .. } => Topic::StockReleased,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationEvent {
    pub event_id: Uuid,
    pub order_id: String,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub body: Body,
}

/// The aggregate types whose events publish integration events (see
/// [`IntegrationEvent::from_log`]); appends of others (products) are
/// nothing for a reader of the topics.
pub const SOURCES: &[&str] = &["Order", "StockReservation"];

impl IntegrationEvent {
    pub fn topic(&self) -> Topic {
        self.body.topic()
    }

    /// The integration event a stored event publishes, if any (product
    /// events and voided reservations stay inside their service).
    pub fn from_log(entry: &LogEntry) -> Result<Option<Self>, String> {
        let body = match entry.aggregate_type.as_str() {
            "Order" => match OrderEvent::deserialize(&entry.payload)
                .map_err(|e| format!("Order event at {}: {e}", entry.position))?
            {
                OrderEvent::OrderCreated {
                    user_id,
                    store_id,
                    items,
                    total_amount,
                } => Body::OrderCreated {
                    user_id,
                    store_id,
                    items,
                    total_amount,
                },
                OrderEvent::OrderConfirmed {
                    user_id,
                    total_amount,
                    ..
                } => Body::OrderConfirmed {
                    user_id,
                    total_amount,
                },
                OrderEvent::PaymentWaitStarted {
                    user_id,
                    total_amount,
                    ..
                } => Body::PaymentWaitStarted {
                    user_id,
                    total_amount,
                },
                OrderEvent::OrderCancelled {
                    user_id,
                    reason,
                    items,
                    ..
                } => Body::OrderCancelled {
                    user_id,
                    items,
                    reason,
                },
            },
            "StockReservation" => {
                match StockReservationEvent::deserialize(&entry.payload)
                    .map_err(|e| format!("StockReservation event at {}: {e}", entry.position))?
                {
                    StockReservationEvent::StockReserved { lines, .. } => Body::StockReserved {
                        reserved_items: lines,
                    },
                    StockReservationEvent::StockReservationFailed { shortages, .. } => {
                        Body::StockReservationFailed {
                            failure_reason: failure_reason(&shortages),
                            failed_items: shortages,
                        }
                    }
                    StockReservationEvent::StockReleased { items, .. } => Body::StockReleased {
                        released_items: items,
                    },
                    StockReservationEvent::ReservationVoided { .. } => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        let meta = |key: &str| {
            entry
                .metadata
                .get(key)
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        Ok(Some(IntegrationEvent {
            event_id: entry.event_id,
            order_id: entry.aggregate_id.clone(),
            occurred_at: entry.recorded_at,
            correlation_id: meta(CORRELATION_ID),
            causation_id: meta(CAUSATION_ID),
            body,
        }))
    }
}

fn failure_reason(shortages: &[Shortage]) -> String {
    let parts: Vec<String> = shortages
        .iter()
        .map(|s| {
            format!(
                "{}: requested {}, available {}",
                s.product_id, s.requested, s.available
            )
        })
        .collect();
    format!("insufficient stock ({})", parts.join("; "))
}
