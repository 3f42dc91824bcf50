//! One publish to every subscriber's queue, and the WebSocket sessions it serves.
//!
//! The path of one event, top to bottom in this file: a publish command arrives through
//! [`Sink::publish`] (from `publish::port`) → [`Fanout::fan_out`] takes the channel's next
//! seq from the [`Engine`] → encodes one frame, shared by every recipient → queues it to each
//! local subscriber in the [`Hub`] (and, for a `{"user":...}` publish, to each of the user's
//! connections not subscribed already) → hands it to the engine's history. The reactor then
//! flushes every connection the [`Clients`] guard listed.
//!
//! - [`hub`]: channel → local subscribers.
//! - [`users`]: user → open connections.
//! - [`clients`]: the connection slab and its dirty list.
//! - [`shared`]: the same over the Redis engine, whose answers come later.
//!
//! It also carries out the [`Verdict`]s of client sessions (subscribe, resume, refresh) and
//! opens and ends sessions, since each of those changes the hub, the user index and the
//! engine together. Invariants: a connection is in the hub, the user index and the
//! `connections` gauge exactly while its session is open; [`Fanout::end`] takes it out of all
//! three, once. The fan-out never writes to a socket.

pub mod clients;
pub mod hub;
pub mod shared;
pub mod users;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::auth::admission::Auth;
use crate::auth::ratelimit::Rate;
use crate::base::channel::user_channel;
use crate::base::ids::ConnId;
use crate::base::time::Tick;
use crate::engine::Engine;
use crate::engine::redis::RedisEngine;
use crate::error::Close;
use crate::ops::metrics::{Gauges, Metrics};
use crate::publish::{Outcome, Published, Reach, Seqs, Sink, Target};
use crate::ws::conn::ClientConn;
use crate::ws::session::{Inbound, Rules, Verdict};
use crate::ws::wire::{self, EventTarget, Reply};

pub use clients::Clients;
pub use hub::Hub;
pub use shared::Completion;
use shared::Shared;
pub use users::Users;

/// Fan-out work per loop pass: frames queued (a line to a channel without subscribers counts
/// as one). Past it, publishers pause until the next pass, so one busy channel cannot delay
/// flushing, handshakes or heartbeats, and queues grow by at most this much per pass. 64k is 64
/// events per connection at 1000 subscribers: one full `write_vectored` each.
const DELIVERIES_PER_PASS: usize = 64 * 1024;

/// What sessions are told and judged by, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct SessionSettings {
    /// Random per process, so client ids differ across restarts.
    pub instance: u32,
    /// `heartbeat_interval`, for the `connected` reply.
    pub heartbeat_ms: u64,
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
}

/// The current loop pass, as the fan-out sees it.
#[derive(Clone, Copy, Debug, Default)]
struct Pass {
    now: Tick,
    /// When this pass read its input, in microseconds since the server started.
    started_us: u64,
    /// The Unix time, in seconds.
    unix_secs: u64,
    /// Frames queued so far (see `DELIVERIES_PER_PASS`).
    deliveries: usize,
}

/// Connections, channels and counters: everything a publish touches.
pub struct Fanout {
    clients: Clients,
    hub: Hub,
    /// Seqs and history of the channels this node keeps itself: every channel under the
    /// memory engine, the node's own `sidecast:` channels under Redis.
    engine: Box<dyn Engine>,
    /// The Redis engine, for every other channel, when the node runs one.
    shared: Option<Shared>,
    users: Users,
    auth: Option<Auth>,
    settings: SessionSettings,
    metrics: Metrics,
    pass: Pass,
    /// Reused to build event payloads.
    scratch: Vec<u8>,
    /// Connections closed by a publisher's command; the reactor arms their drain deadline.
    closed_by_command: Vec<ConnId>,
}

impl Fanout {
    /// An empty fan-out over `engine` (and `redis` for every channel outside `sidecast:`, when
    /// given); `auth` when tokens are required.
    pub fn new(
        engine: Box<dyn Engine>,
        redis: Option<Box<RedisEngine>>,
        auth: Option<Auth>,
        settings: SessionSettings,
    ) -> Fanout {
        Fanout {
            clients: Clients::default(),
            hub: Hub::new(),
            engine,
            shared: redis.map(Shared::new),
            users: Users::default(),
            auth,
            settings,
            metrics: Metrics::default(),
            pass: Pass::default(),
            scratch: Vec::new(),
            closed_by_command: Vec::new(),
        }
    }

