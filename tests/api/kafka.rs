//! The saga over PostgreSQL and a real Kafka-protocol broker (tansu, started
//! by `scripts/kafka-up`; the test command sets `TEST_KAFKA_BROKERS`): the
//! 1,000-order run ends as in-process, an independent client (Python
//! confluent-kafka + fastavro) reads every topic and checks keys, schemas,
//! saga order and duplicates, and a broker stalled for 10 s (SIGSTOP) loses
//! no order, applies no effect twice, and never stops order acceptance.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use order_saga::saga::integration::IntegrationEvent;
use order_saga::store::Store;
use order_saga_domain::{CancelReason, Order, OrderStatus};
use serde_json::Value;
use tokio::process::Command;
use tokio::sync::{Mutex, MutexGuard};

use crate::binary::serve_with;
use crate::e2e::{
    assert_outcome, order_lines, post_orders, report, stock_half_the_demand, wait_until_all_end,
    wait_until_in, ORDERS,
};
use crate::helpers::{metrics_text, Backend, TestStore};

/// One Kafka test at a time: the broker is shared, and one of them stops it.
pub(crate) async fn broker_lock() -> MutexGuard<'static, ()> {
    static LOCK: OnceLock<Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| Mutex::new(())).lock().await
}

fn brokers() -> String {
    std::env::var("TEST_KAFKA_BROKERS")
        .expect("TEST_KAFKA_BROKERS is not set: run the tests with scripts/test (it starts the broker with scripts/kafka-up)")
}

/// The service's Kafka settings for a test: its own topic prefix, and the
/// test broker's workaround (one record per batch: tansu 0.6.0 skips the rest
/// of a batch when a fetch starts in its middle).
pub(crate) fn kafka_env(prefix: &str) -> Vec<(String, String)> {
    vec![
        ("KAFKA_BROKERS".into(), brokers()),
        ("KAFKA_TOPIC_PREFIX".into(), prefix.into()),
        ("KAFKA_PARTITIONS".into(), "6".into()),
        (
            "KAFKA_PRODUCER_CONFIG".into(),
            "batch.num.messages=1".into(),
        ),
    ]
}

/// How many integration events the log holds (what the topics must hold).
pub(crate) async fn published_events(store: &Store) -> usize {
    let mut after = 0;
    let mut count = 0;
    loop {
        let batch = store.read_log(after, 10_000).await.expect("log");
        let Some(last) = batch.last() else {
            return count;
        };
        after = last.position;
        count += batch
            .iter()
            .filter(|e| IntegrationEvent::from_log(e).ok().flatten().is_some())
            .count();
    }
}

