//! `order-saga bench --suite`: the benchmark suite behind `scripts/bench`.
//!
//! Every run gets a fresh instance of the service — this binary's `serve`
//! as a child process — on a fresh store (a temporary directory, or a new
//! PostgreSQL database dropped afterwards, plus a fresh topic prefix with
//! Kafka), and is driven by the open-loop generator ([`super::run`]).
//! Scenarios: a doubling ramp until saturation, a bisection for the maximum
//! sustainable rate, one hot product, and a long run (memory and rate over
//! time); plus the platform's ceilings ([`super::ceilings`]). The results
//! go to BENCHMARKS.md and a JSON file beside it ([`super::report`]),
//! rewritten after every scenario so an interrupted suite leaves what it
//! measured.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::time::Instant;

use super::admin::Admin;
use super::ceilings::{
    self, Ceilings, BENCH_KAFKA_CONSUMER_CONFIG, BENCH_KAFKA_PARTITIONS,
    BENCH_KAFKA_PRODUCER_CONFIG,
};
use super::child::Service;
use super::report::{self, Machine, Target};
use super::{BenchConfig, BenchReport};

/// What stores the service and carries its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// The embedded SQLite store, in-process bus.
    Embedded,
    /// PostgreSQL, in-process bus.
    Postgres,
    /// PostgreSQL with Kafka as the bus.
    PostgresKafka,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Embedded, Backend::Postgres, Backend::PostgresKafka];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Postgres => "postgres",
            Backend::PostgresKafka => "postgres+kafka",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Backend::Embedded => "Embedded (SQLite, in-process bus)",
            Backend::Postgres => "PostgreSQL (in-process bus)",
            Backend::PostgresKafka => "PostgreSQL + Kafka (tansu 0.6.0)",
        }
    }

    fn uses_postgres(self) -> bool {
        self != Backend::Embedded
    }
}

/// The suite's settings (see `order-saga bench --help`).
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    pub admin_url: String,
    pub kafka_brokers: Option<String>,
    pub out: PathBuf,
    pub quick: bool,
    pub backends: Vec<Backend>,
    pub step_duration: Duration,
    pub ramp_settle: Duration,
    pub start_rate: f64,
    pub max_rate: f64,
    pub sustain_duration: Duration,
    pub sustain_settle: Duration,
    pub bisect_steps: u32,
    pub hot_rate: f64,
    pub ceilings: bool,
    pub ceiling_duration: Duration,
    pub broker_messages: u64,
    pub long: Option<LongConfig>,
    /// How the suite was started (scripts/bench passes its command line).
    pub invoked_as: Option<String>,
    /// This process's command line.
    pub command: String,
}

#[derive(Debug, Clone)]
pub struct LongConfig {
    /// The soak at `rate`.
    pub duration: Duration,
    pub rate: f64,
    /// Orders that exist before the second probe.
    pub orders: u64,
    /// Each throughput probe's sending time.
    pub probe: Duration,
    pub products: usize,
}

/// The settings as reported.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub step_duration_s: f64,
    pub ramp_settle_s: f64,
    pub start_rate: f64,
    pub max_rate: f64,
    pub sustain_duration_s: f64,
    pub sustain_settle_s: f64,
    pub bisect_steps: u32,
    pub hot_rate: f64,
    pub ceiling_duration_s: f64,
    pub broker_messages: u64,
    pub products: usize,
    pub max_items: usize,
    pub long_duration_s: Option<f64>,
    pub long_orders: Option<u64>,
    pub long_probe_s: Option<f64>,
}

/// Products and items per order of the ramp and bisection.
const PRODUCTS: usize = 20;
const MAX_ITEMS: usize = 3;
const STOCK: u32 = 1_000_000;
/// Stock of the hot product: it never runs out.
const HOT_STOCK: u32 = 100_000_000;
/// A step that keeps up achieves at least this share of the offered rate.
pub const KEEP_UP: f64 = 0.95;
/// … and its sagas' p99 is at most this.
pub const SAGA_P99_LIMIT_MS: f64 = 1000.0;
/// Settle time after each long-run phase.
const LONG_SETTLE: Duration = Duration::from_secs(60);
/// How long the long run's soak goes on sending after its last memory
/// sample.
const SOAK_OVERRUN: Duration = Duration::from_secs(5);

