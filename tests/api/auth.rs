//! Identity and access over every path (REST, GraphQL, WebSocket): a
//! matrix of callers — none, malformed, expired, badly signed, `alg: none`,
//! wrong issuer or audience, no `sub`, customers A and B, an operator —
//! against each operation, with the log unchanged after every refusal.

use futures_util::StreamExt;
use jsonwebtoken::{EncodingKey, Header};
use order_saga::auth::{AuthArgs, Authenticator, ClaimArgs};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{
    follow_order_at, order_body, spawn_service_with_auth, Backend, TestApp, TestStore,
};
use crate::on_both_backends;

const SECRET: &str = "integration-test-secret";
const ISSUER: &str = "https://id.example.test";
const AUDIENCE: &str = "order-saga";

fn claims(sub: &str, roles: &[&str]) -> Value {
    let now = jsonwebtoken::get_current_timestamp();
    json!({"sub": sub, "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE, "roles": roles})
}

fn sign(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

fn bearer(claims: &Value) -> Option<String> {
    Some(format!("Bearer {}", sign(claims, SECRET)))
}

/// Every way to be refused with 401, as `Authorization` headers.
fn refused_callers() -> Vec<(&'static str, Option<String>)> {
    let now = jsonwebtoken::get_current_timestamp();
    let with = |key: &str, value: Value| {
        let mut c = claims("u-a", &[]);
        c[key] = value;
        bearer(&c)
    };
    let mut no_sub = claims("u-a", &["operator"]);
    no_sub.as_object_mut().expect("object").remove("sub");
    vec![
        ("none", None),
        ("malformed", Some("Bearer not.a.jwt".into())),
        ("not bearer", Some("Basic dTpw".into())),
        ("expired", with("exp", (now - 120).into())),
        (
            "bad signature",
            Some(format!("Bearer {}", sign(&claims("u-a", &["operator"]), "wrong"))),
        ),
        (
            "alg none",
            // {"alg":"none","typ":"JWT"}.{"sub":"u-a","exp":9999999999,"roles":["operator"]}.
            Some("Bearer eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1LWEiLCJleHAiOjk5OTk5OTk5OTksInJvbGVzIjpbIm9wZXJhdG9yIl19.".into()),
        ),
        ("wrong issuer", with("iss", "https://evil.test".into())),
        ("wrong audience", with("aud", "another-service".into())),
        ("missing sub", bearer(&no_sub)),
    ]
}

struct Fixture {
    t: TestStore,
    app: TestApp,
    a: Option<String>,
    b: Option<String>,
    operator: Option<String>,
    /// A's order, and B's.
    order_a: String,
    order_b: String,
}

async fn fixture(backend: Backend) -> Fixture {
    let t = TestStore::new(backend).await;
    let args = AuthArgs {
        claims: ClaimArgs {
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            ..ClaimArgs::default()
        },
        ..AuthArgs::default()
    };
    let app = spawn_service_with_auth(t.store.clone(), Authenticator::hs256(SECRET, &args)).await;
    app.set_product("p-1", "10.00", 1_000).await;
    let a = bearer(&claims("u-a", &[]));
    let b = bearer(&claims("u-b", &["reader"]));
    let operator = bearer(&claims("ops-1", &["operator"]));
    let mut ids = Vec::new();
    for caller in [&a, &b] {
        let created = create_order(&app, caller, None).await;
        ids.push(
            created["data"]["createOrder"]["orderId"]
                .as_str()
                .unwrap_or_else(|| panic!("created: {created}"))
                .to_string(),
        );
    }
    // Let both sagas end, so the log changes only by what a test does.
    for id in &ids {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let status = graphql(
                &app,
                &operator,
                "query($id: ID!) { order(id: $id) { status } }",
                json!({"id": id}),
            )
            .await
            .1;
            let status = status["data"]["order"]["status"]
                .as_str()
                .map(str::to_string);
            if matches!(status.as_deref(), Some("PAYMENT_WAIT" | "ORDER_CANCELLED")) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "saga of {id} ended: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Fixture {
        t,
        app,
        a,
        b,
        operator,
        order_b: ids.pop().expect("B's order"),
        order_a: ids.pop().expect("A's order"),
    }
}

async fn send(
    request: reqwest::RequestBuilder,
    auth: &Option<String>,
) -> (u16, Value, Option<String>) {
    let request = match auth {
        Some(header) => request.header("authorization", header),
        None => request,
    };
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body, challenge)
}

async fn graphql(
    app: &TestApp,
    auth: &Option<String>,
    query: &str,
    variables: Value,
) -> (u16, Value) {
    let request = app
        .client
        .post(format!("{}/graphql", app.address))
        .json(&json!({"query": query, "variables": variables}));
    let (status, body, _) = send(request, auth).await;
    (status, body)
}

/// `createOrder` of one p-1 as `auth`, for `user_id` if given.
async fn create_order(app: &TestApp, auth: &Option<String>, user_id: Option<&str>) -> Value {
    let query =
        "mutation($input: CreateOrderInput!) { createOrder(input: $input) { orderId userId } }";
    let input = json!({"userId": user_id, "storeId": "s-1", "items": [{"productId": "p-1", "quantity": 1}]});
    graphql(app, auth, query, json!({"input": input})).await.1
}

fn code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .or_else(|| body["errors"][0]["extensions"]["code"].as_str())
        .unwrap_or("")
}

/// What a subscription over WebSocket came to.
#[derive(Debug)]
enum Subscribed {
    Closed(u16),
    Next(Value),
    Error(Value),
}

async fn subscribe(app: &TestApp, auth: &Option<String>, order_id: &str) -> Subscribed {
    let payload = match auth {
        Some(header) => json!({"Authorization": header}),
        None => json!({}),
    };
    // The server may have closed already; a failed send shows below.
    let (mut socket, _sent) =
        follow_order_at(&app.address, payload, order_id, "orderId status").await;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("the server answered");
        match message {
            Some(Ok(Message::Close(frame))) => {
                return Subscribed::Closed(frame.map(|f| u16::from(f.code)).unwrap_or(0))
            }
            Some(Ok(Message::Text(text))) => {
                let message: Value = serde_json::from_str(&text).expect("json");
                match message["type"].as_str() {
                    Some("connection_ack") => {}
                    Some("next") if message["payload"]["errors"].is_array() => {
                        return Subscribed::Error(message["payload"]["errors"].clone())
                    }
                    Some("next") => return Subscribed::Next(message["payload"].clone()),
                    Some("error") => return Subscribed::Error(message["payload"].clone()),
                    other => panic!("unexpected {other:?}: {message}"),
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("socket: {e}"),
            None => return Subscribed::Closed(0),
        }
    }
}

/// Events a request can store (orders, products, a customer's
/// cancellation) — not those the sagas of earlier orders go on appending
/// meanwhile.
async fn log_len(f: &Fixture) -> usize {
    let log = f.t.store.read_log(0, 100_000).await.expect("log");
    log.iter()
        .filter(|e| {
            matches!(
                e.event_type.as_str(),
                "OrderCreated" | "PriceSet" | "StockLevelSet"
            ) || e.payload["orderCancelled"]["reason"] == "CUSTOMER_REQUEST"
        })
        .count()
}

/// Every operation as `auth`: (name, status, body, WWW-Authenticate).
async fn every_operation(
    f: &Fixture,
    auth: &Option<String>,
) -> Vec<(&'static str, u16, Value, Option<String>)> {
    let app = &f.app;
    let id = json!({"id": f.order_a});
    let mut answers = Vec::new();
    let rest_create = app
        .client
        .post(format!("{}/api/v1/orders", app.address))
        .json(&json!({"storeId": "s-1", "items": [{"productId": "p-1", "quantity": 1}]}));
    let (s, b, c) = send(rest_create, auth).await;
    answers.push(("REST create", s, b, c));
    let rest_get = app
        .client
        .get(format!("{}/api/v1/orders/{}", app.address, f.order_a));
    let (s, b, c) = send(rest_get, auth).await;
    answers.push(("REST get", s, b, c));
    let queries = [
        (
            "order",
            "query($id: ID!) { order(id: $id) { orderId } }",
            id.clone(),
        ),
        (
            "orders",
            "{ orders { edges { node { orderId } } } }",
            json!({}),
        ),
        (
            "orderHistory",
            "query($id: ID!) { orderHistory(id: $id) { eventType } }",
            id.clone(),
        ),
        (
            "product",
            r#"{ product(productId: "p-1") { productId } }"#,
            json!({}),
        ),
        ("sagaStats", "{ sagaStats { ordersCreated } }", json!({})),
        ("events", "{ events { position } }", json!({})),
        (
            "createOrder",
            r#"mutation { createOrder(input: {storeId: "s-1", items: [{productId: "p-1", quantity: 1}]}) { orderId } }"#,
            json!({}),
        ),
        (
            "cancelOrder",
            "mutation($id: ID!) { cancelOrder(id: $id) { orderId } }",
            id.clone(),
        ),
        (
            "setProduct",
            r#"mutation { setProduct(productId: "p-1", price: "0.01", stock: 999999) { productId } }"#,
            json!({}),
        ),
    ];
    for (name, query, variables) in queries {
        let request = app
            .client
            .post(format!("{}/graphql", app.address))
            .json(&json!({"query": query, "variables": variables}));
        let (s, b, c) = send(request, auth).await;
        answers.push((name, s, b, c));
    }
    answers
}

async fn refused_requests_are_401_and_store_nothing(backend: Backend) {
    let f = fixture(backend).await;
    let before = log_len(&f).await;
    for (caller, auth) in refused_callers() {
        for (operation, status, body, challenge) in every_operation(&f, &auth).await {
            let what = format!("{caller} × {operation}: {body}");
            assert_eq!(status, 401, "{what}");
            assert_eq!(code(&body), "UNAUTHENTICATED", "{what}");
            assert!(challenge.is_some_and(|c| c.starts_with("Bearer")), "{what}");
            let message = body["error"]["message"]
                .as_str()
                .or_else(|| body["errors"][0]["message"].as_str())
                .unwrap_or("");
            assert!(!message.is_empty(), "{what}");
            if let Some(header) = &auth {
                let token = header.trim_start_matches("Bearer ");
                assert!(!message.contains(token), "{what}: the token is echoed");
            }
        }
        match subscribe(&f.app, &auth, &f.order_a).await {
            Subscribed::Closed(code) => assert_eq!(code, 4401, "{caller} × subscription"),
            other => panic!("{caller} × subscription: {other:?}"),
        }
        assert_eq!(log_len(&f).await, before, "{caller}: nothing stored");
    }
    let wrong = match refused_callers().into_iter().find(|(c, _)| *c == "expired") {
        Some((_, auth)) => every_operation(&f, &auth).await,
        None => Vec::new(),
    };
    let message = wrong[0].2["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("expired"),
        "says what was wrong: {message}"
    );
    drop(f.app);
    f.t.cleanup().await;
}

async fn a_customer_reaches_only_their_own_orders(backend: Backend) {
    let f = fixture(backend).await;
    let answers = every_operation(&f, &f.b).await;
    let answer = |name: &str| {
        answers
            .iter()
            .find(|(n, ..)| *n == name)
            .map(|(_, s, b, _)| (*s, b.clone()))
            .unwrap_or_else(|| panic!("{name} answered"))
    };
    // Another customer's order is exactly an unknown one.
    let (status, body) = answer("REST get");
    assert_eq!((status, code(&body)), (404, "NOT_FOUND"), "{body}");
    let unknown = send(
        f.app
            .client
            .get(format!("{}/api/v1/orders/no-such-order", f.app.address)),
        &f.b,
    )
    .await;
    let message = |body: &Value, id: &str| {
        body["error"]["message"]
            .as_str()
            .map(|m| m.replace(id, "…"))
    };
    assert_eq!(
        (unknown.0, message(&unknown.1, "no-such-order")),
        (404, message(&body, &f.order_a)),
        "another's order answers as an unknown one"
    );
    assert_eq!(answer("order").1["data"]["order"], Value::Null);
    assert_eq!(code(&answer("orderHistory").1), "NOT_FOUND");
    assert_eq!(code(&answer("cancelOrder").1), "NOT_FOUND");
    let listed = answer("orders").1;
    let ids = listed_field(&listed, "orderId");
    assert!(
        ids.contains(&f.order_b.as_str()),
        "B sees their own: {listed}"
    );
    assert!(
        !ids.contains(&f.order_a.as_str()),
        "B does not see A's: {listed}"
    );
    let filtered = graphql(
        &f.app,
        &f.b,
        r#"{ orders(filter: {userId: "u-a"}) { edges { node { orderId } } } }"#,
        json!({}),
    )
    .await
    .1;
    assert_eq!(filtered["data"]["orders"]["edges"], json!([]), "{filtered}");
    // Operators only.
    for name in ["sagaStats", "events", "setProduct"] {
        let (status, body) = answer(name);
        assert_eq!((status, code(&body)), (200, "FORBIDDEN"), "{name}: {body}");
    }
    // Anyone authenticated reads a product; a customer orders for themselves.
    assert_eq!(answer("product").1["data"]["product"]["productId"], "p-1");
    assert_eq!(answer("REST create").0, 201);
    let for_a = send(
        f.app
            .client
            .post(format!("{}/api/v1/orders", f.app.address))
            .json(&order_body(&[("p-1", 1)]).as_object().map(|o| {
                let mut o = o.clone();
                o.insert("userId".into(), "u-a".into());
                o
            })),
        &f.b,
    )
    .await;
    assert_eq!((for_a.0, code(&for_a.1)), (403, "FORBIDDEN"), "{}", for_a.1);
    let before = log_len(&f).await;
    let mutation = create_order(&f.app, &f.b, Some("u-a")).await;
    assert_eq!(code(&mutation), "FORBIDDEN", "{mutation}");
    assert_eq!(log_len(&f).await, before, "refused: nothing stored");
    match subscribe(&f.app, &f.b, &f.order_a).await {
        Subscribed::Error(errors) => {
            assert_eq!(errors[0]["extensions"]["code"], "NOT_FOUND", "{errors}")
        }
        other => panic!("B following A's order: {other:?}"),
    }
    // A reaches their own by every path.
    let own = send(
        f.app
            .client
            .get(format!("{}/api/v1/orders/{}", f.app.address, f.order_a)),
        &f.a,
    )
    .await;
    assert_eq!((own.0, own.1["userId"].as_str()), (200, Some("u-a")));
    match subscribe(&f.app, &f.a, &f.order_a).await {
        Subscribed::Next(payload) => {
            assert_eq!(payload["data"]["orderStatusChanged"]["orderId"], f.order_a)
        }
        other => panic!("A following their order: {other:?}"),
    }
    let cancelled = graphql(
        &f.app,
        &f.a,
        "mutation($id: ID!) { cancelOrder(id: $id) { orderId } }",
        json!({"id": f.order_a}),
    )
    .await
    .1;
    // Allowed: cancelled, or too late for it (the saga ran on) — never hidden.
    assert!(
        matches!(code(&cancelled), "" | "CONFLICT"),
        "A cancels their own: {cancelled}"
    );
    drop(f.app);
    f.t.cleanup().await;
}

async fn an_operator_may_do_everything(backend: Backend) {
    let f = fixture(backend).await;
    for (name, status, body, _) in every_operation(&f, &f.operator).await {
        if matches!(name, "REST create" | "createOrder") {
            // An operator's token is nobody's order: say whose.
            assert_eq!(code(&body), "BAD_USER_INPUT", "{name}: {body}");
            continue;
        }
        assert!(
            matches!(code(&body), "" | "CONFLICT"),
            "{name}: {status} {body}"
        );
        assert!(matches!(status, 200 | 201), "{name}: {status} {body}");
    }
    let listed = graphql(
        &f.app,
        &f.operator,
        "{ orders { edges { node { userId } } } }",
        json!({}),
    )
    .await
    .1;
    let users = listed_field(&listed, "userId");
    assert!(users.contains(&"u-a") && users.contains(&"u-b"), "{listed}");
    let for_b = create_order(&f.app, &f.operator, Some("u-b")).await;
    assert_eq!(for_b["data"]["createOrder"]["userId"], "u-b", "{for_b}");
    match subscribe(&f.app, &f.operator, &f.order_b).await {
        Subscribed::Next(_) => {}
        other => panic!("the operator following B's order: {other:?}"),
    }
    drop(f.app);
    f.t.cleanup().await;
}

on_both_backends!(
    refused_requests_are_401_and_store_nothing,
    a_customer_reaches_only_their_own_orders,
    an_operator_may_do_everything,
);

/// `field` of every order an `orders` answer lists.
fn listed_field<'a>(listed: &'a Value, field: &str) -> Vec<&'a str> {
    listed["data"]["orders"]["edges"]
        .as_array()
        .map(|edges| {
            edges
                .iter()
                .filter_map(|e| e["node"][field].as_str())
                .collect()
        })
        .unwrap_or_default()
}
