//! `sidecast bench soak`: a long run of everything at once, to show that memory stays flat and
//! that well-behaved clients lose nothing while others misbehave.
//!
//! Roles, each on its own threads (blocking tungstenite clients; the soak measures the
//! server, not the generator's speed):
//! - a **publisher**, once every steady subscriber is subscribed, publishes `rate` events per
//!   second round robin over `channels` channels, each confirmed, and remembers the last seq
//!   of every channel;
//! - an **ack publisher** publishes two events a second with `ack` (1 s) beside it and checks
//!   that each gets one report whose counts add up; the steady subscribers ack every such
//!   event, the others never do;
//! - **steady** subscribers each hold one channel and check every event's seq: a skipped seq
//!   is lost, a repeated one duplicated. After a disconnect they resubscribe with `since`; a
//!   resume the server answers with `recovered:false` is a *reported* gap (a restart makes
//!   them), never counted as loss;
//! - **churners** connect, resume a random channel from where they last were, read for a
//!   moment and vanish without a close handshake;
//! - **stalled** readers subscribe to every channel and never read, until the server cuts them
//!   (`max_output_buffer` or `write_stall_timeout`); then they come back;
//! - one **flooder** sends application pings as fast as it can, is closed (1008), comes back;
//! - with a restart hook (`--spawn`), the server is restarted half way through.
//!
//! Every few seconds the server's RSS and open descriptors are sampled. At the end the
//! steady subscribers wait for the last event of their channel, so losses at the tail count
//! too, and the close reasons come from the server's `/metrics`. Every thread stops by itself
//! when the run ends.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

use crate::Publisher;

/// How often the server's RSS and descriptors are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How long the steady subscribers may take to receive the last events at the end.
const TAIL_DEADLINE: Duration = Duration::from_secs(10);
/// A blocking read returns after this, so every thread notices the end of the run.
const READ_TIMEOUT: Duration = Duration::from_millis(200);

/// What the soak runs.
#[derive(Clone, Debug)]
pub struct SoakPlan {
    /// How long it lasts.
    pub duration: Duration,
    /// Channels published to.
    pub channels: usize,
    /// Well-behaved subscribers, spread over the channels.
    pub steady: usize,
    /// Clients that connect, resume, read a little and vanish, over and over.
    pub churners: usize,
    /// Clients that subscribe to every channel and never read.
    pub stalled: usize,
    /// Publishes per second.
    pub rate: u64,
    /// Bytes of padding in each event.
    pub padding: usize,
}

impl Default for SoakPlan {
    fn default() -> SoakPlan {
        SoakPlan {
            duration: Duration::from_secs(600),
            channels: 50,
            steady: 200,
            churners: 20,
            stalled: 5,
            rate: 200,
            padding: 1000,
        }
    }
}

/// One sample of the server's footprint.
#[derive(Debug, Serialize)]
pub struct Sample {
    /// Seconds since the start of the run.
    pub at_secs: f64,
    /// Resident memory, in KiB.
    pub rss_kib: Option<u64>,
    /// Open file descriptors.
    pub fds: Option<usize>,
}

/// What the soak saw.
#[derive(Debug, Default, Serialize)]
pub struct SoakReport {
    /// The server's footprint over time.
    pub samples: Vec<Sample>,
    /// Events the server confirmed.
    pub published: u64,
    /// Events the steady subscribers received.
    pub steady_received: u64,
    /// Events a steady subscriber never received although no gap was reported.
    pub lost: u64,
    /// Events a steady subscriber received twice.
    pub duplicated: u64,
    /// Resumes answered `recovered:true`, by steady subscribers and churners.
    pub resumes_recovered: u64,
    /// Resumes answered `recovered:false` (a gap the page is told of).
    pub resumes_not_recovered: u64,
    /// Connect, resume, vanish cycles the churners completed.
    pub churn_cycles: u64,
    /// Times a stalled reader or the flooder was connected.
    pub misbehaving_connections: u64,
    /// Server restarts in the middle of the run.
    pub restarts: u64,
    /// Acknowledged publishes that got their report.
    pub ack_reports: u64,
    /// Deliveries those reports counted as acked, timed out, disconnected.
    pub acked: u64,
    /// See `acked`.
    pub ack_timed_out: u64,
    /// See `acked`.
    pub ack_disconnected: u64,
    /// Reports whose counts did not add up to `delivered` (must be 0).
    pub ack_reports_wrong: u64,
    /// WebSocket closes by reason, as the server counted them (summed over restarts).
    pub disconnects: BTreeMap<String, u64>,
}

