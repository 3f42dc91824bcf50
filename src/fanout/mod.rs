//! One event to every subscriber's queue, whichever engine assigned it, and the WebSocket
//! sessions it serves.
//!
//! The fan-out asks the [`Engine`] and carries out its answers ([`Happening`]s) in one place,
//! `Fanout::apply`, called right after every engine call: the memory engine answers within
//! the call, the Redis engine when Redis does, through the same values. So there is one path
//! for an event (`Fanout::deliver_event`: one encoded frame, shared by every recipient),
//! one for a subscribe ([`sessions`]: `join`, then `on_joined`), and one for a publish's
//! answer ([`ops`]).
//!
//! The path of one event: a publish command arrives through a [`Serving`] sink (from
//! `publish::port`) → `ops` starts it and asks the engine → the engine answers with
//! `Deliver` (now, or when Redis delivers it to this node) → `Fanout::deliver_event`
//! encodes one frame and queues it to each live local subscriber in the [`Hub`] (and, for a
//! `{"user":...}` publish, to each of the user's connections not subscribed already), then
//! hands it to the engine's history → `Done` completes the publish; the reactor flushes every
//! connection the [`Clients`] guard listed and routes the publisher's answer.
//!
//! - [`hub`]: channel → local subscribers. [`users`]: user → open connections.
//! - [`clients`]: the connection slab and its dirty list.
//! - [`sessions`]: opening and ending sessions, their verdicts, joins.
//! - [`ops`]: publishes in flight and their answers; the [`Serving`] sink.
//! - [`presence`]: which channels have presence, the questions asked of the engine about
//!   their members, and the windows their changes are gathered in.
//! - [`acks`]: acknowledged events: this node's tallies of its pages' acks, and the reports
//!   its workers wait for.
//!
//! Invariants: a connection is in the hub, the user index and the `connections` gauge exactly
//! while its session is open; [`Fanout::end`] takes it out of all three, once. A connection
//! is listed in `joins[channel]` only while it is in the hub for that channel, and gets no
//! live event of it until its join is answered. The fan-out never writes to a socket.

pub mod acks;
pub mod clients;
pub mod hub;
pub mod ops;
pub mod presence;
pub mod sessions;
pub mod users;

use std::collections::HashMap;
use std::sync::Arc;

use crate::auth::admission::Auth;
use crate::auth::ratelimit::Rate;
use crate::base::channel::user_of;
use crate::base::ids::{AckKey, ConnId};
use crate::base::time::Tick;
use crate::config::{Config, TIMER_TICK};
use crate::engine::{AckTag, Engine, Entry, Happening, OpId};
use crate::error::Close;
use crate::ops::metrics::{Gauges, Metrics};
use crate::sse::Arena;
use crate::ws::conn::ClientConn;
use crate::ws::deflate::{Deflater, EventFrame};
use crate::ws::wire::{self, EventTarget, Reply};

pub use acks::AckReport;
use acks::{AckCounts, Mail, Reports, Tallies};
pub use clients::Clients;
pub use hub::Hub;
use ops::Ops;
pub use ops::{Completion, PublisherRef, Serving};
pub use presence::PresenceSettings;
use presence::{Ask, Presence};
use sessions::Join;
pub use users::Users;

/// Fan-out work per loop pass: frames queued (a line to a channel without subscribers counts
/// as one). Past it, publishers pause until the next pass, so one busy channel cannot delay
/// flushing, handshakes or heartbeats, and queues grow by at most this much per pass. 64k is 64
/// events per connection at 1000 subscribers: about one 64 KiB gathered write each.
const DELIVERIES_PER_PASS: usize = 64 * 1024;

/// What sessions are told and judged by, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct SessionSettings {
    /// Random per process, so client ids differ across restarts.
    pub instance: u32,
    /// `heartbeat_interval`, for the `connected` reply.
    pub heartbeat_ms: u64,
    /// `sse_heartbeat_interval`, for an event stream's `connected`.
    pub sse_heartbeat_ms: u64,
    /// Messages per second and burst.
    pub rate: Rate,
    /// `rate_limit`.
    pub rate_limit: f64,
    /// `rate_burst`.
    pub rate_burst: u32,
    /// `rate_limit_strikes`.
    pub rate_limit_strikes: u32,
    /// `max_subscriptions`.
    pub max_subscriptions: usize,
    /// `deflate_min_size`: smaller events go plain to every connection.
    pub deflate_min_size: usize,
    /// `max_pending_acks`.
    pub max_pending_acks: usize,
    /// `max_unacked_per_connection`.
    pub max_unacked_per_connection: usize,
    /// `max_ack_timeout`.
    pub max_ack_timeout: std::time::Duration,
    /// How long past its timeout a report waits for other nodes' counts in transit
    /// (`ack_grace` under the Redis engine; none on one node, where they come at once).
    pub ack_grace: std::time::Duration,
}

