//! The Kafka transport (used when `KAFKA_BROKERS` is set): a relay that
//! publishes integration events from the global log, and consumer groups
//! that read them, behind the same seam as the in-process transport.
//!
//! - Topics are created at start (admin client), keyed by `orderId`, values
//!   in Avro single-object encoding, headers `eventId`, `eventType`,
//!   `schemaFingerprint`.
//! - The relay's producer is idempotent with `acks=all`; it advances its
//!   checkpoint (`relay.kafka`) only after the broker acknowledged.
//! - Consumers (groups `order-saga.stock`, `.order`, `.notifier`) store a
//!   batch's offsets only after the handlers' effects are stored; librdkafka
//!   commits the stored offsets every 100 ms. Messages that cannot be
//!   handled also go to `<topic>.dlq` with the error in a header.
//!
//! Every librdkafka property can be overridden (`KAFKA_PRODUCER_CONFIG`,
//! `KAFKA_CONSUMER_CONFIG`); see ARCHITECTURE.md for the test broker's.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::avro::Contract;
use super::integration::{self, IntegrationEvent, Topic};
use super::transport::{
    DeadLetterSink, Delivery, Offset as DeliveryOffset, Subscription, Transport, TransportError,
    Undecodable,
};
use crate::health::{pause, pause_until_append, Heartbeat, Shutdown, Tasks};
use crate::store::Store;

/// The relay's checkpoint in the global log.
pub const RELAY_CHECKPOINT: &str = "relay.kafka";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    pub brokers: String,
    pub partitions: i32,
    /// Put before every topic and group name (for test isolation; empty in
    /// production).
    pub prefix: String,
    pub producer: Vec<(String, String)>,
    pub consumer: Vec<(String, String)>,
}

/// Parses `key=value,key=value` (librdkafka properties); `setting` names the
/// setting in the error.
pub fn parse_properties(setting: &str, text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!(
                "{setting}: expected key=value[,key=value...], got '{pair}'"
            )),
        })
        .collect()
}

fn broker(e: impl std::fmt::Display) -> TransportError {
    TransportError::Broker(e.to_string())
}

impl KafkaConfig {
    pub fn topic(&self, topic: Topic) -> String {
        format!("{}{}", self.prefix, topic.as_str())
    }

    fn topic_of(&self, name: &str) -> Option<Topic> {
        name.strip_prefix(&self.prefix)
            .and_then(|t| Topic::from_str(t).ok())
    }

    fn client(&self, overrides: &[(String, String)], defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        for (k, v) in overrides {
            config.set(k, v);
        }
        config
    }

    fn producer(&self) -> Result<FutureProducer, TransportError> {
        self.client(
            &self.producer,
            &[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                // Ride out broker outages of minutes; the relay's checkpoint
                // waits for the acknowledgement.
                ("message.timeout.ms", "300000"),
                ("compression.type", "none"),
                ("linger.ms", "1"),
            ],
        )
        .create()
        .map_err(broker)
    }
}

/// Creates every topic and its dead-letter topic, if missing.
pub async fn create_topics(config: &KafkaConfig) -> Result<(), TransportError> {
    let admin: AdminClient<DefaultClientContext> =
        config.client(&[], &[]).create().map_err(broker)?;
    let mut names = Vec::new();
    for topic in Topic::ALL {
        names.push(config.topic(topic));
        names.push(format!("{}.dlq", config.topic(topic)));
    }
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| NewTopic::new(name, config.partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin
        .create_topics(&topics, &options)
        .await
        .map_err(broker)?
    {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(broker(format!("creating topic {name}: {code}"))),
        }
    }
    Ok(())
}

pub struct KafkaTransport {
    config: KafkaConfig,
    contract: Arc<Contract>,
    dead_letters: Arc<KafkaDeadLetters>,
}

