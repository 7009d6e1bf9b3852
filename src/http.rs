//! The HTTP surface (axum): the REST API (`POST /api/v1/orders`,
//! `GET /api/v1/orders/{id}`), GraphQL (`POST /graphql`, GraphiQL on
//! `GET /graphql`, subscriptions over WebSocket on `/graphql/ws`),
//! `/healthz`, `/readyz` and `/metrics` (or those three on a separate
//! admin listener, [`admin_router`]).
//!
//! Every API route asks the [`Authenticator`] who calls (bearer JWT, or
//! nobody with `--auth none`) and applies [`Caller`]'s rules; health and
//! metrics stay open. Errors are JSON, `{"error": {"code", "message",
//! "field"?}}`, with a 4xx status for anything the client can fix: 400 for
//! a body that is not the request's JSON shape, 401 (with
//! `WWW-Authenticate: Bearer`) for missing or bad credentials, 403 for a
//! caller lacking the right, 422 for a value the domain refuses, 404 for
//! an unknown order (or another customer's), 409 for a conflict.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::http::{GraphiQLSource, ALL_WEBSOCKET_PROTOCOLS};
use async_graphql::Data;
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use order_saga_domain::FieldError;
use order_saga_graphql::{Backend, BackendError, Caller, ErrorCode, OrderSagaSchema};
use serde::Serialize;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::{Authenticator, Unauthenticated};
use crate::fault::Fault;
use crate::graphql_backend::ApiBackend;
use crate::health::Readiness;
use crate::leadership::Roles;
use crate::read_models::ReadModels;
use crate::saga::Saga;
use crate::service::{App, AppError, CreateOrderRequest, OrderView};
use tracing::Instrument;

/// Largest request body accepted; a 100-item order is far below it.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long a WebSocket may take to send `connection_init`.
const CONNECTION_INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// WebSocket close codes of graphql-transport-ws.
const CLOSE_UNAUTHORIZED: u16 = 4401;
const CLOSE_BAD_REQUEST: u16 = 4400;

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
    /// Who calls the API routes.
    pub auth: Arc<Authenticator>,
    /// Browser origins allowed by CORS (none: no CORS headers).
    pub cors_origins: Vec<HeaderValue>,
    /// `/metrics` is served by [`admin_router`] on its own listener, not here.
    pub admin_apart: bool,
}

impl HttpState {
    /// The service's routes over `app` and `projections`; `readiness` lists
    /// the background loops `/readyz` requires.
    pub fn new(app: Arc<App>, projections: Arc<ReadModels>, readiness: Readiness) -> Self {
        Self::serving(ApiBackend::new(app.clone(), projections), app, readiness)
    }

    /// [`HttpState::new`] with the running saga, which operators' redrives
    /// hand dead letters back to.
    pub fn with_saga(
        app: Arc<App>,
        projections: Arc<ReadModels>,
        saga: Arc<Saga>,
        readiness: Readiness,
    ) -> Self {
        let backend = ApiBackend::new(app.clone(), projections).with_saga(saga);
        Self::serving(backend, app, readiness)
    }

    fn serving(backend: ApiBackend, app: Arc<App>, readiness: Readiness) -> Self {
        let backend: Arc<dyn Backend> = Arc::new(backend);
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
            auth: Arc::new(Authenticator::none()),
            cors_origins: Vec::new(),
            admin_apart: false,
        }
    }

    /// The same routes behind `auth`.
    pub fn with_auth(mut self, auth: Authenticator) -> Self {
        self.auth = Arc::new(auth);
        self
    }
}

/// The API: REST, GraphQL, health, and `/metrics` unless it is apart.
pub fn router(state: HttpState) -> Router {
    let mut router = Router::new()
        .route("/api/v1/orders", post(create_order))
        .route("/api/v1/orders/{order_id}", get(get_order))
        .route("/graphql", get(graphiql).post(graphql))
        .route("/graphql/ws", get(graphql_ws))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready));
    if !state.admin_apart {
        router = router.route("/metrics", get(metrics));
    }
    if !state.cors_origins.is_empty() {
        router = router.layer(cors(state.cors_origins.clone()));
    }
    router
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The admin listener's routes (`--admin-addr`): `/metrics`, `/healthz`
/// and `/readyz`, for the network that monitors, not the internet.
pub fn admin_router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Browser frontends on `origins` may call the API (preflight answered).
fn cors(origins: Vec<HeaderValue>) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([header::LOCATION])
        .max_age(Duration::from_secs(600))
}

