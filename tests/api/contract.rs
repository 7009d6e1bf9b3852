//! The Avro contract (SPEC §4): what we write is single-object encoded with
//! the committed `.avsc` files; a consumer that holds only the original
//! platform's contract (`schemas/avro/contract/`) reads it by schema
//! resolution; every schema reads data of its previous version; a breaking
//! change is caught.

#![allow(deprecated)] // apache-avro's datum functions: the simplest way to act as a foreign reader

use apache_avro::schema::Schema;
use apache_avro::types::Value;
use chrono::{TimeZone, Utc};
use order_saga::saga::avro::{compatible, Contract, SCHEMA_FILES};
use order_saga::saga::integration::{Body, IntegrationEvent, Topic};
use order_saga_domain::{
    CancelReason, OrderLine, PaymentMethod, ReservedLine, Shortage, StockItem,
};
use uuid::Uuid;

fn event(body: Body) -> IntegrationEvent {
    IntegrationEvent {
        event_id: Uuid::new_v4(),
        order_id: "o-1".into(),
        occurred_at: Utc
            .timestamp_millis_opt(1_764_000_000_123)
            .single()
            .expect("time"),
        correlation_id: Some("c-1".into()),
        causation_id: None,
        traceparent: None,
        body,
    }
}

fn samples() -> Vec<IntegrationEvent> {
    let m = |s: &str| s.parse().expect("money");
    vec![
        event(Body::OrderCreated {
            user_id: "u-1".into(),
            store_id: "s-1".into(),
            items: vec![
                OrderLine {
                    product_id: "p-1".into(),
                    quantity: 2,
                    unit_price: m("12900.00"),
                },
                OrderLine {
                    product_id: "p-2".into(),
                    quantity: 1,
                    unit_price: m("0.05"),
                },
            ],
            total_amount: m("25800.05"),
        }),
        event(Body::OrderConfirmed {
            user_id: "u-1".into(),
            total_amount: m("99999999.99"),
        }),
        event(Body::OrderCancelled {
            user_id: "u-1".into(),
            items: vec![StockItem {
                product_id: "p-1".into(),
                quantity: 2,
            }],
            reason: CancelReason::StockShortage,
        }),
        event(Body::PaymentWaitStarted {
            user_id: "u-1".into(),
            total_amount: m("0.00"),
        }),
        event(Body::StockReserved {
            reserved_items: vec![ReservedLine {
                product_id: "p-1".into(),
                quantity: 2,
                available_after: 13,
            }],
        }),
        event(Body::StockReservationFailed {
            failed_items: vec![Shortage {
                product_id: "p-1".into(),
                requested: 9,
                available: 3,
            }],
            failure_reason: "insufficient stock".into(),
        }),
        event(Body::StockReleased {
            released_items: vec![StockItem {
                product_id: "p-1".into(),
                quantity: 2,
            }],
        }),
        event(Body::PaymentCompleted {
            payment_id: "pay-1".into(),
            user_id: "u-1".into(),
            total_amount: m("25800.05"),
            payment_method: PaymentMethod::KakaoPay,
            pg_approval_number: "PG-77".into(),
            completed_at: at(1_764_000_000_456),
        }),
        event(Body::PaymentFailed {
            payment_id: "pay-2".into(),
            user_id: "u-1".into(),
            failure_reason: "card declined".into(),
            failed_at: at(1_764_000_000_789),
        }),
        event(Body::OrderPaid {
            user_id: "u-1".into(),
            payment_id: "pay-1".into(),
            total_amount: m("25800.05"),
            payment_method: PaymentMethod::Toss,
            items: vec![StockItem {
                product_id: "p-1".into(),
                quantity: 2,
            }],
        }),
        event(Body::StockConfirmed {
            payment_id: "pay-1".into(),
            confirmed_items: vec![StockItem {
                product_id: "p-1".into(),
                quantity: 2,
            }],
        }),
        event(Body::StockConfirmationFailed {
            payment_id: "pay-3".into(),
            failure_reason: "order cancelled (PAYMENT_TIMEOUT)".into(),
        }),
        event(Body::OrderExpired {
            user_id: "u-1".into(),
            expiration_reason: "payment time exceeded (30 min)".into(),
        }),
        event(Body::OrderCompleted {
            user_id: "u-1".into(),
            payment_id: "pay-1".into(),
            total_amount: m("25800.05"),
        }),
    ]
}

