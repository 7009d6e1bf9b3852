//! Several instances of the real binary on one PostgreSQL schema, orders
//! sent round-robin over them, with the in-process bus and with the broker:
//! every saga ends, nothing is oversold, each effect is in the log once, each
//! notification reaches the customer's webhook once and no Kafka record is
//! published twice — and the same after the instance holding the
//! single-instance roles is killed (SIGKILL) mid-run, when the standbys take
//! over. Plus: a second `serve` on an embedded data directory in use is
//! refused.
//!
//! Each run prints the takeover time it measured; that is a measurement,
//! not an assertion.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use order_saga::store::Store;
use order_saga_domain::{Order, OrderStatus};
use serde_json::{json, Value};
use sqlx::Connection;
use tokio::process::Child;
use tokio::sync::Semaphore;

use crate::binary::serve_with;
use crate::e2e::{assert_outcome, order_lines, stock_half_the_demand, wait_until_all_end};
use crate::helpers::{create_order, order_body, Backend, TestStore};
use crate::kafka::{
    assert_clean, broker_lock, independent_reader, kafka_env, published_events, wait_for_relay,
};

const INSTANCES: usize = 3;
const ORDERS: usize = 600;

/// The customers' push endpoint: counts the POSTs per Idempotency-Key.
struct Webhook {
    url: String,
    received: Arc<Mutex<HashMap<String, usize>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl Webhook {
    async fn start() -> Self {
        use axum::{extract::State, http::HeaderMap, http::StatusCode, routing::post, Router};
        let received = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        let router = Router::new()
            .route(
                "/push",
                post(
                    |State(received): State<Arc<Mutex<HashMap<String, usize>>>>,
                     headers: HeaderMap| async move {
                        let key = headers
                            .get("Idempotency-Key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        *received.lock().expect("lock").entry(key).or_default() += 1;
                        StatusCode::NO_CONTENT
                    },
                ),
            )
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/push", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Webhook {
            url,
            received,
            _server: server,
        }
    }

    fn counts(&self) -> HashMap<String, usize> {
        self.received.lock().expect("lock").clone()
    }
}

/// The notifications the ended orders call for: two for an order waiting
/// for payment (confirmed, please pay), one for a cancelled one.
async fn expected_notifications(store: &Store, ids: &[String]) -> usize {
    let mut expected = 0;
    for id in ids {
        let status = store
            .load::<Order>(id)
            .await
            .expect("load")
            .and_then(|(o, _)| o.status);
        expected += match status {
            Some(OrderStatus::PaymentWait) => 2,
            _ => 1,
        };
    }
    expected
}

/// Waits until the webhook has heard of `expected` distinct notifications
/// (and a moment more, for repeats behind them); returns the counts.
async fn wait_for_notifications(webhook: &Webhook, expected: usize) -> HashMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let counts = webhook.counts();
        if counts.len() >= expected {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return webhook.counts();
        }
        assert!(
            Instant::now() < deadline,
            "{} of {expected} notifications arrived",
            counts.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POSTs every order whose slot is empty, round-robin over `urls`, each
/// with its own Idempotency-Key (so a retry after a lost answer is the same
/// order). Stops sending once `stop_after` orders are accepted.
async fn post_round_robin(
    urls: &[String],
    orders: &[Vec<(String, u32)>],
    ids: &mut [Option<String>],
    stop_after: Option<usize>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let permits = Arc::new(Semaphore::new(32));
    let mut accepted = ids.iter().flatten().count();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, lines) in orders.iter().enumerate() {
        if ids[i].is_some() {
            continue;
        }
        if stop_after.is_some_and(|n| accepted >= n) {
            break;
        }
        let permit = permits.clone().acquire_owned().await.expect("permit");
        while let Some(done) = tasks.try_join_next() {
            if let Some((i, id)) = done.expect("task") {
                ids[i] = Some(id);
                accepted += 1;
            }
        }
        let items: Vec<Value> = lines
            .iter()
            .map(|(p, q)| json!({"productId": p, "quantity": q}))
            .collect();
        let body = json!({"userId": "u-load", "storeId": "s-1", "items": items});
        let (client, url) = (client.clone(), urls[i % urls.len()].clone());
        tasks.spawn(async move {
            let _permit = permit;
            let response = client
                .post(format!("{url}/api/v1/orders"))
                .header("Idempotency-Key", format!("load-{i}"))
                .json(&body)
                .send()
                .await
                .ok()?;
            if response.status() != 201 {
                return None;
            }
            let created: Value = response.json().await.ok()?;
            Some((i, created["orderId"].as_str()?.to_string()))
        });
    }
    while let Some(done) = tasks.join_next().await {
        if let Some((i, id)) = done.expect("task") {
            ids[i] = Some(id);
        }
    }
}

/// `/readyz` of one instance: its roles, and whether it holds `role`.
async fn holds(client: &reqwest::Client, url: &str, role: &str) -> bool {
    let Ok(response) = client.get(format!("{url}/readyz")).send().await else {
        return false;
    };
    let Ok(ready) = response.json::<Value>().await else {
        return false;
    };
    ready["roles"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["role"] == role && r["held"] == true)
}

/// One metric's value in an instance's `/metrics` (0 when absent).
async fn metric(client: &reqwest::Client, url: &str, name: &str) -> f64 {
    let Ok(response) = client.get(format!("{url}/metrics")).send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bus {
    InProcess,
    Kafka,
}

struct Run {
    t: TestStore,
    webhook: Webhook,
    instances: Vec<(Child, String)>,
    prefix: String,
    bus: Bus,
}

impl Run {
    async fn start(bus: Bus) -> Self {
        let t = TestStore::new(Backend::Postgres).await;
        let webhook = Webhook::start().await;
        let prefix = format!("{}.", t.schema);
        // Small pools: three instances (and the other tests beside them)
        // share the test server's 100 connections.
        let mut env = vec![
            ("NOTIFY_WEBHOOK_URL".to_string(), webhook.url.clone()),
            ("DATABASE_POOL_SIZE".to_string(), "6".to_string()),
        ];
        if bus == Bus::Kafka {
            env.extend(kafka_env(&prefix));
        }
        let mut instances = Vec::new();
        for _ in 0..INSTANCES {
            instances.push(serve_with(&t, &env).await);
        }
        Run {
            t,
            webhook,
            instances,
            prefix,
            bus,
        }
    }

    fn urls(&self) -> Vec<String> {
        self.instances.iter().map(|(_, url)| url.clone()).collect()
    }

    /// The role whose holder the kill run kills: the relay with Kafka, the
    /// stock side's consumer in-process.
    fn role(&self) -> &'static str {
        match self.bus {
            Bus::Kafka => "relay",
            Bus::InProcess => "consumer.order-saga.stock",
        }
    }

    /// The index of the instance holding [`Run::role`].
    async fn holder(&self, client: &reqwest::Client) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (i, (_, url)) in self.instances.iter().enumerate() {
                if holds(client, url, self.role()).await {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "nobody holds {}", self.role());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the role's holder; returns when, and the survivors' relay
    /// counts before.
    async fn kill_holder(&mut self, client: &reqwest::Client) -> (Instant, Vec<f64>) {
        let holder = self.holder(client).await;
        let (mut child, _) = self.instances.remove(holder);
        let mut published_before = Vec::new();
        for url in self.urls() {
            published_before.push(metric(client, &url, "order_saga_relay_published_total").await);
        }
        let killed = Instant::now();
        child.start_kill().expect("SIGKILL");
        child.wait().await.expect("killed");
        (killed, published_before)
    }

    /// The time from the kill until a survivor held the role and, with
    /// Kafka, until it published its first record.
    async fn takeover(
        &self,
        client: &reqwest::Client,
        killed: Instant,
        published_before: &[f64],
    ) -> (Duration, Option<Duration>) {
        let (taker, taken) = loop {
            let mut found = None;
            for (i, url) in self.urls().iter().enumerate() {
                if holds(client, url, self.role()).await {
                    found = Some(i);
                }
            }
            if let Some(i) = found {
                break (i, killed.elapsed());
            }
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "no standby took {}",
                self.role()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if self.bus == Bus::InProcess {
            return (taken, None);
        }
        let url = &self.urls()[taker];
        loop {
            if metric(client, url, "order_saga_relay_published_total").await
                > published_before[taker]
            {
                return (taken, Some(killed.elapsed()));
            }
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "the new relay never published"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(mut self, kill: bool) {
        let orders: Vec<Vec<(String, u32)>> = order_lines().into_iter().take(ORDERS).collect();
        let stock = stock_half_the_demand(&self.t.store, &orders).await;
        let mut slots = vec![None; ORDERS];
        let mut failover = None;
        if kill {
            post_round_robin(&self.urls(), &orders, &mut slots, Some(ORDERS * 2 / 5)).await;
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("client");
            let (killed, before) = self.kill_holder(&client).await;
            // Orders keep coming while the standbys take over.
            let urls = self.urls();
            let (taken, ()) = tokio::join!(
                self.takeover(&client, killed, &before),
                post_round_robin(&urls, &orders, &mut slots, None),
            );
            failover = Some(taken);
        }
        // Orders whose answer the kill cut off are sent again, same key.
        for _ in 0..3 {
            post_round_robin(&self.urls(), &orders, &mut slots, None).await;
        }
        let ids: Vec<String> = slots
            .iter()
            .map(|s| s.clone().expect("every order accepted"))
            .collect();
        assert_eq!(
            ids.iter().collect::<HashSet<_>>().len(),
            ORDERS,
            "one order per Idempotency-Key"
        );
        wait_until_all_end(&self.t.store, &ids).await;
        assert_eq!(
            self.t
                .store
                .aggregate_ids("Order")
                .await
                .expect("ids")
                .len(),
            ORDERS,
            "no order made twice"
        );
        // Nothing oversold, every saga effect once in the log.
        assert_outcome(&self.t.store, &orders, &ids, &stock).await;

        let expected = expected_notifications(&self.t.store, &ids).await;
        let counts = wait_for_notifications(&self.webhook, expected).await;
        let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert_eq!(counts.len(), expected, "every notification arrived");
        // A kill can repeat only what the killed instance had claimed and
        // was sending at that instant (its claim lapses, the attempt is
        // made again): at most a batch of the notifier's.
        let allowed = if kill { 256 } else { 0 };
        assert!(
            repeated.len() <= allowed,
            "{} notifications POSTed more than once: {:?}",
            repeated.len(),
            repeated.iter().take(5).collect::<Vec<_>>()
        );

        let mut duplicates = 0;
        if self.bus == Bus::Kafka {
            let url = self.urls()[0].clone();
            // The relay lag metric is the relay holder's; any instance
            // reports the shared checkpoint.
            wait_for_relay(&self.t.store, &url).await;
            let events = published_events(&self.t.store).await;
            let report = independent_reader(&self.prefix, events).await;
            duplicates = report["duplicates"].as_array().map_or(0, Vec::len);
            if kill {
                assert_eq!(report["messages"], events + duplicates, "{report}");
                // What the killed relay had handed to the broker and not
                // yet checkpointed: at most its stretches in flight.
                assert!(duplicates <= 32 * 500, "{duplicates} published twice");
            } else {
                assert_clean(&report, events);
            }
        }
        println!(
            "MEASURED {INSTANCES} instances, {:?} bus{}: {ORDERS} orders, {expected} notifications ({} repeated), {duplicates} Kafka records published twice{}",
            self.bus,
            if kill { ", holder SIGKILLed" } else { "" },
            repeated.len(),
            match failover {
                Some((taken, published)) => format!(
                    "; role taken {} ms after the kill{}",
                    taken.as_millis(),
                    published
                        .map(|p| format!(", first record published after {} ms", p.as_millis()))
                        .unwrap_or_default()
                ),
                None => String::new(),
            }
        );
        kill_all(std::mem::take(&mut self.instances)).await;
        self.t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_the_in_process_bus_notify_once_and_apply_each_effect_once() {
    Run::start(Bus::InProcess).await.finish(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_the_in_process_bus_survive_the_consumers_holder_being_killed() {
    Run::start(Bus::InProcess).await.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_kafka_publish_each_record_once_and_notify_once() {
    let _broker = broker_lock().await;
    Run::start(Bus::Kafka).await.finish(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_kafka_fail_over_when_the_relay_leader_is_killed() {
    let _broker = broker_lock().await;
    Run::start(Bus::Kafka).await.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_an_embedded_data_directory_in_use_is_refused_naming_it() {
    let t = TestStore::new(Backend::Sqlite).await;
    let (mut first, _url) = serve_with(&t, &[]).await;
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_order-saga"))
        .env_remove("DATABASE_URL")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(t.env())
        .arg("serve")
        .output()
        .await
        .expect("run a second serve");
    assert!(!second.status.success(), "the second serve must not start");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&t.data_dir.display().to_string())
            && stderr.contains("in use by another order-saga process"),
        "names the directory: {stderr}"
    );
    // The operator's catalog command still works beside the service.
    let set = tokio::process::Command::new(env!("CARGO_BIN_EXE_order-saga"))
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .envs(t.env())
        .args(["product", "set", "p-1", "--price", "1.00", "--stock", "3"])
        .output()
        .await
        .expect("product set");
    assert!(
        set.status.success(),
        "product set beside the service: {}",
        String::from_utf8_lossy(&set.stderr)
    );
    let _ = first.start_kill();
    let _ = first.wait().await;
    t.cleanup().await;
}

/// The roles' `since` times an instance reports, by role.
/// Two instances on `t`'s schema (small pools), and their addresses.
async fn two_instances(t: &TestStore) -> (Vec<(Child, String)>, Vec<String>) {
    let env = vec![("DATABASE_POOL_SIZE".to_string(), "4".to_string())];
    let instances = vec![serve_with(t, &env).await, serve_with(t, &env).await];
    let urls = instances.iter().map(|(_, u)| u.clone()).collect();
    (instances, urls)
}

/// SIGKILLs every instance and waits for each to end.
async fn kill_all(instances: Vec<(Child, String)>) {
    for (mut child, _) in instances {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

async fn held_since(client: &reqwest::Client, url: &str) -> HashMap<String, String> {
    let Ok(response) = client.get(format!("{url}/readyz")).send().await else {
        return HashMap::new();
    };
    let ready: Value = response.json().await.unwrap_or_default();
    ready["roles"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["held"] == true)
        .filter_map(|r| {
            Some((
                r["role"].as_str()?.to_string(),
                r["since"].as_str()?.to_string(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_loses_its_postgresql_session_gives_its_roles_up_and_they_are_taken_again() {
    let t = TestStore::new(Backend::Postgres).await;
    let (instances, urls) = two_instances(&t).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let role = "projections";
    let before = loop {
        let mut held = Vec::new();
        for url in &urls {
            held.push(held_since(&client, url).await.remove(role));
        }
        if held.iter().flatten().count() == 1 {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The database ends the holder's leader session (as a failover of the
    // database, or an operator, would): its locks are free at once.
    let mut admin = sqlx::PgConnection::connect(&crate::helpers::postgres_url())
        .await
        .expect("admin");
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM (SELECT DISTINCT pid FROM pg_locks \
         WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
           AND classid::bigint = (hashtext($1)::bigint & 4294967295)) AS holders",
    )
    .bind(&t.schema)
    .fetch_all(&mut admin)
    .await
    .expect("terminate");
    assert_eq!(ended, [true], "one leader session holds the schema's roles");
    let lost = Instant::now();
    // Someone holds the role again, taken after the loss.
    loop {
        let mut now = Vec::new();
        for url in &urls {
            now.push(held_since(&client, url).await.remove(role));
        }
        let holders: Vec<_> = now.iter().flatten().collect();
        if holders.len() == 1 && !before.contains(&Some(holders[0].clone())) {
            println!(
                "MEASURED leader session lost: {role} held again after {} ms",
                lost.elapsed().as_millis()
            );
            break;
        }
        assert!(
            lost.elapsed() < Duration::from_secs(10),
            "{role} not taken over within 10 s: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the saga runs on: an order sent now ends.
    order_saga::service::App::new(t.store.clone())
        .set_product("p-1", Some("1.00".parse().expect("price")), Some(5))
        .await
        .expect("set product");
    let id = create_order(&client, &urls[1], &order_body(&[("p-1", 1)])).await;
    wait_until_all_end(&t.store, &[id]).await;
    kill_all(instances).await;
    t.cleanup().await;
}

/// An instance that does not apply the read models still streams an
/// order's status changes to its own subscribers, from the history the
/// applying instance wrote and then as that instance applies more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_an_instance_that_does_not_project_sees_every_status() {
    let t = TestStore::new(Backend::Postgres).await;
    let (instances, urls) = two_instances(&t).await;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let follower = loop {
        let mut held = Vec::new();
        for url in &urls {
            held.push(holds(&client, url, "projections").await);
        }
        if let [true, false] | [false, true] = held[..] {
            break held.iter().position(|h| !h).unwrap_or(0);
        }
        assert!(Instant::now() < deadline, "no single projections holder");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    order_saga::service::App::new(t.store.clone())
        .set_product("p-1", Some("1.00".parse().expect("price")), Some(5))
        .await
        .expect("set product");
    let id = create_order(&client, &urls[follower], &order_body(&[("p-1", 1)])).await;
    // Paid once it waits: the last two changes are applied while the
    // subscriber listens.
    let statuses = crate::read_side::statuses_over_websocket(&urls[follower], &t.store, &id).await;
    let statuses: Vec<&str> = statuses.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "ORDER_CREATED",
            "ORDER_CONFIRMED",
            "PAYMENT_WAIT",
            "PAYMENT_COMPLETED",
            "ORDER_COMPLETED"
        ]
    );
    kill_all(instances).await;
    t.cleanup().await;
}