/// The caller of an API request; refuses (401) missing or bad credentials.
pub struct Authenticated(pub Caller);

impl FromRequestParts<HttpState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        caller_of(&state.auth, &parts.headers)
            .map(Authenticated)
            .map_err(ApiError::from)
    }
}

fn caller_of(auth: &Authenticator, headers: &HeaderMap) -> Result<Caller, Unauthenticated> {
    auth.caller(
        headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    )
}

/// A 401 asks for a bearer token (RFC 6750).
fn challenge(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
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
    /// `Retry-After`, for a fault the client should wait out.
    retry_after: Option<Duration>,
}

impl ApiError {
    fn bad_request(field: Option<String>, message: String) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "BAD_USER_INPUT",
            message,
            field,
            retry_after: None,
        }
    }
}

impl From<Unauthenticated> for ApiError {
    fn from(e: Unauthenticated) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "UNAUTHENTICATED",
            message: e.0,
            field: None,
            retry_after: None,
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        let status = match e.code {
            ErrorCode::BadUserInput => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::Unavailable | ErrorCode::StoreUnavailable | ErrorCode::StorageFull => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        };
        let retry_after = match e.code {
            ErrorCode::StoreUnavailable => Some(Fault::StoreUnavailable.retry_after()),
            ErrorCode::StorageFull => Some(Fault::StorageFull.retry_after()),
            _ => None,
        };
        ApiError {
            status,
            code: e.code.as_str(),
            message: e.message,
            field: e.field,
            retry_after,
        }
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        let message = e.to_string();
        let mut retry_after = None;
        let (status, code, field) = match e {
            AppError::Invalid(FieldError { field, .. })
            | AppError::UnknownProduct { field, .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "BAD_USER_INPUT",
                Some(field),
            ),
            AppError::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND", None),
            AppError::Conflict(_) => (StatusCode::CONFLICT, "CONFLICT", None),
            AppError::Fault { fault, .. } => {
                retry_after = Some(fault.retry_after());
                (StatusCode::SERVICE_UNAVAILABLE, fault.code(), None)
            }
            AppError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", None),
        };
        if retry_after.is_some() {
            tracing::warn!(error = %message, "request refused for now");
        } else if status.is_server_error() {
            tracing::error!(error = %message, "request failed");
        }
        ApiError {
            status,
            code,
            message,
            field,
            retry_after,
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
        let mut response = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(wait.as_secs().max(1)),
            );
        }
        match self.status {
            StatusCode::UNAUTHORIZED => challenge(response),
            _ => response,
        }
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
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut request = parse_body(&body)?;
    request.user_id = caller.order_user(std::mem::take(&mut request.user_id))?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            ApiError::bad_request(
                Some("Idempotency-Key".into()),
                "Idempotency-Key: must be printable ASCII".into(),
            )
        })?),
    };
    // One span for the acceptance, continuing the caller's trace if it
    // sent one; the saga's spans continue it.
    let span = tracing::info_span!("accept order", user_id = %request.user_id);
    let caller_trace = headers
        .get(crate::telemetry::TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    crate::telemetry::continue_trace(&span, caller_trace);
    let order = app.create_order(request, key).instrument(span).await?;
    let location = format!("/api/v1/orders/{}", order.order_id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(order),
    )
        .into_response())
}

/// The order; another customer's is 404, as an unknown one.
async fn get_order(
    State(HttpState { app, .. }): State<HttpState>,
    Authenticated(caller): Authenticated,
    Path(order_id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    app.order(&order_id)
        .await?
        .filter(|order| caller.owns(&order.user_id))
        .map(Json)
        .ok_or_else(|| AppError::NotFound.into())
}

/// Ready when the store answers and every background loop is alive.
async fn ready(State(state): State<HttpState>) -> Response {
    match unready(&state).await {
        Some((reason, code)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unavailable", "reason": reason, "code": code})),
        )
            .into_response(),
        None => Json(serde_json::json!({"status": "ready", "roles": state.roles.states()}))
            .into_response(),
    }
}

/// Why the instance is not ready (and the fault's code), if it is not.
async fn unready(state: &HttpState) -> Option<(String, Option<&'static str>)> {
    if let Err(e) = state.app.store().ping().await {
        let fault = Fault::of(&e).unwrap_or(Fault::StoreUnavailable);
        return Some((format!("store: {e}"), Some(fault.code())));
    }
    stalled(state).map(|name| (format!("{name}: not running"), None))
}

/// The first background loop that has not beaten lately, if any.
fn stalled(state: &HttpState) -> Option<&'static str> {
    state
        .readiness
        .components
        .iter()
        .find(|(_, heartbeat)| !heartbeat.alive(Duration::from_secs(5)))
        .map(|(name, _)| *name)
}