/// Restarts the server and returns its new pid.
pub type RestartHook<'a> = &'a mut dyn FnMut() -> io::Result<Option<u32>>;

#[derive(Default)]
struct Counters {
    steady_received: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    recovered: AtomicU64,
    not_recovered: AtomicU64,
    churn_cycles: AtomicU64,
    misbehaving: AtomicU64,
}

/// What the ack publisher's reports said.
#[derive(Default)]
struct AckCounts {
    reports: u64,
    acked: u64,
    timed_out: u64,
    disconnected: u64,
    wrong: u64,
}

struct Shared {
    addr: SocketAddr,
    plan: SoakPlan,
    counters: Counters,
    /// Set when the publisher has stopped: steady subscribers then wait for the last seqs.
    publishing_done: AtomicBool,
    /// Set when every thread should stop.
    stop: AtomicBool,
    /// Steady subscribers subscribed for the first time: publishing starts once all are, so
    /// each of them sees every event.
    steady_ready: AtomicU64,
    /// The last confirmed seq of each channel.
    last_seq: Mutex<Vec<u64>>,
}

fn channel_name(channel: usize) -> String {
    format!("soak:{channel}")
}

/// Runs the soak against the server at `addr` with publish socket `socket`.
///
/// # Errors
/// The publish socket cannot be reached at the start.
pub fn run(
    plan: &SoakPlan,
    addr: SocketAddr,
    socket: PathBuf,
    mut pid: Option<u32>,
    mut restart: Option<RestartHook<'_>>,
    progress: bool,
) -> io::Result<SoakReport> {
    Publisher::connect(&socket)?;
    let shared = Arc::new(Shared {
        addr,
        plan: plan.clone(),
        counters: Counters::default(),
        publishing_done: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        steady_ready: AtomicU64::new(0),
        last_seq: Mutex::new(vec![0; plan.channels]),
    });
    let mut threads = Vec::new();
    for i in 0..plan.steady {
        let shared = Arc::clone(&shared);
        threads.push(std::thread::spawn(move || {
            steady(&shared, i % shared.plan.channels)
        }));
    }
    for i in 0..plan.churners {
        let shared = Arc::clone(&shared);
        threads.push(std::thread::spawn(move || churner(&shared, i as u64)));
    }
    for _ in 0..plan.stalled {
        let shared = Arc::clone(&shared);
        threads.push(std::thread::spawn(move || stalled(&shared)));
    }
    let flood = Arc::clone(&shared);
    threads.push(std::thread::spawn(move || flooder(&flood)));
    let ack_publisher = {
        let shared = Arc::clone(&shared);
        let socket = socket.clone();
        std::thread::spawn(move || publish_acked(&shared, &socket))
    };
    let publisher = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || publish(&shared, &socket))
    };

    let mut report = SoakReport::default();
    let started = Instant::now();
    let mut restarted = restart.is_none();
    while started.elapsed() < plan.duration {
        let (rss_kib, fds) = super::probe::footprint(pid);
        report.samples.push(Sample {
            at_secs: started.elapsed().as_secs_f64(),
            rss_kib,
            fds,
        });
        if progress {
            eprintln!(
                "soak {:>5.0} s: server RSS {} KiB, {} fds, {} events received, {} lost",
                started.elapsed().as_secs_f64(),
                rss_kib.map_or("?".into(), |r| r.to_string()),
                fds.map_or("?".into(), |f| f.to_string()),
                shared.counters.steady_received.load(Ordering::Relaxed),
                shared.counters.lost.load(Ordering::Relaxed),
            );
        }
        if !restarted && started.elapsed() >= plan.duration / 2 {
            restarted = true;
            super::probe::add_disconnects(&mut report.disconnects, addr);
            if let Some(restart) = restart.as_mut() {
                pid = restart()?;
                report.restarts += 1;
            }
        }
        std::thread::sleep(SAMPLE_EVERY.min(plan.duration.saturating_sub(started.elapsed())));
    }
    shared.publishing_done.store(true, Ordering::Relaxed);
    report.published = publisher.join().unwrap_or(0);
    let acks = ack_publisher.join().unwrap_or_default();
    report.published += acks.reports;
    report.ack_reports = acks.reports;
    report.acked = acks.acked;
    report.ack_timed_out = acks.timed_out;
    report.ack_disconnected = acks.disconnected;
    report.ack_reports_wrong = acks.wrong;
    // The steady subscribers catch up with the last seqs (or give up at TAIL_DEADLINE).
    std::thread::sleep(READ_TIMEOUT);
    let tail = Instant::now();
    shared.stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
    let (rss_kib, fds) = super::probe::footprint(pid);
    report.samples.push(Sample {
        at_secs: started.elapsed().as_secs_f64(),
        rss_kib,
        fds,
    });
    log::debug!("soak tail took {:?}", tail.elapsed());
    super::probe::add_disconnects(&mut report.disconnects, addr);
    let c = &shared.counters;
    report.steady_received = c.steady_received.load(Ordering::Relaxed);
    report.lost = c.lost.load(Ordering::Relaxed);
    report.duplicated = c.duplicated.load(Ordering::Relaxed);
    report.resumes_recovered = c.recovered.load(Ordering::Relaxed);
    report.resumes_not_recovered = c.not_recovered.load(Ordering::Relaxed);
    report.churn_cycles = c.churn_cycles.load(Ordering::Relaxed);
    report.misbehaving_connections = c.misbehaving.load(Ordering::Relaxed);
    Ok(report)
}