impl SessionSettings {
    /// The settings `config` sets; `instance` tells this process's client ids apart.
    pub fn new(config: &Config, instance: u32) -> SessionSettings {
        let tick_secs = TIMER_TICK.as_secs_f64();
        SessionSettings {
            instance,
            heartbeat_ms: config.heartbeat_interval.as_millis() as u64,
            sse_heartbeat_ms: config.sse_heartbeat_interval.as_millis() as u64,
            rate: Rate::new(config.rate_limit, f64::from(config.rate_burst), tick_secs),
            rate_limit: config.rate_limit,
            rate_burst: config.rate_burst,
            rate_limit_strikes: config.rate_limit_strikes,
            max_subscriptions: config.max_subscriptions,
            deflate_min_size: config.deflate_min_size,
            max_pending_acks: config.max_pending_acks,
            max_unacked_per_connection: config.max_unacked_per_connection,
            max_ack_timeout: config.max_ack_timeout,
            ack_grace: match config.engine {
                crate::config::EngineKind::Memory => std::time::Duration::ZERO,
                crate::config::EngineKind::Redis => config.ack_grace,
            },
        }
    }
}

/// The current loop pass, as the fan-out sees it.
#[derive(Clone, Copy, Debug, Default)]
struct Pass {
    now: Tick,
    /// When this pass read its input, in microseconds since the server started.
    started_us: u64,
    /// The Unix time, in milliseconds.
    unix_ms: u64,
    /// Frames queued so far (see `DELIVERIES_PER_PASS`).
    deliveries: usize,
}

impl Pass {
    /// The Unix time, in seconds.
    fn unix_secs(&self) -> u64 {
        self.unix_ms / 1000
    }

    /// The tick at which Unix time `unix_ms` comes, at most `max` from now, and never
    /// early: one tick late at most.
    fn tick_of(&self, unix_ms: u64, max: std::time::Duration) -> Tick {
        let ms = unix_ms
            .saturating_sub(self.unix_ms)
            .min(max.as_millis() as u64);
        let ticks = ms.div_ceil(TIMER_TICK.as_millis() as u64) + 1;
        self.now.after(ticks)
    }
}

/// Connections, channels and counters: everything a publish touches.
pub struct Fanout {
    clients: Clients,
    hub: Hub,
    engine: Box<dyn Engine>,
    users: Users,
    auth: Option<Auth>,
    settings: SessionSettings,
    metrics: Metrics,
    pass: Pass,
    ops: Ops,
    /// Connections waiting for their join's answer, by channel.
    joins: HashMap<Arc<str>, Vec<Join>>,
    /// Reused: the engine's answers being carried out.
    happenings: Vec<Happening>,
    /// `apply` is running: a call from within it (a disconnect ends sessions, which asks the
    /// engine) leaves the new answers to the running one, which takes them next, in order.
    applying: bool,
    /// Reused to build event payloads.
    scratch: Vec<u8>,
    /// Where event streams' per-recipient messages are built.
    arena: Arena,
    /// Compresses each event at most once, for the WebSockets that agreed to it.
    deflater: Deflater,
    /// This node's name, where other nodes send the counts of its reports.
    node: Arc<str>,
    /// This node's counts of the acknowledged events it delivered.
    tallies: Tallies,
    /// The reports this node's workers wait for.
    reports: Reports,
    /// Reused: the tallies' mail being sent.
    outbox: Vec<(Arc<str>, Mail)>,
    /// Presence channels, as this node's pages see them.
    presence: Presence,
    /// Connections closed by a publisher's command; the reactor arms their drain deadline.
    closed_by_command: Vec<ConnId>,
}

impl Fanout {
    /// An empty fan-out over `engine`, on node `node`; `auth` when tokens are required.
    pub fn new(
        engine: Box<dyn Engine>,
        auth: Option<Auth>,
        settings: SessionSettings,
        node: &str,
        presence: PresenceSettings,
    ) -> Fanout {
        Fanout {
            clients: Clients::default(),
            hub: Hub::new(),
            engine,
            users: Users::default(),
            auth,
            settings,
            metrics: Metrics::default(),
            pass: Pass::default(),
            ops: Ops::default(),
            joins: HashMap::new(),
            happenings: Vec::new(),
            applying: false,
            scratch: Vec::new(),
            arena: Arena::default(),
            deflater: Deflater::new(settings.deflate_min_size),
            node: node.into(),
            tallies: Tallies::new(node, settings.max_unacked_per_connection),
            reports: Reports::new(settings.max_pending_acks),
            outbox: Vec::new(),
            presence: Presence::new(presence),
            closed_by_command: Vec::new(),
        }
    }

