"""An independent Kafka client (confluent-kafka + fastavro, not our code) that
reads every order-saga topic from the beginning and checks what a consumer of
the contract relies on. Prints a JSON report on stdout.

usage: kafka_reader.py BROKERS TOPIC_PREFIX SCHEMA_DIR EXPECTED_EVENTS

Reads until EXPECTED_EVENTS distinct event ids arrived, then on until the
topics are quiet for a second (so that duplicates behind them are counted).
"""
import io
import json
import sys
import time
from decimal import Decimal

from confluent_kafka import Consumer
from fastavro import parse_schema, schemaless_reader
from fastavro.schema import fingerprint, to_parsing_canonical_form

TOPICS = ["order.created", "order.confirmed", "order.cancelled", "order.payment.waiting",
          "stock.reserved", "stock.reservation.failed", "stock.released",
          "order.payment.completed", "stock.confirmed", "stock.confirmation.failed",
          "order.expiration-notification", "order.completed"]
# Saga order: a topic's events for one order never come before these.
AFTER = {
    "stock.reserved": ["order.created"],
    "stock.reservation.failed": ["order.created"],
    "order.confirmed": ["stock.reserved"],
    "order.payment.waiting": ["order.confirmed"],
    "order.cancelled": ["order.created"],
    "stock.released": ["stock.reserved", "order.cancelled"],
    "order.payment.completed": ["order.payment.waiting"],
    "stock.confirmed": ["order.payment.completed"],
    "order.completed": ["stock.confirmed"],
    "order.expiration-notification": ["order.payment.waiting"],
    "stock.confirmation.failed": ["order.created"],
}


def main():
    brokers, prefix, schema_dir, expected = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    schemas, prints = {}, {}
    for topic in TOPICS:
        with open(f"{schema_dir}/{topic}.avsc") as f:
            schemas[topic] = parse_schema(json.load(f))
        prints[topic] = bytes.fromhex(fingerprint(to_parsing_canonical_form(schemas[topic]), "CRC-64-AVRO"))

    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": f"{prefix}independent-reader",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([prefix + t for t in TOPICS])
    report = {"messages": 0, "per_topic": {}, "bad_keys": 0, "bad_headers": 0, "undecodable": [],
              "duplicates": [], "conflicting": [], "order_violations": [], "bad_totals": 0}
    seen = {t: set() for t in TOPICS}
    contents = {}  # eventId -> the record's bytes, to tell a repeat from a conflict
    first_at = {}  # (order, topic) -> offset-independent arrival index
    index = 0
    deadline = time.time() + 180
    distinct = 0
    while time.time() < deadline:
        msg = consumer.poll(1.0)
        if msg is None and distinct >= expected:
            break
        if msg is None or msg.error():
            continue
        topic = msg.topic()[len(prefix):]
        value = msg.value()
        report["messages"] += 1
        report["per_topic"][topic] = report["per_topic"].get(topic, 0) + 1
        if value[:2] != b"\xc3\x01" or value[2:10] != prints[topic]:
            report["bad_headers"] += 1
            continue
        try:
            record = schemaless_reader(io.BytesIO(value[10:]), schemas[topic])
        except Exception as e:  # noqa: BLE001 - any failure to decode is the finding
            report["undecodable"].append(f"{topic}: {e}")
            continue
        if msg.key().decode() != record["orderId"]:
            report["bad_keys"] += 1
        if contents.setdefault(record["eventId"], value) != value:
            report["conflicting"].append(f"{topic}:{record['eventId']}")
        if record["eventId"] in seen[topic]:
            report["duplicates"].append(f"{topic}:{record['eventId']}")
        else:
            distinct += 1
        seen[topic].add(record["eventId"])
        if topic == "order.created":
            total = sum(Decimal(i["quantity"]) * i["unitPrice"] for i in record["items"])
            if total != record["totalAmount"] or record["totalAmount"].as_tuple().exponent != -2:
                report["bad_totals"] += 1
        order = record["orderId"]
        first_at.setdefault((order, topic), (record["eventTimestamp"], index))
        index += 1
    consumer.close()
    # Each order's events in saga order (by the time each was recorded).
    for (order, topic), (at, _) in first_at.items():
        for before in AFTER.get(topic, []):
            earlier = first_at.get((order, before))
            if topic == "stock.released" and earlier is None:
                continue
            if earlier is None and before != "stock.reserved":
                report["order_violations"].append(f"{order}: {topic} without {before}")
            elif earlier is not None and earlier[0] > at:
                report["order_violations"].append(f"{order}: {topic} before {before}")
    report["order_violations"] = report["order_violations"][:20]
    json.dump(report, sys.stdout, default=str)


if __name__ == "__main__":
    main()