impl SoakReport {
    /// Human-readable summary.
    pub fn render(&self) -> String {
        let rss: Vec<u64> = self.samples.iter().filter_map(|s| s.rss_kib).collect();
        let fds: Vec<usize> = self.samples.iter().filter_map(|s| s.fds).collect();
        let range = |v: &[u64]| match (v.iter().min(), v.iter().max(), v.last()) {
            (Some(min), Some(max), Some(last)) => format!("min {min}, max {max}, last {last}"),
            _ => "unknown".into(),
        };
        let fds: Vec<u64> = fds.into_iter().map(|f| f as u64).collect();
        let mut out = format!(
            "soak: {} events published, {} received by steady subscribers\n  \
             lost {}  duplicated {}  (must both be 0)\n  \
             resumes: {} recovered, {} reported as a gap\n  \
             churn cycles {}, stalled/flooding connections {}, restarts {}\n  \
             acknowledged publishes: {} reports, {} deliveries acked, {} timed out, {} \
             disconnected; {} reports not adding up (must be 0)\n  \
             server RSS KiB: {}\n  server fds: {}\n  closes by reason:",
            self.published,
            self.steady_received,
            self.lost,
            self.duplicated,
            self.resumes_recovered,
            self.resumes_not_recovered,
            self.churn_cycles,
            self.misbehaving_connections,
            self.restarts,
            self.ack_reports,
            self.acked,
            self.ack_timed_out,
            self.ack_disconnected,
            self.ack_reports_wrong,
            range(&rss),
            range(&fds),
        );
        for (reason, count) in self.disconnects.iter().filter(|(_, n)| **n > 0) {
            out += &format!(" {reason} {count},");
        }
        out.pop();
        out.push('\n');
        out
    }
}

/// Publishes two acknowledged events a second, round robin, until the run ends (a restart
/// breaks the connection: the report of the publish under way is lost with it, and the next
/// one goes to the restarted server); returns what their reports said.
fn publish_acked(shared: &Shared, socket: &PathBuf) -> AckCounts {
    let plan = &shared.plan;
    let mut counts = AckCounts::default();
    let mut publisher = None;
    let mut n = 0u64;
    while !shared.publishing_done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(500));
        let Some(p) = publisher.as_mut() else {
            publisher = Publisher::connect(socket).ok();
            continue;
        };
        let channel = (n % plan.channels as u64) as usize;
        let data = json!({ "acked": n });
        match p.publish_acked(&channel_name(channel), &data, Duration::from_secs(1)) {
            Ok(report) => {
                n += 1;
                let mut last = shared.last_seq.lock().expect("not poisoned");
                last[channel] = last[channel].max(report.seq);
                counts.reports += 1;
                counts.acked += report.acked as u64;
                counts.timed_out += report.timed_out as u64;
                counts.disconnected += report.disconnected as u64;
                let sum = report.acked + report.timed_out + report.disconnected;
                counts.wrong += u64::from(sum != report.delivered);
            }
            Err(_) => publisher = None,
        }
    }
    counts
}

