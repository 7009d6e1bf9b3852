//! Ceilings: what the platform under the service does at most on this
//! machine, measured in the same run as the service, each in a fresh
//! database (or topic).
//!
//! - PostgreSQL's commit ceiling: single-row autocommit INSERTs through
//!   sqlx (the service's driver) at 1 and at 8 connections.
//! - The append rate of plain postgres-es (its own schema, as its
//!   `db/init.sql` documents it) against ours (`Store::execute` on our
//!   migrated schema, with the global-log columns, while our sequencer
//!   numbers the log as the service's does), for one trivial aggregate.
//! - The broker: produce → consume of ~300-byte messages.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::time::Instant;

use super::admin::Admin;
use order_saga::saga::kafka::parse_properties;
use order_saga::store::{Store, SNAPSHOT_EVERY};

/// Connections of both event stores' pools (the service's default).
pub const APPEND_POOL_SIZE: u32 = 16;
/// Concurrent writers of the append benchmark, each on its own aggregate.
pub const APPEND_WRITERS: usize = 8;

/// postgres-es 0.5's schema as its `db/init.sql` documents it (events and
/// snapshots; no view table is needed here).
const POSTGRES_ES_SCHEMA: &str = "
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);";

/// The trivial aggregate of the append benchmark: one event per command.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Counter {
    pub value: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CounterCommand {
    Increment,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CounterEvent {
    Incremented { value: u64 },
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> String {
        "Incremented".to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the counter refused the command")]
pub struct CounterError;

impl Aggregate for Counter {
    const TYPE: &'static str = "BenchCounter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = CounterError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command {
            CounterCommand::Increment => {
                let value = self.value + 1;
                sink.write(CounterEvent::Incremented { value }, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            CounterEvent::Incremented { value } => self.value = value,
        }
    }
}

/// One measured rate: operations per second, or why there is none.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rate {
    pub per_second: Option<f64>,
    pub operations: u64,
    pub errors: u64,
    pub seconds: f64,
    pub error: Option<String>,
}

impl Rate {
    fn failed(error: String) -> Rate {
        Rate {
            error: Some(error),
            ..Rate::default()
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BrokerRate {
    pub messages: u64,
    pub received: u64,
    pub message_bytes: usize,
    pub partitions: i32,
    pub rate: Rate,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Ceilings {
    pub commit_1: Option<Rate>,
    pub commit_8: Option<Rate>,
    pub plain_append: Option<Rate>,
    pub our_append: Option<Rate>,
    pub broker: Option<BrokerRate>,
}

impl Ceilings {
    /// Our append rate ÷ plain postgres-es's.
    pub fn append_ratio(&self) -> Option<f64> {
        let ours = self.our_append.as_ref()?.per_second?;
        let plain = self.plain_append.as_ref()?.per_second?;
        (plain > 0.0).then(|| ours / plain)
    }
}

/// Runs `op(writer)` in a loop on `writers` concurrent tasks for
/// `duration`; counts what succeeded.
async fn closed_loop<F, Fut>(writers: usize, duration: Duration, op: F) -> Rate
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let op = op.clone();
        tasks.spawn(async move {
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            while Instant::now() < deadline {
                match op(w).await {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                        if errors > 1000 {
                            break;
                        }
                    }
                }
            }
            (ok, errors, first_error)
        });
    }
    let mut rate = Rate::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((ok, errors, first_error)) => {
                rate.operations += ok;
                rate.errors += errors;
                if rate.error.is_none() {
                    rate.error = first_error;
                }
            }
            Err(e) => rate.error = Some(format!("a writer failed: {e}")),
        }
    }
    rate.seconds = start.elapsed().as_secs_f64();
    if rate.operations > 0 {
        rate.per_second = Some(rate.operations as f64 / rate.seconds);
    }
    rate
}

/// Runs `body` on a fresh database, dropping it afterwards whatever happened.
async fn on_fresh_database<F, Fut>(admin: &Admin, body: F) -> Rate
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<Rate, String>>,
{
    let name = match admin.create_database().await {
        Ok(name) => name,
        Err(e) => return Rate::failed(e),
    };
    let rate = body(admin.url_of(&name)).await.unwrap_or_else(Rate::failed);
    if let Err(e) = admin.drop_database(&name).await {
        eprintln!("bench: {e}");
    }
    rate
}

/// Autocommit single-row INSERTs per second at `connections` connections.
pub async fn commit_ceiling(admin: &Admin, connections: u32, duration: Duration) -> Rate {
    on_fresh_database(admin, |url| async move {
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .min_connections(connections)
            .connect(&url)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        sqlx::raw_sql(
            "CREATE TABLE commit_probe (id bigserial PRIMARY KEY, payload text NOT NULL)",
        )
        .execute(&pool)
        .await
        .map_err(|e| format!("creating the table: {e}"))?;
        let writers = pool.clone();
        let rate = closed_loop(connections as usize, duration, move |_| {
            let pool = writers.clone();
            async move {
                sqlx::query("INSERT INTO commit_probe (payload) VALUES ($1)")
                    .bind("order-saga commit probe")
                    .execute(&pool)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        })
        .await;
        pool.close().await;
        Ok(rate)
    })
    .await
}

/// Plain postgres-es (its schema, its repository, cqrs-es's framework with
/// snapshots every [`SNAPSHOT_EVERY`] events, as our store takes them):
/// commands per second, each appending one event.
pub async fn plain_append(admin: &Admin, duration: Duration) -> Rate {
    on_fresh_database(admin, |url| async move {
        let pool = PgPoolOptions::new()
            .max_connections(APPEND_POOL_SIZE)
            .connect(&url)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        sqlx::raw_sql(POSTGRES_ES_SCHEMA)
            .execute(&pool)
            .await
            .map_err(|e| format!("creating postgres-es's tables: {e}"))?;
        let cqrs = std::sync::Arc::new(postgres_es::postgres_snapshot_cqrs::<Counter>(
            pool.clone(),
            vec![],
            SNAPSHOT_EVERY,
            (),
        ));
        let rate = closed_loop(APPEND_WRITERS, duration, move |w| {
            let cqrs = cqrs.clone();
            async move {
                cqrs.execute(&format!("counter-{w}"), CounterCommand::Increment)
                    .await
                    .map_err(|e| e.to_string())
            }
        })
        .await;
        pool.close().await;
        Ok(rate)
    })
    .await
}

/// Ours: the same aggregate and writers through `Store::execute` on our
/// migrated schema, while our sequencer numbers the log every 100 ms as
/// the service's does.
pub async fn our_append(admin: &Admin, duration: Duration) -> Rate {
    on_fresh_database(admin, |url| async move {
        let options: PgConnectOptions = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let store = Store::connect_postgres(options, APPEND_POOL_SIZE)
            .await
            .map_err(|e| e.to_string())?;
        store.migrate().await.map_err(|e| e.to_string())?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let sequencer = {
            let store = store.clone();
            tokio::spawn(async move {
                loop {
                    if let Err(e) = store.sequence_pending().await {
                        eprintln!("bench: our sequencer failed: {e}");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = stopped.changed() => break,
                    }
                }
            })
        };
        let writers = store.clone();
        let rate = closed_loop(APPEND_WRITERS, duration, move |w| {
            let store = writers.clone();
            async move {
                store
                    .execute::<Counter>(
                        &format!("counter-{w}"),
                        CounterCommand::Increment,
                        &(),
                        HashMap::new(),
                    )
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        })
        .await;
        let _ = stop.send(true);
        let _ = sequencer.await;
        store.close().await;
        Ok(rate)
    })
    .await
}

/// Topic partitions of the suite's Kafka runs and of the broker ceiling.
/// The test broker answers one request at a time per connection, so a
/// produce round costs a request per partition: with 6 partitions on each
/// of the 7 topics the relay's batches waited ~100 ms for their
/// acknowledgements at 200 orders/s, with 1 about 10 ms.
pub const BENCH_KAFKA_PARTITIONS: i32 = 1;

/// Consumer settings of the suite's Kafka runs and of the broker ceiling:
/// the test broker holds every fetch for the whole wait, data or not
/// (tansu 0.6.0 reads, then sleeps what is left of the wait), so
/// librdkafka's default wait (500 ms) added ~250 ms to every hop.
pub const BENCH_KAFKA_CONSUMER_CONFIG: &str = "fetch.wait.max.ms=10";

/// Producer settings of the suite's Kafka runs: the test broker stores
/// each produce batch as one object and lists all of a partition's
/// objects on every fetch that finds data, so its CPU grows with the
/// batches stored. With the service's 1 ms linger it reached ~75 % of a
/// core 20 s into a run at 200 orders/s and the machine saturated below
/// 400/s; 10 ms keeps a topic's batches to ~100 a second.
pub const BENCH_KAFKA_PRODUCER_CONFIG: &str = "linger.ms=10";

/// Producer settings of the broker ceiling: the service's producer
/// defaults (idempotent, acks=all, no compression), then the suite's
/// ([`BENCH_KAFKA_PRODUCER_CONFIG`]).
pub const BROKER_PRODUCER_CONFIG: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "1"),
    ("compression.type", "none"),
    ("message.timeout.ms", "120000"),
];

/// Produces `messages` ~300-byte messages with random keys to a fresh
/// topic of [`BENCH_KAFKA_PARTITIONS`] while one consumer (as the service's
/// in the suite) reads them from the beginning:
/// messages per second from the first send to the last receipt.
pub async fn broker_rate(brokers: &str, messages: u64, timeout: Duration) -> BrokerRate {
    let mut result = BrokerRate {
        messages,
        received: 0,
        message_bytes: 300,
        partitions: BENCH_KAFKA_PARTITIONS,
        rate: Rate::default(),
    };
    let topic = format!(
        "bench-ceiling-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    match produce_consume(brokers, &topic, messages, timeout).await {
        Ok((received, seconds)) => {
            result.received = received;
            result.rate.operations = received;
            result.rate.seconds = seconds;
            if received > 0 && seconds > 0.0 {
                result.rate.per_second = Some(received as f64 / seconds);
            }
            if received < messages {
                result.rate.error = Some(format!(
                    "only {received} of {messages} messages arrived within {}s",
                    timeout.as_secs()
                ));
            }
        }
        Err(e) => result.rate.error = Some(e),
    }
    delete_topics(brokers, |name| name == topic).await;
    result
}

async fn produce_consume(
    brokers: &str,
    topic: &str,
    messages: u64,
    timeout: Duration,
) -> Result<(u64, f64), String> {
    let broker = |e: KafkaError| format!("broker {brokers}: {e}");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(broker)?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let created = admin
        .create_topics(
            &[NewTopic::new(
                topic,
                BENCH_KAFKA_PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &options,
        )
        .await
        .map_err(broker)?;
    for outcome in created {
        if let Err((name, code)) = outcome {
            return Err(format!("creating topic {name}: {code}"));
        }
    }
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}.consumer"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    for (k, v) in parse_properties("BENCH_KAFKA_CONSUMER_CONFIG", BENCH_KAFKA_CONSUMER_CONFIG)? {
        config.set(k, v);
    }
    let consumer: StreamConsumer = config.create().map_err(broker)?;
    let mut partitions = TopicPartitionList::new();
    for p in 0..BENCH_KAFKA_PARTITIONS {
        partitions
            .add_partition_offset(topic, p, Offset::Beginning)
            .map_err(broker)?;
    }
    consumer.assign(&partitions).map_err(broker)?;
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in BROKER_PRODUCER_CONFIG {
        config.set(*k, *v);
    }
    for (k, v) in parse_properties("BENCH_KAFKA_PRODUCER_CONFIG", BENCH_KAFKA_PRODUCER_CONFIG)? {
        config.set(k, v);
    }
    let producer: FutureProducer = config.create().map_err(broker)?;

    let start = Instant::now();
    let deadline = start + timeout;
    let consuming = tokio::spawn(async move {
        let (mut received, mut last, mut errors) = (0u64, start, 0u32);
        while received < messages {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(_)) => {
                    received += 1;
                    last = Instant::now();
                }
                Ok(Err(_)) if errors < 1000 => errors += 1,
                _ => break,
            }
        }
        (received, (last - start).as_secs_f64())
    });
    let payload = vec![b'x'; 300];
    let mut key = 0x2545_F491_4F6C_DD1Du64;
    'send: for _ in 0..messages {
        key ^= key << 13;
        key ^= key >> 7;
        key ^= key << 17;
        let key_text = format!("{key:016x}");
        loop {
            let record = FutureRecord::to(topic).key(&key_text).payload(&payload);
            match producer.send_result(record) {
                // The delivery report is not needed: the consumer counts.
                Ok(delivery) => {
                    drop(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if Instant::now() >= deadline {
                        break 'send;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => {
                    consuming.abort();
                    return Err(broker(e));
                }
            }
        }
    }
    let outcome = consuming
        .await
        .map_err(|e| format!("the consumer failed: {e}"));
    drop(producer);
    outcome
}

/// Deletes the broker's topics whose name `matches`, best effort (the test
/// broker keeps topics in memory).
pub async fn delete_topics(brokers: &str, matches: impl Fn(&str) -> bool) {
    let Ok(consumer) = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create::<rdkafka::consumer::BaseConsumer>()
    else {
        return;
    };
    let names: Vec<String> = match tokio::task::spawn_blocking(move || {
        consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|m| {
                m.topics()
                    .iter()
                    .map(|t| t.name().to_string())
                    .collect::<Vec<_>>()
            })
    })
    .await
    {
        Ok(Ok(names)) => names.into_iter().filter(|n| matches(n)).collect(),
        _ => return,
    };
    if names.is_empty() {
        return;
    }
    let Ok(admin) = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let _ = admin.delete_topics(&refs, &options).await;
}
