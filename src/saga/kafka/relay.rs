//! The relay: publishes the global log's integration events to their
//! topics, in log order per order id, with the idempotent producer, and
//! moves its checkpoint only past what the broker acknowledged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{broker, record_headers, KafkaConfig, TopicsReady};
use crate::health::{pause, pause_until_append, Heartbeat, Shutdown, Tasks};
use crate::leadership::Roles;
use crate::saga::avro::Contract;
use crate::saga::integration::{self, IntegrationEvent};
use crate::saga::transport::TransportError;
use crate::store::Store;

/// The relay's checkpoint in the global log.
pub const RELAY_CHECKPOINT: &str = "relay.kafka";

/// The single-instance role of the relay: one instance of a deployment
/// publishes at a time (`leadership.rs`); the others stand by.
pub const RELAY_ROLE: &str = "relay";

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
    roles: Roles,
    /// Nothing is published before the topics exist.
    ready: TopicsReady,
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
        roles: Roles,
        ready: TopicsReady,
    ) -> Result<Arc<Self>, TransportError> {
        Ok(Arc::new(Relay {
            ready,
            producer: config.producer()?,
            store,
            config,
            contract,
            heartbeat: Heartbeat::default(),
            roles,
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
        if !self.ready.is_ready() {
            return Ok(Step::Idle);
        }
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
                // Payment results entered in-process are the payment
                // service's records, not ours to publish.
                Ok(Some(event)) if event.topic().is_inbound() => continue,
                Ok(Some(event)) => event,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(position = entry.position, error = %e, "relay skipped an unreadable event");
                    continue;
                }
            };
            let bytes = self.contract.encode(&event).map_err(broker)?;
            let topic = self.config.topic(event.topic());
            let headers = record_headers(&self.contract, &event);
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
            let mut standby = true;
            loop {
                if !relay.roles.holds(RELAY_ROLE) {
                    // Another instance publishes: finish what is in flight,
                    // then stand by (answering for the broker meanwhile).
                    if !standby {
                        relay.drain(&mut progress).await;
                        progress = Progress::default();
                        standby = true;
                    }
                    if last_check.elapsed() > Duration::from_secs(1) {
                        last_check = Instant::now();
                        if relay.broker_answers().await {
                            relay.heartbeat.beat();
                        }
                    }
                    tokio::select! {
                        _ = relay.roles.wait_change(Duration::from_millis(250)) => {}
                        _ = shutdown.changed() => {}
                    }
                    if *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
                if standby {
                    // From the durable checkpoint, wherever the last
                    // holder left it (a fresh Progress reads it).
                    standby = false;
                    progress = Progress::default();
                }
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
            relay.drain(&mut progress).await;
        }));
        tasks
    }

    /// Stopping or standing down: what is in flight counts if the broker
    /// takes it soon (otherwise it goes out again from the checkpoint).
    async fn drain(&self, progress: &mut Progress) {
        let drain = async {
            while let Some(done) = progress.in_flight.next().await {
                self.settle(progress, done).await?;
            }
            let published = progress.published;
            self.save(progress, published, true).await
        };
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), drain).await {
            tracing::warn!(error = %e, "relay stopped before everything sent was published");
        }
    }

    /// Entries of the log not yet published (for the relay-lag metric).
    pub async fn lag(store: &Store) -> Result<i64, crate::store::StoreError> {
        Ok((store.head_position().await? - store.load_checkpoint(RELAY_CHECKPOINT).await?).max(0))
    }
}