/// Publishes round robin until the run ends; returns how many the server confirmed.
fn publish(shared: &Shared, socket: &PathBuf) -> u64 {
    let plan = &shared.plan;
    let padding = "x".repeat(plan.padding);
    let interval = Duration::from_secs_f64(1.0 / plan.rate.max(1) as f64);
    let mut publisher = None;
    let mut confirmed = 0;
    let ready_by = Instant::now() + Duration::from_secs(30);
    while shared.steady_ready.load(Ordering::Relaxed) < plan.steady as u64
        && Instant::now() < ready_by
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut next = Instant::now();
    let mut n = 0u64;
    while !shared.publishing_done.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        next += interval;
        let channel = (n % plan.channels as u64) as usize;
        let Some(p) = publisher.as_mut() else {
            publisher = Publisher::connect(socket).ok();
            if publisher.is_none() {
                std::thread::sleep(Duration::from_millis(100)); // restarting
                next = Instant::now();
            }
            continue;
        };
        match p.publish_confirmed(&channel_name(channel), &json!({ "n": n, "pad": padding })) {
            Ok(ack) => {
                confirmed += 1;
                n += 1;
                shared.last_seq.lock().expect("not poisoned")[channel] = ack.seq;
            }
            Err(_) => publisher = None,
        }
    }
    confirmed
}

