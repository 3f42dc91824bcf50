//! Connection life cycle: clean and abrupt disconnects, heartbeats, protocol violations and the
//! slow-consumer limit.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{PATIENCE, TestServer, close_of, drain_frames};
use serde_json::json;
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn disconnects_clean_and_abrupt_leave_nothing_behind() {
    let server = TestServer::start();
    let mut clean = server.ws();
    clean.subscribe("a");
    clean.subscribe("shared");
    let mut abrupt = server.ws();
    abrupt.subscribe("b");
    abrupt.subscribe("shared");
    assert_eq!(server.health()["channels"], 3);

    clean.close_cleanly();
    drop(abrupt); // TCP close without a close handshake

    server.wait_until("both are gone", |s| {
        let health = s.health();
        health["connections"] == 0 && health["channels"] == 0
    });
    assert_eq!(
        server.metric("sidecast_disconnects_total{reason=\"client_closed\"}"),
        1
    );
    assert_eq!(
        server.metric("sidecast_disconnects_total{reason=\"reset\"}"),
        1
    );
    assert_eq!(
        server.publish(json!({"id": 1, "channel": "shared", "data": 1}))["delivered"],
        0
    );
}

#[test]
fn churn_does_not_leak_connections_or_channels() {
    let server = TestServer::start();
    for round in 0..200 {
        let mut ws = server.ws();
        ws.subscribe(&format!("c{}", round % 7));
        ws.subscribe("common");
        if round % 2 == 0 {
            ws.close_cleanly();
        }
    }
    server.wait_until("all connections are cleaned up", |s| {
        let health = s.health();
        health["connections"] == 0 && health["channels"] == 0
    });
    assert_eq!(server.metric("sidecast_connections_opened_total"), 200);
}

#[test]
fn a_silent_client_is_closed_by_the_heartbeat_and_a_live_one_is_not() {
    let server = TestServer::start_with(|c| {
        c.heartbeat_interval = Duration::from_millis(50);
        c.heartbeat_timeout = Duration::from_millis(200);
    });
    let mut silent = server.ws();
    let mut live = server.ws();
    // The live client reads, so tungstenite answers each Ping with a Pong.
    let mut pings = 0;
    while pings < 8 {
        if let Message::Ping(_) = live.0.read().unwrap() {
            pings += 1;
        }
    }
    // The silent client never read after `connected`, so it never answered a Ping.
    let frames = drain_frames(silent.raw());
    assert!(
        frames.iter().any(|m| matches!(m, Message::Ping(_))),
        "the server pinged it"
    );
    assert_eq!(close_of(&frames), Some((1001, "heartbeat timeout".into())));
    // 8 pings at 50 ms outlast the 200 ms timeout: the live client is still served.
    live.send(json!({"type": "ping"}));
    assert_eq!(live.recv(), json!({"type": "pong"}));
    assert_eq!(
        server.metric("sidecast_disconnects_total{reason=\"heartbeat_timeout\"}"),
        1
    );
}

#[test]
fn a_frame_declaring_16_mib_is_refused_with_1009_before_allocation() {
    let server = TestServer::start();
    let mut ws = server.ws();
    // FIN + text, masked, 64-bit length 16 MiB, mask key; no payload follows.
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(16u64 << 20).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    ws.raw().write_all(&header).unwrap();
    let close = ws.expect_close();
    assert_eq!(close.code, CloseCode::Size);
    server.wait_until("counted", |s| {
        s.metric("sidecast_disconnects_total{reason=\"message_too_big\"}") == 1
    });
}

#[test]
fn a_message_over_max_message_size_is_refused_with_1009() {
    let server = TestServer::start_with(|c| c.max_message_size = 1024);
    let mut ws = server.ws();
    ws.send(json!({"type": "ping", "id": "x".repeat(900)}));
    ws.recv();
    ws.send(json!({"type": "ping", "id": "x".repeat(1100)}));
    assert_eq!(ws.expect_close().code, CloseCode::Size);
}

#[test]
fn invalid_utf8_is_closed_with_1007() {
    let server = TestServer::start();
    let mut ws = server.ws();
    // A masked text frame (mask 0) whose payload is not UTF-8.
    ws.raw()
        .write_all(&[0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28])
        .unwrap();
    assert_eq!(ws.expect_close().code, CloseCode::Invalid);
}

