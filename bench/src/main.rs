//! `order-saga-bench`: the load generator's binary (see the crate's
//! documentation).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use order_saga_bench::cli::BenchArgs;
use order_saga_bench::BenchConfig;

#[tokio::main]
async fn main() -> ExitCode {
    let args = BenchArgs::parse();
    match bench(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if args.suite.enabled {
        let command = std::env::args()
            .map(|a| shell_word(&a))
            .collect::<Vec<_>>()
            .join(" ");
        let config = args.suite.config(command).map_err(anyhow::Error::msg)?;
        let results = order_saga_bench::suite::run(config).await?;
        let report = order_saga_bench::report::markdown(&results);
        if let Some(at) = report.find("## Targets") {
            print!("{}", &report[at..]);
        }
        return Ok(());
    }
    let config = BenchConfig {
        url: args.url.trim_end_matches('/').to_string(),
        order_urls: Vec::new(),
        rate: args.rate,
        duration: args.duration,
        products: args.products,
        stock: args.stock,
        max_items: args.items,
        hot: args.hot.clamp(0.0, 1.0),
        settle: args.settle,
        setup: args.setup,
        jwt_secret: args.jwt_secret.clone(),
    };
    let report = order_saga_bench::run(&config).await?;
    print!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("--json: cannot write {}", path.display()))?;
    }
    Ok(())
}

/// `word` as a shell would need it quoted.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}
