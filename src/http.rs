//! The REST API (axum): `POST /api/v1/orders`, `GET /api/v1/orders/{id}`,
//! `/healthz` and `/readyz`.
//!
//! Errors are JSON, `{"error": {"code", "message", "field"?}}`, with a 4xx
//! status for anything the client can fix: 400 for a body that is not the
//! request's JSON shape, 422 for a value the domain refuses, 404 for an
//! unknown order, 409 for a conflict.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use order_saga_domain::FieldError;
use serde::Serialize;

use crate::service::{App, AppError, CreateOrderRequest, OrderView};

/// Largest request body accepted; a 100-item order is far below it.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/api/v1/orders", post(create_order))
        .route("/api/v1/orders/{order_id}", get(get_order))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
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
    State(app): State<Arc<App>>,
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
    State(app): State<Arc<App>>,
    Path(order_id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    app.order(&order_id)
        .await?
        .map(Json)
        .ok_or_else(|| AppError::NotFound.into())
}

async fn ready(State(app): State<Arc<App>>) -> Result<&'static str, ApiError> {
    app.store().ping().await.map_err(AppError::from)?;
    Ok("ready")
}
