//! The WebSocket protocol end to end: subscriptions, events, replies and client mistakes.

mod common;

use common::TestServer;
use serde_json::json;
use tungstenite::Message;

#[test]
fn connected_carries_a_unique_client_id_and_the_heartbeat() {
    let server = TestServer::start();
    let mut a = server.ws_raw("/ws?token=ignored").unwrap();
    let mut b = server.ws_raw("/ws").unwrap();
    let (first, second) = (a.recv(), b.recv());
    assert_eq!(first["type"], "connected");
    assert_eq!(first["heartbeatMs"], 30000);
    assert_eq!(
        (first["rateLimit"].as_f64(), first["rateBurst"].as_u64()),
        (Some(20.0), Some(50))
    );
    assert!(first["clientId"].as_str().is_some_and(|id| !id.is_empty()));
    assert_ne!(first["clientId"], second["clientId"]);
}

#[test]
fn events_reach_exactly_the_subscribers_in_publish_order() {
    let server = TestServer::start();
    let mut alice = server.ws();
    let mut bob = server.ws();
    let mut carol = server.ws();
    assert_eq!(alice.subscribe("project:42")["seq"], 0);
    bob.subscribe("project:42");
    carol.subscribe("order:7");

    for n in 1..=20 {
        let reply = server.publish(json!({"id": n, "channel": "project:42", "data": {"n": n}}));
        assert_eq!(
            reply,
            json!({"id": n, "ok": true, "seq": n, "delivered": 2})
        );
    }
    server.publish(json!({"id": 0, "channel": "order:7", "data": "sentinel"}));
    for n in 1..=20 {
        assert_eq!(alice.expect_event("project:42", n), json!({"n": n}));
        assert_eq!(bob.expect_event("project:42", n), json!({"n": n}));
    }
    // Carol's first message is her own channel's event: nothing from project:42 came first.
    assert_eq!(carol.expect_event("order:7", 1), "sentinel");
    // A late subscriber learns the channel's current sequence number.
    assert_eq!(carol.subscribe("project:42")["seq"], 20);
}

#[test]
fn data_is_forwarded_byte_for_byte() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.subscribe("a");
    let mut publisher = server.publisher();
    publisher.send(r#"{"channel":"a","data":{ "price" : 1.50, "tags":["x"] ,"u":"\u00e9"}}"#);
    let Message::Text(text) = ws.0.read().unwrap() else {
        panic!("text expected")
    };
    assert_eq!(
        text.as_str(),
        r#"{"type":"event","channel":"a","seq":1,"data":{ "price" : 1.50, "tags":["x"] ,"u":"\u00e9"}}"#
    );
}

#[test]
fn multi_channel_publish_takes_a_seq_per_channel() {
    let server = TestServer::start();
    let mut both = server.ws();
    both.subscribe("project:42");
    both.subscribe("order:7");
    let mut one = server.ws();
    one.subscribe("order:7");
    server.publish(json!({"id": 1, "channel": "order:7", "data": 0}));
    let reply =
        server.publish(json!({"id": 2, "channels": ["project:42", "order:7"], "data": "x"}));
    assert_eq!(
        reply,
        json!({"id": 2, "ok": true, "seqs": {"project:42": 1, "order:7": 2}, "delivered": 3})
    );
    both.expect_event("order:7", 1);
    both.expect_event("project:42", 1);
    both.expect_event("order:7", 2);
    one.expect_event("order:7", 1);
    one.expect_event("order:7", 2);
}

#[test]
fn broadcast_reaches_every_connection() {
    let server = TestServer::start();
    let mut subscribed = server.ws();
    subscribed.subscribe("a");
    let mut idle = server.ws();
    let reply =
        server.publish(json!({"id": "b1", "broadcast": true, "data": {"notice": "maintenance"}}));
    assert_eq!(reply, json!({"id": "b1", "ok": true, "delivered": 2}));
    let expected = json!({"type": "event", "broadcast": true, "data": {"notice": "maintenance"}});
    assert_eq!(subscribed.recv(), expected);
    assert_eq!(idle.recv(), expected);
}

