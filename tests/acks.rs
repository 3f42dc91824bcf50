//! Acknowledged events against a real server: a worker publishes with `ack`, pages answer
//! `{"type":"ack",...}`, and the worker reads its reply and then exactly one `ack_report`
//! whose counts add up, whatever the pages do.

mod common;

use std::time::{Duration, Instant};

use common::redis::{Node, RedisServer, wait_for};
use common::{PATIENCE, RawPublisher, TestServer, Ws};
use serde_json::{Value, json};
use sidecast::auth::JwtKey;

/// Publishes `command` on `publisher` and returns its immediate reply.
#[track_caller]
fn publish(publisher: &mut RawPublisher, command: Value) -> Value {
    publisher.send(&command.to_string());
    publisher.reply()
}

/// Reads the next event of `ws` and checks it asks for an ack.
#[track_caller]
fn acked_event(ws: &mut Ws, channel: &str, seq: u64) -> Value {
    let event = ws.recv();
    assert_eq!(
        (
            &event["type"],
            &event["channel"],
            &event["seq"],
            &event["ack"]
        ),
        (&json!("event"), &json!(channel), &json!(seq), &json!(true)),
        "{event}"
    );
    event["data"].clone()
}

fn ack(ws: &mut Ws, channel: &str, seq: u64) {
    ws.send(json!({"type": "ack", "channel": channel, "seq": seq}));
}

/// The counts of a report on one node, in order: delivered, acked, timedOut, disconnected.
#[track_caller]
fn counts(report: &Value) -> [u64; 4] {
    let [
        delivered,
        acked,
        timed_out,
        disconnected,
        lost,
        nodes,
        nodes_lost,
    ] = outcome(report);
    assert_eq!((lost, nodes, nodes_lost), (0, 1, 0), "one node: {report}");
    [delivered, acked, timed_out, disconnected]
}

