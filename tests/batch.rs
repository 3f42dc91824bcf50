//! Many channels in one request: `subscribe` and `unsubscribe` with `channels`, each channel
//! answered on its own, charged one message per ten channels, bounded by
//! `max_subscriptions`; and 100 channels resumed at once after a reconnect.

mod common;

use std::time::Instant;

use common::redis::TwoNodes;
use common::{TestServer, Ws};
use serde_json::{Value, json};

/// The next `n` messages.
fn recv_n(ws: &mut Ws, n: usize) -> Vec<Value> {
    (0..n).map(|_| ws.recv()).collect()
}

#[test]
fn each_channel_of_a_batch_is_answered_on_its_own() {
    let server = TestServer::start();
    server.publish(json!({"id": 1, "channel": "b", "data": "latest"}));
    let mut ws = server.ws();
    ws.send(json!({"type": "subscribe", "id": 7, "channels": [
        "a",
        {"channel": "b", "rewind": 1},
        "not a name",
        {"channel": "c", "since": {"seq": 0, "epoch": "elsewhere"}},
        {"channel": "d", "rewind": 0},
        42,
    ]}));
    let replies = recv_n(&mut ws, 7);
    let summary: Vec<(Value, Value)> = replies
        .iter()
        .map(|r| (r["type"].clone(), r["channel"].clone()))
        .collect();
    assert_eq!(
        summary,
        [
            (json!("subscribed"), json!("a")),
            (json!("subscribed"), json!("b")),
            (json!("event"), json!("b")),
            (json!("error"), json!("not a name")),
            (json!("subscribed"), json!("c")),
            (json!("error"), json!("d")),
            (json!("error"), Value::Null),
        ],
        "{replies:#?}"
    );
    for reply in replies.iter().filter(|r| r["type"] != "event") {
        assert_eq!(
            reply["id"], 7,
            "every answer carries the batch's id: {reply}"
        );
    }
    assert_eq!(replies[3]["code"], "invalid_channel");
    assert_eq!(replies[4]["recovered"], false);
    assert_eq!(replies[5]["code"], "invalid_message", "rewind 0");
    assert_eq!(replies[6]["code"], "invalid_message", "not a channel");
    // The refusals refused nothing else: a, b and c are live.
    server.publish(json!({"id": 2, "channels": ["a", "c"], "data": 2}));
    ws.expect_event("a", 1);
    ws.expect_event("c", 1);

    ws.send(json!({"type": "unsubscribe", "id": 8, "channels": ["a", {"channel": "b"}, "x"]}));
    for (reply, channel) in recv_n(&mut ws, 3).iter().zip(["a", "b", "x"]) {
        assert_eq!(
            (&reply["type"], &reply["channel"], &reply["id"]),
            (&json!("unsubscribed"), &json!(channel), &json!(8))
        );
    }
    let reply = server.publish(json!({"id": 3, "channels": ["a", "b", "c"], "data": 3}));
    assert_eq!(reply["delivered"], 1, "only c is left: {reply}");
}

#[test]
fn a_batch_is_charged_one_message_per_ten_channels_and_refused_whole_past_the_budget() {
    let server = TestServer::start_with(|c| {
        c.rate_limit = 0.5;
        c.rate_burst = 5;
    });
    let mut ws = server.ws();
    let fifty: Vec<String> = (0..50).map(|i| format!("c{i}")).collect();
    ws.send(json!({"type": "subscribe", "id": 1, "channels": fifty}));
    for reply in recv_n(&mut ws, 50) {
        assert_eq!(
            reply["type"], "subscribed",
            "five messages of five: {reply}"
        );
    }
    ws.send(json!({"type": "subscribe", "id": 2, "channels": ["late"]}));
    let refused = ws.recv();
    assert_eq!(
        (&refused["type"], &refused["code"], &refused["id"]),
        (&json!("error"), &json!("rate_limited"), &json!(2)),
        "{refused}"
    );
    assert_eq!(
        server.health()["channels"],
        50,
        "nothing of the refused batch"
    );
}

#[test]
fn a_batch_cannot_pass_max_subscriptions_and_a_repeated_channel_counts_once() {
    let server = TestServer::start_with(|c| c.max_subscriptions = 3);
    let mut ws = server.ws();
    ws.send(json!({"type": "subscribe", "channels": ["a", "b", "a", "c", "d", "e"]}));
    let codes: Vec<Value> = recv_n(&mut ws, 6)
        .iter()
        .map(|r| {
            r["code"]
                .clone()
                .as_str()
                .map_or(r["type"].clone(), |c| json!(c))
        })
        .collect();
    assert_eq!(
        codes,
        [
            "subscribed",
            "subscribed",
            "subscribed",
            "subscribed",
            "too_many_subscriptions",
            "too_many_subscriptions"
        ]
    );
    assert_eq!(server.health()["channels"], 3);
}

/// Subscribes 100 channels, publishes one event to each, and resumes all of them on a new
/// connection in one request (each `since` at 0, so each replays one event). Returns how long
/// the resume took from the request to the last replayed event.
fn resume_100(open: impl Fn() -> Ws, publish: impl Fn(Value) -> Value) -> std::time::Duration {
    let channels: Vec<String> = (0..100).map(|i| format!("job:{i}")).collect();
    let mut first = open();
    first.send(json!({"type": "subscribe", "channels": channels}));
    let epochs: Vec<Value> = recv_n(&mut first, 100)
        .iter()
        .map(|r| r["epoch"].clone())
        .collect();
    let reply = publish(json!({"id": 1, "channels": channels, "data": "one"}));
    assert_eq!(reply["ok"], true, "{reply}");
    drop(first);

    let mut again = open();
    let entries: Vec<Value> = channels
        .iter()
        .zip(&epochs)
        .map(|(channel, epoch)| json!({"channel": channel, "since": {"seq": 0, "epoch": epoch}}))
        .collect();
    let started = Instant::now();
    again.send(json!({"type": "subscribe", "id": 9, "channels": entries}));
    let replies = recv_n(&mut again, 200);
    let took = started.elapsed();
    let subscribed = replies.iter().filter(|r| r["type"] == "subscribed");
    assert!(
        subscribed.clone().all(|r| r["recovered"] == true),
        "{replies:?}"
    );
    assert_eq!(subscribed.count(), 100);
    assert_eq!(replies.iter().filter(|r| r["type"] == "event").count(), 100);
    took
}

#[test]
fn a_page_resumes_100_channels_in_one_request() {
    let server = TestServer::start();
    let took = resume_100(|| server.ws(), |command| server.publish(command));
    eprintln!("memory engine: 100 channels resumed in one request in {took:?}");

    let nodes = TwoNodes::start(&[]);
    let took = resume_100(|| nodes.b.ws(), |command| nodes.a.publish(&command));
    eprintln!("redis engine: 100 channels resumed in one request in {took:?}");
}
