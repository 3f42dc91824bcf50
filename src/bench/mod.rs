//! `sidecast bench`: a single-threaded mio load generator to point at a running sidecast.
//!
//! It opens N WebSocket clients ([`conn`]), subscribes each to one of C channels
//! (`bench:0` … `bench:C-1`, round robin), then publishes timestamped events through the
//! publish socket at a fixed rate per step, round robin over the channels. Each delivery's
//! publish→receive latency goes into an HDR histogram; gaps and repeats in each client's
//! sequence numbers count as lost and duplicated events. With the server's pid it also samples
//! the server's CPU time and RSS from `/proc`.
//!
//! Invariants: every run is bounded (connect phase, steps and the final drain all have
//! deadlines); receiving a plain event allocates nothing (a compressed one: once per distinct
//! event, see [`conn::Inflate`]); the generator measures its own CPU and
//! flags a step in which it saturated its core, since its figures are then a floor for the
//! generator, not the server.

pub mod conn;
pub mod presence;
mod probe;
pub mod report;
pub mod soak;
pub mod spawn;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::{TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

pub use conn::Transport;
use conn::{BenchConn, ConnFailure, Inflate, Seen};
pub use report::{AckFigures, Percentiles, Report, StepReport};

/// Connection attempts in flight at once, so the server's accept backlog never overflows
/// (an overflow costs a 1 s SYN retry and would distort handshakes/s).
const CONNECT_WINDOW: usize = 256;
/// How long the connect phase and the final drain may take at most.
const CONNECT_DEADLINE: Duration = Duration::from_secs(60);
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// A step fails when its p99 reaches this.
const P99_LIMIT_US: u64 = 100_000;
/// A step in which the generator used more of its core than this is flagged as saturated.
const SATURATED: f64 = 0.9;
const PUBLISHER: Token = Token(usize::MAX);

/// A named scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// 1000 subscribers on one channel, 200 publishes/s for 10 s.
    Latency,
    /// 1000 subscribers on one channel; publish rate steps up until p99 ≥ 100 ms or loss.
    Throughput,
    /// 5000 connections each on its own channel, 2000 publishes/s round robin for 10 s.
    Channels,
    /// 9000 subscribed connections (over 900 channels) held 5 s without events: memory,
    /// handshakes and idle CPU.
    Idle,
    /// `latency`, each event published with `ack` (5 s) and acked by every subscriber: the
    /// time from publish to the worker's report, and what acks cost the server.
    Ack,
    /// 10 minutes (`--duration`) of 200 steady subscribers over 50 channels at 200
    /// publishes/s, while others churn, stall and flood, and the server restarts half way
    /// (with `--spawn`): memory over time, loss among the steady ones (see [`soak`]).
    Soak,
    /// 5000 pages joining one presence channel at once (over two nodes with
    /// `--cross-node`): the time until every page lists everyone, the presence messages, and
    /// the server CPU (see [`presence`]).
    Presence,
}

/// One rate step.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Step {
    /// Publishes per second; 0 holds the connections open without publishing.
    pub rate: u64,
    /// How long the step lasts.
    #[serde(serialize_with = "as_secs")]
    pub duration: Duration,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The preset it came from.
    pub preset: Preset,
    /// WebSocket clients.
    pub connections: usize,
    /// Channels they are spread over.
    pub channels: usize,
    /// Rate steps, run in order.
    pub steps: Vec<Step>,
    /// Stop at the first step whose p99 reaches 100 ms or that loses events.
    pub stop_on_failure: bool,
    /// Padding bytes in each event's data, to size the frames ([`EventShape::Padded`]).
    pub padding: usize,
    /// What each event's data looks like.
    pub event: EventShape,
    /// How the clients receive.
    pub transport: Transport,
    /// The WebSocket clients offer permessage-deflate, as browsers do, and need it agreed.
    pub deflate: bool,
    /// Publish with `ack` and this timeout; the clients ack every event.
    pub ack: Option<Duration>,
}

/// The ack timeout of the `ack` preset.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// What each published event's data looks like. Every shape starts with the publish
/// timestamp `t`, and the rest varies from event to event as a worker's would.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventShape {
    /// `{"t":…,"pad":"xxx…"}`: `padding` bytes of one letter (compresses without limit).
    Padded,
    /// A render job's progress update: a frame of about 190 bytes.
    Progress,
    /// The task app's `task_update` (a task with its subtasks): a frame of about 1.4 KB.
    Task,
}

