//! `order-saga-bench`: an open-loop load generator against a running
//! instance over HTTP.
//!
//! Orders are sent at a fixed arrival rate whatever the latency — each one
//! at its scheduled instant, its acceptance latency counted from that
//! instant — so slow answers cannot hide behind fewer requests (no
//! coordinated omission). Saga latency is read afterwards from the read
//! model's recorded-at timestamps (created → PAYMENT_WAIT or cancelled).
//!
//! `order-saga-bench --suite` ([`suite`]) runs whole scenarios with this
//! generator against instances it starts itself, measures the platform's
//! [`ceilings`] and writes BENCHMARKS.md ([`report`]).

pub mod admin;
pub mod ceilings;
pub mod child;
pub mod cli;
pub mod report;
pub mod results;
pub mod suite;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, Utc};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The instance set up and queried (the read model).
    pub url: String,
    /// Where the orders go, round-robin (several instances on one store);
    /// empty: `url`.
    pub order_urls: Vec<String>,
    /// Orders per second offered.
    pub rate: f64,
    pub duration: Duration,
    pub products: usize,
    /// Stock each product gets with `setup`.
    pub stock: u32,
    /// Items per order: 1 to this many distinct products.
    pub max_items: usize,
    /// Share of orders (0..=1) whose first item is the hot product.
    pub hot: f64,
    /// How long to wait for the sagas to finish after the last order.
    pub settle: Duration,
    /// Create the products first (through GraphQL `setProduct`).
    pub setup: bool,
    /// The HS256 secret of an instance started with `--auth jwt`: the
    /// generator then signs an operator token for its set-up and queries,
    /// and every order carries a customer token of the run's user.
    pub jwt_secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    pub offered_rate: f64,
    /// Accepted orders per second of the sending window.
    pub achieved_rate: f64,
    /// The sending window: first scheduled order to last answer, seconds.
    pub window_s: f64,
    /// Finished sagas per second, from the first order's scheduled instant
    /// to the last saga's end (recorded-at): the rate the service really
    /// processed, backlog included.
    pub saga_rate: f64,
    pub sent: u64,
    pub accepted: u64,
    pub failed: u64,
    /// POST → 201, from each order's scheduled instant.
    pub acceptance: Percentiles,
    /// How late the generator itself sent each order (scheduled instant →
    /// the request starting): the generator's own error, included in
    /// `acceptance`; it should stay far below it.
    pub send_lag: Percentiles,
    /// OrderCreated → PaymentWaitStarted / OrderCancelled (recorded-at).
    pub saga: Percentiles,
    pub payment_wait: u64,
    pub cancelled: u64,
    /// Orders not finished when the settle time ran out.
    pub unfinished: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("--rate, --duration, --products and --items must be positive")]
    Settings,
    #[error("{0}")]
    Http(String),
    #[error("signing a token: {0}")]
    Token(String),
}

/// A small deterministic generator, so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

async fn graphql(
    client: &reqwest::Client,
    url: &str,
    query: &str,
    variables: Value,
) -> Result<Value, BenchError> {
    let response: Value = client
        .post(format!("{url}/graphql"))
        .json(&json!({"query": query, "variables": variables}))
        .send()
        .await
        .map_err(|e| BenchError::Http(e.to_string()))?
        .json()
        .await
        .map_err(|e| BenchError::Http(e.to_string()))?;
    if !response["errors"].is_null() {
        return Err(BenchError::Http(format!("GraphQL: {}", response["errors"])));
    }
    Ok(response["data"].clone())
}