/// A blocking client that has read `connected`.
fn connect(addr: SocketAddr) -> Option<WebSocket<TcpStream>> {
    let stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(READ_TIMEOUT)).ok()?;
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/ws"), stream).ok()?;
    loop {
        match read_json(&mut ws) {
            Ok(Some(v)) if v["type"] == "connected" => return Some(ws),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// The next JSON message; `None` when the read timed out.
fn read_json(ws: &mut WebSocket<TcpStream>) -> Result<Option<Value>, tungstenite::Error> {
    match ws.read() {
        Ok(Message::Text(text)) => Ok(serde_json::from_str(&text).ok()),
        Ok(_) => Ok(None),
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Where a client is on one channel: the last seq it received and its epoch.
#[derive(Clone, Default)]
struct Position {
    seq: u64,
    epoch: Option<String>,
}

/// Subscribes (resuming from `at` when it has an epoch) and returns the new position.
fn subscribe(
    ws: &mut WebSocket<TcpStream>,
    channel: usize,
    at: &Position,
    counters: &Counters,
) -> Option<Position> {
    let mut request = json!({"type": "subscribe", "channel": channel_name(channel)});
    if let Some(epoch) = &at.epoch {
        request["since"] = json!({"seq": at.seq, "epoch": epoch});
    }
    ws.send(Message::text(request.to_string())).ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Some(reply) = read_json(ws).ok()? else {
            continue;
        };
        if reply["type"] != "subscribed" {
            continue;
        }
        let epoch = reply["epoch"].as_str().map(str::to_string);
        return Some(match reply["recovered"].as_bool() {
            Some(true) => {
                counters.recovered.fetch_add(1, Ordering::Relaxed);
                Position { seq: at.seq, epoch }
            }
            // A gap the server reports (or a first subscribe): carry on from now.
            recovered => {
                if recovered == Some(false) {
                    counters.not_recovered.fetch_add(1, Ordering::Relaxed);
                }
                Position {
                    seq: reply["seq"].as_u64().unwrap_or(0),
                    epoch,
                }
            }
        });
    }
    None
}

/// Checks one event's seq against the position: a skipped seq is lost, a repeated one
/// duplicated.
fn on_event(event: &Value, at: &mut Position, counters: &Counters) {
    let Some(seq) = event["seq"].as_u64() else {
        return;
    };
    if seq <= at.seq {
        counters.duplicated.fetch_add(1, Ordering::Relaxed);
        return;
    }
    counters.lost.fetch_add(seq - at.seq - 1, Ordering::Relaxed);
    at.seq = seq;
}

fn steady(shared: &Shared, channel: usize) {
    let counters = &shared.counters;
    let mut at = Position::default();
    let mut tail_deadline = None;
    loop {
        if tail_done(shared, channel, &at, &mut tail_deadline) {
            return;
        }
        let Some(mut ws) = connect(shared.addr) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let Some(now_at) = subscribe(&mut ws, channel, &at, counters) else {
            continue;
        };
        if at.epoch.is_none() {
            shared.steady_ready.fetch_add(1, Ordering::Relaxed);
        }
        at = now_at;
        while !tail_done(shared, channel, &at, &mut tail_deadline) {
            match read_json(&mut ws) {
                Ok(Some(event)) if event["type"] == "event" => {
                    counters.steady_received.fetch_add(1, Ordering::Relaxed);
                    on_event(&event, &mut at, counters);
                    if event["ack"] == true {
                        let ack = json!({"type": "ack", "channel": event["channel"], "seq": event["seq"]});
                        let _ = ws.send(Message::text(ack.to_string()));
                    }
                }
                Ok(_) => {}
                Err(_) => break, // the server went away: resume on the next connection
            }
        }
        if tail_deadline.is_some_and(|d| Instant::now() > d) {
            return;
        }
    }
}

/// Once publishing is over: true when the subscriber has the channel's last event, or the
/// tail deadline has passed (what it still misses is then lost).
fn tail_done(
    shared: &Shared,
    channel: usize,
    at: &Position,
    deadline: &mut Option<Instant>,
) -> bool {
    if !shared.publishing_done.load(Ordering::Relaxed) {
        return false;
    }
    let deadline = *deadline.get_or_insert_with(|| Instant::now() + TAIL_DEADLINE);
    let last = shared.last_seq.lock().expect("not poisoned")[channel];
    let done = at.seq >= last || Instant::now() > deadline;
    if done {
        let missing = last.saturating_sub(at.seq);
        shared.counters.lost.fetch_add(missing, Ordering::Relaxed);
    }
    done
}

fn churner(shared: &Shared, seed: u64) {
    let mut positions: HashMap<usize, Position> = HashMap::new();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut random = move |below: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below.max(1)
    };
    while !shared.stop.load(Ordering::Relaxed) && !shared.publishing_done.load(Ordering::Relaxed) {
        let channel = random(shared.plan.channels as u64) as usize;
        let Some(mut ws) = connect(shared.addr) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let at = positions.entry(channel).or_default();
        // Churners' own order is checked by the steady subscribers' rules, but not counted:
        // a churner vanishes mid-frame by design.
        let scratch = Counters::default();
        let Some(new_at) = subscribe(&mut ws, channel, at, &shared.counters) else {
            continue;
        };
        *at = new_at;
        let until = Instant::now() + Duration::from_millis(50 + random(450));
        while Instant::now() < until {
            match read_json(&mut ws) {
                Ok(Some(event)) if event["type"] == "event" => on_event(&event, at, &scratch),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        // Vanish without a close handshake, as a phone going into a tunnel does.
        drop(ws);
        shared.counters.churn_cycles.fetch_add(1, Ordering::Relaxed);
    }
}

fn stalled(shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) && !shared.publishing_done.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(shared.addr) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let mut request = b"GET /ws HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
            Sec-WebSocket-Key: c2lkZWNhc3Qtc29hay0xMg==\r\n\r\n"
            .to_vec();
        for channel in 0..shared.plan.channels {
            let subscribe = json!({"type": "subscribe", "channel": channel_name(channel)});
            request.extend_from_slice(&masked_text(&subscribe.to_string()));
        }
        if stream.write_all(&request).is_err() {
            continue;
        }
        shared.counters.misbehaving.fetch_add(1, Ordering::Relaxed);
        // Never read: the server must cut it. Give it 30 s, then come back.
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until && !shared.publishing_done.load(Ordering::Relaxed) {
            std::thread::sleep(READ_TIMEOUT);
        }
    }
}

fn flooder(shared: &Shared) {
    let ping = masked_text(r#"{"type":"ping"}"#);
    let burst: Vec<u8> = std::iter::repeat_n(&ping[..], 4096)
        .flatten()
        .copied()
        .collect();
    while !shared.stop.load(Ordering::Relaxed) && !shared.publishing_done.load(Ordering::Relaxed) {
        let Some(mut ws) = connect(shared.addr) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        shared.counters.misbehaving.fetch_add(1, Ordering::Relaxed);
        let stream = ws.get_mut();
        while stream.write_all(&burst).is_ok() && !shared.stop.load(Ordering::Relaxed) {
            let mut sink = [0u8; 4096];
            if matches!(stream.read(&mut sink), Ok(0)) {
                break; // closed by the server
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A masked text frame with a zero mask key (the payload goes as it is). Up to 64 KiB.
fn masked_text(text: &str) -> Vec<u8> {
    let mut frame = vec![0x81];
    match text.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(text.as_bytes());
    frame
}