/// One run of the load generator on a fresh instance.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub rate: f64,
    pub duration_s: f64,
    pub settle_s: f64,
    pub report: Option<BenchReport>,
    /// What went wrong (the service crashed, HTTP errors, …).
    pub error: Option<String>,
    /// Something worth knowing that did not spoil the run.
    pub note: Option<String>,
    /// PostgreSQL commits in the run's database ÷ orders accepted.
    pub tx_per_order: Option<f64>,
    /// Why it did not keep up; empty when it did.
    pub saturated_by: Vec<String>,
}

impl Step {
    fn new(config: &BenchConfig) -> Step {
        Step {
            rate: config.rate,
            duration_s: config.duration.as_secs_f64(),
            settle_s: config.settle.as_secs_f64(),
            report: None,
            error: None,
            note: None,
            tx_per_order: None,
            saturated_by: Vec::new(),
        }
    }

    pub fn kept_up(&self) -> bool {
        self.saturated_by.is_empty()
    }

    /// Saturated: achieved < 95 % of offered, saga p99 > 1 s, anything
    /// unfinished or failed, or the run went wrong.
    fn judge(&mut self) {
        let mut why = Vec::new();
        if self.error.is_some() {
            why.push("error".to_string());
        }
        match &self.report {
            None if self.error.is_none() => why.push("no report".to_string()),
            None => {}
            Some(r) => {
                if r.achieved_rate < KEEP_UP * r.offered_rate {
                    why.push(format!("achieved < {:.0} %", KEEP_UP * 100.0));
                }
                if r.saga.p99_ms > SAGA_P99_LIMIT_MS {
                    why.push("saga p99 > 1 s".to_string());
                }
                if r.unfinished > 0 {
                    why.push(format!("{} unfinished", r.unfinished));
                }
                if r.failed > 0 {
                    why.push(format!("{} failed", r.failed));
                }
            }
        }
        self.saturated_by = why;
    }

