//! The Avro contract (SPEC §4): the `.avsc` files in `schemas/avro/` (built
//! into the binary from those files), and the mapping between integration
//! events and Avro values. Messages use Avro single-object encoding
//! (`C3 01` + the schema's CRC-64-AVRO fingerprint + the datum), so a
//! consumer holding the schema files can decode them without a registry.

use std::collections::HashMap;
use std::sync::Mutex;

use apache_avro::schema::Schema;
use apache_avro::types::Value;
use apache_avro::{GenericSingleObjectReader, GenericSingleObjectWriter};
use chrono::{TimeZone, Utc};
use order_saga_domain::{
    CancelReason, Money, OrderLine, PaymentMethod, ReservedLine, Shortage, StockItem,
};
use rust_decimal::Decimal;
use uuid::Uuid;

use super::integration::{Body, IntegrationEvent, Topic};

/// Each topic's schema file, as committed.
pub const SCHEMA_FILES: [(Topic, &str); 14] = [
    (
        Topic::OrderCreated,
        include_str!("../../schemas/avro/order.created.avsc"),
    ),
    (
        Topic::OrderConfirmed,
        include_str!("../../schemas/avro/order.confirmed.avsc"),
    ),
    (
        Topic::OrderCancelled,
        include_str!("../../schemas/avro/order.cancelled.avsc"),
    ),
    (
        Topic::PaymentWaitStarted,
        include_str!("../../schemas/avro/order.payment.waiting.avsc"),
    ),
    (
        Topic::StockReserved,
        include_str!("../../schemas/avro/stock.reserved.avsc"),
    ),
    (
        Topic::StockReservationFailed,
        include_str!("../../schemas/avro/stock.reservation.failed.avsc"),
    ),
    (
        Topic::StockReleased,
        include_str!("../../schemas/avro/stock.released.avsc"),
    ),
    (
        Topic::PaymentCompleted,
        include_str!("../../schemas/avro/payment.completed.avsc"),
    ),
    (
        Topic::PaymentFailed,
        include_str!("../../schemas/avro/payment.failed.avsc"),
    ),
    (
        Topic::OrderPaid,
        include_str!("../../schemas/avro/order.payment.completed.avsc"),
    ),
    (
        Topic::StockConfirmed,
        include_str!("../../schemas/avro/stock.confirmed.avsc"),
    ),
    (
        Topic::StockConfirmationFailed,
        include_str!("../../schemas/avro/stock.confirmation.failed.avsc"),
    ),
    (
        Topic::OrderExpired,
        include_str!("../../schemas/avro/order.expiration-notification.avsc"),
    ),
    (
        Topic::OrderCompleted,
        include_str!("../../schemas/avro/order.completed.avsc"),
    ),
];

/// The payment service's own schemas of the topics we read from it: its
/// records, written without our optional fields, are read through them
/// (schema resolution fills in the defaults).
const FOREIGN_SCHEMA_FILES: [(Topic, &str); 2] = [
    (
        Topic::PaymentCompleted,
        include_str!("../../schemas/avro/contract/payment.completed.avsc"),
    ),
    (
        Topic::PaymentFailed,
        include_str!("../../schemas/avro/contract/payment.failed.avsc"),
    ),
];

/// The contract's cancellation enum, onto which our reasons map.
const CANCELLATION_REASONS: [&str; 4] = [
    "PAYMENT_TIMEOUT",
    "USER_REQUESTED",
    "STOCK_UNAVAILABLE",
    "SYSTEM_ERROR",
];

/// The schemas of our topics, each with what encoding and decoding it
/// needs made once (resolving a schema's names and computing its
/// fingerprint for every message had cost the relay and the consumers a
/// few per cent of their time).
pub struct Contract {
    codecs: HashMap<Topic, Codec>,
}

