//! `order-saga-bench --suite`: the benchmark suite behind `scripts/bench`.
//!
//! Every run gets a fresh instance of the service — this binary's `serve`
//! as a child process — on a fresh store (a temporary directory, or a new
//! PostgreSQL database dropped afterwards, plus a fresh topic prefix with
//! Kafka), and is driven by the open-loop generator ([`super::run`]).
//! Scenarios: a doubling ramp until saturation, a bisection for the maximum
//! sustainable rate (also with 2 instances on one PostgreSQL store), the
//! failover of 2 instances when the one holding the roles is SIGKILLed,
//! the acceptance latency with and without JWT authentication, one hot
//! product, and a long run (memory and rate over time); plus the
//! platform's ceilings ([`super::ceilings`]). The results
//! go to BENCHMARKS.md and a JSON file beside it ([`super::report`]),
//! rewritten after every scenario so an interrupted suite leaves what it
//! measured.

use std::path::PathBuf;
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;

mod failover;
mod instances;
mod long;

use crate::admin::Admin;
use crate::ceilings::{self, Ceilings};
use crate::report;
use crate::results::{
    AuthCost, Backend, BackendResult, HotResult, Machine, Settings, Step, SuiteResults,
};
use crate::BenchConfig;

/// The suite's settings (see `order-saga-bench --help`).
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    /// The `order-saga` binary started for every run.
    pub service_bin: PathBuf,
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
    /// Run the 2-instance ramps and the failover scenario.
    pub instances: bool,
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