fn at(ms: i64) -> chrono::DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().expect("time")
}

fn contract_schema(topic: Topic) -> Option<Schema> {
    let path = format!(
        "{}/schemas/avro/contract/{}.avsc",
        env!("CARGO_MANIFEST_DIR"),
        topic.as_str()
    );
    let text = std::fs::read_to_string(path).ok()?;
    Some(Schema::parse_str(&text).expect("contract schema parses"))
}

/// The datum after the single-object header, which must be `C3 01` and our
/// schema's fingerprint.
fn datum<'a>(contract: &Contract, topic: Topic, bytes: &'a [u8]) -> &'a [u8] {
    assert_eq!(&bytes[..2], &[0xC3, 0x01], "single-object marker");
    let fingerprint = order_saga::saga::avro::fingerprint(contract.schema(topic).expect("schema"));
    assert_eq!(
        &bytes[2..10],
        fingerprint.as_slice(),
        "CRC-64-AVRO fingerprint, little-endian"
    );
    &bytes[10..]
}

fn field<'a>(value: &'a Value, name: &str) -> &'a Value {
    match value {
        Value::Record(fields) => {
            &fields
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no {name}"))
                .1
        }
        other => panic!("not a record: {other:?}"),
    }
}

fn decimal_text(value: &Value) -> String {
    let Value::Decimal(d) = value else {
        panic!("not a decimal: {value:?}")
    };
    let bytes: Vec<u8> = d.try_into().expect("bytes");
    let mut full = [if bytes[0] & 0x80 != 0 { 0xff } else { 0 }; 16];
    full[16 - bytes.len()..].copy_from_slice(&bytes);
    rust_decimal::Decimal::from_i128_with_scale(i128::from_be_bytes(full), 2).to_string()
}

#[test]
fn every_event_reads_back_through_our_schemas() {
    let contract = Contract::load().expect("schemas");
    for sample in samples() {
        let bytes = contract.encode(&sample).expect("encode");
        let back = contract.decode(sample.topic(), &bytes).expect("decode");
        assert_eq!(back, sample);
    }
}

#[test]
fn a_consumer_holding_only_the_contract_reads_every_event_we_write() {
    let contract = Contract::load().expect("schemas");
    let mut read = 0;
    for sample in samples() {
        let topic = sample.topic();
        let Some(reader) = contract_schema(topic) else {
            continue;
        };
        let bytes = contract.encode(&sample).expect("encode");
        let mut body = datum(&contract, topic, &bytes);
        let writer = contract.schema(topic).expect("schema");
        let value = apache_avro::from_avro_datum(writer, &mut body, Some(&reader))
            .expect("schema resolution");
        assert_eq!(field(&value, "orderId"), &Value::String("o-1".into()));
        assert_eq!(
            field(&value, "eventId"),
            &Value::String(sample.event_id.to_string())
        );
        match topic {
            Topic::OrderCreated => {
                let Value::Array(items) = field(&value, "items") else {
                    panic!("items")
                };
                assert_eq!(decimal_text(field(&items[0], "unitPrice")), "12900.00");
                assert_eq!(decimal_text(field(&items[1], "unitPrice")), "0.05");
                assert_eq!(decimal_text(field(&value, "totalAmount")), "25800.05");
            }
            Topic::OrderConfirmed => {
                assert_eq!(decimal_text(field(&value, "totalAmount")), "99999999.99")
            }
            Topic::OrderCancelled => {
                assert_eq!(
                    field(&value, "cancellationReason"),
                    &Value::Enum(2, "STOCK_UNAVAILABLE".into())
                )
            }
            Topic::StockReserved => {
                let Value::Array(items) = field(&value, "reservedItems") else {
                    panic!("items")
                };
                assert_eq!(field(&items[0], "reservedStock"), &Value::Int(13));
            }
            Topic::StockReservationFailed => {
                let Value::Array(items) = field(&value, "failedItems") else {
                    panic!("items")
                };
                assert_eq!(field(&items[0], "availableStock"), &Value::Int(3));
            }
            Topic::PaymentCompleted => {
                assert_eq!(
                    field(&value, "paymentMethod"),
                    &Value::Enum(2, "KAKAO_PAY".into())
                );
                assert_eq!(decimal_text(field(&value, "totalAmount")), "25800.05");
                assert_eq!(
                    field(&value, "completedAt"),
                    &Value::Long(1_764_000_000_456)
                );
            }
            Topic::PaymentFailed => {
                assert_eq!(
                    field(&value, "failureReason"),
                    &Value::String("card declined".into())
                );
            }
            Topic::StockConfirmed => {
                let Value::Array(items) = field(&value, "confirmedItems") else {
                    panic!("items")
                };
                assert_eq!(field(&items[0], "quantity"), &Value::Int(2));
                assert_eq!(field(&value, "paymentId"), &Value::String("pay-1".into()));
            }
            Topic::StockConfirmationFailed => {
                assert_eq!(
                    field(&value, "failureReason"),
                    &Value::String("order cancelled (PAYMENT_TIMEOUT)".into())
                );
            }
            Topic::OrderExpired => {
                assert_eq!(
                    field(&value, "expirationReason"),
                    &Value::String("payment time exceeded (30 min)".into())
                );
                assert_eq!(field(&value, "expiredAt"), &Value::Long(1_764_000_000_123));
            }
            _ => {}
        }
        // Our additions are not in the reader's view.
        assert!(matches!(&value, Value::Record(f) if f.iter().all(|(n, _)| n != "correlationId")));
        read += 1;
    }
    assert_eq!(read, 10, "the ten contract events");
}