impl EventShape {
    /// Writes the `n`th event's data, published at `t` (microseconds since the bench began).
    pub fn write(self, out: &mut Vec<u8>, t: u64, n: u64, padding: &str) {
        let percent = n % 1000;
        let result = match self {
            EventShape::Padded => write!(out, r#"{{"t":{t},"pad":"{padding}"}}"#),
            EventShape::Progress => write!(
                out,
                r#"{{"t":{t},"job":"render-8f3a2c","stage":"encoding","percent":{}.{},"frame":{},"frames":3000,"eta":{},"message":"Encoding frame {} of 3000"}}"#,
                percent / 10,
                percent % 10,
                percent * 3,
                1000 - percent,
                percent * 3,
            ),
            EventShape::Task => write!(
                out,
                r#"{{"t":{t},"type":"task_update","event":"updated","task":{{"id":"7b0e4c1e-3f9a-4d52-9c61-{n:012}","user_id":"d2f1a7c3-58b4-4e0f-a9d6-2c7e81b3f540","title":"Prepare the quarterly render of the product launch video","description":"Export the 4K master, then the 1080p and 720p proxies; attach the captions file and notify the review channel when the proxies are uploaded.","status":"in_progress","priority":"high","tags":["video","launch","render","q4"],"due_date":"2026-12-18T17:00:00Z","created_at":"2026-12-01T09:12:44.120Z","updated_at":"2026-12-07T10:{:02}:{:02}.{:03}Z","completed":false,"recurring":null,"reminder_at":"2026-12-18T09:00:00Z","subtasks":[{{"id":"s1","title":"Export 4K master","completed":true}},{{"id":"s2","title":"Export 1080p proxy","completed":true}},{{"id":"s3","title":"Export 720p proxy","completed":false}},{{"id":"s4","title":"Upload captions","completed":false}}],"assignee":{{"id":"u-1842","name":"Dana Whitfield","email":"dana@example.com"}},"comments_count":{},"attachments":[{{"name":"launch-master-4k.mov","size":18442119882,"type":"video/quicktime"}},{{"name":"captions-en.vtt","size":18211,"type":"text/vtt"}}]}}}}"#,
                n / 60 % 60,
                n % 60,
                t % 1000,
                n % 40,
            ),
        };
        result.expect("writing to a Vec cannot fail");
    }
}

impl Plan {
    /// The preset's plan.
    pub fn preset(preset: Preset) -> Plan {
        let steady = |rate| {
            vec![Step {
                rate,
                duration: Duration::from_secs(10),
            }]
        };
        let (connections, channels, steps, stop_on_failure) = match preset {
            Preset::Latency | Preset::Ack => (1000, 1, steady(200), false),
            Preset::Throughput => {
                let rates = [
                    250, 500, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 6000, 8000, 10000, 12000,
                    14000, 16000,
                ];
                let steps = rates.iter().map(|&rate| Step {
                    rate,
                    duration: Duration::from_secs(5),
                });
                (1000, 1, steps.collect(), true)
            }
            Preset::Channels => (5000, 5000, steady(2000), false),
            Preset::Presence => (5000, 1, steady(0), false),
            Preset::Soak => (
                200,
                50,
                vec![Step {
                    rate: 200,
                    duration: Duration::from_secs(600),
                }],
                false,
            ),
            Preset::Idle => (
                9000,
                900,
                vec![Step {
                    rate: 0,
                    duration: Duration::from_secs(5),
                }],
                false,
            ),
        };
        Plan {
            preset,
            connections,
            channels,
            steps,
            stop_on_failure,
            padding: 160,
            event: EventShape::Padded,
            transport: Transport::WebSocket,
            deflate: false,
            ack: (preset == Preset::Ack).then_some(ACK_TIMEOUT),
        }
    }
}

/// Where the server is.
#[derive(Clone, Debug)]
pub struct Target {
    /// The WebSocket address (host:port of `ws://host:port/ws`).
    pub addr: SocketAddr,
    /// The publish socket.
    pub socket: PathBuf,
    /// The server's pid, for CPU and memory figures.
    pub pid: Option<u32>,
}

/// The socket address of a `ws://host:port/path` URL.
///
/// # Errors
/// The URL is not `ws://` or its host does not resolve.
pub fn resolve_url(url: &str) -> io::Result<SocketAddr> {
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{url}: {why}"));
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| invalid("expected ws://host:port/ws"))?;
    let host_port = rest.split('/').next().unwrap_or(rest);
    let host_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:80")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&host_port)?
        .next()
        .ok_or_else(|| invalid("host does not resolve"))
}

