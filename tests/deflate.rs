//! permessage-deflate (RFC 7692) against a real server: what is agreed for each offer, events
//! compressed once and shared, compressed client messages inflated, and what a broken or
//! oversized compressed message costs (1002, 1009).

mod common;

use common::TestServer;
use common::deflate::DeflateWs;
use serde_json::{Value, json};

/// What the server answers an accepted offer with.
const AGREED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// What Chromium offers.
const CHROMIUM: &str = "permessage-deflate; client_max_window_bits";

/// A task update as the task app's worker sends it (about 1.4 KB framed).
fn task_update(n: u64) -> Value {
    json!({
        "type": "task_update",
        "event": "updated",
        "task": {
            "id": format!("7b0e4c1e-3f9a-4d52-9c61-{n:012}"),
            "user_id": "d2f1a7c3-58b4-4e0f-a9d6-2c7e81b3f540",
            "title": "Prepare the quarterly render of the product launch video",
            "description": "Export the 4K master, then the 1080p and 720p proxies; attach the \
                captions file and notify the review channel when the proxies are uploaded.",
            "status": "in_progress",
            "priority": "high",
            "tags": ["video", "launch", "render", "q4"],
            "due_date": "2026-12-18T17:00:00Z",
            "created_at": "2026-12-01T09:12:44.120Z",
            "updated_at": "2026-12-07T10:31:05.874Z",
            "completed": false,
            "recurring": null,
            "reminder_at": "2026-12-18T09:00:00Z",
            "subtasks": [
                {"id": "s1", "title": "Export 4K master", "completed": true},
                {"id": "s2", "title": "Export 1080p proxy", "completed": true},
                {"id": "s3", "title": "Export 720p proxy", "completed": false},
                {"id": "s4", "title": "Upload captions", "completed": false}
            ],
            "assignee": {"id": "u-1842", "name": "Dana Whitfield", "email": "dana@example.com"},
            "comments_count": 12,
            "attachments": [
                {"name": "launch-master-4k.mov", "size": 18_442_119_882u64, "type": "video/quicktime"},
                {"name": "captions-en.vtt", "size": 18_211, "type": "text/vtt"}
            ]
        }
    })
}

#[test]
fn each_offer_is_answered_as_rfc_7692_says() {
    let server = TestServer::start();
    for (offer, agreed) in [
        (Some(CHROMIUM), true),
        (Some("permessage-deflate"), true),
        (Some("permessage-deflate; server_max_window_bits=15"), true),
        (Some("x-webkit-deflate-frame, permessage-deflate"), true),
        (Some("permessage-deflate; server_max_window_bits=10"), false),
        (Some("permessage-deflate; client_max_window_bits=16"), false),
        (Some("permessage-deflate; unknown_parameter"), false),
        (
            Some("permessage-deflate; server_no_context_takeover; server_no_context_takeover"),
            false,
        ),
        (
            Some("permessage-deflate; server_max_window_bits=9, permessage-deflate"),
            true,
        ),
        (None, false),
    ] {
        let mut ws = DeflateWs::connect(server.addr, offer);
        assert_eq!(ws.agreed.as_deref(), agreed.then_some(AGREED), "{offer:?}");
        // Declined or not, the connection works.
        assert_eq!(ws.recv()["type"], "connected", "{offer:?}");
    }
    let off = TestServer::start_with(|c| c.permessage_deflate = false);
    let mut ws = DeflateWs::connect(off.addr, Some(CHROMIUM));
    assert_eq!(ws.agreed, None, "permessage_deflate = false");
    assert_eq!(ws.recv()["type"], "connected");
}

#[test]
fn an_event_is_compressed_once_and_every_agreeing_subscriber_shares_it() {
    let server = TestServer::start();
    let mut compressing: Vec<DeflateWs> = (0..3)
        .map(|_| DeflateWs::connect(server.addr, Some(CHROMIUM)))
        .collect();
    for ws in &mut compressing {
        assert_eq!(ws.recv()["type"], "connected");
        ws.send(&json!({"type": "subscribe", "channel": "user:u1"}), false);
        assert_eq!(ws.recv()["type"], "subscribed");
    }
    let mut plain = server.ws();
    plain.subscribe("user:u1");

    let update = task_update(1);
    server.publish(json!({"id": 1, "channel": "user:u1", "data": update}));
    let small = json!({"p": 1});
    server.publish(json!({"id": 2, "channel": "user:u1", "data": small}));

    let expected = plain.recv();
    assert_eq!(expected["data"], update);
    let frames: Vec<_> = compressing.iter_mut().map(|ws| ws.text_frame()).collect();
    for frame in &frames {
        assert!(frame.compressed(), "RSV1 on the task update");
        assert_eq!(frame, &frames[0], "every subscriber gets the same bytes");
        let message: Value = serde_json::from_slice(&frame.text()).unwrap();
        assert_eq!(message, expected);
    }
    let plain_len = expected.to_string().len();
    let ratio = plain_len as f64 / frames[0].payload.len() as f64;
    eprintln!(
        "task update: {plain_len} B plain, {} B compressed ({ratio:.2}x)",
        frames[0].payload.len()
    );
    assert!(ratio > 1.5, "{ratio}");

    // Under deflate_min_size (128 B): plain to everyone.
    assert_eq!(plain.recv()["data"], small);
    for ws in &mut compressing {
        let frame = ws.text_frame();
        assert!(!frame.compressed(), "a small event goes plain");
        assert_eq!(
            serde_json::from_slice::<Value>(&frame.payload).unwrap()["data"],
            small
        );
    }
    let deflated = server.metric("sidecast_event_bytes_total{encoding=\"deflate\"}");
    assert_eq!(deflated, 3 * (frames[0].payload.len() as u64 + 4));
    assert!(server.metric("sidecast_event_bytes_total{encoding=\"identity\"}") > 0);
}