#[test]
fn cancel_reasons_map_onto_the_contract_enum() {
    let contract = Contract::load().expect("schemas");
    for (reason, symbol) in [
        (CancelReason::StockShortage, "STOCK_UNAVAILABLE"),
        (CancelReason::CustomerRequest, "USER_REQUESTED"),
        (CancelReason::SagaTimeout, "SYSTEM_ERROR"),
        (CancelReason::StockReservationTimeout, "SYSTEM_ERROR"),
        (CancelReason::PaymentTimeout, "PAYMENT_TIMEOUT"),
        (CancelReason::PaymentFailed, "SYSTEM_ERROR"),
    ] {
        let sample = event(Body::OrderCancelled {
            user_id: "u".into(),
            items: vec![],
            reason,
        });
        let value = Contract::to_value(&sample);
        assert!(matches!(field(&value, "cancellationReason"), Value::Enum(_, s) if s == symbol));
        assert_eq!(
            contract
                .decode(
                    Topic::OrderCancelled,
                    &contract.encode(&sample).expect("encode")
                )
                .expect("decode"),
            sample
        );
    }
}

#[test]
fn each_schema_reads_data_written_by_its_previous_version() {
    let contract = Contract::load().expect("schemas");
    for (topic, _) in SCHEMA_FILES {
        let Some(previous) = contract_schema(topic) else {
            continue;
        };
        let current = contract.schema(topic).expect("schema");
        compatible(&previous, current).unwrap_or_else(|e| panic!("{topic}: {e}"));
    }
    // Old data, new reader: the additions take their defaults.
    let previous = contract_schema(Topic::OrderConfirmed).expect("contract");
    let old = Value::Record(vec![
        ("eventId".into(), Value::String(Uuid::nil().to_string())),
        ("eventTimestamp".into(), Value::TimestampMillis(1)),
        ("orderId".into(), Value::String("o-9".into())),
        ("userId".into(), Value::String("u-9".into())),
        (
            "totalAmount".into(),
            Value::Decimal(apache_avro::Decimal::from(vec![0, 0, 0, 0x01, 0x00])),
        ),
        ("confirmedAt".into(), Value::TimestampMillis(1)),
    ]);
    let bytes = apache_avro::to_avro_datum(&previous, old).expect("old writer");
    let value = apache_avro::from_avro_datum(
        &previous,
        &mut bytes.as_slice(),
        Some(contract.schema(Topic::OrderConfirmed).expect("schema")),
    )
    .expect("new reader");
    let event = Contract::from_value(Topic::OrderConfirmed, value).expect("maps");
    assert_eq!(event.correlation_id, None);
    assert!(
        matches!(event.body, Body::OrderConfirmed { total_amount, .. } if total_amount.to_string() == "2.56")
    );
}

