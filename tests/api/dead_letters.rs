//! The dead-letter desk, through the real binary: a consumer that gives up
//! on its messages while a table is missing (PostgreSQL) leaves the saga stuck; once the
//! table is back, `order-saga dead-letters redrive --all` hands the
//! messages back and the saga goes on to PAYMENT_WAIT. A message that never
//! decoded fails its redrive by name, stays pending, and can be discarded.

use order_saga::saga::Side;
use order_saga::store::DeadLetterStatus;
use order_saga_domain::OrderStatus;
use serde_json::{json, Value};

use crate::binary::order_saga;
use crate::helpers::{
    create_order, order_body, raw_sql, spawn_app, spawn_service, Backend, TestApp, TestStore,
};
use crate::on_both_backends;
use crate::saga::{harness, store_a_garbled_order_event};

on_both_backends!(
    a_message_that_never_decoded_fails_its_redrive_by_name_and_is_discarded,
    operators_see_and_settle_dead_letters_and_stuck_sagas_through_graphql,
);

/// Runs `order-saga dead-letters …` on the test's store; its exit status,
/// the JSON lines it printed and its stderr.
async fn desk(t: &TestStore, args: &[&str]) -> (bool, Vec<Value>, String) {
    desk_of(t, &[&["dead-letters"], args].concat()).await
}

/// Runs `order-saga …` on the test's store, as [`desk`].
async fn desk_of(t: &TestStore, args: &[&str]) -> (bool, Vec<Value>, String) {
    let output = order_saga(t)
        .args(args)
        .output()
        .await
        .expect("run order-saga dead-letters");
    let lines = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect();
    (
        output.status.success(),
        lines,
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

/// PostgreSQL: the embedded store's single writer takes a statement that
/// fails for its schema as the store failing (waited out, not dead-lettered).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_given_up_on_while_a_table_was_missing_are_redriven_to_completion() {
    let h = harness(Backend::Postgres, vec![]).await;
    raw_sql(&h.t.store, "ALTER TABLE timers RENAME TO timers_moved").await;
    let order = h.order(&[("p-1", 1)]).await;
    // The consumers only: the timer loop has no table to read either.
    h.saga
        .run_until_idle_for(&Side::ALL, false)
        .await
        .expect("the consumers run");
    let dead = h.t.store.dead_letters().await.expect("dead letters");
    assert!(!dead.is_empty(), "nothing was dead-lettered");
    assert!(
        dead.iter().all(|d| d.consumer == "order-saga.order"
            && d.status == "PENDING"
            && d.error.contains("timers")),
        "{dead:#?}"
    );
    assert_eq!(
        h.state(&order).await.status,
        OrderStatus::OrderCreated,
        "the saga is stuck"
    );
    let (ok, listed, _) = desk(&h.t, &["list", "--format", "jsonl"]).await;
    assert!(ok);
    assert_eq!(listed.len(), dead.len(), "list shows the pending ones");

    // The fix, then the redrive; the saga goes on from there by itself.
    raw_sql(&h.t.store, "ALTER TABLE timers_moved RENAME TO timers").await;
    let (ok, outcomes, stderr) = desk(&h.t, &["redrive", "--all"]).await;
    assert!(ok, "redrive --all failed: {stderr}");
    assert_eq!(outcomes.len(), dead.len());
    assert!(
        outcomes.iter().all(|o| o["outcome"] == "HANDLED"),
        "{outcomes:?}"
    );
    h.run().await;
    assert_eq!(h.state(&order).await.status, OrderStatus::PaymentWait);
    assert_eq!(h.t.store.pending_dead_letters().await.expect("count"), 0);
    let redriven =
        h.t.store
            .dead_letters_in(Some(DeadLetterStatus::Redriven))
            .await
            .expect("redriven");
    assert_eq!(redriven.len(), dead.len(), "each is kept, REDRIVEN");
    assert!(redriven.iter().all(|d| d.settled_at_ms.is_some()));

    // Once is enough: a second redrive changes nothing.
    let id = dead[0].id.to_string();
    let (ok, again, _) = desk(&h.t, &["redrive", &id]).await;
    assert!(ok);
    assert_eq!(again[0]["outcome"], "NOT_PENDING");
    assert_eq!(again[0]["status"], "REDRIVEN");
    h.finish().await;
}

async fn a_message_that_never_decoded_fails_its_redrive_by_name_and_is_discarded(backend: Backend) {
    let h = harness(backend, vec![]).await;
    store_a_garbled_order_event(&h.t.store).await;
    h.run().await;
    let dead = h.t.store.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 3, "one per consumer group: {dead:#?}");
    let id = dead[0].id.to_string();

    let (ok, outcomes, stderr) = desk(&h.t, &["redrive", &id]).await;
    assert!(!ok, "a failed redrive fails the command");
    assert!(stderr.contains("failed again"), "{stderr}");
    assert_eq!(outcomes[0]["outcome"], "FAILED");
    let error = outcomes[0]["error"].as_str().expect("error");
    assert!(error.contains("never decoded"), "{error}");
    let shown = h.t.store.dead_letter(dead[0].id).await.expect("show");
    let shown = shown.expect("still there");
    assert_eq!(
        (shown.status.as_str(), shown.redrives),
        ("PENDING", 1),
        "it stays pending, its failed redrive counted"
    );

    let (ok, _, _) = desk(&h.t, &["discard", &id]).await;
    assert!(ok);
    let (ok, _, stderr) = desk(&h.t, &["discard", &id]).await;
    assert!(!ok && stderr.contains("DISCARDED, not PENDING"), "{stderr}");
    let (ok, _, stderr) = desk(&h.t, &["show", "999999"]).await;
    assert!(
        !ok && stderr.contains("id: no dead letter 999999"),
        "{stderr}"
    );
    assert_eq!(h.t.store.pending_dead_letters().await.expect("count"), 2);
    h.finish().await;
}

