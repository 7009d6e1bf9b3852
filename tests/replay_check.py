"""Reads a `replay --format avro` file with fastavro (not our code) and
compares it event by event with the `replay --format jsonl` output of the
same log. Prints a JSON report on stdout.

usage: replay_check.py FILE.avro FILE.jsonl
"""
import json
import sys

from fastavro import reader

# Which domain event each integration record comes from.
RECORD_OF = {
    ("Order", "OrderCreated"): "com.groom.ecommerce.order.event.avro.OrderCreated",
    ("Order", "OrderConfirmed"): "com.groom.ecommerce.order.event.avro.OrderConfirmed",
    ("Order", "OrderCancelled"): "com.groom.ecommerce.order.event.avro.OrderCancelled",
    ("Order", "PaymentWaitStarted"): "com.ordersaga.event.avro.PaymentWaitStarted",
    ("StockReservation", "StockReserved"): "com.groom.ecommerce.product.event.avro.StockReserved",
    ("StockReservation", "StockReservationFailed"): "com.groom.ecommerce.saga.event.avro.StockReservationFailed",
    ("StockReservation", "StockReleased"): "com.ordersaga.event.avro.StockReleased",
}


def main():
    avro_path, jsonl_path = sys.argv[1], sys.argv[2]
    with open(jsonl_path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    expected = [l for l in lines if (l["aggregateType"], l["eventType"]) in RECORD_OF]
    with open(avro_path, "rb") as f:
        records = list(reader(f, return_record_name=True))
    report = {"avro": len(records), "expected": len(expected), "mismatches": []}
    for (name, record), line in zip(records, expected):
        problems = []
        if record["eventId"] != line["eventId"]:
            problems.append(f"eventId {record['eventId']} != {line['eventId']}")
        if record["orderId"] != line["aggregateId"]:
            problems.append("orderId")
        if name != RECORD_OF[(line["aggregateType"], line["eventType"])]:
            problems.append(f"record {name} for {line['eventType']}")
        payload = next(iter(line["payload"].values()))
        if "totalAmount" in record and "totalAmount" in payload:
            if str(record["totalAmount"]) != payload["totalAmount"]:
                problems.append(f"totalAmount {record['totalAmount']} != {payload['totalAmount']}")
        if problems:
            report["mismatches"].append({"position": line["position"], "problems": problems})
    report["mismatches"] = report["mismatches"][:20]
    json.dump(report, sys.stdout, default=str)


if __name__ == "__main__":
    main()