pub async fn run(config: &BenchConfig) -> Result<BenchReport, BenchError> {
    if !config.rate.is_finite()
        || config.rate <= 0.0
        || config.duration.is_zero()
        || config.products == 0
        || config.max_items == 0
    {
        return Err(BenchError::Settings);
    }
    // This run's orders are told apart by their user.
    let user = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let (client, orders_client) = match &config.jwt_secret {
        Some(secret) => (
            http_client(Some(token(secret, "order-saga-bench", &["operator"])?))?,
            http_client(Some(token(secret, &user, &[])?))?,
        ),
        None => {
            let client = http_client(None)?;
            (client.clone(), client)
        }
    };
    if config.setup {
        for i in 0..config.products {
            graphql(
                &client,
                &config.url,
                "mutation($id: ID!, $stock: Int!) { setProduct(productId: $id, price: \"10.00\", stock: $stock) { productId } }",
                json!({"id": product_id(i), "stock": config.stock}),
            )
            .await?;
        }
    }
    let created_before = saga_counts(&client, &config.url).await?.0;
    let total = (config.rate * config.duration.as_secs_f64())
        .round()
        .max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / config.rate);
    let started_at = Utc::now();
    let results = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total as usize)));
    let (products, max_items, hot) = (config.products, config.max_items, config.hot);
    let order_urls: Arc<[String]> = if config.order_urls.is_empty() {
        Arc::new([config.url.clone()])
    } else {
        config.order_urls.iter().cloned().collect()
    };
    let runtime = tokio::runtime::Handle::current();
    let (sent, client_, user_) = (results.clone(), orders_client, user.clone());
    // The orders leave on schedule from a thread of their own: a tokio
    // timer ticks in whole milliseconds and a parked runtime wakes later
    // still, which sent orders 1.3–1.7 ms late (p50) — time the service
    // never saw, counted as its latency. A thread's sleep wakes within tens
    // of microseconds. Each request still runs on the runtime, and its
    // latency still counts from its scheduled instant.
    let pacer = tokio::task::spawn_blocking(move || {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let start = std::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..total {
            let body = order_body(&mut rng, &user_, products, max_items, hot);
            let due = start + interval.mul_f64(i as f64);
            std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            // Finished requests leave the set as we go (long runs send millions).
            while tasks.try_join_next().is_some() {}
            let url = order_urls[i as usize % order_urls.len()].clone();
            let (client, results) = (client_.clone(), sent.clone());
            let request = async move {
                let lag = due.elapsed();
                let outcome = client
                    .post(format!("{url}/api/v1/orders"))
                    .json(&body)
                    .send()
                    .await;
                let latency = due.elapsed();
                let accepted = matches!(&outcome, Ok(r) if r.status() == 201);
                if let Ok(mut results) = results.lock() {
                    results.push((accepted, latency, lag));
                }
            };
            tasks.spawn_on(request, &runtime);
        }
        (tasks, start)
    });
    let (mut tasks, start) = pacer
        .await
        .map_err(|e| BenchError::Http(format!("the pacing thread failed: {e}")))?;
    while tasks.join_next().await.is_some() {}
    let window = start.elapsed().as_secs_f64();
    let results = results
        .lock()
        .map_err(|_| BenchError::Http("a request task panicked".into()))?
        .clone();

    let histogram = || Histogram::<u64>::new(3).map_err(|e| BenchError::Http(e.to_string()));
    let (mut acceptance, mut send_lag) = (histogram()?, histogram()?);
    let mut accepted = 0;
    for (ok, latency, lag) in &results {
        let _ = send_lag.record(lag.as_micros() as u64);
        if *ok {
            accepted += 1;
            let _ = acceptance.record(latency.as_micros() as u64);
        }
    }
    let settled = settle(&client, config, &user, accepted, created_before).await?;
    let done = settled.payment_wait + settled.cancelled;
    let saga_rate = match settled.last_end {
        Some(end) => {
            let span = (end.with_timezone(&Utc) - started_at).num_microseconds();
            let seconds = span.unwrap_or(0) as f64 / 1e6;
            if seconds > 0.0 {
                done as f64 / seconds
            } else {
                0.0
            }
        }
        None => 0.0,
    };
    Ok(BenchReport {
        offered_rate: config.rate,
        achieved_rate: accepted as f64 / window,
        window_s: window,
        saga_rate,
        sent: total,
        accepted,
        failed: total - accepted,
        acceptance: Percentiles::of(&acceptance),
        send_lag: Percentiles::of(&send_lag),
        saga: Percentiles::of(&settled.saga),
        payment_wait: settled.payment_wait,
        cancelled: settled.cancelled,
        unfinished: settled.unfinished,
    })
}

/// The generator's HTTP client; with a token, every request bears it.
fn http_client(token: Option<String>) -> Result<reqwest::Client, BenchError> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| BenchError::Token(e.to_string()))?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .default_headers(headers)
        .build()
        .map_err(|e| BenchError::Http(e.to_string()))
}

/// An HS256 token for `sub`, as `order-saga token` signs it.
fn token(secret: &str, sub: &str, roles: &[&str]) -> Result<String, BenchError> {
    order_saga::auth::TokenArgs::new(secret, sub, roles)
        .mint()
        .map_err(|e| BenchError::Token(e.to_string()))
}

/// One order of `user`'s: 1 to `max_items` distinct products of
/// `products`, the first the hot product (the first) with probability `hot`.
fn order_body(rng: &mut Rng, user: &str, products: usize, max_items: usize, hot: f64) -> Value {
    let mut items: Vec<Value> = Vec::new();
    let count = 1 + rng.below(max_items.min(products));
    if rng.unit() < hot {
        items.push(json!({"productId": product_id(0), "quantity": 1}));
    }
    while items.len() < count {
        let p = product_id(rng.below(products));
        if items.iter().all(|item| item["productId"] != p.as_str()) {
            items.push(json!({"productId": p, "quantity": 1 + rng.below(2)}));
        }
    }
    json!({"userId": user, "storeId": "bench", "items": items})
}

