//! What the suite measured, as both the runner ([`crate::suite`]) fills it
//! in and the report ([`crate::report`]) writes it out: the backends, every
//! step's figures, the long run, the ceilings and the targets judged from
//! them.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::ceilings::Ceilings;
use crate::{BenchConfig, BenchReport};

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

    /// The store and bus in a few words, for table rows.
    pub fn short_title(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Postgres => "PostgreSQL",
            Backend::PostgresKafka => "PostgreSQL + Kafka",
        }
    }

    pub(crate) fn uses_postgres(self) -> bool {
        self != Backend::Embedded
    }
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

/// A step that keeps up achieves at least this share of the offered rate.
pub const KEEP_UP: f64 = 0.95;
/// … and its sagas' p99 is at most this.
pub const SAGA_P99_LIMIT_MS: f64 = 1000.0;
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
    pub(crate) fn new(config: &BenchConfig) -> Step {
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
    pub(crate) fn judge(&mut self) {
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

    pub(crate) fn summary(&self) -> String {
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
    /// Instances of the service on one store, the orders sent round-robin
    /// over them.
    pub instances: usize,
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

/// SIGKILLs of the instance holding the roles, one of two on one store.
#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    pub backend: Backend,
    pub kills: Vec<Kill>,
    /// Orders offered per second to the survivor across each kill, and for
    /// how long.
    pub load_rate: f64,
    pub load_s: f64,
    pub errors: Vec<String>,
}

/// One kill: what the killed instance held, how long until the survivor
/// held every role, and the load that ran across it.
#[derive(Debug, Clone, Serialize)]
pub struct Kill {
    pub roles: Vec<String>,
    /// SIGKILL → the survivor's `/readyz` shows every role held.
    pub taken_over_ms: Option<f64>,
    pub load: Option<BenchReport>,
}

impl Failover {
    /// The takeover times, sorted.
    fn times(&self) -> Vec<f64> {
        let mut times: Vec<f64> = self.kills.iter().filter_map(|k| k.taken_over_ms).collect();
        times.sort_by(f64::total_cmp);
        times
    }

    /// (p50, max) of the takeover times; `None` unless every kill was
    /// taken over.
    pub fn p50_max_ms(&self) -> Option<(f64, f64)> {
        let times = self.times();
        if times.is_empty() || times.len() < self.kills.len() {
            return None;
        }
        Some((times[(times.len() - 1) / 2], times[times.len() - 1]))
    }

    /// Sagas of the load across the kills that failed or did not finish.
    pub fn unfinished(&self) -> u64 {
        self.kills
            .iter()
            .filter_map(|k| k.load.as_ref())
            .map(|r| r.unfinished + r.failed)
            .sum()
    }
}

/// The same load on fresh instances without authentication and with
/// `--auth jwt` (HS256), alternated.
#[derive(Debug, Clone, Serialize)]
pub struct AuthCost {
    pub backend: Backend,
    pub rate: f64,
    pub without: Vec<Step>,
    pub with_jwt: Vec<Step>,
}

impl AuthCost {
    /// The acceptance p99 without and with JWT, each the mean over its
    /// runs; `None` unless every run reported.
    pub fn p99_ms(&self) -> Option<(f64, f64)> {
        let mean = |steps: &[Step]| -> Option<f64> {
            let p99s: Option<Vec<f64>> = steps
                .iter()
                .map(|s| s.report.as_ref().map(|r| r.acceptance.p99_ms))
                .collect();
            let p99s = p99s.filter(|v| !v.is_empty())?;
            Some(p99s.iter().sum::<f64>() / p99s.len() as f64)
        };
        Some((mean(&self.without)?, mean(&self.with_jwt)?))
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
    pub failover: Vec<Failover>,
    /// Why the 2-instance runs were not made.
    pub instances_skipped: Option<String>,
    pub auth: Option<AuthCost>,
    /// Why the authentication-cost runs were not made.
    pub auth_skipped: Option<String>,
    pub hot: Vec<HotResult>,
    pub long_run: Option<LongRun>,
    pub long_run_skipped: Option<String>,
    pub targets: Vec<Target>,
}

impl SuiteResults {
    /// The backend's single-instance runs.
    pub fn backend(&self, backend: Backend) -> Option<&BackendResult> {
        self.backend_with(backend, 1)
    }

    pub fn backend_with(&self, backend: Backend, instances: usize) -> Option<&BackendResult> {
        self.backends
            .iter()
            .find(|b| b.backend == backend && b.instances == instances && b.skipped.is_none())
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

/// The machine the figures were measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub memory: String,
    pub cpu_model: String,
    pub kernel: String,
    pub postgres: String,
    pub rustc: String,
    pub broker: String,
}

/// Kills of the failover scenario, and the longest takeover allowed.
pub const FAILOVER_KILLS: usize = 5;
pub const FAILOVER_LIMIT_MS: f64 = 10_000.0;

/// One row of the targets table.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub figure: String,
    pub target: String,
    pub measured: String,
    /// `None`: not measured.
    pub met: Option<bool>,
}

fn target(
    figure: &str,
    target: String,
    measured: Option<(f64, String)>,
    ok: impl Fn(f64) -> bool,
) -> Target {
    match measured {
        Some((value, text)) => Target {
            figure: figure.to_string(),
            target,
            measured: text,
            met: Some(ok(value)),
        },
        None => Target {
            figure: figure.to_string(),
            target,
            measured: "not measured".to_string(),
            met: None,
        },
    }
}

/// The targets, computed from the measured numbers.
pub fn targets(r: &SuiteResults) -> Vec<Target> {
    let at_200 = |backend: Backend| -> Option<&BenchReport> {
        r.backend(backend)?.ramp_at(200.0)?.report.as_ref()
    };
    // A ramp that saturated below 200/s never got there: that misses the
    // target too.
    let below_200 = |backend: Backend| -> Option<f64> {
        r.backend(backend)?
            .ramp
            .iter()
            .find(|s| !s.kept_up() && s.rate < 200.0)
            .map(|s| s.rate)
    };
    let at_200_ms = |backend: Backend, pick: fn(&BenchReport) -> f64| -> Option<(f64, String)> {
        match (at_200(backend), below_200(backend)) {
            (Some(report), _) => Some((pick(report), format!("{} ms", ms(pick(report))))),
            (None, Some(rate)) => {
                Some((f64::INFINITY, format!("saturated at {rate:.0}/s already")))
            }
            (None, None) => None,
        }
    };
    let saga_p99 = |backend: Backend| at_200_ms(backend, |b| b.saga.p99_ms);
    let max = |backend: Backend| {
        r.backend(backend)
            .and_then(|b| b.max_sustainable)
            .map(|m| (m, format!("{m:.0}/s")))
    };
    let mut rows = vec![
        target(
            "acceptance p99 at 200/s, PostgreSQL",
            "≤ 5 ms".into(),
            at_200(Backend::Postgres).map(|b| {
                (
                    b.acceptance.p99_ms,
                    format!(
                        "{} ms (the generator's own send lag in it: p99 {} ms)",
                        ms(b.acceptance.p99_ms),
                        ms(b.send_lag.p99_ms)
                    ),
                )
            }),
            |v| v <= 5.0,
        ),
        target(
            "saga p99 at 200/s, embedded (in-process)",
            "≤ 50 ms".into(),
            saga_p99(Backend::Embedded),
            |v| v <= 50.0,
        ),
        target(
            "saga p99 at 200/s, PostgreSQL",
            "≤ 50 ms".into(),
            saga_p99(Backend::Postgres),
            |v| v <= 50.0,
        ),
        target(
            "saga p99 at 200/s, PostgreSQL + Kafka",
            "≤ 150 ms".into(),
            saga_p99(Backend::PostgresKafka),
            |v| v <= 150.0,
        ),
        target(
            "max sustainable rate, embedded",
            "≥ 1500/s".into(),
            max(Backend::Embedded),
            |v| v >= 1500.0,
        ),
    ];
    rows.push(target(
        "acceptance p99 at 200/s, PostgreSQL: with JWT (HS256) ÷ without",
        "≤ 1.10".into(),
        r.auth.as_ref().and_then(|a| {
            let (without, with) = a.p99_ms()?;
            (without > 0.0).then(|| {
                let v = with / without;
                let runs = a.with_jwt.len().min(a.without.len());
                (
                    v,
                    format!(
                        "{v:.2} ({} ms ÷ {} ms, means of {runs} runs each)",
                        ms(with),
                        ms(without)
                    ),
                )
            })
        }),
        |v| v <= 1.10,
    ));
    let commit_8 = r.ceilings.commit_8.as_ref().and_then(|c| c.per_second);
    let pg_target = match (commit_8, r.tx_per_order()) {
        (Some(c), Some((tx, _))) if tx > 0.0 => Some(0.5 * c / tx),
        _ => None,
    };
    let pg_target_text = match (commit_8, r.tx_per_order(), pg_target) {
        (Some(c), Some((tx, _)), Some(t)) => {
            format!("≥ 50 % × ({c:.0} commits/s ÷ {tx:.1} tx/order) = {t:.0}/s")
        }
        _ => "≥ 50 % × (commit ceiling at 8 connections ÷ transactions per order)".to_string(),
    };
    rows.push(match pg_target {
        Some(t) => target(
            "max sustainable rate, PostgreSQL",
            pg_target_text,
            max(Backend::Postgres),
            |v| v >= t,
        ),
        None => Target {
            figure: "max sustainable rate, PostgreSQL".into(),
            target: pg_target_text,
            measured: max(Backend::Postgres).map_or("not measured".into(), |m| m.1),
            met: None,
        },
    });
    rows.push(target(
        "max sustainable rate, PostgreSQL + Kafka",
        "≥ 400/s".into(),
        max(Backend::PostgresKafka),
        |v| v >= 400.0,
    ));
    rows.push(target(
        "our append rate ÷ plain postgres-es",
        "≥ 0.9".into(),
        r.ceilings.append_ratio().map(|v| (v, format!("{v:.2}"))),
        |v| v >= 0.9,
    ));
    for backend in [Backend::Postgres, Backend::PostgresKafka] {
        let ratio = match (max(backend), r.backend_with(backend, 2)) {
            (Some((one, _)), Some(two)) if one > 0.0 => two.max_sustainable.map(|two| {
                let v = two / one;
                (v, format!("{v:.2} ({two:.0}/s ÷ {one:.0}/s)"))
            }),
            _ => None,
        };
        rows.push(target(
            &format!(
                "max sustainable rate, 2 instances ÷ one, {}",
                backend.short_title()
            ),
            "≥ 0.9".into(),
            ratio,
            |v| v >= 0.9,
        ));
    }
    for backend in [Backend::Postgres, Backend::PostgresKafka] {
        let failover = r.failover.iter().find(|f| f.backend == backend);
        rows.push(target(
            &format!(
                "failover after SIGKILL, p50 / max over {FAILOVER_KILLS} kills, {}",
                backend.short_title()
            ),
            format!("≤ {} s", FAILOVER_LIMIT_MS / 1000.0),
            failover.and_then(|f| {
                let (p50, max) = f.p50_max_ms()?;
                let lost = f.unfinished();
                let text = format!(
                    "{} / {} ms, {lost} sagas failed or unfinished",
                    ms(p50),
                    ms(max)
                );
                // Sagas lost across a kill miss the target as surely as a
                // slow takeover.
                Some((if lost > 0 { f64::INFINITY } else { max }, text))
            }),
            |v| v <= FAILOVER_LIMIT_MS,
        ));
    }
    let long = r.long_run.as_ref();
    rows.push(target(
        "rate after the long run's orders ÷ rate at start (10 products)",
        "≥ 0.9".into(),
        long.and_then(|l| {
            let v = l.rate_ratio()?;
            Some((
                v,
                format!("{v:.2} (after {} orders)", l.orders_before_end_probe),
            ))
        }),
        |v| v >= 0.9,
    ));
    rows.push(target(
        "resident memory at the end of the soak ÷ at a tenth of it",
        "≤ 1.1".into(),
        long.and_then(|l| l.rss_ratio().map(|v| (v, format!("{v:.2}")))),
        |v| v <= 1.1,
    ));
    rows
}

/// A latency in milliseconds, to three significant figures or so.
pub(crate) fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A rate per second, likewise.
pub(crate) fn per_s(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}