    fn summary(&self) -> String {
        let verdict = if self.kept_up() {
            "kept up".to_string()
        } else {
            format!("saturated: {}", self.saturated_by.join(", "))
        };
        let mut line = match &self.report {
            Some(r) => format!(
                "achieved {:.1}/s, acceptance p99 {:.1} ms, saga p99 {:.1} ms, {} unfinished, {} failed — {verdict}",
                r.achieved_rate, r.acceptance.p99_ms, r.saga.p99_ms, r.unfinished, r.failed
            ),
            None => verdict,
        };
        if let Some(e) = &self.error {
            line.push_str(&format!(" ({e})"));
        }
        line
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendResult {
    pub backend: Backend,
    pub title: String,
    pub skipped: Option<String>,
    pub ramp: Vec<Step>,
    pub bisect: Vec<Step>,
    pub max_sustainable: Option<f64>,
    pub max_sustainable_how: String,
}

impl BackendResult {
    /// The ramp step at `rate`, if the ramp got there.
    pub fn ramp_at(&self, rate: f64) -> Option<&Step> {
        self.ramp.iter().find(|s| (s.rate - rate).abs() < 0.5)
    }

    /// The highest ramp rate that kept up.
    pub fn highest_kept_up(&self) -> Option<f64> {
        self.ramp
            .iter()
            .filter(|s| s.kept_up())
            .map(|s| s.rate)
            .reduce(f64::max)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HotResult {
    pub backend: Backend,
    pub step: Step,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LongRun {
    pub products: usize,
    pub probe_rate: f64,
    pub probe_s: f64,
    pub start_probe: Option<BenchReport>,
    pub soak_rate: f64,
    pub soak_s: f64,
    pub soak: Option<BenchReport>,
    pub rss_early_kib: Option<u64>,
    pub rss_early_at_s: f64,
    pub rss_late_kib: Option<u64>,
    pub rss_late_at_s: f64,
    pub feed: Option<BenchReport>,
    pub orders_before_end_probe: u64,
    pub end_probe: Option<BenchReport>,
    pub errors: Vec<String>,
}

impl LongRun {
    pub fn rss_ratio(&self) -> Option<f64> {
        let (early, late) = (self.rss_early_kib?, self.rss_late_kib?);
        (early > 0).then(|| late as f64 / early as f64)
    }

    pub fn rate_ratio(&self) -> Option<f64> {
        let start = self.start_probe.as_ref()?.saga_rate;
        let end = self.end_probe.as_ref()?.saga_rate;
        (start > 0.0).then(|| end / start)
    }
}

/// Everything the suite measured; written as JSON beside BENCHMARKS.md.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteResults {
    pub generated_at: DateTime<Utc>,
    /// False while the suite is still running (the files are rewritten
    /// after every scenario).
    pub finished: bool,
    pub elapsed_s: f64,
    pub machine: Machine,
    pub command: String,
    pub invoked_as: Option<String>,
    pub settings: Settings,
    pub ceilings: Ceilings,
    pub ceilings_skipped: Option<String>,
    pub backends: Vec<BackendResult>,
    pub hot: Vec<HotResult>,
    pub long_run: Option<LongRun>,
    pub long_run_skipped: Option<String>,
    pub targets: Vec<Target>,
}

impl SuiteResults {
    pub fn backend(&self, backend: Backend) -> Option<&BackendResult> {
        self.backends
            .iter()
            .find(|b| b.backend == backend && b.skipped.is_none())
    }

    /// Commits per order: the PostgreSQL ramp step at 200/s, else its
    /// first step that measured it.
    pub fn tx_per_order(&self) -> Option<(f64, f64)> {
        let ramp = &self.backend(Backend::Postgres)?.ramp;
        ramp.iter()
            .filter(|s| (s.rate - 200.0).abs() < 0.5)
            .chain(ramp.iter())
            .find_map(|s| s.tx_per_order.map(|tx| (tx, s.rate)))
    }
}

/// A running instance and what to clean up after it.
struct Instance {
    service: Service,
    workdir: PathBuf,
    database: Option<String>,
    topic_prefix: Option<String>,
}

/// What stopping an instance found.
struct Stopped {
    crash: Option<String>,
    note: Option<String>,
    xact_commit: Option<i64>,
}

/// A running instance's store and topics: (directory, database, prefix).
type Leftover = (PathBuf, Option<String>, Option<String>);

struct Suite {
    config: SuiteConfig,
    /// What the running instances would leave behind if interrupted.
    leftovers: std::sync::Mutex<Vec<Leftover>>,
    admin: Result<Admin, String>,
    started: Instant,
    results: SuiteResults,
}

/// Runs the whole suite and writes the report; returns the results.
pub async fn run(config: SuiteConfig) -> anyhow::Result<SuiteResults> {
    let started = Instant::now();
    let admin = Admin::connect(&config.admin_url).await;
    let machine = report::machine(admin.as_ref().ok()).await;
    let settings = Settings {
        quick: config.quick,
        step_duration_s: config.step_duration.as_secs_f64(),
        ramp_settle_s: config.ramp_settle.as_secs_f64(),
        start_rate: config.start_rate,
        max_rate: config.max_rate,
        sustain_duration_s: config.sustain_duration.as_secs_f64(),
        sustain_settle_s: config.sustain_settle.as_secs_f64(),
        bisect_steps: config.bisect_steps,
        hot_rate: config.hot_rate,
        ceiling_duration_s: config.ceiling_duration.as_secs_f64(),
        broker_messages: config.broker_messages,
        products: PRODUCTS,
        max_items: MAX_ITEMS,
        long_duration_s: config.long.as_ref().map(|l| l.duration.as_secs_f64()),
        long_orders: config.long.as_ref().map(|l| l.orders),
        long_probe_s: config.long.as_ref().map(|l| l.probe.as_secs_f64()),
    };
    let results = SuiteResults {
        generated_at: Utc::now(),
        finished: false,
        elapsed_s: 0.0,
        machine,
        command: config.command.clone(),
        invoked_as: config.invoked_as.clone(),
        settings,
        ceilings: Ceilings::default(),
        ceilings_skipped: None,
        backends: Vec::new(),
        hot: Vec::new(),
        long_run: None,
        long_run_skipped: None,
        targets: Vec::new(),
    };
    let mut suite = Suite {
        config,
        leftovers: std::sync::Mutex::new(Vec::new()),
        admin,
        started,
        results,
    };
    let interrupted = tokio::select! {
        outcome = suite.scenarios() => {
            outcome?;
            false
        }
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        // The scenario was dropped mid-way, and with it the running service
        // (killed on drop); remove what it left.
        suite.progress("interrupted: cleaning up");
        let leftovers = std::mem::take(&mut *suite.leftovers());
        for (workdir, database, prefix) in leftovers {
            suite
                .clean_up(&workdir, database.as_deref(), prefix.as_deref())
                .await;
        }
        if let Ok(admin) = &suite.admin {
            admin.drop_leftovers().await;
        }
        suite.write()?;
        anyhow::bail!(
            "interrupted; partial results in {}",
            suite.config.out.display()
        );
    }
    suite.results.finished = true;
    suite.write()?;
    if let Ok(admin) = &suite.admin {
        admin.close().await;
    }
    suite.progress(&format!(
        "done in {:.1} min: {} and {}",
        suite.started.elapsed().as_secs_f64() / 60.0,
        suite.config.out.display(),
        json_path(&suite.config.out).display()
    ));
    Ok(suite.results)
}

/// The JSON file beside the Markdown one.
pub fn json_path(out: &std::path::Path) -> PathBuf {
    out.with_extension("json")
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

impl Suite {
    /// Every scenario in turn, the report rewritten after each.
    async fn scenarios(&mut self) -> anyhow::Result<()> {
        if let Err(e) = &self.admin {
            self.progress(&format!(
                "PostgreSQL is unreachable, its runs are skipped: {e}"
            ));
        }
        self.write()?;
        self.ceilings().await;
        self.write()?;
        for backend in self.config.backends.clone() {
            let result = self.ramp_and_bisect(backend).await;
            self.results.backends.push(result);
            self.write()?;
        }
        for backend in [Backend::Embedded, Backend::Postgres] {
            if self.config.backends.contains(&backend) && self.usable(backend).is_ok() {
                let step = self.hot(backend).await;
                self.results.hot.push(HotResult { backend, step });
                self.write()?;
            }
        }
        match self.config.long.clone() {
            Some(long) if self.config.backends.contains(&Backend::Embedded) => {
                let run = self.long_run(&long).await;
                self.results.long_run = Some(run);
            }
            Some(_) => {
                self.results.long_run_skipped = Some("the embedded backend was not chosen".into())
            }
            None => self.results.long_run_skipped = Some("--skip-long".into()),
        }
        Ok(())
    }

    fn leftovers(&self) -> std::sync::MutexGuard<'_, Vec<Leftover>> {
        self.leftovers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn progress(&self, message: &str) {
        eprintln!(
            "[bench {:>5.0}s] {message}",
            self.started.elapsed().as_secs_f64()
        );
    }

    fn write(&mut self) -> anyhow::Result<()> {
        self.results.elapsed_s = self.started.elapsed().as_secs_f64();
        self.results.targets = report::targets(&self.results);
        report::write(&self.results, &self.config.out)
    }

    /// Whether the backend can run here, or why not.
    fn usable(&self, backend: Backend) -> Result<(), String> {
        if backend.uses_postgres() {
            if let Err(e) = &self.admin {
                return Err(e.clone());
            }
        }
        if backend == Backend::PostgresKafka && self.config.kafka_brokers.is_none() {
            return Err("no --kafka-brokers given".to_string());
        }
        Ok(())
    }

    async fn ceilings(&mut self) {
        if !self.config.ceilings {
            self.results.ceilings_skipped = Some("--skip-ceilings".into());
            return;
        }
        let d = self.config.ceiling_duration;
        match self.admin.clone() {
            Ok(admin) => {
                for connections in [1, 8] {
                    self.progress(&format!(
                        "ceiling: PostgreSQL commits at {connections} connection(s), {}s",
                        d.as_secs()
                    ));
                    let rate = ceilings::commit_ceiling(&admin, connections, d).await;
                    self.progress(&format!("  {}", rate_line(&rate, "commits")));
                    if connections == 1 {
                        self.results.ceilings.commit_1 = Some(rate);
                    } else {
                        self.results.ceilings.commit_8 = Some(rate);
                    }
                }
                self.progress("ceiling: plain postgres-es appends, 8 writers");
                let plain = ceilings::plain_append(&admin, d).await;
                self.progress(&format!("  {}", rate_line(&plain, "appends")));
                self.results.ceilings.plain_append = Some(plain);
                self.progress("ceiling: our Store::execute appends, 8 writers + sequencer");
                let ours = ceilings::our_append(&admin, d).await;
                self.progress(&format!("  {}", rate_line(&ours, "appends")));
                self.results.ceilings.our_append = Some(ours);
            }
            Err(e) => {
                let failed = Some(ceilings::Rate {
                    error: Some(e),
                    ..Default::default()
                });
                self.results.ceilings.commit_1 = failed.clone();
                self.results.ceilings.commit_8 = failed.clone();
                self.results.ceilings.plain_append = failed.clone();
                self.results.ceilings.our_append = failed;
            }
        }
        if let Some(brokers) = self.config.kafka_brokers.clone() {
            self.progress(&format!(
                "ceiling: broker produce → consume, {} messages",
                self.config.broker_messages
            ));
            let timeout = Duration::from_secs(180);
            let broker =
                ceilings::broker_rate(&brokers, self.config.broker_messages, timeout).await;
            self.progress(&format!("  {}", rate_line(&broker.rate, "messages")));
            self.results.ceilings.broker = Some(broker);
        }
    }

    /// The generator's settings for a ramp or bisection step.
    fn load(&self, rate: f64, duration: Duration, settle: Duration) -> BenchConfig {
        BenchConfig {
            url: String::new(),
            rate,
            duration,
            products: PRODUCTS,
            stock: STOCK,
            max_items: MAX_ITEMS,
            hot: 0.0,
            settle,
            setup: true,
        }
    }

    async fn ramp_and_bisect(&self, backend: Backend) -> BackendResult {
        let mut result = BackendResult {
            backend,
            title: backend.title().to_string(),
            skipped: None,
            ramp: Vec::new(),
            bisect: Vec::new(),
            max_sustainable: None,
            max_sustainable_how: String::new(),
        };
        if let Err(why) = self.usable(backend) {
            self.progress(&format!("{}: skipped ({why})", backend.name()));
            result.skipped = Some(why);
            return result;
        }
        let mut rate = self.config.start_rate;
        loop {
            let config = self.load(rate, self.config.step_duration, self.config.ramp_settle);
            let step = self.fresh_run(backend, "ramp", config).await;
            let saturated = !step.kept_up();
            result.ramp.push(step);
            if saturated || rate * 2.0 > self.config.max_rate {
                break;
            }
            rate *= 2.0;
        }
        let Some(mut hi) = result
            .ramp
            .iter()
            .filter(|s| !s.kept_up())
            .map(|s| s.rate)
            .reduce(f64::min)
        else {
            result.max_sustainable = result.highest_kept_up();
            result.max_sustainable_how = format!(
                "at least this: never saturated up to the ramp's cap (--max-rate {})",
                self.config.max_rate
            );
            return result;
        };
        // The search keeps `hi`, the lowest rate that did not keep up, and
        // bisects down from the highest ramp step below it, which kept up
        // only for a ramp step: when nothing in between keeps up for the
        // full time, that step runs again as long, and when it fails too it
        // becomes `hi` and the search moves to the interval below it.
        let mut below: Vec<f64> = result
            .ramp
            .iter()
            .filter(|s| s.kept_up())
            .map(|s| s.rate)
            .collect();
        below.sort_by(f64::total_cmp);
        let sustain = self.config.sustain_duration.as_secs_f64();
        let settle = self.config.sustain_settle.as_secs_f64();
        loop {
            below.retain(|&r| r < hi);
            let floor = below.pop().unwrap_or(0.0);
            let (mut lo, top) = (floor, hi);
            for _ in 0..self.config.bisect_steps {
                let mid = ((lo + hi) / 2.0).round();
                if mid <= lo || mid >= hi {
                    break;
                }
                let step = self.sustain(backend, mid).await;
                if step.kept_up() {
                    lo = mid;
                } else {
                    hi = mid;
                }
                result.bisect.push(step);
            }
            if lo > floor {
                result.max_sustainable = Some(lo);
                result.max_sustainable_how = format!(
                    "bisection between {floor:.0}/s and {top:.0}/s: the highest rate that kept up \
                     for {sustain:.0} s with {settle:.0} s settle"
                );
                break;
            }
            if floor == 0.0 {
                result.max_sustainable_how =
                    format!("none: no rate below {top:.0}/s kept up for {sustain:.0} s");
                break;
            }
            let step = self.sustain(backend, floor).await;
            let kept_up = step.kept_up();
            result.bisect.push(step);
            if kept_up {
                result.max_sustainable = Some(floor);
                result.max_sustainable_how = format!(
                    "the ramp step {floor:.0}/s, run again for {sustain:.0} s with {settle:.0} s \
                     settle; nothing bisected between it and {top:.0}/s kept up"
                );
                break;
            }
            hi = floor;
        }
        self.progress(&format!(
            "{}: maximum sustainable rate {} ({})",
            backend.name(),
            result
                .max_sustainable
                .map_or("none".to_string(), |r| format!("{r:.0}/s")),
            result.max_sustainable_how
        ));
        result
    }

    /// One run of the maximum-rate search: `rate` for the full sustain time.
    async fn sustain(&self, backend: Backend, rate: f64) -> Step {
        let config = self.load(
            rate,
            self.config.sustain_duration,
            self.config.sustain_settle,
        );
        self.fresh_run(backend, "sustain", config).await
    }

    async fn hot(&self, backend: Backend) -> Step {
        let config = BenchConfig {
            products: 1,
            max_items: 1,
            hot: 1.0,
            stock: HOT_STOCK,
            ..self.load(
                self.config.hot_rate,
                self.config.step_duration,
                self.config.ramp_settle,
            )
        };
        self.fresh_run(backend, "hot product", config).await
    }

    /// One generator run on a fresh instance, judged; commits per order
    /// counted on PostgreSQL.
    async fn fresh_run(&self, backend: Backend, what: &str, mut config: BenchConfig) -> Step {
        let mut step = Step::new(&config);
        self.progress(&format!(
            "{what} {} {:.0}/s for {:.0}s …",
            backend.name(),
            config.rate,
            config.duration.as_secs_f64()
        ));
        let instance = match self.start(backend).await {
            Ok(instance) => instance,
            Err(e) => {
                step.error = Some(format!("starting the service: {e}"));
                step.judge();
                self.progress(&format!("  {}", step.summary()));
                return step;
            }
        };
        config.url = instance.service.url.clone();
        if let Err(e) = warm_up(&config).await {
            step.note = Some(e);
        }
        let before = match &instance.database {
            Some(db) => {
                // Let the backends flush the statistics of the start.
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.xact_commit(db).await
            }
            None => None,
        };
        match super::run(&config).await {
            Ok(report) => step.report = Some(report),
            Err(e) => step.error = Some(e.to_string()),
        }
        let stopped = self.stop(instance).await;
        if let Some(crash) = stopped.crash {
            step.error = Some(match step.error.take() {
                Some(e) => format!("{e}; {crash}"),
                None => crash,
            });
        }
        if let Some(note) = stopped.note {
            step.note = Some(match step.note.take() {
                Some(n) => format!("{n}; {note}"),
                None => note,
            });
        }
        if let (Some(before), Some(after), Some(report)) =
            (before, stopped.xact_commit, &step.report)
        {
            if report.accepted > 0 {
                step.tx_per_order = Some((after - before) as f64 / report.accepted as f64);
            }
        }
        step.judge();
        self.progress(&format!("  {}", step.summary()));
        step
    }

    async fn xact_commit(&self, database: &str) -> Option<i64> {
        let admin = self.admin.as_ref().ok()?;
        match admin.xact_commit(database).await {
            Ok(n) => Some(n),
            Err(e) => {
                self.progress(&format!("  {e}"));
                None
            }
        }
    }

    /// A fresh instance: a new store (and topic prefix), the service
    /// started on it and ready.
    async fn start(&self, backend: Backend) -> Result<Instance, String> {
        self.usable(backend)?;
        let id = short_id();
        let workdir = std::env::temp_dir().join(format!("order-saga-bench-{id}"));
        std::fs::create_dir_all(&workdir)
            .map_err(|e| format!("cannot create {}: {e}", workdir.display()))?;
        let mut instance_args: Vec<String> = Vec::new();
        let mut database = None;
        let mut topic_prefix = None;
        if backend.uses_postgres() {
            let admin = self.admin.as_ref().map_err(Clone::clone)?;
            let name = match admin.create_database().await {
                Ok(name) => name,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&workdir);
                    return Err(e);
                }
            };
            instance_args.extend(["--database-url".to_string(), admin.url_of(&name)]);
            database = Some(name);
        } else {
            let data = workdir.join("data");
            instance_args.extend(["--data-dir".to_string(), data.display().to_string()]);
        }
        if backend == Backend::PostgresKafka {
            let brokers = self.config.kafka_brokers.clone().unwrap_or_default();
            let prefix = format!("bench{id}.");
            instance_args.extend([
                "--kafka-brokers".to_string(),
                brokers,
                "--kafka-topic-prefix".to_string(),
                prefix.clone(),
                // Fitted to the test broker: see the constants.
                "--kafka-partitions".to_string(),
                BENCH_KAFKA_PARTITIONS.to_string(),
                "--kafka-consumer-config".to_string(),
                BENCH_KAFKA_CONSUMER_CONFIG.to_string(),
                "--kafka-producer-config".to_string(),
                BENCH_KAFKA_PRODUCER_CONFIG.to_string(),
            ]);
            topic_prefix = Some(prefix);
        }
        self.leftovers()
            .push((workdir.clone(), database.clone(), topic_prefix.clone()));
        match Service::start(&instance_args, &workdir.join("serve.log")).await {
            Ok(service) => Ok(Instance {
                service,
                workdir,
                database,
                topic_prefix,
            }),
            Err(e) => {
                self.clean_up(&workdir, database.as_deref(), topic_prefix.as_deref())
                    .await;
                Err(e)
            }
        }
    }

    /// Stops the service and removes its store; reads the database's commit
    /// counter last (the service's connections flush their statistics as
    /// they close).
    async fn stop(&self, instance: Instance) -> Stopped {
        let (crash, note) = match instance.service.stop().await {
            Ok(note) => (None, note),
            Err(crash) => (Some(crash), None),
        };
        let mut xact_commit = None;
        if let Some(db) = &instance.database {
            tokio::time::sleep(Duration::from_millis(500)).await;
            xact_commit = self.xact_commit(db).await;
        }
        self.clean_up(
            &instance.workdir,
            instance.database.as_deref(),
            instance.topic_prefix.as_deref(),
        )
        .await;
        Stopped {
            crash,
            note,
            xact_commit,
        }
    }

    async fn clean_up(&self, workdir: &PathBuf, database: Option<&str>, prefix: Option<&str>) {
        self.leftovers().retain(|(dir, _, _)| dir != workdir);
        if let (Some(db), Ok(admin)) = (database, &self.admin) {
            if let Err(e) = admin.drop_database(db).await {
                self.progress(&format!("  cleaning up: {e}"));
            }
        }
        if let (Some(prefix), Some(brokers)) = (prefix, &self.config.kafka_brokers) {
            ceilings::delete_topics(brokers, |name| name.starts_with(prefix)).await;
        }
        if let Err(e) = std::fs::remove_dir_all(workdir) {
            self.progress(&format!(
                "  cleaning up: cannot remove {}: {e}",
                workdir.display()
            ));
        }
    }

    /// The long run on one embedded instance: a throughput probe, a soak at
    /// 200/s sampling resident memory, orders up to the total, the probe
    /// again.
    async fn long_run(&self, long: &LongConfig) -> LongRun {
        let max = self
            .results
            .backend(Backend::Embedded)
            .and_then(|b| b.max_sustainable)
            .filter(|r| *r > 0.0);
        let probe_rate = (1.5 * max.unwrap_or(1000.0)).round();
        let feed_rate = max.unwrap_or(1000.0);
        let mut run = LongRun {
            products: long.products,
            probe_rate,
            probe_s: long.probe.as_secs_f64(),
            soak_rate: long.rate,
            soak_s: (long.duration + SOAK_OVERRUN).as_secs_f64(),
            rss_early_at_s: long.duration.as_secs_f64() / 10.0,
            rss_late_at_s: long.duration.as_secs_f64(),
            ..LongRun::default()
        };
        self.progress(&format!(
            "long run: embedded, {} products, probe at {probe_rate:.0}/s, {:.0}s at {:.0}/s, probe again after {} orders",
            long.products,
            long.duration.as_secs_f64(),
            long.rate,
            long.orders
        ));
        let mut instance = match self.start(Backend::Embedded).await {
            Ok(instance) => instance,
            Err(e) => {
                run.errors.push(format!("starting the service: {e}"));
                return run;
            }
        };
        let url = instance.service.url.clone();
        let phase = |rate: f64, duration: Duration| BenchConfig {
            url: url.clone(),
            rate,
            duration,
            products: long.products,
            stock: STOCK,
            max_items: MAX_ITEMS,
            hot: 0.0,
            settle: LONG_SETTLE,
            setup: true,
        };
        if let Err(e) = warm_up(&phase(1.0, long.probe)).await {
            run.errors.push(e);
        }
        let mut orders = 0;

        self.progress(&format!(
            "long run: throughput probe at {probe_rate:.0}/s for {:.0}s",
            long.probe.as_secs_f64()
        ));
        match super::run(&phase(probe_rate, long.probe)).await {
            Ok(r) => {
                self.progress(&format!("  sagas finished at {:.1}/s", r.saga_rate));
                orders += r.accepted;
                run.start_probe = Some(r);
            }
            Err(e) => run.errors.push(format!("first probe: {e}")),
        }

        self.progress(&format!(
            "long run: {:.0}/s for {:.0}s, resident memory at {:.0}s and {:.0}s",
            long.rate, run.soak_s, run.rss_early_at_s, run.rss_late_at_s
        ));
        // The soak sends a little past the last sample, so that the sample
        // sees the service at the soak's rate, not answering the listing
        // of the orders that follows the sending.
        let soak_config = phase(long.rate, long.duration + SOAK_OVERRUN);
        let service = &instance.service;
        let sampler = async {
            let start = Instant::now();
            tokio::time::sleep_until(start + long.duration / 10).await;
            let early = service.rss_kib();
            tokio::time::sleep_until(start + long.duration).await;
            (early, service.rss_kib())
        };
        let (soak, (early, late)) = tokio::join!(super::run(&soak_config), sampler);
        run.rss_early_kib = early;
        run.rss_late_kib = late;
        match soak {
            Ok(r) => {
                self.progress(&format!(
                    "  {} accepted, saga p99 {:.1} ms; RSS {} → {} KiB",
                    r.accepted,
                    r.saga.p99_ms,
                    early.unwrap_or(0),
                    late.unwrap_or(0)
                ));
                orders += r.accepted;
                run.soak = Some(r);
            }
            Err(e) => run.errors.push(format!("soak: {e}")),
        }

        if orders < long.orders {
            let remaining = long.orders - orders;
            let duration = Duration::from_secs_f64((remaining as f64 / feed_rate).max(1.0));
            self.progress(&format!(
                "long run: {remaining} more orders at {feed_rate:.0}/s"
            ));
            match super::run(&phase(feed_rate, duration)).await {
                Ok(r) => {
                    orders += r.accepted;
                    run.feed = Some(r);
                }
                Err(e) => run.errors.push(format!("feeding orders: {e}")),
            }
        }
        run.orders_before_end_probe = orders;

        self.progress(&format!(
            "long run: throughput probe after {orders} orders at {probe_rate:.0}/s"
        ));
        match super::run(&phase(probe_rate, long.probe)).await {
            Ok(r) => {
                self.progress(&format!("  sagas finished at {:.1}/s", r.saga_rate));
                run.end_probe = Some(r);
            }
            Err(e) => run.errors.push(format!("second probe: {e}")),
        }
        if let Some(exit) = instance.service.exited() {
            run.errors.push(format!("the service exited ({exit})"));
        }
        let stopped = self.stop(instance).await;
        run.errors.extend(stopped.crash);
        run.errors.extend(stopped.note);
        run
    }
}

/// Orders sent to a fresh instance before it is measured — 20 in a
/// second, their sagas waited for — so start-up transients (connection
/// pools, Kafka consumer groups joining) stay out of the figures.
const WARM_UP_RATE: f64 = 20.0;
const WARM_UP_SETTLE: Duration = Duration::from_secs(60);

async fn warm_up(config: &BenchConfig) -> Result<(), String> {
    let warm = BenchConfig {
        rate: WARM_UP_RATE,
        duration: Duration::from_secs(1),
        settle: WARM_UP_SETTLE,
        setup: true,
        ..config.clone()
    };
    match super::run(&warm).await {
        Ok(r) if r.unfinished == 0 && r.failed == 0 => Ok(()),
        Ok(r) => Err(format!(
            "warm-up: {} failed, {} unfinished after {}s",
            r.failed,
            r.unfinished,
            WARM_UP_SETTLE.as_secs()
        )),
        Err(e) => Err(format!("warm-up: {e}")),
    }
}

fn rate_line(rate: &ceilings::Rate, what: &str) -> String {
    match (rate.per_second, &rate.error) {
        (Some(r), None) => format!("{r:.0} {what}/s"),
        (Some(r), Some(e)) => format!("{r:.0} {what}/s ({e})"),
        (None, Some(e)) => format!("failed: {e}"),
        (None, None) => "nothing measured".to_string(),
    }
}