#[test]
fn unsubscribe_stops_delivery() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.subscribe("a");
    ws.subscribe("b");
    ws.send(json!({"type": "unsubscribe", "channel": "a", "id": 5}));
    assert_eq!(
        ws.recv(),
        json!({"type": "unsubscribed", "channel": "a", "id": 5})
    );
    assert_eq!(
        server.publish(json!({"id": 1, "channel": "a", "data": 1}))["delivered"],
        0
    );
    server.publish(json!({"id": 2, "channel": "b", "data": 2}));
    assert_eq!(ws.expect_event("b", 1), 2, "the event on a never arrived");
    // Unsubscribing again is not an error.
    ws.send(json!({"type": "unsubscribe", "channel": "a"}));
    assert_eq!(ws.recv(), json!({"type": "unsubscribed", "channel": "a"}));
}

#[test]
fn subscribing_twice_does_not_duplicate_events() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.subscribe("a");
    ws.subscribe("a");
    assert_eq!(
        server.publish(json!({"id": 1, "channel": "a", "data": 1}))["delivered"],
        1
    );
    server.publish(json!({"id": 2, "channel": "a", "data": 2}));
    ws.expect_event("a", 1);
    ws.expect_event("a", 2);
}

#[test]
fn replies_echo_numeric_and_string_ids() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.send(json!({"type": "subscribe", "channel": "a", "id": 17}));
    let mut reply = ws.recv();
    let epoch = reply
        .as_object_mut()
        .unwrap()
        .remove("epoch")
        .expect("subscribed carries the epoch");
    assert!(epoch.as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(
        reply,
        json!({"type": "subscribed", "channel": "a", "seq": 0, "id": 17})
    );
    ws.send(json!({"type": "ping", "id": "p-1"}));
    assert_eq!(ws.recv(), json!({"type": "pong", "id": "p-1"}));
    ws.send(json!({"type": "ping"}));
    assert_eq!(ws.recv(), json!({"type": "pong"}));
}

#[test]
fn protocol_pings_get_pongs() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.0.send(Message::Ping("are you there".into())).unwrap();
    loop {
        match ws.0.read().unwrap() {
            Message::Pong(payload) => break assert_eq!(&payload[..], b"are you there"),
            Message::Ping(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn bad_input_gets_an_error_and_the_connection_stays_open() {
    let server = TestServer::start();
    let mut ws = server.ws();
    let cases = [
        ("{not json", "invalid_json", None),
        ("[1,2]", "invalid_message", None),
        (r#"{"channel":"a"}"#, "invalid_message", Some("a")),
        (r#"{"type":"subscribe","id":3}"#, "invalid_message", None),
        (
            r#"{"type":"subscribe","channel":42}"#,
            "invalid_message",
            None,
        ),
        (
            r#"{"type":"dance","channel":"a"}"#,
            "unknown_type",
            Some("a"),
        ),
        (
            r#"{"type":"subscribe","channel":"no spaces"}"#,
            "invalid_channel",
            Some("no spaces"),
        ),
        (
            r#"{"type":"subscribe","channel":""}"#,
            "invalid_channel",
            Some(""),
        ),
    ];
    for (text, code, channel) in cases {
        ws.0.send(Message::text(text)).unwrap();
        let reply = ws.recv();
        assert_eq!(reply["type"], "error", "{text}: {reply}");
        assert_eq!(reply["code"], code, "{text}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(reply["channel"].as_str(), channel, "{text}: {reply}");
    }
    let long = "x".repeat(129);
    ws.send(json!({"type": "subscribe", "channel": long, "id": 9}));
    let reply = ws.recv();
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_u64()),
        (Some("invalid_channel"), Some(9))
    );

    ws.0.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(ws.recv()["code"], "binary_not_supported");

    ws.subscribe("still-works");
}

#[test]
fn subscriptions_are_capped_per_connection() {
    let server = TestServer::start_with(|c| c.max_subscriptions = 3);
    let mut ws = server.ws();
    for channel in ["a", "b", "c"] {
        ws.subscribe(channel);
    }
    ws.subscribe("a"); // re-subscribing to a held channel is fine at the cap
    ws.send(json!({"type": "subscribe", "channel": "d", "id": 1}));
    let reply = ws.recv();
    assert_eq!(reply["code"], "too_many_subscriptions", "{reply}");
    assert_eq!(
        (reply["channel"].as_str(), reply["id"].as_u64()),
        (Some("d"), Some(1))
    );
    ws.send(json!({"type": "unsubscribe", "channel": "c"}));
    ws.recv();
    ws.subscribe("d");
}
