//! The transport seam: how integration events reach the consumers.
//!
//! A consumer group subscribes to topics and polls deliveries; it commits
//! the ones it has handled (at-least-once: anything not committed is
//! delivered again, after a crash or a [`Subscription::rewind`]). Every
//! topic is keyed by `orderId` and one key's deliveries arrive in order.
//!
//! [`LogTransport`] is the in-process transport, used when no broker is
//! configured: each subscription tails the store's global log itself, from
//! its own durable checkpoint (written at most every 100 ms while busy), so
//! a restart delivers again whatever the checkpoint had not yet reached.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::integration::{IntegrationEvent, Topic};
use crate::store::{LogEntry, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("broker: {0}")]
    Broker(String),
}

/// Where a delivery sits in its stream (a partition and an offset; the
/// in-process transport has one partition whose offsets are log positions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    pub partition: i32,
    pub offset: i64,
}

/// A message that could not be turned into an integration event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    pub error: String,
    pub payload: String,
    pub event_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: String,
    pub key: String,
    pub offset: Offset,
    pub event: Result<IntegrationEvent, Undecodable>,
    /// The message as it arrived (for dead-lettering).
    pub raw: Vec<u8>,
}

#[async_trait]
pub trait Transport: Send + Sync {
    async fn subscribe(
        &self,
        group: &str,
        topics: &[Topic],
    ) -> Result<Box<dyn Subscription>, TransportError>;

    /// Where this transport puts messages that cannot be handled, besides
    /// the store's `dead_letters` table (none in-process).
    fn dead_letters(&self) -> Option<std::sync::Arc<dyn DeadLetterSink>> {
        None
    }
}

/// A transport's own dead-letter place (Kafka: `<topic>.dlq`).
#[async_trait]
pub trait DeadLetterSink: Send + Sync {
    async fn send(&self, delivery: &Delivery, error: &str) -> Result<(), TransportError>;
}

