//! Telemetry. Traces: OpenTelemetry over OTLP/HTTP, on when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the SDK reads the other `OTEL_*`
//! settings itself); the W3C `traceparent` of the span that appended an
//! event travels in the event's metadata and in its Kafka record's headers,
//! and each consumer's span of that event continues the trace.
//!
//! Metrics export: the Prometheus recorder behind the `metrics` facade the
//! rest of the code records into, and the gauges computed at scrape time
//! (log head, relay, consumer and projection lag, pending and overdue
//! timers, dead letters, readiness). Consumer lag is the in-process
//! transport's (log head minus the group's checkpoint); on Kafka, the broker
//! reports its groups' lag. Every counter is registered at zero when the
//! recorder is installed, so that a rate over it (`ops/prometheus/`) has a
//! series before the first increment.

use std::collections::HashMap;
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

/// The W3C trace-context key in event metadata and Kafka record headers.
pub const TRACEPARENT: &str = "traceparent";

/// The OTLP span exporter's provider, when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// is set; installs the W3C trace-context propagator.
pub fn otlp_tracer() -> Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>, String> {
    let configured = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .is_ok_and(|endpoint| !endpoint.trim().is_empty());
    if !configured {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("order-saga")
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    Ok(Some(provider))
}

/// The `traceparent` of the current span, when traces are exported.
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut carrier)
    });
    carrier.remove(TRACEPARENT)
}

/// Makes `span` continue the trace `traceparent` names (if any).
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let context =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&carrier));
    let _ = span.set_parent(context);
}