    /// Starts a loop pass at tick `now`, `started_us` after the server started, at Unix time
    /// `unix_ms` (milliseconds): the fan-out budget is fresh.
    pub fn begin_pass(&mut self, now: Tick, started_us: u64, unix_ms: u64) {
        self.pass = Pass {
            now,
            started_us,
            unix_ms,
            deliveries: 0,
        };
    }

    /// A fresh fan-out budget within the same pass: the shutdown executes every line already
    /// received, flushing between budgets.
    pub fn refill_budget(&mut self) {
        self.pass.deliveries = 0;
    }

    /// The connections.
    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    /// The connections, to change.
    pub fn clients_mut(&mut self) -> &mut Clients {
        &mut self.clients
    }

    /// The message rate limit a new session starts with.
    pub fn message_rate(&self) -> Rate {
        self.settings.rate
    }

    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The counters, to count what the reactor sees (bytes written, refusals, timeouts).
    pub fn metrics_mut(&mut self) -> &mut Metrics {
        &mut self.metrics
    }

    // ---- the engine's answers: the one place they are carried out ----

    /// Carries out what the engine answered since the last call, in order, including what
    /// it answers meanwhile.
    fn apply(&mut self) {
        if self.applying {
            return;
        }
        self.applying = true;
        let mut happenings = std::mem::take(&mut self.happenings);
        loop {
            self.engine.happenings(&mut happenings);
            if happenings.is_empty() {
                break;
            }
            self.carry_out_all(&mut happenings);
        }
        self.happenings = happenings;
        self.applying = false;
    }

    fn carry_out_all(&mut self, happenings: &mut Vec<Happening>) {
        for happening in happenings.drain(..) {
            match happening {
                Happening::Deliver {
                    channel,
                    entry,
                    from,
                } => self.deliver_event(&channel, &entry, from),
                Happening::Gap {
                    channel,
                    seq,
                    epoch,
                } => self.report_gap(&channel, seq, &epoch),
                Happening::Joined(joined) => self.on_joined(joined),
                Happening::Done { part, result } => self.on_done(part, result),
                Happening::Broadcast { data, from } => {
                    let (delivered, skipped) = self.broadcast_local(&data);
                    self.ops.reached(from, delivered, skipped);
                }
                Happening::Disconnect { user, from } => {
                    let closed = self.close_user(&user);
                    self.ops.reached(from, closed, 0);
                }
                Happening::LeaseGranted(conn) => {
                    if self.clients.is_current(conn) {
                        self.send_connected(conn.key as usize);
                    }
                }
                Happening::Mail(message) => match Mail::decode(&message) {
                    Some(mail) => self.reports.on_mail(mail),
                    None => log::warn!("a malformed message in this node's mailbox"),
                },
                Happening::PresenceChanged {
                    channel,
                    version,
                    joined,
                    left,
                } => (self.presence).changed(channel, version, joined, left, self.pass.now),
                Happening::Members { ask, members } => {
                    self.on_members(ask, members.as_ref().map_err(|&e| e));
                }
                Happening::PresenceStale(channel) => self.ask_members(&channel, Ask::Resync),
                Happening::LeaseRefused(conn) => {
                    if self.clients.is_current(conn) {
                        log::debug!("conn={}: user at max_connections_per_user", conn.generation);
                        self.end(conn.key as usize, Close::UserLimit);
                        self.closed_by_command.push(conn);
                    }
                }
            }
        }
    }

