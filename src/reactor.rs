//! The event loop: one thread, one `mio::Poll`, every socket non-blocking.
//!
//! ```text
//! loop {
//!     poll(timeout = next timer deadline, or 0 while a publisher or client was paused)
//!     read the clock once → `now`
//!     resume what a budget paused: publishers (fan-out), clients (one read per pass)
//!     dispatch events: accept; read requests, frames, publish lines (fan-out only queues)
//!     fire due timers: handshake deadlines, heartbeats, drain deadlines, housekeeping,
//!                      shutdown-drain turns, shutdown
//!     close slow consumers among the dirty connections (over the limit, or stalled)
//!     flush every dirty connection: one write_vectored per connection and pass
//!     exit once shut down and drained
//! }
//! ```
//! The reactor parses nothing itself: `http`, `wire` and `publish` do, and it acts on their
//! verdicts. Invariants:
//! - every path that queues output marks the connection dirty; WRITABLE interest is registered
//!   only while a connection has output the kernel would not take;
//! - a client in the hub is in the `WebSocket` phase: leaving it (`end_session`) unsubscribes
//!   it from every channel, decrements the connection gauge and counts the disconnect, once;
//! - each connection has at most one armed timer, whose meaning follows its phase.

use std::collections::HashMap;
use std::io;
use std::io::Write;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mio::net::{TcpListener, UnixListener};
use mio::{Events, Interest, Poll, Registry, Waker};
use serde_json::value::RawValue;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::assets::Asset;
use crate::auth::{Identity, Verifier};
use crate::client::{
    Admission, ClientConn, ConnId, Inbound, ReadEnd, Readiness, RequestOutcome, SharedInput,
};
use crate::config::{Config, TIMER_TICK};
use crate::error::StartupError;
use crate::history::HistoryLimits;
use crate::http::{self, OriginPolicy, Refusal, Route};
use crate::hub::Hub;
use crate::metrics::{DisconnectReason, Gauges, Metrics};
use crate::publish::{self, Published, PublisherConn, ReadStatus, Seqs, Sink, Target};
use crate::ratelimit::{self, Rate, TokenBucket};
use crate::stats::StatsFeed;
use crate::timer::{Tick, TickSource, TimerWheel};
use crate::token::{self, Source};
use crate::wire::{self, ErrorCode, EventTarget, Reply, Request};

/// Fan-out work per loop pass: frames queued (a line to a channel without subscribers counts
/// as one). Past it, publishers pause until the next pass, so one busy channel cannot delay
/// flushing, handshakes or heartbeats, and queues grow by at most this much per pass. 64k is 64
/// events per connection at 1000 subscribers: one full `write_vectored` each.
const DELIVERIES_PER_PASS: usize = 64 * 1024;
/// Size of the read buffer shared by all WebSocket connections, and so the bytes one
/// connection may have read and parsed per pass (see `SharedInput`).
const SHARED_READ_BUFFER: usize = 16 * 1024;
/// Size of the read buffer shared by all publishers.
const PUBLISH_READ_BUFFER: usize = 64 * 1024;

/// How long accepting pauses after the process runs out of file descriptors.
const ACCEPT_BACKOFF_TICKS: u64 = 10;
/// Time between two housekeeping rounds: a history sweep and a stats snapshot.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// At most one log line about refused upgrades per this interval (see `RefusalLog`).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Channel slots one history sweep examines: a full cycle over a million channels takes
/// about four minutes, at a bounded cost per round.
const SWEEP_SLOTS: usize = 4096;

/// What a timer stands for.
#[derive(Debug, Clone, Copy)]
enum TimerEvent {
    /// The connection's current deadline: handshake, heartbeat or drain, by phase.
    Client(ConnId),
    /// Retry accepting after running out of file descriptors.
    ResumeAccept,
    /// Once a second: sweep channel histories, publish the stats snapshot.
    Housekeeping,
    /// The graceful shutdown's time is up.
    ShutdownDeadline,
}

/// Rate-limits the info line about refused upgrades: a misconfigured page retries forever,
/// and the log must say so without repeating it a thousand times.
#[derive(Default)]
struct RefusalLog {
    quiet_until: Tick,
    suppressed: u64,
}

impl RefusalLog {
    /// Whether a line may be logged now; if so, how many were held back since the last one.
    fn admit(&mut self, now: Tick, interval: u64) -> Option<u64> {
        if now < self.quiet_until {
            self.suppressed += 1;
            return None;
        }
        self.quiet_until = now.after(interval);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Asks a running [`Server`] to shut down gracefully, from any thread.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Waker>);

impl ShutdownHandle {
    /// Starts the graceful shutdown, as SIGTERM would.
    ///
    /// # Errors
    /// The wake-up could not be delivered (the server is gone).
    pub fn shutdown(&self) -> io::Result<()> {
        self.0.wake()
    }
}

/// Removes the publish socket file when dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Output bookkeeping shared by every path that queues bytes to clients.
struct Outbox {
    /// When this pass read its input, in microseconds since the server started.
    pass_started_us: u64,
    /// Clients with output queued since the last flush.
    dirty: Vec<usize>,
}

impl Outbox {
    fn mark_dirty(&mut self, client: &mut ClientConn) {
        if !client.is_dirty {
            client.is_dirty = true;
            self.dirty.push(client.id.key as usize);
        }
    }

