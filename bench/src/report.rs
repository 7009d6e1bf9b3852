//! BENCHMARKS.md and its JSON twin, written from the suite's results: the
//! machine, the command, the ceilings, the scenarios and the targets table
//! (figure | target | measured | met?).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use super::ceilings::{Rate, APPEND_POOL_SIZE, APPEND_WRITERS};
use super::BenchReport;
use crate::results::{
    ms, per_s, Backend, BackendResult, Step, SuiteResults, FAILOVER_KILLS, KEEP_UP,
    SAGA_P99_LIMIT_MS,
};
use crate::suite;
use order_saga::store::SNAPSHOT_EVERY;

/// Writes the Markdown report to `out` and the JSON beside it.
pub fn write(results: &SuiteResults, out: &Path) -> anyhow::Result<()> {
    std::fs::write(out, markdown(results))
        .with_context(|| format!("--out: cannot write {}", out.display()))?;
    let json = suite::json_path(out);
    std::fs::write(&json, serde_json::to_string_pretty(results)?)
        .with_context(|| format!("--out: cannot write {}", json.display()))?;
    Ok(())
}

/// Milliseconds, with the precision that matters at their size.
/// Text safe inside a table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn rate_cell(rate: Option<&Rate>, unit: &str) -> String {
    match rate {
        None => "not run".to_string(),
        Some(rate) => match (rate.per_second, &rate.error) {
            (Some(v), None) => format!("{v:.0} {unit}/s"),
            (Some(v), Some(e)) => format!("{v:.0} {unit}/s ({})", cell(e)),
            (None, Some(e)) => format!("failed: {}", cell(e)),
            (None, None) => "nothing measured".to_string(),
        },
    }
}

fn steps_table(md: &mut String, steps: &[Step], with_tx: bool) {
    let _ = writeln!(
        md,
        "| offered/s | achieved/s | accept p50 | p90 | p99 | p99.9 | max | saga p50 | p90 | p99 | p99.9 | max | sagas/s | cancelled | unfinished | failed |{} verdict |",
        if with_tx { " tx/order |" } else { "" }
    );
    let _ = writeln!(
        md,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|{}---|",
        if with_tx { "---:|" } else { "" }
    );
    for s in steps {
        let mut verdict = if s.kept_up() {
            "kept up".to_string()
        } else {
            format!("saturated: {}", s.saturated_by.join(", "))
        };
        if let Some(e) = &s.error {
            verdict.push_str(&format!(" — {}", cell(e)));
        }
        if let Some(n) = &s.note {
            verdict.push_str(&format!(" ({})", cell(n)));
        }
        let tx = if with_tx {
            format!(
                " {} |",
                s.tx_per_order
                    .map_or("—".to_string(), |t| format!("{t:.1}"))
            )
        } else {
            String::new()
        };
        match &s.report {
            Some(r) => {
                let _ = writeln!(
                    md,
                    "| {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |{tx} {verdict} |",
                    s.rate,
                    per_s(r.achieved_rate),
                    ms(r.acceptance.p50_ms),
                    ms(r.acceptance.p90_ms),
                    ms(r.acceptance.p99_ms),
                    ms(r.acceptance.p999_ms),
                    ms(r.acceptance.max_ms),
                    ms(r.saga.p50_ms),
                    ms(r.saga.p90_ms),
                    ms(r.saga.p99_ms),
                    ms(r.saga.p999_ms),
                    ms(r.saga.max_ms),
                    per_s(r.saga_rate),
                    r.cancelled,
                    r.unfinished,
                    r.failed,
                );
            }
            None => {
                let _ = writeln!(
                    md,
                    "| {:.0} | — | — | — | — | — | — | — | — | — | — | — | — | — | — | — |{tx} {verdict} |",
                    s.rate
                );
            }
        }
    }
}