    /// An event of `channel`, in its one order: one frame, shared by every live local
    /// subscriber, by every connection of the user of a `{"user":...}` publish not
    /// subscribed already, and by the engine's history.
    fn deliver_event(&mut self, channel: &Arc<str>, entry: &Entry, from: Option<OpId>) {
        let joins = sessions::joiners_before(&mut self.joins, channel, entry.seq);
        let subscribers = self.hub.subscribers(channel);
        let tabs = match user_of(channel) {
            Some(user) if entry.to_user => self.users.connections(user),
            _ => &[],
        };
        self.pass.deliveries += (subscribers.len() + tabs.len()).max(1);
        let ack = entry.ack.as_ref().map(|tag| {
            let deadline = self
                .pass
                .tick_of(tag.deadline_ms, self.settings.max_ack_timeout);
            self.tallies.open(channel, entry.seq, tag, deadline, true)
        });
        if subscribers.is_empty() && tabs.is_empty() && !self.engine.keeps_frames(channel) {
            if let Some(key) = ack {
                self.tallies.all_queued(key); // nobody to wait for: final at once
                self.post_mail();
            }
            return;
        }
        let target = match ack {
            Some(_) => EventTarget::Acked(channel, entry.seq),
            None => EventTarget::Channel(channel, entry.seq),
        };
        let plain = wire::event_frame(target, &entry.data, &mut self.scratch);
        let frame = &mut EventFrame::new(plain, &mut self.deflater);
        let started_us = self.pass.started_us;
        let at = Some((&**channel, entry.seq));
        let arena = &mut self.arena;
        let tallies = &mut self.tallies;
        let (mut delivered, mut skipped) = (0, 0);
        let mut send = |conn: &mut ClientConn| {
            let sent = deliver(conn, frame, at, started_us, arena);
            delivered += usize::from(sent);
            skipped += usize::from(!sent);
            if let (true, Some(key)) = (sent, ack) {
                await_ack(conn, key, tallies);
            }
        };
        for id in subscribers {
            if joins.is_some_and(|joins| joins.iter().any(|j| j.conn == *id)) {
                continue;
            }
            let mut conn = self.clients.live_mut(id.key as usize);
            debug_assert_eq!(conn.id(), *id, "the hub holds only live connections");
            send(&mut conn);
        }
        if !tabs.is_empty() {
            let channel_id = self.hub.find(channel);
            for id in tabs {
                let mut conn = self.clients.live_mut(id.key as usize);
                if !channel_id.is_some_and(|c| conn.is_subscribed(c)) {
                    send(&mut conn);
                }
            }
        }
        self.engine
            .record(channel, entry.seq, frame.plain(), self.pass.now);
        self.metrics.count_frames(delivered, frame.queued);
        self.ops.reached(from, delivered, skipped);
        if let Some(key) = ack {
            self.tallies.all_queued(key);
            self.post_mail();
        }
    }

    /// Tells the live subscribers of `channel` that events up to `seq` are lost.
    fn report_gap(&mut self, channel: &str, seq: u64, epoch: &str) {
        let joins = self.joins.get(channel);
        let gap = Reply::Gap {
            channel,
            seq,
            epoch,
        };
        for id in self.hub.subscribers(channel) {
            if joins.is_some_and(|joins| joins.iter().any(|j| j.conn == *id)) {
                continue;
            }
            self.clients.live_mut(id.key as usize).send_reply(&gap);
        }
        self.metrics.gaps_reported += 1;
    }

    /// A broadcast's frame to every open connection of this node; returns how many got it,
    /// and how many were passed over (closing, or too slow).
    fn broadcast_local(&mut self, data: &[u8]) -> (usize, usize) {
        let plain = wire::event_frame(EventTarget::Broadcast, data, &mut self.scratch);
        let frame = &mut EventFrame::new(plain, &mut self.deflater);
        let started_us = self.pass.started_us;
        let arena = &mut self.arena;
        let (mut delivered, mut skipped) = (0, 0);
        self.clients.for_each(|conn| {
            if !conn.is_open() {
                return; // a handshake under way, or a connection closing
            }
            let sent = deliver(conn, frame, None, started_us, arena);
            delivered += usize::from(sent);
            skipped += usize::from(!sent);
        });
        self.metrics.count_frames(delivered, frame.queued);
        self.pass.deliveries += delivered.max(1);
        (delivered, skipped)
    }

    /// Closes this node's connections of `user` (4003); returns how many.
    fn close_user(&mut self, user: &str) -> usize {
        let tabs = self.users.connections(user).to_vec();
        for id in &tabs {
            self.end(id.key as usize, Close::DisconnectedByServer);
            self.closed_by_command.push(*id);
        }
        tabs.len()
    }

