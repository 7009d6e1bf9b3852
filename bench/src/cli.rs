//! The command line of `order-saga-bench`: one load run against a running
//! instance, or with `--suite` the whole benchmark suite. A wrong value
//! fails at start with a message naming its flag.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};

#[derive(Debug, Parser)]
#[command(
    name = "order-saga-bench",
    version,
    about = "Open-loop load generator and benchmark suite for order-saga",
    long_about = "Open-loop load generator against a running order-saga instance (HTTP): \
        acceptance and saga latency percentiles, the generator's own send lag, throughput. \
        With --suite, the whole benchmark suite on instances it starts itself (the order-saga \
        binary beside this one, or --service-bin).\n\n\
        Example: order-saga-bench --url http://127.0.0.1:8080 --setup --rate 200 --duration 60s\n\n\
        Suite: order-saga-bench --suite --admin-url postgres://postgres@127.0.0.1:5432/test \
        --kafka-brokers 127.0.0.1:19092 --out BENCHMARKS.md [--quick] (scripts/bench does this)"
)]
pub struct BenchArgs {
    /// Base URL of the instance under load (not with --suite).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Orders per second, sent on schedule whatever the latency.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// How long to send (e.g. 30s, 10m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Products the orders draw from (bench-p-0 …).
    #[arg(long, default_value_t = 20)]
    pub products: usize,
    /// Stock each product gets with --setup.
    #[arg(long, default_value_t = 1_000_000)]
    pub stock: u32,
    /// Items per order: 1 to this many distinct products.
    #[arg(long, default_value_t = 3)]
    pub items: usize,
    /// Share of orders (0 to 1) that include the hot product bench-p-0.
    #[arg(long, default_value_t = 0.0)]
    pub hot: f64,
    /// How long to wait for the sagas to finish after sending.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Create (or restock) the products first, through GraphQL.
    #[arg(long)]
    pub setup: bool,
    /// The HS256 secret of an instance run with `--auth jwt`: the
    /// generator signs an operator token for set-up and queries and a
    /// customer token for its orders.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    #[command(flatten)]
    pub suite: SuiteArgs,
}

/// The benchmark suite (`--suite`): starts `order-saga serve` itself, on a
/// fresh store for every run, and writes BENCHMARKS.md. Full suite: about
/// 45 minutes; --quick: about 10.
#[derive(Debug, Args)]
pub struct SuiteArgs {
    /// Run the benchmark suite (ramp, maximum sustainable rate, 2 instances
    /// and their failover, the cost of JWT authentication, hot product,
    /// long run, ceilings) instead of one
    /// load run against --url.
    #[arg(long = "suite")]
    pub enabled: bool,
    /// PostgreSQL server for the suite: it creates a database bench_<random>
    /// there for every run and drops it afterwards (needs CREATEDB).
    #[arg(
        long,
        requires = "enabled",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub admin_url: String,
    /// Kafka bootstrap servers for the PostgreSQL + Kafka runs and the
    /// broker ceiling (scripts/kafka-up prints them); without it those are
    /// skipped.
    #[arg(long, requires = "enabled")]
    pub kafka_brokers: Option<String>,
    /// Where to write the report; the raw numbers go beside it as JSON
    /// (BENCHMARKS.md → BENCHMARKS.json).
    #[arg(long, requires = "enabled", default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Shorter runs: 5 s ramp steps, 10 s bisection runs, a 60 s / 10,000
    /// order long run, 5 s ceilings, 10,000 broker messages.
    #[arg(long, requires = "enabled")]
    pub quick: bool,
    /// Which backends to run (comma-separated).
    #[arg(
        long,
        requires = "enabled",
        value_enum,
        value_delimiter = ',',
        default_value = "embedded,postgres,postgres-kafka"
    )]
    pub backends: Vec<crate::results::Backend>,
    /// Sending time of each ramp step and of the hot-product run
    /// [default: 20s; --quick: 5s].
    #[arg(long, requires = "enabled", value_parser = humantime::parse_duration)]
    pub step_duration: Option<Duration>,
    /// How long a ramp step waits for its sagas to finish before counting
    /// the rest as unfinished.
    #[arg(long, requires = "enabled", default_value = "30s", value_parser = humantime::parse_duration)]
    pub step_settle: Duration,
    /// The ramp's first rate (orders/s); it doubles every step.
    #[arg(long, requires = "enabled", default_value_t = 100.0)]
    pub start_rate: f64,
    /// The ramp stops before exceeding this rate (orders/s).
    #[arg(long, requires = "enabled", default_value_t = 12_800.0)]
    pub max_rate: f64,
    /// Sending time of each bisection run for the maximum sustainable rate
    /// [default: 60s; --quick: 10s].
    #[arg(long, requires = "enabled", value_parser = humantime::parse_duration)]
    pub sustain_duration: Option<Duration>,
    /// How long a bisection run may take to finish its sagas (a longer
    /// wait would hide a growing backlog).
    #[arg(long, requires = "enabled", default_value = "10s", value_parser = humantime::parse_duration)]
    pub sustain_settle: Duration,
    /// Bisection steps between the highest rate that kept up and the lowest
    /// that did not (4 from a ramp doubling 400 to 800 resolve 25/s).
    #[arg(long, requires = "enabled", default_value_t = 4)]
    pub bisect_steps: u32,
    /// Skip the long run (memory and rate over 10 minutes and 100,000
    /// orders).
    #[arg(long, requires = "enabled")]
    pub skip_long: bool,
    /// The long run's soak at 200 orders/s, resident memory sampled at a
    /// tenth of it and at its end (it sends 5 s longer) [default: 10m;
    /// --quick: 60s].
    #[arg(long, requires = "enabled", value_parser = humantime::parse_duration)]
    pub long_duration: Option<Duration>,
    /// Orders that exist before the long run's second throughput probe
    /// [default: 100000; --quick: 10000].
    #[arg(long, requires = "enabled")]
    pub long_orders: Option<u64>,
    /// Skip the runs with 2 instances on one PostgreSQL store (their ramp
    /// and bisection, and the failover after SIGKILL).
    #[arg(long, requires = "enabled")]
    pub skip_instances: bool,
    /// Skip the ceilings (PostgreSQL commits, event-store appends, broker).
    #[arg(long, requires = "enabled")]
    pub skip_ceilings: bool,
    /// The service binary the suite starts for every run [default: the
    /// order-saga binary beside this one].
    #[arg(long, requires = "enabled", env = "ORDER_SAGA_BIN")]
    pub service_bin: Option<PathBuf>,
    /// How the suite was started, printed in the report (scripts/bench
    /// passes its own command line).
    #[arg(long, requires = "enabled")]
    pub invoked_as: Option<String>,
}