struct Runner {
    poll: Poll,
    conns: Vec<Option<BenchConn>>,
    publisher: UnixStream,
    /// Publish lines not yet taken by the socket.
    outgoing: Vec<u8>,
    /// Events published per channel.
    published: Vec<u64>,
    /// Channel sequence number when each channel's first client subscribed.
    base_seq: Vec<Option<u64>>,
    histogram: Histogram<u64>,
    /// Clients whose `subscribed` arrived.
    subscribed: usize,
    received: u64,
    lost: u64,
    duplicated: u64,
    failed: usize,
    /// Upgrades the server refused, by HTTP status line.
    refused: BTreeMap<String, usize>,
    start: Instant,
    buf: Vec<u8>,
    inflate: Inflate,
    /// Bytes the clients read.
    bytes_received: u64,
    padding: String,
    event: EventShape,
    next_channel: usize,
    progress: bool,
    /// Publishing with `ack`: its timeout, and what the reports said.
    ack: Option<Duration>,
    acks: AckTally,
}

/// What the `ack_report` lines said, for acknowledged publishes.
struct AckTally {
    /// Publish → report, in microseconds (a report's id is its publish's timestamp).
    latency: Histogram<u64>,
    /// The last client's ack (written) → the report, in microseconds.
    after_last_ack: Histogram<u64>,
    /// When the last ack of each (channel, seq) awaiting its report was written.
    last_ack_us: HashMap<(usize, u64), u64>,
    /// Acks queued during the current client's read, written at its end.
    acked_now: Vec<u64>,
    /// Reports read.
    reports: u64,
    /// Deliveries acked, and not (timed out or disconnected).
    acked: u64,
    unacked: u64,
    /// Bytes of an incomplete reply line.
    partial: Vec<u8>,
}

/// Runs `plan` against `target` and returns the report.
///
/// # Errors
/// The server cannot be reached at all.
pub fn run(plan: &Plan, target: &Target, progress: bool) -> io::Result<Report> {
    let poll = Poll::new()?;
    let mut publisher = UnixStream::connect(&target.socket)?;
    poll.registry().register(
        &mut publisher,
        PUBLISHER,
        Interest::READABLE | Interest::WRITABLE,
    )?;
    let mut runner = Runner {
        poll,
        conns: Vec::with_capacity(plan.connections),
        publisher,
        outgoing: Vec::new(),
        published: vec![0; plan.channels],
        base_seq: vec![None; plan.channels],
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        subscribed: 0,
        received: 0,
        lost: 0,
        duplicated: 0,
        failed: 0,
        refused: BTreeMap::new(),
        start: Instant::now(),
        buf: vec![0; 256 * 1024],
        inflate: Inflate::default(),
        bytes_received: 0,
        padding: "x".repeat(plan.padding),
        event: plan.event,
        ack: plan.ack,
        acks: AckTally {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            after_last_ack: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            last_ack_us: HashMap::new(),
            acked_now: Vec::new(),
            reports: 0,
            acked: 0,
            unacked: 0,
            partial: Vec::new(),
        },
        next_channel: 0,
        progress,
    };
    let (cpu_before, rss_before) = (probe::cpu_ns(target.pid), probe::rss_kib(target.pid));
    let connect_started = Instant::now();
    runner.connect_all(plan, target.addr)?;
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let (cpu_connected, rss_connected) = (probe::cpu_ns(target.pid), probe::rss_kib(target.pid));
    let opened = runner.conns.iter().filter(|c| c.is_some()).count();

    let mut steps = Vec::new();
    for step in &plan.steps {
        let report = runner.run_step(*step, target.pid, plan.channels)?;
        let passed = report.passed;
        steps.push(report);
        if plan.stop_on_failure && !passed {
            break;
        }
    }
    runner.drain()?;
    let rss_end = probe::rss_kib(target.pid);
    let best = steps
        .iter()
        .filter(|s| s.passed)
        .map(|s| s.deliveries_per_sec)
        .reduce(f64::max);
    let per_conn = match (rss_before, rss_connected) {
        (Some(before), Some(after)) if opened > 0 => {
            Some((after as f64 - before as f64) * 1024.0 / opened as f64)
        }
        _ => None,
    };
    let cpu_per_handshake = match (cpu_before, cpu_connected) {
        (Some(a), Some(b)) if opened > 0 => Some((b - a) as f64 / 1000.0 / opened as f64),
        _ => None,
    };
    Ok(Report {
        preset: plan.preset,
        transport: plan.transport,
        connections: opened,
        channels: plan.channels,
        handshakes_per_sec: opened as f64 / connect_secs,
        server_cpu_us_per_handshake: cpu_per_handshake,
        server_rss_before_kib: rss_before,
        server_rss_connected_kib: rss_connected,
        server_rss_per_connection_bytes: per_conn,
        server_rss_end_kib: rss_end,
        steps,
        best_passing_deliveries_per_sec: if plan.stop_on_failure { best } else { None },
        lost: runner.lost + runner.missing(),
        duplicated: runner.duplicated,
        failed_connections: runner.failed,
        refused_upgrades: std::mem::take(&mut runner.refused),
    })
}

