//! Server-Sent Events (`GET /sse`): a real server, real TCP readers parsing the stream as a
//! browser does, real publishers. Resume by `Last-Event-ID` for several channels at once,
//! heartbeats, authentication (query, cookie, per-user limit, expiry), refusals, a slow
//! reader's bound, the closing message, the token kept out of the log, and, under the Redis
//! engine, a stream resumed on another node.

mod common;

use std::io::Read;
use std::net::Shutdown;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::redis::{TwoNodes, free_port, http_get, wait_for};
use common::sse::{Item, Sse};
use common::{PATIENCE, RawPublisher, TestServer};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use sidecast::Config;
use sidecast::auth::JwtKey;

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";

fn token(sub: &str, channels: &[&str], lifetime_secs: u64) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + lifetime_secs;
    let claims = json!({"sub": sub, "exp": exp, "channels": channels});
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&Header::default(), &claims, &key).unwrap()
}

fn with_auth(config: &mut Config) {
    config.jwt = Some(JwtKey::Secret(SECRET.into()));
    config.jwt_leeway = Duration::ZERO;
}

#[track_caller]
fn publish(publisher: &mut RawPublisher, channel: &str, n: u64) -> u64 {
    publisher.send(&json!({"id": n, "channel": channel, "data": {"n": n}}).to_string());
    let reply = publisher.reply();
    assert_eq!(reply["ok"], true, "{reply}");
    reply["seq"].as_u64().unwrap()
}

/// Reads `connected`, then one `subscribed` per channel, in order; returns them.
#[track_caller]
fn opened(stream: &mut Sse, channels: &[&str]) -> Vec<Value> {
    let connected = stream.recv();
    assert_eq!(connected["type"], "connected", "{connected}");
    channels
        .iter()
        .map(|channel| {
            let subscribed = stream.recv();
            assert_eq!(
                (&subscribed["type"], &subscribed["channel"]),
                (&"subscribed".into(), &(*channel).into()),
                "{subscribed}"
            );
            subscribed
        })
        .collect()
}

#[test]
fn a_stream_carries_events_with_an_id_that_resumes_every_channel() {
    let server = TestServer::start();
    let mut publisher = server.publisher();
    let mut stream = Sse::connect(server.addr, "/sse?channels=a,job%3A7");
    for header in [
        "Content-Type: text/event-stream",
        "Cache-Control: no-cache",
        "X-Accel-Buffering: no",
    ] {
        assert!(stream.head.contains(header), "{header} in {}", stream.head);
    }
    let subscribed = opened(&mut stream, &["a", "job:7"]);
    let (epoch_a, epoch_job) = (&subscribed[0]["epoch"], &subscribed[1]["epoch"]);
    assert_eq!(
        stream.last_id.as_deref(),
        Some(
            format!(
                "{}:0,{}:0",
                epoch_a.as_str().unwrap(),
                epoch_job.as_str().unwrap()
            )
            .as_str()
        )
    );
    publish(&mut publisher, "a", 1);
    publish(&mut publisher, "job:7", 2);
    assert_eq!(stream.expect_event("a", 1), json!({"n": 1}));
    assert_eq!(stream.expect_event("job:7", 1), json!({"n": 2}));
    let id = stream.last_id.clone().unwrap();
    drop(stream);
    server.wait_until("the stream is gone", |s| {
        s.metric("sidecast_event_streams") == 0
    });

    // Away: two events on a, one on job:7. A browser's EventSource sends the last id back.
    publish(&mut publisher, "a", 3);
    publish(&mut publisher, "job:7", 4);
    publish(&mut publisher, "a", 5);
    let headers = [("Last-Event-ID", id.as_str())];
    let mut back = Sse::open(server.addr, "/sse?channels=a,job:7", &headers).unwrap();
    // Each channel's missed events right after its own `subscribed`, which says recovered.
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let message = back.recv();
        if message["type"] == "subscribed" {
            assert_eq!(message["recovered"], true, "{message}");
        }
        seen.push(format!(
            "{} {} {}",
            message["type"], message["channel"], message["seq"]
        ));
    }
    assert_eq!(
        seen,
        [
            r#""connected" null null"#,
            r#""subscribed" "a" 3"#,
            r#""event" "a" 2"#,
            r#""event" "a" 3"#,
            r#""subscribed" "job:7" 2"#,
            r#""event" "job:7" 2"#,
        ]
    );
    publish(&mut publisher, "a", 6);
    back.expect_event("a", 4);

    // The same id as a query parameter (what sidecast.js sends when it reopens a stream),
    // and the header wins over it.
    let query = format!(
        "/sse?channels=a,job:7&lastEventId={}",
        id.replace(':', "%3A").replace(',', "%2C")
    );
    let mut by_query = Sse::connect(server.addr, &query);
    opened(&mut by_query, &["a"]);
    by_query.expect_event("a", 2);
    let later = back.last_id.clone().unwrap();
    let mut header_wins =
        Sse::open(server.addr, &query, &[("Last-Event-ID", later.as_str())]).unwrap();
    opened(&mut header_wins, &["a", "job:7"]);
    publish(&mut publisher, "a", 7);
    header_wins.expect_event("a", 5);
}