impl SuiteArgs {
    /// The suite's settings; a bad value is refused naming its flag.
    pub fn config(&self, command: String) -> Result<crate::suite::SuiteConfig, String> {
        use crate::suite::{LongConfig, SuiteConfig};
        let positive = |flag: &str, d: Duration| {
            if d.is_zero() {
                Err(format!("{flag}: must be longer than 0s"))
            } else {
                Ok(d)
            }
        };
        let quick = self.quick;
        let pick = |chosen: Option<Duration>, full: u64, short: u64| {
            chosen.unwrap_or(Duration::from_secs(if quick { short } else { full }))
        };
        let step_duration = positive("--step-duration", pick(self.step_duration, 20, 5))?;
        let sustain_duration = positive("--sustain-duration", pick(self.sustain_duration, 60, 10))?;
        let long_duration = positive("--long-duration", pick(self.long_duration, 600, 60))?;
        if !(self.start_rate.is_finite() && self.start_rate > 0.0) {
            return Err("--start-rate: must be a positive number of orders/s".to_string());
        }
        if !(self.max_rate.is_finite() && self.max_rate >= self.start_rate) {
            return Err("--max-rate: must be at least --start-rate".to_string());
        }
        if self.backends.is_empty() {
            return Err("--backends: name at least one backend".to_string());
        }
        if !(self.admin_url.starts_with("postgres://")
            || self.admin_url.starts_with("postgresql://"))
        {
            return Err("--admin-url: expected a postgres:// or postgresql:// URL".to_string());
        }
        let kafka_brokers = self
            .kafka_brokers
            .as_deref()
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .map(str::to_string);
        let long_orders = self
            .long_orders
            .unwrap_or(if quick { 10_000 } else { 100_000 });
        if long_orders == 0 {
            return Err("--long-orders: must be at least 1".to_string());
        }
        let service_bin = match &self.service_bin {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .map_err(|e| format!("--service-bin: cannot find this binary's directory: {e}"))?
                .with_file_name("order-saga"),
        };
        let mut backends = self.backends.clone();
        backends.dedup();
        Ok(SuiteConfig {
            service_bin,
            admin_url: self.admin_url.clone(),
            kafka_brokers,
            out: self.out.clone(),
            quick,
            backends,
            step_duration,
            ramp_settle: self.step_settle,
            start_rate: self.start_rate,
            max_rate: self.max_rate,
            sustain_duration,
            sustain_settle: self.sustain_settle,
            bisect_steps: self.bisect_steps,
            hot_rate: 200.0,
            ceilings: !self.skip_ceilings,
            ceiling_duration: Duration::from_secs(if quick { 5 } else { 10 }),
            broker_messages: if quick { 10_000 } else { 100_000 },
            long: (!self.skip_long).then_some(LongConfig {
                duration: long_duration,
                rate: 200.0,
                orders: long_orders,
                probe: Duration::from_secs(if quick { 5 } else { 15 }),
                products: 10,
            }),
            instances: !self.skip_instances,
            invoked_as: self.invoked_as.clone(),
            command,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_flags_need_the_suite_and_bad_values_are_refused_by_name() {
        let err = BenchArgs::try_parse_from(["order-saga-bench", "--quick"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--suite"), "{err}");
        let args = BenchArgs::parse_from(["order-saga-bench", "--suite", "--step-duration", "0s"]);
        let err = args.suite.config(String::new()).unwrap_err();
        assert!(err.contains("--step-duration"), "{err}");
        let args = BenchArgs::parse_from(["order-saga-bench", "--suite", "--quick"]);
        let config = args.suite.config(String::new()).unwrap();
        assert_eq!(config.step_duration, Duration::from_secs(5));
        assert_eq!(config.backends.len(), 3);
    }
}
