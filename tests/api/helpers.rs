//! Fresh stores per test and the app started on port 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use order_saga::auth::Authenticator;
use order_saga::health::{Readiness, Tasks};
use order_saga::http::HttpState;
use order_saga::read_models::ReadModels;
use order_saga::saga::transport::LogTransport;
use order_saga::saga::{Saga, SagaOptions};
use order_saga::service::App;
use order_saga::store::{Store, StoreConfig};
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use std::time::Duration;
use uuid::Uuid;

/// Runs an `async fn(Backend)` test once per backend, as `NAME::sqlite` and
/// `NAME::postgres`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name($crate::helpers::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name($crate::helpers::Backend::Postgres).await;
            }
        }
    )*};
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn postgres_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A store no other test sees: a new SQLite directory, or a new PostgreSQL
/// schema. Dropped (directory removed, schema dropped) by [`TestStore::cleanup`].
pub struct TestStore {
    pub store: Store,
    pub backend: Backend,
    pub data_dir: PathBuf,
    pub schema: String,
}

impl TestStore {
    pub async fn new(backend: Backend) -> Self {
        let schema = format!("t_{}", Uuid::new_v4().simple());
        let data_dir = std::env::temp_dir().join(format!("order-saga-{schema}"));
        if backend == Backend::Postgres {
            let mut admin = PgConnection::connect(&postgres_url())
                .await
                .expect("connect to PostgreSQL (TEST_DATABASE_URL)");
            sqlx::query(&format!("CREATE SCHEMA {schema}"))
                .execute(&mut admin)
                .await
                .expect("create test schema");
        }
        TestStore {
            store: open_store(backend, &data_dir, &schema).await,
            backend,
            data_dir,
            schema,
        }
    }

    /// A new connection pool on the same data, as after a restart.
    pub async fn open(&self) -> Store {
        open_store(self.backend, &self.data_dir, &self.schema).await
    }

    /// The DATABASE_URL / DATA_DIR environment that points the binary here.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        match self.backend {
            Backend::Sqlite => vec![("DATA_DIR", self.data_dir.display().to_string())],
            Backend::Postgres => vec![
                ("DATA_DIR", self.data_dir.display().to_string()),
                (
                    "DATABASE_URL",
                    format!(
                        "{}?options=-c%20search_path%3D{}",
                        postgres_url(),
                        self.schema
                    ),
                ),
            ],
        }
    }

    pub async fn cleanup(self) {
        self.store.close().await;
        match self.backend {
            Backend::Sqlite => {
                let _ = std::fs::remove_dir_all(&self.data_dir);
            }
            Backend::Postgres => {
                let _ = std::fs::remove_dir_all(&self.data_dir);
                if let Ok(mut admin) = PgConnection::connect(&postgres_url()).await {
                    let _ = sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema))
                        .execute(&mut admin)
                        .await;
                }
            }
        }
    }
}

async fn open_store(backend: Backend, data_dir: &Path, schema: &str) -> Store {
    let store = match backend {
        Backend::Sqlite => Store::open(&StoreConfig::Sqlite {
            data_dir: data_dir.to_path_buf(),
        })
        .await
        .expect("open sqlite store"),
        Backend::Postgres => {
            let options: PgConnectOptions = postgres_url().parse().expect("postgres url");
            let options = options.options([("search_path", schema)]);
            Store::connect_postgres(options, 12)
                .await
                .expect("open postgres store")
        }
    };
    store.migrate().await.expect("migrate");
    store
}

/// The real application serving on a free port.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub app: Arc<App>,
    pub projections: Arc<ReadModels>,
    server: tokio::task::JoinHandle<()>,
    _loops: Option<(Tasks, tokio::sync::watch::Sender<bool>)>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The HTTP API alone: no saga, no projection running.
pub async fn spawn_app(store: Store) -> TestApp {
    start(store, false, Authenticator::none()).await
}

/// The whole service, as `serve` runs it: HTTP, saga and projections.
pub async fn spawn_service(store: Store) -> TestApp {
    start(store, true, Authenticator::none()).await
}

/// [`spawn_service`] behind `auth`.
pub async fn spawn_service_with_auth(store: Store, auth: Authenticator) -> TestApp {
    start(store, true, auth).await
}

