//! The consumer runtime: a consumer polls a batch, hands one order's
//! messages in order to the handlers (several orders at a time), retries a
//! transient failure by delivering the batch again, dead-letters what can
//! never work, and commits the batch when every message in it is done.
//! A store fault (`crate::fault`) fails the pass, which its loop tries
//! again with backoff for as long as it lasts: it is not the message's
//! fault, so it never counts toward dead-lettering.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use tokio::sync::Mutex;
use tracing::Instrument;
use uuid::Uuid;

use super::transport::{Delivery, Subscription};
use super::{HandlerError, Saga, SagaError, Side};
use crate::fault::Fault;
use crate::store::StoreError;

pub(super) struct Consumer {
    pub(super) side: Side,
    /// The single-instance role that runs it ([`Side::role`]; held always
    /// unless elected: the in-process bus on PostgreSQL).
    pub(super) role: String,
    /// Whether this process was not running it at its last pass (so a
    /// pass that holds the role again takes over from the checkpoint).
    pub(super) standby: AtomicBool,
    /// Whether an empty poll waited already ([`Subscription::waits`]).
    pub(super) waits: bool,
    pub(super) subscription: Mutex<Box<dyn Subscription>>,
    /// Failed tries per event id, for dead-lettering.
    pub(super) failures: Mutex<HashMap<Uuid, u32>>,
}

/// How one delivery went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Handled, or dead-lettered: the batch may move past it.
    Done,
    /// Failed for now: the batch is delivered again.
    Again,
    /// The store is down or full: the pass fails (its loop backs off)
    /// and the batch is delivered again; the try is not counted.
    Waiting(Fault),
}

impl Saga {
    /// Polls one batch and handles it: one order's messages in order, up to
    /// `handler_concurrency` orders at a time. The batch is committed when
    /// every message in it is done; otherwise it is delivered again (what
    /// was done is then a no-op).
    pub(super) async fn run_consumer(&self, consumer: &Consumer) -> Result<usize, SagaError> {
        let mut subscription = consumer.subscription.lock().await;
        if !self.roles.holds(&consumer.role) {
            if !consumer.standby.swap(true, Ordering::AcqRel) {
                subscription.step_down().await?;
            }
            return Ok(0);
        }
        if consumer.standby.swap(false, Ordering::AcqRel) {
            subscription.take_over().await?;
        }
        let deliveries = subscription.poll(self.config.batch_size).await?;
        if deliveries.is_empty() {
            return Ok(0);
        }
        let mut by_key: Vec<Vec<Delivery>> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for delivery in &deliveries {
            let slot = *index.entry(delivery.key.as_str()).or_insert_with(|| {
                by_key.push(Vec::new());
                by_key.len() - 1
            });
            by_key[slot].push(delivery.clone());
        }
        let outcomes: Vec<Result<Outcome, SagaError>> = futures_util::stream::iter(by_key)
            .map(|group| self.deliver_in_order(consumer, group))
            .buffer_unordered(self.config.handler_concurrency.max(1))
            .collect()
            .await;
        let mut all_done = true;
        let mut waiting = None;
        for outcome in outcomes {
            match outcome? {
                Outcome::Done => {}
                Outcome::Again => all_done = false,
                Outcome::Waiting(fault) => {
                    all_done = false;
                    waiting = Some(fault);
                }
            }
        }
        if all_done {
            subscription.commit(&deliveries).await?;
        } else {
            subscription.rewind().await?;
        }
        // Waited out by the consumer's loop, with backoff.
        if let Some(fault) = waiting {
            return Err(SagaError::Fault(fault));
        }
        Ok(deliveries.len())
    }

    /// Handles one order's deliveries in order, up to the first that is not
    /// done.
    pub(super) async fn deliver_in_order(
        &self,
        consumer: &Consumer,
        group: Vec<Delivery>,
    ) -> Result<Outcome, SagaError> {
        for delivery in &group {
            let outcome = self.deliver(consumer, delivery).await?;
            if outcome != Outcome::Done {
                return Ok(outcome);
            }
        }
        Ok(Outcome::Done)
    }

    /// Handles one delivery; a message that cannot work is dead-lettered.
    pub(super) async fn deliver(
        &self,
        consumer: &Consumer,
        delivery: &Delivery,
    ) -> Result<Outcome, SagaError> {
        let event = match &delivery.event {
            Ok(event) => event,
            Err(undecodable) => {
                self.dead_letter(
                    consumer.side,
                    delivery,
                    undecodable.event_id.as_deref(),
                    &undecodable.error,
                    &undecodable.payload,
                )
                .await?;
                return Ok(Outcome::Done);
            }
        };
        let span = tracing::info_span!(
            "handle",
            group = consumer.side.group(),
            topic = %delivery.topic,
            order_id = %event.order_id,
            event_id = %event.event_id,
            correlation_id = event.correlation_id.as_deref().unwrap_or(""),
        );
        crate::telemetry::continue_trace(&span, event.traceparent.as_deref());
        let started = self.clock.now();
        let result = self.handle(consumer.side, event).instrument(span).await;
        let payload = || serde_json::to_string(event).unwrap_or_default();
        match result {
            Ok(()) => {
                consumer.failures.lock().await.remove(&event.event_id);
                let age = (started - event.occurred_at).to_std().unwrap_or_default();
                metrics::histogram!("order_saga_stage_seconds", "stage" => delivery.topic.clone())
                    .record(age.as_secs_f64());
                Ok(Outcome::Done)
            }
            Err(HandlerError::Fault(fault, error)) => {
                tracing::debug!(%error, "handler met a store fault");
                Ok(Outcome::Waiting(fault))
            }
            Err(HandlerError::Permanent(error)) => {
                let id = event.event_id.to_string();
                self.dead_letter(consumer.side, delivery, Some(&id), &error, &payload())
                    .await?;
                Ok(Outcome::Done)
            }
            Err(HandlerError::Transient(error)) => {
                let mut failures = consumer.failures.lock().await;
                let tries = failures.entry(event.event_id).or_default();
                *tries += 1;
                if *tries < self.config.handler_attempts {
                    tracing::warn!(tries = *tries, %error, "handler failed; will retry");
                    return Ok(Outcome::Again);
                }
                failures.remove(&event.event_id);
                drop(failures);
                let id = event.event_id.to_string();
                self.dead_letter(consumer.side, delivery, Some(&id), &error, &payload())
                    .await?;
                Ok(Outcome::Done)
            }
        }
    }

    pub(super) async fn dead_letter(
        &self,
        side: Side,
        delivery: &Delivery,
        event_id: Option<&str>,
        error: &str,
        payload: &str,
    ) -> Result<(), StoreError> {
        // Stored first: of several instances giving up on one message, the
        // one that stores it counts and publishes it.
        let first = self
            .store
            .record_dead_letter(
                side.group(),
                &delivery.topic,
                event_id,
                error,
                payload,
                self.clock.now().timestamp_millis(),
            )
            .await?;
        if !first {
            return Ok(());
        }
        tracing::error!(group = side.group(), topic = %delivery.topic, error, "dead-lettered");
        metrics::counter!("order_saga_dead_letters_total", "consumer" => side.group()).increment(1);
        if let Some(sink) = &self.dead_letter_sink {
            if let Err(e) = sink.send(delivery, error).await {
                tracing::warn!(error = %e, "could not publish the dead letter; it is in the store");
            }
        }
        Ok(())
    }
}
