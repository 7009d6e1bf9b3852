//! Metrics export: the Prometheus recorder behind the `metrics` facade the
//! rest of the code records into, and the gauges computed at scrape time
//! (log head, relay, consumer and projection lag, pending and overdue
//! timers, dead letters, readiness). Consumer lag is the in-process
//! transport's (log head minus the group's checkpoint); on Kafka, the broker
//! reports its groups' lag. Every counter is registered at zero when the
//! recorder is installed, so that a rate over it (`ops/prometheus/`) has a
//! series before the first increment.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::health::{pause, Shutdown};
use crate::read_models;
use order_saga_domain::CancelReason;

use crate::saga::Side;
use crate::store::{Store, StoreError, TimerKind};

/// Histogram buckets in seconds, for the per-stage durations.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The process-wide recorder (installed once; `None` if another recorder
/// was installed first).
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&BUCKETS)
                .ok()?
                .install_recorder()
                .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
                .ok()
                .inspect(|_| register_counters())
        })
        .clone()
}

/// Every counter with every label value it can take, at zero.
fn register_counters() {
    use metrics::counter;
    counter!("order_saga_orders_created_total").increment(0);
    counter!("order_saga_orders_rejected_total").increment(0);
    counter!("order_saga_orders_confirmed_total").increment(0);
    counter!("order_saga_relay_published_total").increment(0);
    for outcome in ["StockReserved", "StockReservationFailed"] {
        counter!("order_saga_stock_reservations_total", "outcome" => outcome).increment(0);
    }
    for outcome in ["PAYMENT_WAIT", "ORDER_CANCELLED"] {
        counter!("order_saga_sagas_completed_total", "outcome" => outcome).increment(0);
    }
    for reason in CancelReason::ALL {
        counter!("order_saga_compensations_total", "reason" => reason.as_str()).increment(0);
    }
    for outcome in ["PAID", "REJECTED", "COMPLETED", "FAILED", "EXPIRED"] {
        counter!("order_saga_payments_total", "outcome" => outcome).increment(0);
    }
    for outcome in ["delivered", "failed", "abandoned"] {
        counter!("order_saga_notifications_total", "outcome" => outcome).increment(0);
    }
    for side in Side::ALL {
        counter!("order_saga_dead_letters_total", "consumer" => side.group()).increment(0);
    }
    for outcome in ["handled", "failed"] {
        counter!("order_saga_redrives_total", "outcome" => outcome).increment(0);
    }
    for kind in TimerKind::ALL {
        counter!("order_saga_timers_fired_total", "kind" => kind.as_str()).increment(0);
    }
}

/// A timer this long past due has been missed by every instance.
const OVERDUE_AFTER: chrono::Duration = chrono::Duration::seconds(30);

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets until `shutdown`.
/// The recorder keeps every sample until upkeep or a scrape: a service
/// nobody scrapes grew with every recorded stage duration (~2 MiB a minute
/// at 200 orders/s).
pub async fn upkeep(handle: PrometheusHandle, mut shutdown: Shutdown) {
    loop {
        handle.run_upkeep();
        if pause(UPKEEP_EVERY, &mut shutdown).await {
            break;
        }
    }
}

/// Sets the scrape-time gauges from the store, then renders everything.
/// `kafka`: the bus is Kafka (a relay runs; consumer lag is the broker's).
pub async fn render(
    store: &Store,
    handle: &PrometheusHandle,
    kafka: bool,
    ready: bool,
) -> Result<String, StoreError> {
    let head = store.head_position().await?;
    metrics::gauge!("order_saga_log_head_position").set(head as f64);
    if kafka {
        metrics::gauge!("order_saga_relay_lag_events")
            .set(crate::saga::kafka::Relay::lag(store).await? as f64);
    }
    for side in Side::ALL.into_iter().filter(|_| !kafka) {
        let checkpoint = store
            .load_checkpoint(&format!("consumer.{}", side.group()))
            .await?;
        metrics::gauge!("order_saga_consumer_lag_events", "consumer" => side.group())
            .set((head - checkpoint).max(0) as f64);
    }
    let projected = store.load_checkpoint(read_models::CHECKPOINT).await?;
    metrics::gauge!("order_saga_projection_lag_events").set((head - projected).max(0) as f64);
    let overdue_before = chrono::Utc::now() - OVERDUE_AFTER;
    let (pending, overdue) = store
        .timer_counts(overdue_before.timestamp_millis())
        .await?;
    metrics::gauge!("order_saga_pending_timers").set(pending as f64);
    metrics::gauge!("order_saga_overdue_timers").set(overdue as f64);
    metrics::gauge!("order_saga_ready").set(if ready { 1.0 } else { 0.0 });
    metrics::gauge!("order_saga_dead_letters").set(store.pending_dead_letters().await? as f64);
    Ok(handle.render())
}