async fn start(store: Store, with_loops: bool, auth: Authenticator) -> TestApp {
    let app = App::new(store.clone());
    let projections = ReadModels::new(store.clone());
    let mut readiness = Readiness::default();
    let mut running = None;
    let loops = if with_loops {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let saga = Saga::new(
            store.clone(),
            &LogTransport::new(store.clone()),
            SagaOptions::default(),
        )
        .await
        .expect("saga");
        let mut tasks = saga.spawn(shutdown.clone());
        tasks.extend(projections.spawn(Duration::from_millis(5), shutdown));
        readiness.components = vec![
            ("saga", saga.heartbeat()),
            ("projections", projections.heartbeat()),
        ];
        running = Some(saga);
        Some((tasks, stop))
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let address = format!("http://{}", listener.local_addr().expect("local addr"));
    let state = match running {
        Some(saga) => HttpState::with_saga(app.clone(), projections.clone(), saga, readiness),
        None => HttpState::new(app.clone(), projections.clone(), readiness),
    };
    let router = order_saga::http::router(state.with_auth(auth));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    TestApp {
        address,
        client: reqwest::Client::new(),
        app,
        projections,
        server,
        _loops: loops,
    }
}

/// A client's end of `/graphql/ws`.
pub type GraphqlSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `address`'s `/graphql/ws`, sends `connection_init` with
/// `init_payload` and subscribes (id "1") to `orderStatusChanged(orderId)`
/// selecting `fields`. Returns the socket and how sending the subscription
/// went (a server that refused the init may have closed already).
pub async fn follow_order_at(
    address: &str,
    init_payload: serde_json::Value,
    order_id: &str,
    fields: &str,
) -> (
    GraphqlSocket,
    Result<(), tokio_tungstenite::tungstenite::Error>,
) {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut socket = graphql_ws_at(address).await;
    let init = serde_json::json!({"type": "connection_init", "payload": init_payload});
    socket
        .send(Message::Text(init.to_string().into()))
        .await
        .expect("init");
    let subscribe = serde_json::json!({
        "id": "1",
        "type": "subscribe",
        "payload": {
            "query": format!("subscription($id: ID!) {{ orderStatusChanged(orderId: $id) {{ {fields} }} }}"),
            "variables": {"id": order_id}
        }
    });
    let sent = socket
        .send(Message::Text(subscribe.to_string().into()))
        .await;
    (socket, sent)
}

/// A WebSocket to `address`'s `/graphql/ws` speaking graphql-transport-ws.
pub async fn graphql_ws_at(address: &str) -> GraphqlSocket {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{address}/graphql/ws").replacen("http", "ws", 1);
    let mut request = url.into_client_request().expect("ws request");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().expect("header"),
    );
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect");
    socket
}

impl TestApp {
    /// One GraphQL request over HTTP; the JSON answer.
    pub async fn graphql(&self, query: &str, variables: Value) -> Value {
        self.client
            .post(format!("{}/graphql", self.address))
            .json(&serde_json::json!({"query": query, "variables": variables}))
            .send()
            .await
            .expect("POST /graphql")
            .json()
            .await
            .expect("GraphQL response")
    }

    pub async fn set_product(&self, product_id: &str, price: &str, stock: u32) {
        self.app
            .set_product(product_id, Some(price.parse().expect("price")), Some(stock))
            .await
            .expect("set product");
    }

    pub async fn post_order(&self, body: &Value) -> reqwest::Response {
        self.post_order_raw(body.to_string(), None).await
    }

    pub async fn post_order_raw(&self, body: String, key: Option<&str>) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/api/v1/orders", self.address))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.expect("POST /api/v1/orders")
    }

    pub async fn get_order(&self, order_id: &str) -> reqwest::Response {
        self.client
            .get(format!("{}/api/v1/orders/{order_id}", self.address))
            .send()
            .await
            .expect("GET /api/v1/orders/{id}")
    }
}

/// POSTs an order to the service at `url`; its id.
pub async fn create_order(client: &reqwest::Client, url: &str, body: &Value) -> String {
    let created: Value = client
        .post(format!("{url}/api/v1/orders"))
        .json(body)
        .send()
        .await
        .expect("POST")
        .json()
        .await
        .expect("json");
    created["orderId"].as_str().expect("orderId").to_string()
}

/// The service's `/metrics` text.
pub async fn metrics_text(client: &reqwest::Client, url: &str) -> String {
    client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text")
}

pub fn order_body(items: &[(&str, i64)]) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|(p, q)| serde_json::json!({"productId": p, "quantity": q}))
        .collect();
    serde_json::json!({"userId": "u-1", "storeId": "s-1", "items": items})
}

/// Runs `sql` (one or more statements) on the test's store, as an operator
/// at a SQL prompt would.
pub async fn raw_sql(store: &Store, sql: &str) {
    match store {
        Store::Postgres(db) => sqlx::raw_sql(sql).execute(&db.pool).await.map(|_| ()),
        Store::Sqlite(db) => sqlx::raw_sql(sql).execute(&db.write).await.map(|_| ()),
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
}