impl KafkaTransport {
    /// Connects, creating the topics.
    pub async fn connect(
        config: KafkaConfig,
        contract: Arc<Contract>,
    ) -> Result<Self, TransportError> {
        create_topics(&config).await?;
        let dead_letters = Arc::new(KafkaDeadLetters {
            producer: config.producer()?,
        });
        Ok(KafkaTransport {
            config,
            contract,
            dead_letters,
        })
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    async fn subscribe(
        &self,
        group: &str,
        topics: &[Topic],
    ) -> Result<Box<dyn Subscription>, TransportError> {
        let consumer: StreamConsumer = self
            .config
            .client(
                &self.config.consumer,
                &[
                    ("group.id", &format!("{}{group}", self.config.prefix)),
                    // At-least-once: the saga stores a batch's offsets
                    // once its effects are stored, and librdkafka commits
                    // what was stored every 100 ms (and on close).
                    ("enable.auto.commit", "true"),
                    ("auto.commit.interval.ms", "100"),
                    ("enable.auto.offset.store", "false"),
                    ("auto.offset.reset", "earliest"),
                    ("session.timeout.ms", "10000"),
                ],
            )
            .create()
            .map_err(broker)?;
        let names: Vec<String> = topics.iter().map(|t| self.config.topic(*t)).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        consumer.subscribe(&refs).map_err(broker)?;
        Ok(Box::new(KafkaSubscription {
            consumer,
            config: self.config.clone(),
            contract: self.contract.clone(),
        }))
    }

    fn dead_letters(&self) -> Option<Arc<dyn DeadLetterSink>> {
        Some(self.dead_letters.clone())
    }
}

struct KafkaSubscription {
    consumer: StreamConsumer,
    config: KafkaConfig,
    contract: Arc<Contract>,
}

impl KafkaSubscription {
    fn delivery(&self, message: &rdkafka::message::BorrowedMessage<'_>) -> Delivery {
        let raw = message.payload().unwrap_or_default().to_vec();
        let key = message
            .key()
            .map(|k| String::from_utf8_lossy(k).to_string())
            .unwrap_or_default();
        let event = match self.config.topic_of(message.topic()) {
            Some(topic) => self.contract.decode(topic, &raw),
            None => Err(format!("unknown topic {}", message.topic())),
        };
        let event_id = message.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == "eventId")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).to_string())
        });
        Delivery {
            topic: message.topic().to_string(),
            key,
            offset: DeliveryOffset {
                partition: message.partition(),
                offset: message.offset(),
            },
            event: event.map_err(|error| Undecodable {
                error,
                payload: String::from_utf8_lossy(&raw).to_string(),
                event_id,
            }),
            raw,
        }
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn poll(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError> {
        let mut deliveries = Vec::new();
        match tokio::time::timeout(Duration::from_millis(50), self.consumer.recv()).await {
            Err(_) => return Ok(deliveries),
            Ok(Err(e)) => return Err(broker(e)),
            Ok(Ok(message)) => deliveries.push(self.delivery(&message)),
        }
        while deliveries.len() < max {
            match self.consumer.recv().now_or_never() {
                Some(Ok(message)) => deliveries.push(self.delivery(&message)),
                Some(Err(e)) => return Err(broker(e)),
                None => break,
            }
        }
        Ok(deliveries)
    }

    async fn commit(&mut self, handled: &[Delivery]) -> Result<(), TransportError> {
        let mut next: HashMap<(&str, i32), i64> = HashMap::new();
        for d in handled {
            let entry = next
                .entry((d.topic.as_str(), d.offset.partition))
                .or_insert(0);
            *entry = (*entry).max(d.offset.offset + 1);
        }
        if next.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            list.add_partition_offset(topic, partition, Offset::Offset(offset))
                .map_err(broker)?;
        }
        // Stored, committed by librdkafka within 100 ms: a commit per batch
        // was most of the broker's work under load (and a synchronous one
        // would block a runtime thread for a round trip). A crash before the
        // commit delivers the stretch since again; handlers are idempotent.
        self.consumer.store_offsets(&list).map_err(broker)
    }

    async fn rewind(&mut self) -> Result<(), TransportError> {
        let assignment = self.consumer.assignment().map_err(broker)?;
        let committed = self
            .consumer
            .committed_offsets(assignment, Duration::from_secs(10))
            .map_err(broker)?;
        for element in committed.elements() {
            let offset = match element.offset() {
                Offset::Offset(n) => Offset::Offset(n),
                _ => Offset::Beginning,
            };
            self.consumer
                .seek(
                    element.topic(),
                    element.partition(),
                    offset,
                    Duration::from_secs(10),
                )
                .map_err(broker)?;
        }
        Ok(())
    }

    fn waits(&self) -> bool {
        true
    }
}

/// Sends messages that could not be handled to `<topic>.dlq`.
pub struct KafkaDeadLetters {
    producer: FutureProducer,
}

#[async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    async fn send(&self, delivery: &Delivery, error: &str) -> Result<(), TransportError> {
        let topic = format!("{}.dlq", delivery.topic);
        let record = FutureRecord::to(&topic)
            .key(&delivery.key)
            .payload(&delivery.raw)
            .headers(OwnedHeaders::new().insert(Header {
                key: "error",
                value: Some(error),
            }));
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| broker(e))
    }
}

/// Publishes the global log's integration events to Kafka.
///
/// Stretches of the log are handed to the producer without waiting for the
/// broker (at most [`RELAY_IN_FLIGHT`] unacknowledged); a stretch counts as
/// published when the broker acknowledged it and every stretch before it.
/// The published position lives in memory; the durable checkpoint follows
/// it, written at most every [`RELAY_SAVE_EVERY`] while busy and at once
/// when everything is published. A failure starts again from the durable
/// checkpoint, so messages published since go out again (at-least-once;
/// handlers are idempotent). Order within a partition is the producer's:
/// idempotent, so retries never reorder.
pub struct Relay {
    store: Store,
    config: KafkaConfig,
    contract: Arc<Contract>,
    producer: FutureProducer,
    heartbeat: Heartbeat,
}

