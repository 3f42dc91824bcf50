//! The event loop: one thread, one `mio::Poll`, every socket non-blocking.
//!
//! ```text
//! loop {
//!     poll(timeout = next timer deadline, or 0 while a publisher or client was paused)
//!     read the clock once → `now`
//!     resume what a budget paused: publishers (fan-out), clients (one read per pass)
//!     dispatch events: accept; read requests, frames, publish lines (fan-out only queues)
//!     fire due timers: connection deadlines, accept backoff, housekeeping, shutdown
//!     close slow consumers among the dirty connections (over the limit, or stalled)
//!     flush every dirty connection: its queued frames gathered into one write
//!     exit once shut down and drained
//! }
//! ```
//! The reactor knows sockets, tokens, timers and phases, and nothing of channels, users,
//! tokens' claims or JSON: `ws` parses and judges a connection's input, `fanout` carries out
//! the verdicts, `publish` runs the publish port, and the reactor acts on what they return.
//! Invariants:
//! - every connection with output queued is on the fan-out's dirty list (kept by the
//!   `Clients` guard); WRITABLE interest is registered only while a connection has output the
//!   kernel would not take;
//! - each connection has at most one armed timer, whose meaning follows its phase;
//! - `Server::drop_client` is the only place that deregisters a connection and removes it.
//!
//! - [`accept`]: listeners, accepting, descriptor backoff.
//! - `clients`: a WebSocket-port connection's input, routing, timer, flush and reap.
//! - [`shutdown`]: the [`ShutdownHandle`], signals, the drain.
//! - [`clock`]: the time source, steppable in tests.
//! - [`timer`]: the hashed timer wheel. [`token`]: `mio::Token` ↔ event source.

pub mod accept;
mod clients;
pub mod clock;
pub mod shutdown;
pub mod timer;
pub mod token;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;

use crate::auth::admission::{Auth, ConnectRate, RefusalLog};
use crate::auth::jwt::Verifier;
use crate::auth::ratelimit::Rate;
use crate::base::ids::ConnId;
use crate::base::time::{Tick, TickSource};
use crate::config::{Config, TIMER_TICK};
use crate::engine;
use crate::error::StartupError;
use crate::fanout::{AckReport, Fanout, PresenceSettings, PublisherRef, SessionSettings};
use crate::ops::stats::StatsFeed;
use crate::publish::http::HttpRules;
use crate::publish::port::PortRules;
use crate::publish::{PublisherConn, ReadStatus};
use crate::ws::conn::{SharedInput, Timing, websocket_config};
use crate::ws::http::Routing;
use crate::ws::outqueue::GATHER_BYTES;
pub use accept::Listeners;
use accept::Listening;
pub use clock::Clock;
pub use shutdown::ShutdownHandle;
use timer::TimerWheel;
use token::Source;

/// Size of the read buffer shared by all WebSocket connections, and so the bytes one
/// connection may have read and parsed per pass (see `SharedInput`).
const SHARED_READ_BUFFER: usize = 16 * 1024;
/// Size of the read buffer shared by all publishers.
const PUBLISH_READ_BUFFER: usize = 64 * 1024;
/// Time between two housekeeping rounds: an engine sweep and a stats snapshot.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// At most one log line about refused upgrades per this interval (see `RefusalLog`).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What a timer stands for.
#[derive(Debug, Clone, Copy)]
enum TimerEvent {
    /// The connection's current deadline: handshake, heartbeat or drain, by phase.
    Client(ConnId),
    /// Retry accepting after running out of file descriptors.
    ResumeAccept,
    /// Once a second: the engine's sweep, the stats snapshot.
    Housekeeping,
    /// The engine's own upkeep, when it asks for it (see `Engine::tick`).
    EngineTick,
    /// The graceful shutdown's time is up.
    ShutdownDeadline,
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    poll: Poll,
    listening: Option<Listening>,
    signals: Option<Signals>,
    waker: Arc<Waker>,
    local_addr: std::net::SocketAddr,
    publishers: Slab<PublisherConn>,
    fanout: Fanout,
    timers: TimerWheel<TimerEvent>,
    clock: Clock,
    ticks: TickSource,
    started: Instant,
    config: Config,
    ws_config: WebSocketConfig,
    timing: Timing,
    /// Which pages may open a WebSocket.
    routing: Routing,
    connect_rate: ConnectRate,
    refusal_log: RefusalLog,
    /// The dashboard's stats feed, while the dashboard is on.
    stats: Option<StatsFeed>,
    next_generation: u32,
    next_publisher: u64,
    accept_paused: bool,
    shutting_down: bool,
    finished: bool,
    /// Publishers paused by the fan-out budget, resumed first in the next pass.
    paused_publishers: Vec<usize>,
    /// Clients whose read budget ran out in the last pass, read again first in the next.
    ready_clients: Vec<ConnId>,
    /// Reused buffers.
    input: SharedInput,
    publish_input: Box<[u8]>,
    expired: Vec<TimerEvent>,
    flushing: Vec<usize>,
    /// Reused by every flush that writes several chunks at once.
    gather: Vec<u8>,
    completions: Vec<crate::fanout::Completion>,
    /// Reused: the ack reports being handed to their publishers.
    reports: Vec<AckReport>,
}

