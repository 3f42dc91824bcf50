//! Regression tests for issue 9 ("Hold under abuse and at production defaults"), named after
//! its items. Each floods or stalls a real server and measures what it costs, with a tracking
//! allocator that counts the bytes the server's thread holds, not only that it survives.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{PATIENCE, TestServer, Ws};
use serde_json::json;
use sidecast::config::Dashboard;

struct Tracking;

thread_local! {
    static TRACKED: Cell<bool> = const { Cell::new(false) };
}
/// Bytes allocated and not yet freed by the tracked (server) thread.
static LIVE: AtomicI64 = AtomicI64::new(0);
/// The most `LIVE` has been since the last `reset_peak`.
static PEAK: AtomicI64 = AtomicI64::new(0);
/// One tracked server at a time: the counters are global.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn track(delta: i64) {
    if TRACKED.with(Cell::get) {
        let live = LIVE.fetch_add(delta, Ordering::Relaxed) + delta;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; it only counts.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as i64);
        // SAFETY: the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as i64));
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as i64 - layout.size() as i64);
        // SAFETY: the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// A server whose thread's heap is tracked.
fn tracked_server(configure: impl FnOnce(&mut sidecast::Config)) -> TestServer {
    TestServer::start_instrumented(
        |c| {
            c.dashboard = Dashboard::Off; // no stats snapshots in the measurements
            configure(c);
        },
        || TRACKED.with(|t| t.set(true)),
    )
}

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

fn reset_peak() -> i64 {
    let now = live();
    PEAK.store(now, Ordering::Relaxed);
    now
}

fn peak() -> i64 {
    PEAK.load(Ordering::Relaxed)
}

/// A masked client frame with an empty payload (the mask key is all zeros).
fn empty_masked(opcode: u8) -> [u8; 6] {
    [0x80 | opcode, 0x80, 0, 0, 0, 0]
}

/// A masked text frame (mask key zero, so the payload goes as it is).
fn masked_text(text: &str) -> Vec<u8> {
    assert!(text.len() < 126);
    let mut frame = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(text.as_bytes());
    frame
}

/// Writes `bytes` from another thread (the server may stop reading, or close), ignoring
/// errors; returns when everything was written or the connection broke.
fn flood(stream: &TcpStream, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
    let mut stream = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        for chunk in bytes.chunks(64 * 1024) {
            if stream.write_all(chunk).is_err() {
                return;
            }
        }
    })
}

/// Item 1: 400,000 Pings from a client that never reads cost the server one pending Pong,
/// not 400,000 of them; Pings count toward the message rate limit.
#[test]
fn issue_9_item_1_a_ping_flood_holds_one_pong() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = tracked_server(|c| {
        // Isolate the Pong path from the rate limit.
        c.rate_limit = 1e9;
        c.rate_burst = u32::MAX;
    });
    let mut ws = server.ws();
    let before = reset_peak();
    let mut pings = Vec::with_capacity(400_000 * 6);
    for _ in 0..400_000 {
        pings.extend_from_slice(&empty_masked(0x9));
    }
    pings.extend_from_slice(&masked_text(r#"{"type":"subscribe","channel":"done"}"#));
    flood(ws.raw(), pings).join().unwrap();
    server.wait_until("every Ping was read", |s| s.health()["channels"] == 1);
    let grew = peak() - before;
    eprintln!("400,000 Pings: the server's heap peaked {grew} bytes above its start");
    assert!(
        grew < 64 * 1024,
        "the server's heap grew by {grew} bytes under 2.4 MB of Pings"
    );
    drop(ws);

    let limited = tracked_server(|c| {
        c.rate_limit = 10.0;
        c.rate_burst = 10;
        c.rate_limit_strikes = 5;
    });
    let mut ws = limited.ws();
    let pings: Vec<u8> = (0..1000).flat_map(|_| empty_masked(0x9)).collect();
    ws.raw().write_all(&pings).unwrap();
    let close = ws.expect_close();
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1008, "rate limit exceeded")
    );
}