#[test]
fn rewind_per_channel_and_refused_channels_answer_on_their_own() {
    let server = TestServer::start();
    let mut publisher = server.publisher();
    for n in 1..=3 {
        publish(&mut publisher, "job:1", n);
        publish(&mut publisher, "job:2", n);
    }
    let mut stream = Sse::connect(
        server.addr,
        "/sse?channels=job:1~2,bad%20name,job:2&rewind=1",
    );
    assert_eq!(stream.recv()["type"], "connected");
    let first = stream.recv();
    assert_eq!(
        (first["channel"].as_str(), first["seq"].as_u64()),
        (Some("job:1"), Some(1))
    );
    stream.expect_event("job:1", 2);
    stream.expect_event("job:1", 3);
    let refused = stream.recv();
    assert_eq!(
        (
            refused["type"].as_str(),
            refused["code"].as_str(),
            refused["channel"].as_str()
        ),
        (Some("error"), Some("invalid_channel"), Some("bad name"))
    );
    assert_eq!(
        stream.recv()["seq"],
        2,
        "job:2 with the stream's rewind of 1"
    );
    stream.expect_event("job:2", 3);
    let id = stream.last_id.clone().unwrap();
    assert!(
        id.contains(",,"),
        "the refused channel has no position: {id}"
    );
}

#[test]
fn idle_streams_get_heartbeats_and_the_connected_message_says_how_often() {
    let server = TestServer::start_with(|c| c.sse_heartbeat_interval = Duration::from_millis(50));
    let mut stream = Sse::connect(server.addr, "/sse?channels=quiet");
    let connected = stream.recv();
    assert_eq!(connected["heartbeatMs"], 50, "{connected}");
    assert_eq!(stream.recv()["type"], "subscribed");
    for _ in 0..3 {
        assert_eq!(stream.next_item(), Some(Item::Comment));
    }
}

#[test]
fn requests_that_cannot_be_a_stream_get_an_http_status() {
    let server = TestServer::start_with(|c| c.allowed_origin = vec!["https://app.test".into()]);
    let status = |path: &str, headers: &[(&str, &str)]| {
        let refusal = Sse::open(server.addr, path, headers).map(|_| "200".to_string());
        let response = refusal.unwrap_or_else(|r| r);
        response.split(' ').nth(1).unwrap_or("").to_string()
    };
    assert_eq!(status("/sse", &[]), "400");
    assert_eq!(status("/sse?rewind=1", &[]), "400");
    assert_eq!(status("/sse?channels=a&rewind=0", &[]), "400");
    assert_eq!(
        status("/sse?channels=a,b", &[("Last-Event-ID", "e:1")]),
        "400"
    );
    assert_eq!(
        status("/sse?channels=a", &[("Last-Event-ID", "not an id")]),
        "400"
    );
    let many = vec!["c"; 1001].join(",");
    assert_eq!(status(&format!("/sse?channels={many}"), &[]), "400");
    assert_eq!(
        status("/sse?channels=a", &[("Origin", "https://evil.test")]),
        "403"
    );
    let allowed = Sse::open(
        server.addr,
        "/sse?channels=a",
        &[("Origin", "https://app.test")],
    )
    .unwrap();
    assert!(
        allowed
            .head
            .contains("Access-Control-Allow-Origin: https://app.test\r\n"),
        "{}",
        allowed.head
    );
    assert!(
        allowed
            .head
            .contains("Access-Control-Allow-Credentials: true\r\n")
    );
    let post = server.http("POST /sse?channels=a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    assert_eq!(
        server.metric("sidecast_connections"),
        1,
        "only the allowed one is open"
    );
}