#[test]
fn an_unmasked_client_frame_is_closed_with_1002() {
    let server = TestServer::start();
    let mut ws = server.ws();
    ws.raw().write_all(&[0x81, 0x02, b'{', b'}']).unwrap();
    assert_eq!(ws.expect_close().code, CloseCode::Protocol);
    server.wait_until("counted", |s| {
        s.metric("sidecast_disconnects_total{reason=\"protocol_error\"}") == 1
    });
}

#[test]
fn a_client_that_stops_reading_is_cut_off_and_others_keep_receiving() {
    let server = TestServer::start_with(|c| c.max_output_buffer = 256 * 1024);
    let mut slow = server.ws();
    slow.subscribe("feed");
    let mut fast = server.ws();
    fast.subscribe("feed");
    let progress = Arc::new(AtomicU64::new(0));
    let read = Arc::clone(&progress);
    let reader = std::thread::spawn(move || {
        let mut seq = 0;
        loop {
            let event = fast.recv();
            if event["data"] == "end" {
                return (seq, fast);
            }
            seq += 1;
            assert_eq!(event["seq"], seq, "the fast client misses nothing");
            read.store(seq, Ordering::Relaxed);
        }
    });
    // Publish 16 KiB events until the slow client is no longer among the recipients. Kernel
    // socket buffers absorb a few MiB first; 4000 events (64 MiB) bound the test.
    let mut publisher = server.publisher();
    let payload = "x".repeat(16 * 1024);
    let mut published = 0;
    for id in 0..4000 {
        // The fast client keeps up, however the threads are scheduled: at most 8 events
        // (128 KiB, half its max_output_buffer) ahead of it.
        keep_within(&progress, id, 8);
        publisher.send(&json!({"id": id, "channel": "feed", "data": payload}).to_string());
        published += 1;
        if publisher.reply()["delivered"] == 1 {
            break;
        }
    }
    assert!(published < 4000, "the slow consumer was never cut off");
    publisher.send(&json!({"id": "end", "channel": "feed", "data": "end"}).to_string());
    assert_eq!(publisher.reply()["delivered"], 1);
    let (received, _fast) = reader.join().unwrap();
    assert_eq!(received, published);

    let frames = drain_frames(slow.raw());
    assert_eq!(close_of(&frames), Some((1008, "slow consumer".into())));
    assert_eq!(
        server.metric("sidecast_disconnects_total{reason=\"slow_consumer\"}"),
        1
    );
}

/// Waits until a reader has `published - window` events or more, so a test's publisher stays
/// at most `window` events ahead of a client that reads as fast as it is scheduled.
#[track_caller]
fn keep_within(progress: &AtomicU64, published: u64, window: u64) {
    let deadline = Instant::now() + PATIENCE;
    while progress.load(Ordering::Relaxed) + window < published {
        assert!(Instant::now() < deadline, "the fast reader stopped reading");
        std::thread::yield_now();
    }
}

/// VmRSS of this process (server and clients together), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn fifty_megabytes_to_a_client_that_never_reads_keep_memory_bounded() {
    // Default max_output_buffer (1 MiB). The client reads only at the end, so the server must
    // still hold its close frame then: a long close_timeout, or the socket would be dropped.
    let server = TestServer::start_with(|c| c.close_timeout = Duration::from_secs(60));
    let mut never_reads = server.ws();
    never_reads.subscribe("video");
    let mut fast = server.ws();
    fast.subscribe("video");
    const EVENTS: u64 = 3200; // × 16 KiB = 50 MiB
    let progress = Arc::new(AtomicU64::new(0));
    let read = Arc::clone(&progress);
    let reader = std::thread::spawn(move || {
        for seq in 1..=EVENTS {
            fast.expect_event("video", seq);
            read.store(seq, Ordering::Relaxed);
        }
    });
    let before = rss_kib();
    let mut publisher = server.publisher();
    let payload = "x".repeat(16 * 1024);
    let mut peak = before;
    for n in 1..=EVENTS {
        // At most 32 events (512 KiB) ahead of the fast client, however it is scheduled.
        keep_within(&progress, n - 1, 32);
        publisher.send(&json!({"id": n, "channel": "video", "data": payload}).to_string());
        publisher.reply();
        if n % 100 == 0 {
            peak = peak.max(rss_kib());
        }
    }
    reader
        .join()
        .expect("the fast client received all 3200 events in order");
    let frames = drain_frames(never_reads.raw());
    assert_eq!(close_of(&frames), Some((1008, "slow consumer".into())));
    // 50 MiB went through; the process grew by far less (the cap is 1 MiB per connection).
    assert!(
        peak - before < 16 * 1024,
        "RSS grew by {} KiB",
        peak - before
    );
}
