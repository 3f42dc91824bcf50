//! Authentication with real signed tokens: who may connect, what they may read, refresh and
//! expiry, per-user delivery and limits, disconnect-by-user.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{TestServer, Ws};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sidecast::Config;
use sidecast::auth::JwtKey;
use tungstenite::Message;
use tungstenite::protocol::frame::CloseFrame;

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(claims: &Value, algorithm: Algorithm, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), claims, key).unwrap()
}

/// An HS256 token for `sub`, valid for an hour, with optional channel patterns.
fn token(sub: &str, channels: &[&str]) -> String {
    let claims = json!({"sub": sub, "exp": unix_now() + 3600, "channels": channels});
    sign(
        &claims,
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

fn with_auth(config: &mut Config) {
    config.jwt = Some(JwtKey::Secret(SECRET.into()));
    config.jwt_leeway = Duration::ZERO;
}

fn connect(server: &TestServer, token: &str) -> Ws {
    server
        .ws_raw(&format!("/ws?token={token}"))
        .expect("the upgrade completes")
}

/// The first thing the server sends must be its Close frame.
#[track_caller]
fn first_is_close(ws: &mut Ws) -> CloseFrame {
    loop {
        match ws.0.read().expect("a frame") {
            Message::Close(Some(frame)) => return frame,
            Message::Ping(_) => {}
            other => panic!("expected an immediate close, got {other:?}"),
        }
    }
}

#[track_caller]
fn assert_unauthorized(server: &TestServer, token: &str) {
    let close = first_is_close(&mut connect(server, token));
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4001, "unauthorized"),
        "{token}"
    );
}

#[test]
fn a_valid_token_connects_and_names_the_user() {
    let server = TestServer::start_with(with_auth);
    let mut ws = connect(&server, &token("u1", &[]));
    let connected = ws.recv();
    assert_eq!(
        (connected["type"].as_str(), connected["userId"].as_str()),
        (Some("connected"), Some("u1"))
    );
    // Servers and CLIs may send the token in a header instead.
    let mut header = server
        .ws_with_headers(
            "/ws",
            &[("Authorization", &format!("Bearer {}", token("u2", &[])))],
        )
        .unwrap();
    assert_eq!(header.recv()["userId"], "u2");
}

#[test]
fn bad_tokens_are_closed_with_4001_before_anything_is_sent() {
    let server = TestServer::start_with(with_auth);
    let hs256 = EncodingKey::from_secret(SECRET.as_bytes());
    let expired = sign(
        &json!({"sub": "u1", "exp": unix_now() - 60}),
        Algorithm::HS256,
        &hs256,
    );
    let wrong_key = sign(
        &json!({"sub": "u1", "exp": unix_now() + 60}),
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-that-is-32-bytes-long"),
    );
    let wrong_algorithm = sign(
        &json!({"sub": "u1", "exp": unix_now() + 60}),
        Algorithm::HS384,
        &hs256,
    );
    let no_sub = sign(&json!({"exp": unix_now() + 60}), Algorithm::HS256, &hs256);
    let empty_sub = sign(
        &json!({"sub": "", "exp": unix_now() + 60}),
        Algorithm::HS256,
        &hs256,
    );
    let no_exp = sign(&json!({"sub": "u1"}), Algorithm::HS256, &hs256);
    // alg "none": an unsigned token.
    let b64 = |v: &Value| data_encoding::BASE64URL_NOPAD.encode(v.to_string().as_bytes());
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&json!({"sub": "u1", "exp": unix_now() + 60}))
    );
    for token in [
        expired,
        wrong_key,
        wrong_algorithm,
        no_sub,
        empty_sub,
        no_exp,
        alg_none,
        "garbage".into(),
    ] {
        assert_unauthorized(&server, &token);
    }
    let close = first_is_close(&mut server.ws_raw("/ws").unwrap());
    assert_eq!(u16::from(close.code), 4001, "no token at all");
    server.wait_until("all counted", |s| {
        s.metric("sidecast_disconnects_total{reason=\"unauthorized\"}") == 9
    });
    assert_eq!(server.health()["connections"], 0);
}