fn backend_section(md: &mut String, b: &BackendResult) {
    let _ = writeln!(md, "### {}\n", b.title);
    if let Some(why) = &b.skipped {
        let _ = writeln!(md, "Not run: {}.\n", cell(why));
        return;
    }
    let with_tx = b.backend != Backend::Embedded;
    let _ = writeln!(md, "Ramp (each step on a fresh instance):\n");
    steps_table(md, &b.ramp, with_tx);
    if !b.bisect.is_empty() {
        let _ = writeln!(md, "\nBisection for the maximum sustainable rate:\n");
        steps_table(md, &b.bisect, false);
    }
    let _ = writeln!(
        md,
        "\n**Maximum sustainable rate: {}** — {}.\n",
        b.max_sustainable
            .map_or("none".to_string(), |r| format!("{r:.0} orders/s")),
        b.max_sustainable_how
    );
}

fn failover_section(md: &mut String, r: &SuiteResults) {
    let _ = writeln!(md, "## Failover\n");
    if let Some(why) = &r.instances_skipped {
        let _ = writeln!(md, "Not run: {}.\n", cell(why));
        return;
    }
    if r.failover.is_empty() {
        let _ = writeln!(md, "Not run yet.\n");
        return;
    }
    let _ = writeln!(
        md,
        "Two instances on one fresh PostgreSQL store. {FAILOVER_KILLS} times: the one holding the \
         roles is SIGKILLed one second into {:.0} orders/s sent to the other for {:.0} s; the \
         takeover is the time from the kill until the survivor's `/readyz` shows every role held \
         (asked every 20 ms); every saga of that load must finish; then a replacement starts.\n",
        r.failover[0].load_rate, r.failover[0].load_s,
    );
    for f in &r.failover {
        let _ = writeln!(md, "{}:\n", f.backend.title());
        let _ = writeln!(
            md,
            "| kill | roles of the killed instance | taken over | accepted | failed | unfinished | saga p99 |\n|---:|---|---:|---:|---:|---:|---:|"
        );
        for (i, k) in f.kills.iter().enumerate() {
            let load =
                |pick: fn(&BenchReport) -> String| k.load.as_ref().map_or("—".to_string(), pick);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                i + 1,
                cell(&k.roles.join(", ")),
                k.taken_over_ms
                    .map_or("not within 60 s".to_string(), |v| format!("{} ms", ms(v))),
                load(|l| l.accepted.to_string()),
                load(|l| l.failed.to_string()),
                load(|l| l.unfinished.to_string()),
                load(|l| format!("{} ms", ms(l.saga.p99_ms))),
            );
        }
        match f.p50_max_ms() {
            Some((p50, max)) => {
                let _ = writeln!(md, "\n**Takeover p50 {} ms, max {} ms.**", ms(p50), ms(max));
            }
            None => {
                let _ = writeln!(md, "\n**Not every kill was taken over.**");
            }
        }
        for e in &f.errors {
            let _ = writeln!(md, "\nProblem: {}", cell(e));
        }
        let _ = writeln!(md);
    }
}

fn auth_section(md: &mut String, r: &SuiteResults) {
    let _ = writeln!(md, "## Authentication cost\n");
    let a = match (&r.auth, &r.auth_skipped) {
        (Some(a), _) => a,
        (None, Some(why)) => {
            let _ = writeln!(md, "Not run: {}.\n", cell(why));
            return;
        }
        (None, None) => {
            let _ = writeln!(md, "Not run yet.\n");
            return;
        }
    };
    let _ = writeln!(
        md,
        "{}, {:.0} orders/s for {:.0} s on a fresh instance each run, alternated: without \
         authentication, with `--auth jwt` (HS256; every order bears a customer token, the set-up \
         and queries an operator's), with, without.\n",
        a.backend.title(),
        a.rate,
        r.settings.step_duration_s
    );
    for (title, steps) in [
        ("Without authentication", &a.without),
        ("With JWT", &a.with_jwt),
    ] {
        let _ = writeln!(md, "{title}:\n");
        steps_table(md, steps, false);
        let _ = writeln!(md);
    }
    match a.p99_ms() {
        Some((without, with)) => {
            let _ = writeln!(
                md,
                "**Acceptance p99: {} ms with JWT, {} ms without (means of the runs).**\n",
                ms(with),
                ms(without)
            );
        }
        None => {
            let _ = writeln!(md, "**Not every run reported.**\n");
        }
    }
}

fn kib(v: Option<u64>) -> String {
    v.map_or("—".to_string(), |k| {
        format!("{:.1} MiB", k as f64 / 1024.0)
    })
}