/// Item 2: 400,000 application pings in one burst are closed with 1008 after the rate limit,
/// and parsing stops there: the server reads a bounded amount per pass, and once the
/// connection is gone its heap is back where it was.
#[test]
fn issue_9_item_2_an_app_ping_flood_is_cut_and_leaves_nothing_behind() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = tracked_server(|_| {});
    let mut neighbour = server.ws();
    let before = reset_peak();
    let mut ws = server.ws();
    let ping = masked_text(r#"{"type":"ping"}"#);
    let burst: Vec<u8> = (0..400_000).flat_map(|_| ping.iter().copied()).collect();
    let writer = flood(ws.raw(), burst);
    let close = ws.expect_close();
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1008, "rate limit exceeded")
    );
    drop(ws);
    writer.join().unwrap();
    let grew = peak() - before;
    eprintln!("400,000 app pings: the server's heap peaked {grew} bytes above its start");
    assert!(
        grew < 256 * 1024,
        "the heap grew by {grew} bytes under an 8 MB burst"
    );
    server.wait_until("the flooder's memory is given back", |_| {
        live() - before < 32 * 1024
    });
    neighbour.send(json!({"type": "ping", "id": 1}));
    assert_eq!(neighbour.recv(), json!({"type": "pong", "id": 1}));
}

/// Item 3: the fan-out budget (64k frames a pass) holds within one read of the publish
/// socket: 1300 short lines to 1000 subscribers queue at most a budget's worth of frames
/// before the pass flushes them, not 1.3 million at once.
#[test]
fn issue_9_item_3_one_read_of_many_lines_queues_one_budget_per_pass() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = tracked_server(|c| c.max_connections = 2000);
    // Subscribed, then never read: the kernel takes what each pass flushes.
    let mut subscribers: Vec<Ws> = (0..1000).map(|_| server.ws()).collect();
    for ws in &mut subscribers {
        ws.subscribe("wide");
    }
    let before = reset_peak();
    let lines: String = (0..1300)
        .map(|n| format!("{{\"channel\":\"wide\",\"data\":{n}}}\n"))
        .collect();
    let mut publisher = server.publisher();
    publisher.send_bytes(lines.as_bytes());
    publisher.send(r#"{"id":"last","channel":"wide","data":"last"}"#);
    assert_eq!(publisher.reply()["delivered"], 1000);
    let grew = peak() - before;
    eprintln!("1300 lines to 1000 subscribers: the heap peaked {grew} bytes above its start");
    // 1.3 million queued handles would be over 40 MB.
    assert!(grew < 8 * 1024 * 1024, "the heap grew by {grew} bytes");
}

/// Item 8's price: a quiet channel (never an event) is remembered after its last subscriber
/// left, so its epoch survives a blip; what that costs per channel, and that the
/// `max_quiet_channels` bound holds.
#[test]
fn issue_9_item_8_quiet_channels_cost_little_and_are_bounded() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = tracked_server(|c| {
        c.max_quiet_channels = 2000;
        c.rate_limit = 1e9;
        c.rate_burst = u32::MAX;
    });
    let mut ws = server.ws();
    let before = live();
    for n in 0..3000 {
        ws.send(json!({"type": "subscribe", "channel": format!("order:{n}")}));
        ws.send(json!({"type": "unsubscribe", "channel": format!("order:{n}")}));
        ws.recv();
        ws.recv();
    }
    assert_eq!(
        server.metric("sidecast_channels_known"),
        2000,
        "the bound holds"
    );
    let per_channel = (live() - before) / 2000;
    eprintln!("a quiet channel holds {per_channel} bytes of the server's heap");
    assert!(per_channel < 512, "{per_channel} bytes per quiet channel");
}

