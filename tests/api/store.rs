//! The event store on both backends: append and load, the optimistic
//! concurrency conflict, and the global log under concurrent writers.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cqrs_es::{AggregateError, DomainEvent};
use order_saga::service::product_services;
use order_saga::store::{AttemptRow, Claim, LogEntry, Store, SNAPSHOT_EVERY};
use order_saga_domain::{Money, Product, ProductCommand, ProductEvent};

use crate::helpers::{Backend, TestStore};
use crate::on_both_backends;

on_both_backends!(
    appended_events_load_back_with_their_log_metadata,
    two_writers_on_one_aggregate_one_wins_the_other_conflicts,
    many_concurrent_appends_conflict_only_where_they_collide,
    bookkeeping_writes_beside_appends_are_stored_when_answered,
    scheduling_writes_made_together_each_drop_only_what_they_cancel,
    a_command_on_a_stale_remembered_state_sees_the_other_process_writes,
    the_global_log_is_read_exactly_once_under_concurrent_writers,
    a_busy_product_loads_from_its_snapshot_and_reads_its_holds_from_its_events,
    notification_records_made_together_are_each_counted,
    a_checkpoint_never_moves_backwards_unless_reset,
    a_notification_attempt_is_claimed_by_one_caller_and_a_lapsed_claim_taken_over,
    a_message_is_dead_lettered_once_per_group,
);

fn set_product(price_minor: i64, stock: u32) -> ProductCommand {
    ProductCommand::SetProduct {
        price: Some(Money::from_minor(price_minor).expect("price")),
        stock: Some(stock),
    }
}

async fn appended_events_load_back_with_their_log_metadata(backend: Backend) {
    let t = TestStore::new(backend).await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    let done = t
        .store
        .execute::<Product>(
            "p-1",
            set_product(1_290_000, 15),
            &product_services(&t.store, "p-1"),
            HashMap::new(),
        )
        .await
        .expect("execute");
    assert_eq!(done.events.len(), 2);

    let (product, sequence) = t
        .store
        .load::<Product>("p-1")
        .await
        .expect("load")
        .expect("product exists");
    assert_eq!(sequence, 2);
    assert_eq!(product.available, 15);
    assert_eq!(
        product.price.map(|p| p.to_string()).as_deref(),
        Some("12900.00")
    );
    assert!(t
        .store
        .load::<Product>("p-2")
        .await
        .expect("load")
        .is_none());

    let log = t.store.read_log(0, 100).await.expect("read log");
    assert_eq!(
        log.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(log[0].event_type, "PriceSet");
    assert_eq!(log[1].event_type, "StockLevelSet");
    assert_eq!((log[0].sequence, log[1].sequence), (1, 2));
    assert_ne!(log[0].event_id, log[1].event_id);
    // Time-ordered ids (UUID v7), in log order: indexes keyed by event id
    // grow at their end.
    assert!(log.iter().all(|e| e.event_id.get_version_num() == 7));
    assert!(log[0].event_id < log[1].event_id);
    assert!(log
        .iter()
        .all(|e| e.recorded_at > before && e.aggregate_id == "p-1"));
    let payload: ProductEvent = serde_json::from_value(log[1].payload.clone()).expect("payload");
    assert_eq!(
        payload,
        ProductEvent::StockLevelSet {
            available: 15,
            previous: 0
        }
    );

    // Reading again gives the same ids: an event id is stable.
    let again = t.store.read_log(1, 100).await.expect("read log");
    assert_eq!(again, log[1..].to_vec());
    t.cleanup().await;
}

async fn two_writers_on_one_aggregate_one_wins_the_other_conflicts(backend: Backend) {
    let t = TestStore::new(backend).await;
    t.store
        .execute::<Product>(
            "p-1",
            set_product(100, 5),
            &product_services(&t.store, "p-1"),
            HashMap::new(),
        )
        .await
        .expect("execute");
    let write = |available: u32| {
        let store = t.store.clone();
        async move {
            let event = ProductEvent::StockLevelSet {
                available,
                previous: 5,
            };
            store
                .append::<Product>("p-1", 2, vec![event], HashMap::new())
                .await
        }
    };
    let (a, b) = tokio::join!(write(7), write(9));
    let conflicts = [&a, &b]
        .iter()
        .filter(|r| matches!(r, Err(AggregateError::AggregateConflict)))
        .count();
    assert_eq!(conflicts, 1, "exactly one writer conflicts: {a:?} / {b:?}");
    let winner = if a.is_ok() { 7 } else { 9 };
    let (product, sequence) = t
        .store
        .load::<Product>("p-1")
        .await
        .expect("load")
        .expect("exists");
    assert_eq!((product.available, sequence), (winner, 3));
    t.cleanup().await;
}

/// Appends arriving together (they share one statement and commit): of the
/// ones that take the same sequence exactly one wins, and the others'
/// failures undo nothing of the rest.
async fn many_concurrent_appends_conflict_only_where_they_collide(backend: Backend) {
    let t = TestStore::new(backend).await;
    const EACH: u32 = 20;
    let append = |id: String, sequence: usize, available: u32| {
        let store = t.store.clone();
        tokio::spawn(async move {
            let event = ProductEvent::StockLevelSet {
                available,
                previous: 0,
            };
            store
                .append::<Product>(&id, sequence, vec![event], HashMap::new())
                .await
        })
    };
    let mut tasks = Vec::new();
    for i in 0..EACH {
        tasks.push((true, append("contended".into(), 0, i)));
        tasks.push((false, append(format!("own-{i}"), 0, i)));
    }
    let (mut won, mut conflicts) = (0, 0);
    for (contended, task) in tasks {
        match (contended, task.await.expect("task")) {
            (true, Ok(_)) => won += 1,
            (true, Err(AggregateError::AggregateConflict)) => conflicts += 1,
            (false, Ok(_)) => {}
            (c, other) => panic!("contended={c}: {other:?}"),
        }
    }
    assert_eq!((won, conflicts), (1, EACH - 1));
    let log = t.store.read_log(0, 1000).await.expect("log");
    let positions: Vec<i64> = log.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=i64::from(EACH) + 1).collect::<Vec<_>>());
    t.cleanup().await;
}

