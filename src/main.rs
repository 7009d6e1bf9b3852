//! The `order-saga` binary: parses the command line, opens and migrates the
//! store, and runs the chosen subcommand.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use order_saga::cli::{Cli, Command, ProductCommand, ServeArgs};
use order_saga::saga::notify::{LogNotifier, Notifier, WebhookNotifier};
use order_saga::saga::transport::LogTransport;
use order_saga::saga::{Saga, SagaOptions};
use order_saga::service::{App, ProductView};
use order_saga::store::Store;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.store.config().map_err(anyhow::Error::msg)?;
    let store = Store::open(&config).await.context("opening the store")?;
    store.migrate().await.context("migrating the store")?;
    let app = App::new(store.clone());
    let result = match cli
        .command
        .unwrap_or_else(|| Command::Serve(ServeArgs::from_env()))
    {
        Command::Serve(args) => serve(app, args).await,
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
        Command::Product(ProductCommand::Show { product_id: None }) => {
            print_products(&app.products().await?);
            Ok(())
        }
        Command::Product(ProductCommand::Show {
            product_id: Some(id),
        }) => {
            let view = app
                .product(&id)
                .await?
                .with_context(|| format!("productId: unknown product '{id}'"))?;
            print_products(&[view]);
            Ok(())
        }
    };
    store.close().await;
    result
}

async fn serve(app: Arc<App>, args: ServeArgs) -> anyhow::Result<()> {
    let addr = args.http_addr;
    let notifier: Arc<dyn Notifier> = match args.notify_webhook_url.as_deref() {
        Some(url) if !url.trim().is_empty() => {
            if !url.starts_with("http://") {
                anyhow::bail!("NOTIFY_WEBHOOK_URL (--notify-webhook-url): expected an http:// URL");
            }
            Arc::new(
                WebhookNotifier::new(url.to_string(), Duration::from_secs(5))
                    .map_err(anyhow::Error::msg)?,
            )
        }
        _ => Arc::new(LogNotifier),
    };
    let options = SagaOptions {
        config: args.saga.config(),
        notifier,
        ..SagaOptions::default()
    };
    let transport = LogTransport::new(app.store().clone());
    let saga = Saga::new(app.store().clone(), &transport, options)
        .await
        .context("starting the saga")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("HTTP_ADDR (--http-addr): cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(store = app.store().backend(), %local, "order-saga serving");
    println!("listening on http://{local}");
    let sequencer = tokio::spawn(sequence_log(app.store().clone()));
    let saga_tasks = saga.spawn();
    axum::serve(listener, order_saga::http::router(app))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    sequencer.abort();
    drop(saga_tasks);
    Ok(())
}

/// Keeps the global log numbered while the service runs, so every stored
/// event has its position within moments even when no reader is tailing.
async fn sequence_log(store: Store) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = store.sequence_pending().await {
            tracing::warn!(error = %e, "numbering the global log failed; retrying");
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

fn print_products(products: &[ProductView]) {
    println!(
        "{:<24} {:>14} {:>10} {:>10}",
        "PRODUCT", "PRICE", "AVAILABLE", "RESERVED"
    );
    for p in products {
        let price = p.price.map(|m| m.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:>14} {:>10} {:>10}",
            p.product_id, price, p.available, p.reserved
        );
    }
}