/// Runs the independent client over the test's topics.
pub(crate) async fn independent_reader(prefix: &str, expected: usize) -> Value {
    let python = std::env::var("TEST_KAFKA_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/order-saga/venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new(python)
        .arg(format!("{root}/tests/kafka_reader.py"))
        .args([
            brokers(),
            prefix.to_string(),
            format!("{root}/schemas/avro"),
            expected.to_string(),
        ])
        .output()
        .await
        .expect("run the independent reader");
    assert!(
        output.status.success(),
        "reader failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("reader's JSON report")
}

pub(crate) fn assert_clean(report: &Value, expected: usize) {
    assert_eq!(
        report["messages"], expected,
        "every published event read: {report}"
    );
    for empty in ["undecodable", "duplicates", "order_violations"] {
        assert_eq!(
            report[empty].as_array().map(Vec::len),
            Some(0),
            "{empty}: {report}"
        );
    }
    for zero in ["bad_keys", "bad_headers", "bad_totals"] {
        assert_eq!(report[zero], 0, "{zero}: {report}");
    }
}

pub(crate) async fn wait_for_relay(store: &Store, url: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = metrics_text(&client, url).await;
        if text.lines().any(|l| l == "order_saga_relay_lag_events 0")
            && store.head_position().await.expect("head") > 0
        {
            return;
        }
        assert!(Instant::now() < deadline, "relay never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_postgres_and_kafka_every_order_ends_correctly_and_an_independent_client_reads_every_topic(
) {
    let _broker = broker_lock().await;
    let t = TestStore::new(Backend::Postgres).await;
    let prefix = format!("{}.", t.schema);
    let orders = order_lines();
    let stock = stock_half_the_demand(&t.store, &orders).await;

    let started = Instant::now();
    let (mut server, url) = serve_with(&t, &kafka_env(&prefix)).await;
    let mut slots = vec![None; ORDERS];
    post_orders(&url, &orders, &mut slots, None).await;
    let ids: Vec<String> = slots
        .iter()
        .map(|s| s.clone().expect("accepted").0)
        .collect();
    wait_until_all_end(&t.store, &ids).await;
    let elapsed = started.elapsed();
    wait_for_relay(&t.store, &url).await;
    server.start_kill().expect("stop");
    let _ = server.wait().await;

    let waiting = assert_outcome(&t.store, &orders, &ids, &stock).await;
    let sent: HashMap<String, _> = slots.into_iter().flatten().collect();
    report("Postgres + Kafka", &t.store, &sent, elapsed, waiting).await;
    let expected = published_events(&t.store).await;
    assert_clean(&independent_reader(&prefix, expected).await, expected);
    t.cleanup().await;
}

async fn signal(signal: &str) {
    let pid = std::env::var("TEST_KAFKA_PID")
        .expect("TEST_KAFKA_PID: the broker's process id (scripts/test sets it)");
    let status = Command::new("kill")
        .args([signal, &pid])
        .status()
        .await
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_stalled_for_10_seconds_loses_no_order_and_applies_no_effect_twice() {
    let _broker = broker_lock().await;
    let t = TestStore::new(Backend::Postgres).await;
    let prefix = format!("{}.", t.schema);
    let orders = order_lines();
    let stock = stock_half_the_demand(&t.store, &orders).await;
    let (mut server, url) = serve_with(&t, &kafka_env(&prefix)).await;
    let client = reqwest::Client::new();
    let ready = |url: String| {
        let client = client.clone();
        async move {
            client
                .get(format!("{url}/readyz"))
                .send()
                .await
                .expect("GET")
                .status()
                .as_u16()
        }
    };
    let mut slots = vec![None; ORDERS];
    post_orders(&url, &orders, &mut slots, Some(ORDERS / 3)).await;

    signal("-STOP").await;
    let stalled = Instant::now();
    // The broker is gone: orders are still accepted, and readiness says so.
    post_orders(&url, &orders, &mut slots, None).await;
    assert!(
        slots.iter().all(Option::is_some),
        "every order accepted while the broker was stalled"
    );
    let mut saw_not_ready = false;
    while stalled.elapsed() < Duration::from_secs(10) {
        saw_not_ready |= ready(url.clone()).await == 503;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    signal("-CONT").await;
    assert!(saw_not_ready, "readiness reported the broker down");

    let ids: Vec<String> = slots
        .iter()
        .map(|s| s.clone().expect("accepted").0)
        .collect();
    wait_until_all_end(&t.store, &ids).await;
    wait_for_relay(&t.store, &url).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(url.clone()).await != 200 {
        assert!(
            Instant::now() < deadline,
            "ready again after the broker came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.start_kill().expect("stop");
    let _ = server.wait().await;
    assert_outcome(&t.store, &orders, &ids, &stock).await;
    let expected = published_events(&t.store).await;
    assert_clean(&independent_reader(&prefix, expected).await, expected);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_goes_to_the_dead_letter_topic_with_its_error() {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let _broker = broker_lock().await;
    let t = TestStore::new(Backend::Postgres).await;
    let prefix = format!("{}.", t.schema);
    let (mut server, url) = serve_with(&t, &kafka_env(&prefix)).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("producer");
    let topic = format!("{prefix}order.created");
    producer
        .send(
            FutureRecord::to(&topic)
                .key("o-poison")
                .payload("not avro at all"),
            Duration::from_secs(10),
        )
        .await
        .expect("produce the poison");

    let deadline = Instant::now() + Duration::from_secs(60);
    while t
        .store
        .dead_letters()
        .await
        .expect("dead letters")
        .is_empty()
    {
        assert!(Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("{prefix}dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer
        .subscribe(&[&format!("{topic}.dlq")])
        .expect("subscribe");
    let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .expect("a dead letter arrives")
        .expect("message");
    assert_eq!(message.key(), Some(&b"o-poison"[..]));
    assert_eq!(message.payload(), Some(&b"not avro at all"[..]));
    let error = message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "error").and_then(|h| h.value))
        .map(|v| String::from_utf8_lossy(v).to_string())
        .expect("error header");
    assert!(error.contains("order.created"), "{error}");
    // The saga went on: the service still takes and finishes orders.
    order_saga::service::App::new(t.store.clone())
        .set_product("p-1", Some("1.00".parse().expect("price")), Some(5))
        .await
        .expect("stock");
    let created: Value = reqwest::Client::new()
        .post(format!("{url}/api/v1/orders"))
        .json(&crate::helpers::order_body(&[("p-1", 1)]))
        .send()
        .await
        .expect("POST")
        .json()
        .await
        .expect("json");
    let id = created["orderId"].as_str().expect("id").to_string();
    wait_until_all_end(&t.store, std::slice::from_ref(&id)).await;
    server.start_kill().expect("stop");
    let _ = server.wait().await;
    t.cleanup().await;
}

/// Runs `order-saga payment simulate` against the test's store and broker.
async fn simulate(t: &TestStore, prefix: &str, order_id: &str, args: &[&str]) {
    let output = crate::binary::order_saga(t)
        .envs(kafka_env(prefix))
        .args(["payment", "simulate", order_id])
        .args(args)
        .output()
        .await
        .expect("run payment simulate");
    assert!(
        output.status.success(),
        "payment simulate: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sent: Value = serde_json::from_slice(&output.stdout).expect("the event sent, as JSON");
    assert_eq!(sent["via"], "kafka", "{sent}");
}

async fn order_events(store: &Store, order_id: &str) -> Vec<String> {
    use cqrs_es::DomainEvent;
    store
        .load_events::<Order>(order_id)
        .await
        .expect("events")
        .iter()
        .map(|e| e.payload.event_type())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payment_results_from_the_broker_complete_cancel_expire_and_refund_and_every_new_topic_reads_back(
) {
    let _broker = broker_lock().await;
    let t = TestStore::new(Backend::Postgres).await;
    let prefix = format!("{}.", t.schema);
    let app = order_saga::service::App::new(t.store.clone());
    for product in ["p-1", "p-2"] {
        app.set_product(product, Some("5.00".parse().expect("price")), Some(100))
            .await
            .expect("stock");
    }
    // A payment wait short enough to expire during the test, long enough
    // for the four payments below to arrive well before it (the deadline
    // logic itself is tested on the manual clock).
    let mut env = kafka_env(&prefix);
    env.push(("PAYMENT_TIMEOUT".into(), "30s".into()));
    let (mut server, url) = serve_with(&t, &env).await;
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..6 {
        let created: Value = client
            .post(format!("{url}/api/v1/orders"))
            .json(&crate::helpers::order_body(&[("p-1", 1 + i), ("p-2", 2)]))
            .send()
            .await
            .expect("POST")
            .json()
            .await
            .expect("json");
        ids.push(created["orderId"].as_str().expect("id").to_string());
    }
    let within = Duration::from_secs(120);
    wait_until_in(
        &t.store,
        &ids,
        &[OrderStatus::PaymentWait],
        Instant::now(),
        within,
    )
    .await;
    // Paid (two), paid with another amount, failed; the last two expire.
    simulate(
        &t,
        &prefix,
        &ids[0],
        &["--result", "completed", "--method", "KAKAO_PAY"],
    )
    .await;
    simulate(&t, &prefix, &ids[1], &["--result", "completed"]).await;
    simulate(
        &t,
        &prefix,
        &ids[2],
        &["--result", "completed", "--amount", "1.00"],
    )
    .await;
    simulate(
        &t,
        &prefix,
        &ids[3],
        &["--result", "failed", "--reason", "limit exceeded"],
    )
    .await;
    let since = Instant::now();
    wait_until_in(
        &t.store,
        &ids[..2],
        &[OrderStatus::OrderCompleted],
        since,
        within,
    )
    .await;
    let cancelled = [OrderStatus::OrderCancelled];
    wait_until_in(&t.store, &ids[2..], &cancelled, since, within).await;
    // A payment arriving after the wait expired is refunded.
    simulate(&t, &prefix, &ids[5], &["--result", "completed"]).await;
    let deadline = Instant::now() + within;
    while !order_events(&t.store, &ids[5])
        .await
        .contains(&"PaymentRejected".to_string())
    {
        assert!(
            Instant::now() < deadline,
            "the late payment was never rejected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_relay(&t.store, &url).await;
    let metrics = metrics_text(&client, &url).await;
    server.start_kill().expect("stop");
    let _ = server.wait().await;
    for (outcome, count) in [
        ("PAID", 2),
        ("COMPLETED", 2),
        ("REJECTED", 2),
        ("FAILED", 1),
        ("EXPIRED", 3),
    ] {
        let line = format!("order_saga_payments_total{{outcome=\"{outcome}\"}} {count}");
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }

    let reasons: Vec<Option<CancelReason>> = {
        let mut reasons = Vec::new();
        for id in &ids[2..] {
            let (order, _) = t
                .store
                .load::<Order>(id)
                .await
                .expect("load")
                .expect("order");
            reasons.push(order.cancel_reason);
        }
        reasons
    };
    use CancelReason::{PaymentFailed, PaymentTimeout};
    assert_eq!(
        reasons,
        [
            Some(PaymentTimeout),
            Some(PaymentFailed),
            Some(PaymentTimeout),
            Some(PaymentTimeout)
        ]
    );
    let dead = t.store.dead_letters().await.expect("dead letters");
    assert!(
        dead.len() == 1 && dead[0].error.contains("differs from the order total"),
        "{dead:?}"
    );
    let expected = published_events(&t.store).await;
    let report = independent_reader(&prefix, expected).await;
    assert_clean(&report, expected);
    for (topic, count) in [
        ("order.payment.completed", 2),
        ("stock.confirmed", 2),
        ("order.completed", 2),
        ("stock.confirmation.failed", 2),
        ("order.expiration-notification", 3),
    ] {
        assert_eq!(report["per_topic"][topic], count, "{topic}: {report}");
    }
    println!(
        "payment topics read back by the independent client: {}",
        report["per_topic"]
    );
    t.cleanup().await;
}