#[test]
fn tokens_come_from_the_query_or_a_cookie_and_are_held_to_the_same_rules() {
    let server = TestServer::start_with(|c| {
        with_auth(c);
        c.max_connections_per_user = 2;
    });
    let ann = token("ann", &["doc:*"], 3600);
    let refusal = Sse::open(server.addr, "/sse?channels=doc:1", &[])
        .err()
        .unwrap();
    assert!(refusal.starts_with("HTTP/1.1 401 "), "{refusal}");
    let refusal = Sse::open(server.addr, "/sse?channels=doc:1&token=garbage", &[])
        .err()
        .unwrap();
    assert!(refusal.starts_with("HTTP/1.1 401 "), "{refusal}");

    let mut by_query = Sse::connect(
        server.addr,
        &format!("/sse?channels=doc:1,secret:1&token={ann}"),
    );
    assert_eq!(by_query.recv()["userId"], "ann");
    assert_eq!(by_query.recv()["type"], "subscribed");
    let forbidden = by_query.recv();
    assert_eq!(
        (forbidden["code"].as_str(), forbidden["channel"].as_str()),
        (Some("forbidden"), Some("secret:1"))
    );

    let cookie = format!("theme=dark; sidecast_token={ann}");
    let mut by_cookie = Sse::open(
        server.addr,
        "/sse?channels=doc:1",
        &[("Cookie", cookie.as_str())],
    )
    .unwrap();
    assert_eq!(by_cookie.recv()["userId"], "ann");

    // Ann's third session, whichever the transport, is over max_connections_per_user.
    let refusal = Sse::open(
        server.addr,
        &format!("/sse?channels=doc:1&token={ann}"),
        &[],
    )
    .err()
    .unwrap();
    assert!(refusal.starts_with("HTTP/1.1 429 "), "{refusal}");
    drop(by_cookie);
    server.wait_until("ann has room again", |s| {
        s.metric("sidecast_connections") == 1
    });

    // A token that expires: the stream ends with the reason a WebSocket's close would give.
    let brief = token("bob", &["doc:*"], 2);
    let mut expiring = Sse::connect(server.addr, &format!("/sse?channels=doc:1&token={brief}"));
    opened(&mut expiring, &["doc:1"]);
    let closing = expiring.recv();
    assert_eq!(
        closing,
        json!({"type": "close", "code": 4001, "reason": "token expired"})
    );
    assert_eq!(
        expiring.recv_or_end(),
        None,
        "then the server ends the stream"
    );
    // A reconnect with it is refused (once its `exp` second has passed: the verifier counts
    // in whole seconds).
    let path = format!("/sse?channels=doc:1&token={brief}");
    wait_for(
        "a reconnect with the expired token is refused",
        PATIENCE,
        || Sse::open(server.addr, &path, &[]).is_err_and(|r| r.starts_with("HTTP/1.1 401 ")),
    );
}

#[test]
fn a_reader_that_stops_reading_is_closed_and_holds_bounded_memory() {
    let server = TestServer::start_with(|c| {
        c.max_output_buffer = 64 * 1024;
        c.send_buffer_size = 16 * 1024;
    });
    let mut stuck = Sse::connect(server.addr, "/sse?channels=big");
    opened(&mut stuck, &["big"]);
    let mut healthy = Sse::connect(server.addr, "/sse?channels=big");
    opened(&mut healthy, &["big"]);
    let mut publisher = server.publisher();
    let data = "x".repeat(4000);
    let mut n = 0;
    while server.metric("sidecast_disconnects_total{reason=\"slow_consumer\"}") == 0 {
        n += 1;
        assert!(n < 2000, "never closed as a slow consumer");
        publisher.send(&json!({"id": n, "channel": "big", "data": data}).to_string());
        assert_eq!(publisher.reply()["ok"], true);
        healthy.expect_event("big", n);
    }
    assert_eq!(
        server.metric("sidecast_event_streams"),
        1,
        "the healthy one is still open"
    );
    // What the stuck reader finally reads is whole messages, then the end: never a torn one.
    stuck.socket().set_read_timeout(Some(PATIENCE)).unwrap();
    let mut last = 0;
    while let Some(message) = stuck.recv_or_end() {
        if message["type"] == "event" {
            last = message["seq"].as_u64().unwrap();
        }
    }
    assert!(last < n, "it was cut off before the end ({last} of {n})");
}