#[test]
fn public_key_algorithms_are_pinned() {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
    let read = |name: &str| std::fs::read(format!("{keys}/{name}")).unwrap();
    let claims = json!({"sub": "u1", "exp": unix_now() + 60});
    for (algorithm, public, private) in [
        (
            Algorithm::RS256,
            "rsa_public.pem",
            EncodingKey::from_rsa_pem(&read("rsa_private.pem")).unwrap(),
        ),
        (
            Algorithm::ES256,
            "ec_public.pem",
            EncodingKey::from_ec_pem(&read("ec_private.pem")).unwrap(),
        ),
    ] {
        let pem = read(public);
        let server = TestServer::start_with(|c| {
            c.jwt = Some(JwtKey::PublicKey {
                pem: pem.clone(),
                algorithm,
            })
        });
        assert_eq!(
            connect(&server, &sign(&claims, algorithm, &private)).recv()["userId"],
            "u1"
        );
        // The classic confusion: HS256 "signed" with the public key as the secret.
        let confused = sign(&claims, Algorithm::HS256, &EncodingKey::from_secret(&pem));
        assert_unauthorized(&server, &confused);
        assert_unauthorized(&server, &token("u1", &[]));
    }
}

#[test]
fn tokens_limit_channels_to_their_patterns_and_the_personal_channel() {
    let server = TestServer::start_with(with_auth);
    let mut ws = connect(&server, &token("u1", &["project:*", "order:7"]));
    ws.recv();
    for allowed in ["project:42", "order:7", "user:u1"] {
        ws.subscribe(allowed);
    }
    for forbidden in ["order:8", "user:u2", "projects"] {
        ws.send(json!({"type": "subscribe", "channel": forbidden, "id": 1}));
        let reply = ws.recv();
        assert_eq!(
            (reply["code"].as_str(), reply["channel"].as_str()),
            (Some("forbidden"), Some(forbidden))
        );
        assert_eq!(reply["id"], 1);
    }
    assert_eq!(
        server.publish(json!({"id": 1, "channel": "order:8", "data": 1}))["delivered"],
        0
    );
}

#[test]
fn refresh_extends_the_connection_and_expiry_closes_with_4001() {
    let server = TestServer::start_with(|c| {
        with_auth(c);
        c.heartbeat_interval = Duration::from_millis(100);
        c.heartbeat_timeout = Duration::from_secs(10);
    });
    let hs256 = EncodingKey::from_secret(SECRET.as_bytes());
    let short = |sub: &str| {
        sign(
            &json!({"sub": sub, "exp": unix_now() + 1}),
            Algorithm::HS256,
            &hs256,
        )
    };

    let mut expiring = connect(&server, &short("u1"));
    expiring.recv();
    let close = expiring.expect_close();
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4001, "token expired")
    );

    let mut refreshed = connect(&server, &short("u2"));
    refreshed.recv();
    refreshed.send(json!({"type": "refresh", "token": token("u3", &[]), "id": 1}));
    assert_eq!(
        refreshed.recv()["code"],
        "invalid_token",
        "a token for another user"
    );
    refreshed.send(json!({"type": "refresh", "token": "garbage"}));
    assert_eq!(refreshed.recv()["code"], "invalid_token");
    refreshed.send(json!({"type": "refresh", "token": token("u2", &[]), "id": 2}));
    let reply = refreshed.recv();
    assert_eq!(
        (reply["type"].as_str(), reply["id"].as_u64()),
        (Some("refreshed"), Some(2))
    );
    assert!(reply["expiresAt"].as_u64().unwrap() > unix_now() + 3000);
    // 25 pings at 100 ms outlast the old token's second: the connection is still served.
    let mut pings = 0;
    while pings < 25 {
        if let Message::Ping(_) = refreshed.0.read().unwrap() {
            pings += 1;
        }
    }
    refreshed.send(json!({"type": "ping"}));
    assert_eq!(refreshed.recv(), json!({"type": "pong"}));
    assert_eq!(
        server.metric("sidecast_disconnects_total{reason=\"token_expired\"}"),
        1
    );
}