/// How often, at most, a busy relay writes its durable checkpoint.
pub const RELAY_SAVE_EVERY: Duration = Duration::from_millis(100);

/// Stretches of the log handed to the producer and not yet acknowledged, at
/// most; then the relay waits for the oldest.
pub const RELAY_IN_FLIGHT: usize = 32;

/// A busy relay reads the log at most this often: appends in between go
/// out together (one produce batch per topic instead of one per append).
pub const RELAY_GATHER: Duration = Duration::from_millis(5);

/// A stretch's acknowledgements: its last log position and how many
/// messages it held, once the broker took all of them.
type Stretch = BoxFuture<'static, Result<(i64, u64), TransportError>>;

#[derive(Default)]
struct Progress {
    /// The last log position handed to the producer (`None`: start from
    /// the durable checkpoint).
    sent: Option<i64>,
    /// When the last stretch was sent.
    sent_at: Option<Instant>,
    /// Stretches sent and not yet acknowledged, oldest first.
    in_flight: FuturesOrdered<Stretch>,
    /// The last position published (acknowledged, with all before it).
    published: i64,
    /// The last position written to the store, and when.
    saved: i64,
    saved_at: Option<Instant>,
}

/// What a relay step found.
enum Step {
    /// It sent or settled something: look again at once.
    Busy,
    /// Nothing new in the log, acknowledgements pending.
    Waiting,
    /// Nothing new and everything published.
    Idle,
    /// Sent a moment ago: wait this long before reading the log again.
    Gather(Duration),
}

impl Relay {
    pub fn new(
        store: Store,
        config: KafkaConfig,
        contract: Arc<Contract>,
    ) -> Result<Arc<Self>, TransportError> {
        Ok(Arc::new(Relay {
            producer: config.producer()?,
            store,
            config,
            contract,
            heartbeat: Heartbeat::default(),
        }))
    }

    /// Beats while the broker acknowledges (or answers, when idle).
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Settles what the broker acknowledged meanwhile, then hands the next
    /// stretch of the log to the producer (after waiting for the oldest
    /// stretch if too many are in flight).
    async fn step(&self, progress: &mut Progress) -> Result<Step, TransportError> {
        while let Some(Some(done)) = progress.in_flight.next().now_or_never() {
            self.settle(progress, done).await?;
        }
        if progress.in_flight.len() >= RELAY_IN_FLIGHT {
            if let Some(done) = progress.in_flight.next().await {
                self.settle(progress, done).await?;
            }
            return Ok(Step::Busy);
        }
        let since = progress.sent_at.map(|at| at.elapsed());
        if let Some(wait) = since.and_then(|s| RELAY_GATHER.checked_sub(s)) {
            return Ok(Step::Gather(wait));
        }
        if self.send(progress).await? > 0 {
            return Ok(Step::Busy);
        }
        if !progress.in_flight.is_empty() {
            return Ok(Step::Waiting);
        }
        let published = progress.published;
        self.save(progress, published, true).await?;
        Ok(Step::Idle)
    }

