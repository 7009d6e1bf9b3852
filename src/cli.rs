//! The command line: one binary, `order-saga`, whose subcommands share the
//! store settings. Every setting is a flag and an environment variable;
//! a wrong one fails at start with a message naming it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use order_saga_domain::Money;

use chrono::{DateTime, Utc};

use crate::analytics::{AsOf, ReplayFormat};
use crate::saga::kafka::{parse_properties, KafkaConfig};
use crate::saga::SagaConfig;
use crate::store::StoreConfig;

#[derive(Debug, Parser)]
#[command(
    name = "order-saga",
    version,
    about = "Event-sourced order service running the Order Creation SAGA",
    long_about = "Event-sourced order service running the Order Creation SAGA.\n\n\
        With no DATABASE_URL the events live in an embedded SQLite file under --data-dir; \
        with DATABASE_URL=postgres://... they live in PostgreSQL. Migrations are applied \
        at start. Without a subcommand, `serve` runs."
)]
pub struct Cli {
    #[command(flatten)]
    pub store: StoreArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// PostgreSQL URL (postgres://user@host:port/db). When unset, the
    /// embedded SQLite store in --data-dir is used.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,

    /// Directory of the embedded SQLite store (used when DATABASE_URL is
    /// unset); created if missing.
    #[arg(long, env = "DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,

    /// Most connections held open to PostgreSQL: a quarter (at least 2) for
    /// transactions and the event libraries' queries, the rest (at least 2)
    /// for single statements.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16, global = true,
          value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub pool_size: u32,
}

impl StoreArgs {
    /// The store these settings select. An empty DATABASE_URL counts as
    /// unset; anything but a postgres URL is refused, naming the setting.
    pub fn config(&self) -> Result<StoreConfig, String> {
        match self.database_url.as_deref().map(str::trim) {
            None | Some("") => Ok(StoreConfig::Sqlite {
                data_dir: self.data_dir.clone(),
            }),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(StoreConfig::Postgres {
                    url: url.to_string(),
                    pool_size: self.pool_size,
                })
            }
            Some(_) => Err(
                "DATABASE_URL (--database-url): expected a postgres:// or postgresql:// URL"
                    .to_string(),
            ),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (the default).
    Serve(Box<ServeArgs>),
    /// Apply the database migrations and exit.
    Migrate,
    /// Set or show products: price and stock, as operators manage them.
    #[command(subcommand)]
    Product(ProductCommand),
    /// An order's full history: its events and its stock reservation's.
    ///
    /// Example: order-saga events 3f2c…  (a table on a terminal, JSON lines
    /// when piped or with --format jsonl)
    Events {
        /// The order's id.
        order_id: String,
        /// table or jsonl (default: table on a terminal, jsonl otherwise).
        #[arg(long, value_enum)]
        format: Option<OutputFormat>,
    },
    /// An order's state at a moment of the log, rebuilt from its events.
    ///
    /// Example: order-saga order 3f2c… --as-of 2026-11-24T10:00:00Z
    Order {
        /// The order's id.
        order_id: String,
        /// A log position (e.g. 1234) or an RFC 3339 time.
        #[arg(long)]
        as_of: AsOf,
    },
    /// Streams the global log in position order, in constant memory.
    ///
    /// Example: order-saga replay --from 0 --format avro --out log.avro
    Replay(ReplayArgs),
    /// Maintain the read models.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Open-loop load generator against a running instance (HTTP):
    /// acceptance and saga latency percentiles, the generator's own send
    /// lag, throughput. With --suite,
    /// the whole benchmark suite on instances it starts itself.
    ///
    /// Example: order-saga bench --url http://127.0.0.1:8080 --setup --rate 200 --duration 60s
    ///
    /// Suite: order-saga bench --suite --admin-url postgres://postgres@127.0.0.1:5432/test
    /// --kafka-brokers 127.0.0.1:19092 --out BENCHMARKS.md [--quick] (scripts/bench does this)
    Bench(Box<BenchArgs>),
}

#[derive(Debug, Args)]
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
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    #[command(flatten)]
    pub suite: SuiteArgs,
}

/// The benchmark suite (`--suite`): starts `order-saga serve` itself, on a
/// fresh store for every run, and writes BENCHMARKS.md. Full suite: about
/// 35 minutes; --quick: about 10.
#[derive(Debug, Args)]
pub struct SuiteArgs {
    /// Run the benchmark suite (ramp, maximum sustainable rate, hot product,
    /// long run, ceilings) instead of one load run against --url.
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
    pub backends: Vec<crate::bench::suite::Backend>,
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
    /// that did not.
    #[arg(long, requires = "enabled", default_value_t = 3)]
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
    /// Skip the ceilings (PostgreSQL commits, event-store appends, broker).
    #[arg(long, requires = "enabled")]
    pub skip_ceilings: bool,
    /// How the suite was started, printed in the report (scripts/bench
    /// passes its own command line).
    #[arg(long, requires = "enabled")]
    pub invoked_as: Option<String>,
}