#[test]
fn a_users_fourth_connection_is_refused_and_the_others_stay() {
    let server = TestServer::start_with(with_auth);
    let mut tabs: Vec<Ws> = (0..3)
        .map(|_| connect(&server, &token("u1", &[])))
        .collect();
    for tab in &mut tabs {
        tab.recv();
    }
    let close = first_is_close(&mut connect(&server, &token("u1", &[])));
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4008, "Max connections exceeded")
    );
    for tab in &mut tabs {
        tab.send(json!({"type": "ping"}));
        assert_eq!(tab.recv(), json!({"type": "pong"}));
    }
    // Another user is not affected, and a slot frees when a tab closes.
    connect(&server, &token("u2", &[])).recv();
    tabs.pop().unwrap().close_cleanly();
    server.wait_until("the tab is gone", |s| s.health()["connections"] == 2);
    assert_eq!(connect(&server, &token("u1", &[])).recv()["userId"], "u1");
}

#[test]
fn user_publishes_reach_every_tab_of_that_user_once_and_nobody_else() {
    let server = TestServer::start_with(with_auth);
    let mut phone = connect(&server, &token("u1", &[]));
    let mut laptop = connect(&server, &token("u1", &[]));
    let mut other = connect(&server, &token("u2", &[]));
    for ws in [&mut phone, &mut laptop, &mut other] {
        ws.recv();
    }
    laptop.subscribe("user:u1"); // explicitly subscribed as well: still one copy
    let reply = server.publish(json!({"id": 1, "user": "u1", "data": {"task": "done"}}));
    assert_eq!(
        reply,
        json!({"id": 1, "ok": true, "seq": 1, "delivered": 2})
    );
    assert_eq!(phone.expect_event("user:u1", 1), json!({"task": "done"}));
    assert_eq!(laptop.expect_event("user:u1", 1), json!({"task": "done"}));
    server.publish(json!({"id": 2, "user": "u2", "data": "yours"}));
    assert_eq!(
        other.expect_event("user:u2", 1),
        "yours",
        "u2 saw nothing of u1's"
    );
    server.publish(json!({"id": 3, "user": "u1", "data": 2}));
    assert_eq!(
        laptop.expect_event("user:u1", 2),
        2,
        "no duplicate of event 1 came first"
    );
}

#[test]
fn disconnect_by_user_closes_all_their_connections_with_4003() {
    let server = TestServer::start_with(with_auth);
    let mut tabs: Vec<Ws> = (0..2)
        .map(|_| connect(&server, &token("u1", &[])))
        .collect();
    let mut other = connect(&server, &token("u2", &[]));
    other.recv();
    for tab in &mut tabs {
        tab.recv();
    }
    let reply = server.publish(json!({"id": "ban", "op": "disconnect", "user": "u1"}));
    assert_eq!(reply, json!({"id": "ban", "ok": true, "disconnected": 2}));
    for tab in &mut tabs {
        let close = tab.expect_close();
        assert_eq!(
            (u16::from(close.code), close.reason.as_str()),
            (4003, "disconnected by server")
        );
    }
    other.send(json!({"type": "ping"}));
    assert_eq!(other.recv(), json!({"type": "pong"}));
    assert_eq!(
        server.publish(json!({"id": 1, "op": "disconnect", "user": "nobody"}))["disconnected"],
        0
    );
}

#[test]
fn without_auth_refresh_is_refused_and_user_publishes_still_work() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.send(json!({"type": "refresh", "token": "x"}));
    assert_eq!(ws.recv()["code"], "invalid_message");
    ws.subscribe("user:anyone");
    assert_eq!(
        server.publish(json!({"id": 1, "user": "anyone", "data": 1}))["delivered"],
        1
    );
}

/// Issue 9, item 13: a validly signed token with the largest `exp` must not overflow the
/// expiry arithmetic (a panic in debug builds, a wrap to "expired" in release).
#[test]
fn a_token_that_never_expires_in_practice_is_accepted() {
    let server = TestServer::start_with(|c| {
        with_auth(c);
        c.jwt_leeway = Duration::from_secs(10);
    });
    let forever = sign(
        &json!({"sub": "u1", "exp": u64::MAX}),
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    );
    let mut ws = connect(&server, &forever);
    assert_eq!(ws.recv()["type"], "connected");
    ws.send(json!({"type": "ping", "id": 1}));
    assert_eq!(ws.recv(), json!({"type": "pong", "id": 1}));
}
