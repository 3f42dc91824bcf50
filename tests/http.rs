//! HTTP on the WebSocket port: routing, statuses, limits and the handshake deadline.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{PATIENCE, TestServer};

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

#[test]
fn health_and_metrics() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.subscribe("a");
    let health = server.health();
    assert_eq!(health["status"], "ok");
    assert_eq!(
        (health["connections"].as_u64(), health["channels"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(health["uptimeSecs"].is_u64());

    let metrics = server.get("/metrics");
    assert_eq!(status_line(&metrics), "HTTP/1.1 200 OK");
    assert!(metrics.contains("Content-Type: text/plain; version=0.0.4"));
    for series in [
        "sidecast_connections 1",
        "sidecast_channels 1",
        "sidecast_events_published_total 0",
        "sidecast_frames_delivered_total 0",
        "sidecast_disconnects_total{reason=\"client_closed\"} 0",
    ] {
        assert!(metrics.contains(series), "missing {series}");
    }
    assert!(server.metric("sidecast_bytes_written_total") > 0);

    server.publish(serde_json::json!({"id": 1, "channel": "a", "data": 1}));
    ws.expect_event("a", 1);
    let name = "sidecast_publish_write_latency_seconds";
    server.wait_until("the write is observed", |s| {
        s.metric(&format!("{name}_count")) == 1
    });
    assert_eq!(server.metric(&format!("{name}_bucket{{le=\"+Inf\"}}")), 1);
    assert_eq!(
        server.metric(&format!("{name}_bucket{{le=\"1\"}}")),
        1,
        "under a second"
    );
}

#[test]
fn routing_statuses() {
    let server = TestServer::start();
    let cases = [
        ("GET /nope HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (
            "POST /ws HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (
            "DELETE /health HTTP/1.1\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (
            "GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",
            "HTTP/1.1 426 Upgrade Required",
        ),
        (
            "GET /ws?token=abc HTTP/1.1\r\n\r\n",
            "HTTP/1.1 426 Upgrade Required",
        ),
        ("HELLO\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
        ),
    ];
    for (request, status) in cases {
        assert_eq!(status_line(&server.http(request)), status, "{request:?}");
    }
    server.wait_until("refusals are counted", |s| {
        s.metric("sidecast_http_refusals_total") == 7
    });
}

#[test]
fn oversized_request_heads_get_431() {
    let server = TestServer::start_with(|c| c.max_header_size = 1024);
    let request = format!("GET /ws HTTP/1.1\r\nX-Filler: {}\r\n\r\n", "a".repeat(2000));
    assert_eq!(
        status_line(&server.http(&request)),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    // An incomplete head that passes the cap is refused without waiting for the rest.
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
        .write_all(format!("GET /ws HTTP/1.1\r\nX: {}", "b".repeat(1100)).as_bytes())
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert_eq!(
        status_line(&response),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
}

#[test]
fn upgrades_beyond_max_connections_get_503() {
    let server = TestServer::start_with(|c| c.max_connections = 2);
    let _a = server.ws();
    let mut b = server.ws();
    match server.ws_raw("/ws") {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("expected 503, got an upgrade"),
    }
    // Health checks still work at the limit, and a slot frees up when a client leaves.
    assert_eq!(server.health()["connections"], 2);
    b.close_cleanly();
    server.wait_until("the slot is free", |s| s.health()["connections"] == 1);
    let _c = server.ws();
}

#[test]
fn a_connection_that_never_completes_its_request_is_dropped() {
    let server = TestServer::start_with(|c| c.handshake_timeout = Duration::from_millis(100));
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(b"GET /ws HTTP/1.1\r\nHost: slow").unwrap();
    let mut rest = Vec::new();
    // read_to_end returns once the server closes; an error would mean the timeout never fired.
    stream
        .read_to_end(&mut rest)
        .expect("the server closes the connection");
    assert!(
        rest.is_empty(),
        "no response is sent to a timed-out handshake"
    );
    server.wait_until("the timeout is counted", |s| {
        s.metric("sidecast_handshake_timeouts_total") == 1
    });
}
