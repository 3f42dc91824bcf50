//! The Unix-socket publish port: replies, errors, limits, ordering, many publishers, and the
//! socket file's life cycle.

mod common;

use common::{RawPublisher, TestServer};
use serde_json::{Value, json};
use sidecast::{Config, Publisher, Server, error::StartupError};

#[test]
fn errors_with_an_id_get_a_reply_and_without_one_are_only_logged() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.subscribe("a");
    let mut publisher = server.publisher();
    publisher.send("this is not json");
    publisher.send(r#"{"channel":"bad name","data":1}"#);
    publisher.send(r#"{"id":1,"channel":"bad name","data":1}"#);
    let reply = publisher.reply();
    assert_eq!(
        (reply["id"].as_u64(), reply["ok"].as_bool()),
        (Some(1), Some(false)),
        "{reply}"
    );
    assert!(
        reply["error"].as_str().unwrap().contains("invalid channel"),
        "{reply}"
    );
    publisher.send(r#"{"id":"x","chanel":"a","data":1}"#);
    let reply = publisher.reply();
    assert_eq!(reply["id"], "x");
    assert!(
        reply["error"].as_str().unwrap().contains("chanel"),
        "{reply}"
    );
    // The connection is still open and in order: this publish lands.
    publisher.send(r#"{"id":2,"channel":"a","data":"ok"}"#);
    assert_eq!(
        publisher.reply(),
        json!({"id": 2, "ok": true, "seq": 1, "delivered": 1})
    );
    assert_eq!(ws.expect_event("a", 1), "ok");
    server.wait_until("errors are counted", |s| {
        s.metric("sidecast_publish_errors_total") == 4
    });
}

#[test]
fn fire_and_forget_lines_carriage_returns_and_blank_lines() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.subscribe("a");
    let mut publisher = server.publisher();
    publisher
        .send_bytes(b"{\"channel\":\"a\",\"data\":1}\r\n\n   \n{\"channel\":\"a\",\"data\":2}\n");
    // A final line without a newline is executed when the publisher closes.
    publisher.send_bytes(b"{\"channel\":\"a\",\"data\":3}");
    drop(publisher);
    for seq in 1..=3 {
        assert_eq!(ws.expect_event("a", seq), seq);
    }
}

#[test]
fn a_line_over_the_limit_gets_an_error_and_closes_that_publisher() {
    let server = TestServer::start_with(|c| c.max_publish_line = 1024);
    let mut ws = server.ws();
    ws.subscribe("a");
    let mut other = server.publisher();
    let mut publisher = server.publisher();
    let big = format!(r#"{{"id":1,"channel":"a","data":"{}"}}"#, "x".repeat(2000));
    publisher.send(&big);
    let reply = publisher.reply();
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("max_publish_line"),
        "{reply}"
    );
    assert_eq!(
        publisher.reply_line(),
        None,
        "the server closed this publisher"
    );
    // Other publishers are unaffected.
    other.send(r#"{"id":2,"channel":"a","data":"fine"}"#);
    assert_eq!(other.reply()["ok"], true);
    assert_eq!(ws.expect_event("a", 1), "fine");
}

#[test]
fn many_publishers_at_once_each_keep_their_order() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.subscribe("jobs");
    const PUBLISHERS: usize = 8;
    const EACH: usize = 200;
    let threads: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let socket = server.socket.clone();
            std::thread::spawn(move || {
                let mut publisher = RawPublisher::connect(&socket);
                for n in 0..EACH {
                    publisher
                        .send(&json!({"channel": "jobs", "data": {"p": p, "n": n}}).to_string());
                }
                publisher.send(
                    &json!({"id": p, "channel": "jobs", "data": {"p": p, "n": EACH}}).to_string(),
                );
                assert_eq!(publisher.reply()["ok"], true);
            })
        })
        .collect();
    let mut next = [0u64; PUBLISHERS];
    for seq in 1..=(PUBLISHERS * (EACH + 1)) as u64 {
        let data = ws.expect_event("jobs", seq);
        let p = data["p"].as_u64().unwrap() as usize;
        assert_eq!(data["n"], next[p], "publisher {p} out of order");
        next[p] += 1;
    }
    for thread in threads {
        thread.join().unwrap();
    }
}

#[test]
fn the_library_publisher_confirms_and_reports_refusals() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.subscribe("project:42");
    let mut publisher = Publisher::connect(&server.socket).unwrap();
    publisher
        .publish("project:42", &json!({"progress": 10}))
        .unwrap();
    let ack = publisher
        .publish_confirmed("project:42", &json!({"progress": 20}))
        .unwrap();
    assert_eq!((ack.seq, ack.delivered), (2, Some(1)));
    let refused = publisher
        .publish_confirmed("bad channel", &json!(1))
        .unwrap_err();
    assert!(refused.to_string().contains("invalid channel"), "{refused}");
    assert_eq!(ws.expect_event("project:42", 1), json!({"progress": 10}));
    assert_eq!(ws.expect_event("project:42", 2), json!({"progress": 20}));
}