/// Item 4: what a stalled reader can pin is bounded in the kernel too (`send_buffer_size`),
/// and a reader that stops for `write_stall_timeout` is cut even while its queue is small.
#[test]
fn issue_9_item_4_a_stalled_reader_pins_little_kernel_memory_and_is_cut_in_time() {
    let server = TestServer::start_with(|c| {
        c.max_output_buffer = 64 * 1024;
        c.send_buffer_size = 16 * 1024;
        c.dashboard = Dashboard::Off;
    });
    let mut stalled = server.ws();
    stalled.subscribe("video");
    // One event per round trip, so every event is flushed before the next: the kernel's
    // buffers fill before the queue does.
    let event = json!({"id": 1, "channel": "video", "data": "x".repeat(1000)}).to_string();
    let mut publisher = server.publisher();
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < PATIENCE, "never cut");
        publisher.send(&event);
        if publisher.reply()["delivered"] == 0 {
            break; // cut
        }
    }
    // Everything written left the queue and sits in the kernel: in the server's send buffer
    // (bounded by `send_buffer_size`, which Linux doubles) or in the client's receive buffer,
    // which is the client's to size.
    let written = server.metric("sidecast_bytes_written_total") as usize;
    let client_side = socket2::SockRef::from(&*stalled.raw())
        .recv_buffer_size()
        .unwrap();
    let server_side = written.saturating_sub(client_side);
    eprintln!("stalled reader: {written} bytes written, {client_side} B client receive buffer");
    assert!(
        server_side <= 2 * 16 * 1024 + 16 * 1024,
        "{server_side} bytes waited in the server's send buffer ({written} written, \
         {client_side} held by the client)"
    );

    let server = TestServer::start_with(|c| {
        c.write_stall_timeout = Duration::from_millis(300);
        c.send_buffer_size = 4096;
        c.dashboard = Dashboard::Off;
    });
    let mut stalled = server.ws();
    stalled.subscribe("slow");
    let mut publisher = server.publisher();
    let started = Instant::now();
    let mut published = 0;
    while server.metric("sidecast_disconnects_total{reason=\"slow_consumer\"}") == 0 {
        assert!(
            started.elapsed() < PATIENCE,
            "a stalled reader was never cut"
        );
        publisher.send(&json!({"channel": "slow", "data": "y".repeat(500)}).to_string());
        published += 560;
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        published < 1024 * 1024 / 2,
        "cut by the time rule, far below max_output_buffer ({published} bytes published)"
    );
}

/// Item 6: a worker pool of 200 processes publishes at once, and an idle publisher costs
/// the server's heap well under a KiB once it has published.
#[test]
fn issue_9_item_6_two_hundred_publishers_at_once_and_what_an_idle_one_costs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = tracked_server(|_| {});
    let mut watcher = server.ws();
    watcher.subscribe("jobs");
    let before = live();
    let mut workers: Vec<_> = (0..200).map(|_| server.publisher()).collect();
    for (n, worker) in workers.iter_mut().enumerate() {
        worker.send(&json!({"id": n, "channel": "jobs", "data": n}).to_string());
    }
    for worker in &mut workers {
        assert_eq!(worker.reply()["ok"], true);
    }
    for _ in 0..200 {
        watcher.recv();
    }
    let per_publisher = (live() - before) / 200;
    eprintln!("an idle publisher holds {per_publisher} bytes of the server's heap");
    assert!(
        per_publisher < 1024,
        "an idle publisher holds {per_publisher} bytes of the server's heap"
    );
}