struct Codec {
    schema: Schema,
    /// The record's full name.
    record_name: String,
    /// The fingerprint as hex, bytes in header (little-endian) order.
    fingerprint: String,
    reader: GenericSingleObjectReader,
    /// For a topic another service writes: a reader of messages written
    /// with that service's schema (told apart by the fingerprint).
    foreign: Option<Foreign>,
    /// Writes the single-object header (`C3 01` + fingerprint) and the
    /// datum; it keeps a buffer, so one message at a time.
    writer: Mutex<GenericSingleObjectWriter>,
}

struct Foreign {
    header: Vec<u8>,
    reader: GenericSingleObjectReader,
}

/// The single-object header of a schema: `C3 01` + its fingerprint.
fn header_of(schema: &Schema) -> Vec<u8> {
    let mut header = vec![0xC3, 0x01];
    header.extend_from_slice(&fingerprint(schema));
    header
}

/// The Avro spec's Parsing Canonical Form of a schema. apache-avro 0.22
/// strips `logicalType` but then keeps the rest of the logical type's
/// object: `{"type":"long"}` for a timestamp, and `precision` and `scale`
/// for a decimal — where the spec's [STRIP] and [PRIMITIVE] rules leave
/// `"long"` and `"bytes"`. Its fingerprints of our schemas therefore differ
/// from what Java, Python (fastavro) and registries compute; we finish the
/// two rules on its output.
pub fn canonical_form(schema: &Schema) -> String {
    const PRIMITIVES: [&str; 8] = [
        "null", "boolean", "int", "long", "float", "double", "bytes", "string",
    ];
    let mut form = schema.canonical_form();
    for primitive in PRIMITIVES {
        form = form.replace(
            &format!(r#"{{"type":"{primitive}"}}"#),
            &format!(r#""{primitive}""#),
        );
        // What is left of a logical type on this primitive: drop its
        // remaining attributes (precision, scale).
        let open = format!(r#"{{"type":"{primitive}","#);
        while let Some(start) = form.find(&open) {
            let Some(len) = form[start..].find('}') else {
                break;
            };
            form.replace_range(start..start + len + 1, &format!(r#""{primitive}""#));
        }
    }
    form
}

/// CRC-64-AVRO (Rabin) fingerprint of the spec's canonical form, in the
/// little-endian byte order the single-object header uses.
pub fn fingerprint(schema: &Schema) -> [u8; 8] {
    use apache_avro::rabin::Rabin;
    use digest::Digest;
    let digest = Rabin::digest(canonical_form(schema).as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    bytes
}

/// Writes the spec's single-object header.
struct SpecHeader(Vec<u8>);

impl apache_avro::headers::HeaderBuilder for SpecHeader {
    fn build_header(&self) -> Vec<u8> {
        self.0.clone()
    }
}

fn contract_reason(reason: CancelReason) -> (u32, &'static str) {
    match reason {
        CancelReason::PaymentTimeout => (0, "PAYMENT_TIMEOUT"),
        CancelReason::StockShortage => (2, "STOCK_UNAVAILABLE"),
        CancelReason::CustomerRequest => (1, "USER_REQUESTED"),
        _ => (3, "SYSTEM_ERROR"),
    }
}

/// Bytes a `decimal(10,2)` is written with: enough for 10 digits. (Any
/// length is valid Avro; apache-avro's schema resolution refuses fewer bytes
/// than the precision needs, so we never write fewer.)
const DECIMAL_BYTES: usize = 5;

/// Money as the contract's `decimal(10,2)`: the unscaled amount, big-endian
/// two's complement.
fn decimal(money: Money) -> Value {
    let unscaled = money.as_decimal().mantissa();
    let bytes = unscaled.to_be_bytes();
    Value::Decimal(apache_avro::Decimal::from(
        bytes[bytes.len() - DECIMAL_BYTES..].to_vec(),
    ))
}

fn money(value: &Value) -> Result<Money, String> {
    let Value::Decimal(d) = value else {
        return Err(format!("expected a decimal, got {value:?}"));
    };
    let bytes: Vec<u8> = d.try_into().map_err(|e| format!("decimal: {e}"))?;
    if bytes.is_empty() || bytes.len() > 16 {
        return Err("decimal: bad length".into());
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0 };
    let mut full = [fill; 16];
    full[16 - bytes.len()..].copy_from_slice(&bytes);
    let unscaled = i128::from_be_bytes(full);
    let value =
        Decimal::try_from_i128_with_scale(unscaled, 2).map_err(|e| format!("decimal: {e}"))?;
    Money::new(value).map_err(|e| format!("decimal: {e}"))
}

fn string(s: impl Into<String>) -> Value {
    Value::String(s.into())
}

fn optional(s: Option<&str>) -> Value {
    match s {
        Some(s) => Value::Union(1, Box::new(string(s))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

fn int(n: u32) -> Value {
    Value::Int(i32::try_from(n).unwrap_or(i32::MAX))
}

fn method(method: PaymentMethod) -> Value {
    let index = PaymentMethod::ALL
        .iter()
        .position(|m| *m == method)
        .unwrap_or_default();
    Value::Enum(index as u32, method.as_str().to_string())
}

/// Product lines as the contract's item records.
fn stock_items(items: &[StockItem]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|i| {
                record(vec![
                    ("productId", string(&i.product_id)),
                    ("quantity", int(i.quantity)),
                ])
            })
            .collect(),
    )
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// A decoded record's fields by name.
struct Fields(HashMap<String, Value>);

impl Fields {
    fn of(value: Value) -> Result<Self, String> {
        match value {
            Value::Record(fields) => Ok(Fields(fields.into_iter().collect())),
            other => Err(format!("expected a record, got {other:?}")),
        }
    }

    fn get(&self, name: &str) -> Result<&Value, String> {
        self.0
            .get(name)
            .ok_or_else(|| format!("missing field {name}"))
    }

    fn string(&self, name: &str) -> Result<String, String> {
        match self.get(name)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(format!("{name}: expected a string, got {other:?}")),
        }
    }

    fn optional(&self, name: &str) -> Result<Option<String>, String> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Union(_, inner)) => match inner.as_ref() {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                other => Err(format!("{name}: expected a string, got {other:?}")),
            },
            Some(other) => Err(format!("{name}: expected null or a string, got {other:?}")),
        }
    }

    fn count(&self, name: &str) -> Result<u32, String> {
        match self.get(name)? {
            Value::Int(n) => u32::try_from(*n).map_err(|_| format!("{name}: negative")),
            other => Err(format!("{name}: expected an int, got {other:?}")),
        }
    }

    fn millis(&self, name: &str) -> Result<i64, String> {
        match self.get(name)? {
            Value::TimestampMillis(ms) | Value::Long(ms) => Ok(*ms),
            other => Err(format!("{name}: expected timestamp-millis, got {other:?}")),
        }
    }

    fn time(&self, name: &str) -> Result<chrono::DateTime<Utc>, String> {
        Utc.timestamp_millis_opt(self.millis(name)?)
            .single()
            .ok_or_else(|| format!("{name}: out of range"))
    }

    fn method(&self, name: &str) -> Result<PaymentMethod, String> {
        match self.get(name)? {
            Value::Enum(_, symbol) => symbol
                .parse()
                .map_err(|e: order_saga_domain::FieldError| format!("{name}: {}", e.message)),
            other => Err(format!("{name}: expected an enum, got {other:?}")),
        }
    }

    fn money(&self, name: &str) -> Result<Money, String> {
        money(self.get(name)?).map_err(|e| format!("{name}: {e}"))
    }

    fn array(&self, name: &str) -> Result<Vec<Fields>, String> {
        match self.get(name)? {
            Value::Array(items) => items.iter().cloned().map(Fields::of).collect(),
            other => Err(format!("{name}: expected an array, got {other:?}")),
        }
    }
}

impl Contract {
    /// Parses the schema files.
    pub fn load() -> Result<Self, String> {
        let mut codecs = HashMap::new();
        for (topic, text) in SCHEMA_FILES {
            let schema = Schema::parse_str(text).map_err(|e| format!("schema of {topic}: {e}"))?;
            let fingerprint = fingerprint(&schema);
            let header = header_of(&schema);
            let reader = GenericSingleObjectReader::builder()
                .schema(schema.clone())
                .header(header.clone())
                .build()
                .map_err(|e| format!("schema of {topic}: {e}"))?;
            let foreign = match FOREIGN_SCHEMA_FILES.iter().find(|(t, _)| *t == topic) {
                Some((_, text)) => {
                    let theirs = Schema::parse_str(text)
                        .map_err(|e| format!("contract schema of {topic}: {e}"))?;
                    let header = header_of(&theirs);
                    let reader = GenericSingleObjectReader::builder()
                        .schema(theirs)
                        .header(header.clone())
                        .build()
                        .map_err(|e| format!("contract schema of {topic}: {e}"))?;
                    Some(Foreign { header, reader })
                }
                None => None,
            };
            let writer = GenericSingleObjectWriter::new_with_capacity_and_header_builder(
                &schema,
                512,
                &SpecHeader(header),
            )
            .map_err(|e| format!("schema of {topic}: {e}"))?;
            let record_name = match &schema {
                Schema::Record(r) => r.name.fullname(None),
                _ => topic.as_str().to_string(),
            };
            codecs.insert(
                topic,
                Codec {
                    record_name,
                    fingerprint: fingerprint.iter().map(|b| format!("{b:02x}")).collect(),
                    schema,
                    reader,
                    foreign,
                    writer: Mutex::new(writer),
                },
            );
        }
        Ok(Contract { codecs })
    }

    fn codec(&self, topic: Topic) -> Result<&Codec, String> {
        self.codecs
            .get(&topic)
            .ok_or_else(|| format!("no schema for {topic}"))
    }

    pub fn schema(&self, topic: Topic) -> Result<&Schema, String> {
        self.codec(topic).map(|c| &c.schema)
    }

    /// The record's full name (e.g. `com.groom.ecommerce.order.event.avro.OrderCreated`).
    pub fn record_name(&self, topic: Topic) -> &str {
        self.codecs
            .get(&topic)
            .map_or(topic.as_str(), |c| c.record_name.as_str())
    }

    /// The schema's CRC-64-AVRO fingerprint as hex, bytes in header
    /// (little-endian) order, as fastavro prints it.
    pub fn fingerprint(&self, topic: Topic) -> &str {
        self.codecs
            .get(&topic)
            .map_or("", |c| c.fingerprint.as_str())
    }

    /// The event as an Avro value of its topic's schema.
    pub fn to_value(event: &IntegrationEvent) -> Value {
        let ms = event.occurred_at.timestamp_millis();
        let mut fields = vec![
            ("eventId", string(event.event_id.to_string())),
            ("eventTimestamp", Value::TimestampMillis(ms)),
            ("orderId", string(&event.order_id)),
        ];
        match &event.body {
            Body::OrderCreated {
                user_id,
                store_id,
                items,
                total_amount,
            } => {
                let items = items
                    .iter()
                    .map(|l| {
                        record(vec![
                            ("productId", string(&l.product_id)),
                            ("quantity", int(l.quantity)),
                            ("unitPrice", decimal(l.unit_price)),
                        ])
                    })
                    .collect();
                fields.extend([
                    ("userId", string(user_id)),
                    ("storeId", string(store_id)),
                    ("items", Value::Array(items)),
                    ("totalAmount", decimal(*total_amount)),
                    ("createdAt", Value::TimestampMillis(ms)),
                ]);
            }
            Body::OrderConfirmed {
                user_id,
                total_amount,
            } => fields.extend([
                ("userId", string(user_id)),
                ("totalAmount", decimal(*total_amount)),
                ("confirmedAt", Value::TimestampMillis(ms)),
            ]),
            Body::OrderCancelled {
                user_id,
                items,
                reason,
            } => {
                let items = items
                    .iter()
                    .map(|i| {
                        record(vec![
                            ("productId", string(&i.product_id)),
                            ("quantity", int(i.quantity)),
                        ])
                    })
                    .collect();
                let (index, symbol) = contract_reason(*reason);
                fields.extend([
                    ("userId", string(user_id)),
                    ("items", Value::Array(items)),
                    ("cancellationReason", Value::Enum(index, symbol.to_string())),
                    ("cancelledAt", Value::TimestampMillis(ms)),
                ]);
            }
            Body::PaymentWaitStarted {
                user_id,
                total_amount,
            } => fields.extend([
                ("userId", string(user_id)),
                ("totalAmount", decimal(*total_amount)),
                ("startedAt", Value::TimestampMillis(ms)),
            ]),
            Body::StockReserved { reserved_items } => {
                let items = reserved_items
                    .iter()
                    .map(|l| {
                        record(vec![
                            ("productId", string(&l.product_id)),
                            ("quantity", int(l.quantity)),
                            ("reservedStock", int(l.available_after)),
                        ])
                    })
                    .collect();
                fields.extend([
                    ("reservedItems", Value::Array(items)),
                    ("reservedAt", Value::TimestampMillis(ms)),
                ]);
            }
            Body::StockReservationFailed {
                failed_items,
                failure_reason,
            } => {
                let items = failed_items
                    .iter()
                    .map(|s| {
                        record(vec![
                            ("productId", string(&s.product_id)),
                            ("requestedQuantity", int(s.requested)),
                            ("availableStock", int(s.available)),
                        ])
                    })
                    .collect();
                fields.extend([
                    ("failedItems", Value::Array(items)),
                    ("failureReason", string(failure_reason)),
                    ("failedAt", Value::TimestampMillis(ms)),
                ]);
            }
            Body::StockReleased { released_items } => {
                let items = released_items
                    .iter()
                    .map(|i| {
                        record(vec![
                            ("productId", string(&i.product_id)),
                            ("quantity", int(i.quantity)),
                        ])
                    })
                    .collect();
                fields.extend([
                    ("releasedItems", Value::Array(items)),
                    ("releasedAt", Value::TimestampMillis(ms)),
                ]);
            }
            Body::PaymentCompleted {
                payment_id,
                user_id,
                total_amount,
                payment_method,
                pg_approval_number,
                completed_at,
            } => {
                // The payment contract puts paymentId before orderId.
                fields.pop();
                fields.extend([
                    ("paymentId", string(payment_id)),
                    ("orderId", string(&event.order_id)),
                    ("userId", string(user_id)),
                    ("totalAmount", decimal(*total_amount)),
                    ("paymentMethod", method(*payment_method)),
                    ("pgApprovalNumber", string(pg_approval_number)),
                    ("completedAt", Value::Long(completed_at.timestamp_millis())),
                ]);
            }
            Body::PaymentFailed {
                payment_id,
                user_id,
                failure_reason,
                failed_at,
            } => {
                fields.pop();
                fields.extend([
                    ("paymentId", string(payment_id)),
                    ("orderId", string(&event.order_id)),
                    ("userId", string(user_id)),
                    ("failureReason", string(failure_reason)),
                    ("failedAt", Value::Long(failed_at.timestamp_millis())),
                ]);
            }
            Body::OrderPaid {
                user_id,
                payment_id,
                total_amount,
                payment_method,
                items,
            } => fields.extend([
                ("userId", string(user_id)),
                ("paymentId", string(payment_id)),
                ("totalAmount", decimal(*total_amount)),
                ("paymentMethod", method(*payment_method)),
                ("items", stock_items(items)),
                ("paidAt", Value::TimestampMillis(ms)),
            ]),
            Body::StockConfirmed {
                payment_id,
                confirmed_items,
            } => fields.extend([
                ("paymentId", string(payment_id)),
                ("confirmedItems", stock_items(confirmed_items)),
                ("confirmedAt", Value::Long(ms)),
            ]),
            Body::StockConfirmationFailed {
                payment_id,
                failure_reason,
            } => fields.extend([
                ("paymentId", string(payment_id)),
                ("failureReason", string(failure_reason)),
                ("failedAt", Value::Long(ms)),
            ]),
            Body::OrderExpired {
                user_id,
                expiration_reason,
            } => fields.extend([
                ("userId", string(user_id)),
                ("expirationReason", string(expiration_reason)),
                ("expiredAt", Value::Long(ms)),
            ]),
            Body::OrderCompleted {
                user_id,
                payment_id,
                total_amount,
            } => fields.extend([
                ("userId", string(user_id)),
                ("paymentId", string(payment_id)),
                ("totalAmount", decimal(*total_amount)),
                ("completedAt", Value::TimestampMillis(ms)),
            ]),
        }
        fields.push(("correlationId", optional(event.correlation_id.as_deref())));
        fields.push(("causationId", optional(event.causation_id.as_deref())));
        if let Body::OrderCancelled { reason, .. } = &event.body {
            fields.push(("detailedReason", optional(Some(reason.as_str()))));
        }
        record(fields)
    }

    /// Single-object encoding of the event with its topic's schema.
    pub fn encode(&self, event: &IntegrationEvent) -> Result<Vec<u8>, String> {
        let codec = self.codec(event.topic())?;
        let mut writer = codec
            .writer
            .lock()
            .map_err(|_| format!("{}: the encoder failed before", event.topic()))?;
        let mut bytes = Vec::with_capacity(512);
        writer
            .write_value(Self::to_value(event), &mut bytes)
            .map_err(|e| format!("{}: {e}", event.topic()))?;
        Ok(bytes)
    }

    /// Decodes a single-object message of `topic` (checking its header and
    /// fingerprint) back into an integration event.
    pub fn decode(&self, topic: Topic, mut bytes: &[u8]) -> Result<IntegrationEvent, String> {
        let codec = self.codec(topic)?;
        let value = match &codec.foreign {
            // Read by field name: what their schema lacks (our optional
            // fields) is absent and reads as none. (No `resolve`: it refuses
            // a decimal written in fewer bytes than its precision, which is
            // how Java and fastavro write small amounts.)
            Some(foreign) if bytes.starts_with(&foreign.header) => {
                foreign.reader.read_value(&mut bytes)
            }
            _ => codec.reader.read_value(&mut bytes),
        }
        .map_err(|e| format!("{topic}: {e}"))?;
        Self::from_value(topic, value)
    }

    pub fn from_value(topic: Topic, value: Value) -> Result<IntegrationEvent, String> {
        let f = Fields::of(value)?;
        let lines = |name: &str| -> Result<Vec<StockItem>, String> {
            f.array(name)?
                .iter()
                .map(|i| {
                    Ok(StockItem {
                        product_id: i.string("productId")?,
                        quantity: i.count("quantity")?,
                    })
                })
                .collect()
        };
        let body = match topic {
            Topic::OrderCreated => Body::OrderCreated {
                user_id: f.string("userId")?,
                store_id: f.string("storeId")?,
                items: f
                    .array("items")?
                    .iter()
                    .map(|i| {
                        Ok(OrderLine {
                            product_id: i.string("productId")?,
                            quantity: i.count("quantity")?,
                            unit_price: i.money("unitPrice")?,
                        })
                    })
                    .collect::<Result<_, String>>()?,
                total_amount: f.money("totalAmount")?,
            },
            Topic::OrderConfirmed => Body::OrderConfirmed {
                user_id: f.string("userId")?,
                total_amount: f.money("totalAmount")?,
            },
            Topic::PaymentWaitStarted => Body::PaymentWaitStarted {
                user_id: f.string("userId")?,
                total_amount: f.money("totalAmount")?,
            },
            Topic::OrderCancelled => {
                let reason = match f.optional("detailedReason")? {
                    Some(detailed) => detailed
                        .parse()
                        .map_err(|e: order_saga_domain::FieldError| e.to_string())?,
                    None => match f.get("cancellationReason")? {
                        Value::Enum(_, s) if s == "STOCK_UNAVAILABLE" => {
                            CancelReason::StockShortage
                        }
                        Value::Enum(_, s) if s == "USER_REQUESTED" => CancelReason::CustomerRequest,
                        Value::Enum(_, s) if s == "PAYMENT_TIMEOUT" => CancelReason::PaymentTimeout,
                        Value::Enum(_, s) if CANCELLATION_REASONS.contains(&s.as_str()) => {
                            CancelReason::SagaTimeout
                        }
                        other => return Err(format!("cancellationReason: {other:?}")),
                    },
                };
                Body::OrderCancelled {
                    user_id: f.string("userId")?,
                    items: lines("items")?,
                    reason,
                }
            }
            Topic::StockReserved => Body::StockReserved {
                reserved_items: f
                    .array("reservedItems")?
                    .iter()
                    .map(|i| {
                        Ok(ReservedLine {
                            product_id: i.string("productId")?,
                            quantity: i.count("quantity")?,
                            available_after: i.count("reservedStock")?,
                        })
                    })
                    .collect::<Result<_, String>>()?,
            },
            Topic::StockReservationFailed => Body::StockReservationFailed {
                failed_items: f
                    .array("failedItems")?
                    .iter()
                    .map(|i| {
                        Ok(Shortage {
                            product_id: i.string("productId")?,
                            requested: i.count("requestedQuantity")?,
                            available: i.count("availableStock")?,
                        })
                    })
                    .collect::<Result<_, String>>()?,
                failure_reason: f.string("failureReason")?,
            },
            Topic::StockReleased => Body::StockReleased {
                released_items: lines("releasedItems")?,
            },
            Topic::PaymentCompleted => Body::PaymentCompleted {
                payment_id: f.string("paymentId")?,
                user_id: f.string("userId")?,
                total_amount: f.money("totalAmount")?,
                payment_method: f.method("paymentMethod")?,
                pg_approval_number: f.string("pgApprovalNumber")?,
                completed_at: f.time("completedAt")?,
            },
            Topic::PaymentFailed => Body::PaymentFailed {
                payment_id: f.string("paymentId")?,
                user_id: f.string("userId")?,
                failure_reason: f.string("failureReason")?,
                failed_at: f.time("failedAt")?,
            },
            Topic::OrderPaid => Body::OrderPaid {
                user_id: f.string("userId")?,
                payment_id: f.string("paymentId")?,
                total_amount: f.money("totalAmount")?,
                payment_method: f.method("paymentMethod")?,
                items: lines("items")?,
            },
            Topic::StockConfirmed => Body::StockConfirmed {
                payment_id: f.string("paymentId")?,
                confirmed_items: lines("confirmedItems")?,
            },
            Topic::StockConfirmationFailed => Body::StockConfirmationFailed {
                payment_id: f.string("paymentId")?,
                failure_reason: f.string("failureReason")?,
            },
            Topic::OrderExpired => Body::OrderExpired {
                user_id: f.string("userId")?,
                expiration_reason: f.string("expirationReason")?,
            },
            Topic::OrderCompleted => Body::OrderCompleted {
                user_id: f.string("userId")?,
                payment_id: f.string("paymentId")?,
                total_amount: f.money("totalAmount")?,
            },
        };
        Ok(IntegrationEvent {
            event_id: Uuid::parse_str(&f.string("eventId")?)
                .map_err(|e| format!("eventId: {e}"))?,
            order_id: f.string("orderId")?,
            occurred_at: f.time("eventTimestamp")?,
            correlation_id: f.optional("correlationId")?,
            causation_id: f.optional("causationId")?,
            // Not in the record: a Kafka header (see `kafka::record_headers`).
            traceparent: None,
            body,
        })
    }
}

/// Whether `current` can read data written with `previous` (and the other
/// way round): the rule every change to a schema file must keep.
pub fn compatible(previous: &Schema, current: &Schema) -> Result<(), String> {
    use apache_avro::schema_compatibility::SchemaCompatibility;
    SchemaCompatibility::can_read(previous, current)
        .map_err(|e| format!("new schema cannot read old data: {e}"))?;
    SchemaCompatibility::can_read(current, previous)
        .map_err(|e| format!("old readers cannot read new data: {e}"))?;
    Ok(())
}