/// Every number of a report, in order: delivered, acked, timedOut, disconnected, lost, nodes,
/// nodesLost; checked to add up.
#[track_caller]
fn outcome(report: &Value) -> [u64; 7] {
    assert_eq!(report["type"], "ack_report", "{report}");
    let n = |k: &str| {
        report[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {report}"))
    };
    let all = [
        "delivered",
        "acked",
        "timedOut",
        "disconnected",
        "lost",
        "nodes",
        "nodesLost",
    ]
    .map(n);
    assert_eq!(
        all[0],
        all[1] + all[2] + all[3] + all[4],
        "adds up: {report}"
    );
    all
}

fn subscribers(server: &TestServer, channel: &str, n: usize) -> Vec<Ws> {
    (0..n)
        .map(|_| {
            let mut ws = server.ws();
            ws.subscribe(channel);
            ws
        })
        .collect()
}

#[test]
fn every_page_acks_and_the_report_comes_with_the_last() {
    let server = TestServer::start();
    let mut pages = subscribers(&server, "order:7", 3);
    let mut worker = server.publisher();
    let command = json!({"id": 7, "channel": "order:7", "data": {"status": "done"}, "ack": {"timeout": "5s"}});
    let reply = publish(&mut worker, command);
    assert_eq!(
        (reply["ok"].as_bool(), reply["seq"].as_u64()),
        (Some(true), Some(1)),
        "{reply}"
    );
    assert_eq!(reply["delivered"], 3);
    for page in &mut pages[..2] {
        assert_eq!(acked_event(page, "order:7", 1), json!({"status": "done"}));
        ack(page, "order:7", 1);
    }
    // Two of three answered: no report yet. The third answers; the report follows it.
    assert_eq!(acked_event(&mut pages[2], "order:7", 1)["status"], "done");
    server.wait_until("two acks are counted", |s| {
        s.metric("sidecast_acks_received_total") == 2
    });
    let started = Instant::now();
    ack(&mut pages[2], "order:7", 1);
    let report = worker.reply();
    let after_last = started.elapsed();
    eprintln!("the report came {after_last:?} after the last ack was sent");
    assert!(after_last < Duration::from_secs(1));
    assert_eq!(report["id"], 7);
    assert_eq!(
        (report["channel"].as_str(), report["seq"].as_u64()),
        (Some("order:7"), Some(1))
    );
    assert_eq!(counts(&report), [3, 3, 0, 0]);
    assert_eq!(server.metric("sidecast_ack_reports_total"), 1);
    assert_eq!(server.metric("sidecast_acks_pending"), 0);

    // A plain publish on the same channel asks nothing.
    publish(
        &mut worker,
        json!({"id": 8, "channel": "order:7", "data": 2}),
    );
    let plain = pages[0].recv();
    assert_eq!(plain.get("ack"), None, "{plain}");
}

#[test]
fn pages_that_do_not_answer_time_out_and_those_that_leave_are_disconnected() {
    let server = TestServer::start();
    let mut pages = subscribers(&server, "job:1", 3);
    let mut worker = server.publisher();
    let command = json!({"id": "j1", "channel": "job:1", "data": {"done": true}, "ack": {"timeout": "400ms"}});
    let started = Instant::now();
    assert_eq!(publish(&mut worker, command)["delivered"], 3);
    for page in &mut pages {
        acked_event(page, "job:1", 1);
    }
    ack(&mut pages[0], "job:1", 1);
    let gone = pages.pop().unwrap();
    drop(gone); // closed before acking
    let report = worker.reply();
    let waited = started.elapsed();
    assert_eq!(counts(&report), [3, 1, 1, 1], "{report}");
    assert!(
        waited >= Duration::from_millis(400),
        "not before the timeout: {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "soon after it: {waited:?}");
    assert_eq!(server.metric("sidecast_ack_timeouts_total"), 1);
    // A late ack changes nothing, and is not answered.
    ack(&mut pages[1], "job:1", 1);
    pages[1].send(json!({"type": "ping", "id": 1}));
    assert_eq!(pages[1].recv()["type"], "pong");
    assert_eq!(server.metric("sidecast_ack_reports_total"), 1);
}

#[test]
fn a_page_that_resumes_and_acks_within_the_timeout_counts_as_acked() {
    let server = TestServer::start();
    let mut page = server.ws();
    let subscribed = page.subscribe("order:9");
    let epoch = subscribed["epoch"].clone();
    let mut worker = server.publisher();
    let command = json!({"id": 1, "channel": "order:9", "data": "paid", "ack": {"timeout": "5s"}});
    assert_eq!(publish(&mut worker, command)["delivered"], 1);
    acked_event(&mut page, "order:9", 1);
    drop(page); // the network blinks before the page acks
    server.wait_until("the page is gone", |s| s.health()["connections"] == 0);

    let mut resumed = server.ws();
    resumed.send(
        json!({"type": "subscribe", "channel": "order:9", "since": {"seq": 0, "epoch": epoch}}),
    );
    assert_eq!(resumed.recv()["recovered"], true);
    assert_eq!(
        acked_event(&mut resumed, "order:9", 1),
        "paid",
        "replayed with its ack flag"
    );
    // Another page subscribed after the publish acks too: it was never sent the event and
    // no page of its own left, but without authentication it cannot be told from the one
    // that resumed; so it acks first, and takes the departed page's place, once.
    let mut other = server.ws();
    other.subscribe("order:9");
    ack(&mut other, "order:9", 1);
    ack(&mut other, "order:9", 1);
    ack(&mut resumed, "order:9", 1);
    let report = worker.reply();
    assert_eq!(counts(&report), [1, 1, 0, 0], "{report}");
    assert_eq!(server.metric("sidecast_acks_received_total"), 1);
}

#[test]
fn with_authentication_only_the_same_users_page_takes_a_departed_one_back() {
    let secret = "a secret of 32 bytes, long enough";
    let server = TestServer::start_with(|c| c.jwt = Some(JwtKey::Secret(secret.into())));
    let connect = |user: &str| {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": user, "exp": exp, "channels": ["order:*"]}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        let mut ws = server.ws_raw(&format!("/ws?token={token}")).unwrap();
        assert_eq!(ws.recv()["type"], "connected");
        ws
    };
    let mut page = connect("u1");
    let epoch = page.subscribe("order:9")["epoch"].clone();
    let mut worker = server.publisher();
    let command = json!({"id": 1, "channel": "order:9", "data": "paid", "ack": {"timeout": "5s"}});
    assert_eq!(publish(&mut worker, command)["delivered"], 1);
    acked_event(&mut page, "order:9", 1);
    drop(page);
    server.wait_until("the page is gone", |s| s.health()["connections"] == 0);
    let mut stranger = connect("u2");
    stranger.subscribe("order:9");
    ack(&mut stranger, "order:9", 1);
    let mut resumed = connect("u1");
    resumed.send(
        json!({"type": "subscribe", "channel": "order:9", "since": {"seq": 0, "epoch": epoch}}),
    );
    assert_eq!(resumed.recv()["recovered"], true);
    acked_event(&mut resumed, "order:9", 1);
    ack(&mut resumed, "order:9", 1);
    assert_eq!(counts(&worker.reply()), [1, 1, 0, 0]);
}

#[test]
fn no_page_gets_a_report_at_once_and_acks_no_one_asked_for_are_ignored() {
    let server = TestServer::start();
    let mut worker = server.publisher();
    let command = json!({"id": 3, "user": "u1", "data": 1, "ack": {"timeout": "30s"}});
    let reply = publish(&mut worker, command);
    assert_eq!(reply["delivered"], 0);
    assert_eq!(counts(&worker.reply()), [0, 0, 0, 0]);
    // Without history either (nothing keeps the frame): still reported at once.
    let bare = TestServer::start_with(|c| c.history_size = 0);
    let mut worker = bare.publisher();
    let command = json!({"id": 4, "channel": "nobody:here", "data": 1, "ack": {"timeout": "30s"}});
    assert_eq!(publish(&mut worker, command)["delivered"], 0);
    assert_eq!(counts(&worker.reply()), [0, 0, 0, 0]);

    let mut page = server.ws();
    page.subscribe("a");
    for stray in [
        json!({"type": "ack", "channel": "a", "seq": 99}),
        json!({"type": "ack", "channel": "nobody", "seqs": [1, 2, 3]}),
    ] {
        page.send(stray);
    }
    page.send(json!({"type": "ping", "id": 1}));
    assert_eq!(page.recv()["type"], "pong", "no error for a stray ack");
    for (bad, why) in [
        (json!({"type": "ack", "channel": "a"}), "a seq"),
        (json!({"type": "ack", "channel": "a", "seqs": []}), "seqs"),
        (json!({"type": "ack", "seq": 1}), "a channel"),
        (json!({"type": "ack", "channel": "a", "seq": "1"}), "a seq"),
    ] {
        page.send(bad.clone());
        let error = page.recv();
        assert_eq!(error["code"], "invalid_message", "{bad}: {error}");
        assert!(error["message"].as_str().unwrap().contains(why), "{error}");
    }
}

#[test]
fn ack_publishes_are_checked_and_bounded() {
    let server = TestServer::start_with(|c| {
        c.max_pending_acks = 2;
        c.max_unacked_per_connection = 1;
    });
    let mut page = server.ws();
    page.subscribe("c");
    let mut worker = server.publisher();
    for (command, error) in [
        (
            json!({"id": 1, "channels": ["c", "d"], "data": 1, "ack": {"timeout": "1s"}}),
            "channel or a user",
        ),
        (
            json!({"id": 1, "broadcast": true, "data": 1, "ack": {"timeout": "1s"}}),
            "channel or a user",
        ),
        (
            json!({"id": 1, "channel": "c", "data": 1, "ack": {}}),
            "needs a timeout",
        ),
        (
            json!({"id": 1, "channel": "c", "data": 1, "ack": {"timeout": "soon"}}),
            "ack timeout",
        ),
        (
            json!({"id": 1, "channel": "c", "data": 1, "ack": {"timeout": "0s"}}),
            "more than 0",
        ),
        (
            json!({"id": 1, "channel": "c", "data": 1, "ack": {"timeout": "2m"}}),
            "max_ack_timeout (1m)",
        ),
        (
            json!({"id": 1, "channel": "c", "data": 1, "ack": {"timeout": "1s", "extra": 1}}),
            "unknown field",
        ),
    ] {
        let reply = publish(&mut worker, command.clone());
        assert_eq!(reply["ok"], false, "{command}");
        let message = reply["error"].as_str().unwrap();
        assert!(message.contains(error), "{command}: {message}");
    }
    // A and B may each leave one event unanswered: on the second they count as timed out at
    // once, so its report comes with its reply. Two events pending fill the table.
    let mut b = server.ws();
    b.subscribe("c");
    let mut c = server.ws();
    c.subscribe("d");
    let ask =
        |id, channel| json!({"id": id, "channel": channel, "data": id, "ack": {"timeout": "30s"}});
    assert_eq!(publish(&mut worker, ask(1, "c"))["delivered"], 2);
    assert_eq!(publish(&mut worker, ask(2, "c"))["delivered"], 2);
    let second = worker.reply();
    assert_eq!(
        (second["id"].as_u64(), counts(&second)),
        (Some(2), [2, 0, 2, 0])
    );
    assert_eq!(publish(&mut worker, ask(3, "d"))["ok"], true);
    let full = publish(&mut worker, ask(4, "c"));
    let refusal = (full["error"].as_str(), full["retry"].as_bool());
    assert_eq!(refusal, (Some("ack_capacity"), Some(true)), "{full}");
    assert_eq!(server.metric("sidecast_acks_pending"), 2);
    for page in [&mut page, &mut b] {
        acked_event(page, "c", 1);
        acked_event(page, "c", 2);
        page.send(json!({"type": "ack", "channel": "c", "seqs": [1, 2]}));
    }
    let first = worker.reply();
    assert_eq!(
        (first["id"].as_u64(), counts(&first)),
        (Some(1), [2, 2, 0, 0])
    );
    acked_event(&mut c, "d", 1);
    ack(&mut c, "d", 1);
    let third = worker.reply();
    assert_eq!(
        (third["id"].as_u64(), counts(&third)),
        (Some(3), [1, 1, 0, 0])
    );
    let ask = |id| ask(id, "c");
    assert_eq!(publish(&mut worker, ask(4))["ok"], true, "room again");
}

#[test]
fn a_retry_under_idem_gets_the_first_publishs_report_or_is_told_it_is_a_duplicate() {
    let server = TestServer::start();
    let mut page = server.ws();
    page.subscribe("job:9");
    let command = |id| json!({"id": id, "channel": "job:9", "idem": "job-9-done", "data": "done", "ack": {"timeout": "5s"}});
    let mut first = server.publisher();
    assert_eq!(publish(&mut first, command(1))["seq"], 1);
    // The worker's connection broke before the report; its retry waits for the same one.
    let mut retry = server.publisher();
    let again = publish(&mut retry, command(2));
    assert_eq!(
        (again["seq"].as_u64(), again["duplicate"].as_bool()),
        (Some(1), Some(true))
    );
    acked_event(&mut page, "job:9", 1);
    ack(&mut page, "job:9", 1);
    for (worker, id) in [(&mut first, 1), (&mut retry, 2)] {
        let report = worker.reply();
        assert_eq!(
            (report["id"].as_u64(), counts(&report)),
            (Some(id), [1, 1, 0, 0])
        );
    }
    // Once reported, a retry learns it is a duplicate of seq 1, and nothing is published.
    let mut late = server.publisher();
    assert_eq!(publish(&mut late, command(3))["duplicate"], true);
    let report = late.reply();
    assert_eq!(
        (report["duplicate"].as_bool(), report["seq"].as_u64()),
        (Some(true), Some(1)),
        "{report}"
    );
    assert_eq!(server.metric("sidecast_ack_reports_total"), 1);
}

#[test]
fn the_rust_publisher_waits_for_the_report() {
    let server = TestServer::start();
    let mut page = server.ws();
    page.subscribe("job:7");
    let pages = std::thread::spawn(move || {
        let seq = page.recv()["seq"].as_u64().unwrap();
        ack(&mut page, "job:7", seq);
        page
    });
    let mut publisher = sidecast::Publisher::connect(&server.socket).unwrap();
    let done = json!({"type": "job_complete"});
    let report = publisher
        .publish_acked("job:7", &done, Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        (report.seq, report.delivered, report.acked, report.timed_out),
        (1, 1, 1, 0)
    );
    assert_eq!((report.lost, report.nodes, report.nodes_lost), (0, 1, 0));
    drop(pages.join().unwrap());
    let refused = publisher.publish_acked("job:7", &done, Duration::from_secs(600));
    assert!(
        matches!(refused, Err(sidecast::publish::publisher::PublishError::Refused(why)) if why.contains("max_ack_timeout"))
    );
}

#[test]
fn a_flood_of_acks_is_rate_limited_like_any_message() {
    let server = TestServer::start_with(|c| {
        c.rate_limit = 5.0;
        c.rate_burst = 5;
    });
    let mut page = server.ws();
    page.subscribe("c");
    for seq in 0..20 {
        ack(&mut page, "c", seq);
    }
    let error = page.recv();
    assert_eq!(error["code"], "rate_limited", "{error}");
    assert_eq!(error["channel"], "c");
}

// ---- across nodes, with a real Redis ----

/// A page on `node` subscribed to `channel`.
fn page_on(node: &Node, channel: &str) -> Ws {
    let mut ws = node.ws();
    ws.subscribe(channel);
    ws
}

#[test]
fn one_report_counts_the_pages_of_every_node_and_a_page_that_resumed_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let urls = [redis.url()];
    let (a, b) = (Node::start(&urls, &[]), Node::start(&urls, &[]));
    let mut on_a = a.ws();
    let epoch = on_a.subscribe("job:1")["epoch"].clone();
    let mut on_b: Vec<Ws> = (0..2).map(|_| page_on(&b, "job:1")).collect();
    let mut worker = a.publisher();

    // Every page on both nodes acks: the report comes with the last ack, long before the
    // timeout, and says both nodes took part.
    let command = json!({"id": 1, "channel": "job:1", "data": "done", "ack": {"timeout": "60s"}});
    let reply = publish(&mut worker, command);
    assert_eq!(
        (reply["ok"].as_bool(), reply["nodes"].as_u64()),
        (Some(true), Some(2)),
        "{reply}"
    );
    let started = Instant::now();
    for page in std::iter::once(&mut on_a).chain(&mut on_b) {
        acked_event(page, "job:1", 1);
        ack(page, "job:1", 1);
    }
    let report = worker.reply();
    assert!(
        started.elapsed() < PATIENCE,
        "with the last ack, not at the timeout"
    );
    assert_eq!(outcome(&report), [3, 3, 0, 0, 0, 2, 0], "{report}");
    assert_eq!(report["id"], 1);

    // A page on B closes before acking and resumes on A, where it acks the replayed event:
    // it counts as acked, once B's wait ends. Another page on B never answers.
    let command =
        json!({"id": 2, "channel": "job:1", "data": "again", "ack": {"timeout": "1500ms"}});
    let started = Instant::now();
    publish(&mut worker, command);
    acked_event(&mut on_a, "job:1", 2);
    ack(&mut on_a, "job:1", 2);
    acked_event(&mut on_b[1], "job:1", 2);
    let mut leaving = on_b.remove(0);
    acked_event(&mut leaving, "job:1", 2);
    drop(leaving);
    wait_for("B sees the page leave", PATIENCE, || {
        b.metric("sidecast_connections") == 1
    });
    let mut resumed = a.ws();
    let since =
        json!({"type": "subscribe", "channel": "job:1", "since": {"seq": 1, "epoch": epoch}});
    resumed.send(since);
    let subscribed = resumed.recv();
    assert_eq!(subscribed["recovered"], true, "{subscribed}");
    acked_event(&mut resumed, "job:1", 2);
    ack(&mut resumed, "job:1", 2);
    let report = worker.reply();
    let waited = started.elapsed();
    assert_eq!(outcome(&report), [3, 2, 1, 0, 0, 2, 0], "{report}");
    assert!(
        waited >= Duration::from_millis(1500),
        "B's silent page holds it: {waited:?}"
    );

    // A retry under the same idem key on the other node publishes nothing and is told so.
    let first =
        json!({"id": 3, "channel": "job:9", "idem": "k", "data": 1, "ack": {"timeout": "1s"}});
    publish(&mut worker, first);
    let mut retrier = b.publisher();
    let retry =
        json!({"id": 4, "channel": "job:9", "idem": "k", "data": 1, "ack": {"timeout": "1s"}});
    let reply = publish(&mut retrier, retry);
    assert_eq!(reply["duplicate"], true, "{reply}");
    let report = retrier.reply();
    assert_eq!(
        (report["id"].as_u64(), report["duplicate"].as_bool()),
        (Some(4), Some(true)),
        "{report}"
    );
    assert_eq!(outcome(&worker.reply()), [0, 0, 0, 0, 0, 0, 0]);
}

/// The shard channel of node `id`'s mailbox, under the default prefix.
fn mailbox(id: &str) -> String {
    format!("sidecast:{{sidecast:node:{id}}}")
}

#[test]
fn a_node_killed_mid_timeout_still_counts_its_pages_as_lost_and_holds_nothing_past_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let urls = [redis.url()];
    let a = Node::start(&urls, &["--node-id", "origin"]);
    let mut b = Node::start(&urls, &[]);
    let mut on_a = page_on(&a, "job:1");
    let mut on_b: Vec<Ws> = (0..2).map(|_| page_on(&b, "job:1")).collect();
    // The order is forced: B is killed only once its word that it delivered has reached
    // Redis, on the origin's mailbox, which this test listens to as well.
    let mut mailbox_listener = redis.subscriber(&mailbox("origin"));
    let mut worker = a.publisher();
    let command = json!({"id": 1, "channel": "job:1", "data": "done", "ack": {"timeout": "2s"}});
    let started = Instant::now();
    assert_eq!(publish(&mut worker, command)["nodes"], 2);
    acked_event(&mut on_a, "job:1", 1);
    ack(&mut on_a, "job:1", 1);
    for page in &mut on_b {
        acked_event(page, "job:1", 1);
    }
    let word = mailbox_listener.next_message(|m| m.contains("\"t\":\"delivered\""));
    assert!(word.contains("\"delivered\":2"), "{word}");
    b.kill();
    drop(on_b);
    let report = worker.reply();
    let waited = started.elapsed();
    assert_eq!(outcome(&report), [3, 1, 0, 0, 2, 2, 1], "{report}");
    assert!(
        waited >= Duration::from_secs(2),
        "not before the timeout: {waited:?}"
    );
    // The timeout, ack_grace (250 ms) for counts in transit, and a loaded machine's scheduling.
    assert!(
        waited < Duration::from_secs(4),
        "timeout + grace: {waited:?}"
    );
    wait_for("the report is freed", PATIENCE, || {
        a.metric("sidecast_acks_pending") == 0 && a.metric("sidecast_ack_nodes_lost_total") == 1
    });
}