/// The operator's GraphQL: dead letters listed, redriven (through the
/// running saga), discarded; stuck sagas with their last step.
async fn operators_see_and_settle_dead_letters_and_stuck_sagas_through_graphql(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = spawn_service(t.store.clone()).await;
    for consumer in ["order-saga.order", "order-saga.stock"] {
        t.store
            .record_dead_letter(consumer, "order.created", None, "cannot", "not json", 1_000)
            .await
            .expect("record");
    }
    let listed = app
        .graphql("{ deadLetters { id consumer status error } }", json!({}))
        .await;
    let letters = listed["data"]["deadLetters"].as_array().expect("list");
    assert_eq!(letters.len(), 2, "{listed}");
    let id = letters[0]["id"].clone();

    let redrive = "mutation($id: ID!) { redriveDeadLetter(id: $id) { outcome error deadLetter { status redrives } } }";
    let redriven = app.graphql(redrive, json!({"id": id})).await;
    let done = &redriven["data"]["redriveDeadLetter"];
    assert_eq!(done["outcome"], "FAILED", "{redriven}");
    assert!(done["error"]
        .as_str()
        .is_some_and(|e| e.contains("never decoded")));
    assert_eq!(
        done["deadLetter"],
        json!({"status": "PENDING", "redrives": 1})
    );

    let discard = "mutation($id: ID!) { discardDeadLetter(id: $id) { status settledAt } }";
    let discarded = app.graphql(discard, json!({"id": id})).await;
    assert_eq!(
        discarded["data"]["discardDeadLetter"]["status"],
        "DISCARDED"
    );
    let again = app.graphql(discard, json!({"id": id})).await;
    assert_eq!(
        again["errors"][0]["extensions"]["code"], "CONFLICT",
        "{again}"
    );
    let unknown = app.graphql(redrive, json!({"id": "nope"})).await;
    assert_eq!(
        unknown["errors"][0]["extensions"]["field"], "id",
        "{unknown}"
    );
    let pending = app
        .graphql(
            "{ deadLetters { id } all: deadLetters(status: null) { id } }",
            json!({}),
        )
        .await;
    assert_eq!(
        pending["data"]["deadLetters"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(pending["data"]["all"].as_array().map(Vec::len), Some(2));

    // A saga that ended is not stuck, whatever the threshold.
    app.set_product("p-1", "10.00", 5).await;
    let ended = create_order(&app.client, &app.address, &order_body(&[("p-1", 1)])).await;
    crate::e2e::wait_until_all_end(&t.store, std::slice::from_ref(&ended)).await;
    let stuck = stuck_sagas(&app).await;
    assert!(
        stuck.iter().all(|s| s["orderId"] != ended.as_str()),
        "{stuck:?}"
    );

    t.cleanup().await;

    // With no saga running (a store no service runs on), an order stays
    // ORDER_CREATED.
    let t = TestStore::new(backend).await;
    let idle = spawn_app(t.store.clone()).await;
    idle.set_product("p-1", "10.00", 5).await;
    let waiting = create_order(&idle.client, &idle.address, &order_body(&[("p-1", 1)])).await;
    idle.projections.run_once().await.expect("project");
    let stuck = stuck_sagas(&idle).await;
    assert_eq!(
        stuck,
        vec![json!({"orderId": waiting, "status": "ORDER_CREATED", "lastStep": "OrderCreated"})]
    );
    let (ok, listed, stderr) = desk_of(&t, &["sagas", "stuck", "--older-than", "0s"]).await;
    assert!(ok, "{stderr}");
    let ids: Vec<&Value> = listed.iter().map(|s| &s["orderId"]).collect();
    assert_eq!(ids, vec![&json!(waiting)], "the CLI lists the same");
    t.cleanup().await;
}

async fn stuck_sagas(app: &TestApp) -> Vec<Value> {
    let query = "{ stuckSagas(olderThanSeconds: 0) { orderId status lastStep } }";
    let answer = app.graphql(query, json!({})).await;
    answer["data"]["stuckSagas"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .clone()
}