    /// Connections a publisher's `disconnect` closed in this pass.
    pub fn take_closed_by_command(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.closed_by_command)
    }

    // ---- the engine's sockets and timer, for the reactor ----

    /// Readiness on the engine's socket `key`; its answers are carried out at once, so no
    /// client message is judged against a position whose events are not delivered yet.
    pub fn engine_ready(&mut self, key: usize) {
        self.engine.on_ready(key, self.pass.now);
        self.apply();
    }

    /// Writes what the engine queued this pass (a connection that fails answers its requests
    /// as failed, carried out here).
    pub fn engine_flush(&mut self) {
        self.engine.flush(self.pass.now);
        self.apply();
    }

    /// The engine's own upkeep; returns when it is next due.
    pub fn engine_tick(&mut self, now: Tick) -> Option<Tick> {
        let next = self.engine.tick(now);
        self.apply();
        next
    }

    // ---- upkeep and gauges ----

    /// Publishes the stats snapshot to its reserved channel (neither answered nor counted as
    /// an event).
    pub fn publish_stats(&mut self, snapshot: String) {
        let data = serde_json::value::RawValue::from_string(snapshot)
            .expect("the stats feed renders valid JSON");
        let target = crate::publish::Target::Channel(crate::base::channel::STATS_CHANNEL.into());
        self.execute(None, &target, &data, None, None);
    }

    // ---- the fan-out's own deadlines ----

    /// Carries out what is due by `now`: tallies end (their counts go out first: on one node
    /// they come back at once), then reports are made; lingering presence members leave, and
    /// presence windows close, each sent to its channel's pages.
    pub fn fire_deadlines(&mut self, now: Tick) {
        self.tallies.expire(now);
        self.post_mail();
        self.reports.expire(now);
        self.engine.expire_presence(now);
        self.apply();
        for closed in self.presence.closed(now) {
            self.close_window(closed);
        }
    }

    /// When the next tally, report, linger or presence window is due.
    pub fn next_deadline(&self) -> Option<Tick> {
        let deadlines = [
            self.tallies.next_deadline(),
            self.reports.next_deadline(),
            self.engine.presence_due(),
            self.presence.next_due(),
        ];
        deadlines.into_iter().flatten().min()
    }

    // ---- acknowledged events ----

    /// Moves the ack reports made since the last call to the end of `into`.
    pub fn take_ack_reports(&mut self, into: &mut Vec<AckReport>) {
        self.reports.take(into);
    }

    /// Sends the tallies' mail to the nodes assembling the reports (this one's comes back
    /// through the engine at once, carried out here).
    fn post_mail(&mut self) {
        let mut outbox = std::mem::take(&mut self.outbox);
        self.tallies.take_mail(&mut outbox);
        for (to, mail) in outbox.drain(..) {
            self.engine.mail(&to, mail.encode(), self.pass.now);
        }
        self.outbox = outbox;
        self.apply();
    }

    /// Starts counting an event this node replays to a page that resumes here, unless it
    /// counts it already or its wait is over: the page's ack goes to the report.
    fn follow_replayed(&mut self, channel: &Arc<str>, seq: u64, tag: &AckTag) {
        if tag.deadline_ms <= self.pass.unix_ms || self.tallies.find(channel, seq).is_some() {
            return;
        }
        let deadline = self
            .pass
            .tick_of(tag.deadline_ms, self.settings.max_ack_timeout);
        self.tallies.open(channel, seq, tag, deadline, false);
    }

    /// The engine's periodic upkeep.
    pub fn sweep(&mut self, now: Tick) {
        self.engine.sweep(now);
    }

    /// Channels with local subscribers.
    pub fn active_channels(&self) -> usize {
        self.hub.active_channels()
    }

    /// The values `/metrics` and the stats feed sample rather than count.
    pub fn gauges(&self, uptime_secs: u64) -> Gauges {
        let engine = self.engine.gauges();
        Gauges {
            channels: self.hub.active_channels(),
            known_channels: engine.known_channels,
            uptime_secs,
            history_events: engine.history_events,
            history_bytes: engine.history_bytes,
            idempotency_keys: engine.idempotency_keys,
            shared: engine.shared,
            acks: AckCounts::of(&self.tallies, &self.reports),
        }
    }
}

/// Has `conn` (sent an acknowledged event) awaited for its ack, unless it is an event stream
/// (which cannot answer, and is not counted) or already awaits as many as it may (counted as
/// timed out at once).
fn await_ack(conn: &mut ClientConn, key: AckKey, tallies: &mut Tallies) {
    if conn.is_event_stream() {
        return;
    }
    let max = tallies.per_connection;
    let waited = conn
        .session_mut()
        .is_some_and(|session| session.await_ack(key, max, |k| tallies.is_live(k)));
    tallies.queued(key, waited);
}

/// Queues an event to one connection: for a WebSocket the shared frame, plain or compressed
/// (a refcount bump, no copy), for an event stream its message built in `arena`; `at` is the
/// event's channel and seq. A connection that would go over `max_output_buffer` gets nothing more; its queue is
/// marked overflowed, so the reactor closes it as a slow consumer at the end of the pass.
fn deliver(
    conn: &mut ClientConn,
    frame: &mut EventFrame<'_>,
    at: Option<(&str, u64)>,
    started_us: u64,
    arena: &mut Arena,
) -> bool {
    if conn.close_reason().is_some() || !conn.send_event(frame, at, arena) {
        return false;
    }
    conn.note_event(started_us);
    true
}