/// Products and items per order of the ramp and bisection.
const PRODUCTS: usize = 20;
const MAX_ITEMS: usize = 3;
const STOCK: u32 = 1_000_000;
/// Orders per second of the authentication-cost runs.
const AUTH_RATE: f64 = 200.0;
/// Stock of the hot product: it never runs out.
const HOT_STOCK: u32 = 100_000_000;
/// Settle time after each long-run phase.
const LONG_SETTLE: Duration = Duration::from_secs(60);
/// How long the long run's soak goes on sending after its last memory
/// sample.
const SOAK_OVERRUN: Duration = Duration::from_secs(5);

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
    let machine = machine(admin.as_ref().ok()).await;
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
        failover: Vec::new(),
        instances_skipped: None,
        auth: None,
        auth_skipped: None,
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
        let several = self.several();
        // Two instances right after one on the same backend: the ratio
        // compares runs made under the same conditions of the machine.
        for backend in self.config.backends.clone() {
            let counts: &[usize] = if several.contains(&backend) {
                &[1, 2]
            } else {
                &[1]
            };
            for &instances in counts {
                let result = self.ramp_and_bisect(backend, instances).await;
                self.results.backends.push(result);
                self.write()?;
            }
        }
        match self.usable(Backend::Postgres) {
            _ if !self.config.backends.contains(&Backend::Postgres) => {
                self.results.auth_skipped = Some("the postgres backend was not chosen".into())
            }
            Err(why) => self.results.auth_skipped = Some(why),
            Ok(()) => self.results.auth = Some(self.auth_cost().await),
        }
        self.write()?;
        for &backend in &several {
            let result = self.failover(backend).await;
            self.results.failover.push(result);
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

    /// The backends run with 2 instances too (and failed over), noting
    /// in the results why there are none.
    fn several(&mut self) -> Vec<Backend> {
        let several: Vec<Backend> = [Backend::Postgres, Backend::PostgresKafka]
            .into_iter()
            .filter(|b| self.config.backends.contains(b))
            .collect();
        if !self.config.instances {
            self.results.instances_skipped = Some("--skip-instances".into());
            return Vec::new();
        }
        if several.is_empty() {
            self.results.instances_skipped = Some("no PostgreSQL backend was chosen".into());
        }
        several
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
        self.results.targets = crate::results::targets(&self.results);
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
            order_urls: Vec::new(),
            rate,
            duration,
            products: PRODUCTS,
            stock: STOCK,
            max_items: MAX_ITEMS,
            hot: 0.0,
            settle,
            setup: true,
            jwt_secret: None,
        }
    }

    /// The ramp and the bisection, every run on `instances` fresh
    /// processes of the service on one fresh store.
    async fn ramp_and_bisect(&self, backend: Backend, instances: usize) -> BackendResult {
        let mut result = BackendResult {
            backend,
            title: match instances {
                1 => backend.title().to_string(),
                n => format!("{}, {n} instances", backend.title()),
            },
            instances,
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
            let step = self.fresh_run(backend, instances, "ramp", config).await;
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
                let step = self.sustain(backend, instances, mid).await;
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
            let step = self.sustain(backend, instances, floor).await;
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
            "{} ×{instances}: maximum sustainable rate {} ({})",
            backend.name(),
            result
                .max_sustainable
                .map_or("none".to_string(), |r| format!("{r:.0}/s")),
            result.max_sustainable_how
        ));
        result
    }

    /// One run of the maximum-rate search: `rate` for the full sustain time.
    async fn sustain(&self, backend: Backend, instances: usize, rate: f64) -> Step {
        let config = self.load(
            rate,
            self.config.sustain_duration,
            self.config.sustain_settle,
        );
        self.fresh_run(backend, instances, "sustain", config).await
    }

    /// The same load on fresh PostgreSQL instances without authentication
    /// and with `--auth jwt` (HS256), alternated — without, with, with,
    /// without — so a drift of the machine over the runs weighs on both.
    async fn auth_cost(&self) -> AuthCost {
        let mut cost = AuthCost {
            backend: Backend::Postgres,
            rate: AUTH_RATE,
            without: Vec::new(),
            with_jwt: Vec::new(),
        };
        for jwt in [false, true, true, false] {
            let config = BenchConfig {
                jwt_secret: jwt.then(|| format!("bench-secret-{}", short_id())),
                ..self.load(
                    AUTH_RATE,
                    self.config.step_duration,
                    self.config.ramp_settle,
                )
            };
            let what = if jwt { "with JWT" } else { "without auth" };
            let step = self.fresh_run(Backend::Postgres, 1, what, config).await;
            if jwt {
                cost.with_jwt.push(step);
            } else {
                cost.without.push(step);
            }
        }
        cost
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
        self.fresh_run(backend, 1, "hot product", config).await
    }

    /// One generator run on a fresh instance of `instances` processes
    /// (the orders sent round-robin over them), judged; commits per order
    /// counted on PostgreSQL.
    async fn fresh_run(
        &self,
        backend: Backend,
        instances: usize,
        what: &str,
        mut config: BenchConfig,
    ) -> Step {
        let mut step = Step::new(&config);
        self.progress(&format!(
            "{what} {} ×{instances} {:.0}/s for {:.0}s …",
            backend.name(),
            config.rate,
            config.duration.as_secs_f64()
        ));
        let instance = match self
            .start_many(backend, instances, config.jwt_secret.as_deref())
            .await
        {
            Ok(instance) => instance,
            Err(e) => {
                step.error = Some(format!("starting the service: {e}"));
                step.judge();
                self.progress(&format!("  {}", step.summary()));
                return step;
            }
        };
        config.url = instance.service().url.clone();
        config.order_urls = instance.urls();
        if let Err(e) = warm_up(&config).await {
            step.note = Some(e);
        }
        let before = match &instance.database {
            Some(db) => {
                if let Ok(admin) = &self.admin {
                    if let Err(e) = admin.checkpoint().await {
                        self.progress(&format!("  {e}"));
                    }
                }
                // Let the backends flush the statistics of the start.
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.xact_commit(db).await
            }
            None => None,
        };
        match crate::run(&config).await {
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
    match crate::run(&warm).await {
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

/// Reads /proc, asks PostgreSQL and rustc.
pub async fn machine(admin: Option<&Admin>) -> Machine {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let meminfo = read("/proc/meminfo");
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or("unknown".to_string(), |kib| {
            format!("{:.1} GiB", kib / 1024.0 / 1024.0)
        });
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let postgres = match admin {
        Some(admin) => admin
            .version()
            .await
            .unwrap_or_else(|e| format!("unknown ({e})")),
        None => "unreachable".to_string(),
    };
    let rustc = match tokio::process::Command::new("rustc")
        .arg("--version")
        .output()
        .await
    {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => "not available".to_string(),
    };
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory,
        cpu_model,
        kernel: if kernel.is_empty() {
            "unknown".to_string()
        } else {
            kernel
        },
        postgres,
        rustc,
        broker: "tansu 0.6.0 (memory storage, scripts/kafka-up)".to_string(),
    }
}