#[test]
fn a_stale_socket_file_is_replaced_and_a_live_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        publish_socket: path.clone(),
        ..Config::default()
    };
    // A crashed server leaves a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let live = Server::bind(config.clone()).expect("stale socket replaced");
    match Server::bind(config.clone()) {
        Err(StartupError::SocketInUse { path: p }) => assert_eq!(p, path),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("two servers on one socket"),
    }
    drop(live);
    assert!(!path.exists(), "the socket file is removed with the server");

    std::fs::write(&path, "not a socket").unwrap();
    let error = Server::bind(config)
        .err()
        .expect("a regular file is never deleted");
    assert!(error.to_string().contains("not a socket"), "{error}");
}

#[test]
fn publishing_to_an_empty_channel_still_counts_seq() {
    let server = TestServer::start();
    let reply: Value = server.publish(json!({"id": 1, "channel": "nobody", "data": 1}));
    assert_eq!(
        reply,
        json!({"id": 1, "ok": true, "seq": 1, "delivered": 0})
    );
    let mut ws = server.ws();
    assert_eq!(ws.subscribe("nobody")["seq"], 1);
    ws.send(json!({"type": "unsubscribe", "channel": "nobody"}));
    ws.recv();
    // Seq numbers are never reused while the server runs, even after the channel emptied.
    assert_eq!(
        server.publish(json!({"id": 2, "channel": "nobody", "data": 2}))["seq"],
        2
    );
}

#[test]
fn a_burst_over_the_per_pass_budget_is_carried_over_without_loss() {
    // 5000 lines × 20 subscribers = 100k frames, more than one pass may queue (64k).
    let server = TestServer::start();
    let mut clients: Vec<_> = (0..20).map(|_| server.ws()).collect();
    for ws in &mut clients {
        ws.subscribe("burst");
    }
    let mut publisher = server.publisher();
    let mut lines = String::new();
    for n in 1..=5000 {
        lines.push_str(&format!("{{\"channel\":\"burst\",\"data\":{n}}}\n"));
    }
    lines.push_str("{\"id\":\"last\",\"channel\":\"burst\",\"data\":5001}\n");
    publisher.send_bytes(lines.as_bytes());
    assert_eq!(
        publisher.reply(),
        json!({"id": "last", "ok": true, "seq": 5001, "delivered": 20})
    );
    for ws in &mut clients {
        for seq in 1..=5001 {
            assert_eq!(ws.expect_event("burst", seq), seq);
        }
    }
}

#[test]
fn a_worker_that_pipelines_faster_than_it_reads_is_slowed_down_not_cut_off() {
    // 200,000 confirmed publishes written at once: about 10 MB of replies, ten times
    // max_output_buffer. The worker reads them only after a while, then all of them.
    let server = TestServer::start();
    let socket = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    let mut writer = socket.try_clone().unwrap();
    let writing = std::thread::spawn(move || {
        use std::io::Write;
        let mut lines = String::new();
        for n in 1..=200_000 {
            lines.push_str(&format!(
                "{{\"id\":{n},\"channel\":\"fast\",\"data\":{n}}}\n"
            ));
        }
        writer.write_all(lines.as_bytes()).unwrap();
    });
    // Until the worker reads, the server stops reading it, rather than closing it.
    server.wait_until("the replies pile up", |s| {
        s.metric("sidecast_events_published_total") >= 10_000
    });
    std::thread::sleep(std::time::Duration::from_millis(200)); // the worker is busy
    let published = server.metric("sidecast_events_published_total");
    assert!(
        published < 200_000,
        "read on without the worker reading: {published}"
    );
    let mut replies = std::io::BufReader::new(socket);
    for n in 1..=200_000u64 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut replies, &mut line).unwrap();
        let reply: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{n}: {line:?}"));
        assert_eq!(
            (reply["id"].as_u64(), reply["seq"].as_u64()),
            (Some(n), Some(n))
        );
    }
    writing.join().unwrap();
}

#[test]
fn a_reply_counts_the_connections_a_publish_skipped_as_too_slow() {
    let server = TestServer::start_with(|c| {
        c.max_output_buffer = 64 * 1024;
        c.send_buffer_size = 16 * 1024;
    });
    let mut stuck = server.ws();
    stuck.subscribe("big");
    let mut healthy = server.ws();
    healthy.subscribe("big");
    let mut publisher = server.publisher();
    let data = "x".repeat(4000);
    let mut skipped_in = Vec::new();
    for n in 1..=200u64 {
        publisher.send(&json!({"id": n, "channel": "big", "data": data}).to_string());
        let reply = publisher.reply();
        healthy.expect_event("big", n);
        if let Some(skipped) = reply.get("skipped") {
            assert_eq!(
                (skipped, &reply["delivered"]),
                (&json!(1), &json!(1)),
                "{reply}"
            );
            skipped_in.push(n);
        } else if !skipped_in.is_empty() {
            // Closed as a slow consumer at the end of that pass: no longer a subscriber.
            assert_eq!(reply["delivered"], 1, "{reply}");
            break;
        } else {
            assert_eq!(reply["delivered"], 2, "{reply}");
        }
    }
    assert_eq!(
        skipped_in.len(),
        1,
        "one publish found it too slow: {skipped_in:?}"
    );
    assert_eq!(
        server.metric("sidecast_disconnects_total{reason=\"slow_consumer\"}"),
        1
    );
    drop(stuck);
}
