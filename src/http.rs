//! The HTTP surface (axum): the REST API (`POST /api/v1/orders`,
//! `GET /api/v1/orders/{id}`), GraphQL (`POST /graphql`, GraphiQL on
//! `GET /graphql`, subscriptions over WebSocket on `/graphql/ws`),
//! `/healthz`, `/readyz` and `/metrics`.
//!
//! Errors are JSON, `{"error": {"code", "message", "field"?}}`, with a 4xx
//! status for anything the client can fix: 400 for a body that is not the
//! request's JSON shape, 422 for a value the domain refuses, 404 for an
//! unknown order, 409 for a conflict.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::http::GraphiQLSource;
use async_graphql_axum::GraphQLSubscription;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use order_saga_domain::FieldError;
use order_saga_graphql::{Backend, OrderSagaSchema};
use serde::Serialize;

use crate::graphql_backend::ApiBackend;
use crate::health::Readiness;
use crate::leadership::Roles;
use crate::read_models::ReadModels;
use crate::service::{App, AppError, CreateOrderRequest, OrderView};

/// Largest request body accepted; a 100-item order is far below it.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the routes need.
#[derive(Clone)]
pub struct HttpState {
    pub app: Arc<App>,
    pub schema: OrderSagaSchema,
    pub readiness: Readiness,
    pub metrics: Option<PrometheusHandle>,
    /// Whether a Kafka relay runs (its lag is then reported).
    pub relay: bool,
    /// The single-instance roles, for `/readyz` to say which this instance holds.
    pub roles: Roles,
}

impl HttpState {
    /// The service's routes over `app` and `projections`; `readiness` lists
    /// the background loops `/readyz` requires.
    pub fn new(app: Arc<App>, projections: Arc<ReadModels>, readiness: Readiness) -> Self {
        let backend: Arc<dyn Backend> = Arc::new(ApiBackend::new(app.clone(), projections));
        HttpState {
            app,
            schema: order_saga_graphql::schema(Some(backend)),
            relay: readiness
                .components
                .iter()
                .any(|(name, _)| *name == "broker"),
            readiness,
            metrics: crate::telemetry::prometheus(),
            roles: Roles::solo(),
        }
    }
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/api/v1/orders", post(create_order))
        .route("/api/v1/orders/{order_id}", get(get_order))
        .route("/graphql", get(graphiql).post(graphql))
        .route_service(
            "/graphql/ws",
            GraphQLSubscription::new(state.schema.clone()),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

#[derive(Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize)]
struct ErrorDetail {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
}

/// An error as the API answers it.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn bad_request(field: Option<String>, message: String) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "BAD_USER_INPUT",
            message,
            field,
        }
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        let message = e.to_string();
        let (status, code, field) = match e {
            AppError::Invalid(FieldError { field, .. })
            | AppError::UnknownProduct { field, .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "BAD_USER_INPUT",
                Some(field),
            ),
            AppError::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND", None),
            AppError::Conflict(_) => (StatusCode::CONFLICT, "CONFLICT", None),
            AppError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", None),
            AppError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", None),
        };
        if status.is_server_error() {
            tracing::error!(error = %message, "request failed");
        }
        ApiError {
            status,
            code,
            message,
            field,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                field: self.field,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// Parses the body ourselves so that a wrong shape names the field
/// (`items[0].quantity`), not just a line and column.
fn parse_body(body: &[u8]) -> Result<CreateOrderRequest, ApiError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::bad_request(None, format!("malformed JSON: {inner}"));
        }
        let field = match (path.as_str(), missing_field(&inner.to_string())) {
            ("." | "?", Some(missing)) => Some(missing),
            ("." | "?", None) => None,
            (path, Some(missing)) => Some(format!("{path}.{missing}")),
            (path, None) => Some(path.to_string()),
        };
        ApiError::bad_request(field, format!("invalid request body: {inner}"))
    })
}

/// serde reports a missing field in its message only: "missing field `x`".
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_string())
}

async fn create_order(
    State(HttpState { app, .. }): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request = parse_body(&body)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            ApiError::bad_request(
                Some("Idempotency-Key".into()),
                "Idempotency-Key: must be printable ASCII".into(),
            )
        })?),
    };
    let order = app.create_order(request, key).await?;
    let location = format!("/api/v1/orders/{}", order.order_id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(order),
    )
        .into_response())
}

async fn get_order(
    State(HttpState { app, .. }): State<HttpState>,
    Path(order_id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    app.order(&order_id)
        .await?
        .map(Json)
        .ok_or_else(|| AppError::NotFound.into())
}

/// Ready when the store answers and every background loop is alive.
async fn ready(State(state): State<HttpState>) -> Response {
    let unavailable = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unavailable", "reason": reason})),
        )
            .into_response()
    };
    if let Err(e) = state.app.store().ping().await {
        return unavailable(format!("store: {e}"));
    }
    for (name, heartbeat) in &state.readiness.components {
        if !heartbeat.alive(Duration::from_secs(5)) {
            return unavailable(format!("{name}: not running"));
        }
    }
    Json(serde_json::json!({"status": "ready", "roles": state.roles.states()})).into_response()
}

async fn metrics(State(state): State<HttpState>) -> Result<Response, ApiError> {
    let Some(handle) = &state.metrics else {
        return Err(AppError::Unavailable("metrics recorder not installed".into()).into());
    };
    let text = crate::telemetry::render(state.app.store(), handle, state.relay)
        .await
        .map_err(AppError::from)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn graphiql() -> Html<String> {
    Html(
        GraphiQLSource::build()
            .endpoint("/graphql")
            .subscription_endpoint("/graphql/ws")
            .finish(),
    )
}

/// GraphQL over POST. The body is read here, under the same size limit as
/// the REST API, and must be one JSON request.
async fn graphql(State(state): State<HttpState>, body: Bytes) -> Response {
    let request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return ApiError::bad_request(None, format!("invalid GraphQL request: {e}"))
                .into_response()
        }
    };
    let mut response = state.schema.execute(request).await;
    // Errors the schema raises itself (parse, validation, depth) are the
    // client's: give them the same code as refused input.
    for error in &mut response.errors {
        let extensions = error.extensions.get_or_insert_with(Default::default);
        if extensions.get("code").is_none() {
            extensions.set("code", "BAD_USER_INPUT");
        }
    }
    Json(response).into_response()
}
