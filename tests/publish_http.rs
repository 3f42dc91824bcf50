//! Publishing over HTTP on the publish port (the Unix socket, and the TCP `publish_listen`
//! with its key), idempotent retries, and Dapr's subscriber contract: CloudEvents in the
//! formats Dapr documents reach channels and users once.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::Command;

use common::{PATIENCE, TestServer};
use serde_json::{Value, json};
use sidecast::auth::JwtKey;
use sidecast::publish::dapr::{Dapr, DaprSettings};

/// One HTTP/1.1 connection, reading responses by `Content-Length`.
struct Http<S: Read + Write> {
    reader: BufReader<S>,
}

/// A response: status code, headers (lower-case names), body.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn lines(&self) -> Vec<Value> {
        self.body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Http<UnixStream> {
    fn unix(server: &TestServer) -> Http<UnixStream> {
        let stream = UnixStream::connect(&server.socket).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Http {
            reader: BufReader::new(stream),
        }
    }
}

impl Http<TcpStream> {
    fn tcp(addr: std::net::SocketAddr) -> Http<TcpStream> {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Http {
            reader: BufReader::new(stream),
        }
    }
}

impl<S: Read + Write> Http<S> {
    fn send(&mut self, method: &str, path: &str, headers: &[&str], body: &str) {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: sidecast\r\n");
        for header in headers {
            request.push_str(header);
            request.push_str("\r\n");
        }
        if method == "POST" {
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        request.push_str(body);
        self.reader.get_mut().write_all(request.as_bytes()).unwrap();
    }

    fn response(&mut self) -> Response {
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line).unwrap();
        let status = status_line
            .split(' ')
            .nth(1)
            .unwrap_or_else(|| panic!("no status in {status_line:?}"))
            .parse()
            .unwrap();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        Response {
            status,
            headers,
            body: String::from_utf8(body).unwrap(),
        }
    }

    fn post(&mut self, path: &str, body: &str) -> Response {
        self.send("POST", path, &[], body);
        self.response()
    }

    /// True once the server has closed the connection.
    fn is_closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(self.reader.read_to_end(&mut rest), Ok(0))
    }
}

#[test]
fn curl_publishes_over_the_socket() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.subscribe("project:42");
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--unix-socket"])
        .arg(&server.socket)
        .args([
            "-d",
            r#"{"channel":"project:42","data":{"progress":40}}"#,
            "http://localhost/publish",
        ])
        .output()
        .expect("curl runs");
    assert!(output.status.success(), "{output:?}");
    let reply: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        reply,
        json!({"id": null, "ok": true, "seq": 1, "delivered": 1})
    );
    assert_eq!(ws.expect_event("project:42", 1), json!({"progress": 40}));
}