/// Appends, checkpoints and timer changes arriving together (on SQLite they
/// share commits): each is stored, and readable from every connection, once
/// it has answered.
async fn bookkeeping_writes_beside_appends_are_stored_when_answered(backend: Backend) {
    use order_saga::store::{Timer, TimerKind};
    let t = TestStore::new(backend).await;
    const EACH: i64 = 20;
    let timer_of = |i: i64| Timer {
        kind: TimerKind::SagaTimeout,
        subject: format!("o-{i}"),
        order_id: format!("o-{i}"),
        attempt: 0,
        due_at: chrono::Utc::now(),
        causation_id: format!("cause-{i}"),
        correlation_id: Some(format!("corr-{i}")),
        payload: serde_json::json!({ "i": i }),
    };
    let mut tasks = Vec::new();
    for i in 0..EACH {
        let store = t.store.clone();
        tasks.push(tokio::spawn(async move {
            let event = ProductEvent::StockLevelSet {
                available: 1,
                previous: 0,
            };
            let (product, reader, timer) = (format!("p-{i}"), format!("reader-{i}"), timer_of(i));
            let (appended, saved, scheduled) = tokio::join!(
                store.append::<Product>(&product, 0, vec![event], HashMap::new()),
                store.save_checkpoint(&reader, i + 1),
                store.schedule_timer(&timer),
            );
            appended.expect("append");
            saved.expect("checkpoint");
            scheduled.expect("timer");
            // Answered: stored and visible to the readers.
            assert_eq!(store.load_checkpoint(&reader).await.expect("load"), i + 1);
            // Half of the orders drop their timer again, beside the others'
            // writes; the other half replace it by a deadline.
            if i % 2 == 0 {
                store
                    .cancel_timers(TimerKind::SagaTimeout, &format!("o-{i}"))
                    .await
                    .expect("cancel");
            } else {
                let deadline = Timer {
                    kind: TimerKind::ConfirmationDeadline,
                    ..timer_of(i)
                };
                store
                    .cancel_and_schedule(TimerKind::SagaTimeout, &deadline)
                    .await
                    .expect("replace");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    assert_eq!(t.store.pending_timers().await.expect("timers"), EACH / 2);
    let due = pending_timers(&t.store).await;
    let mut expected: Vec<(String, TimerKind)> = (0..EACH)
        .filter(|i| i % 2 == 1)
        .map(|i| (format!("o-{i}"), TimerKind::ConfirmationDeadline))
        .collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(due, expected);
    let log = t.store.read_log(0, 1000).await.expect("log");
    assert_eq!(log.len(), EACH as usize);
    t.cleanup().await;
}

/// Every pending timer as (order, kind), by order then kind (claimed an
/// hour ahead, so all are due).
async fn pending_timers(store: &Store) -> Vec<(String, order_saga::store::TimerKind)> {
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut pending: Vec<_> = store
        .claim_due_timers(later, later, 1000)
        .await
        .expect("claim")
        .into_iter()
        .map(|timer| (timer.order_id, timer.kind))
        .collect();
    pending.sort_by_key(|(order, kind)| (order.clone(), kind.as_str()));
    pending
}

/// The saga's scheduling writes for many orders at once (on PostgreSQL
/// they share statements; on SQLite commits), two of them on the same
/// order at the same time: each drops only what it cancels, on its own
/// order, and stores its timer.
async fn scheduling_writes_made_together_each_drop_only_what_they_cancel(backend: Backend) {
    use order_saga::store::{Timer, TimerKind};
    let t = TestStore::new(backend).await;
    const ORDERS: usize = 40;
    let timer = |kind: TimerKind, i: usize| Timer {
        kind,
        subject: match kind {
            TimerKind::NotifyRetry => format!("event-{i}"),
            _ => format!("o-{i}"),
        },
        order_id: format!("o-{i}"),
        attempt: 0,
        due_at: chrono::Utc::now(),
        causation_id: format!("cause-{i}"),
        correlation_id: None,
        payload: serde_json::json!({}),
    };
    let each_order = |work: fn(Store, usize, Timer) -> tokio::task::JoinHandle<()>| {
        (0..ORDERS)
            .map(|i| work(t.store.clone(), i, timer(TimerKind::SagaTimeout, i)))
            .collect::<Vec<_>>()
    };
    // A saga's start: its deadlines and a notification retry.
    for task in each_order(|store, i, saga_timeout| {
        tokio::spawn(async move {
            let retry = Timer {
                kind: TimerKind::NotifyRetry,
                subject: format!("event-{i}"),
                ..saga_timeout.clone()
            };
            let reply = Timer {
                kind: TimerKind::StockReplyTimeout,
                ..saga_timeout.clone()
            };
            store
                .schedule_timers(&[saga_timeout, reply, retry])
                .await
                .expect("schedule");
        })
    }) {
        task.await.expect("task");
    }
    // Even orders get their stock reply (the reply's deadline goes, the
    // confirmation's comes) and, at the same moment, every fourth a retry;
    // odd orders end their saga (all but the payment wait's deadline and
    // the notification retry go).
    for task in each_order(|store, i, saga_timeout| {
        tokio::spawn(async move {
            let with = |kind| Timer {
                kind,
                ..saga_timeout.clone()
            };
            if i % 2 == 1 {
                store
                    .end_saga_and_schedule(&with(TimerKind::PaymentTimeout))
                    .await
                    .expect("end saga");
                return;
            }
            let deadline = with(TimerKind::ConfirmationDeadline);
            let retry = with(TimerKind::ConfirmRetry);
            let (replaced, retried) = tokio::join!(
                store.cancel_and_schedule(TimerKind::StockReplyTimeout, &deadline),
                async {
                    match i % 4 {
                        0 => store.schedule_timer(&retry).await,
                        _ => Ok(()),
                    }
                }
            );
            replaced.expect("replace");
            retried.expect("retry");
        })
    }) {
        task.await.expect("task");
    }
    let pending = pending_timers(&t.store).await;
    let mut expected = Vec::new();
    for i in 0..ORDERS {
        let kinds: &[TimerKind] = match i % 4 {
            0 => &[
                TimerKind::SagaTimeout,
                TimerKind::NotifyRetry,
                TimerKind::ConfirmationDeadline,
                TimerKind::ConfirmRetry,
            ],
            2 => &[
                TimerKind::SagaTimeout,
                TimerKind::NotifyRetry,
                TimerKind::ConfirmationDeadline,
            ],
            _ => &[TimerKind::NotifyRetry, TimerKind::PaymentTimeout],
        };
        expected.extend(kinds.iter().map(|&kind| (format!("o-{i}"), kind)));
    }
    expected.sort_by_key(|(order, kind)| (order.clone(), kind.as_str()));
    assert_eq!(pending, expected);
    t.cleanup().await;
}

/// Two processes on one store: each remembers the aggregates it commanded.
/// The other process's writes must count both for a command that appends
/// (its append conflicts and it retries on a fresh load) and for one that
/// refuses (a refusal on an outdated state is checked against newer events).
async fn a_command_on_a_stale_remembered_state_sees_the_other_process_writes(backend: Backend) {
    let t = TestStore::new(backend).await;
    let other = t.open().await;
    // Runs a command on p-1 through `store`; the product's available stock
    // after it.
    let run = |store: &Store, command: ProductCommand| {
        let store = store.clone();
        async move {
            store
                .execute_retrying::<Product>(
                    "p-1",
                    command,
                    &product_services(&store, "p-1"),
                    HashMap::new(),
                    3,
                )
                .await
                .map(|done| done.aggregate.available)
        }
    };
    let reserve = |order: &str, quantity: u32| ProductCommand::ReserveStock {
        order_id: order.into(),
        quantity,
    };
    run(&t.store, set_product(100, 5)).await.expect("set");
    // This process now remembers p-1 with 5 available; the other one adds
    // stock behind its back.
    let restocked = run(&other, set_product(100, 50)).await;
    assert_eq!(restocked.expect("restock elsewhere"), 50);
    // Would be refused on the remembered state (5 available).
    let held = run(&t.store, reserve("o-1", 20)).await;
    assert_eq!(held.expect("held against the newer stock"), 30);
    // The other process holds more; an append on this process's remembered
    // state (sequence 4) conflicts and is retried on a fresh load.
    let held = run(&other, reserve("o-2", 10)).await;
    assert_eq!(held.expect("held elsewhere"), 20);
    let held = run(&t.store, reserve("o-3", 5)).await;
    assert_eq!(held.expect("held after a retry"), 15);
    let (product, sequence) = t
        .store
        .load::<Product>("p-1")
        .await
        .expect("load")
        .expect("exists");
    assert_eq!((product.available, product.reserved, sequence), (15, 35, 6));
    other.close().await;
    t.cleanup().await;
}

const WRITERS: usize = 8;
const EVENTS_PER_WRITER: usize = 500;
/// Each command stores two events (a price and a stock level).
const COMMITS_PER_WRITER: usize = EVENTS_PER_WRITER / 2;
/// Every this many commits a writer holds its transaction open on purpose.
const SLOW_EVERY: usize = 25;

/// One writer: its own product, 250 commits of 2 events, some of them in a
/// transaction held open for a while after the insert.
async fn write_product_history(store: Store, writer: usize) {
    let id = format!("w-{writer}");
    for commit in 1..=COMMITS_PER_WRITER {
        let stock = commit as u32;
        if commit % SLOW_EVERY == 0 {
            let events = [
                ProductEvent::PriceSet {
                    price: Money::from_minor(commit as i64).expect("price"),
                },
                ProductEvent::StockLevelSet {
                    available: stock,
                    previous: stock - 1,
                },
            ];
            slow_commit(&store, &id, 2 * commit as i64 - 1, &events).await;
        } else {
            store
                .execute_retrying::<Product>(
                    &id,
                    set_product(commit as i64, stock),
                    &product_services(&store, &id),
                    HashMap::new(),
                    5,
                )
                .await
                .expect("execute");
        }
    }
}

/// Appends `events` from `first_sequence` in one transaction that stays
/// open for 30 ms after the inserts, as a slow writer's would.
async fn slow_commit(store: &Store, id: &str, first_sequence: i64, events: &[ProductEvent]) {
    let hold = Duration::from_millis(30);
    let rows: Vec<(i64, String, String)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let payload = serde_json::to_string(e).expect("payload");
            (first_sequence + i as i64, e.event_type(), payload)
        })
        .collect();
    match store {
        Store::Postgres(db) => {
            let mut tx = db.pool.begin().await.expect("begin");
            for (sequence, event_type, payload) in &rows {
                sqlx::query(
                    "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                     event_version, payload, metadata) VALUES ('Product', $1, $2, $3, '1.0', $4::json, '{}')",
                )
                .bind(id)
                .bind(sequence)
                .bind(event_type)
                .bind(payload)
                .execute(&mut *tx)
                .await
                .expect("insert");
            }
            sqlx::query("SELECT pg_sleep($1)")
                .bind(hold.as_secs_f64())
                .execute(&mut *tx)
                .await
                .expect("hold");
            tx.commit().await.expect("commit");
        }
        Store::Sqlite(db) => {
            let mut tx = db.write.begin().await.expect("begin");
            for (sequence, event_type, payload) in &rows {
                sqlx::query(
                    "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                     event_version, payload, metadata) VALUES ('Product', ?1, ?2, ?3, '1.0', ?4, '{}')",
                )
                .bind(id)
                .bind(sequence)
                .bind(event_type)
                .bind(payload)
                .execute(&mut *tx)
                .await
                .expect("insert");
            }
            tokio::time::sleep(hold).await;
            tx.commit().await.expect("commit");
        }
    }
}

/// Reads the log from the reader's checkpoint into `seen`, saving the
/// checkpoint after each batch, until `stop` says so.
async fn tail(store: &Store, seen: &mut Vec<LogEntry>, stop: impl Fn(&[LogEntry], bool) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut checkpoint = store
        .load_checkpoint("test-reader")
        .await
        .expect("checkpoint");
    loop {
        let batch = store.read_log(checkpoint, 97).await.expect("read log");
        let idle = batch.is_empty();
        for entry in batch {
            checkpoint = entry.position;
            seen.push(entry);
        }
        store
            .save_checkpoint("test-reader", checkpoint)
            .await
            .expect("save checkpoint");
        if stop(seen, idle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "log tail made no progress: {} events seen",
            seen.len()
        );
        if idle {
            // Poll interval of the tail, not a wait for a deadline.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn the_global_log_is_read_exactly_once_under_concurrent_writers(backend: Backend) {
    let t = TestStore::new(backend).await;
    let total = WRITERS * EVENTS_PER_WRITER;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(write_product_history(t.store.clone(), w)))
        .collect();

    // First reader: tails while the writers write, stops part-way.
    let first_reader = t.open().await;
    let mut seen = Vec::new();
    tail(&first_reader, &mut seen, |seen, _| seen.len() >= total / 3).await;
    let checkpoint = seen.last().map(|e| e.position).expect("read something");
    first_reader.close().await;
    assert!(
        seen.len() < total,
        "writers were still writing when the reader stopped"
    );

    // Restarted reader: a new pool, resuming from the saved checkpoint.
    let second_reader = t.open().await;
    assert_eq!(
        second_reader
            .load_checkpoint("test-reader")
            .await
            .expect("checkpoint"),
        checkpoint
    );
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        tokio::spawn(async move {
            for writer in writers {
                writer.await.expect("writer");
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    tail(&second_reader, &mut seen, |seen, idle| {
        idle && done.load(std::sync::atomic::Ordering::SeqCst) && seen.len() >= total
    })
    .await;
    watcher.await.expect("watcher");
    // One more read after everything committed finds nothing new.
    let last = seen.last().map(|e| e.position).expect("events");
    assert!(second_reader
        .read_log(last, 100)
        .await
        .expect("read")
        .is_empty());

    assert_eq!(seen.len(), total, "every event seen exactly once");
    let positions: Vec<i64> = seen.iter().map(|e| e.position).collect();
    assert_eq!(
        positions,
        (1..=total as i64).collect::<Vec<_>>(),
        "dense, in order"
    );
    let ids: HashSet<_> = seen.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), total, "event ids are unique");
    let mut sequences: HashMap<&str, Vec<i64>> = HashMap::new();
    for e in &seen {
        sequences
            .entry(e.aggregate_id.as_str())
            .or_default()
            .push(e.sequence);
    }
    assert_eq!(sequences.len(), WRITERS);
    for (id, seqs) in sequences {
        assert_eq!(
            seqs,
            (1..=EVENTS_PER_WRITER as i64).collect::<Vec<_>>(),
            "{id} in sequence order"
        );
    }
    // The aggregates the writers built are whole.
    let (product, _) = second_reader
        .load::<Product>("w-0")
        .await
        .expect("load")
        .expect("exists");
    assert_eq!(product.available, COMMITS_PER_WRITER as u32);
    second_reader.close().await;
    t.cleanup().await;
}

async fn a_busy_product_loads_from_its_snapshot_and_reads_its_holds_from_its_events(
    backend: Backend,
) {
    let t = TestStore::new(backend).await;
    let holds = SNAPSHOT_EVERY + 50;
    t.store
        .execute::<Product>(
            "p-hot",
            set_product(1_000, 10_000),
            &product_services(&t.store, "p-hot"),
            HashMap::new(),
        )
        .await
        .expect("stock");
    for i in 0..holds {
        let command = ProductCommand::ReserveStock {
            order_id: format!("o-{i}"),
            quantity: 1,
        };
        t.store
            .execute::<Product>(
                "p-hot",
                command,
                &product_services(&t.store, "p-hot"),
                HashMap::new(),
            )
            .await
            .expect("hold");
    }
    // A store that remembers nothing (as after a restart) loads it from the
    // snapshot and the events after it.
    let restarted = t.open().await;
    let (loaded, sequence) = restarted
        .load::<Product>("p-hot")
        .await
        .expect("load")
        .expect("exists");
    assert_eq!(sequence, holds + 2);
    assert_eq!(
        (loaded.available, loaded.reserved),
        (10_000 - holds as u32, holds as u64)
    );
    // The same state as folding every event from the start.
    let mut folded = Product::default();
    for envelope in t
        .store
        .load_events::<Product>("p-hot")
        .await
        .expect("events")
    {
        cqrs_es::Aggregate::apply(&mut folded, envelope.payload);
    }
    assert_eq!(loaded, folded);
    let snapshots: i64 = match &t.store {
        Store::Postgres(db) => {
            sqlx::query_scalar("SELECT COUNT(*) FROM snapshots WHERE aggregate_id = 'p-hot'")
                .fetch_one(&db.pool)
                .await
                .expect("count")
        }
        Store::Sqlite(db) => {
            sqlx::query_scalar("SELECT COUNT(*) FROM snapshots WHERE aggregate_id = 'p-hot'")
                .fetch_one(&db.read)
                .await
                .expect("count")
        }
    };
    assert_eq!(
        snapshots, 1,
        "a snapshot was taken at {SNAPSHOT_EVERY} events"
    );
    // What each order holds is read from the product's events: a repeated
    // hold stays a no-op and a release returns exactly what was held, once.
    let services = product_services(&restarted, "p-hot");
    let hold_again = ProductCommand::ReserveStock {
        order_id: "o-0".into(),
        quantity: 1,
    };
    let release = || ProductCommand::ReleaseStock {
        order_id: "o-1".into(),
    };
    let mut effects = Vec::new();
    for command in [hold_again, release(), release()] {
        let done = restarted
            .execute::<Product>("p-hot", command, &services, HashMap::new())
            .await
            .expect("command");
        effects.push(
            done.events
                .into_iter()
                .map(|e| e.payload)
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        effects,
        [
            vec![],
            vec![ProductEvent::StockReturned {
                order_id: "o-1".into(),
                quantity: 1,
                available_after: 10_000 - holds as u32 + 1,
            }],
            vec![],
        ]
    );
    restarted.close().await;
    t.cleanup().await;
}

/// Notification attempts recorded together, and progress asked together
/// (on PostgreSQL each burst shares statements): every caller gets its own
/// event's answer, an event asked twice in one burst included.
async fn notification_records_made_together_are_each_counted(backend: Backend) {
    use order_saga::saga::notifier::{Notification, NotificationKind};
    let t = TestStore::new(backend).await;
    let notification = |n: usize| Notification {
        event_id: format!("event-{n}"),
        order_id: format!("order-{n}"),
        user_id: "user-1".to_string(),
        kind: NotificationKind::OrderConfirmed,
        message: "Your order is confirmed.".to_string(),
        reason: None,
        total_amount: None,
    };
    // Event n gets n % 3 attempts: none; one failed; one failed, then one
    // delivered.
    let mut records = Vec::new();
    for n in 0..30 {
        for attempt in 0..(n % 3) {
            let store = t.store.clone();
            let result = if attempt == 1 {
                Ok(())
            } else {
                Err("webhook answered 503".to_string())
            };
            let notification = notification(n);
            records.push(tokio::spawn(async move {
                store
                    .record_notification_attempt(notification.attempt(
                        attempt as u32,
                        &result,
                        1_000,
                    ))
                    .await
            }));
        }
    }
    for record in records {
        record.await.expect("task").expect("recorded");
    }
    let asks: Vec<_> = (0..30)
        .chain([4, 5])
        .map(|n| {
            let store = t.store.clone();
            tokio::spawn(
                async move { (n, store.notification_progress(&format!("event-{n}")).await) },
            )
        })
        .collect();
    for ask in asks {
        let (n, progress) = ask.await.expect("task");
        let expected = ((n % 3) as u32, n % 3 == 2);
        assert_eq!(progress.expect("progress"), expected, "event-{n}");
    }
    t.cleanup().await;
}

async fn a_checkpoint_never_moves_backwards_unless_reset(backend: Backend) {
    let t = TestStore::new(backend).await;
    t.store.save_checkpoint("c", 10).await.expect("save");
    // A late write of an instance that lost its role, say.
    t.store.save_checkpoint("c", 4).await.expect("save");
    assert_eq!(t.store.load_checkpoint("c").await.expect("load"), 10);
    t.store.save_checkpoint("c", 12).await.expect("save");
    assert_eq!(t.store.load_checkpoint("c").await.expect("load"), 12);
    // An operator's replay.
    t.store.reset_checkpoint("c", 0).await.expect("reset");
    assert_eq!(t.store.load_checkpoint("c").await.expect("load"), 0);
    t.cleanup().await;
}

fn claim(event: &str, attempt: i64, at_ms: i64) -> AttemptRow {
    AttemptRow {
        event_id: event.to_string(),
        attempt,
        order_id: "order-1".to_string(),
        kind: "ORDER_CONFIRMED",
        outcome: "delivered",
        error: None,
        attempted_at_ms: at_ms,
    }
}

async fn a_notification_attempt_is_claimed_by_one_caller_and_a_lapsed_claim_taken_over(
    backend: Backend,
) {
    let t = TestStore::new(backend).await;
    // Eight callers (instances, redeliveries) at once: one sends.
    let claims: Vec<_> = (0..8)
        .map(|_| {
            let store = t.store.clone();
            tokio::spawn(async move { store.claim_notification(claim("e-1", 0, 1_000)).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for c in claims {
        outcomes.push(c.await.expect("task").expect("claim"));
    }
    assert_eq!(
        outcomes.iter().filter(|c| **c == Claim::Taken).count(),
        1,
        "{outcomes:?}"
    );
    let lapses = 1_000 + order_saga::store::CLAIM_LEASE_MS;
    assert!(
        outcomes
            .iter()
            .all(|c| matches!(c, Claim::Taken) || *c == Claim::HeldUntil(lapses)),
        "{outcomes:?}"
    );
    // Its claimer died while sending: after the lease another takes it over.
    assert_eq!(
        t.store
            .claim_notification(claim("e-1", 0, lapses - 1))
            .await
            .expect("claim"),
        Claim::HeldUntil(lapses)
    );
    assert_eq!(
        t.store
            .claim_notification(claim("e-1", 0, lapses))
            .await
            .expect("claim"),
        Claim::Taken
    );
    // Once its outcome is recorded, nobody sends that attempt again.
    t.store
        .record_notification_attempt(claim("e-1", 0, lapses + 5))
        .await
        .expect("record");
    assert_eq!(
        t.store
            .claim_notification(claim("e-1", 0, lapses * 10))
            .await
            .expect("claim"),
        Claim::Done
    );
    // Nor a later attempt of a delivered notification.
    assert_eq!(
        t.store
            .claim_notification(claim("e-1", 1, lapses * 10))
            .await
            .expect("claim"),
        Claim::Done
    );
    let attempts = t
        .store
        .notification_attempts("order-1")
        .await
        .expect("attempts");
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, "delivered");
    t.cleanup().await;
}

async fn a_message_is_dead_lettered_once_per_group(backend: Backend) {
    let t = TestStore::new(backend).await;
    let record = |consumer: &'static str, event: Option<&'static str>| {
        let store = t.store.clone();
        async move {
            store
                .record_dead_letter(consumer, "order.created", event, "cannot", "{}", 1_000)
                .await
                .expect("record")
        }
    };
    assert!(record("g-1", Some("e-1")).await);
    assert!(!record("g-1", Some("e-1")).await, "the same group again");
    assert!(record("g-2", Some("e-1")).await, "another group");
    // Without an event id (undecodable), every message is its own.
    assert!(record("g-1", None).await);
    assert!(record("g-1", None).await);
    assert_eq!(t.store.dead_letters().await.expect("list").len(), 4);
    t.cleanup().await;
}