/// The generator's products.
fn product_id(i: usize) -> String {
    format!("bench-p-{i}")
}

/// What [`settle`] saw of a run's sagas.
struct Settled {
    saga: Histogram<u64>,
    payment_wait: u64,
    cancelled: u64,
    unfinished: u64,
    /// When the last finished saga ended.
    last_end: Option<DateTime<FixedOffset>>,
}

/// The instance's orders created and sagas in progress, from the read
/// model's counters: cheap to ask often, unlike listing the orders.
async fn saga_counts(client: &reqwest::Client, url: &str) -> Result<(u64, u64), BenchError> {
    let data = graphql(
        client,
        url,
        "{ sagaStats { ordersCreated inProgress } }",
        json!({}),
    )
    .await?;
    let stats = &data["sagaStats"];
    Ok((
        stats["ordersCreated"].as_u64().unwrap_or(0),
        stats["inProgress"].as_u64().unwrap_or(0),
    ))
}

/// Waits for this run's sagas to finish (watching the counters, so that
/// waiting does not load the instance) and collects their durations.
async fn settle(
    client: &reqwest::Client,
    config: &BenchConfig,
    user: &str,
    accepted: u64,
    created_before: u64,
) -> Result<Settled, BenchError> {
    let deadline = Instant::now() + config.settle;
    loop {
        let (created, in_progress) = saga_counts(client, &config.url).await?;
        if created.saturating_sub(created_before) >= accepted && in_progress == 0 {
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let mut saga = Histogram::<u64>::new(3).map_err(|e| BenchError::Http(e.to_string()))?;
        let (mut waiting, mut cancelled, mut seen) = (0, 0, 0);
        let mut last_end: Option<DateTime<FixedOffset>> = None;
        let mut after: Option<String> = None;
        loop {
            let data = graphql(
                client,
                &config.url,
                "query($user: String, $after: String) { orders(first: 100, after: $after, filter: {userId: $user}) { edges { node { status createdAt paymentWaitAt cancelledAt } } pageInfo { hasNextPage endCursor } } }",
                json!({"user": user, "after": after}),
            )
            .await?;
            let orders = &data["orders"];
            for edge in orders["edges"].as_array().into_iter().flatten() {
                seen += 1;
                let node = &edge["node"];
                let end = match node["status"].as_str() {
                    Some("PAYMENT_WAIT") => {
                        waiting += 1;
                        &node["paymentWaitAt"]
                    }
                    Some("ORDER_CANCELLED") => {
                        cancelled += 1;
                        &node["cancelledAt"]
                    }
                    _ => continue,
                };
                let parse = |v: &Value| {
                    v.as_str()
                        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                };
                if let (Some(created), Some(end)) = (parse(&node["createdAt"]), parse(end)) {
                    last_end = Some(last_end.map_or(end, |last| last.max(end)));
                    let us = (end - created).num_microseconds().unwrap_or(0).max(0) as u64;
                    let _ = saga.record(us);
                }
            }
            if orders["pageInfo"]["hasNextPage"] != true {
                break;
            }
            after = orders["pageInfo"]["endCursor"].as_str().map(str::to_string);
        }
        let done = waiting + cancelled;
        // The counters and the listing are one read model: after the wait
        // above this pass normally finds every saga finished.
        if (seen >= accepted && done >= accepted) || Instant::now() >= deadline {
            return Ok(Settled {
                saga,
                payment_wait: waiting,
                cancelled,
                unfinished: accepted.saturating_sub(done),
                last_end,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "offered {:.0}/s, achieved {:.1}/s: {} sent, {} accepted, {} failed",
            self.offered_rate, self.achieved_rate, self.sent, self.accepted, self.failed
        )?;
        writeln!(f, "sagas finished at {:.1}/s", self.saga_rate)?;
        writeln!(
            f,
            "sagas: {} PAYMENT_WAIT, {} ORDER_CANCELLED, {} unfinished",
            self.payment_wait, self.cancelled, self.unfinished
        )?;
        writeln!(
            f,
            "{:<12} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "latency ms", "count", "p50", "p90", "p99", "p99.9", "max"
        )?;
        for (name, p) in [
            ("acceptance", &self.acceptance),
            ("send lag", &self.send_lag),
            ("saga", &self.saga),
        ] {
            writeln!(
                f,
                "{:<12} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                name, p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
            )?;
        }
        Ok(())
    }
}