async fn metrics(State(state): State<HttpState>) -> Result<Response, ApiError> {
    let Some(handle) = &state.metrics else {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "UNAVAILABLE",
            message: "metrics recorder not installed".into(),
            field: None,
            retry_after: None,
        });
    };
    // The store answers the scrape's own queries or the scrape fails: only
    // the loops are left to ask.
    let ready = stalled(&state).is_none();
    let text = crate::telemetry::render(state.app.store(), handle, state.relay, ready)
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
/// the REST API, and must be one JSON request. Missing or bad credentials
/// refuse the whole request (401, `extensions.code` UNAUTHENTICATED).
async fn graphql(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let caller = match caller_of(&state.auth, &headers) {
        Ok(caller) => caller,
        Err(e) => {
            let error =
                async_graphql::Error::from(BackendError::new(ErrorCode::Unauthenticated, e.0))
                    .into_server_error(async_graphql::Pos::default());
            return challenge(
                (
                    StatusCode::UNAUTHORIZED,
                    Json(async_graphql::Response::from_errors(vec![error])),
                )
                    .into_response(),
            );
        }
    };
    let request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return ApiError::bad_request(None, format!("invalid GraphQL request: {e}"))
                .into_response()
        }
    };
    let mut response = state.schema.execute(request.data(caller)).await;
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

/// GraphQL subscriptions over WebSocket (graphql-transport-ws, and the
/// older graphql-ws). The token travels in `connection_init`'s payload
/// (`{"Authorization": "Bearer …"}`); missing or bad credentials close the
/// socket with 4401 before anything else happens.
async fn graphql_ws(
    State(state): State<HttpState>,
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| serve_ws(state, protocol, socket))
}

async fn serve_ws(state: HttpState, protocol: GraphQLProtocol, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let first = match tokio::time::timeout(CONNECTION_INIT_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(message))) => message,
        _ => return,
    };
    let caller = match connection_init_caller(&state.auth, &first) {
        Ok(caller) => caller,
        Err((code, reason)) => {
            let frame = CloseFrame {
                code,
                reason: close_reason(&reason).into(),
            };
            let _ = sink.send(Message::Close(Some(frame))).await;
            return;
        }
    };
    let mut data = Data::default();
    data.insert(caller);
    let stream = futures_util::stream::iter([Ok(first)]).chain(stream);
    GraphQLWebSocket::new_with_pair(sink, stream, state.schema.clone(), protocol)
        .with_data(data)
        .serve()
        .await;
}

/// The caller named by a `connection_init` message's payload.
fn connection_init_caller(
    auth: &Authenticator,
    message: &Message,
) -> Result<Caller, (u16, String)> {
    let init: serde_json::Value = match message {
        Message::Text(text) => serde_json::from_str(text.as_str())
            .map_err(|e| (CLOSE_BAD_REQUEST, format!("not JSON: {e}")))?,
        _ => return Err((CLOSE_BAD_REQUEST, "expected connection_init as text".into())),
    };
    if init.get("type").and_then(|t| t.as_str()) != Some("connection_init") {
        return Err((CLOSE_UNAUTHORIZED, "connection_init must come first".into()));
    }
    let header = init
        .get("payload")
        .and_then(|p| p.as_object())
        .and_then(|p| {
            p.iter()
                .find(|(key, _)| key.eq_ignore_ascii_case("authorization"))
        })
        .and_then(|(_, value)| value.as_str());
    auth.caller(header.map(str::as_bytes))
        .map_err(|e| (CLOSE_UNAUTHORIZED, e.0))
}

/// A close frame's reason is at most 123 bytes.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}
