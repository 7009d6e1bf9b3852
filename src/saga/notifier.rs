//! Customer notifications: a pluggable [`Notifier`] — a JSON webhook by
//! default, a log line when no webhook is configured. Every attempt is
//! recorded; a failed one is retried on a timer, and a notification that
//! keeps failing never holds up the saga.

use std::time::Duration;

use async_trait::async_trait;
use order_saga_domain::{CancelReason, Money};
use serde::{Deserialize, Serialize};

use super::integration::{Body, IntegrationEvent};
use super::{HandlerError, Saga};
use crate::store::{AttemptRow, Claim, Timer, TimerKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NotificationKind {
    OrderConfirmed,
    PaymentRequested,
    OrderCancelled,
    OrderCompleted,
}

impl NotificationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::OrderConfirmed => "ORDER_CONFIRMED",
            NotificationKind::PaymentRequested => "PAYMENT_REQUESTED",
            NotificationKind::OrderCancelled => "ORDER_CANCELLED",
            NotificationKind::OrderCompleted => "ORDER_COMPLETED",
        }
    }
}

/// What the customer is told; the webhook's JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub event_id: String,
    pub order_id: String,
    pub user_id: String,
    pub kind: NotificationKind,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<CancelReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_amount: Option<Money>,
}

impl Notification {
    /// The record of one attempt at sending this notification.
    pub fn attempt(&self, attempt: u32, result: &Result<(), String>, at_ms: i64) -> AttemptRow {
        let (outcome, error) = match result {
            Ok(()) => ("delivered", None),
            Err(e) => ("failed", Some(e.clone())),
        };
        AttemptRow {
            event_id: self.event_id.clone(),
            attempt: i64::from(attempt),
            order_id: self.order_id.clone(),
            kind: self.kind.as_str(),
            outcome,
            error,
            attempted_at_ms: at_ms,
        }
    }

    /// The notification an integration event calls for, if any.
    pub fn for_event(event: &IntegrationEvent) -> Option<Self> {
        let (kind, user_id, message, reason, total_amount) = match &event.body {
            Body::OrderConfirmed {
                user_id,
                total_amount,
            } => (
                NotificationKind::OrderConfirmed,
                user_id,
                "Your order is confirmed.".to_string(),
                None,
                Some(*total_amount),
            ),
            Body::PaymentWaitStarted {
                user_id,
                total_amount,
            } => (
                NotificationKind::PaymentRequested,
                user_id,
                format!("Please pay {total_amount} to complete your order."),
                None,
                Some(*total_amount),
            ),
            Body::OrderCancelled {
                user_id, reason, ..
            } => (
                NotificationKind::OrderCancelled,
                user_id,
                format!("Your order was cancelled: {}.", reason.as_str()),
                Some(*reason),
                None,
            ),
            Body::OrderCompleted {
                user_id,
                total_amount,
                ..
            } => (
                NotificationKind::OrderCompleted,
                user_id,
                "Your payment is received and your order is complete.".to_string(),
                None,
                Some(*total_amount),
            ),
            _ => return None,
        };
        Some(Notification {
            event_id: event.event_id.to_string(),
            order_id: event.order_id.clone(),
            user_id: user_id.clone(),
            kind,
            message,
            reason,
            total_amount,
        })
    }
}

#[async_trait]
pub trait Notifier: Send + Sync {
    /// Delivers one notification; `Err` says why it did not arrive.
    async fn send(&self, notification: &Notification) -> Result<(), String>;
}

/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of
/// "<t>.<body>">`, as Stripe signs its webhooks. A receiver recomputes it
/// with the shared secret and refuses an old `t` (a replay).
pub const SIGNATURE_HEADER: &str = "Order-Saga-Signature";

/// POSTs the notification as JSON to a URL (http:// or https://); any 2xx
/// answer is delivery. With a secret, every request is signed
/// ([`SIGNATURE_HEADER`]).
pub struct WebhookNotifier {
    client: reqwest::Client,
    url: String,
    secret: Option<Vec<u8>>,
}

/// Where and how notifications are POSTed.
#[derive(Debug, Clone, Default)]
pub struct WebhookSettings {
    pub url: String,
    /// The shared secret the requests are signed with.
    pub secret: Option<String>,
    /// PEM certificates trusted besides the public roots (a private CA).
    pub ca_pem: Option<Vec<u8>>,
}

