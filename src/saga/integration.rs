//! Integration events: what the services tell each other (SPEC §4), built
//! from stored domain events. Each keeps the stored event's id as its
//! `eventId`, so a re-delivery of the same stored event is recognisably the
//! same message; the key is always the `orderId`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use order_saga_domain::{
    CancelReason, Money, OrderEvent, OrderLine, PaymentMethod, ReservedLine, Shortage, StockItem,
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
    #[serde(rename = "payment.completed")]
    PaymentCompleted,
    #[serde(rename = "payment.failed")]
    PaymentFailed,
    #[serde(rename = "order.payment.completed")]
    OrderPaid,
    #[serde(rename = "stock.confirmed")]
    StockConfirmed,
    #[serde(rename = "stock.confirmation.failed")]
    StockConfirmationFailed,
    #[serde(rename = "order.expiration-notification")]
    OrderExpired,
    #[serde(rename = "order.completed")]
    OrderCompleted,
}

impl Topic {
    pub const ALL: [Topic; 14] = [
        Topic::OrderCreated,
        Topic::OrderConfirmed,
        Topic::OrderCancelled,
        Topic::PaymentWaitStarted,
        Topic::StockReserved,
        Topic::StockReservationFailed,
        Topic::StockReleased,
        Topic::PaymentCompleted,
        Topic::PaymentFailed,
        Topic::OrderPaid,
        Topic::StockConfirmed,
        Topic::StockConfirmationFailed,
        Topic::OrderExpired,
        Topic::OrderCompleted,
    ];

    /// Published by the payment service, not by us: the relay never
    /// publishes them (in-process, `payment simulate` puts them in the log).
    pub fn is_inbound(self) -> bool {
        matches!(self, Topic::PaymentCompleted | Topic::PaymentFailed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Topic::OrderCreated => "order.created",
            Topic::OrderConfirmed => "order.confirmed",
            Topic::OrderCancelled => "order.cancelled",
            Topic::PaymentWaitStarted => "order.payment.waiting",
            Topic::StockReserved => "stock.reserved",
            Topic::StockReservationFailed => "stock.reservation.failed",
            Topic::StockReleased => "stock.released",
            Topic::PaymentCompleted => "payment.completed",
            Topic::PaymentFailed => "payment.failed",
            Topic::OrderPaid => "order.payment.completed",
            Topic::StockConfirmed => "stock.confirmed",
            Topic::StockConfirmationFailed => "stock.confirmation.failed",
            Topic::OrderExpired => "order.expiration-notification",
            Topic::OrderCompleted => "order.completed",
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
    /// From the payment service.
    #[serde(rename_all = "camelCase")]
    PaymentCompleted {
        payment_id: String,
        user_id: String,
        total_amount: Money,
        payment_method: PaymentMethod,
        pg_approval_number: String,
        completed_at: DateTime<Utc>,
    },
    /// From the payment service.
    #[serde(rename_all = "camelCase")]
    PaymentFailed {
        payment_id: String,
        user_id: String,
        failure_reason: String,
        failed_at: DateTime<Utc>,
    },
    /// The order took the payment: the stock side sells what it holds.
    #[serde(rename_all = "camelCase")]
    OrderPaid {
        user_id: String,
        payment_id: String,
        total_amount: Money,
        payment_method: PaymentMethod,
        items: Vec<StockItem>,
    },
    #[serde(rename_all = "camelCase")]
    StockConfirmed {
        payment_id: String,
        confirmed_items: Vec<StockItem>,
    },
    /// A payment the order did not take: the payment side refunds it.
    #[serde(rename_all = "camelCase")]
    StockConfirmationFailed {
        payment_id: String,
        failure_reason: String,
    },
    #[serde(rename_all = "camelCase")]
    OrderExpired {
        user_id: String,
        expiration_reason: String,
    },
    #[serde(rename_all = "camelCase")]
    OrderCompleted {
        user_id: String,
        payment_id: String,
        total_amount: Money,
    },
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
            Body::PaymentCompleted { .. } => Topic::PaymentCompleted,
            Body::PaymentFailed { .. } => Topic::PaymentFailed,
            Body::OrderPaid { .. } => Topic::OrderPaid,
            Body::StockConfirmed { .. } => Topic::StockConfirmed,
            Body::StockConfirmationFailed { .. } => Topic::StockConfirmationFailed,
            Body::OrderExpired { .. } => Topic::OrderExpired,
            Body::OrderCompleted { .. } => Topic::OrderCompleted,
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
    /// The W3C trace context of the span that appended it, if traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub body: Body,
}

/// The aggregate types whose events publish integration events (see
/// [`IntegrationEvent::from_log`]); appends of others (products) are
/// nothing for a reader of the topics. `Payment` holds the payment results
/// that entered through the in-process bus.
pub const SOURCES: &[&str] = &["Order", "StockReservation", PAYMENT_INBOX];

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
                OrderEvent::PaymentCompleted {
                    user_id,
                    payment_id,
                    total_amount,
                    method,
                    items,
                    ..
                } => Body::OrderPaid {
                    user_id,
                    payment_id,
                    total_amount,
                    payment_method: method,
                    items,
                },
                OrderEvent::PaymentRejected {
                    payment_id, reason, ..
                } => Body::StockConfirmationFailed {
                    payment_id,
                    failure_reason: reason,
                },
                OrderEvent::PaymentWaitExpired {
                    user_id,
                    expiration_reason,
                    ..
                } => Body::OrderExpired {
                    user_id,
                    expiration_reason,
                },
                OrderEvent::OrderCompleted {
                    user_id,
                    payment_id,
                    total_amount,
                    ..
                } => Body::OrderCompleted {
                    user_id,
                    payment_id,
                    total_amount,
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
                    StockReservationEvent::StockConfirmed {
                        payment_id, items, ..
                    } => Body::StockConfirmed {
                        payment_id,
                        confirmed_items: items,
                    },
                    StockReservationEvent::ReservationVoided { .. } => return Ok(None),
                }
            }
            PAYMENT_INBOX => Body::deserialize(&entry.payload)
                .map_err(|e| format!("payment result at {}: {e}", entry.position))?,
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
            traceparent: meta(crate::telemetry::TRACEPARENT),
            body,
        }))
    }
}

/// The aggregate type of the payment results entered through the
/// in-process bus (`payment simulate`), one stream per order.
pub const PAYMENT_INBOX: &str = "Payment";

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