impl Server {
    /// Binds the listeners `config` describes (see [`Listeners::bind`]).
    ///
    /// # Errors
    /// A [`StartupError`] naming the address or path at fault.
    pub fn bind(config: Config) -> Result<Server, StartupError> {
        let listeners = Listeners::bind(&config)?;
        Server::new(config, listeners, Clock::system())
    }

    /// A server on `listeners`, reading the time from `clock`: the seam for tests that bind
    /// their own sockets or step time.
    ///
    /// # Errors
    /// The event loop cannot be set up, or the JWT key cannot be used.
    pub fn new(config: Config, listeners: Listeners, clock: Clock) -> Result<Server, StartupError> {
        let poll = Poll::new()?;
        let mut listening = listeners.into_mio()?;
        let local_addr = listening.ws.local_addr()?;
        let registry = poll.registry();
        listening.register(registry)?;
        let waker = Arc::new(Waker::new(registry, token::encode(Source::Waker))?);
        let started = clock.now();
        let ticks = TickSource::new(started, TIMER_TICK);
        let ws_config = websocket_config(&config);
        let tick_secs = TIMER_TICK.as_secs_f64();
        let connect_rate = config
            .connect_rate_per_ip
            .map(|rate| Rate::new(rate, 2.0 * rate, tick_secs));
        let auth = match &config.jwt {
            Some(key) => Some(Auth::new(
                Verifier::new(key, config.jwt_leeway).map_err(StartupError::Auth)?,
                config.jwt_leeway,
                config.max_connections_per_user,
                ticks,
            )),
            None => None,
        };
        let settings = SessionSettings::new(&config, random_u32());
        let timing = Timing::new(&config, ticks);
        let mut timers = TimerWheel::new(Tick(0));
        timers.insert(
            Tick(0).after(ticks.ticks_in(HOUSEKEEPING_INTERVAL)),
            TimerEvent::Housekeeping,
        );
        // The engine's sockets come back to it as `Source::Engine` events; its upkeep is an
        // ordinary timer, first due at the first tick.
        let token_of = |key| token::encode(Source::Engine(key));
        let node_id = (config.node_id.clone()).unwrap_or_else(|| format!("{:08x}", random_u32()));
        let engine = engine::start(&config, registry, token_of, ticks, node_id.clone())?;
        timers.insert(Tick(1), TimerEvent::EngineTick);
        let presence = PresenceSettings {
            patterns: (config.presence_channels.iter())
                .map(|p| p.as_str().into())
                .collect(),
            window: ticks.ticks_in(config.presence_window),
            max_members: config.max_presence_members,
        };
        let fanout = Fanout::new(engine, auth, settings, &node_id, presence);
        let stats = config
            .dashboard_enabled()
            .then(|| StatsFeed::new(fanout.metrics(), started));
        let tcp = config
            .publish_listen
            .map(|addr| format!(", HTTP publishes on http://{addr}/publish"))
            .unwrap_or_default();
        let dashboard = if stats.is_some() {
            format!(", dashboard at http://{local_addr}/")
        } else {
            String::new()
        };
        log::info!(
            "listening on ws://{local_addr}/ws, publish socket {}{tcp}{dashboard}",
            config.publish_socket.display()
        );
        let input = SharedInput::new(SHARED_READ_BUFFER, config.max_message_size);
        Ok(Server {
            poll,
            listening: Some(listening),
            signals: None,
            waker,
            local_addr,
            publishers: Slab::new(),
            fanout,
            timers,
            clock,
            ticks,
            started,
            routing: Routing::new(&config),
            config,
            ws_config,
            timing,
            connect_rate: ConnectRate::new(connect_rate),
            refusal_log: RefusalLog::default(),
            stats,
            next_generation: 0,
            next_publisher: 0,
            accept_paused: false,
            shutting_down: false,
            finished: false,
            paused_publishers: Vec::new(),
            ready_clients: Vec::new(),
            input,
            publish_input: vec![0; PUBLISH_READ_BUFFER].into_boxed_slice(),
            expired: Vec::new(),
            flushing: Vec::new(),
            gather: Vec::with_capacity(GATHER_BYTES),
            completions: Vec::new(),
            reports: Vec::new(),
        })
    }

