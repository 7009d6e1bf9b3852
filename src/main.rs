//! The `order-saga` binary: parses the command line, opens and migrates the
//! store, and runs the chosen subcommand.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::HeaderValue;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use order_saga::analytics::{self, ReplayFilter};
use order_saga::auth::Authenticator;
use order_saga::cli::{Cli, Command, PaymentCommand, PaymentOutcome, ProductCommand, ServeArgs};
use order_saga::cli::{
    DeadLettersCommand, OutputFormat, ProjectionsCommand, RedriveArgs, ReplayArgs, SagasCommand,
};
use order_saga::health::{pause, Readiness, Shutdown};
use order_saga::http::HttpState;
use order_saga::leadership::Roles;
use order_saga::read_models::{ReadModels, PROJECTIONS_ROLE};
use order_saga::saga::avro::Contract;
use order_saga::saga::kafka::{KafkaTransport, Relay, RELAY_ROLE};
use order_saga::saga::payment::{self, SimulatedPayment};
use order_saga::saga::transport::{LogTransport, Transport};
use order_saga::saga::{Redrive, Saga, SagaOptions, Side};
use order_saga::service::{App, OrderView, ProductView};
use order_saga::store::LogEntry;
use order_saga::store::{lock_data_dir, DeadLetterStatus, Store, StoreConfig};
use std::io::{IsTerminal, Write};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's allocator: see ARCHITECTURE.md, "Performance".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process (and the processes it
/// starts). mimalloc asks for them on its arena; the memory it hands back
/// is then refilled, 2 MiB at a time, when the kernel's khugepaged gets
/// round to the arena minutes later: the resident memory of a service
/// that had a burst grew by 10–30 %, ten minutes after it. See
/// ARCHITECTURE.md, "Performance", "No transparent huge pages".
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no
        // memory of ours.
        let set = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if set != 0 {
            eprintln!(
                "warning: transparent huge pages left on: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    no_huge_pages();
    let cli = Cli::parse();
    let tracer = match order_saga::telemetry::otlp_tracer() {
        Ok(tracer) => tracer,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let traces = tracer.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider;
        tracing_opentelemetry::layer().with_tracer(provider.tracer("order-saga"))
    });
    tracing_subscriber::registry()
        .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(traces)
        .init();
    let result = run(cli).await;
    if let Some(provider) = tracer {
        // The spans still in the batch are sent before the process ends.
        if let Err(e) = provider.shutdown() {
            eprintln!("warning: traces not all sent: {e}");
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = cli
        .command
        .unwrap_or_else(|| Command::Serve(Box::new(ServeArgs::from_env())));
    if let Command::Token(args) = &command {
        println!("{}", args.mint().context("minting the token")?);
        return Ok(());
    }
    // Settings that need no store are refused before it is opened.
    let front = match &command {
        Command::Serve(args) => FrontDoor::from_args(args)?,
        _ => FrontDoor::default(),
    };
    let config = cli.store.config().map_err(anyhow::Error::msg)?;
    // The embedded store serves one process: `serve` and `migrate` take its
    // data directory for themselves (the analysts' commands, `product set`
    // and `projections rebuild` run beside a service).
    let _data_dir = match (&config, &command) {
        (StoreConfig::Sqlite { data_dir }, Command::Serve(_) | Command::Migrate) => {
            Some(lock_data_dir(data_dir)?)
        }
        _ => None,
    };
    let store = Store::open(&config).await.context("opening the store")?;
    store.migrate().await.context("migrating the store")?;
    let app = App::new(store.clone());
    let result = match command {
        Command::Serve(args) => serve(app, *args, front).await,
        Command::Token(_) => Ok(()),
        Command::Migrate => {
            println!("migrations applied ({})", store.backend());
            Ok(())
        }
        Command::Product(ProductCommand::Set {
            product_id,
            price,
            stock,
        }) => {
            let view = app.set_product(&product_id, price, stock).await?;
            print_products(&[view]);
            Ok(())
        }
        Command::Product(ProductCommand::Show { product_id, format }) => {
            let products = match product_id {
                None => app.products().await?,
                Some(id) => vec![app
                    .product(&id)
                    .await?
                    .with_context(|| format!("productId: unknown product '{id}'"))?],
            };
            match output_format(format) {
                OutputFormat::Table => print_products(&products),
                OutputFormat::Jsonl => print_jsonl(&products)?,
            }
            Ok(())
        }
        Command::Product(ProductCommand::History { product_id, format }) => {
            let entries = analytics::product_history(&store, &product_id).await?;
            if entries.is_empty() {
                anyhow::bail!("productId: unknown product '{product_id}'");
            }
            print_entries(&entries, output_format(format))
        }
        Command::Events { order_id, format } => {
            let entries = analytics::order_history(&store, &order_id).await?;
            if entries.is_empty() {
                anyhow::bail!("orderId: unknown order '{order_id}'");
            }
            print_entries(&entries, output_format(format))
        }
        Command::Order { order_id, as_of } => {
            let (order, version) = analytics::order_as_of(&store, &order_id, as_of)
                .await?
                .with_context(|| {
                    format!("orderId: order '{order_id}' did not exist at {as_of:?}")
                })?;
            let view = OrderView::from_aggregate(&order_id, order, version).with_context(|| {
                format!("orderId: order '{order_id}' did not exist at {as_of:?}")
            })?;
            println!("{}", serde_json::to_string_pretty(&view)?);
            Ok(())
        }
        Command::Replay(args) => replay(&store, args).await,
        Command::Payment(PaymentCommand::Simulate(args)) => {
            let kafka = args.kafka.config().map_err(anyhow::Error::msg)?;
            let payment = SimulatedPayment {
                order_id: args.order_id.clone(),
                completed: args.result == PaymentOutcome::Completed,
                method: args.method,
                amount: args.amount,
                failure_reason: args.reason,
                payment_id: args.payment_id,
            };
            let body = payment::simulate(&store, kafka.as_ref(), payment)
                .await
                .map_err(anyhow::Error::msg)?;
            let sent = serde_json::json!({
                "topic": body.topic().as_str(),
                "orderId": args.order_id,
                "via": if kafka.is_some() { "kafka" } else { "log" },
                "event": body,
            });
            println!("{sent}");
            Ok(())
        }
        Command::Projections(ProjectionsCommand::Rebuild { name }) => {
            rebuild_projections(&store, &name).await
        }
        Command::DeadLetters(command) => dead_letters(&store, command).await,
        Command::Sagas(SagasCommand::Stuck {
            older_than,
            payment_timeout,
            format,
        }) => {
            let stuck = app.stuck_sagas(older_than, payment_timeout).await?;
            match output_format(format) {
                OutputFormat::Jsonl => print_jsonl(&stuck)?,
                OutputFormat::Table => {
                    let now = chrono::Utc::now().timestamp_millis();
                    println!(
                        "{:<36}  {:<15}  {:<28}  LAST STEP AGE",
                        "ORDER", "STATUS", "LAST STEP"
                    );
                    for saga in &stuck {
                        let age = saga.last_step_at_ms.map_or("-".to_string(), |at| {
                            let age = Duration::from_secs(((now - at) / 1000).max(0) as u64);
                            humantime::format_duration(age).to_string()
                        });
                        println!(
                            "{:<36}  {:<15}  {:<28}  {age}",
                            saga.order_id,
                            saga.status,
                            saga.last_step.as_deref().unwrap_or("-"),
                        );
                    }
                }
            }
            Ok(())
        }
    };
    store.close().await;
    result
}

async fn dead_letters(store: &Store, command: DeadLettersCommand) -> anyhow::Result<()> {
    let unknown = |id: i64| anyhow::anyhow!("id: no dead letter {id}");
    match command {
        DeadLettersCommand::List { status, format } => {
            let letters = store.dead_letters_in(status.status()).await?;
            match output_format(format) {
                OutputFormat::Jsonl => print_jsonl(&letters)?,
                OutputFormat::Table => {
                    println!(
                        "{:>6}  {:<9}  {:<20}  {:<28}  {:>8}  ERROR",
                        "ID", "STATUS", "CONSUMER", "TOPIC", "REDRIVES"
                    );
                    for d in &letters {
                        println!(
                            "{:>6}  {:<9}  {:<20}  {:<28}  {:>8}  {}",
                            d.id, d.status, d.consumer, d.topic, d.redrives, d.error
                        );
                    }
                }
            }
        }
        DeadLettersCommand::Show { id } => {
            let dead = store.dead_letter(id).await?.ok_or_else(|| unknown(id))?;
            println!("{}", serde_json::to_string_pretty(&dead)?);
        }
        DeadLettersCommand::Discard { id } => {
            let now = chrono::Utc::now().timestamp_millis();
            match store.discard_dead_letter(id, now).await? {
                Ok(_) => {}
                Err(None) => return Err(unknown(id)),
                Err(Some(status)) => {
                    anyhow::bail!("id: dead letter {id} is {status}, not PENDING")
                }
            }
            println!("{}", serde_json::json!({"id": id, "status": "DISCARDED"}));
        }
        DeadLettersCommand::Redrive(args) => {
            let RedriveArgs {
                id, notify, saga, ..
            } = *args;
            let ids = match id {
                Some(id) => vec![id],
                None => store
                    .dead_letters_in(Some(DeadLetterStatus::Pending))
                    .await?
                    .iter()
                    .map(|d| d.id)
                    .collect(),
            };
            let options = SagaOptions {
                config: saga.config(),
                notifier: notify.notifier().map_err(anyhow::Error::msg)?,
                ..SagaOptions::default()
            };
            let saga = Saga::new(store.clone(), &LogTransport::new(store.clone()), options).await?;
            let mut failed = 0;
            for id in ids {
                let outcome = saga.redrive(id).await?.ok_or_else(|| unknown(id))?;
                failed += usize::from(matches!(outcome, Redrive::Failed { .. }));
                let mut line = serde_json::to_value(&outcome)?;
                line["id"] = id.into();
                println!("{line}");
            }
            if failed > 0 {
                anyhow::bail!("{failed} dead letters failed again; they stay PENDING");
            }
        }
    }
    Ok(())
}

/// Who may call, from where: checked before anything starts.
#[derive(Default)]
struct FrontDoor {
    auth: Authenticator,
    cors_origins: Vec<HeaderValue>,
}

impl FrontDoor {
    fn from_args(args: &ServeArgs) -> anyhow::Result<Self> {
        let auth = Authenticator::from_args(&args.auth, args.http_addr)?;
        let cors_origins = args
            .cors_origins
            .iter()
            .filter(|o| !o.trim().is_empty())
            .map(|origin| {
                HeaderValue::from_str(origin.trim())
                    .ok()
                    .filter(|_| origin.starts_with("http://") || origin.starts_with("https://"))
                    .with_context(|| {
                        format!("CORS_ORIGINS (--cors-origin): '{origin}' is not an origin like https://shop.example.com")
                    })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(FrontDoor { auth, cors_origins })
    }
}

async fn serve(app: Arc<App>, args: ServeArgs, front: FrontDoor) -> anyhow::Result<()> {
    let addr = args.http_addr;
    let notifier = args.notify.notifier().map_err(anyhow::Error::msg)?;
    let store = app.store().clone();
    let kafka = args.kafka.config().map_err(anyhow::Error::msg)?;
    // The work one instance does at a time: the relay with Kafka, each
    // consumer and the projection with the in-process bus (Kafka's
    // consumer groups share partitions among the instances themselves).
    let mut role_names = vec![PROJECTIONS_ROLE.to_string()];
    match &kafka {
        Some(_) => role_names.push(RELAY_ROLE.to_string()),
        None => role_names.extend(Side::ALL.map(Side::role)),
    }
    let (stop_roles, roles_stopped) = tokio::sync::watch::channel(false);
    let (roles, role_tasks) = Roles::elect(&store, &role_names, roles_stopped).await;
    let contract = Arc::new(Contract::load().map_err(anyhow::Error::msg)?);
    let (transport, relay): (Box<dyn Transport>, Option<Arc<Relay>>) = match &kafka {
        Some(config) => {
            let transport = KafkaTransport::connect(config.clone(), contract.clone())
                .await
                .with_context(|| {
                    format!(
                        "KAFKA_BROKERS ({}): cannot set up the Kafka clients",
                        config.brokers
                    )
                })?;
            let relay = Relay::new(
                store.clone(),
                config.clone(),
                contract.clone(),
                roles.clone(),
                transport.topics_ready(),
            )?;
            (Box::new(transport), Some(relay))
        }
        None => (Box::new(LogTransport::new(store.clone())), None),
    };
    let options = SagaOptions {
        config: args.saga.config(),
        notifier,
        roles: roles.clone(),
        ..SagaOptions::default()
    };
    let saga = Saga::new(store.clone(), transport.as_ref(), options)
        .await
        .context("starting the saga")?;
    let projections = ReadModels::with_roles(store.clone(), roles.clone());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("HTTP_ADDR (--http-addr): cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let admin = match args.admin_addr {
        Some(admin_addr) => Some(
            tokio::net::TcpListener::bind(admin_addr)
                .await
                .with_context(|| {
                    format!("ADMIN_ADDR (--admin-addr): cannot listen on {admin_addr}")
                })?,
        ),
        None => None,
    };

    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut tasks = saga.spawn(shutdown.clone());
    tasks.extend(projections.spawn(Duration::from_millis(10), shutdown.clone()));
    let mut readiness = Readiness {
        components: vec![
            ("saga", saga.heartbeat()),
            ("projections", projections.heartbeat()),
        ],
    };
    if let Some(relay) = &relay {
        tasks.extend(relay.spawn(Duration::from_millis(5), shutdown.clone()));
        readiness.components.push(("broker", relay.heartbeat()));
    }
    if let Some(handle) = order_saga::telemetry::prometheus() {
        tasks.push(tokio::spawn(order_saga::telemetry::upkeep(
            handle,
            shutdown.clone(),
        )));
    }
    tasks.push(tokio::spawn(sequence_log(store.clone(), shutdown)));
    let mut state =
        HttpState::with_saga(app, projections, saga.clone(), readiness).with_auth(front.auth);
    state.roles = roles;
    state.cors_origins = front.cors_origins;
    state.admin_apart = admin.is_some();
    let admin_local = admin.as_ref().map(|a| a.local_addr()).transpose()?;
    if let Some(admin) = admin {
        let router = order_saga::http::admin_router(state.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(admin, router).await {
                tracing::error!(error = %e, "the admin listener stopped");
            }
        }));
    }

    let bus = if kafka.is_some() {
        "kafka"
    } else {
        "in-process"
    };
    let auth = if state.auth.required() { "jwt" } else { "none" };
    tracing::info!(store = store.backend(), bus, auth, %local, "order-saga serving");
    // The first line names the API's address (scripts and tests read it).
    println!("listening on http://{local}");
    if let Some(admin_local) = admin_local {
        println!("admin listening on http://{admin_local}");
    }
    axum::serve(listener, order_saga::http::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    // In-flight requests are done; let the loops finish their pass (their
    // checkpoints are committed per batch) and stop.
    let _ = stop.send(true);
    tasks.join(Duration::from_secs(10)).await;
    // Only now give the roles up: the loops above have stopped.
    let _ = stop_roles.send(true);
    role_tasks.join(Duration::from_secs(5)).await;
    tracing::info!("order-saga stopped");
    Ok(())
}

/// Keeps the global log numbered while the service runs, so every stored
/// event has its position within moments even when no reader is tailing.
async fn sequence_log(store: Store, mut shutdown: Shutdown) {
    loop {
        if let Err(e) = store.sequence_pending().await {
            tracing::warn!(error = %e, "numbering the global log failed; retrying");
        }
        if pause(Duration::from_millis(100), &mut shutdown).await {
            break;
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Table on a terminal, JSON lines otherwise, unless the user chose.
fn output_format(chosen: Option<OutputFormat>) -> OutputFormat {
    chosen.unwrap_or(if std::io::stdout().is_terminal() {
        OutputFormat::Table
    } else {
        OutputFormat::Jsonl
    })
}

fn print_jsonl<T: serde::Serialize>(items: &[T]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for item in items {
        serde_json::to_writer(&mut out, item)?;
        writeln!(out)?;
    }
    Ok(())
}

fn print_entries(entries: &[LogEntry], format: OutputFormat) -> anyhow::Result<()> {
    if format == OutputFormat::Jsonl {
        return print_jsonl(entries);
    }
    println!(
        "{:>9}  {:<27}  {:<16}  {:>3}  {:<22}  PAYLOAD",
        "POSITION", "RECORDED_AT", "AGGREGATE", "SEQ", "EVENT"
    );
    for e in entries {
        println!(
            "{:>9}  {:<27}  {:<16}  {:>3}  {:<22}  {}",
            e.position,
            e.recorded_at_text(),
            e.aggregate_type,
            e.sequence,
            e.event_type,
            e.payload
        );
    }
    Ok(())
}

/// Rebuilds the read models with a progress bar on a terminal, plain
/// progress lines otherwise.
async fn rebuild_projections(store: &Store, name: &str) -> anyhow::Result<()> {
    if name != "read_models" {
        anyhow::bail!("--name: unknown projection '{name}' (there is: read_models)");
    }
    let projections = ReadModels::new(store.clone());
    let terminal = std::io::stderr().is_terminal();
    let bar = ProgressBar::new(0);
    if terminal {
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} rebuilding {wide_bar} {pos}/{len} events ({per_sec}, {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut reported = 0;
    projections
        .rebuild(|position, head| {
            bar.set_length(head.max(0) as u64);
            bar.set_position(position.max(0) as u64);
            if !terminal && (position - reported >= 10_000 || position == head) {
                reported = position;
                eprintln!("rebuilt read models up to position {position} of {head}");
            }
        })
        .await?;
    bar.finish_and_clear();
    println!(
        "read models rebuilt and switched at position {}",
        projections.position().await?
    );
    Ok(())
}

async fn replay(store: &Store, args: ReplayArgs) -> anyhow::Result<()> {
    let filter = ReplayFilter {
        from: args.from,
        to: args.to,
        since: args.since,
        until: args.until,
        types: args.types,
    };
    let written = match &args.out {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("--out: cannot create {}", path.display()))?;
            analytics::replay(store, &filter, args.format, file, args.follow, |_| {}).await?
        }
        None => {
            let stdout = std::io::stdout().lock();
            analytics::replay(store, &filter, args.format, stdout, args.follow, |_| {}).await?
        }
    };
    tracing::info!(events = written, "replay done");
    Ok(())
}

fn print_products(products: &[ProductView]) {
    println!(
        "{:<24} {:>14} {:>10} {:>10} {:>10}",
        "PRODUCT", "PRICE", "AVAILABLE", "RESERVED", "SOLD"
    );
    for p in products {
        let price = p.price.map(|m| m.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:>14} {:>10} {:>10} {:>10}",
            p.product_id, price, p.available, p.reserved, p.sold
        );
    }
}