    /// Starts a loop pass at tick `now`, `started_us` after the server started, at Unix time
    /// `unix_secs`: the fan-out budget is fresh.
    pub fn begin_pass(&mut self, now: Tick, started_us: u64, unix_secs: u64) {
        self.pass = Pass {
            now,
            started_us,
            unix_secs,
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

    // ---- the path of one event ----

    /// Publishes one event to one channel: one sequence number, one encoded frame shared by
    /// every subscriber, by every connection of `user` not subscribed to it already, and by
    /// the channel's history. Returns the seq and how many connections it was queued to.
    pub fn fan_out(&mut self, channel: &str, data: &RawValue, user: Option<&str>) -> (u64, usize) {
        let seq = self.engine.next_seq(channel);
        let subscribers = self.hub.subscribers(channel);
        let tabs = user.map_or(&[][..], |user| self.users.connections(user));
        self.pass.deliveries += (subscribers.len() + tabs.len()).max(1);
        if subscribers.is_empty() && tabs.is_empty() && !self.engine.keeps_history() {
            return (seq, 0);
        }
        let frame = wire::event_frame(
            EventTarget::Channel(channel, seq),
            data.get().as_bytes(),
            &mut self.scratch,
        );
        let started_us = self.pass.started_us;
        let mut delivered = 0;
        for id in subscribers {
            let mut conn = self.clients.live_mut(id.key as usize);
            debug_assert_eq!(conn.id(), *id, "the hub holds only live connections");
            delivered += usize::from(deliver(&mut conn, &frame, started_us));
        }
        if !tabs.is_empty() {
            let channel_id = self.hub.find(channel);
            for id in tabs {
                let mut conn = self.clients.live_mut(id.key as usize);
                if !channel_id.is_some_and(|c| conn.is_subscribed(c)) {
                    delivered += usize::from(deliver(&mut conn, &frame, started_us));
                }
            }
        }
        self.engine.record(channel, seq, &frame, self.pass.now);
        (seq, delivered)
    }

    /// [`fan_out`](Fanout::fan_out), counted as a published event.
    fn publish_to(&mut self, channel: &str, data: &RawValue, user: Option<&str>) -> (u64, usize) {
        let (seq, delivered) = self.fan_out(channel, data, user);
        self.metrics.events_published += 1;
        self.metrics.frames_delivered += delivered as u64;
        (seq, delivered)
    }

    /// One frame to every open WebSocket; broadcasts have no seq and no history.
    fn broadcast(&mut self, data: &RawValue) -> usize {
        self.metrics.events_published += 1;
        self.broadcast_local(data.get().as_bytes())
    }

    /// Whether `channel` lives in the shared engine (all but the node's own `sidecast:`
    /// channels, when there is one).
    fn is_shared(&self, channel: &str) -> bool {
        self.shared.is_some() && !channel.starts_with(crate::base::channel::RESERVED_PREFIX)
    }

    /// This node gains a reason to watch `channel`.
    fn watch(&mut self, channel: &str) {
        if self.is_shared(channel) {
            self.shared.as_mut().expect("shared").engine.watch(channel);
        } else {
            self.engine.watch(channel);
        }
    }

    /// This node loses a reason to watch `channel`.
    fn unwatch(&mut self, channel: &str) {
        if self.is_shared(channel) {
            self.shared
                .as_mut()
                .expect("shared")
                .engine
                .unwatch(channel);
        } else {
            self.engine.unwatch(channel, self.pass.now);
        }
    }

    // ---- sessions ----

    /// Opens the session of a connection just upgraded: checks its token (with
    /// authentication on), indexes its user and sends `connected`. Returns when its token
    /// expires, if it has one.
    ///
    /// # Errors
    /// The close verdict for a refused token or a user at `max_connections_per_user`.
    pub fn open(&mut self, key: usize, token: Option<&str>) -> Result<Option<Tick>, Close> {
        self.metrics.connections += 1;
        self.metrics.connections_opened += 1;
        let mut conn = self.clients.live_mut(key);
        let id = conn.id();
        let mut expires = None;
        if let Some(auth) = &self.auth {
            let users = &self.users;
            let identity = auth
                .admit(token, |user| users.connections(user).len())
                .map_err(|(close, detail)| {
                    log::debug!("conn={} from {}: {detail}", id.generation, conn.peer());
                    close
                })?;
            let first = self.users.add(&identity.user, id);
            let tick = auth.expiry_tick(&identity, self.pass.now, self.pass.unix_secs);
            expires = Some(tick);
            let max = auth.max_per_user();
            if let Some(shared) = &mut self.shared {
                // The user's events and disconnects reach this node while a tab is open
                // here; the lease counts the tab on every node.
                if first {
                    shared.engine.watch(&user_channel(&identity.user));
                }
                if shared.engine.lease(&identity.user, id, max) {
                    let session = conn.session_mut().expect("an open session");
                    session.set_identity(identity, tick);
                    return Ok(expires); // `connected` once the lease is held
                }
            }
            let session = conn.session_mut().expect("an open session");
            session.set_identity(identity, tick);
        }
        drop(conn);
        self.send_connected(key);
        Ok(expires)
    }

    /// Sends `connected` to a session just admitted.
    fn send_connected(&mut self, key: usize) {
        let mut conn = self.clients.live_mut(key);
        let id = conn.id();
        let settings = &self.settings;
        let client_id = format!("{:08x}{:08x}", settings.instance, id.generation);
        let session = conn.session().expect("an open session");
        let user_id = session
            .identity()
            .map(|(identity, _)| identity.user.clone());
        conn.send_reply(&Reply::Connected {
            client_id: &client_id,
            heartbeat_ms: settings.heartbeat_ms,
            rate_limit: settings.rate_limit,
            rate_burst: settings.rate_burst,
            user_id: user_id.as_deref(),
        });
    }

    /// Judges one client message and carries out the verdict. Returns a close verdict for
    /// the reactor to act on.
    pub fn on_message(&mut self, key: usize, message: Inbound) -> Option<Close> {
        let now = self.pass.now;
        let mut conn = self.clients.get_mut(key)?;
        if !conn.is_open() {
            return None;
        }
        let settings = &self.settings;
        let rules = Rules {
            rate: settings.rate,
            rate_limit: settings.rate_limit,
            rate_burst: settings.rate_burst,
            strikes: settings.rate_limit_strikes,
            max_subscriptions: settings.max_subscriptions,
            verifier: self.auth.as_ref().map(Auth::verifier),
        };
        let session = conn.session_mut()?;
        let verdict = session.on_message(message, &rules, &self.hub, now);
        let conn_id = conn.id();
        match verdict {
            Verdict::Nothing => {}
            Verdict::Close(close) => return Some(close),
            Verdict::Reject(rejection) => conn.send_reply(&Reply::from(&rejection)),
            Verdict::Pong { id } => conn.send_reply(&Reply::Pong { id: id.as_ref() }),
            Verdict::Subscribe { channel, since, id } => {
                let name = channel.as_str();
                let (channel_id, joined) = self.hub.subscribe(&channel, conn_id);
                conn.session_mut()?.add_subscription(channel_id);
                drop(conn);
                if joined == hub::Joined::First {
                    self.watch(name);
                }
                if self.is_shared(name) {
                    self.join_shared(key, name, since, id);
                    return None;
                }
                let mut conn = self.clients.live_mut(key);
                // Replayed within this call: on one thread no publish can land between the
                // replay and live delivery, so there is no gap and no duplicate.
                let missed = since.map(|since| self.engine.replay(name, &since, now));
                let position = self.engine.position(name);
                conn.send_reply(&Reply::Subscribed {
                    channel: name,
                    seq: position.seq,
                    epoch: position.epoch,
                    recovered: missed.as_ref().map(Option::is_some),
                    id: id.as_ref(),
                });
                for frame in missed.flatten().unwrap_or_default() {
                    deliver(&mut conn, &frame, self.pass.started_us);
                }
            }
            Verdict::Unsubscribe { channel, id } => {
                let mut last = None;
                if let Some(channel_id) = self.hub.find(channel.as_str())
                    && conn.session_mut()?.remove_subscription(channel_id)
                {
                    last = self.hub.unsubscribe(channel_id, conn_id);
                }
                conn.send_reply(&Reply::Unsubscribed {
                    channel: channel.as_str(),
                    id: id.as_ref(),
                });
                drop(conn);
                self.forget_join(channel.as_str(), conn_id);
                if let Some(name) = last {
                    self.unwatch(&name);
                }
            }
            Verdict::Refresh { identity, id } => {
                let auth = self.auth.as_ref()?;
                let expires_at = identity.expires_at;
                let tick = auth.expiry_tick(&identity, now, self.pass.unix_secs);
                conn.session_mut()?.set_identity(identity, tick);
                conn.send_reply(&Reply::Refreshed {
                    expires_at,
                    id: id.as_ref(),
                });
            }
        }
        None
    }

    /// Ends a connection's session for `close` (the first reason given sticks), queuing the
    /// Close frame: leaves every channel, forgets its user, updates the gauge and counts the
    /// disconnect, once.
    pub fn end(&mut self, key: usize, close: Close) {
        let Some(mut conn) = self.clients.get_mut(key) else {
            return;
        };
        let Some(ended) = conn.end(close) else {
            return;
        };
        let id = conn.id();
        let reason = conn.close_reason().unwrap_or(close);
        drop(conn);
        for channel in ended.subscriptions {
            let name = self.hub.name(channel);
            self.forget_join(&name, id);
            if let Some(name) = self.hub.unsubscribe(channel, id) {
                self.unwatch(&name);
            }
        }
        if let Some(user) = ended.user {
            let last = self.users.remove(&user, id);
            if let Some(shared) = &mut self.shared {
                shared.engine.release(id);
                if last {
                    shared.engine.unwatch(&user_channel(&user));
                }
            }
        }
        self.metrics.connections -= 1;
        self.metrics.disconnected(reason);
        log::debug!("conn={} closed: {}", id.generation, reason.label());
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

    // ---- upkeep and gauges ----

    /// Publishes the stats snapshot to its reserved channel (not counted as an event).
    pub fn publish_stats(&mut self, snapshot: String) {
        let data = RawValue::from_string(snapshot).expect("the stats feed renders valid JSON");
        self.fan_out(crate::base::channel::STATS_CHANNEL, &data, None);
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
            redis: self.redis_state(),
        }
    }
}

/// Queues a shared frame to one connection: a refcount bump, no copy. A connection that
/// would go over `max_output_buffer` gets nothing more; its queue is marked overflowed, so
/// the reactor closes it as a slow consumer at the end of the pass.
fn deliver(conn: &mut ClientConn, frame: &Bytes, started_us: u64) -> bool {
    if conn.close_reason().is_some() || !conn.send_frame(frame.clone()) {
        return false;
    }
    conn.note_event(started_us);
    true
}

impl Sink for Fanout {
    fn publish(&mut self, target: &Target<'_>, data: &RawValue, idem: Option<&str>) -> Outcome {
        if self.shared.is_some() {
            return self.publish_shared(target, data, idem);
        }
        let now = self.pass.now;
        if let Some(key) = idem
            && let Some(first) = self.engine.recall(key, now)
        {
            self.metrics.publish_duplicates += 1;
            return Outcome::Done(Published {
                duplicate: true,
                ..first
            });
        }
        let (seqs, delivered) = match target {
            Target::Channel(channel) => {
                let (seq, delivered) = self.publish_to(channel, data, None);
                (Seqs::One(seq), delivered)
            }
            Target::Channels(channels) => {
                let mut seqs = Vec::with_capacity(channels.len());
                let mut delivered = 0;
                for channel in channels {
                    let (seq, count) = self.publish_to(channel, data, None);
                    seqs.push(seq);
                    delivered += count;
                }
                (Seqs::Many(seqs), delivered)
            }
            Target::User(user) => {
                let channel = user_channel(user);
                let (seq, delivered) = self.publish_to(&channel, data, Some(user));
                (Seqs::One(seq), delivered)
            }
            Target::Broadcast => (Seqs::None, self.broadcast(data)),
        };
        let published = Published {
            seqs,
            reach: Reach::Connections(delivered),
            duplicate: false,
        };
        if let Some(key) = idem {
            self.engine.remember(key, &published, now);
        }
        Outcome::Done(published)
    }

    fn disconnect_user(&mut self, user: &str) -> Outcome {
        if self.shared.is_some() {
            return self.disconnect_shared(user);
        }
        Outcome::Done(Published {
            seqs: Seqs::None,
            reach: Reach::Disconnected(self.close_user(user)),
            duplicate: false,
        })
    }

    fn has_capacity(&self) -> bool {
        self.pass.deliveries < DELIVERIES_PER_PASS
            && self
                .shared
                .as_ref()
                .is_none_or(|shared| shared.engine.has_capacity())
    }
}
