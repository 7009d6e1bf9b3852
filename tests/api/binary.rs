//! The real `order-saga` binary, configured only by its environment: an
//! operator sets a product with `product set`, the service accepts and
//! prices an order, and the order is still there after the process is
//! killed and started again.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::{order_body, Backend, TestStore};
use crate::on_both_backends;

on_both_backends!(the_binary_serves_orders_priced_by_product_set_across_a_restart);

pub(crate) fn order_saga(t: &TestStore) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_order-saga"));
    command
        .env_remove("DATABASE_URL")
        .env_remove("HTTP_ADDR")
        .env("RUST_LOG", "warn")
        .envs(t.env())
        .kill_on_drop(true);
    command
}

/// Starts `order-saga` with no subcommand (serve is the default) on a free
/// port; returns the process and its base URL, read from its first line.
pub async fn serve(t: &TestStore) -> (Child, String) {
    serve_with(t, &[]).await
}

/// [`serve`] with more environment.
pub async fn serve_with(t: &TestStore, env: &[(String, String)]) -> (Child, String) {
    let (child, mut lines) = spawn_serve(t, env);
    let url = printed_address(&mut lines, "listening on ").await;
    (child, url)
}

type Stdout = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

fn spawn_serve(t: &TestStore, env: &[(String, String)]) -> (Child, Stdout) {
    let mut child = order_saga(t)
        .env("HTTP_ADDR", "127.0.0.1:0")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start order-saga");
    let stdout = child.stdout.take().expect("stdout");
    (child, BufReader::new(stdout).lines())
}

/// The address on the next line of `serve`'s output, which starts `prefix`.
async fn printed_address(lines: &mut Stdout, prefix: &str) -> String {
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("order-saga printed its address in time")
        .expect("read stdout")
        .expect("a line");
    line.strip_prefix(prefix)
        .unwrap_or_else(|| panic!("expected `{prefix}…`, got: {line}"))
        .to_string()
}

async fn the_binary_serves_orders_priced_by_product_set_across_a_restart(backend: Backend) {
    let t = TestStore::new(backend).await;
    let output = order_saga(&t)
        .args([
            "product", "set", "p-1", "--price", "12900.00", "--stock", "15",
        ])
        .output()
        .await
        .expect("run product set");
    assert!(
        output.status.success(),
        "product set: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let shown = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        shown.contains("p-1") && shown.contains("12900.00") && shown.contains("15"),
        "{shown}"
    );

    let client = reqwest::Client::new();
    let (mut server, url) = serve(&t).await;
    let response = client
        .post(format!("{url}/api/v1/orders"))
        .json(&order_body(&[("p-1", 2)]))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.expect("json");
    let order_id = created["orderId"].as_str().expect("orderId").to_string();

    // A product set while the service runs is what the next order is priced at.
    let output = order_saga(&t)
        .args(["product", "set", "p-1", "--price", "100.00"])
        .output()
        .await
        .expect("run product set");
    assert!(output.status.success());
    let second: Value = client
        .post(format!("{url}/api/v1/orders"))
        .json(&order_body(&[("p-1", 1)]))
        .send()
        .await
        .expect("POST")
        .json()
        .await
        .expect("json");
    assert_eq!(second["totalAmount"], "100.00");

    server.kill().await.expect("kill the service");
    let (mut server, url) = serve(&t).await;
    let order: Value = client
        .get(format!("{url}/api/v1/orders/{order_id}"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(order["orderId"], order_id.as_str());
    assert_eq!(order["items"][0]["unitPrice"], "12900.00");
    assert_eq!(order["totalAmount"], "25800.00");

    // SIGTERM: the service finishes what it is doing and exits cleanly.
    let pid = server.id().expect("running").to_string();
    let term = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill -TERM");
    assert!(term.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), server.wait())
        .await
        .expect("stopped within 30 s")
        .expect("exit status");
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");

    // A wrong setting fails at start, naming it.
    let output = order_saga(&t)
        .env("DATABASE_URL", "mysql://nowhere")
        .arg("migrate")
        .output()
        .await
        .expect("run migrate");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("DATABASE_URL"));
    t.cleanup().await;
}

/// The service runs without transparent huge pages: with them, the kernel
/// refilled the memory mimalloc had handed back, 2 MiB at a time, minutes
/// after a burst (ARCHITECTURE.md, "No transparent huge pages").
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_runs_without_transparent_huge_pages() {
    let t = TestStore::new(Backend::Sqlite).await;
    let (mut server, _url) = serve(&t).await;
    let pid = server.id().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    server.kill().await.expect("kill the service");
    let thp = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "{status}");
    t.cleanup().await;
}

