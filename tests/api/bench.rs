//! The load generator works end to end (a functional test: it asserts what
//! was counted, never how fast anything was).

use std::time::Duration;

use order_saga_bench::{run, BenchConfig};

use crate::helpers::{spawn_service, Backend, TestStore};
use crate::on_both_backends;

on_both_backends!(the_load_generator_counts_every_order_and_saga_it_caused);

async fn the_load_generator_counts_every_order_and_saga_it_caused(backend: Backend) {
    let t = TestStore::new(backend).await;
    let app = spawn_service(t.store.clone()).await;
    let config = BenchConfig {
        url: app.address.clone(),
        order_urls: Vec::new(),
        rate: 40.0,
        duration: Duration::from_secs(1),
        products: 4,
        stock: 10,
        max_items: 2,
        hot: 0.5,
        settle: Duration::from_secs(60),
        setup: true,
    };
    let report = run(&config).await.expect("bench runs");
    assert_eq!(report.sent, 40);
    assert_eq!(report.accepted, 40);
    assert_eq!(report.failed, 0);
    assert_eq!(report.acceptance.count, 40);
    assert_eq!(report.payment_wait + report.cancelled, 40, "{report:?}");
    assert!(
        report.cancelled > 0,
        "10 units of the hot product cannot serve every order"
    );
    assert_eq!(report.saga.count, 40);
    assert_eq!(report.unfinished, 0);
    assert!(report.acceptance.p50_ms <= report.acceptance.max_ms);
    let bad = BenchConfig {
        rate: 0.0,
        ..config
    };
    assert!(run(&bad).await.is_err());
    drop(app);
    t.cleanup().await;
}