#[test]
fn bytes_a_reader_sends_are_discarded_and_every_stream_goes_on() {
    let server = TestServer::start();
    let mut flooder = Sse::connect(server.addr, "/sse?channels=a");
    opened(&mut flooder, &["a"]);
    let mut socket = flooder.socket().try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let junk = vec![b'x'; 64 * 1024];
        // Until the server stops taking it (it never does: it reads and drops), 16 MiB.
        for _ in 0..256 {
            if std::io::Write::write_all(&mut socket, &junk).is_err() {
                break;
            }
        }
    });
    let mut other = Sse::connect(server.addr, "/sse?channels=a");
    opened(&mut other, &["a"]);
    let mut publisher = server.publisher();
    for n in 1..=3 {
        publish(&mut publisher, "a", n);
        other.expect_event("a", n);
        flooder.expect_event("a", n);
    }
    writer.join().unwrap();
    assert_eq!(
        server.metric("sidecast_event_streams"),
        2,
        "the flooder's stream is still open"
    );
    drop(flooder);
    server.wait_until("the flooder's stream is gone", |s| {
        s.metric("sidecast_event_streams") == 1
    });
}

#[test]
fn a_shutdown_ends_streams_with_the_reason_and_a_reader_leaving_is_noticed() {
    let server = TestServer::start();
    let mut leaving = Sse::connect(server.addr, "/sse?channels=a");
    opened(&mut leaving, &["a"]);
    leaving.socket().shutdown(Shutdown::Both).unwrap();
    server.wait_until("the stream is gone", |s| {
        s.metric("sidecast_event_streams") == 0
    });
    assert_eq!(
        server.metric("sidecast_disconnects_total{reason=\"client_closed\"}"),
        1
    );

    let mut staying = Sse::connect(server.addr, "/sse?channels=a");
    opened(&mut staying, &["a"]);
    server.shutdown();
    let closing = staying.recv();
    assert_eq!(
        closing,
        json!({"type": "close", "code": 1001, "reason": "server shutting down"})
    );
    assert_eq!(staying.recv_or_end(), None);
}

#[test]
fn tokens_in_queries_and_cookies_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let socket = dir.path().join("s.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sidecast"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--publish-socket",
            socket.to_str().unwrap(),
            "--log-level",
            "trace",
        ])
        .args(["--jwt-secret", SECRET, "--max-connections-per-user", "1"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the server answers", PATIENCE, || {
        http_get(port, "/health").is_some()
    });
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let good = token("ann", &["*"], 3600);
    let secret_looking = "not.a-valid.token-but-a-secret";
    let _open = Sse::connect(addr, &format!("/sse?channels=a&token={good}"));
    for (path, headers) in [
        (format!("/sse?channels=a&token={good}"), vec![]), // over the per-user limit
        (format!("/sse?channels=a&token={secret_looking}"), vec![]),
        (
            "/sse?channels=a".to_string(),
            vec![("Cookie", format!("sidecast_token={secret_looking}"))],
        ),
        (
            format!("/sse?channels=a&token={secret_looking}&rewind=x"),
            vec![],
        ),
        (format!("/ws?token={secret_looking}"), vec![]),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        assert!(Sse::open(addr, &path, &headers).is_err(), "{path}");
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    child.wait().unwrap();
    assert!(
        log.contains("event stream opened"),
        "the log is at trace level: {log}"
    );
    for secret in [good.as_str(), secret_looking] {
        assert!(!log.contains(secret), "the log holds a token:\n{log}");
    }
}

#[test]
fn a_stream_resumes_on_another_node_under_redis() {
    let nodes = TwoNodes::start(&[]);
    let addr = |port: u16| format!("127.0.0.1:{port}").parse().unwrap();
    let mut on_a = Sse::connect(addr(nodes.a.port), "/sse?channels=x,y");
    opened(&mut on_a, &["x", "y"]);
    let mut publisher = nodes.a.publisher();
    publish(&mut publisher, "x", 1);
    publish(&mut publisher, "y", 2);
    on_a.expect_event("x", 1);
    on_a.expect_event("y", 1);
    let id = on_a.last_id.clone().unwrap();
    drop(on_a);
    let mut publisher_b = nodes.b.publisher();
    publish(&mut publisher_b, "y", 3);
    publish(&mut publisher_b, "x", 4);
    let headers = [("Last-Event-ID", id.as_str())];
    let mut on_b = Sse::open(addr(nodes.b.port), "/sse?channels=x,y", &headers).unwrap();
    assert_eq!(on_b.recv()["type"], "connected");
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let message = on_b.recv();
        seen.push(format!(
            "{} {} {}",
            message["type"], message["channel"], message["seq"]
        ));
        if message["type"] == "subscribed" {
            assert_eq!(message["recovered"], true, "{message}");
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            r#""event" "x" 2"#,
            r#""event" "y" 2"#,
            r#""subscribed" "x" 2"#,
            r#""subscribed" "y" 2"#
        ]
    );
    publish(&mut publisher, "x", 5);
    on_b.expect_event("x", 3);
}
