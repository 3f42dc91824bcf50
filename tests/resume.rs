//! Channel history and resume: replay order, no duplicate or gap across a publish during the
//! replay, epoch mismatch, history limits.

mod common;

use std::time::Duration;

use common::{RawPublisher, TestServer, Ws};
use serde_json::{Value, json};
use sidecast::config::Dashboard;

/// Subscribes with `since` and returns the `subscribed` reply.
#[track_caller]
fn resume(ws: &mut Ws, channel: &str, seq: u64, epoch: &str) -> Value {
    ws.send(
        json!({"type": "subscribe", "channel": channel, "since": {"seq": seq, "epoch": epoch}}),
    );
    let reply = ws.recv();
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply
}

fn publish_n(server: &TestServer, channel: &str, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        server.publish(json!({"id": n, "channel": channel, "data": n}));
    }
}

#[test]
fn a_reconnecting_client_gets_exactly_what_it_missed_then_live_events() {
    let server = TestServer::start();
    let mut first = server.ws();
    let epoch = first.subscribe("job:1")["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    publish_n(&server, "job:1", 1..=3);
    for seq in 1..=3 {
        first.expect_event("job:1", seq);
    }
    first.close_cleanly(); // the page goes away; the channel has no subscriber now
    publish_n(&server, "job:1", 4..=6);

    let mut again = server.ws();
    let reply = resume(&mut again, "job:1", 3, &epoch);
    assert_eq!(
        (reply["recovered"].as_bool(), reply["seq"].as_u64()),
        (Some(true), Some(6))
    );
    assert_eq!(reply["epoch"], epoch.as_str());
    for seq in 4..=6 {
        assert_eq!(again.expect_event("job:1", seq), seq);
    }
    publish_n(&server, "job:1", 7..=7);
    again.expect_event("job:1", 7);
    // Nothing missed is also a recovery, with nothing replayed.
    let mut current = server.ws();
    assert_eq!(resume(&mut current, "job:1", 7, &epoch)["recovered"], true);
    publish_n(&server, "job:1", 8..=8);
    current.expect_event("job:1", 8);
}

#[test]
fn no_gap_and_no_duplicate_when_publishes_race_the_replay() {
    // History large enough for every event, so recovery never depends on the race.
    let server = TestServer::start_with(|c| c.history_size = 1000);
    let mut first = server.ws();
    let epoch = first.subscribe("race")["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    publish_n(&server, "race", 1..=20);
    drop(first);
    // A publisher keeps going while the client resumes from seq 10.
    let socket = server.socket.clone();
    let flood = std::thread::spawn(move || {
        let mut publisher = RawPublisher::connect(&socket);
        for n in 21..=400 {
            publisher.send(&json!({"channel": "race", "data": n}).to_string());
        }
        publisher.send(r#"{"id":"done","channel":"race","data":401}"#);
        publisher.reply();
    });
    let mut ws = server.ws();
    let reply = resume(&mut ws, "race", 10, &epoch);
    assert_eq!(reply["recovered"], true, "{reply} {epoch}");
    // Replayed events, then live ones, wherever the boundary fell: contiguous, once each.
    for seq in 11..=401 {
        assert_eq!(ws.expect_event("race", seq), seq);
    }
    flood.join().unwrap();
}

/// Issue 9, item 8: a blip on a channel that never had an event is not a gap, and an event
/// published while the page was away is replayed, not reported as lost.
#[test]
fn a_quiet_channel_resumes_at_seq_0_without_a_gap_and_replays_what_came_meanwhile() {
    let server = TestServer::start();
    let mut ws = server.ws();
    let epoch = ws.subscribe("fresh")["epoch"].as_str().unwrap().to_string();
    ws.close_cleanly();
    server.wait_until("the page is gone", |s| s.health()["channels"] == 0);
    let mut again = server.ws();
    let reply = resume(&mut again, "fresh", 0, &epoch);
    assert_eq!(reply["epoch"], epoch.as_str(), "{reply}");
    assert_eq!(reply["recovered"], true, "nothing was ever missed: {reply}");
    again.close_cleanly();
    server.wait_until("the page is gone", |s| s.health()["channels"] == 0);

    publish_n(&server, "fresh", 1..=1);
    let mut third = server.ws();
    let reply = resume(&mut third, "fresh", 0, &epoch);
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(third.expect_event("fresh", 1), 1, "the event is replayed");
}

#[test]
fn a_channel_forgotten_after_history_ttl_starts_a_new_epoch() {
    let server = TestServer::start_with(|c| {
        c.history_ttl = Duration::from_millis(100);
        c.dashboard = Dashboard::Off; // its stats channel would stay known
    });
    let mut ws = server.ws();
    let old = ws.subscribe("fresh")["epoch"].as_str().unwrap().to_string();
    ws.close_cleanly();
    server.wait_until("the sweep forgets the quiet channel", |s| {
        s.metric("sidecast_channels_known") == 0
    });
    publish_n(&server, "fresh", 1..=2);
    let mut again = server.ws();
    let reply = resume(&mut again, "fresh", 0, &old);
    assert_ne!(reply["epoch"], old.as_str());
    assert_eq!(
        reply["recovered"], false,
        "another history: the page must reload its state"
    );
}

#[test]
fn another_epoch_or_a_gap_beyond_the_history_is_not_recovered() {
    let server = TestServer::start_with(|c| c.history_size = 5);
    let mut ws = server.ws();
    let epoch = ws.subscribe("c")["epoch"].as_str().unwrap().to_string();
    publish_n(&server, "c", 1..=10);
    drop(ws);
    let mut wrong_epoch = server.ws();
    let reply = resume(&mut wrong_epoch, "c", 9, "not-the-epoch");
    assert_eq!(reply["recovered"], false);
    let mut too_old = server.ws();
    assert_eq!(
        resume(&mut too_old, "c", 4, &epoch)["recovered"],
        false,
        "5 is gone"
    );
    let mut just_in = server.ws();
    assert_eq!(resume(&mut just_in, "c", 5, &epoch)["recovered"], true);
    for seq in 6..=10 {
        just_in.expect_event("c", seq);
    }
    // Neither of the unrecovered clients got a replay: their next message is live.
    publish_n(&server, "c", 11..=11);
    wrong_epoch.expect_event("c", 11);
    too_old.expect_event("c", 11);
    assert_eq!(server.metric("sidecast_history_events"), 5);
}

#[test]
fn history_expires_with_its_ttl_and_can_be_disabled() {
    let server = TestServer::start_with(|c| c.history_ttl = Duration::from_secs(1));
    let mut ws = server.ws();
    let epoch = ws.subscribe("t")["epoch"].as_str().unwrap().to_string();
    publish_n(&server, "t", 1..=3);
    let mut probe = server.ws();
    assert_eq!(
        resume(&mut probe, "t", 2, &epoch)["recovered"],
        true,
        "held before the TTL"
    );
    drop(ws);
    server.wait_until("the history has expired", |s| {
        let mut probe = s.ws();
        resume(&mut probe, "t", 1, &epoch)["recovered"] == false
    });

    let off = TestServer::start_with(|c| c.history_size = 0);
    let mut ws = off.ws();
    let epoch = ws.subscribe("o")["epoch"].as_str().unwrap().to_string();
    publish_n(&off, "o", 1..=2);
    let mut resumer = off.ws();
    assert_eq!(resume(&mut resumer, "o", 1, &epoch)["recovered"], false);
    assert_eq!(
        resume(&mut resumer, "o", 2, &epoch)["recovered"],
        true,
        "nothing missed"
    );
    assert_eq!(off.metric("sidecast_history_events"), 0);
}

#[test]
fn channels_nobody_watches_are_forgotten_once_their_history_expires() {
    let server = TestServer::start_with(|c| {
        c.history_ttl = Duration::from_millis(200);
        c.dashboard = Dashboard::Off; // its feed would keep a channel's history busy
    });
    for n in 0..50 {
        server.publish(json!({"id": n, "channel": format!("job:{n}"), "data": n}));
    }
    assert_eq!(server.metric("sidecast_history_events"), 50);
    // One housekeeping round expires the histories and forgets the channels together.
    server.wait_until("a sweep has expired every history", |s| {
        s.metric("sidecast_history_events") == 0
    });
    let mut ws = server.ws();
    assert_eq!(
        ws.subscribe("job:7")["seq"],
        0,
        "forgotten: a new channel, a new epoch"
    );
}