/// Settings that would expose the service refuse to start, each naming the
/// setting; `order-saga token` mints what `--auth jwt` then accepts.
#[tokio::test]
async fn unsafe_or_incomplete_auth_settings_refuse_to_start() {
    let t = TestStore::new(Backend::Sqlite).await;
    let refusals: [(&[(&str, &str)], &str); 4] = [
        (&[("HTTP_ADDR", "0.0.0.0:0")], "--allow-anonymous"),
        (&[("AUTH_MODE", "jwt")], "AUTH_JWT_SECRET"),
        (
            &[
                ("AUTH_MODE", "jwt"),
                ("AUTH_JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem"),
            ],
            "AUTH_JWT_PUBLIC_KEY_FILE",
        ),
        (
            &[
                ("AUTH_MODE", "jwt"),
                ("AUTH_JWKS_FILE", "/nonexistent/jwks.json"),
            ],
            "AUTH_JWKS_FILE",
        ),
    ];
    for (env, setting) in refusals {
        let output = order_saga(&t)
            .env("HTTP_ADDR", "127.0.0.1:0")
            .envs(env.iter().copied())
            .output()
            .await
            .expect("run order-saga");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{env:?} must not start");
        assert!(stderr.contains(setting), "{env:?}: {stderr}");
    }
    let secret = [
        ("AUTH_MODE".to_string(), "jwt".to_string()),
        (
            "AUTH_JWT_SECRET".to_string(),
            "binary-test-secret".to_string(),
        ),
        (
            "CORS_ORIGINS".to_string(),
            "https://shop.example.test".to_string(),
        ),
    ];
    let token = order_saga(&t)
        .args(["token", "--sub", "ops-1", "--role", "operator"])
        .env("AUTH_JWT_SECRET", "binary-test-secret")
        .output()
        .await
        .expect("order-saga token");
    let token = String::from_utf8_lossy(&token.stdout).trim().to_string();
    let (_child, url) = serve_with(&t, &secret).await;
    let client = reqwest::Client::new();
    let stats = |auth: Option<String>| {
        let mut request = client
            .post(format!("{url}/graphql"))
            .json(&serde_json::json!({"query": "{ sagaStats { ordersCreated } }"}));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    let anonymous = stats(None).await.expect("POST /graphql");
    assert_eq!(anonymous.status(), 401);
    let operator = stats(Some(format!("Bearer {token}")))
        .await
        .expect("POST /graphql");
    assert_eq!(operator.status(), 200);
    let body: Value = operator.json().await.expect("json");
    assert_eq!(body["data"]["sagaStats"]["ordersCreated"], 0, "{body}");
    // A browser frontend on the configured origin: its preflight is answered.
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, format!("{url}/graphql"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let allowed = preflight("https://shop.example.test")
        .await
        .expect("preflight");
    assert_eq!(
        allowed
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://shop.example.test")
    );
    let other = preflight("https://evil.example.test")
        .await
        .expect("preflight");
    assert!(other.headers().get("access-control-allow-origin").is_none());
    t.cleanup().await;
}

/// With `--admin-addr`, `/metrics` is served there only — beside the
/// health checks, without a token — and no longer on the API's address.
#[tokio::test]
async fn metrics_move_to_the_admin_listener() {
    let t = TestStore::new(Backend::Sqlite).await;
    let env = [
        ("ADMIN_ADDR", "127.0.0.1:0"),
        ("AUTH_MODE", "jwt"),
        ("AUTH_JWT_SECRET", "admin-test-secret"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let (_child, mut lines) = spawn_serve(&t, &env);
    let api = printed_address(&mut lines, "listening on ").await;
    let admin = printed_address(&mut lines, "admin listening on ").await;
    assert_ne!(api, admin);
    let client = reqwest::Client::new();
    let get = |url: String| {
        let client = client.clone();
        async move {
            let response = client.get(&url).send().await.expect("GET");
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
    };
    // The gauges appear with the first upkeep pass after start.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let (status, metrics) = get(format!("{admin}/metrics")).await;
        assert_eq!(status, 200, "{metrics}");
        if metrics.contains("order_saga_") || tokio::time::Instant::now() >= deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(metrics.contains("order_saga_"), "{metrics}");
    assert_eq!(get(format!("{admin}/readyz")).await.0, 200);
    assert_eq!(get(format!("{admin}/healthz")).await.0, 200);
    assert_eq!(get(format!("{api}/metrics")).await.0, 404, "not on the API");
    assert_eq!(
        get(format!("{api}/readyz")).await.0,
        200,
        "health stays open"
    );
    let graphql = client
        .post(format!("{admin}/graphql"))
        .json(&serde_json::json!({"query": "{ sagaStats { ordersCreated } }"}))
        .send()
        .await
        .expect("POST /graphql");
    assert_eq!(
        graphql.status(),
        404,
        "the API is not on the admin listener"
    );
    t.cleanup().await;
}