#[test]
fn one_command_or_several_lines_answer_a_reply_each_on_a_kept_alive_connection() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.subscribe("a");
    let mut http = Http::unix(&server);
    let one = http.post("/publish", r#"{"id":7,"channel":"a","data":1}"#);
    assert_eq!(
        (one.status, one.header("content-type")),
        (200, Some("application/json"))
    );
    assert_eq!(
        one.json(),
        json!({"id": 7, "ok": true, "seq": 1, "delivered": 1})
    );
    let lines = "{\"channel\":\"a\",\"data\":2}\n\n{\"channel\":\"a\",\"data\":3}\n";
    let many = http.post("/publish", lines);
    assert_eq!(
        (many.status, many.header("content-type")),
        (200, Some("application/x-ndjson"))
    );
    assert_eq!(
        many.lines(),
        [
            json!({"id": null, "ok": true, "seq": 2, "delivered": 1}),
            json!({"id": null, "ok": true, "seq": 3, "delivered": 1}),
        ]
    );
    for seq in 1..=3 {
        assert_eq!(ws.expect_event("a", seq), seq);
    }
    // A bad command gets 400 and the same error text the NDJSON port gives; the good line
    // beside it is still published, in order.
    let mixed = http.post(
        "/publish",
        "{\"channel\":\"a\",\"data\":4}\n{\"channel\":\"bad name\",\"data\":5}",
    );
    assert_eq!(mixed.status, 400);
    let replies = mixed.lines();
    assert_eq!(replies[0]["seq"], 4);
    assert!(
        replies[1]["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid channel \"bad name\""),
        "{replies:?}"
    );
    assert_eq!(ws.expect_event("a", 4), 4);
    assert_eq!(
        http.post("/publish", "  \n").status,
        400,
        "no command at all"
    );
    assert_eq!(
        http.post("/publish", r#"{"channel":"a","data":6}"#).status,
        200,
        "still the same connection"
    );
}

#[test]
fn an_acknowledged_publish_over_http_is_answered_with_its_report() {
    let server = TestServer::start();
    let mut page = server.ws();
    page.subscribe("c");
    let mut silent = server.ws();
    silent.subscribe("c");
    let acking = std::thread::spawn(move || {
        let event = page.recv();
        assert_eq!(event["ack"], true, "{event}");
        page.send(json!({"type": "ack", "channel": "c", "seq": event["seq"]}));
        page
    });
    let mut http = Http::unix(&server);
    let body = json!({"id": 5, "channel": "c", "data": 5, "ack": {"timeout": "300ms"}});
    let started = std::time::Instant::now();
    let response = http.post("/publish", &body.to_string());
    let waited = started.elapsed();
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        response.header("content-type"),
        Some("application/x-ndjson")
    );
    let lines = response.lines();
    assert_eq!(
        (lines[0]["ok"].as_bool(), lines[0]["seq"].as_u64()),
        (Some(true), Some(1))
    );
    let report = &lines[1];
    assert_eq!(report["type"], "ack_report", "{report}");
    assert_eq!(
        (report["acked"].as_u64(), report["timedOut"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(
        waited >= std::time::Duration::from_millis(300),
        "held until the timeout: {waited:?}"
    );
    drop(acking.join().unwrap());
    drop(silent);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = TestServer::start();
    let mut http = Http::unix(&server);
    // Three requests in one write: each waits for the response before it, none is lost.
    let one = |n: u32| {
        let body = format!(r#"{{"channel":"p","data":{n}}}"#);
        format!(
            "POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let all = format!("{}GET /dapr/subscribe HTTP/1.1\r\n\r\n{}", one(1), one(2));
    http.reader.get_mut().write_all(all.as_bytes()).unwrap();
    assert_eq!(http.response().json()["seq"], 1);
    assert_eq!(
        http.response().json(),
        json!([]),
        "no Dapr subscriptions configured"
    );
    assert_eq!(http.response().json()["seq"], 2);
}

#[test]
fn bad_requests_get_their_status_and_bounds_hold() {
    let server = TestServer::start_with(|c| c.max_publish_line = 1024);
    let mut http = Http::unix(&server);
    http.send("GET", "/nowhere", &[], "");
    assert_eq!(http.response().status, 404);
    http.send("GET", "/publish", &[], "");
    assert_eq!(http.response().status, 405, "the connection survives a 404");
    let big = format!(r#"{{"channel":"a","data":"{}"}}"#, "x".repeat(2000));
    let refused = http.post("/publish", &big);
    assert_eq!(refused.status, 413);
    assert!(
        refused.json()["error"]
            .as_str()
            .unwrap()
            .contains("max_publish_line")
    );
    assert!(
        http.is_closed(),
        "its body was not read: the connection ends"
    );

    let mut http = Http::unix(&server);
    http.send(
        "POST",
        "/publish",
        &["Transfer-Encoding: chunked"],
        "5\r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!(http.response().status, 411);
    let mut http = Http::unix(&server);
    http.send("GET", "/", &[&format!("X-Big: {}", "y".repeat(10_000))], "");
    assert_eq!(http.response().status, 431);
}

#[test]
fn the_tcp_listener_needs_its_key_and_the_websocket_port_never_takes_publishes() {
    let key = "a-publish-key-of-some-length";
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = port.local_addr().unwrap();
    drop(port);
    let server = TestServer::start_with(|c| {
        c.publish_listen = Some(addr);
        c.publish_key = Some(key.into());
    });
    let mut ws = server.ws();
    ws.subscribe("a");
    let mut http = Http::tcp(addr);
    let refused = http.post("/publish", r#"{"channel":"a","data":1}"#);
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
    let auth = format!("Authorization: Bearer {key}");
    http.send("POST", "/publish", &[&auth], r#"{"channel":"a","data":1}"#);
    let reply = http.response();
    assert_eq!((reply.status, reply.json()["seq"].as_u64()), (200, Some(1)));
    assert_eq!(ws.expect_event("a", 1), 1);
    // Dapr presents its app API token in its own header: the same key works there.
    http.send(
        "GET",
        "/dapr/subscribe",
        &[&format!("dapr-api-token: {key}")],
        "",
    );
    assert_eq!(http.response().status, 200);
    // NDJSON is not spoken there.
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.set_read_timeout(Some(PATIENCE)).unwrap();
    raw.write_all(b"{\"channel\":\"a\",\"data\":2}\n").unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The WebSocket port answers publishes with 405: it only serves GET.
    let response = server.http(&format!(
        "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 24\r\n\r\n{}",
        r#"{"channel":"a","data":3}"#
    ));
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert_eq!(server.metric("sidecast_events_published_total"), 1);
}

#[test]
fn a_retry_under_the_same_idem_key_publishes_once() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.subscribe("job:7");
    let command = json!({"id": 1, "channel": "job:7", "idem": "job-7-step-3", "data": "done"});
    let first = server.publish(command.clone());
    assert_eq!(
        first,
        json!({"id": 1, "ok": true, "seq": 1, "delivered": 1})
    );
    let retry = server.publish(command);
    assert_eq!(
        retry,
        json!({"id": 1, "ok": true, "seq": 1, "duplicate": true, "delivered": 1}),
        "the first publish's seq, and it says so"
    );
    let other =
        server.publish(json!({"id": 2, "channel": "job:7", "idem": "job-7-step-4", "data": 4}));
    assert_eq!(other["seq"], 2);
    assert_eq!(ws.expect_event("job:7", 1), "done");
    assert_eq!(ws.expect_event("job:7", 2), 4, "no second copy in between");
    assert_eq!(server.metric("sidecast_publish_duplicates_total"), 1);
    assert_eq!(server.metric("sidecast_idempotency_keys"), 2);
    let bad = server.publish(json!({"id": 3, "channel": "a", "idem": "", "data": 1}));
    assert!(bad["error"].as_str().unwrap().contains("idem"), "{bad}");
}

const SECRET: &str = "dapr-test-secret-of-at-least-32-bytes";

fn token(user: &str) -> String {
    common::hs256_token(SECRET, user)
}

fn dapr_server() -> TestServer {
    let settings: DaprSettings = toml::from_str(
        r#"
        [[subscription]]
        pubsubname = "kafka-pubsub"
        topic = "task-updates"
        route = "/dapr/task-updates"
        user = "{data.user_id}"
        bulk = true

        [[subscription]]
        pubsubname = "kafka-pubsub"
        topic = "projects"
        route = "/dapr/projects"
        channel = "project:{data.projectId}"
        "#,
    )
    .unwrap();
    TestServer::start_with(|c| {
        c.dapr = Dapr::new(&settings).unwrap();
        c.jwt = Some(JwtKey::Secret(SECRET.as_bytes().to_vec()));
    })
}

/// A CloudEvent as Dapr delivers a Kafka message published by a FastAPI task service.
fn task_update(id: &str, user: &str, progress: u32) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "task-service",
        "type": "com.dapr.event.sent",
        "topic": "task-updates",
        "pubsubname": "kafka-pubsub",
        "datacontenttype": "application/json",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "data": {"task_id": "t-1", "user_id": user, "status": "running", "progress": progress},
    })
}

#[test]
fn dapr_learns_the_subscriptions_and_task_updates_reach_the_users_tabs_once() {
    let server = dapr_server();
    let mut http = Http::unix(&server);
    http.send("GET", "/dapr/subscribe", &[], "");
    let subscriptions = http.response();
    assert_eq!(subscriptions.status, 200);
    assert_eq!(
        subscriptions.json(),
        json!([
            {"pubsubname": "kafka-pubsub", "topic": "task-updates",
             "route": "/dapr/task-updates", "bulkSubscribe": {"enabled": true}},
            {"pubsubname": "kafka-pubsub", "topic": "projects", "route": "/dapr/projects"},
        ])
    );
    let mut tabs: Vec<_> = (0..2)
        .map(|_| {
            let mut ws = server
                .ws_raw(&format!("/ws?token={}", token("u1")))
                .unwrap();
            assert_eq!(ws.recv()["type"], "connected");
            ws
        })
        .collect();
    let mut other = server
        .ws_raw(&format!("/ws?token={}", token("u2")))
        .unwrap();
    assert_eq!(other.recv()["type"], "connected");

    let event = task_update("evt-1", "u1", 40).to_string();
    let delivered = http.post("/dapr/task-updates", &event);
    assert_eq!(
        (delivered.status, delivered.json()),
        (200, json!({"status": "SUCCESS"}))
    );
    // Dapr redelivers (its ack was lost): SUCCESS again, and nothing is published twice.
    let again = http.post("/dapr/task-updates", &event);
    assert_eq!(again.json(), json!({"status": "SUCCESS"}));
    let next = http.post(
        "/dapr/task-updates",
        &task_update("evt-2", "u1", 80).to_string(),
    );
    assert_eq!(next.json(), json!({"status": "SUCCESS"}));
    for tab in &mut tabs {
        let first = tab.recv();
        assert_eq!(
            (first["channel"].as_str(), first["seq"].as_u64()),
            (Some("user:u1"), Some(1))
        );
        assert_eq!(first["data"]["progress"], 40);
        let second = tab.recv();
        assert_eq!(
            (second["seq"].as_u64(), second["data"]["progress"].as_u64()),
            (Some(2), Some(80))
        );
    }
    // An event that can never be mapped is dropped, loudly, and not retried forever.
    let unmappable = json!({"specversion": "1.0", "id": "evt-3", "source": "task-service",
                            "data": {"task_id": "t-2", "status": "running"}});
    let dropped = http.post("/dapr/task-updates", &unmappable.to_string());
    assert_eq!(dropped.json(), json!({"status": "DROP"}));
    assert_eq!(
        http.post("/dapr/task-updates", "not json").json(),
        json!({"status": "DROP"})
    );
    assert_eq!(server.metric("sidecast_events_published_total"), 2);
    assert_eq!(server.metric("sidecast_publish_duplicates_total"), 1);
    // u2 got nothing: a probe published to it is the first thing it sees.
    let probe = http.post(
        "/dapr/task-updates",
        &task_update("evt-4", "u2", 1).to_string(),
    );
    assert_eq!(probe.json(), json!({"status": "SUCCESS"}));
    assert_eq!(other.recv()["data"]["progress"], 1);
}

#[test]
fn dapr_bulk_deliveries_are_answered_entry_by_entry() {
    let server = dapr_server();
    let mut ws = server
        .ws_raw(&format!("/ws?token={}", token("u1")))
        .unwrap();
    assert_eq!(ws.recv()["type"], "connected");
    let entry = |id: &str, event: Value| {
        json!({"entryId": id, "event": event, "contentType": "application/cloudevents+json",
               "metadata": {}})
    };
    let bulk = json!({
        "id": "bulk-1", "topic": "task-updates", "pubsubname": "kafka-pubsub",
        "type": "com.dapr.event.sent.bulk", "metadata": {},
        "entries": [
            entry("e1", task_update("evt-10", "u1", 10)),
            entry("e2", json!({"id": "evt-11", "data": {"no_user": true}})),
            entry("e3", task_update("evt-12", "u1", 30)),
            entry("e1-again", task_update("evt-10", "u1", 10)),
        ],
    });
    let mut http = Http::unix(&server);
    let answer = http.post("/dapr/task-updates", &bulk.to_string());
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.json(),
        json!({"statuses": [
            {"entryId": "e1", "status": "SUCCESS"},
            {"entryId": "e2", "status": "DROP"},
            {"entryId": "e3", "status": "SUCCESS"},
            {"entryId": "e1-again", "status": "SUCCESS"},
        ]})
    );
    assert_eq!(ws.recv()["data"]["progress"], 10);
    assert_eq!(ws.recv()["data"]["progress"], 30);
    assert_eq!(server.metric("sidecast_events_published_total"), 2);
}

#[test]
fn a_worker_asks_who_is_on_a_presence_channel_over_http() {
    let server = TestServer::start_with(|c| c.presence_channels = vec!["doc:*".into()]);
    let mut page = server.ws();
    page.subscribe("doc:1");
    assert_eq!(page.recv()["type"], "presence", "the page's snapshot");
    let mut http = Http::unix(&server);
    let response = http.post("/publish", r#"{"id":1,"op":"presence","channel":"doc:1"}"#);
    assert_eq!(response.status, 200, "{}", response.body);
    let reply = &response.lines()[0];
    assert_eq!(
        reply["count"],
        json!({"members": 1, "connections": 1}),
        "{reply}"
    );
    assert_eq!(
        reply["members"][0]["clients"].as_array().map(Vec::len),
        Some(1)
    );
    let refused = http.post("/publish", r#"{"id":2,"op":"presence","channel":"other"}"#);
    assert_eq!(refused.status, 400, "{}", refused.body);
}