    /// The bound WebSocket/HTTP address (useful with port 0).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }

    /// A handle that starts a graceful shutdown from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.waker))
    }

    /// Turns SIGTERM and SIGINT into a graceful shutdown; a second signal exits at once.
    ///
    /// # Errors
    /// The signal handlers cannot be installed.
    pub fn handle_signals(&mut self) -> Result<(), StartupError> {
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        self.poll.registry().register(
            &mut signals,
            token::encode(Source::Signal),
            Interest::READABLE,
        )?;
        self.signals = Some(signals);
        Ok(())
    }

    /// Runs the event loop until a graceful shutdown completes.
    ///
    /// # Errors
    /// Only if polling itself fails; connection errors never end the loop.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        while !self.finished {
            // A publisher paused by the fan-out budget, or a client by its read budget,
            // resumes without waiting.
            let timeout = if self.paused_publishers.is_empty() && self.ready_clients.is_empty() {
                let next = self.timers.next_deadline();
                let fanout = self.fanout.next_deadline();
                next.into_iter()
                    .chain(fanout)
                    .min()
                    .map(|t| self.ticks.until(t, self.clock.now()))
            } else {
                Some(Duration::ZERO)
            };
            self.turn(&mut events, timeout)?;
        }
        log::info!("stopped");
        Ok(())
    }

    /// One pass of the loop.
    fn turn(&mut self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        if let Err(e) = self.poll.poll(events, timeout) {
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        let pass_started = self.clock.now();
        let now = self.ticks.tick_at(pass_started);
        let started_us = micros_since(self.started, pass_started);
        self.fanout
            .begin_pass(now, started_us, self.clock.unix_millis());
        for key in std::mem::take(&mut self.paused_publishers) {
            self.on_publisher_ready(key);
        }
        for id in std::mem::take(&mut self.ready_clients) {
            if self.fanout.clients().is_current(id) {
                self.on_client_readable(id.key as usize, now);
            }
        }
        for event in events.iter() {
            match token::decode(event.token()) {
                Source::Listener => self.accept_clients(now),
                Source::PublishListener => self.accept_publishers(false),
                Source::PublishTcpListener => self.accept_publishers(true),
                Source::Signal => self.on_signal(now),
                Source::Waker => self.begin_shutdown(now),
                Source::Client(key) => {
                    if event.is_writable()
                        && let Some(mut client) = self.fanout.clients_mut().get_mut(key)
                    {
                        client.mark_writable();
                    }
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        self.on_client_readable(key, now);
                    }
                }
                Source::Publisher(key) => self.on_publisher_ready(key),
                Source::Engine(key) => self.fanout.engine_ready(key),
            }
        }
        self.fire_timers(now);
        self.close_slow_consumers(now);
        for id in self.fanout.take_closed_by_command() {
            if self.fanout.clients().is_current(id) {
                self.arm_close_deadline(id.key as usize, now);
            }
        }
        self.flush_dirty(now);
        self.fanout.engine_flush();
        self.complete_publishes();
        if self.shutting_down && self.fanout.clients().is_empty() && self.publishers.is_empty() {
            self.finished = true;
        }
        Ok(())
    }

    /// Hands each publisher its commands the engine answered in this pass, resuming those
    /// that waited: once per pass, after the engine's sockets were written.
    fn complete_publishes(&mut self) {
        let mut completions = std::mem::take(&mut self.completions);
        self.fanout.take_completions(&mut completions);
        for completion in completions.drain(..) {
            if let Some((key, publisher)) = self.current_publisher(completion.publisher) {
                publisher.complete(completion.ticket, &completion.outcome);
                self.on_publisher_ready(key);
            }
        }
        self.completions = completions;
        // Ack reports after the answers: a report follows its own publish's reply. One whose
        // publisher is gone is dropped with it (docs/protocol.md, "Acknowledged events").
        let mut reports = std::mem::take(&mut self.reports);
        self.fanout.take_ack_reports(&mut reports);
        for report in reports.drain(..) {
            if let Some((key, publisher)) = self.current_publisher(report.publisher) {
                publisher.report(&report.id, report.line);
                self.on_publisher_ready(key);
            }
        }
        self.reports = reports;
    }

    /// Unread reply bytes past which a publisher is not read (half of `max_output_buffer`,
    /// past which it is closed).
    fn reply_backlog(&self) -> usize {
        self.config.max_output_buffer / 2
    }

    /// The publisher `publisher` names, if it is still connected, with its slab key.
    fn current_publisher(
        &mut self,
        publisher: Option<PublisherRef>,
    ) -> Option<(usize, &mut PublisherConn)> {
        let PublisherRef { key, serial } = publisher?;
        let conn = self.publishers.get_mut(key)?;
        (conn.serial == serial).then_some((key, conn))
    }

    fn on_publisher_ready(&mut self, key: usize) {
        let reply_backlog = self.reply_backlog();
        let Some(publisher) = self.publishers.get_mut(key) else {
            return;
        };
        // Replies first: an HTTP publisher's next request waits for its last response.
        let mut flushed = publisher.flush();
        let status = if publisher.is_finished {
            ReadStatus::Finished
        } else {
            let rules = PortRules {
                max_line: self.config.max_publish_line,
                reply_backlog,
                http: HttpRules {
                    max_head: self.config.max_header_size,
                    max_body: self.config.max_publish_line,
                    key: self.config.publish_key.as_deref(),
                    dapr: &self.config.dapr,
                },
            };
            let from = PublisherRef {
                key,
                serial: publisher.serial,
            };
            let sink = &mut self.fanout.serving(Some(from));
            publisher.read_and_execute(&rules, &mut self.publish_input, sink)
        };
        self.fanout.metrics_mut().publish_errors += std::mem::take(&mut publisher.errors);
        flushed = flushed.and_then(|()| publisher.flush());
        let over = publisher.queued() > self.config.max_output_buffer;
        if over {
            log::warn!(
                "publisher={}: more than {} bytes of unread replies; closing",
                publisher.serial,
                self.config.max_output_buffer
            );
        }
        let done = match status {
            ReadStatus::Pending | ReadStatus::Waiting => false,
            ReadStatus::Paused => {
                if !self.paused_publishers.contains(&key) {
                    self.paused_publishers.push(key);
                }
                false
            }
            // The replies it has not read wait in the kernel (its writability brings the
            // publisher back), or went out just now: then read on next pass.
            ReadStatus::Backlogged => {
                let sent = publisher.queued() < reply_backlog;
                if sent && !self.paused_publishers.contains(&key) {
                    self.paused_publishers.push(key);
                }
                false
            }
            ReadStatus::Finished => {
                publisher.is_finished = true;
                publisher.queued() == 0 && !publisher.is_awaiting()
            }
            ReadStatus::Broken => true,
        };
        if done || over || flushed.is_err() {
            self.drop_publisher(key);
        }
    }

    fn drop_publisher(&mut self, key: usize) {
        let mut publisher = self.publishers.remove(key);
        let _ = self.poll.registry().deregister(publisher.socket());
        self.fanout.metrics_mut().publishers -= 1;
        log::debug!("publisher={} disconnected", publisher.serial);
    }

    fn fire_timers(&mut self, now: Tick) {
        self.fanout.fire_deadlines(now);
        let mut expired = std::mem::take(&mut self.expired);
        self.timers.advance(now, &mut expired);
        for event in expired.drain(..) {
            match event {
                TimerEvent::Client(id) => self.on_client_timer(id, now),
                TimerEvent::ResumeAccept => {
                    self.accept_paused = false;
                    self.accept_clients(now);
                }
                TimerEvent::Housekeeping => self.housekeeping(now),
                TimerEvent::EngineTick => {
                    if let Some(next) = self.fanout.engine_tick(now) {
                        self.timers.insert(next, TimerEvent::EngineTick);
                    }
                }
                TimerEvent::ShutdownDeadline => {
                    log::warn!(
                        "shutdown_timeout reached; dropping {} connection(s)",
                        self.fanout.clients().len()
                    );
                    self.finished = true;
                }
            }
        }
        self.expired = expired;
    }

    /// The engine's sweep, the stats snapshot (dashboard on), and the next round.
    fn housekeeping(&mut self, now: Tick) {
        self.fanout.sweep(now);
        let uptime_secs = self.uptime_secs();
        if let Some(feed) = &mut self.stats {
            let gauges = self.fanout.gauges(uptime_secs);
            let snapshot = feed.snapshot(self.fanout.metrics(), &gauges, self.clock.now());
            self.fanout.publish_stats(snapshot);
        }
        if !self.shutting_down {
            let next = now.after(self.ticks.ticks_in(HOUSEKEEPING_INTERVAL));
            self.timers.insert(next, TimerEvent::Housekeeping);
        }
    }

    fn uptime_secs(&self) -> u64 {
        self.clock
            .now()
            .saturating_duration_since(self.started)
            .as_secs()
    }
}

fn micros_since(start: Instant, instant: Instant) -> u64 {
    instant.saturating_duration_since(start).as_micros() as u64
}

/// Random per process, so client ids differ across restarts.
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as u32
}

#[cfg(test)]
mod tests;