    /// Queues a shared frame to one client: a refcount bump, no copy. A client that would go
    /// over `max_output_buffer` gets nothing more and is closed at the end of the pass (it is
    /// dirty, and `close_slow_consumers` looks at every dirty client).
    fn deliver(&mut self, client: &mut ClientConn, frame: &Bytes) -> bool {
        if client.close_reason.is_some() {
            return false;
        }
        let queued = client.send_frame(frame.clone());
        self.mark_dirty(client);
        if !queued {
            return false;
        }
        if client.event_pending_since_us == 0 {
            client.event_pending_since_us = self.pass_started_us.max(1);
        }
        true
    }
}

/// Connections, channels and counters: everything the fan-out touches.
struct Fanout {
    hub: Hub,
    clients: Slab<ClientConn>,
    outbox: Outbox,
    metrics: Metrics,
    /// Reused to build event payloads.
    scratch: Vec<u8>,
    /// Frames queued in this pass (see `DELIVERIES_PER_PASS`).
    pass_deliveries: usize,
    /// This pass's tick.
    now: Tick,
    /// Authentication, when configured.
    auth: Option<Auth>,
    /// Open connections of each authenticated user.
    users: HashMap<Box<str>, Vec<ConnId>>,
    /// Connections closed by a publisher's command; the reactor arms their drain deadline.
    closed_by_command: Vec<ConnId>,
}

/// What authentication needs at run time.
struct Auth {
    verifier: Verifier,
    leeway: Duration,
    max_per_user: usize,
    ticks: TickSource,
}

/// Why an upgrade is closed right after its 101: the disconnect reason, the close code and
/// text, and a detail for the log.
type Refused = (DisconnectReason, u16, &'static str, String);

impl Auth {
    /// Checks an upgrade's token, and its user's open connections in `users`.
    fn admit(
        &self,
        token: Option<&str>,
        users: &HashMap<Box<str>, Vec<ConnId>>,
    ) -> Result<Identity, Refused> {
        let identity = token
            .ok_or_else(|| "no token".to_string())
            .and_then(|t| self.verifier.verify(t))
            .map_err(|why| (DisconnectReason::Unauthorized, 4001, "unauthorized", why))?;
        if users.get(&identity.user).map_or(0, Vec::len) >= self.max_per_user {
            let detail = format!("user {} is at max_connections_per_user", identity.user);
            return Err((
                DisconnectReason::UserLimit,
                4008,
                "Max connections exceeded",
                detail,
            ));
        }
        Ok(identity)
    }

    /// The tick at which `identity`'s token stops being accepted (`exp` + leeway).
    fn expiry_tick(&self, identity: &Identity, now: Tick) -> Tick {
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Saturating: a validly signed token may carry any `exp`, up to u64::MAX.
        let expires = identity.expires_at.saturating_add(self.leeway.as_secs());
        let left = expires.saturating_sub(unix_now);
        now.after(self.ticks.ticks_in(Duration::from_secs(left)))
    }
}

impl Fanout {
    /// Publishes one event to one channel: one sequence number, one encoded frame shared by
    /// every subscriber, by every connection of `user` not subscribed to it already, and by
    /// the channel's history.
    fn publish_to(&mut self, channel: &str, data: &RawValue, user: Option<&str>) -> (u64, usize) {
        let (seq, delivered) = self.fan_out(channel, data, user);
        self.metrics.events_published += 1;
        self.metrics.frames_delivered += delivered as u64;
        (seq, delivered)
    }

    /// [`publish_to`](Fanout::publish_to) without counting the event: the server's own feeds.
    fn fan_out(&mut self, channel: &str, data: &RawValue, user: Option<&str>) -> (u64, usize) {
        let channel_id = self.hub.find(channel);
        let keeps_history = self.hub.keeps_history();
        let (history_id, seq, subscribers) = self.hub.publish(channel);
        let tabs = user
            .and_then(|user| self.users.get(user))
            .map_or(&[][..], Vec::as_slice);
        self.pass_deliveries += (subscribers.len() + tabs.len()).max(1);
        if subscribers.is_empty() && tabs.is_empty() && !keeps_history {
            return (seq, 0);
        }
        let frame = wire::event_frame(EventTarget::Channel(channel, seq), data, &mut self.scratch);
        let mut delivered = 0;
        for id in subscribers {
            let client = &mut self.clients[id.key as usize];
            debug_assert_eq!(client.id, *id, "the hub holds only live connections");
            delivered += usize::from(self.outbox.deliver(client, &frame));
        }
        for id in tabs {
            let client = &mut self.clients[id.key as usize];
            let subscribed = channel_id.is_some_and(|c| client.is_subscribed(c));
            if !subscribed {
                delivered += usize::from(self.outbox.deliver(client, &frame));
            }
        }
        self.hub.record(history_id, seq, &frame, self.now);
        (seq, delivered)
    }

    /// True while `id` names a connection still in the slab (its key may have been reused).
    fn is_current(&self, id: ConnId) -> bool {
        self.clients
            .get(id.key as usize)
            .is_some_and(|c| c.id == id)
    }

    /// The values `/metrics` and the stats feed sample rather than count.
    fn gauges(&self, uptime_secs: u64) -> Gauges {
        let (history_events, history_bytes) = self.hub.history_totals();
        Gauges {
            channels: self.hub.active_channels(),
            known_channels: self.hub.known_channels(),
            uptime_secs,
            history_events,
            history_bytes,
        }
    }

    /// Takes a client out of its WebSocket session, optionally sending a Close frame first:
    /// leaves every channel, updates the gauges and counts the disconnect. Idempotent.
    fn end_session(
        &mut self,
        key: usize,
        reason: DisconnectReason,
        close: Option<(CloseCode, &'static str)>,
    ) {
        let client = &mut self.clients[key];
        let reason = *client.close_reason.get_or_insert(reason);
        if let Some((code, text)) = close {
            client.send_close(code, text);
        }
        if let Some(ended) = client.end_session() {
            for channel in ended.subscriptions {
                self.hub.unsubscribe(channel, client.id, self.now);
            }
            if let Some(user) = ended.user
                && let Some(tabs) = self.users.get_mut(&user)
            {
                tabs.retain(|id| *id != client.id);
                if tabs.is_empty() {
                    self.users.remove(&user);
                }
            }
            self.metrics.connections -= 1;
            self.metrics.disconnected(reason);
            log::debug!("conn={} closed: {}", client.id.generation, reason.label());
        }
        self.outbox.mark_dirty(client);
    }

    /// Acts on one request from an open WebSocket.
    fn handle_request(
        &mut self,
        key: usize,
        request: Request,
        max_subscriptions: usize,
        now: Tick,
    ) {
        let client = &mut self.clients[key];
        let conn = client.id;
        let reply_error = |client: &mut ClientConn,
                           code,
                           message: &str,
                           channel: Option<&str>,
                           id: Option<&wire::RequestId>| {
            client.send_reply(&Reply::Error {
                code,
                message,
                channel,
                id,
            });
        };
        match request {
            Request::Subscribe { channel, since, id } => {
                let name = channel.as_str();
                if client
                    .identity()
                    .is_some_and(|(identity, _)| !identity.may_subscribe(name))
                {
                    reply_error(
                        client,
                        ErrorCode::Forbidden,
                        "your token does not allow this channel",
                        Some(name),
                        id.as_ref(),
                    );
                    return self.outbox.mark_dirty(client);
                }
                let Some(subscriptions) = client.subscriptions_mut() else {
                    return;
                };
                let known = self.hub.find(name).filter(|c| subscriptions.contains(c));
                if known.is_none() && subscriptions.len() >= max_subscriptions {
                    let message =
                        format!("at most {max_subscriptions} subscriptions per connection");
                    reply_error(
                        client,
                        ErrorCode::TooManySubscriptions,
                        &message,
                        Some(name),
                        id.as_ref(),
                    );
                } else {
                    let (channel_id, seq) = self.hub.subscribe(&channel, conn);
                    if known.is_none() {
                        subscriptions.push(channel_id);
                    }
                    // Replayed within this call: on one thread no publish can land between
                    // the replay and live delivery, so there is no gap and no duplicate.
                    let missed = since
                        .as_ref()
                        .map(|since| self.hub.resume(channel_id, since.seq, &since.epoch, now));
                    client.send_reply(&Reply::Subscribed {
                        channel: name,
                        seq,
                        epoch: self.hub.epoch(channel_id),
                        recovered: missed.as_ref().map(Option::is_some),
                        id: id.as_ref(),
                    });
                    for frame in missed.flatten().unwrap_or_default() {
                        self.outbox.deliver(client, &frame);
                    }
                }
            }
            Request::Unsubscribe { channel, id } => {
                let Some(subscriptions) = client.subscriptions_mut() else {
                    return;
                };
                if let Some(channel_id) = self.hub.find(channel.as_str())
                    && let Some(pos) = subscriptions.iter().position(|c| *c == channel_id)
                {
                    subscriptions.swap_remove(pos);
                    self.hub.unsubscribe(channel_id, conn, now);
                }
                client.send_reply(&Reply::Unsubscribed {
                    channel: channel.as_str(),
                    id: id.as_ref(),
                });
            }
            Request::Ping { id } => client.send_reply(&Reply::Pong { id: id.as_ref() }),
            Request::Refresh { token, id } => {
                let current = client.identity().map(|(identity, _)| identity.user.clone());
                let (Some(auth), Some(user)) = (&self.auth, current) else {
                    let message = "authentication is off: there is nothing to refresh";
                    reply_error(
                        client,
                        ErrorCode::InvalidMessage,
                        message,
                        None,
                        id.as_ref(),
                    );
                    return self.outbox.mark_dirty(client);
                };
                match auth.verifier.verify(&token) {
                    Ok(identity) if identity.user == user => {
                        let expires_at = identity.expires_at;
                        let expires = auth.expiry_tick(&identity, now);
                        client.set_identity(identity, expires);
                        client.send_reply(&Reply::Refreshed {
                            expires_at,
                            id: id.as_ref(),
                        });
                    }
                    Ok(_) => reply_error(
                        client,
                        ErrorCode::InvalidToken,
                        "the token is for another user",
                        None,
                        id.as_ref(),
                    ),
                    Err(why) => {
                        reply_error(client, ErrorCode::InvalidToken, &why, None, id.as_ref())
                    }
                }
            }
        }
        self.outbox.mark_dirty(client);
    }
}

impl Sink for Fanout {
    fn publish(&mut self, target: &Target<'_>, data: &RawValue) -> Published {
        match target {
            Target::Channel(channel) => {
                let (seq, delivered) = self.publish_to(channel, data, None);
                Published {
                    seqs: Seqs::One(seq),
                    delivered,
                }
            }
            Target::Channels(channels) => {
                let mut seqs = Vec::with_capacity(channels.len());
                let mut delivered = 0;
                for channel in channels {
                    let (seq, count) = self.publish_to(channel, data, None);
                    seqs.push(seq);
                    delivered += count;
                }
                Published {
                    seqs: Seqs::Many(seqs),
                    delivered,
                }
            }
            Target::User(user) => {
                let channel = format!("user:{user}");
                let (seq, delivered) = self.publish_to(&channel, data, Some(user));
                Published {
                    seqs: Seqs::One(seq),
                    delivered,
                }
            }
            Target::Broadcast => {
                self.metrics.events_published += 1;
                let frame = wire::event_frame(EventTarget::Broadcast, data, &mut self.scratch);
                let mut delivered = 0;
                for (_, client) in self.clients.iter_mut() {
                    delivered += usize::from(self.outbox.deliver(client, &frame));
                }
                self.metrics.frames_delivered += delivered as u64;
                self.pass_deliveries += delivered.max(1);
                Published {
                    seqs: Seqs::None,
                    delivered,
                }
            }
        }
    }

    fn disconnect_user(&mut self, user: &str) -> usize {
        let tabs = self.users.get(user).cloned().unwrap_or_default();
        for id in &tabs {
            let close = (CloseCode::from(4003), "disconnected by server");
            self.end_session(
                id.key as usize,
                DisconnectReason::DisconnectedByServer,
                Some(close),
            );
            self.closed_by_command.push(*id);
        }
        tabs.len()
    }

    fn has_capacity(&self) -> bool {
        self.pass_deliveries < DELIVERIES_PER_PASS
    }
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    publish_listener: Option<UnixListener>,
    socket_file: Option<SocketFile>,
    signals: Option<Signals>,
    waker: Arc<Waker>,
    local_addr: SocketAddr,
    publishers: Slab<PublisherConn>,
    fanout: Fanout,
    timers: TimerWheel<TimerEvent>,
    ticks: TickSource,
    started: Instant,
    config: Config,
    ws_config: WebSocketConfig,
    /// Random per process, so client ids differ across restarts.
    instance: u32,
    next_generation: u32,
    next_publisher: u64,
    accept_paused: bool,
    shutting_down: bool,
    finished: bool,
    /// Which pages may open a WebSocket.
    origins: OriginPolicy,
    /// Client messages per connection (`rate_limit`, `rate_burst`).
    message_rate: Rate,
    /// New WebSockets per client address (`connect_rate_per_ip`, bursts of twice that), when
    /// the limit is on.
    connect_rate: Option<Rate>,
    connects_per_ip: HashMap<IpAddr, TokenBucket>,
    /// Publishers paused by the fan-out budget, resumed first in the next pass.
    paused_publishers: Vec<usize>,
    /// The dashboard's stats feed, while the dashboard is on.
    stats: Option<StatsFeed>,
    /// Reused buffers.
    input: SharedInput,
    publish_input: Box<[u8]>,
    /// Clients whose read budget ran out in the last pass, read again first in the next.
    ready_clients: Vec<ConnId>,
    /// `write_stall_timeout` in ticks.
    stall_ticks: u64,
    refusal_log: RefusalLog,
    expired: Vec<TimerEvent>,
}

impl Server {
    /// Binds the TCP listener and the publish socket described by `config`.
    ///
    /// A socket file left by a crashed server is replaced; one a live server still answers on
    /// is an error, and so is a path that exists but is not a socket.
    ///
    /// # Errors
    /// A [`StartupError`] naming the address or path at fault.
    pub fn bind(config: Config) -> Result<Server, StartupError> {
        let poll = Poll::new()?;
        let mut listener =
            TcpListener::bind(config.listen).map_err(|source| StartupError::Listen {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr()?;
        let mut publish_listener =
            bind_publish_socket(&config.publish_socket, config.publish_socket_mode)?;
        let socket_file = SocketFile(config.publish_socket.clone());
        let registry = poll.registry();
        registry.register(
            &mut listener,
            token::encode(Source::Listener),
            Interest::READABLE,
        )?;
        registry.register(
            &mut publish_listener,
            token::encode(Source::PublishListener),
            Interest::READABLE,
        )?;
        let waker = Arc::new(Waker::new(registry, token::encode(Source::Waker))?);
        let started = Instant::now();
        let ticks = TickSource::new(started, TIMER_TICK);
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.read_buffer_size)
            .write_buffer_size(0)
            .max_write_buffer_size(config.max_output_buffer)
            .max_message_size(Some(config.max_message_size))
            .max_frame_size(Some(config.max_message_size));
        let origins = OriginPolicy {
            allowed: config.allowed_origins.clone(),
            require: config.require_origin,
        };
        let tick_secs = TIMER_TICK.as_secs_f64();
        let message_rate = Rate::new(config.rate_limit, f64::from(config.rate_burst), tick_secs);
        let connect_rate = config
            .connect_rate_per_ip
            .map(|rate| Rate::new(rate, 2.0 * rate, tick_secs));
        let auth = match &config.jwt {
            Some(key) => Some(Auth {
                verifier: Verifier::new(key, config.jwt_leeway).map_err(StartupError::Auth)?,
                leeway: config.jwt_leeway,
                max_per_user: config.max_connections_per_user,
                ticks,
            }),
            None => None,
        };
        let stall_ticks = ticks.ticks_in(config.write_stall_timeout);
        let mut timers = TimerWheel::new(Tick(0));
        timers.insert(
            Tick(0).after(ticks.ticks_in(HOUSEKEEPING_INTERVAL)),
            TimerEvent::Housekeeping,
        );
        let stats = config
            .dashboard_enabled()
            .then(|| StatsFeed::new(&Metrics::default(), started));
        let instance = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish() as u32
        };
        log::info!(
            "listening on ws://{local_addr}/ws, publish socket {}",
            config.publish_socket.display()
        );
        Ok(Server {
            poll,
            listener: Some(listener),
            publish_listener: Some(publish_listener),
            socket_file: Some(socket_file),
            signals: None,
            waker,
            local_addr,
            publishers: Slab::new(),
            fanout: Fanout {
                hub: Hub::with_history(HistoryLimits {
                    size: config.history_size,
                    max_bytes: config.history_max_bytes,
                    ttl_ticks: ticks.ticks_in(config.history_ttl),
                    quiet_channels: config.max_quiet_channels,
                }),
                clients: Slab::new(),
                outbox: Outbox {
                    pass_started_us: 0,
                    dirty: Vec::new(),
                },
                metrics: Metrics::default(),
                scratch: Vec::new(),
                pass_deliveries: 0,
                now: Tick(0),
                auth,
                users: HashMap::new(),
                closed_by_command: Vec::new(),
            },
            timers,
            ticks,
            started,
            config,
            ws_config,
            instance,
            next_generation: 0,
            next_publisher: 0,
            accept_paused: false,
            shutting_down: false,
            finished: false,
            origins,
            message_rate,
            connect_rate,
            connects_per_ip: HashMap::new(),
            paused_publishers: Vec::new(),
            stats,
            input: SharedInput::new(SHARED_READ_BUFFER),
            publish_input: vec![0; PUBLISH_READ_BUFFER].into_boxed_slice(),
            ready_clients: Vec::new(),
            stall_ticks,
            refusal_log: RefusalLog::default(),
            expired: Vec::new(),
        })
    }

    /// The bound WebSocket/HTTP address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
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
                self.timers
                    .next_deadline()
                    .map(|t| self.ticks.until(t, Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let pass_started = Instant::now();
            let now = self.ticks.tick_at(pass_started);
            self.fanout.outbox.pass_started_us = micros_since(self.started, pass_started);
            self.fanout.pass_deliveries = 0;
            self.fanout.now = now;
            for key in std::mem::take(&mut self.paused_publishers) {
                self.on_publisher_ready(key);
            }
            for id in std::mem::take(&mut self.ready_clients) {
                if self.fanout.is_current(id) {
                    self.on_client_readable(id.key as usize, now);
                }
            }
            for event in events.iter() {
                match token::decode(event.token()) {
                    Source::Listener => self.accept_clients(now),
                    Source::PublishListener => self.accept_publishers(),
                    Source::Signal => self.on_signal(now),
                    Source::Waker => self.begin_shutdown(now),
                    Source::Client(key) => {
                        if event.is_writable()
                            && let Some(client) = self.fanout.clients.get_mut(key)
                        {
                            self.fanout.outbox.mark_dirty(client);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_client_readable(key, now);
                        }
                    }
                    Source::Publisher(key) => self.on_publisher_ready(key),
                }
            }
            self.fire_timers(now);
            self.close_slow_consumers(now);
            for id in std::mem::take(&mut self.fanout.closed_by_command) {
                if self.fanout.is_current(id) {
                    self.arm_drain_deadline(id.key as usize, now);
                }
            }
            self.flush_dirty(now);
            if self.shutting_down && self.fanout.clients.is_empty() && self.publishers.is_empty() {
                self.finished = true;
            }
        }
        log::info!("stopped");
        Ok(())
    }

    fn accept_clients(&mut self, now: Tick) {
        while !self.accept_paused {
            let Some(listener) = &self.listener else {
                return;
            };
            let (mut socket, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_resource_exhaustion(&e) => {
                    log::warn!(
                        "accept failed ({e}); pausing accepts for {:?}",
                        TIMER_TICK * 10
                    );
                    self.accept_paused = true;
                    self.timers
                        .insert(now.after(ACCEPT_BACKOFF_TICKS), TimerEvent::ResumeAccept);
                    return;
                }
                Err(e) => {
                    log::debug!("accept failed: {e}");
                    continue;
                }
            };
            // Events are small and latency matters more than packet count.
            let _ = socket.set_nodelay(true);
            if self.config.send_buffer_size > 0 {
                // Caps what the kernel holds for this peer: without it, autotuning lets a
                // stalled reader pin megabytes the server's RSS never shows.
                let _ = socket2::SockRef::from(&socket)
                    .set_send_buffer_size(self.config.send_buffer_size);
            }
            let entry = self.fanout.clients.vacant_entry();
            let key = entry.key();
            let token = token::encode(Source::Client(key));
            if let Err(e) = self
                .poll
                .registry()
                .register(&mut socket, token, Interest::READABLE)
            {
                log::error!("cannot register connection from {peer}: {e}");
                continue;
            }
            self.next_generation = self.next_generation.wrapping_add(1);
            let id = ConnId {
                key: key as u32,
                generation: self.next_generation,
            };
            let client = entry.insert(ClientConn::new(
                id,
                socket,
                peer,
                self.config.max_output_buffer,
            ));
            let deadline = now.after(self.ticks.ticks_in(self.config.handshake_timeout));
            client.timer = Some(self.timers.insert(deadline, TimerEvent::Client(id)));
            log::debug!("conn={} accepted from {peer}", id.generation);
        }
    }

    /// Charges a new WebSocket to its client address's bucket (`connect_rate_per_ip`); always
    /// true while the limit is off.
    fn admit_connection(&mut self, client: IpAddr, now: Tick) -> bool {
        const SWEEP_ABOVE: usize = 4096;
        let Some(rate) = self.connect_rate else {
            return true;
        };
        let ip = ratelimit::address_key(client);
        if self.connects_per_ip.len() > SWEEP_ABOVE {
            // Full buckets carry no information: forget those peers.
            self.connects_per_ip
                .retain(|_, bucket| !bucket.is_full(rate, now));
        }
        let bucket = self
            .connects_per_ip
            .entry(ip)
            .or_insert_with(|| TokenBucket::full(rate, now));
        bucket.try_take(rate, now)
    }

    fn accept_publishers(&mut self) {
        let Some(listener) = &self.publish_listener else {
            return;
        };
        loop {
            let mut socket = match listener.accept() {
                Ok((socket, _)) => socket,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("publish socket accept failed: {e}");
                    return;
                }
            };
            if self.publishers.len() >= self.config.max_publishers {
                let max = self.config.max_publishers;
                log::warn!("max_publishers ({max}) reached; refusing a publisher");
                let line = publish::error_reply(
                    None,
                    &format!("too many publishers (max_publishers {max})"),
                );
                // Best effort: a fresh socket's buffer takes one short line.
                let _ = socket.write(line.as_bytes());
                continue;
            }
            let entry = self.publishers.vacant_entry();
            let token = token::encode(Source::Publisher(entry.key()));
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = self.poll.registry().register(&mut socket, token, interest) {
                log::error!("cannot register publisher: {e}");
                continue;
            }
            self.next_publisher += 1;
            entry.insert(PublisherConn::new(self.next_publisher, socket));
            self.fanout.metrics.publishers += 1;
            log::debug!("publisher={} connected", self.next_publisher);
        }
    }

    fn on_publisher_ready(&mut self, key: usize) {
        let Some(publisher) = self.publishers.get_mut(key) else {
            return;
        };
        let status = if publisher.is_finished {
            ReadStatus::Finished
        } else {
            publisher.read_and_execute(
                self.config.max_publish_line,
                &mut self.publish_input,
                &mut self.fanout,
            )
        };
        self.fanout.metrics.publish_errors += std::mem::take(&mut publisher.errors);
        let flushed = publisher.flush();
        let over = publisher.queued() > self.config.max_output_buffer;
        if over {
            log::warn!(
                "publisher={}: more than {} bytes of unread replies; closing",
                publisher.serial,
                self.config.max_output_buffer
            );
        }
        let done = match status {
            ReadStatus::Pending => false,
            ReadStatus::Paused => {
                if !self.paused_publishers.contains(&key) {
                    self.paused_publishers.push(key);
                }
                false
            }
            ReadStatus::Finished => {
                publisher.is_finished = true;
                publisher.queued() == 0
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
        self.fanout.metrics.publishers -= 1;
        log::debug!("publisher={} disconnected", publisher.serial);
    }

    fn on_client_readable(&mut self, key: usize, now: Tick) {
        let Some(client) = self.fanout.clients.get_mut(key) else {
            return;
        };
        if client.is_handshaking() {
            match client.read_request(self.config.max_header_size, &self.origins) {
                RequestOutcome::Incomplete => return,
                RequestOutcome::Gone => return self.drop_client(key),
                RequestOutcome::Refused(refusal) => return self.refuse(key, refusal, now),
                RequestOutcome::Routed { route, rest } => {
                    if !self.route(key, route, rest, now) {
                        return;
                    }
                }
            }
        }
        let client = &mut self.fanout.clients[key];
        if client.is_draining() {
            if client.discard_input() {
                self.drop_client(key);
            }
            return;
        }
        self.input.begin();
        // A client closed by one of its own messages (the rate limit, say) drains: its next
        // `next_message` is `None`, and the rest of this pass's input is discarded with it.
        let result = loop {
            let client = &mut self.fanout.clients[key];
            match client.next_message(now, &mut self.input) {
                Ok(Some(message)) => self.on_message(key, message, now),
                Ok(None) => break Ok(()),
                Err(end) => break Err(end),
            }
        };
        let client = &mut self.fanout.clients[key];
        self.fanout.outbox.mark_dirty(client);
        if result.is_ok() && self.input.readiness() == Readiness::MayHaveMore {
            self.ready_clients.push(client.id);
        }
        match result {
            Ok(()) => {}
            Err(ReadEnd::Closed) => {
                self.close_client(key, DisconnectReason::ClientClosed, None, now);
            }
            Err(ReadEnd::Reset) => {
                self.fanout.end_session(key, DisconnectReason::Reset, None);
                self.drop_client(key);
            }
            Err(ReadEnd::Violation(code, text, reason)) => {
                let client = &self.fanout.clients[key];
                log::warn!(
                    "conn={} from {}: {text}; closing with {code}",
                    client.id.generation,
                    client.peer
                );
                self.close_client(key, reason, Some((code, text)), now);
            }
        }
    }

    fn on_message(&mut self, key: usize, message: Inbound, now: Tick) {
        let client = &mut self.fanout.clients[key];
        if !client.is_open() {
            return;
        }
        // Parsed before the rate limit so that a dropped request's error names its channel
        // and id; a message is at most `max_message_size` and a pass reads a bounded amount.
        let request = match message {
            Inbound::Text(text) => Some(wire::parse_request(&text)),
            Inbound::Binary => Some(Err(wire::Rejection::new(
                ErrorCode::BinaryNotSupported,
                "binary frames are not supported; send JSON in text frames",
            ))),
            Inbound::Ping => None,
        };
        if let Admission::Limited { strikes } = client.admit_message(self.message_rate, now) {
            let limit = self.config.rate_limit_strikes;
            if strikes >= limit {
                log::warn!(
                    "conn={} from {}: {strikes} messages over the rate limit; closing",
                    client.id.generation,
                    client.peer
                );
                let close = (CloseCode::Policy, "rate limit exceeded");
                return self.close_client(key, DisconnectReason::RateLimited, Some(close), now);
            }
            // A protocol Ping has no request to answer; it only counts.
            let Some(request) = &request else {
                return;
            };
            let (channel, id) = match request {
                Ok(request) => request.channel_and_id(),
                Err(rejection) => (rejection.channel.as_deref(), rejection.id.as_ref()),
            };
            let message = format!(
                "more than {} messages per second (burst {}); message dropped",
                self.config.rate_limit, self.config.rate_burst
            );
            client.send_reply(&Reply::Error {
                code: ErrorCode::RateLimited,
                message: &message,
                channel,
                id,
            });
            return self.fanout.outbox.mark_dirty(client);
        }
        match request {
            None => {}
            Some(Ok(request)) => {
                self.fanout
                    .handle_request(key, request, self.config.max_subscriptions, now)
            }
            Some(Err(rejection)) => {
                client.send_reply(&Reply::from(&rejection));
                self.fanout.outbox.mark_dirty(client);
            }
        }
    }

    /// Answers a complete request. Returns true when the connection is now a WebSocket.
    fn route(&mut self, key: usize, route: Route, rest: Vec<u8>, now: Tick) -> bool {
        let response = match route {
            Route::Health => http::ok("application/json", &self.health_json()),
            Route::Metrics => http::ok(
                "text/plain; version=0.0.4; charset=utf-8",
                &self.metrics_text(),
            ),
            Route::Asset {
                asset: Asset::Dashboard,
                ..
            } if self.stats.is_none() => {
                self.refuse(key, Refusal::NotFound, now);
                return false;
            }
            Route::Asset {
                asset,
                if_none_match,
            } => asset.response(if_none_match.as_deref()),
            Route::Upgrade { .. }
                if self.fanout.metrics.connections >= self.config.max_connections as u64 =>
            {
                log::warn!(
                    "max_connections ({}) reached; refusing an upgrade",
                    self.config.max_connections
                );
                self.refuse(key, Refusal::Busy, now);
                return false;
            }
            Route::Upgrade {
                accept_key,
                token,
                forwarded_for,
            } => {
                let peer = self.fanout.clients[key].peer.ip();
                let trusted = &self.config.trusted_proxies;
                let client = http::client_address(peer, forwarded_for.as_deref(), trusted);
                if !self.admit_connection(client, now) {
                    self.refuse(key, Refusal::TooManyRequests, now);
                    return false;
                }
                return self.open_websocket(key, &accept_key, token.as_deref(), rest, now);
            }
        };
        let client = &mut self.fanout.clients[key];
        client.respond(response);
        self.fanout.outbox.mark_dirty(client);
        self.arm_drain_deadline(key, now);
        false
    }

    fn refuse(&mut self, key: usize, refusal: Refusal, now: Tick) {
        let client = &mut self.fanout.clients[key];
        log::debug!(
            "conn={} from {}: refused: {refusal:?}",
            client.id.generation,
            client.peer
        );
        // What an operator must hear of: a page that will retry forever until they act.
        let advice = match &refusal {
            Refusal::Forbidden(Some(origin)) => Some(format!(
                "refused a WebSocket from a page at origin {origin}: not allowed (allow it with \
                 --allowed-origin {origin}, or allowed_origin in the config file)"
            )),
            Refusal::Forbidden(None) => Some(
                "refused a WebSocket without an Origin header: require_origin is on".to_string(),
            ),
            Refusal::TooManyRequests => Some(format!(
                "refused a WebSocket from {}: over connect_rate_per_ip ({}/s); behind a proxy, \
                 list it in trusted_proxies",
                client.peer.ip(),
                self.config.connect_rate_per_ip.unwrap_or_default()
            )),
            _ => None,
        };
        if let Some(advice) = advice
            && let Some(suppressed) = self
                .refusal_log
                .admit(now, self.ticks.ticks_in(REFUSAL_LOG_INTERVAL))
        {
            let more = match suppressed {
                0 => String::new(),
                n => format!(" ({n} more refusals since the last such line)"),
            };
            log::info!("{advice}{more}");
        }
        client.respond(refusal.response());
        self.fanout.metrics.http_refusals += 1;
        self.fanout.outbox.mark_dirty(client);
        self.arm_drain_deadline(key, now);
    }

    /// Completes the upgrade. With authentication on, an invalid token or a user at
    /// `max_connections_per_user` is closed at once (4001, 4008) before anything else is sent.
    /// Returns true when the WebSocket is open.
    fn open_websocket(
        &mut self,
        key: usize,
        accept_key: &str,
        token: Option<&str>,
        rest: Vec<u8>,
        now: Tick,
    ) -> bool {
        let client = &mut self.fanout.clients[key];
        client.upgrade(accept_key, rest, self.ws_config, self.message_rate, now);
        self.fanout.metrics.connections += 1;
        self.fanout.metrics.connections_opened += 1;
        let id = client.id;
        let mut expires = None;
        if let Some(auth) = &self.fanout.auth {
            let identity = match auth.admit(token, &self.fanout.users) {
                Ok(identity) => identity,
                Err((reason, code, text, detail)) => {
                    log::debug!(
                        "conn={} from {}: {text}: {detail}",
                        id.generation,
                        client.peer
                    );
                    self.close_client(key, reason, Some((CloseCode::from(code), text)), now);
                    return false;
                }
            };
            self.fanout
                .users
                .entry(identity.user.clone())
                .or_default()
                .push(id);
            let tick = auth.expiry_tick(&identity, now);
            expires = Some(tick);
            client.set_identity(identity, tick);
        }
        let client_id = format!("{:08x}{:08x}", self.instance, id.generation);
        let heartbeat_ms = self.config.heartbeat_interval.as_millis() as u64;
        let user_id = client.identity().map(|(identity, _)| identity.user.clone());
        client.send_reply(&Reply::Connected {
            client_id: &client_id,
            heartbeat_ms,
            rate_limit: self.config.rate_limit,
            rate_burst: self.config.rate_burst,
            user_id: user_id.as_deref(),
        });
        self.fanout.outbox.mark_dirty(client);
        log::debug!("conn={} upgraded", id.generation);
        let next_ping = now.after(self.ticks.ticks_in(self.config.heartbeat_interval));
        self.arm(key, expires.map_or(next_ping, |e| e.min(next_ping)));
        true
    }

    /// Replaces the connection's timer.
    fn arm(&mut self, key: usize, at: Tick) {
        let client = &mut self.fanout.clients[key];
        if let Some(timer) = client.timer.take() {
            self.timers.cancel(timer);
        }
        client.timer = Some(self.timers.insert(at, TimerEvent::Client(client.id)));
    }

    /// Ends the client's session (optionally sending a Close frame) and gives it
    /// `close_timeout` to finish closing.
    fn close_client(
        &mut self,
        key: usize,
        reason: DisconnectReason,
        close: Option<(CloseCode, &'static str)>,
        now: Tick,
    ) {
        self.fanout.end_session(key, reason, close);
        self.arm_drain_deadline(key, now);
    }

    fn arm_drain_deadline(&mut self, key: usize, now: Tick) {
        let at = now.after(self.ticks.ticks_in(self.config.close_timeout));
        self.arm(key, at);
    }

    fn fire_timers(&mut self, now: Tick) {
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
                TimerEvent::ShutdownDeadline => {
                    log::warn!(
                        "shutdown_timeout reached; dropping {} connection(s)",
                        self.fanout.clients.len()
                    );
                    self.finished = true;
                }
            }
        }
        self.expired = expired;
    }

    fn on_client_timer(&mut self, id: ConnId, now: Tick) {
        let Some(client) = self.fanout.clients.get_mut(id.key as usize) else {
            return;
        };
        if client.id != id {
            return;
        }
        client.timer = None;
        let key = id.key as usize;
        if client.is_handshaking() {
            log::debug!(
                "conn={} from {}: handshake timeout",
                id.generation,
                client.peer
            );
            self.fanout.metrics.handshake_timeouts += 1;
            return self.drop_client(key);
        }
        let Some(last_seen) = client.last_seen() else {
            // Draining took longer than close_timeout.
            return self.drop_client(key);
        };
        if self.shutting_down {
            // Its turn in the shutdown drain.
            return self.close_for_shutdown(key, now);
        }
        let timeout = self.ticks.ticks_in(self.config.heartbeat_timeout);
        if now.since(last_seen) >= timeout {
            log::info!(
                "conn={} from {}: no frame for {:?}; closing (heartbeat timeout)",
                id.generation,
                client.peer,
                self.config.heartbeat_timeout
            );
            let close = (CloseCode::Away, "heartbeat timeout");
            return self.close_client(key, DisconnectReason::HeartbeatTimeout, Some(close), now);
        }
        if client.is_slow(now, self.stall_ticks) {
            return self.close_slow_consumer(key, now);
        }
        let expires = client.identity().map(|(_, expires)| *expires);
        if expires.is_some_and(|expires| expires <= now) {
            log::debug!("conn={} from {}: token expired", id.generation, client.peer);
            let close = (CloseCode::from(4001), "token expired");
            return self.close_client(key, DisconnectReason::TokenExpired, Some(close), now);
        }
        client.send_ping();
        self.fanout.outbox.mark_dirty(client);
        let next_ping = now.after(self.ticks.ticks_in(self.config.heartbeat_interval));
        let next = next_ping.min(last_seen.after(timeout));
        // One timer per connection: the earliest of the next Ping, the silence deadline and
        // the token's expiry (a refresh moves the expiry later; the early wake re-arms).
        self.arm(key, expires.map_or(next, |expires| expires.min(next)));
    }

    /// Closes every dirty client that went over `max_output_buffer` or whose output has not
    /// moved for `write_stall_timeout`. Every path that queues output marks the client
    /// dirty, so this sees every client that could have become slow in this pass.
    fn close_slow_consumers(&mut self, now: Tick) {
        for i in 0..self.fanout.outbox.dirty.len() {
            let key = self.fanout.outbox.dirty[i];
            // `is_slow` first: it reads the connection itself, `is_open` its boxed session.
            if let Some(client) = self.fanout.clients.get(key)
                && client.is_slow(now, self.stall_ticks)
                && client.is_open()
            {
                self.close_slow_consumer(key, now);
            }
        }
    }

    fn close_slow_consumer(&mut self, key: usize, now: Tick) {
        let client = &mut self.fanout.clients[key];
        log::warn!(
            "conn={} from {}: slow consumer, {} bytes unsent (max_output_buffer {}, \
             write_stall_timeout {:?}); closing",
            client.id.generation,
            client.peer,
            client.queued(),
            self.config.max_output_buffer,
            self.config.write_stall_timeout
        );
        client.discard_output();
        let close = (CloseCode::Policy, "slow consumer");
        self.close_client(key, DisconnectReason::SlowConsumer, Some(close), now);
    }

    fn flush_dirty(&mut self, now: Tick) {
        let registry = self.poll.registry();
        let mut broken = Vec::new();
        for key in self.fanout.outbox.dirty.drain(..) {
            let Some(client) = self.fanout.clients.get_mut(key) else {
                continue;
            };
            client.is_dirty = false;
            match client.flush(now) {
                Ok(written) => self.fanout.metrics.bytes_written += written as u64,
                Err(e) => {
                    log::debug!("conn={}: write failed: {e}", client.id.generation);
                    broken.push(key);
                    continue;
                }
            }
            let wants_writable = client.queued() > 0;
            if !wants_writable && client.event_pending_since_us != 0 {
                let written_us = micros_since(self.started, Instant::now());
                let since = std::mem::take(&mut client.event_pending_since_us);
                self.fanout
                    .metrics
                    .latency
                    .observe(written_us.saturating_sub(since));
            }
            if wants_writable != client.wants_writable {
                client.wants_writable = wants_writable;
                if let Err(e) = set_interest(registry, client, key) {
                    log::error!("conn={}: reregister failed: {e}", client.id.generation);
                    broken.push(key);
                }
            }
        }
        for key in broken {
            self.drop_client(key);
        }
    }

    /// Deregisters and forgets a client; the only place that removes from the slab.
    fn drop_client(&mut self, key: usize) {
        if !self.fanout.clients.contains(key) {
            return;
        }
        self.fanout.end_session(key, DisconnectReason::Reset, None);
        let mut client = self.fanout.clients.remove(key);
        if let Some(timer) = client.timer.take() {
            self.timers.cancel(timer);
        }
        let _ = self.poll.registry().deregister(client.socket());
    }

    fn on_signal(&mut self, now: Tick) {
        let Some(signals) = &mut self.signals else {
            return;
        };
        let received = signals.pending().count();
        if received == 0 {
            return;
        }
        if self.shutting_down {
            log::warn!("second signal: exiting now");
            self.finished = true;
        } else {
            self.begin_shutdown(now);
        }
    }

    /// Stops accepting, executes publish lines already received, schedules Close 1001 for
    /// every client over `shutdown_drain` and arms the shutdown deadline. The loop ends once
    /// every connection is gone.
    fn begin_shutdown(&mut self, now: Tick) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        log::info!(
            "shutting down: {} connection(s)",
            self.fanout.metrics.connections
        );
        let registry = self.poll.registry();
        if let Some(mut listener) = self.listener.take() {
            let _ = registry.deregister(&mut listener);
        }
        if let Some(mut listener) = self.publish_listener.take() {
            let _ = registry.deregister(&mut listener);
        }
        self.socket_file = None;
        let keys: Vec<usize> = self.publishers.iter().map(|(key, _)| key).collect();
        for key in keys {
            // Every line already received is delivered, budget or not: pass after pass.
            loop {
                self.paused_publishers.clear();
                self.fanout.pass_deliveries = 0;
                self.on_publisher_ready(key);
                if self.paused_publishers.is_empty() {
                    break;
                }
                self.close_slow_consumers(now);
                self.flush_dirty(now);
            }
            if self.publishers.contains(key) {
                self.drop_publisher(key);
            }
        }
        let keys: Vec<usize> = self.fanout.clients.iter().map(|(key, _)| key).collect();
        let mut open = Vec::with_capacity(keys.len());
        for key in keys {
            let client = &self.fanout.clients[key];
            if client.is_handshaking() {
                self.drop_client(key);
            } else if !client.is_draining() {
                open.push(key);
            }
        }
        // Spread the 1001s over the drain window: one batch per tick, as many ticks as the
        // window holds but no more batches than connections, so a few connections close at
        // once and ten thousand reconnect over the whole window instead of in one storm.
        let ticks = self.ticks.ticks_in(self.config.drain_window()).max(1) as usize;
        let per_batch = open.len().div_ceil(ticks).max(1);
        for (i, key) in open.into_iter().enumerate() {
            let batch = (i / per_batch) as u64;
            if batch == 0 {
                self.close_for_shutdown(key, now);
            } else {
                self.arm(key, now.after(batch));
            }
        }
        let deadline = now.after(self.ticks.ticks_in(self.config.shutdown_timeout));
        self.timers.insert(deadline, TimerEvent::ShutdownDeadline);
    }

    fn close_for_shutdown(&mut self, key: usize, now: Tick) {
        let close = (CloseCode::Away, "server shutting down");
        self.close_client(key, DisconnectReason::Shutdown, Some(close), now);
    }

    /// Sweeps part of the hub, publishes the stats snapshot (dashboard on) and schedules the
    /// next round.
    fn housekeeping(&mut self, now: Tick) {
        self.fanout.hub.sweep(now, SWEEP_SLOTS);
        let uptime_secs = self.uptime_secs();
        if let Some(feed) = &mut self.stats {
            let gauges = self.fanout.gauges(uptime_secs);
            let snapshot = feed.snapshot(&self.fanout.metrics, &gauges, Instant::now());
            let data = RawValue::from_string(snapshot).expect("the stats feed renders valid JSON");
            self.fanout.fan_out(wire::STATS_CHANNEL, &data, None);
        }
        if !self.shutting_down {
            let next = now.after(self.ticks.ticks_in(HOUSEKEEPING_INTERVAL));
            self.timers.insert(next, TimerEvent::Housekeeping);
        }
    }

    fn health_json(&self) -> String {
        format!(
            "{{\"status\":\"ok\",\"connections\":{},\"channels\":{},\"uptimeSecs\":{}}}",
            self.fanout.metrics.connections,
            self.fanout.hub.active_channels(),
            self.uptime_secs()
        )
    }

    fn metrics_text(&self) -> String {
        let gauges = self.fanout.gauges(self.uptime_secs());
        self.fanout.metrics.render(&gauges)
    }

    fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}

fn micros_since(start: Instant, instant: Instant) -> u64 {
    instant.saturating_duration_since(start).as_micros() as u64
}

fn set_interest(registry: &Registry, client: &mut ClientConn, key: usize) -> io::Result<()> {
    let interest = if client.wants_writable {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    registry.reregister(
        client.socket(),
        token::encode(Source::Client(key)),
        interest,
    )
}

/// Accept errors that mean "out of descriptors or memory": retrying at once would spin.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    // Linux errno values: ENOMEM, ENFILE, EMFILE, ENOBUFS.
    matches!(e.raw_os_error(), Some(12 | 23 | 24 | 105))
}

/// Binds the publish socket, replacing a stale file left by a crashed server.
fn bind_publish_socket(path: &Path, mode: u32) -> Result<UnixListener, StartupError> {
    let error = |source| StartupError::PublishSocket {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(error(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(StartupError::SocketInUse {
                    path: path.to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("replacing stale publish socket {}", path.display());
                std::fs::remove_file(path).map_err(error)?;
            }
            Err(e) => return Err(error(e)),
        }
    }
    let listener = UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(error)?;
    Ok(listener)
}
