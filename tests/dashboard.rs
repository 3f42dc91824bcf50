//! The files served over HTTP (the browser client, the dashboard) and the stats feed.

mod common;

use common::TestServer;
use serde_json::json;
use sidecast::config::Dashboard;

fn head_and_body(response: &str) -> (&str, &str) {
    response
        .split_once("\r\n\r\n")
        .expect("a complete response")
}

fn header<'r>(head: &'r str, name: &str) -> Option<&'r str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[test]
fn serves_the_client_module_to_any_origin_and_revalidates_it() {
    let server = TestServer::start();
    let response = server.get("/sidecast.js");
    let (head, body) = head_and_body(&response);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(
        header(head, "Content-Type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(header(head, "Access-Control-Allow-Origin"), Some("*"));
    assert_eq!(body, include_str!("../client/sidecast.js"));
    let etag = header(head, "ETag").expect("an ETag");
    let revalidated = server.http(&format!(
        "GET /sidecast.js HTTP/1.1\r\nHost: test\r\nIf-None-Match: {etag}\r\n\r\n"
    ));
    let (head, body) = head_and_body(&revalidated);
    assert!(head.starts_with("HTTP/1.1 304 Not Modified"), "{head}");
    assert!(body.is_empty());
}

#[test]
fn the_dashboard_is_on_by_default_on_loopback_and_can_be_turned_off() {
    let server = TestServer::start();
    let response = server.get("/");
    let (head, body) = head_and_body(&response);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(
        header(head, "Content-Type"),
        Some("text/html; charset=utf-8")
    );
    assert!(
        body.contains("/sidecast.js"),
        "the page is built on the client"
    );

    let off = TestServer::start_with(|c| c.dashboard = Dashboard::Off);
    assert!(off.get("/").starts_with("HTTP/1.1 404"));
    assert!(off.get("/sidecast.js").starts_with("HTTP/1.1 200"));
}

#[test]
fn the_stats_feed_reports_the_server_once_a_second() {
    let server = TestServer::start();
    let mut watcher = server.ws();
    let subscribed = watcher.subscribe("sidecast:stats");
    let mut subscriber = server.ws();
    subscriber.subscribe("project:1");
    for n in 0..3 {
        server.publish(json!({"id": n, "channel": "project:1", "data": n}));
    }
    // Snapshots come once a second: the first or the second has seen the three events.
    let first = subscribed["seq"].as_u64().unwrap() + 1;
    let stats = (first..first + 2)
        .map(|seq| watcher.expect_event("sidecast:stats", seq))
        .find(|stats| stats["eventsIn"] == 3)
        .expect("a snapshot counts the three events");
    assert_eq!(stats["connections"], 2);
    assert_eq!(stats["channels"], 2, "project:1 and the feed itself");
    assert_eq!(stats["framesOut"], 3, "the feed does not count itself");
    for field in ["eventsInPerSec", "framesOutPerSec", "uptimeSecs"] {
        assert!(stats[field].is_u64(), "{field}: {stats}");
    }
    assert_eq!(stats["disconnects"]["slow_consumer"], 0);
    assert_eq!(stats["disconnects"]["heartbeat_timeout"], 0);
    assert_eq!(server.metric("sidecast_events_published_total"), 3);
}

#[test]
fn publishers_cannot_write_to_the_servers_channels() {
    let server = TestServer::start();
    let reply = server.publish(json!({"id": 1, "channel": "sidecast:stats", "data": 1}));
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"].as_str().unwrap().contains("reserved"),
        "{reply}"
    );
}