/// The payment service writes with its own schema (no correlationId or
/// causationId): we read its records by schema resolution.
#[test]
fn a_payment_record_written_with_the_contract_schema_is_read() {
    let contract = Contract::load().expect("schemas");
    let theirs = contract_schema(Topic::PaymentCompleted).expect("contract");
    let record = Value::Record(vec![
        ("eventId".into(), Value::String(Uuid::nil().to_string())),
        (
            "eventTimestamp".into(),
            Value::TimestampMillis(1_764_000_000_000),
        ),
        ("paymentId".into(), Value::String("pay-7".into())),
        ("orderId".into(), Value::String("o-7".into())),
        ("userId".into(), Value::String("u-7".into())),
        // As Java and fastavro write it: the fewest bytes (2.56 in two).
        (
            "totalAmount".into(),
            Value::Decimal(apache_avro::Decimal::from(vec![0x01, 0x00])),
        ),
        ("paymentMethod".into(), Value::Enum(4, "TOSS".into())),
        ("pgApprovalNumber".into(), Value::String("PG-1".into())),
        ("completedAt".into(), Value::Long(1_764_000_000_001)),
    ]);
    let mut bytes = vec![0xC3, 0x01];
    bytes.extend_from_slice(&order_saga::saga::avro::fingerprint(&theirs));
    bytes.extend(apache_avro::to_avro_datum(&theirs, record).expect("their writer"));
    let event = contract
        .decode(Topic::PaymentCompleted, &bytes)
        .expect("read by resolution");
    assert_eq!(event.order_id, "o-7");
    assert_eq!(event.correlation_id, None);
    match event.body {
        Body::PaymentCompleted {
            payment_id,
            total_amount,
            payment_method,
            ..
        } => {
            assert_eq!(payment_id, "pay-7");
            assert_eq!(total_amount.to_string(), "2.56");
            assert_eq!(payment_method, PaymentMethod::Toss);
        }
        other => panic!("not a payment: {other:?}"),
    }
}

#[test]
fn a_breaking_change_is_rejected() {
    let contract = Contract::load().expect("schemas");
    let current = contract.schema(Topic::OrderCreated).expect("schema");
    let text = SCHEMA_FILES
        .iter()
        .find(|(t, _)| *t == Topic::OrderCreated)
        .expect("file")
        .1;
    let mut json: serde_json::Value = serde_json::from_str(text).expect("json");
    // A new field without a default: new readers cannot read old data.
    json["fields"]
        .as_array_mut()
        .expect("fields")
        .push(serde_json::json!({"name": "channel", "type": "string"}));
    let required = Schema::parse_str(&json.to_string()).expect("parses");
    assert!(compatible(current, &required).is_err());
    // A field changing type: nobody can read the other's data.
    let mut json: serde_json::Value = serde_json::from_str(text).expect("json");
    json["fields"][3]["type"] = serde_json::json!("int");
    let retyped = Schema::parse_str(&json.to_string()).expect("parses");
    assert!(compatible(current, &retyped).is_err());
}

/// Fingerprints as a standard tool computes them from the same files
/// (fastavro 1.13.1: `fingerprint(to_parsing_canonical_form(schema),
/// "CRC-64-AVRO")`), so a consumer can find the schema by the header.
#[test]
fn fingerprints_are_the_ones_standard_tools_compute() {
    let contract = Contract::load().expect("schemas");
    for (topic, expected) in [
        (Topic::OrderCreated, "c35b67820be43131"),
        (Topic::OrderConfirmed, "278967db86cb3769"),
        (Topic::OrderCancelled, "4955e9d85c7c9360"),
        (Topic::PaymentWaitStarted, "7bc5fb38332bab93"),
        (Topic::StockReserved, "df9802a5df7325fd"),
        (Topic::StockReservationFailed, "eb22bf5fd38c8525"),
        (Topic::StockReleased, "09193b44ece4093d"),
        (Topic::PaymentCompleted, "cdf238cdf44cbf6b"),
        (Topic::PaymentFailed, "893fdc70e4bb9a2b"),
        (Topic::OrderPaid, "4bfd2276d4ab2ffb"),
        (Topic::StockConfirmed, "0855f3b773acb7b0"),
        (Topic::StockConfirmationFailed, "c0f3ad017eefc6e3"),
        (Topic::OrderExpired, "9c0de9b33b6ef822"),
        (Topic::OrderCompleted, "ca4a7614f154e614"),
    ] {
        assert_eq!(contract.fingerprint(topic), expected, "{topic}");
    }
}