/// Item 7: a graceful shutdown spreads its 1001s over `shutdown_drain`, so 1000 pages do
/// not all reconnect in the same instant.
#[test]
fn issue_9_item_7_shutdown_spreads_a_thousand_closes_over_the_drain_window() {
    let server = TestServer::start_with(|c| {
        c.shutdown_drain = Duration::from_secs(1);
        c.max_connections = 2000;
        c.dashboard = Dashboard::Off;
    });
    let mut clients: Vec<Ws> = (0..1000).map(|_| server.ws()).collect();
    let streams: Vec<&mut TcpStream> = clients.iter_mut().map(Ws::raw).collect();
    for stream in &streams {
        stream.set_nonblocking(true).unwrap();
    }
    let started = Instant::now();
    server.shutdown();
    let mut closed_at: Vec<Option<Duration>> = vec![None; streams.len()];
    let mut buf = [0u8; 256];
    while closed_at.iter().any(Option::is_none) {
        assert!(
            started.elapsed() < PATIENCE,
            "not every client got its close"
        );
        for (i, stream) in streams.iter().enumerate() {
            if closed_at[i].is_none() {
                let mut reader: &TcpStream = stream;
                match reader.read(&mut buf) {
                    Ok(n) if n >= 4 && buf[0] == 0x88 => {
                        assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), 1001);
                        closed_at[i] = Some(started.elapsed());
                    }
                    Ok(0) => panic!("client {i} was dropped without a close frame"),
                    _ => {}
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut times: Vec<Duration> = closed_at.into_iter().flatten().collect();
    times.sort();
    let spread = times[times.len() - 1] - times[0];
    let median = times[times.len() / 2] - times[0];
    eprintln!(
        "1000 closes: first {:?}, median +{median:?}, last +{spread:?}",
        times[0]
    );
    assert!(
        spread >= Duration::from_millis(700) && median >= Duration::from_millis(300),
        "closes bunched: last +{spread:?}, median +{median:?}"
    );
}

/// Item 10: an error about a request, a rate-limited one included, names its channel and id,
/// so the client can tell which request was dropped and retry it.
#[test]
fn issue_9_item_10_a_rate_limited_request_is_named_in_its_error() {
    let server = TestServer::start_with(|c| {
        c.rate_limit = 1.0;
        c.rate_burst = 1;
        c.rate_limit_strikes = 10;
    });
    let mut ws = server.ws();
    ws.send(json!({"type": "subscribe", "channel": "a", "id": 1}));
    ws.send(json!({"type": "subscribe", "channel": "b", "id": 2}));
    assert_eq!(ws.recv()["type"], "subscribed");
    let error = ws.recv();
    assert_eq!(error["code"], "rate_limited", "{error}");
    assert_eq!(
        (&error["channel"], &error["id"]),
        (&json!("b"), &json!(2)),
        "{error}"
    );
}

/// Issue 12: what an idempotency key costs the server's heap, and that
/// `max_idempotency_keys` bounds them.
#[test]
fn issue_12_idempotency_keys_cost_little_and_are_bounded() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = tracked_server(|c| c.max_idempotency_keys = 2000);
    let mut publisher = server.publisher();
    // Warm up: the engine's channel and the publisher's buffers reach their size.
    publisher.send(r#"{"id":0,"channel":"jobs","data":0}"#);
    publisher.reply();
    let before = live();
    for n in 0..2000 {
        // 36 bytes, the length of a UUID: a typical CloudEvent id or job key.
        let key = format!("{n:036}");
        publisher.send(&json!({"id": n, "channel": "jobs", "idem": key, "data": n}).to_string());
        assert_eq!(publisher.reply()["ok"], true);
    }
    let per_key = (live() - before) / 2000;
    eprintln!("an idempotency key of 36 bytes holds {per_key} bytes of the server's heap");
    assert!(per_key < 512, "{per_key} bytes per key");
    for n in 2000..3000 {
        let key = format!("{n:036}");
        publisher.send(&json!({"id": n, "channel": "jobs", "idem": key, "data": n}).to_string());
        publisher.reply();
    }
    assert_eq!(
        server.metric("sidecast_idempotency_keys"),
        2000,
        "the bound holds"
    );
}

/// Issue 12: an HTTP publisher that posted a large body gives the capacity back: idle, it
/// holds a few KiB (its read buffer keeps up to 4 KiB, as an NDJSON publisher's does).
#[test]
fn issue_12_an_idle_http_publisher_after_a_large_body_holds_little() {
    use std::io::{BufRead, BufReader, Read, Write};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // No history, which would rightly keep the 512 KiB event.
    let server = tracked_server(|c| c.history_size = 0);
    // The first publish pays once for the channel and the publisher slab: not this test's.
    server.publish(json!({"id": 0, "channel": "big", "data": 0}));
    let before = live();
    let stream = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let body = format!(r#"{{"channel":"big","data":"{}"}}"#, "x".repeat(512 * 1024));
    let request = format!(
        "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    reader.get_mut().write_all(request.as_bytes()).unwrap();
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if let Some(n) = line.strip_prefix("Content-Length: ") {
            length = n.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut reply = vec![0; length];
    reader.read_exact(&mut reply).unwrap();
    // The next request on the same connection is what makes the server shrink its buffers.
    reader
        .get_mut()
        .write_all(b"GET /dapr/subscribe HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    server.wait_until("the server gave the body's memory back", |_| {
        live() - before < 8 * 1024
    });
    eprintln!(
        "an idle HTTP publisher after a 512 KiB body holds {} bytes of the server's heap",
        live() - before
    );
}

/// Issue 23: a deflate bomb (64 KiB compressed, 64 MiB inflated) is closed with 1009 and the
/// server's heap does not move: the inflated message is capped at `max_message_size`.
#[test]
fn issue_23_a_deflate_bomb_is_closed_with_1009_and_the_heap_stays_flat() {
    use common::deflate::{DeflateWs, deflate};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = tracked_server(|_| {});
    let offer = Some("permessage-deflate; client_max_window_bits");
    let mut bombs: Vec<DeflateWs> = (0..4)
        .map(|_| DeflateWs::connect(server.addr, offer))
        .collect();
    for bomb in &mut bombs {
        assert_eq!(bomb.recv()["type"], "connected");
    }
    let zeros = deflate(&vec![0u8; 64 << 20]);
    let payload = &zeros[..zeros.len().min(64 * 1024 - 16)];
    eprintln!(
        "the bomb: {} B compressed, about 64 MiB inflated",
        payload.len()
    );
    let before = reset_peak();
    for bomb in &mut bombs {
        bomb.send_frame(0xC2, payload);
    }
    for bomb in &mut bombs {
        assert_eq!(bomb.close_code(), 1009);
    }
    let grew = peak() - before;
    eprintln!("4 deflate bombs: the server's heap peaked {grew} bytes above its start");
    assert!(grew < 1 << 20, "the heap grew by {grew} bytes");
}

/// Issue 19: 1,000,000 acknowledged publishes to pages that read every event and never ack.
/// Each page holds at most `max_unacked_per_connection` of them; past that it counts as timed
/// out at once, so every publish gets its report and the server's heap stays flat.
#[test]
fn issue_19_a_million_unanswered_acks_leave_the_heap_flat() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = tracked_server(|c| c.heartbeat_timeout = Duration::from_secs(600));
    // Pages that read every event and never ack, each counting the events it read.
    let counts: Vec<_> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let readers: Vec<_> = counts
        .iter()
        .map(|count| {
            let mut ws = server.ws();
            ws.subscribe("job:1");
            ws.0.get_mut().set_read_timeout(None).unwrap();
            let count = Arc::clone(count);
            std::thread::spawn(move || {
                while let Ok(message) = ws.0.read() {
                    if message.is_text() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let slowest = || {
        counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap()
    };
    // A million in release builds (CI's `cargo test --release`), a tenth in debug ones.
    let total: u64 = if cfg!(debug_assertions) {
        100_000
    } else {
        1_000_000
    };
    let socket = UnixStream::connect(&server.socket).unwrap();
    let mut writer = socket.try_clone().unwrap();
    let mut lines = BufReader::new(socket).lines();
    let (mut replies, mut reports, mut unanswered) = (0, 0, 0);
    let mut read_line = |replies: &mut u64, reports: &mut u64| {
        let line = lines.next().expect("a line").unwrap();
        if !line.contains("ack_report") {
            assert!(line.contains("\"ok\":true"), "{line}");
            *replies += 1;
            return;
        }
        *reports += 1;
        let report: serde_json::Value = serde_json::from_str(&line).unwrap();
        let n = |k: &str| report[k].as_u64().unwrap();
        assert_eq!(n("delivered"), 3, "{line}");
        assert_eq!(n("acked") + n("timedOut") + n("disconnected"), 3, "{line}");
        unanswered += n("timedOut");
    };
    // A warm-up, then two halves, in windows of 1000 (the reports come as they come). After
    // each, once every report is in, the live heap is measured: nothing is pending then, so
    // what a half leaves behind is what its acks cost for good.
    let mut batch = String::new();
    let mut sent = 0;
    let mut quiet = Vec::new();
    let mut peak_after_warm_up = 0;
    for end in [total / 20, total / 2, total] {
        while sent < end {
            batch.clear();
            for id in sent + 1..=sent + 1000 {
                batch.push_str(&format!(
                    "{{\"id\":{id},\"channel\":\"job:1\",\"data\":{id},\"ack\":{{\"timeout\":\"100ms\"}}}}\n"
                ));
            }
            writer.write_all(batch.as_bytes()).unwrap();
            sent += 1000;
            while replies < sent {
                read_line(&mut replies, &mut reports);
            }
            // The next window once every page has read this one's events: their queues
            // stay small, so none is closed as a slow consumer.
            while slowest() < sent {
                std::thread::yield_now();
            }
        }
        while reports < sent {
            read_line(&mut replies, &mut reports);
        }
        if quiet.is_empty() {
            reset_peak();
        } else {
            peak_after_warm_up = peak_after_warm_up.max(peak());
        }
        quiet.push(live());
    }
    let grew = peak_after_warm_up - quiet[0];
    let second_half = quiet[2] - quiet[1];
    eprintln!(
        "{total} acknowledged publishes, never acked: {unanswered} page-events timed out; \
         the server's heap peaked {grew} bytes above where it was after the warm-up (the \
         pending acks at their most) and kept {second_half} bytes more after the second half \
         than after the first"
    );
    assert_eq!(unanswered, 3 * total);
    assert!(grew < 2 << 20, "the heap grew by {grew} bytes");
    assert!(
        second_half < 16 * 1024,
        "the heap kept growing: {second_half} bytes"
    );
    drop(server);
    for reader in readers {
        reader.join().unwrap();
    }
}