/// The whole of BENCHMARKS.md.
pub fn markdown(r: &SuiteResults) -> String {
    let mut md = String::new();
    let s = &r.settings;
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `scripts/bench` (`order-saga-bench --suite`): do not edit by hand, rerun it. \
         The raw numbers are in `{}`.\n",
        suite::json_path(Path::new("BENCHMARKS.md")).display()
    );
    let _ = writeln!(
        md,
        "Date: {} — the suite took {:.1} min{}{}.\n",
        r.generated_at.format("%Y-%m-%d %H:%M UTC"),
        r.elapsed_s / 60.0,
        if s.quick {
            " (--quick: shortened runs, rougher figures)"
        } else {
            ""
        },
        if r.finished {
            ""
        } else {
            " — **still running or interrupted: partial results**"
        }
    );

    let m = &r.machine;
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| CPUs (nproc) | {} |", m.cpus);
    let _ = writeln!(md, "| CPU model | {} |", cell(&m.cpu_model));
    let _ = writeln!(md, "| memory | {} |", m.memory);
    let _ = writeln!(md, "| kernel | {} |", cell(&m.kernel));
    let _ = writeln!(md, "| PostgreSQL | {} |", cell(&m.postgres));
    let _ = writeln!(md, "| rustc | {} |", cell(&m.rustc));
    let _ = writeln!(md, "| broker | {} |", cell(&m.broker));
    let _ = writeln!(
        md,
        "\nThe load generator, the service, PostgreSQL and the broker share these cores.\n"
    );

    let _ = writeln!(md, "## Command\n");
    if let Some(invoked) = &r.invoked_as {
        let _ = writeln!(md, "```sh\n{invoked}\n```\n\nwhich ran\n");
    }
    let _ = writeln!(md, "```sh\n{}\n```\n", r.command);

    let _ = writeln!(md, "## Method\n");
    let _ = writeln!(
        md,
        "- Every run starts the service afresh (`order-saga serve`, a child process of the suite, \
         `RUST_LOG=warn`) on a fresh store: a new temporary directory (embedded), a new database \
         (PostgreSQL, dropped afterwards), plus a new topic prefix (Kafka). With Kafka the service \
         gets `--kafka-partitions 1` (the test broker answers one request at a time per \
         connection: with 6 partitions on each of the 7 topics a produce round cost ~100 ms at \
         200 orders/s), `--kafka-consumer-config fetch.wait.max.ms=10` (the test broker holds \
         every fetch for the whole wait, data or not; the default 500 ms wait added ~250 ms to \
         every hop) and `--kafka-producer-config linger.ms=10` (the test broker lists every \
         batch stored in a partition on each fetch that finds data, so its CPU grows with the \
         batches: with the service's 1 ms linger it took ~75 % of a core 20 s into a run at \
         200 orders/s); the broker ceiling uses the same settings. Before it is measured, each instance \
         gets 20 warm-up orders (sent in one second, their sagas waited for), so start-up \
         transients — connection pools, Kafka consumer groups joining — stay out of the figures; \
         on PostgreSQL a `CHECKPOINT` then writes out what earlier runs left dirty. Each backend's \
         2-instance search runs right after its 1-instance one.\n\
         - PostgreSQL is reached with the suite's `--admin-url` (its database name replaced), by the \
         ceilings and the service alike; `scripts/bench` passes `sslmode=disable`: TLS on loopback \
         protects nothing and cost ~7 % of PostgreSQL's CPU.\n\
         - Load is open-loop (`order-saga-bench`): orders are sent on schedule whatever the latency, \
         acceptance latency counted from each order's scheduled instant. A thread of the \
         generator's own keeps the schedule (a tokio timer ticks in whole milliseconds and had sent \
         orders 1.3–1.7 ms late at p50); how late each order still left — the send lag, part of \
         its acceptance latency — is in BENCHMARKS.json. Orders have 1–{} items \
         over {} products with ample stock. Saga latency is OrderCreated → PAYMENT_WAIT or \
         ORDER_CANCELLED from the read model's recorded-at times; sagas/s is finished sagas ÷ \
         (first scheduled send → last saga end).\n\
         - Ramp: {:.0}, {:.0}, {:.0} … orders/s, {:.0} s each, then up to {:.0} s for the sagas to \
         finish; a step is **saturated** when achieved < {:.0} % of offered, saga p99 > {:.0} ms, or \
         any order is unfinished or failed. The ramp stops at the first saturated step.\n\
         - Maximum sustainable rate: {} bisection steps between the highest ramp rate that kept up \
         and the lowest that did not, {:.0} s each with {:.0} s to finish, same criterion (no \
         growing backlog: nothing unfinished after the short settle). When none of them keeps up, \
         the highest ramp rate that kept up runs again as long, and counts if it keeps up; if it \
         does not, it becomes the upper bound and the search goes on between the ramp rate below \
         it and it.\n\
         - Transactions per order: the run database's `xact_commit` (pg_stat_database) after the \
         service stopped minus before the load, ÷ orders accepted; it includes the service's polling \
         and idle transactions.",
        s.max_items,
        s.products,
        s.start_rate,
        s.start_rate * 2.0,
        s.start_rate * 4.0,
        s.step_duration_s,
        s.ramp_settle_s,
        KEEP_UP * 100.0,
        SAGA_P99_LIMIT_MS,
        s.bisect_steps,
        s.sustain_duration_s,
        s.sustain_settle_s,
    );
    let _ = writeln!(md);

    let c = &r.ceilings;
    let _ = writeln!(md, "## Ceilings\n");
    if let Some(why) = &r.ceilings_skipped {
        let _ = writeln!(md, "Not run: {why}.\n");
    } else {
        let _ = writeln!(md, "| ceiling | measured | how |\n|---|---:|---|");
        let _ = writeln!(
            md,
            "| PostgreSQL commits, 1 connection | {} | single-row autocommit INSERT through sqlx, {:.0} s, fresh database |",
            rate_cell(c.commit_1.as_ref(), "commits"),
            s.ceiling_duration_s
        );
        let _ = writeln!(
            md,
            "| PostgreSQL commits, 8 connections | {} | the same, 8 concurrent connections |",
            rate_cell(c.commit_8.as_ref(), "commits")
        );
        let _ = writeln!(
            md,
            "| plain postgres-es append | {} | a one-event-per-command counter aggregate through cqrs-es + PostgresEventRepository on postgres-es's own schema (snapshots every {SNAPSHOT_EVERY} events), {APPEND_WRITERS} writers on distinct aggregates, pool of {APPEND_POOL_SIZE} |",
            rate_cell(c.plain_append.as_ref(), "appends")
        );
        let _ = writeln!(
            md,
            "| our append (`Store::execute`) | {} | the same aggregate and writers through our store on our migrated schema (event id, recorded-at, transaction id, global position), our sequencer numbering the log every 100 ms meanwhile; each command on the aggregate as our cache remembers it, so without a load |",
            rate_cell(c.our_append.as_ref(), "appends")
        );
        let _ = writeln!(
            md,
            "| our ÷ plain append | {} | |",
            c.append_ratio()
                .map_or("—".to_string(), |v| format!("{v:.2}"))
        );
        match &c.broker {
            Some(b) => {
                let _ = writeln!(
                    md,
                    "| broker produce → consume | {} | {} received of {} messages of {} bytes, random keys, a fresh {}-partition topic, one consumer; first send → last receipt; producer and consumer as the service's in the suite |",
                    rate_cell(Some(&b.rate), "messages"),
                    b.received,
                    b.messages,
                    b.message_bytes,
                    b.partitions
                );
            }
            None => {
                let _ = writeln!(
                    md,
                    "| broker produce → consume | not run (no --kafka-brokers) | |"
                );
            }
        }
        match r.tx_per_order() {
            Some((tx, rate)) => {
                let _ = writeln!(
                    md,
                    "| PostgreSQL transactions per order | {tx:.1} | from the PostgreSQL ramp step at {rate:.0}/s (includes polling and idle transactions) |"
                );
            }
            None => {
                let _ = writeln!(md, "| PostgreSQL transactions per order | not measured | |");
            }
        }
        let _ = writeln!(md);
    }

    let _ = writeln!(md, "## Ramp and maximum sustainable rate\n");
    if r.backends.is_empty() {
        let _ = writeln!(md, "Not run yet.\n");
    }
    for b in &r.backends {
        backend_section(&mut md, b);
    }
    let _ = writeln!(md, "Maximum sustainable rate per backend:\n");
    let _ = writeln!(md, "| backend | orders/s | how |\n|---|---:|---|");
    for b in &r.backends {
        let _ = writeln!(
            md,
            "| {}{} | {} | {} |",
            b.backend.name(),
            match b.instances {
                1 => String::new(),
                n => format!(", {n} instances"),
            },
            b.max_sustainable
                .map_or("—".to_string(), |v| format!("{v:.0}")),
            b.skipped
                .as_ref()
                .map_or(b.max_sustainable_how.clone(), |w| format!(
                    "not run: {}",
                    cell(w)
                ))
        );
    }
    let _ = writeln!(md);

    failover_section(&mut md, r);
    auth_section(&mut md, r);

    let _ = writeln!(md, "## One hot product\n");
    let _ = writeln!(
        md,
        "Every order is one item of the same product (stock never runs out), {:.0} orders/s for {:.0} s, fresh instance.\n",
        s.hot_rate, s.step_duration_s
    );
    if r.hot.is_empty() {
        let _ = writeln!(md, "Not run.\n");
    }
    for h in &r.hot {
        let _ = writeln!(md, "{}:\n", h.backend.title());
        steps_table(&mut md, std::slice::from_ref(&h.step), false);
        let _ = writeln!(md);
    }

    let _ = writeln!(md, "## Long run\n");
    match (&r.long_run, &r.long_run_skipped) {
        (Some(l), _) => {
            let _ = writeln!(
                md,
                "One embedded instance, {} products: a throughput probe ({:.0} orders/s offered — 1.5 × the \
                 embedded maximum sustainable rate — for {:.0} s; the rate is finished sagas ÷ first send → \
                 last saga end), then {:.0} s at {:.0} orders/s sampling the service's resident memory \
                 (VmRSS) at {:.0} s and {:.0} s, then orders up to the total, then the same probe again.\n",
                l.products, l.probe_rate, l.probe_s, l.soak_s, l.soak_rate, l.rss_early_at_s, l.rss_late_at_s
            );
            let probe = |p: &Option<BenchReport>| {
                p.as_ref().map_or("—".to_string(), |p| {
                    format!(
                        "{} sagas/s (saga p99 {} ms, {} unfinished)",
                        per_s(p.saga_rate),
                        ms(p.saga.p99_ms),
                        p.unfinished
                    )
                })
            };
            let _ = writeln!(md, "| figure | measured |\n|---|---|");
            let _ = writeln!(md, "| rate at the start | {} |", probe(&l.start_probe));
            if let Some(soak) = &l.soak {
                let _ = writeln!(
                    md,
                    "| soak at {:.0}/s | {} accepted, acceptance p99 {} ms, saga p99 {} ms, {} unfinished, {} failed |",
                    l.soak_rate,
                    soak.accepted,
                    ms(soak.acceptance.p99_ms),
                    ms(soak.saga.p99_ms),
                    soak.unfinished,
                    soak.failed
                );
            }
            let _ = writeln!(
                md,
                "| RSS at {:.0} s | {} |",
                l.rss_early_at_s,
                kib(l.rss_early_kib)
            );
            let _ = writeln!(
                md,
                "| RSS at {:.0} s | {} |",
                l.rss_late_at_s,
                kib(l.rss_late_kib)
            );
            let _ = writeln!(
                md,
                "| RSS ratio | {} |",
                l.rss_ratio().map_or("—".to_string(), |v| format!("{v:.2}"))
            );
            if let Some(feed) = &l.feed {
                let _ = writeln!(
                    md,
                    "| more orders at {:.0}/s | {} accepted |",
                    feed.offered_rate, feed.accepted
                );
            }
            let _ = writeln!(
                md,
                "| orders before the second probe | {} |",
                l.orders_before_end_probe
            );
            let _ = writeln!(md, "| rate after them | {} |", probe(&l.end_probe));
            let _ = writeln!(
                md,
                "| rate after ÷ rate at start | {} |",
                l.rate_ratio()
                    .map_or("—".to_string(), |v| format!("{v:.2}"))
            );
            for e in &l.errors {
                let _ = writeln!(md, "| problem | {} |", cell(e));
            }
            let _ = writeln!(md);
        }
        (None, Some(why)) => {
            let _ = writeln!(md, "Not run: {why}.\n");
        }
        (None, None) => {
            let _ = writeln!(md, "Not run yet.\n");
        }
    }

    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(
        md,
        "| figure | target | measured | met? |\n|---|---|---|---|"
    );
    for t in &r.targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {met} |",
            cell(&t.figure),
            cell(&t.target),
            cell(&t.measured)
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{targets, AuthCost, BackendResult, Failover, Kill, Machine, Settings};
    use crate::Percentiles;

    fn report(rate: f64, saga_p99_ms: f64) -> BenchReport {
        let p = |ms: f64| Percentiles {
            count: 10,
            p50_ms: ms / 2.0,
            p90_ms: ms,
            p99_ms: ms,
            p999_ms: ms,
            max_ms: ms,
        };
        BenchReport {
            offered_rate: rate,
            achieved_rate: rate,
            window_s: 1.0,
            saga_rate: rate,
            sent: 10,
            accepted: 10,
            failed: 0,
            acceptance: p(2.0),
            send_lag: p(0.1),
            saga: p(saga_p99_ms),
            payment_wait: 10,
            cancelled: 0,
            unfinished: 0,
        }
    }

    fn step(rate: f64, saga_p99_ms: f64) -> Step {
        let kept_up = saga_p99_ms <= SAGA_P99_LIMIT_MS;
        Step {
            rate,
            duration_s: 1.0,
            settle_s: 1.0,
            report: Some(report(rate, saga_p99_ms)),
            error: None,
            note: None,
            tx_per_order: Some(20.0),
            saturated_by: if kept_up {
                vec![]
            } else {
                vec!["saga p99 > 1 s".into()]
            },
        }
    }

    fn results() -> SuiteResults {
        let backend = |backend: Backend, ramp: Vec<Step>, max: f64| BackendResult {
            backend,
            title: backend.title().into(),
            instances: 1,
            skipped: None,
            ramp,
            bisect: vec![],
            max_sustainable: Some(max),
            max_sustainable_how: "test".into(),
        };
        SuiteResults {
            generated_at: chrono::Utc::now(),
            finished: true,
            elapsed_s: 60.0,
            machine: Machine {
                cpus: 2,
                memory: "1 GiB".into(),
                cpu_model: "cpu".into(),
                kernel: "k".into(),
                postgres: "pg".into(),
                rustc: "rustc".into(),
                broker: "tansu".into(),
            },
            command: "order-saga-bench --suite".into(),
            invoked_as: Some("scripts/bench".into()),
            settings: Settings {
                quick: true,
                step_duration_s: 5.0,
                ramp_settle_s: 30.0,
                start_rate: 100.0,
                max_rate: 12800.0,
                sustain_duration_s: 10.0,
                sustain_settle_s: 10.0,
                bisect_steps: 3,
                hot_rate: 200.0,
                ceiling_duration_s: 5.0,
                broker_messages: 10,
                products: 20,
                max_items: 3,
                long_duration_s: None,
                long_orders: None,
                long_probe_s: None,
            },
            ceilings: Default::default(),
            ceilings_skipped: None,
            backends: vec![
                backend(
                    Backend::Embedded,
                    vec![step(100.0, 10.0), step(200.0, 40.0), step(400.0, 2000.0)],
                    300.0,
                ),
                backend(Backend::Postgres, vec![step(100.0, 10.0)], 400.0),
                BackendResult {
                    instances: 2,
                    title: "PostgreSQL (in-process bus), 2 instances".into(),
                    ..backend(Backend::Postgres, vec![step(100.0, 10.0)], 380.0)
                },
                backend(Backend::PostgresKafka, vec![step(100.0, 5000.0)], 50.0),
            ],
            failover: vec![Failover {
                backend: Backend::Postgres,
                kills: [400.0, 900.0, 500.0]
                    .into_iter()
                    .map(|ms| Kill {
                        roles: vec!["relay".into()],
                        taken_over_ms: Some(ms),
                        load: Some(report(50.0, 40.0)),
                    })
                    .collect(),
                load_rate: 50.0,
                load_s: 4.0,
                errors: vec![],
            }],
            instances_skipped: None,
            auth: Some(AuthCost {
                backend: Backend::Postgres,
                rate: 200.0,
                without: vec![step(200.0, 10.0), step(200.0, 10.0)],
                with_jwt: vec![step(200.0, 10.0), step(200.0, 10.0)],
            }),
            auth_skipped: None,
            hot: vec![],
            long_run: None,
            long_run_skipped: Some("--skip-long".into()),
            targets: vec![],
        }
    }

    #[test]
    fn targets_follow_the_measured_numbers() {
        let r = results();
        let targets = targets(&r);
        let find = |figure: &str| {
            targets
                .iter()
                .find(|t| t.figure == figure)
                .unwrap_or_else(|| panic!("{figure} missing"))
        };
        let embedded = find("saga p99 at 200/s, embedded (in-process)");
        assert_eq!(
            (embedded.met, embedded.measured.as_str()),
            (Some(true), "40.0 ms")
        );
        let kafka = find("saga p99 at 200/s, PostgreSQL + Kafka");
        assert_eq!(kafka.met, Some(false), "saturated below 200/s misses it");
        assert_eq!(find("saga p99 at 200/s, PostgreSQL").met, None);
        assert_eq!(find("max sustainable rate, embedded").met, Some(false));
        let two = find("max sustainable rate, 2 instances ÷ one, PostgreSQL");
        assert_eq!(
            (two.met, two.measured.as_str()),
            (Some(true), "0.95 (380/s ÷ 400/s)"),
            "the 2-instance run is not taken for the single-instance one"
        );
        let kafka_two = find("max sustainable rate, 2 instances ÷ one, PostgreSQL + Kafka");
        assert_eq!(kafka_two.met, None, "not measured");
        let failover = find("failover after SIGKILL, p50 / max over 5 kills, PostgreSQL");
        assert_eq!(
            (failover.met, failover.measured.as_str()),
            (Some(true), "500 / 900 ms, 0 sagas failed or unfinished")
        );
        let mut lost = r.clone();
        if let Some(load) = lost.failover[0].kills[0].load.as_mut() {
            load.unfinished = 1;
        }
        let targets = crate::results::targets(&lost);
        let failover = targets.iter().find(|t| {
            t.figure.starts_with("failover after SIGKILL") && t.figure.ends_with("PostgreSQL")
        });
        assert_eq!(
            failover.and_then(|t| t.met),
            Some(false),
            "a lost saga misses it"
        );
        let jwt = "acceptance p99 at 200/s, PostgreSQL: with JWT (HS256) ÷ without";
        let auth = find(jwt);
        assert_eq!(
            (auth.met, auth.measured.as_str()),
            (Some(true), "1.00 (2.00 ms ÷ 2.00 ms, means of 2 runs each)")
        );
        let mut slower = r.clone();
        if let Some(report) = slower
            .auth
            .as_mut()
            .and_then(|a| a.with_jwt[0].report.as_mut())
        {
            report.acceptance.p99_ms = 2.6;
        }
        let targets = crate::results::targets(&slower);
        let auth = targets.iter().find(|t| t.figure == jwt);
        assert_eq!(
            auth.map(|t| (t.met, t.measured.as_str())),
            Some((
                Some(false),
                "1.15 (2.30 ms ÷ 2.00 ms, means of 2 runs each)"
            )),
            "the mean of the JWT runs is 15 % slower"
        );
    }

    #[test]
    fn the_report_has_every_section() {
        let mut r = results();
        r.targets = targets(&r);
        let md = markdown(&r);
        for section in [
            "# Benchmarks",
            "## Machine",
            "## Command",
            "scripts/bench",
            "## Ceilings",
            "### Embedded (SQLite, in-process bus)",
            "### PostgreSQL (in-process bus), 2 instances",
            "| postgres, 2 instances | 380 |",
            "## Failover",
            "## Authentication cost",
            "**Takeover p50 500 ms, max 900 ms.**",
            "## One hot product",
            "## Long run",
            "## Targets",
            "| saga p99 at 200/s, embedded (in-process) | ≤ 50 ms | 40.0 ms | yes |",
        ] {
            assert!(md.contains(section), "{section} missing:\n{md}");
        }
    }
}