#[async_trait]
pub trait Subscription: Send {
    /// Up to `max` deliveries after what was last polled (possibly none).
    async fn poll(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError>;

    /// Records that `handled` (a prefix of what was polled, in order) is
    /// done: it will not be delivered to this group again.
    async fn commit(&mut self, handled: &[Delivery]) -> Result<(), TransportError>;

    /// Forgets what was polled but not committed: the next poll starts
    /// after the last commit.
    async fn rewind(&mut self) -> Result<(), TransportError>;

    /// This process stops consuming for the group (another instance holds
    /// it now): make what was handled durable.
    async fn step_down(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    /// This process consumes for the group again: continue from the
    /// durable checkpoint, wherever the previous holder left it.
    async fn take_over(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    /// Whether an empty poll already waited for new deliveries (a broker's
    /// long poll), so the consumer loop polls again at once instead of
    /// pausing.
    fn waits(&self) -> bool {
        false
    }
}

/// The in-process transport over the store's global log.
pub struct LogTransport {
    store: Store,
}

impl LogTransport {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

#[async_trait]
impl Transport for LogTransport {
    async fn subscribe(
        &self,
        group: &str,
        topics: &[Topic],
    ) -> Result<Box<dyn Subscription>, TransportError> {
        let checkpoint = format!("consumer.{group}");
        let committed = self.store.load_checkpoint(&checkpoint).await?;
        Ok(Box::new(LogSubscription {
            store: self.store.clone(),
            checkpoint,
            topics: topics.iter().copied().collect(),
            cursor: committed,
            committed,
            saved: committed,
            saved_at: Instant::now(),
        }))
    }
}

struct LogSubscription {
    store: Store,
    checkpoint: String,
    topics: HashSet<Topic>,
    /// Last log position polled.
    cursor: i64,
    /// Last log position committed (handled, or nothing for us).
    committed: i64,
    /// Last position written to the durable checkpoint, and when.
    saved: i64,
    saved_at: Instant,
}

/// How often, at most, a busy subscription writes its durable checkpoint.
/// A commit moves the position in memory at once; the store hears of it
/// every this often, and whenever the subscription finds nothing new (so an
/// idle subscription's checkpoint is always current). A crash in between
/// only delivers the last stretch again, which the handlers' idempotency
/// makes harmless — and saves a checkpoint write per batch (tiny batches
/// under steady load: it was a write for every event in the log).
const SAVE_CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Log entries with nothing for a group that one poll reads past at most
/// before it returns empty-handed (the consumer loop then pauses briefly and
/// beats its heartbeat before it polls again).
const MAX_SKIPPED_PER_POLL: usize = 20_000;

impl LogSubscription {
    /// The delivery `entry` makes for this group: `None` if it is not one
    /// of its topics' events.
    fn delivery(&self, entry: &LogEntry) -> Option<Delivery> {
        let offset = Offset {
            partition: 0,
            offset: entry.position,
        };
        match IntegrationEvent::from_log(entry) {
            Ok(Some(event)) if self.topics.contains(&event.topic()) => Some(Delivery {
                topic: event.topic().as_str().to_string(),
                key: event.order_id.clone(),
                offset,
                event: Ok(event),
                raw: Vec::new(),
            }),
            Ok(_) => None,
            Err(error) => Some(Delivery {
                topic: format!("{}.{}", entry.aggregate_type, entry.event_type),
                key: entry.aggregate_id.clone(),
                offset,
                event: Err(Undecodable {
                    error,
                    payload: entry.payload.to_string(),
                    event_id: Some(entry.event_id.to_string()),
                }),
                raw: entry.payload.to_string().into_bytes(),
            }),
        }
    }

    fn committed_to(&mut self, position: i64) {
        self.committed = self.committed.max(position);
    }

    /// Writes the checkpoint if it is behind and `now` says so.
    async fn save(&mut self, now: bool) -> Result<(), TransportError> {
        if self.saved < self.committed && (now || self.saved_at.elapsed() >= SAVE_CHECKPOINT_EVERY)
        {
            self.store
                .save_checkpoint(&self.checkpoint, self.committed)
                .await?;
            self.saved = self.committed;
            self.saved_at = Instant::now();
        }
        Ok(())
    }
}

#[async_trait]
impl Subscription for LogSubscription {
    async fn poll(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError> {
        let batch = max.max(1);
        let mut read = 0;
        loop {
            let entries = self.store.read_log(self.cursor, batch as i64).await?;
            let Some(last) = entries.last().map(|entry| entry.position) else {
                self.save(true).await?;
                return Ok(Vec::new());
            };
            read += entries.len();
            // A stretch shorter than asked for ends at the head of the log.
            let at_head = entries.len() < batch;
            self.cursor = last;
            let deliveries: Vec<Delivery> = entries
                .iter()
                .filter_map(|entry| self.delivery(entry))
                .collect();
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            // Nothing for us in this stretch of the log: move the checkpoint
            // past it so a restart does not read it again, and, unless the
            // stretch reached the head, read on — a consumer behind a long
            // stretch of other groups' events (the stock service after a
            // burst) would otherwise pause between stretches as if idle, and
            // the first new order would wait for all of them. A stretch that
            // reached the head ends the poll: another read would find little
            // and cost a checkpoint write.
            self.committed_to(last);
            self.save(false).await?;
            if at_head || read >= MAX_SKIPPED_PER_POLL {
                return Ok(Vec::new());
            }
        }
    }

    async fn commit(&mut self, handled: &[Delivery]) -> Result<(), TransportError> {
        if let Some(last) = handled.last() {
            self.committed_to(last.offset.offset);
            self.save(false).await?;
        }
        Ok(())
    }

    async fn rewind(&mut self) -> Result<(), TransportError> {
        self.cursor = self.committed;
        Ok(())
    }

    async fn step_down(&mut self) -> Result<(), TransportError> {
        self.save(true).await
    }

    async fn take_over(&mut self) -> Result<(), TransportError> {
        let durable = self.store.load_checkpoint(&self.checkpoint).await?;
        self.committed = durable;
        self.saved = durable;
        self.cursor = durable;
        self.saved_at = Instant::now();
        Ok(())
    }
}
