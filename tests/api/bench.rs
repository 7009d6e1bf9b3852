//! The load generator works end to end (a functional test: it asserts what
//! was counted, never how fast anything was).

use std::time::Duration;

use order_saga_bench::{run, BenchConfig};

use order_saga::auth::{AuthArgs, Authenticator};

use crate::helpers::{spawn_service, spawn_service_with_auth, Backend, TestStore};
use crate::on_both_backends;

on_both_backends!(the_load_generator_counts_every_order_and_saga_it_caused);
on_both_backends!(the_load_generator_signs_its_requests_for_a_service_with_jwt);

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
        jwt_secret: None,
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

/// Against `--auth jwt` the generator's set-up, orders and queries all
/// bear tokens of the secret: every order is accepted as its customer's.
async fn the_load_generator_signs_its_requests_for_a_service_with_jwt(backend: Backend) {
    const SECRET: &str = "bench-test-secret";
    let t = TestStore::new(backend).await;
    let auth = Authenticator::hs256(SECRET, &AuthArgs::default());
    let app = spawn_service_with_auth(t.store.clone(), auth).await;
    let config = BenchConfig {
        url: app.address.clone(),
        order_urls: Vec::new(),
        rate: 20.0,
        duration: Duration::from_secs(1),
        products: 2,
        stock: 100,
        max_items: 2,
        hot: 0.0,
        settle: Duration::from_secs(60),
        setup: true,
        jwt_secret: Some(SECRET.to_string()),
    };
    let report = run(&config).await.expect("bench runs with tokens");
    assert_eq!((report.accepted, report.failed), (20, 0), "{report:?}");
    assert_eq!(report.payment_wait + report.cancelled, 20, "{report:?}");
    let unsigned = BenchConfig {
        jwt_secret: None,
        ..config.clone()
    };
    assert!(
        run(&unsigned).await.is_err(),
        "without tokens the set-up is refused"
    );
    let wrong = BenchConfig {
        jwt_secret: Some("another-secret".to_string()),
        ..config
    };
    assert!(run(&wrong).await.is_err(), "a wrong secret is refused");
    drop(app);
    t.cleanup().await;
}