impl SuiteArgs {
    /// The suite's settings; a bad value is refused naming its flag.
    pub fn config(&self, command: String) -> Result<crate::bench::suite::SuiteConfig, String> {
        use crate::bench::suite::{LongConfig, SuiteConfig};
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
        let mut backends = self.backends.clone();
        backends.dedup();
        Ok(SuiteConfig {
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
            invoked_as: self.invoked_as.clone(),
            command,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Rebuild the read models from position 0 beside the live ones, then
    /// switch; a running service keeps answering from the old ones
    /// meanwhile.
    ///
    /// Example: order-saga projections rebuild
    Rebuild {
        /// Which projection (there is one: read_models).
        #[arg(long, default_value = "read_models")]
        name: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns, for people.
    Table,
    /// One JSON object a line, for programs.
    Jsonl,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Start after this log position (0: from the beginning).
    #[arg(long, default_value_t = 0)]
    pub from: i64,
    /// Stop after this log position.
    #[arg(long)]
    pub to: Option<i64>,
    /// Only events recorded at or after this RFC 3339 time.
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,
    /// Only events recorded at or before this RFC 3339 time.
    #[arg(long)]
    pub until: Option<DateTime<Utc>>,
    /// Only these domain event types (repeatable), e.g. --type OrderCreated.
    #[arg(long = "type")]
    pub types: Vec<String>,
    /// jsonl: domain events with metadata; avro: an Avro object container
    /// file of the integration events (schemas/avro, as a union).
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: ReplayFormat,
    /// Write here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep streaming new events as they are committed.
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Parser)]
#[command(name = "serve")]
pub struct ServeArgs {
    /// Address the HTTP server listens on (port 0 picks a free port; the
    /// chosen address is printed on start).
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Webhook that customer notifications are POSTed to as JSON (http://
    /// only). When unset, notifications are written to the log.
    #[arg(long, env = "NOTIFY_WEBHOOK_URL")]
    pub notify_webhook_url: Option<String>,

    #[command(flatten)]
    pub saga: SagaArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// Kafka, the production bus. When KAFKA_BROKERS is unset, integration
/// events travel in-process over the store's log.
#[derive(Debug, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (host:port[,host:port...]).
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Partitions of each topic when the service creates it.
    #[arg(long, env = "KAFKA_PARTITIONS", default_value_t = 6,
          value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub kafka_partitions: i32,
    /// Put before every topic and consumer-group name (e.g. "staging.").
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = "")]
    pub kafka_topic_prefix: String,
    /// Extra librdkafka producer properties, key=value[,key=value...].
    #[arg(long, env = "KAFKA_PRODUCER_CONFIG", default_value = "")]
    pub kafka_producer_config: String,
    /// Extra librdkafka consumer properties, key=value[,key=value...].
    #[arg(long, env = "KAFKA_CONSUMER_CONFIG", default_value = "")]
    pub kafka_consumer_config: String,
}

impl KafkaArgs {
    /// The Kafka settings, or `None` for the in-process transport.
    pub fn config(&self) -> Result<Option<KafkaConfig>, String> {
        let Some(brokers) = self
            .kafka_brokers
            .as_deref()
            .map(str::trim)
            .filter(|b| !b.is_empty())
        else {
            return Ok(None);
        };
        Ok(Some(KafkaConfig {
            brokers: brokers.to_string(),
            partitions: self.kafka_partitions,
            prefix: self.kafka_topic_prefix.clone(),
            producer: parse_properties("KAFKA_PRODUCER_CONFIG", &self.kafka_producer_config)?,
            consumer: parse_properties("KAFKA_CONSUMER_CONFIG", &self.kafka_consumer_config)?,
        }))
    }
}

/// The saga's deadlines and retries (SPEC §3). Durations like 90s, 3m, 1h.
#[derive(Debug, Args)]
pub struct SagaArgs {
    /// Cancel an order (STOCK_RESERVATION_TIMEOUT) with no stock reply by then.
    #[arg(long, env = "STOCK_REPLY_TIMEOUT", default_value = "3m", value_parser = humantime::parse_duration)]
    pub stock_reply_timeout: Duration,
    /// After stock is reserved, retry once and then cancel (CONFIRMATION_FAILED) an order not confirmed by then.
    #[arg(long, env = "CONFIRMATION_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    pub confirmation_timeout: Duration,
    /// Cancel (SAGA_TIMEOUT) an order neither waiting for payment nor cancelled by then.
    #[arg(long, env = "SAGA_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub saga_timeout: Duration,
    /// Retries of a failed confirmation before cancelling (CONFIRMATION_FAILED).
    #[arg(long, env = "CONFIRM_RETRIES", default_value_t = 2)]
    pub confirm_retries: u32,
    /// Time between confirmation retries.
    #[arg(long, env = "CONFIRM_RETRY_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub confirm_retry_interval: Duration,
    /// Retries of a failed payment-wait opening before cancelling (PAYMENT_WAIT_FAILED).
    #[arg(long, env = "PAYMENT_WAIT_RETRIES", default_value_t = 3)]
    pub payment_wait_retries: u32,
    /// Time between payment-wait retries.
    #[arg(long, env = "PAYMENT_WAIT_RETRY_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub payment_wait_retry_interval: Duration,
    /// Retries of a failed customer notification.
    #[arg(long, env = "NOTIFY_RETRIES", default_value_t = 3)]
    pub notify_retries: u32,
    /// Time between notification retries.
    #[arg(long, env = "NOTIFY_RETRY_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub notify_retry_interval: Duration,
    /// Orders each of the saga's consumers handles at once (one order's
    /// messages stay in order): more keep the store busier under load, at
    /// the cost of more optimistic-lock retries on shared products.
    #[arg(long, env = "HANDLER_CONCURRENCY", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub handler_concurrency: u16,
}

impl SagaArgs {
    pub fn config(&self) -> SagaConfig {
        SagaConfig {
            stock_reply_timeout: self.stock_reply_timeout,
            confirmation_timeout: self.confirmation_timeout,
            saga_timeout: self.saga_timeout,
            confirm_retries: self.confirm_retries,
            confirm_retry_interval: self.confirm_retry_interval,
            payment_wait_retries: self.payment_wait_retries,
            payment_wait_retry_interval: self.payment_wait_retry_interval,
            notify_retries: self.notify_retries,
            notify_retry_interval: self.notify_retry_interval,
            handler_concurrency: usize::from(self.handler_concurrency),
            ..SagaConfig::default()
        }
    }
}

impl ServeArgs {
    /// The serve settings from the environment and defaults alone, for
    /// `order-saga` run without a subcommand.
    pub fn from_env() -> Self {
        ServeArgs::parse_from(["serve"])
    }
}

#[derive(Debug, Subcommand)]
pub enum ProductCommand {
    /// Create a product or change its price and/or stock level.
    ///
    /// Example: order-saga product set p-1 --price 12900.00 --stock 15
    Set {
        /// The product's id (1 to 64 printable characters).
        product_id: String,
        /// Unit price, a decimal with at most 2 places (e.g. 12900.00).
        #[arg(long, value_parser = parse_money)]
        price: Option<Money>,
        /// Units available to order (replaces the current available level).
        #[arg(long)]
        stock: Option<u32>,
    },
    /// Show one product, or every product when no id is given.
    Show {
        /// The product's id; omit to list all products.
        product_id: Option<String>,
        /// table or jsonl (default: table on a terminal, jsonl otherwise).
        #[arg(long, value_enum)]
        format: Option<OutputFormat>,
    },
    /// A product's stock movements — levels set, stock held and returned —
    /// with the orders that caused them.
    History {
        /// The product's id.
        product_id: String,
        /// table or jsonl (default: table on a terminal, jsonl otherwise).
        #[arg(long, value_enum)]
        format: Option<OutputFormat>,
    },
}

fn parse_money(text: &str) -> Result<Money, String> {
    text.parse::<Money>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_non_postgres_database_url_is_refused_by_name() {
        let cli = Cli::parse_from(["order-saga", "--database-url", "mysql://x", "migrate"]);
        let err = cli.store.config().unwrap_err();
        assert!(err.contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn no_database_url_means_the_embedded_store() {
        let cli = Cli::parse_from(["order-saga", "--data-dir", "/tmp/x", "migrate"]);
        assert_eq!(
            cli.store.config(),
            Ok(StoreConfig::Sqlite {
                data_dir: "/tmp/x".into()
            })
        );
    }

    #[test]
    fn serve_is_the_default_and_reads_its_defaults() {
        let cli = Cli::parse_from(["order-saga"]);
        assert!(cli.command.is_none());
        if std::env::var_os("HTTP_ADDR").is_none() {
            assert_eq!(
                ServeArgs::from_env().http_addr.to_string(),
                "127.0.0.1:8080"
            );
        }
    }

    #[test]
    fn suite_flags_need_the_suite_and_bad_values_are_refused_by_name() {
        let err = Cli::try_parse_from(["order-saga", "bench", "--quick"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--suite"), "{err}");
        let cli = Cli::parse_from(["order-saga", "bench", "--suite", "--step-duration", "0s"]);
        let Some(Command::Bench(args)) = cli.command else {
            panic!("bench expected");
        };
        let err = args.suite.config(String::new()).unwrap_err();
        assert!(err.contains("--step-duration"), "{err}");
        let cli = Cli::parse_from(["order-saga", "bench", "--suite", "--quick"]);
        let Some(Command::Bench(args)) = cli.command else {
            panic!("bench expected");
        };
        let config = args.suite.config(String::new()).unwrap();
        assert_eq!(config.step_duration, Duration::from_secs(5));
        assert_eq!(config.backends.len(), 3);
    }

    #[test]
    fn a_bad_price_is_refused_by_name() {
        let err = Cli::try_parse_from(["order-saga", "product", "set", "p-1", "--price", "1.234"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--price"), "{err}");
    }
}
