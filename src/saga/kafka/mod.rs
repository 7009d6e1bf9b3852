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

mod relay;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::avro::Contract;
use super::integration::Topic;
use super::transport::{
    DeadLetterSink, Delivery, Offset as DeliveryOffset, Subscription, Transport, TransportError,
    Undecodable,
};
use crate::fault::Backoff;

pub use relay::{Relay, RELAY_CHECKPOINT, RELAY_ROLE};

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

    pub(crate) fn producer(&self) -> Result<FutureProducer, TransportError> {
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

/// Whether the topics exist: set once they are created, at start or, when
/// the broker was down then, by a background task once it answers. Until
/// then the relay publishes nothing and the consumers do not subscribe;
/// orders are accepted all the same (they are in the log).
#[derive(Clone, Debug, Default)]
pub struct TopicsReady(Arc<std::sync::atomic::AtomicBool>);

impl TopicsReady {
    pub fn is_ready(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// How long creating the topics may take before the broker counts as down.
const CREATE_TOPICS_WITHIN: Duration = Duration::from_secs(10);

async fn try_create_topics(config: &KafkaConfig) -> Result<(), String> {
    match tokio::time::timeout(CREATE_TOPICS_WITHIN, create_topics(config)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CREATE_TOPICS_WITHIN:?}")),
    }
}

/// Creates the topics once the broker answers, trying with backoff.
async fn create_topics_when_up(config: KafkaConfig, ready: TopicsReady) {
    let mut backoff = Backoff::default();
    loop {
        tokio::time::sleep(backoff.next_wait()).await;
        match try_create_topics(&config).await {
            Ok(()) => {
                tracing::info!(brokers = %config.brokers, "the broker answers: topics created");
                ready.set();
                return;
            }
            Err(error) => {
                tracing::warn!(brokers = %config.brokers, %error, "the broker is still down")
            }
        }
    }
}

pub struct KafkaTransport {
    config: KafkaConfig,
    contract: Arc<Contract>,
    dead_letters: Arc<KafkaDeadLetters>,
    ready: TopicsReady,
}

impl KafkaTransport {
    /// Connects, creating the topics; a broker that is down is waited for
    /// in the background (the service starts and accepts orders).
    pub async fn connect(
        config: KafkaConfig,
        contract: Arc<Contract>,
    ) -> Result<Self, TransportError> {
        let ready = TopicsReady::default();
        match try_create_topics(&config).await {
            Ok(()) => ready.set(),
            Err(error) => {
                tracing::warn!(brokers = %config.brokers, %error, "the broker is down: orders are accepted, and relayed and handled once it answers");
                tokio::spawn(create_topics_when_up(config.clone(), ready.clone()));
            }
        }
        let dead_letters = Arc::new(KafkaDeadLetters {
            producer: config.producer()?,
        });
        Ok(KafkaTransport {
            config,
            contract,
            dead_letters,
            ready,
        })
    }

    /// Whether the topics exist yet (the relay waits for them).
    pub fn topics_ready(&self) -> TopicsReady {
        self.ready.clone()
    }
}

impl KafkaConfig {
    /// A consumer of `group`, subscribed to `topics`.
    fn subscribed(&self, group: &str, topics: &[String]) -> Result<StreamConsumer, TransportError> {
        let consumer: StreamConsumer = self
            .client(
                &self.consumer,
                &[
                    ("group.id", &format!("{}{group}", self.prefix)),
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
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&refs).map_err(broker)?;
        Ok(consumer)
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    async fn subscribe(
        &self,
        group: &str,
        topics: &[Topic],
    ) -> Result<Box<dyn Subscription>, TransportError> {
        let names: Vec<String> = topics.iter().map(|t| self.config.topic(*t)).collect();
        let consumer = match self.ready.is_ready() {
            true => Some(self.config.subscribed(group, &names)?),
            false => None,
        };
        Ok(Box::new(KafkaSubscription {
            consumer,
            group: group.to_string(),
            topics: names,
            ready: self.ready.clone(),
            config: self.config.clone(),
            contract: self.contract.clone(),
        }))
    }

    fn dead_letters(&self) -> Option<Arc<dyn DeadLetterSink>> {
        Some(self.dead_letters.clone())
    }
}

struct KafkaSubscription {
    /// Subscribed once the topics exist.
    consumer: Option<StreamConsumer>,
    group: String,
    topics: Vec<String>,
    ready: TopicsReady,
    config: KafkaConfig,
    contract: Arc<Contract>,
}

impl KafkaSubscription {
    /// Subscribes, if not yet and the topics exist; whether subscribed.
    fn subscribe(&mut self) -> Result<bool, TransportError> {
        if self.consumer.is_none() && self.ready.is_ready() {
            self.consumer = Some(self.config.subscribed(&self.group, &self.topics)?);
        }
        Ok(self.consumer.is_some())
    }

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
        let header = |key: &str| {
            message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == key)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).to_string())
            })
        };
        let event_id = header("eventId");
        let event = event.map(|mut event| {
            event.traceparent = header(crate::telemetry::TRACEPARENT);
            event
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
        if !self.subscribe()? {
            // The broker has been down since the start: wait a little.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(deliveries);
        }
        let Some(consumer) = &self.consumer else {
            return Ok(deliveries);
        };
        match tokio::time::timeout(Duration::from_millis(50), consumer.recv()).await {
            Err(_) => return Ok(deliveries),
            Ok(Err(e)) => return Err(broker(e)),
            Ok(Ok(message)) => deliveries.push(self.delivery(&message)),
        }
        while deliveries.len() < max {
            match consumer.recv().now_or_never() {
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
        let Some(consumer) = &self.consumer else {
            return Ok(());
        };
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
        consumer.store_offsets(&list).map_err(broker)
    }

    async fn rewind(&mut self) -> Result<(), TransportError> {
        let Some(consumer) = &self.consumer else {
            return Ok(());
        };
        let assignment = consumer.assignment().map_err(broker)?;
        let committed = consumer
            .committed_offsets(assignment, Duration::from_secs(10))
            .map_err(broker)?;
        for element in committed.elements() {
            let offset = match element.offset() {
                Offset::Offset(n) => Offset::Offset(n),
                _ => Offset::Beginning,
            };
            consumer
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

/// The headers of a published record: `eventId`, `eventType` (the Avro
/// record's full name) and `schemaFingerprint`.
fn record_headers(
    contract: &Contract,
    event: &super::integration::IntegrationEvent,
) -> OwnedHeaders {
    let event_id = event.event_id.to_string();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "eventId",
            value: Some(&event_id),
        })
        .insert(Header {
            key: "eventType",
            value: Some(contract.record_name(event.topic())),
        })
        .insert(Header {
            key: "schemaFingerprint",
            value: Some(contract.fingerprint(event.topic())),
        });
    match &event.traceparent {
        Some(traceparent) => headers.insert(Header {
            key: crate::telemetry::TRACEPARENT,
            value: Some(traceparent),
        }),
        None => headers,
    }
}

/// Publishes one integration event as the relay does (Avro, keyed by
/// `orderId`, the same headers), waiting for the broker's acknowledgement:
/// for `order-saga payment simulate`.
pub async fn publish_one(
    config: &KafkaConfig,
    contract: &Contract,
    event: &super::integration::IntegrationEvent,
) -> Result<(), TransportError> {
    create_topics(config).await?;
    let bytes = contract.encode(event).map_err(broker)?;
    let topic = config.topic(event.topic());
    let record = FutureRecord::to(&topic)
        .key(&event.order_id)
        .payload(&bytes)
        .headers(record_headers(contract, event));
    config
        .producer()?
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| broker(e))
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