    /// Produces the integration events of the log's next stretch without
    /// waiting for their acknowledgements. Returns how many log entries it
    /// covered.
    async fn send(&self, progress: &mut Progress) -> Result<usize, TransportError> {
        let from = match progress.sent {
            Some(position) => position,
            None => {
                let durable = self.store.load_checkpoint(RELAY_CHECKPOINT).await?;
                progress.saved = durable;
                progress.published = durable;
                durable
            }
        };
        let entries = self.store.read_log(from, 500).await?;
        let Some(last) = entries.last().map(|e| e.position) else {
            return Ok(0);
        };
        let mut acks = Vec::new();
        let mut messages = 0;
        for entry in &entries {
            let event = match IntegrationEvent::from_log(entry) {
                Ok(Some(event)) => event,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(position = entry.position, error = %e, "relay skipped an unreadable event");
                    continue;
                }
            };
            let bytes = self.contract.encode(&event).map_err(broker)?;
            let topic = self.config.topic(event.topic());
            let event_id = event.event_id.to_string();
            let record_name = self.contract.record_name(event.topic());
            let fingerprint = self.contract.fingerprint(event.topic());
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "eventId",
                    value: Some(&event_id),
                })
                .insert(Header {
                    key: "eventType",
                    value: Some(record_name),
                })
                .insert(Header {
                    key: "schemaFingerprint",
                    value: Some(fingerprint),
                });
            let mut record = FutureRecord::to(&topic)
                .key(&event.order_id)
                .payload(&bytes)
                .headers(headers);
            loop {
                match self.producer.send_result(record) {
                    Ok(ack) => {
                        acks.push(ack);
                        messages += 1;
                        break;
                    }
                    // The producer's queue is full: wait for what is in
                    // flight, the oldest stretch first.
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                        back,
                    )) => {
                        record = back;
                        match progress.in_flight.next().await {
                            Some(done) => self.settle(progress, done).await?,
                            None => {
                                for ack in acks.drain(..) {
                                    ack.await.map_err(broker)?.map_err(|(e, _)| broker(e))?;
                                }
                            }
                        }
                    }
                    Err((e, _)) => return Err(broker(e)),
                }
            }
        }
        progress.in_flight.push_back(
            async move {
                for ack in futures_util::future::join_all(acks).await {
                    ack.map_err(broker)?.map_err(|(e, _)| broker(e))?;
                }
                Ok((last, messages))
            }
            .boxed(),
        );
        progress.sent = Some(last);
        progress.sent_at = Some(Instant::now());
        Ok(entries.len())
    }

    /// Counts an acknowledged stretch as published (or fails with its
    /// error) and writes the checkpoint when due.
    async fn settle(
        &self,
        progress: &mut Progress,
        done: Result<(i64, u64), TransportError>,
    ) -> Result<(), TransportError> {
        let (last, messages) = done?;
        progress.published = last;
        self.heartbeat.beat();
        metrics::counter!("order_saga_relay_published_total").increment(messages);
        self.save(progress, last, false).await
    }

    /// Writes `position` as the checkpoint if it moved, and `now` or enough
    /// time has passed since the last write.
    async fn save(
        &self,
        progress: &mut Progress,
        position: i64,
        now: bool,
    ) -> Result<(), TransportError> {
        let due = progress
            .saved_at
            .is_none_or(|at| at.elapsed() >= RELAY_SAVE_EVERY);
        if position > progress.saved && (now || due) {
            self.store
                .save_checkpoint(RELAY_CHECKPOINT, position)
                .await?;
            progress.saved = position;
            progress.saved_at = Some(Instant::now());
        }
        Ok(())
    }

    /// Whether the broker answers a metadata request now.
    async fn broker_answers(&self) -> bool {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .is_ok()
        })
        .await
        .unwrap_or(false)
    }

    /// Publishes in the background until `shutdown`.
    pub fn spawn(self: &Arc<Self>, poll: Duration, mut shutdown: Shutdown) -> Tasks {
        let relay = self.clone();
        let mut tasks = Tasks::default();
        tasks.push(tokio::spawn(async move {
            let mut progress = Progress::default();
            let mut last_check = Instant::now() - Duration::from_secs(60);
            let mut backoff = poll;
            let mut appends = relay.store.appends_of(integration::SOURCES);
            loop {
                appends.mark();
                let step = match relay.step(&mut progress).await {
                    // Until an acknowledgement or a new append (or a
                    // while, to look at the shutdown signal).
                    Ok(Step::Waiting) => tokio::select! {
                        Some(done) = progress.in_flight.next() => {
                            relay.settle(&mut progress, done).await.map(|()| Step::Busy)
                        }
                        _ = appends.changed() => Ok(Step::Busy),
                        _ = tokio::time::sleep(RELAY_SAVE_EVERY) => Ok(Step::Busy),
                    },
                    Ok(Step::Gather(wait)) => {
                        tokio::time::sleep(wait).await;
                        Ok(Step::Busy)
                    }
                    other => other,
                };
                let idle = match step {
                    Ok(step) => {
                        backoff = poll;
                        matches!(step, Step::Idle)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "relay failed; retrying from its checkpoint");
                        progress = Progress::default();
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        if pause(backoff, &mut shutdown).await {
                            break;
                        }
                        continue;
                    }
                };
                if idle && last_check.elapsed() > Duration::from_secs(1) {
                    last_check = Instant::now();
                    if relay.broker_answers().await {
                        relay.heartbeat.beat();
                    }
                }
                if (idle && pause_until_append(poll, &mut shutdown, &mut appends).await)
                    || *shutdown.borrow()
                {
                    break;
                }
            }
            // Stopping: what is in flight counts if the broker takes it soon
            // (otherwise it goes out again after a restart).
            let drain = async {
                while let Some(done) = progress.in_flight.next().await {
                    relay.settle(&mut progress, done).await?;
                }
                let published = progress.published;
                relay.save(&mut progress, published, true).await
            };
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), drain).await {
                tracing::warn!(error = %e, "relay stopped before everything sent was published");
            }
        }));
        tasks
    }

    /// Entries of the log not yet published (for the relay-lag metric).
    pub async fn lag(store: &Store) -> Result<i64, crate::store::StoreError> {
        Ok((store.head_position().await? - store.load_checkpoint(RELAY_CHECKPOINT).await?).max(0))
    }
}