impl Runner {
    /// Opens every client, at most `CONNECT_WINDOW` in flight, until all are subscribed.
    fn connect_all(&mut self, plan: &Plan, addr: SocketAddr) -> io::Result<()> {
        let host = addr.to_string();
        let mut events = Events::with_capacity(1024);
        let deadline = Instant::now() + CONNECT_DEADLINE;
        while self.subscribed + self.failed < plan.connections {
            while self.conns.len() < plan.connections
                && self.conns.len() - self.subscribed - self.failed < CONNECT_WINDOW
            {
                let channel = self.conns.len() % plan.channels;
                let mut socket = TcpStream::connect(addr)?;
                socket.set_nodelay(true)?;
                let token = Token(self.conns.len());
                self.poll.registry().register(
                    &mut socket,
                    token,
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                self.conns.push(Some(BenchConn::new(
                    socket,
                    &host,
                    channel,
                    &format!("bench:{channel}"),
                    plan.transport,
                    plan.deflate,
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connect phase took over 60 s",
                ));
            }
            self.pump(&mut events, Duration::from_millis(100))?;
            if self.progress {
                eprint!(
                    "\r  connecting: {}/{} subscribed   ",
                    self.subscribed, plan.connections
                );
            }
        }
        if self.progress {
            eprintln!();
        }
        Ok(())
    }

    fn on_conn_event(&mut self, key: usize) {
        let Some(Some(conn)) = self.conns.get_mut(key) else {
            return;
        };
        let now_us = self.start.elapsed().as_micros() as u64;
        let channel = conn.channel;
        let base_seq = &mut self.base_seq;
        let histogram = &mut self.histogram;
        let acked_now = &mut self.acks.acked_now;
        let (subscribed, received, lost, duplicated) = (
            &mut self.subscribed,
            &mut self.received,
            &mut self.lost,
            &mut self.duplicated,
        );
        let mut seen = |event: Seen| match event {
            Seen::Subscribed(seq) => {
                *subscribed += 1;
                base_seq[channel].get_or_insert(seq);
            }
            Seen::Acked(seq) => acked_now.push(seq),
            Seen::Event {
                sent_us,
                skipped,
                repeated,
            } => {
                *received += 1;
                let _ = histogram.record(now_us.saturating_sub(sent_us).max(1));
                *lost += skipped;
                *duplicated += u64::from(repeated);
            }
            Seen::Presence { .. } => {} // the presence preset's, see `presence`
        };
        let result = conn
            .flush()
            .and_then(|()| conn.on_readable(&mut self.buf, &mut self.inflate, &mut seen));
        match result {
            Ok(read) => self.bytes_received += read as u64,
            Err(failure) => self.fail(key, failure),
        }
        // The read ended with a write of the acks it queued.
        let written_us = self.start.elapsed().as_micros() as u64;
        for seq in self.acks.acked_now.drain(..) {
            self.acks.last_ack_us.insert((channel, seq), written_us);
        }
    }

    fn fail(&mut self, key: usize, failure: ConnFailure) {
        match failure {
            ConnFailure::Io(e) => log::warn!("bench client {key}: {e}"),
            ConnFailure::Refused(status) => {
                log::debug!("bench client {key}: upgrade refused: {status}");
                *self.refused.entry(status).or_default() += 1;
            }
            ConnFailure::Protocol(why) => log::warn!("bench client {key}: {why}"),
        }
        self.failed += 1;
        self.conns[key] = None;
    }

    fn run_step(
        &mut self,
        step: Step,
        pid: Option<u32>,
        channels: usize,
    ) -> io::Result<StepReport> {
        self.histogram.reset();
        self.acks.latency.reset();
        self.acks.after_last_ack.reset();
        let acks_before = (self.acks.acked, self.acks.unacked);
        let received_before = self.received;
        let bytes_before = self.bytes_received;
        let lost_before = self.lost + self.failed as u64;
        let server_cpu_before = probe::cpu_ns(pid);
        let bench_cpu_before = probe::cpu_ns(None);
        let started = Instant::now();
        let mut published = 0u64;
        let mut events = Events::with_capacity(1024);
        let mut next_progress = started + Duration::from_secs(1);
        while started.elapsed() < step.duration {
            let mut timeout = Duration::from_millis(50);
            if step.rate > 0 {
                let due = (started.elapsed().as_secs_f64() * step.rate as f64) as u64;
                while published < due {
                    self.queue_publish(channels);
                    published += 1;
                }
                self.flush_publisher()?;
                let next_due = Duration::from_secs_f64((published + 1) as f64 / step.rate as f64);
                timeout = timeout.min(next_due.saturating_sub(started.elapsed()));
            }
            self.pump(&mut events, timeout)?;
            if self.progress && Instant::now() >= next_progress {
                next_progress += Duration::from_secs(1);
                eprint!(
                    "\r  {:>6}/s  {:>4.1}s  published {published}  received {}  p99 {:.2} ms   ",
                    step.rate,
                    started.elapsed().as_secs_f64(),
                    self.received - received_before,
                    self.histogram.value_at_quantile(0.99) as f64 / 1000.0
                );
            }
        }
        if self.progress {
            eprintln!();
        }
        let secs = started.elapsed().as_secs_f64();
        let received = self.received - received_before;
        let server_cpu_after = probe::cpu_ns(pid);
        let bench_cpu_after = probe::cpu_ns(None);
        let server_cpu = server_cpu_before
            .zip(server_cpu_after)
            .map(|(a, b)| (b - a) as f64 / 1e9);
        let bench_cpu = bench_cpu_before
            .zip(bench_cpu_after)
            .map_or(0.0, |(a, b)| (b - a) as f64 / 1e9);
        let h = &self.histogram;
        let latency_us = Percentiles {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        };
        let acks = self.ack.map(|_| {
            let percentiles = |h: &Histogram<u64>| Percentiles {
                p50: h.value_at_quantile(0.5),
                p90: h.value_at_quantile(0.9),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                max: h.max(),
            };
            AckFigures {
                report_us: percentiles(&self.acks.latency),
                after_last_ack_us: percentiles(&self.acks.after_last_ack),
                acked: self.acks.acked - acks_before.0,
                unacked: self.acks.unacked - acks_before.1,
            }
        });
        let lossless = self.lost + self.failed as u64 == lost_before;
        let passed = lossless && latency_us.p99 < P99_LIMIT_US && (received > 0 || step.rate == 0);
        Ok(StepReport {
            rate: step.rate,
            published,
            received,
            deliveries_per_sec: received as f64 / secs,
            bytes_per_delivery: (received > 0)
                .then(|| (self.bytes_received - bytes_before) as f64 / received as f64),
            server_cpu_s_per_million: server_cpu
                .filter(|_| received > 0)
                .map(|cpu| cpu * 1e6 / received as f64),
            server_cpu_fraction: server_cpu.map(|cpu| cpu / secs),
            bench_cpu_fraction: bench_cpu / secs,
            bench_saturated: bench_cpu / secs > SATURATED,
            latency_us,
            acks,
            passed,
        })
    }

    /// Queues one timestamped publish line for the next channel in round robin.
    fn queue_publish(&mut self, channels: usize) {
        let channel = self.next_channel;
        self.next_channel = (self.next_channel + 1) % channels;
        self.published[channel] += 1;
        let sent_us = self.start.elapsed().as_micros() as u64;
        let n = self.published[channel];
        if let Some(timeout) = self.ack {
            // The id is the publish's timestamp: its report carries it back.
            let ms = timeout.as_millis();
            let _ = write!(
                self.outgoing,
                r#"{{"id":{sent_us},"ack":{{"timeout":"{ms}ms"}},"channel":"bench:{channel}","data":"#
            );
        } else {
            let _ = write!(self.outgoing, r#"{{"channel":"bench:{channel}","data":"#);
        }
        self.event
            .write(&mut self.outgoing, sent_us, n, &self.padding);
        self.outgoing.extend_from_slice(b"}\n");
    }

    fn flush_publisher(&mut self) -> io::Result<()> {
        while !self.outgoing.is_empty() {
            match self.publisher.write(&self.outgoing) {
                Ok(n) => {
                    self.outgoing.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// After the last step: waits until every published event arrived, or the drain deadline.
    fn drain(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + DRAIN_DEADLINE;
        let mut events = Events::with_capacity(1024);
        while (self.missing() > 0 || self.reports_due() > 0) && Instant::now() < deadline {
            self.flush_publisher()?;
            self.pump(&mut events, Duration::from_millis(50))?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for readiness and serves it: the publisher's writes, the
    /// clients' reads.
    fn pump(&mut self, events: &mut Events, timeout: Duration) -> io::Result<()> {
        self.poll.poll(events, Some(timeout))?;
        for event in events.iter() {
            if event.token() == PUBLISHER {
                self.read_replies()?;
                self.flush_publisher()?;
            } else {
                self.on_conn_event(event.token().0);
            }
        }
        Ok(())
    }

    /// Reads the publisher's reply lines: the `ack_report`s of acknowledged publishes.
    fn read_replies(&mut self) -> io::Result<()> {
        loop {
            let n = match self.publisher.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let now_us = self.start.elapsed().as_micros() as u64;
            let tally = &mut self.acks;
            tally.partial.extend_from_slice(&self.buf[..n]);
            let complete = tally
                .partial
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            for line in tally.partial[..complete].split(|&b| b == b'\n') {
                let Ok(report) = serde_json::from_slice::<serde_json::Value>(line) else {
                    continue;
                };
                if report["type"] != "ack_report" {
                    continue;
                }
                let count = |key: &str| report[key].as_u64().unwrap_or(0);
                tally.reports += 1;
                tally.acked += count("acked");
                tally.unacked += count("timedOut") + count("disconnected");
                let sent_us = count("id");
                let _ = tally.latency.record(now_us.saturating_sub(sent_us).max(1));
                let channel = report["channel"]
                    .as_str()
                    .and_then(|c| c.strip_prefix("bench:"));
                let key = channel
                    .and_then(|c| c.parse().ok())
                    .map(|c| (c, count("seq")));
                if let Some(last) = key.and_then(|key| tally.last_ack_us.remove(&key)) {
                    let _ = tally
                        .after_last_ack
                        .record(now_us.saturating_sub(last).max(1));
                }
            }
            tally.partial.drain(..complete);
        }
    }

    /// Acknowledged publishes whose report has not come yet.
    fn reports_due(&self) -> u64 {
        match self.ack {
            Some(_) => self.published.iter().sum::<u64>() - self.acks.reports,
            None => 0,
        }
    }

    /// Events published to live clients' channels that they have not received yet.
    fn missing(&self) -> u64 {
        self.conns
            .iter()
            .flatten()
            .map(|c| {
                let last = self.base_seq[c.channel].unwrap_or(0) + self.published[c.channel];
                (last + 1).saturating_sub(c.next_seq.max(1))
            })
            .sum()
    }
}
