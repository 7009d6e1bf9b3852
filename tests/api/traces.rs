//! Tracing across the saga: the real binary with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! pointing at a small OTLP/HTTP receiver here (its requests decoded with
//! `opentelemetry-proto`). An order posted with a W3C `traceparent` is one
//! trace from its acceptance through the stock reservation, the
//! confirmation and the payment wait — over the in-process bus, and over
//! Kafka, where the context travels in the record headers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::Value;
use tokio::time::Instant;

use crate::binary::{order_saga, serve_with};
use crate::helpers::{order_body, Backend, TestStore};
use crate::kafka::{broker_lock, kafka_env, wait_for_relay};

/// The caller's trace: every span of the order's saga must belong to it.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A span as received: its name, trace id (hex) and string attributes.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    trace_id: String,
    attributes: Vec<(String, String)>,
}

type Spans = Arc<Mutex<Vec<Received>>>;

/// An OTLP/HTTP receiver on a free port: its endpoint and the spans it got.
async fn otlp_receiver() -> (String, Spans, tokio::task::JoinHandle<()>) {
    async fn export(State(spans): State<Spans>, body: Bytes) -> Vec<u8> {
        if let Ok(request) = ExportTraceServiceRequest::decode(body) {
            let mut spans = spans.lock().expect("lock");
            for span in request
                .resource_spans
                .into_iter()
                .flat_map(|r| r.scope_spans)
                .flat_map(|s| s.spans)
            {
                let attributes = span
                    .attributes
                    .into_iter()
                    .filter_map(|kv| match kv.value?.value? {
                        AnyValue::StringValue(value) => Some((kv.key, value)),
                        _ => None,
                    })
                    .collect();
                spans.push(Received {
                    name: span.name,
                    trace_id: span.trace_id.iter().map(|b| format!("{b:02x}")).collect(),
                    attributes,
                });
            }
        }
        ExportTraceServiceResponse::default().encode_to_vec()
    }
    let spans = Spans::default();
    let router = Router::new()
        .route("/v1/traces", post(export))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (endpoint, spans, server)
}

/// The saga's steps whose spans the trace must hold: (consumer group,
/// topic handled).
const STEPS: [(&str, &str); 3] = [
    ("order-saga.stock", "order.created"),
    ("order-saga.order", "stock.reserved"),
    ("order-saga.order", "order.confirmed"),
];

async fn one_trace_spans_the_saga(extra_env: Vec<(String, String)>) {
    let t = TestStore::new(Backend::Postgres).await;
    let set = order_saga(&t)
        .args(["product", "set", "p-1", "--price", "10.00", "--stock", "5"])
        .output()
        .await
        .expect("product set");
    assert!(set.status.success());
    let (endpoint, spans, receiver) = otlp_receiver().await;
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
        ("RUST_LOG".to_string(), "info".to_string()),
    ];
    let kafka = !extra_env.is_empty();
    env.extend(extra_env);
    let (_service, url) = serve_with(&t, &env).await;
    if kafka {
        wait_for_relay(&t.store, &url).await;
    }
    let client = reqwest::Client::new();
    let created: Value = client
        .post(format!("{url}/api/v1/orders"))
        .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
        .json(&order_body(&[("p-1", 1)]))
        .send()
        .await
        .expect("POST")
        .json()
        .await
        .expect("JSON");
    let order_id = created["orderId"].as_str().expect("orderId").to_string();

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let received = spans.lock().expect("lock").clone();
        let ours: Vec<&Received> = received.iter().filter(|s| s.trace_id == TRACE_ID).collect();
        let has = |name: &str, group: &str, topic: &str| {
            ours.iter().any(|s| {
                let attribute = |key: &str| {
                    s.attributes
                        .iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.as_str())
                };
                s.name == name
                    && (group.is_empty() || attribute("group") == Some(group))
                    && (topic.is_empty() || attribute("topic").is_some_and(|t| t.ends_with(topic)))
                    && (topic.is_empty() || attribute("order_id") == Some(order_id.as_str()))
            })
        };
        let missing: Vec<&(&str, &str)> = STEPS
            .iter()
            .filter(|(group, topic)| !has("handle", group, topic))
            .collect();
        if has("accept order", "", "") && missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in 90 s, trace {TRACE_ID} got no span for {missing:?} (accept: {}); spans: {received:#?}",
            has("accept order", "", "")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    receiver.abort();
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_spans_acceptance_stock_confirmation_and_payment_wait_in_process() {
    one_trace_spans_the_saga(Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_spans_acceptance_stock_confirmation_and_payment_wait_over_kafka() {
    let _broker = broker_lock().await;
    let prefix = format!("trace-{}.", uuid::Uuid::new_v4().simple());
    one_trace_spans_the_saga(kafka_env(&prefix)).await;
}
