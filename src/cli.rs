//! The command line: one binary, `order-saga`, whose subcommands share the
//! store settings. Every setting is a flag and an environment variable;
//! a wrong one fails at start with a message naming it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use order_saga_domain::{Money, PaymentMethod};

use chrono::{DateTime, Utc};

use crate::analytics::{AsOf, ReplayFormat};
use crate::saga::kafka::{parse_properties, KafkaConfig};
use crate::saga::notifier::{LogNotifier, Notifier, WebhookNotifier, WebhookSettings};
use crate::saga::SagaConfig;
use crate::store::{DeadLetterStatus, StoreConfig};

#[derive(Debug, Parser)]
#[command(
    name = "order-saga",
    version,
    about = "Event-sourced order service running the Order Creation SAGA",
    long_about = "Event-sourced order service running the Order Creation SAGA.\n\n\
        With no DATABASE_URL the events live in an embedded SQLite file under --data-dir; \
        with DATABASE_URL=postgres://... they live in PostgreSQL. Migrations are applied \
        at start. Without a subcommand, `serve` runs.\n\n\
        Several instances may serve one PostgreSQL database: the relay, and with the \
        in-process bus each saga consumer and the projection, run on one instance at a \
        time (elected through the database; see /readyz). The embedded store serves one \
        process: `serve` and `migrate` lock --data-dir.\n\n\
        With OTEL_EXPORTER_OTLP_ENDPOINT set (e.g. http://collector:4318), traces are \
        exported over OTLP/HTTP; an order's saga is one trace."
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
    /// unset); created if missing. One process serves it at a time.
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
    /// Print an HS256 token for development (needs no store).
    ///
    /// Example: order-saga token --sub u-1 --role operator --secret "$AUTH_JWT_SECRET"
    Token(crate::auth::TokenArgs),
    /// Payment results for development, as the payment service sends them.
    #[command(subcommand)]
    Payment(PaymentCommand),
    /// Messages a consumer gave up on: look at them, hand them back to
    /// their consumer (redrive) or set them aside (discard).
    ///
    /// Example: order-saga dead-letters list; order-saga dead-letters redrive 12
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// Sagas, as an operator looks at them.
    #[command(subcommand)]
    Sagas(SagasCommand),
}

