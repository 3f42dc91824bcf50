//! Limits that protect the server and its clients: the Origin whitelist, the message rate
//! limit, the per-IP connection rate, the publish socket's mode and the publisher cap.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{RawPublisher, TestServer};
use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;

#[track_caller]
fn status_of(result: Result<common::Ws, tungstenite::Error>) -> u16 {
    match result {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

#[test]
fn by_default_only_same_host_pages_may_connect() {
    let server = TestServer::start();
    let same_host = format!("http://{}", server.addr);
    assert_eq!(
        status_of(server.ws_with_headers("/ws", &[("Origin", &same_host)])),
        101
    );
    assert_eq!(
        status_of(server.ws_with_headers("/ws", &[("Origin", "https://evil.example")])),
        403
    );
    assert_eq!(
        status_of(server.ws_with_headers("/ws", &[("Origin", "null")])),
        403
    );
    assert_eq!(
        status_of(server.ws_raw("/ws")),
        101,
        "non-browser clients send no Origin"
    );
}

#[test]
fn an_origin_whitelist_and_require_origin() {
    let server = TestServer::start_with(|c| {
        c.allowed_origin = vec!["https://app.example.com".into()];
        c.require_origin = true;
    });
    assert_eq!(
        status_of(server.ws_with_headers("/ws", &[("Origin", "https://app.example.com")])),
        101
    );
    assert_eq!(
        status_of(server.ws_with_headers("/ws", &[("Origin", "https://app.example.com.evil")])),
        403
    );
    let same_host = format!("http://{}", server.addr);
    assert_eq!(
        status_of(server.ws_with_headers("/ws", &[("Origin", &same_host)])),
        403,
        "a list replaces same-host"
    );
    assert_eq!(status_of(server.ws_raw("/ws")), 403, "Origin is required");
    let any = TestServer::start_with(|c| c.allowed_origin = vec!["*".into()]);
    assert_eq!(
        status_of(any.ws_with_headers("/ws", &[("Origin", "https://anything.test")])),
        101
    );
}

#[test]
fn a_flooding_client_is_limited_then_closed_and_others_do_not_notice() {
    let server = TestServer::start_with(|c| {
        c.rate_limit = 1.0;
        c.rate_burst = 5;
        c.rate_limit_strikes = 10;
    });
    let mut flooder = server.ws();
    let mut neighbour = server.ws();
    for n in 0..8 {
        flooder.send(json!({"type": "ping", "id": n}));
    }
    let replies: Vec<_> = (0..8).map(|_| flooder.recv()).collect();
    let pongs = replies.iter().filter(|r| r["type"] == "pong").count();
    let limited: Vec<_> = replies
        .iter()
        .filter(|r| r["code"] == "rate_limited")
        .collect();
    assert!((5..=6).contains(&pongs), "the burst passes: {replies:?}");
    assert_eq!(pongs + limited.len(), 8, "{replies:?}");
    assert!(
        limited[0]["message"]
            .as_str()
            .unwrap()
            .contains("per second")
    );

    neighbour.send(json!({"type": "ping", "id": "n"}));
    assert_eq!(neighbour.recv(), json!({"type": "pong", "id": "n"}));

    // Keep flooding: the tenth strike closes the connection.
    for n in 0..20 {
        if flooder
            .0
            .send(tungstenite::Message::text(
                json!({"type": "ping", "id": n}).to_string(),
            ))
            .is_err()
        {
            break;
        }
    }
    let close = flooder.expect_close();
    assert_eq!(
        (close.code, close.reason.as_str()),
        (CloseCode::Policy, "rate limit exceeded")
    );
    server.wait_until("counted", |s| {
        s.metric("sidecast_disconnects_total{reason=\"rate_limited\"}") == 1
    });
    neighbour.send(json!({"type": "ping"}));
    assert_eq!(neighbour.recv(), json!({"type": "pong"}));
}

#[test]
fn connections_per_ip_are_rate_limited_with_429() {
    // 1 per second, bursts of 2.
    let server = TestServer::start_with(|c| c.connect_rate_per_ip = Some(1.0));
    let statuses: Vec<u16> = (0..5).map(|_| status_of(server.ws_raw("/ws"))).collect();
    assert_eq!(&statuses[..2], &[101, 101], "{statuses:?}");
    assert!(statuses[2..].contains(&429), "{statuses:?}");
}

/// Issue 9, item 5: behind a proxy every browser shares one address. By default 1000 of them
/// reconnecting at once (a restart) all get in.
#[test]
fn by_default_a_thousand_clients_from_one_address_all_get_in() {
    let server = TestServer::start_with(|c| c.max_connections = 2000);
    let mut held = Vec::new();
    for _ in 0..1000 {
        held.push(
            server
                .ws_raw("/ws")
                .expect("no 429 with the per-IP limit off by default"),
        );
    }
    assert_eq!(server.health()["connections"], 1000);
    assert_eq!(server.metric("sidecast_http_refusals_total"), 0);
}

/// With the limit on, a trusted proxy's X-Forwarded-For names the client, so one abusive
/// browser behind the proxy is refused while another behind the same proxy is not; an
/// untrusted peer cannot pick its own key by sending the header.
#[test]
fn behind_a_trusted_proxy_the_limit_keys_by_x_forwarded_for() {
    let server = TestServer::start_with(|c| {
        c.connect_rate_per_ip = Some(1.0);
        c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    });
    let from =
        |client: &str| status_of(server.ws_with_headers("/ws", &[("X-Forwarded-For", client)]));
    let abusive: Vec<u16> = (0..4).map(|_| from("203.0.113.7")).collect();
    assert_eq!(&abusive[..2], &[101, 101], "{abusive:?}");
    assert!(abusive[2..].contains(&429), "{abusive:?}");
    assert_eq!(
        from("198.51.100.1"),
        101,
        "another client behind the same proxy"
    );
    assert_eq!(from("2001:db8:1:2::1"), 101);
    assert_eq!(from("2001:db8:1:2::2"), 101);
    assert_eq!(from("2001:db8:1:2::3"), 429, "IPv6 counts per /64");

    let untrusted = TestServer::start_with(|c| c.connect_rate_per_ip = Some(1.0));
    let spoofed: Vec<u16> = (0..4)
        .map(|n| {
            let forged = format!("192.0.2.{n}");
            status_of(untrusted.ws_with_headers("/ws", &[("X-Forwarded-For", &forged)]))
        })
        .collect();
    assert!(
        spoofed.contains(&429),
        "a forged header is ignored: {spoofed:?}"
    );
}

#[test]
fn the_publish_socket_has_the_configured_mode() {
    let server = TestServer::start();
    let mode = std::fs::metadata(&server.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    let strict = TestServer::start_with(|c| c.publish_socket_mode = 0o600);
    let mode = std::fs::metadata(&strict.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn publishers_beyond_the_cap_get_an_error_and_are_closed() {
    let server = TestServer::start_with(|c| c.max_publishers = 2);
    let mut first = server.publisher();
    first.send(r#"{"id":1,"broadcast":true,"data":1}"#);
    first.reply();
    let mut second = server.publisher();
    second.send(r#"{"id":2,"broadcast":true,"data":2}"#);
    second.reply();
    let mut third = RawPublisher::connect(&server.socket);
    let refusal = third.reply();
    assert_eq!(refusal["ok"], false);
    assert!(
        refusal["error"]
            .as_str()
            .unwrap()
            .contains("max_publishers"),
        "{refusal}"
    );
    assert_eq!(third.reply_line(), None);
    drop(first);
    server.wait_until("a slot frees up", |s| s.metric("sidecast_publishers") == 1);
    assert_eq!(
        server.publish(json!({"id": 3, "broadcast": true, "data": 3}))["ok"],
        true
    );
}