#[test]
fn compressed_client_messages_are_inflated_fragmented_or_not() {
    let server = TestServer::start();
    let mut ws = DeflateWs::connect(server.addr, Some(CHROMIUM));
    assert_eq!(ws.recv()["type"], "connected");
    ws.send(&json!({"type": "subscribe", "channel": "a", "id": 1}), true);
    let reply = ws.recv();
    assert_eq!(
        (reply["type"].as_str(), reply["id"].as_i64()),
        (Some("subscribed"), Some(1))
    );

    // One compressed message in three frames, a Ping between two of them.
    let batch = json!({"type": "subscribe", "channels": ["b", "c", "d", "e"], "id": 2});
    let packed = common::deflate::deflate(batch.to_string().as_bytes());
    let third = packed.len() / 3;
    ws.send_frame(0x41, &packed[..third]); // RSV1, text, more to come
    ws.send_frame(0x89, b"between");
    ws.send_frame(0x00, &packed[third..2 * third]);
    ws.send_frame(0x80, &packed[2 * third..]);
    let pong = ws.frame().unwrap();
    assert_eq!(
        (pong.first, pong.payload.as_slice()),
        (0x8A, &b"between"[..])
    );
    for channel in ["b", "c", "d", "e"] {
        let reply = ws.recv();
        assert_eq!(reply["channel"], channel, "{reply}");
    }
    // Plain messages still work on a compressing connection.
    ws.send(&json!({"type": "ping", "id": 3}), false);
    assert_eq!(ws.recv()["type"], "pong");

    // A compressed message sent with the request, before the 101, is read first.
    let early = json!({"type": "subscribe", "channel": "f", "id": 4}).to_string();
    let frame = common::deflate::masked(0xC1, &common::deflate::deflate(early.as_bytes()));
    let mut eager = DeflateWs::connect_sending(server.addr, Some(CHROMIUM), &frame);
    assert_eq!(eager.agreed.as_deref(), Some(AGREED));
    assert_eq!(eager.recv()["type"], "connected");
    assert_eq!(eager.recv()["channel"], "f");
    assert_eq!(server.health()["channels"], 6);
}

#[test]
fn a_broken_or_oversized_compressed_message_closes_only_its_connection() {
    let server = TestServer::start_with(|c| c.max_message_size = 16 * 1024);
    let mut bystander = DeflateWs::connect(server.addr, Some(CHROMIUM));
    assert_eq!(bystander.recv()["type"], "connected");

    let mut broken = DeflateWs::connect(server.addr, Some(CHROMIUM));
    assert_eq!(broken.recv()["type"], "connected");
    broken.send_frame(0xC1, &[0xff; 64]);
    assert_eq!(broken.close_code(), 1002, "not a deflate stream");

    // 1 MiB of spaces: 1 KiB compressed, far over 16 KiB inflated.
    let mut bomb = DeflateWs::connect(server.addr, Some(CHROMIUM));
    assert_eq!(bomb.recv()["type"], "connected");
    let spaces = format!("{{\"type\":\"ping\",\"pad\":\"{}\"}}", " ".repeat(1 << 20));
    let packed = common::deflate::deflate(spaces.as_bytes());
    assert!(packed.len() < 16 * 1024, "{}", packed.len());
    bomb.send_frame(0xC1, &packed);
    assert_eq!(bomb.close_code(), 1009);

    // Compressed to just over the limit: refused before it is inflated.
    let mut long = DeflateWs::connect(server.addr, Some(CHROMIUM));
    assert_eq!(long.recv()["type"], "connected");
    long.send_frame(0x41, &[0u8; 16 * 1024]);
    long.send_frame(0x80, &[0u8; 1]);
    assert_eq!(long.close_code(), 1009);

    // A compressed message just under the limit once inflated is fine.
    let fits = format!(
        "{{\"type\":\"ping\",\"id\":1,\"pad\":\"{}\"}}",
        " ".repeat(16 * 1024 - 64)
    );
    bystander.send(&serde_json::from_str(&fits).unwrap(), true);
    assert_eq!(bystander.recv()["type"], "pong");
    assert_eq!(
        server.metric("sidecast_disconnects_total{reason=\"message_too_big\"}"),
        2
    );
}