#[derive(Debug, Subcommand)]
pub enum SagasCommand {
    /// Sagas that have not ended in time, oldest first, with their last
    /// step and its age: orders created or confirmed longer ago than
    /// --older-than, and orders waiting for their payment longer than
    /// --payment-timeout plus --older-than (from the read models).
    ///
    /// Example: order-saga sagas stuck --older-than 10m
    Stuck {
        /// How long past its due end a saga counts as stuck (e.g. 90s, 5m).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// The service's payment timeout (PAYMENT_TIMEOUT of `serve`).
        #[arg(long, env = "PAYMENT_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
        payment_timeout: Duration,
        /// table or jsonl (default: table on a terminal, jsonl otherwise).
        #[arg(long, value_enum)]
        format: Option<OutputFormat>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// The dead letters, oldest first (pending ones unless --status says).
    List {
        /// pending, redriven, discarded or all.
        #[arg(long, value_enum, default_value = "pending")]
        status: DeadLetterFilter,
        /// table or jsonl (default: table on a terminal, jsonl otherwise).
        #[arg(long, value_enum)]
        format: Option<OutputFormat>,
    },
    /// One dead letter in full: its error and its message, as JSON.
    Show {
        /// The dead letter's id (from `list`).
        id: i64,
    },
    /// Hand pending dead letters back to their consumer, once each (run it
    /// after the fix: a new version, the product created, the store back);
    /// each ends REDRIVEN, or stays PENDING with its new error. Prints one
    /// JSON line per dead letter; fails if any failed again.
    Redrive(Box<RedriveArgs>),
    /// Set a pending dead letter aside for good (it is kept, DISCARDED).
    Discard {
        /// The dead letter's id (from `list`).
        id: i64,
    },
}

#[derive(Debug, Args)]
pub struct RedriveArgs {
    /// The dead letter's id (from `list`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub id: Option<i64>,
    /// Every pending dead letter, oldest first.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub notify: NotifyArgs,
    #[command(flatten)]
    pub saga: SagaArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeadLetterFilter {
    Pending,
    Redriven,
    Discarded,
    All,
}

impl DeadLetterFilter {
    pub fn status(self) -> Option<DeadLetterStatus> {
        match self {
            DeadLetterFilter::Pending => Some(DeadLetterStatus::Pending),
            DeadLetterFilter::Redriven => Some(DeadLetterStatus::Redriven),
            DeadLetterFilter::Discarded => Some(DeadLetterStatus::Discarded),
            DeadLetterFilter::All => None,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum PaymentCommand {
    /// Send a payment result for an order waiting for its payment, as the
    /// payment service would: to the payment.completed / payment.failed
    /// topic with KAFKA_BROKERS set, else into the store's log, where the
    /// in-process bus of a running service picks it up. Prints the event.
    ///
    /// Example: order-saga payment simulate 3f2c… --result completed --method CARD
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The order's id.
    pub order_id: String,
    /// Whether the payment went through.
    #[arg(long, value_enum)]
    pub result: PaymentOutcome,
    /// How the customer paid: CARD, BANK_TRANSFER, KAKAO_PAY, NAVER_PAY or TOSS.
    #[arg(long, default_value = "CARD", value_parser = parse_method)]
    pub method: PaymentMethod,
    /// The amount paid, a decimal with at most 2 places [default: the
    /// order's total].
    #[arg(long, value_parser = parse_money)]
    pub amount: Option<Money>,
    /// Why a failed payment failed.
    #[arg(long, default_value = "card declined")]
    pub reason: String,
    /// The payment's id [default: a new one]; give one again to send a
    /// second result for the same payment.
    #[arg(long)]
    pub payment_id: Option<String>,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PaymentOutcome {
    Completed,
    Failed,
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

    /// Serve /metrics (with /healthz and /readyz) on this address instead
    /// of HTTP_ADDR, so it need not face the internet.
    #[arg(long, env = "ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,

    /// A browser origin allowed to call the API (CORS), e.g.
    /// https://shop.example.com; repeatable, or comma-separated in the
    /// environment.
    #[arg(long = "cors-origin", env = "CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,

    #[command(flatten)]
    pub notify: NotifyArgs,

    #[command(flatten)]
    pub saga: SagaArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// Customer notifications.
#[derive(Debug, Args)]
pub struct NotifyArgs {
    /// Webhook that customer notifications are POSTed to as JSON (https://,
    /// or http:// on a private network). When unset, notifications are
    /// written to the log.
    #[arg(long, env = "NOTIFY_WEBHOOK_URL")]
    pub notify_webhook_url: Option<String>,

    /// Shared secret the webhook requests are signed with: header
    /// Order-Saga-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
    /// "<t>.<body>">.
    #[arg(long, env = "NOTIFY_WEBHOOK_SECRET", hide_env_values = true)]
    pub notify_webhook_secret: Option<String>,

    /// PEM file of CA certificates to trust for the webhook, besides the
    /// public roots (an endpoint with a private CA).
    #[arg(long, env = "NOTIFY_WEBHOOK_CA_FILE")]
    pub notify_webhook_ca_file: Option<PathBuf>,
}

impl NotifyArgs {
    /// The notifier these settings name: the webhook, or the log.
    pub fn notifier(&self) -> Result<Arc<dyn Notifier>, String> {
        let Some(url) = self
            .notify_webhook_url
            .as_deref()
            .filter(|url| !url.trim().is_empty())
        else {
            if self.notify_webhook_secret.is_some() || self.notify_webhook_ca_file.is_some() {
                return Err("NOTIFY_WEBHOOK_URL (--notify-webhook-url): needed by \
                            NOTIFY_WEBHOOK_SECRET / NOTIFY_WEBHOOK_CA_FILE"
                    .into());
            }
            return Ok(Arc::new(LogNotifier));
        };
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(
                "NOTIFY_WEBHOOK_URL (--notify-webhook-url): expected an https:// or http:// URL"
                    .into(),
            );
        }
        let secret = match self.notify_webhook_secret.as_deref() {
            Some("") => {
                return Err(
                    "NOTIFY_WEBHOOK_SECRET (--notify-webhook-secret): must not be empty".into(),
                )
            }
            secret => secret.map(str::to_string),
        };
        let ca_pem = match &self.notify_webhook_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                format!(
                    "NOTIFY_WEBHOOK_CA_FILE (--notify-webhook-ca-file): {}: {e}",
                    path.display()
                )
            })?),
            None => None,
        };
        let settings = WebhookSettings {
            url: url.to_string(),
            secret,
            ca_pem,
        };
        Ok(Arc::new(WebhookNotifier::new(
            settings,
            Duration::from_secs(5),
        )?))
    }
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
    /// Cancel (PAYMENT_TIMEOUT) an order still waiting for its payment this
    /// long after the wait opened, returning its stock.
    #[arg(long, env = "PAYMENT_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
    pub payment_timeout: Duration,
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
            payment_timeout: self.payment_timeout,
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
    /// A product's stock movements — levels set, stock held, returned and sold —
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

fn parse_method(text: &str) -> Result<PaymentMethod, String> {
    text.parse::<PaymentMethod>().map_err(|e| e.message)
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
    fn a_bad_payment_method_is_refused_by_name() {
        let err = Cli::try_parse_from([
            "order-saga",
            "payment",
            "simulate",
            "o-1",
            "--result",
            "completed",
            "--method",
            "CASH",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--method") && err.contains("KAKAO_PAY"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_price_is_refused_by_name() {
        let err = Cli::try_parse_from(["order-saga", "product", "set", "p-1", "--price", "1.234"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--price"), "{err}");
    }
}
