//! Signed HTTPS webhooks, against a receiver whose certificate comes from a
//! private CA made here: with the CA file set, every notification arrives
//! with a signature the receiver verifies with the shared secret; without
//! it, the certificate is refused, each attempt is recorded as failed, and
//! the last one as abandoned. Bad settings are refused by name.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use hmac::Mac;
use order_saga::cli::NotifyArgs;
use order_saga::saga::notifier::Notifier;
use order_saga::saga::transport::LogTransport;
use order_saga::saga::SagaConfig;
use order_saga_domain::OrderStatus;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{crypto::ring, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::helpers::Backend;
use crate::on_both_backends;
use crate::saga::{harness, saga_with, MINUTE};

on_both_backends!(
    notifications_arrive_over_https_signed_with_the_shared_secret,
    a_webhook_whose_certificate_is_not_trusted_is_retried_then_abandoned,
);

const SECRET: &str = "whsec-test-3f1c";

/// A private CA's certificate (PEM), and a certificate for `localhost` it
/// signed, with its key.
fn private_ca() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "order-saga test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("server key");
    let server = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("server params")
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server certificate");
    (
        ca_cert.pem(),
        server.der().clone(),
        PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
}

/// TCP connections that completed a TLS handshake.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            // A client that refuses the certificate ends here.
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

type Received = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// An HTTPS receiver on a free port: its `https://localhost:…/hook` URL,
/// the CA file to trust it with, and what it received.
async fn https_receiver() -> (String, PathBuf, Received, tokio::task::JoinHandle<()>) {
    let (ca_pem, cert, key) = private_ca();
    let ca_file = std::env::temp_dir().join(format!("order-saga-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&ca_file, ca_pem).expect("write the CA file");
    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server TLS config");
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = tcp.local_addr().expect("address").port();
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(Arc::new(config)),
    };
    let received = Received::default();
    let router = Router::new()
        .route(
            "/hook",
            post(
                |State(received): State<Received>, headers: HeaderMap, body: Bytes| async move {
                    received.lock().expect("lock").push((headers, body));
                },
            ),
        )
        .with_state(received.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (
        format!("https://localhost:{port}/hook"),
        ca_file,
        received,
        server,
    )
}

fn webhook(url: &str, ca_file: Option<PathBuf>) -> Arc<dyn Notifier> {
    NotifyArgs {
        notify_webhook_url: Some(url.to_string()),
        notify_webhook_secret: Some(SECRET.to_string()),
        notify_webhook_ca_file: ca_file,
    }
    .notifier()
    .expect("webhook settings")
}

/// Verifies a request as a receiver does: the header's timestamp is recent
/// and its v1 is the HMAC-SHA256 of "<t>.<body>" with the shared secret.
fn verify(headers: &HeaderMap, body: &[u8]) {
    let header = headers
        .get("order-saga-signature")
        .and_then(|v| v.to_str().ok())
        .expect("a signature header");
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v1)| Some((t.strip_prefix("t=")?, v1.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("signature header: {header}"));
    let sent: i64 = t.parse().expect("timestamp");
    assert!(
        (chrono::Utc::now().timestamp() - sent).abs() < 300,
        "stale timestamp {sent}"
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, expected, "the signature verifies");
}

async fn notifications_arrive_over_https_signed_with_the_shared_secret(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let (url, ca_file, received, server) = https_receiver().await;
    let transport = LogTransport::new(h.t.store.clone());
    let saga = saga_with(
        &h.t.store,
        &transport,
        &h.clock,
        webhook(&url, Some(ca_file.clone())),
        None,
        SagaConfig::default(),
    )
    .await;
    let order = h.order(&[("p-1", 1)]).await;
    saga.run_until_idle().await.expect("saga");
    assert_eq!(h.state(&order).await.status, OrderStatus::PaymentWait);
    let requests = received.lock().expect("lock").clone();
    let kinds: Vec<String> = requests
        .iter()
        .map(|(headers, body)| {
            verify(headers, body);
            let body: Value = serde_json::from_slice(body).expect("JSON body");
            assert_eq!(body["orderId"], order.as_str());
            assert_eq!(
                headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
                body["eventId"].as_str()
            );
            body["kind"].as_str().expect("kind").to_string()
        })
        .collect();
    assert_eq!(kinds, ["ORDER_CONFIRMED", "PAYMENT_REQUESTED"]);
    // A forged body does not verify.
    let (headers, _) = &requests[0];
    let forged = std::panic::catch_unwind(|| verify(headers, b"{\"orderId\":\"other\"}"));
    assert!(forged.is_err(), "a changed body must not verify");
    server.abort();
    let _ = std::fs::remove_file(ca_file);
    h.finish().await;
}

async fn a_webhook_whose_certificate_is_not_trusted_is_retried_then_abandoned(backend: Backend) {
    let h = harness(backend, vec![]).await;
    let (url, ca_file, received, server) = https_receiver().await;
    let transport = LogTransport::new(h.t.store.clone());
    let config = SagaConfig {
        notify_retries: 1,
        ..SagaConfig::default()
    };
    // The public roots only: the private CA's certificate is refused.
    let saga = saga_with(
        &h.t.store,
        &transport,
        &h.clock,
        webhook(&url, None),
        None,
        config,
    )
    .await;
    let order = h.order(&[("p-1", 1)]).await;
    saga.run_until_idle().await.expect("saga");
    h.advance(MINUTE).await;
    saga.run_until_idle().await.expect("saga");
    assert_eq!(h.state(&order).await.status, OrderStatus::PaymentWait);
    assert!(received.lock().expect("lock").is_empty());
    let attempts =
        h.t.store
            .notification_attempts(&order)
            .await
            .expect("attempts");
    let confirmed: Vec<(i64, &str)> = attempts
        .iter()
        .filter(|a| a.kind == "ORDER_CONFIRMED")
        .map(|a| (a.attempt, a.outcome.as_str()))
        .collect();
    assert_eq!(confirmed, [(0, "failed"), (1, "abandoned")]);
    assert!(
        attempts.iter().all(|a| a
            .error
            .as_deref()
            .is_some_and(|e| e.contains("certificate"))),
        "{attempts:#?}"
    );
    server.abort();
    let _ = std::fs::remove_file(ca_file);
    h.finish().await;
}

#[test]
fn bad_webhook_settings_are_refused_by_name() {
    let refused = |url: Option<&str>, secret: Option<&str>, ca: Option<&str>| {
        NotifyArgs {
            notify_webhook_url: url.map(str::to_string),
            notify_webhook_secret: secret.map(str::to_string),
            notify_webhook_ca_file: ca.map(PathBuf::from),
        }
        .notifier()
        .err()
        .unwrap_or_default()
    };
    assert!(refused(Some("ftp://x"), None, None).starts_with("NOTIFY_WEBHOOK_URL"));
    assert!(refused(Some("https://x"), Some(""), None).starts_with("NOTIFY_WEBHOOK_SECRET"));
    assert!(refused(Some("https://x"), None, Some("/nonexistent.pem"))
        .starts_with("NOTIFY_WEBHOOK_CA_FILE"));
    assert!(refused(None, Some("s"), None).starts_with("NOTIFY_WEBHOOK_URL"));
    let not_pem = std::env::temp_dir().join(format!("order-saga-not-pem-{}", uuid::Uuid::new_v4()));
    std::fs::write(&not_pem, "hello").expect("write");
    let error = refused(Some("https://x"), None, not_pem.to_str());
    assert!(error.starts_with("NOTIFY_WEBHOOK_CA_FILE"), "{error}");
    let _ = std::fs::remove_file(not_pem);
}