impl WebhookNotifier {
    pub fn new(settings: WebhookSettings, timeout: Duration) -> Result<Self, String> {
        let mut client = reqwest::Client::builder().timeout(timeout);
        if let Some(pem) = &settings.ca_pem {
            let certificates = reqwest::Certificate::from_pem_bundle(pem)
                .ok()
                .filter(|certificates| !certificates.is_empty())
                .ok_or("NOTIFY_WEBHOOK_CA_FILE: no PEM certificate in the file")?;
            for certificate in certificates {
                client = client.add_root_certificate(certificate);
            }
        }
        let client = client
            .build()
            .map_err(|e| format!("NOTIFY_WEBHOOK_URL: {e}"))?;
        Ok(Self {
            client,
            url: settings.url,
            secret: settings.secret.map(String::into_bytes),
        })
    }

    /// The signature header's value for `body` sent at `timestamp`.
    pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
        use hmac::Mac;
        // HMAC takes a key of any length.
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let digest = mac.finalize().into_bytes();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("t={timestamp},v1={hex}")
    }
}

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn send(&self, notification: &Notification) -> Result<(), String> {
        let body = serde_json::to_vec(notification).map_err(|e| e.to_string())?;
        let mut request = self
            .client
            .post(&self.url)
            .header("Idempotency-Key", &notification.event_id)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(secret) = &self.secret {
            let now = chrono::Utc::now().timestamp();
            request = request.header(SIGNATURE_HEADER, Self::signature(secret, now, &body));
        }
        let response = request.body(body).send().await.map_err(|e| {
            // The cause (a certificate refused, a connection reset) is in
            // the error's sources.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text = format!("{text}: {cause}");
                source = cause.source();
            }
            text
        })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("webhook answered {}", response.status()))
        }
    }
}

/// Used when no webhook is configured: the notification goes to the log.
pub struct LogNotifier;

#[async_trait]
impl Notifier for LogNotifier {
    async fn send(&self, notification: &Notification) -> Result<(), String> {
        tracing::info!(
            order_id = %notification.order_id,
            event_id = %notification.event_id,
            kind = notification.kind.as_str(),
            "notify customer: {}",
            notification.message
        );
        Ok(())
    }
}

impl Saga {
    /// Sends attempt `attempt` of a notification unless it was made already:
    /// the attempt is claimed in the store first, so whichever instance or
    /// delivery handles the event, one of them sends it. A failure schedules
    /// the next attempt. Never fails the saga.
    pub(super) async fn notify(
        &self,
        notification: &Notification,
        attempt: u32,
    ) -> Result<(), HandlerError> {
        let now = self.clock.now();
        let claim = notification.attempt(attempt, &Ok(()), now.timestamp_millis());
        match self.store.claim_notification(claim).await? {
            Claim::Taken => {}
            Claim::Done => return Ok(()),
            // Another instance is sending it. Should it die before saying
            // how it went, look again when its claim lapses: from the
            // event, with a timer; from a timer, by leaving that timer to
            // fire again when its lease runs out.
            Claim::HeldUntil(lapses_ms) => {
                if attempt > 0 {
                    return Err(HandlerError::Transient(format!(
                        "notification {} attempt {attempt} is being sent by another instance",
                        notification.event_id
                    )));
                }
                let due_at = chrono::DateTime::from_timestamp_millis(lapses_ms).unwrap_or(now);
                return self.schedule_notification(notification, 0, due_at).await;
            }
        }
        let result = self.notifier.send(notification).await;
        let now = self.clock.now();
        let mut record = notification.attempt(attempt, &result, now.timestamp_millis());
        let retries_left = attempt < self.config.notify_retries;
        if result.is_err() && !retries_left {
            // The last attempt: the customer is not told, and it says so.
            record.outcome = "abandoned";
        }
        let outcome = record.outcome;
        self.store.record_notification_attempt(record).await?;
        metrics::counter!("order_saga_notifications_total", "outcome" => outcome).increment(1);
        if let Err(error) = result {
            if !retries_left {
                tracing::error!(order_id = %notification.order_id, attempt, %error, "notification abandoned: no retries left");
                return Ok(());
            }
            tracing::warn!(order_id = %notification.order_id, attempt, %error, "notification failed");
            let due_at = now
                + chrono::Duration::from_std(self.config.notify_retry_interval)
                    .unwrap_or(chrono::Duration::MAX);
            self.schedule_notification(notification, attempt + 1, due_at)
                .await?;
        }
        Ok(())
    }

    /// Schedules attempt `attempt` of a notification at `due_at`.
    async fn schedule_notification(
        &self,
        notification: &Notification,
        attempt: u32,
        due_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), HandlerError> {
        let timer = Timer {
            kind: TimerKind::NotifyRetry,
            subject: notification.event_id.clone(),
            order_id: notification.order_id.clone(),
            attempt,
            due_at,
            causation_id: notification.event_id.clone(),
            correlation_id: None,
            payload: serde_json::to_value(notification)
                .map_err(|e| HandlerError::Permanent(e.to_string()))?,
        };
        self.store.schedule_timer(&timer).await?;
        Ok(())
    }
}
