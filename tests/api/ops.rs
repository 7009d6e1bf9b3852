//! The operations kit in `ops/` against the real tools: the Prometheus
//! rules pass `promtool check rules` and their unit tests, and a real
//! Prometheus (Debian's `prometheus`, found at `TEST_PROMETHEUS` or on the
//! PATH) scraping the real binary under a small load evaluates every rule
//! without error, records a sample for every recording rule, and evaluates
//! every expression of the Grafana dashboard.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use crate::binary::{order_saga, serve};
use crate::helpers::{create_order, order_body, Backend, TestStore};

fn ops(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ops").join(path)
}

/// A tool of Debian's `prometheus` package: `TEST_<NAME>` or the PATH.
fn tool(name: &str) -> String {
    std::env::var(format!("TEST_{}", name.to_uppercase())).unwrap_or_else(|_| name.to_string())
}

async fn promtool(args: &[&str]) -> String {
    let output = Command::new(tool("promtool"))
        .args(args)
        .current_dir(ops("prometheus"))
        .output()
        .await
        .expect("run promtool (Debian package `prometheus`; scripts/test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[tokio::test]
async fn the_rules_pass_promtool_check_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "order-saga.rules.yml"]).await;
    let rules = rule_names().len();
    assert!(
        checked.contains(&format!("SUCCESS: {rules} rules found")),
        "{checked}"
    );
    let tested = promtool(&["test", "rules", "order-saga.rules.test.yml"]).await;
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// (recorded series or alert name, whether it is a recording rule), read
/// from the rules file's `- record:` and `- alert:` lines.
fn rule_names() -> Vec<(String, bool)> {
    let text = std::fs::read_to_string(ops("prometheus/order-saga.rules.yml")).expect("rules");
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            line.strip_prefix("- record: ")
                .map(|name| (name.trim().to_string(), true))
                .or_else(|| {
                    line.strip_prefix("- alert: ")
                        .map(|name| (name.trim().to_string(), false))
                })
        })
        .collect()
}

/// Every `expr` of the dashboard's panels.
fn dashboard_expressions() -> Vec<String> {
    fn collect(value: &Value, into: &mut Vec<String>) {
        match value {
            Value::Object(fields) => {
                if let Some(Value::String(expr)) = fields.get("expr") {
                    into.push(expr.clone());
                }
                fields.values().for_each(|v| collect(v, into));
            }
            Value::Array(items) => items.iter().for_each(|v| collect(v, into)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(ops("grafana/order-saga.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect(&dashboard["panels"], &mut exprs);
    exprs
}

/// A loopback port nothing listens on (Prometheus needs one named).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A Prometheus query's result, or its error.
async fn query(
    client: &reqwest::Client,
    prometheus: &str,
    expr: &str,
) -> Result<Vec<Value>, String> {
    let answer: Value = client
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    if answer["status"] != "success" {
        return Err(answer.to_string());
    }
    Ok(answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_records_every_rule_and_evaluates_every_dashboard_expression() {
    let t = TestStore::new(Backend::Postgres).await;
    let set = order_saga(&t)
        .args(["product", "set", "p-1", "--price", "10.00", "--stock", "6"])
        .output()
        .await
        .expect("product set");
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let (_service, url) = serve(&t).await;
    let client = reqwest::Client::new();

    let dir = tempdir_for(&t);
    let port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{rules:?}]\n\
             scrape_configs:\n  - job_name: order-saga\n    static_configs:\n      - targets: [{target:?}]\n",
            rules = ops("prometheus/order-saga.rules.yml").display().to_string(),
            target = url.trim_start_matches("http://"),
        ),
    )
    .expect("write prometheus.yml");
    let _prometheus = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus (Debian package `prometheus`; scripts/test installs it)");
    let prometheus = format!("http://127.0.0.1:{port}");

    // A small load: orders keep coming, six of them find stock and the
    // rest are cancelled for its shortage, until every recording rule has
    // a sample.
    let recorded: Vec<String> = rule_names()
        .into_iter()
        .filter_map(|(name, record)| record.then_some(name))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut missing = recorded.clone();
    while !missing.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sample in 120 s for the recording rules {missing:?}"
        );
        create_order(&client, &url, &order_body(&[("p-1", 1)])).await;
        let mut still = Vec::new();
        for name in missing {
            if !matches!(query(&client, &prometheus, &name).await, Ok(samples) if !samples.is_empty())
            {
                still.push(name);
            }
        }
        missing = still;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let rules: Value = client
        .get(format!("{prometheus}/api/v1/rules"))
        .send()
        .await
        .expect("GET /api/v1/rules")
        .json()
        .await
        .expect("rules JSON");
    let loaded: Vec<Value> = rules["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(loaded.len(), rule_names().len(), "every rule is loaded");
    for rule in &loaded {
        assert_eq!(
            rule["health"], "ok",
            "rule {} evaluates with an error: {}",
            rule["name"], rule["lastError"]
        );
    }
    let up = query(&client, &prometheus, "order_saga_ready * on(instance) up")
        .await
        .expect("ready");
    assert_eq!(up.len(), 1, "the instance is scraped and ready: {up:?}");
    assert_eq!(up[0]["value"][1], "1");

    let exprs = dashboard_expressions();
    assert!(exprs.len() >= 20, "the dashboard's expressions: {exprs:?}");
    for expr in &exprs {
        if let Err(e) = query(&client, &prometheus, expr).await {
            panic!("dashboard expression `{expr}` does not evaluate: {e}");
        }
    }
    let funnel = query(
        &client,
        &prometheus,
        "order_saga:compensations:rate5m{reason=\"STOCK_SHORTAGE\"}",
    )
    .await
    .expect("compensations");
    assert_eq!(funnel.len(), 1, "stock shortages are recorded: {funnel:?}");
    let _ = std::fs::remove_dir_all(&dir);
    t.cleanup().await;
}

/// A directory for Prometheus's configuration and data, beside the test's.
fn tempdir_for(t: &TestStore) -> PathBuf {
    let dir = t.data_dir.with_extension("prometheus");
    std::fs::create_dir_all(&dir).expect("create the Prometheus directory");
    dir
}
