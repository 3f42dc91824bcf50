//! `rewind`: a page that subscribes gets the channel's latest events right after `subscribed`
//! and before any live one, with no duplicate and no gap at the seam, under the memory
//! engine (an in-process server) and the Redis engine (two nodes and a real Redis).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::redis::{TwoNodes, Views};
use common::{RawPublisher, TestServer, Ws};
use serde_json::{Value, json};

/// Subscribes with `rewind` (and `since`, when given); returns `subscribed`.
#[track_caller]
fn subscribe(ws: &mut Ws, channel: &str, rewind: u64, since: Option<(u64, &Value)>) -> Value {
    let mut request = json!({"type": "subscribe", "channel": channel, "rewind": rewind});
    if let Some((seq, epoch)) = since {
        request["since"] = json!({"seq": seq, "epoch": epoch});
    }
    ws.send(request);
    let reply = ws.recv();
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply
}

#[track_caller]
fn publish(publisher: &mut RawPublisher, channel: &str, n: u64) -> u64 {
    publisher.send(&json!({"id": n, "channel": channel, "data": n}).to_string());
    let reply = publisher.reply();
    assert_eq!(reply["ok"], true, "{reply}");
    reply["seq"].as_u64().unwrap()
}

/// The rewind cases every engine answers alike, on `pages` (a fresh page each call) and
/// `publisher`.
fn rewinds_the_latest_events(mut page: impl FnMut() -> Ws, publisher: &mut RawPublisher) {
    // Nothing published yet: nothing to rewind, the page is at seq 0.
    let mut empty = page();
    let reply = subscribe(&mut empty, "job:1", 3, None);
    assert_eq!(reply["seq"], 0, "{reply}");
    for n in 1..=5 {
        assert_eq!(publish(publisher, "job:1", n), n);
    }
    for n in 1..=5 {
        empty.expect_event("job:1", n);
    }

    // The last two, then live.
    let mut late = page();
    let reply = subscribe(&mut late, "job:1", 2, None);
    assert_eq!(reply["seq"], 3, "the one before the first rewound: {reply}");
    assert_eq!(reply.get("recovered"), None);
    assert_eq!(late.expect_event("job:1", 4), json!(4));
    assert_eq!(late.expect_event("job:1", 5), json!(5));
    publish(publisher, "job:1", 6);
    late.expect_event("job:1", 6);

    // More than the channel has: all of it.
    let mut all = page();
    assert_eq!(subscribe(&mut all, "job:1", 50, None)["seq"], 0);
    for n in 1..=6 {
        all.expect_event("job:1", n);
    }

    // A resume that recovers gets what it missed, not the rewind.
    let epoch = reply["epoch"].clone();
    let mut resumed = page();
    let reply = subscribe(&mut resumed, "job:1", 3, Some((5, &epoch)));
    assert_eq!(
        (reply["recovered"].clone(), reply["seq"].clone()),
        (json!(true), json!(6))
    );
    resumed.expect_event("job:1", 6);
    resumed.send(json!({"type": "ping"}));
    assert_eq!(resumed.recv()["type"], "pong", "nothing else replayed");

    // One that cannot (another epoch) is told so, and gets the latest instead.
    let mut lost = page();
    let reply = subscribe(&mut lost, "job:1", 1, Some((99, &json!("gone"))));
    assert_eq!(
        (reply["recovered"].clone(), reply["seq"].clone()),
        (json!(false), json!(5)),
        "{reply}"
    );
    assert_eq!(lost.expect_event("job:1", 6), json!(6));
}

#[test]
fn memory_engine_rewinds_the_latest_events_before_live_ones() {
    let server = TestServer::start();
    let mut publisher = server.publisher();
    rewinds_the_latest_events(|| server.ws(), &mut publisher);
}

#[test]
fn redis_engine_rewinds_from_the_stream_on_any_node() {
    let nodes = TwoNodes::start(&[]);
    let mut publisher = nodes.a.publisher();
    // Pages on B, the events published through A.
    rewinds_the_latest_events(|| nodes.b.ws(), &mut publisher);
}

/// Pages that join with `rewind` while a worker publishes: each sees one run of consecutive
/// seqs from where `subscribed` put it, however the join and the publishes interleave.
fn racing_publishes(nodes: &[&dyn Fn() -> Ws], publisher: RawPublisher) {
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let stop = Arc::clone(&stop);
        let mut publisher = publisher;
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                publish(&mut publisher, "race", n);
            }
            n
        })
    };
    let mut pages = Vec::new();
    for i in 0..30 {
        let mut ws = nodes[i % nodes.len()]();
        let mut views = Views::default();
        ws.send(json!({"type": "subscribe", "channel": "race", "rewind": 1 + i % 4}));
        views.apply(&ws.recv());
        pages.push((ws, views));
    }
    stop.store(true, Ordering::SeqCst);
    let last = worker.join().unwrap();
    for (ws, views) in &mut pages {
        let start = views.channels["race"].seq;
        while views.channels["race"].seq < last {
            views.apply(&ws.recv()); // panics on a duplicate or a skipped seq
        }
        let view = &views.channels["race"];
        assert!(view.lost.is_empty(), "no gap: {:?}", view.lost);
        assert_eq!(view.events.len() as u64, last - start);
    }
}

#[test]
fn memory_engine_rewind_races_publishes_without_a_duplicate_or_a_gap() {
    let server = TestServer::start();
    let page = || server.ws();
    racing_publishes(&[&page], server.publisher());
}

#[test]
fn redis_engine_rewind_races_publishes_without_a_duplicate_or_a_gap() {
    let nodes = TwoNodes::start(&[]);
    let (on_a, on_b) = (|| nodes.a.ws(), || nodes.b.ws());
    racing_publishes(&[&on_a, &on_b], nodes.a.publisher());
}
