//! The Redis engine: nodes share channels, seqs, history, resume and per-user limits
//! through one Redis or a Redis Cluster, over non-blocking connections in the reactor's own
//! `Poll` (no thread, no async runtime).
//!
//! ```text
//!  publish ─► PUBLISH script (seq, stream, SPUBLISH) ─► Done: the worker's ok
//!                                   └─► every node's shard-channel subscription
//!                                         └─► Sequencer (order, gaps) ─► Happening::Deliver
//! ```
//! A node delivers from its subscription only, the publishing node too, so every node sees
//! Redis's one order. Each node also has a mailbox, a shard channel of its own, where other
//! nodes send it the counts of its acknowledged events ([`Engine::mail`]). It implements [`Engine`]: the fan-out asks, and the answers come back
//! as [`Happening`]s when Redis answers. The node's own `sidecast:` channels (its stats feed)
//! are not shared: an inner [`MemoryEngine`] keeps them, answering through the same values.
//!
//! - [`resp`]: RESP3 encode and decode. [`link`]: one connection. [`cluster`]: the slot map.
//! - [`scripts`]: the Lua scripts, the key layout, the message tags. [`sequencer`]: one
//!   channel's order.
//! - `calls`: requests and what their answers are for. `shards`: the connections (one per
//!   master), backoff, the slot map, writing calls. `channels`: subscriptions, reads, joins,
//!   the position check. `replies`: replies and pushes → happenings. `presence`: presence
//!   rosters in Redis, their leases, reaps and restores.
//!
//! Invariants: a request is answered exactly once, by Redis or as [`Unavailable`] when its
//! connection fails (a publish is never retried by the node: the worker decides, with an
//! `idem` key for exactly once); a channel this node watches is subscribed on the shard that
//! owns its slot whenever that shard is up, and every (re)subscription is followed by a read
//! that fills what was missed; a join waits, across reconnects, until a read answers it; the
//! engine reads no clock: `now` is the reactor's tick.

mod calls;
mod channels;
pub mod cluster;
pub mod link;
mod presence;
mod replies;
pub mod resp;
pub mod scripts;
pub mod sentinel;
pub mod sequencer;
mod shards;
pub mod tls;

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mio::Registry;

use super::memory::MemoryEngine;
use super::presence::Present;
use super::{
    AckTag, Engine, EngineGauges, Event, Happening, OpId, Part, SharedState, TokenOf, Unavailable,
};
use crate::base::channel::{Backfill, RESERVED_PREFIX, user_channel};
use crate::base::ids::ConnId;
use crate::base::time::{Tick, TickSource};
use crate::config::RedisUrl;
use crate::publish::Published;
use calls::{Call, Purpose, Request};
use link::Incoming;
use scripts::{Keys, Script, tag};
use sentinel::{SentinelSettings, Sentinels};
use sequencer::{Sequencer, Step};
use shards::{Access, Shards};
use tls::Tls;

/// The shard channel every node subscribes to for broadcasts.
const BROADCAST_CHANNEL: &str = "sidecast:all";
/// Node `<id>`'s mail comes on the shard channel `sidecast:node:<id>`.
const MAILBOX_PREFIX: &str = "sidecast:node:";
/// A lease renewal's `max`: a connection already open is never refused by its renewal.
const RENEW: &[u8] = b"1000000000";
/// Channels whose position is checked per tick, at most, so a check round of many channels
/// is spread out instead of sent to Redis at once.
const CHECKS_PER_TICK: usize = 256;
/// Time between two rounds of upkeep (see [`Engine::tick`]).
const TICK: Duration = Duration::from_millis(50);
/// The Sentinel connection's socket key, beside the shards' (which count from 0).
const SENTINEL_KEY: usize = 1 << 32;

/// What the Redis engine runs by, from the configuration.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// Seed addresses: a standalone Redis, or some nodes of a cluster; under Sentinel, at
    /// most one, for its credentials and scheme.
    pub urls: Vec<RedisUrl>,
    /// The Sentinels to ask for the primary, when Redis runs under Sentinel.
    pub sentinel: Option<SentinelSettings>,
    /// TLS, when a URL is `rediss://` or `redis_tls` is on.
    pub tls: Option<Tls>,
    /// `redis_tls`: every connection, Sentinels included, uses TLS.
    pub tls_everywhere: bool,
    /// Prefix of every key and shard channel.
    pub prefix: String,
    /// This node's name, in lease members and `CLIENT SETNAME`.
    pub node_id: String,
    /// Events kept per channel's stream (`history_size`).
    pub history_size: usize,
    /// Lifetime of a stream after its last event (`history_ttl`).
    pub history_ttl: Duration,
    /// `idempotency_window`.
    pub idempotency_window: Duration,
    /// A reply later than this fails the connection (`redis_timeout`).
    pub timeout: Duration,
    /// `user_lease_ttl`: also the lease of a connection in a presence roster.
    pub lease_ttl: Duration,
    /// `presence_linger`.
    pub presence_linger: Duration,
    /// `redis_check_interval`: how often each watched channel's delivered position is
    /// compared with Redis's.
    pub check_interval: Duration,
    /// `redis_max_in_flight`: publishes sent and not yet answered, node-wide; past it,
    /// publishers pause.
    pub max_in_flight: usize,
    /// `redis_max_in_flight_bytes`: the same in bytes of event data (what waits in the
    /// connections' output buffers and in the calls kept for a resend).
    pub max_in_flight_bytes: usize,
}

impl RedisSettings {
    /// How long a channel's epoch and seq outlive its last publish or read: at least a day,
    /// so that a quiet channel a page watches is not given a new epoch (a false gap).
    fn meta_ttl(&self) -> Duration {
        self.history_ttl.max(Duration::from_secs(24 * 3600))
    }
}

/// The settings' periods, in ticks.
struct Periods {
    tick: u64,
    reap: u64,
    timeout: u64,
    renew: u64,
    refresh: u64,
    check: u64,
}

/// A channel this node watches.
struct Watched {
    keys: Keys,
    /// Reasons to watch: local subscribers, and a user's connections for `user:` channels.
    interest: u32,
    order: Sequencer,
    /// Joins to send once the channel's shard is up.
    queued: Vec<(ConnId, Backfill)>,
    /// The shard whose connection carries its subscription (asked or confirmed); `None`
    /// while it is subscribed nowhere, which `/health` reports.
    subscribed_on: Option<usize>,
}

/// When the periodic work is next due.
struct Due {
    renewal: Tick,
    reap: Tick,
    refresh: Tick,
    check: Tick,
}

/// The Redis engine.
pub struct RedisEngine {
    settings: RedisSettings,
    periods: Periods,
    shards: Shards,
    /// The Sentinel connection, under Sentinel.
    sentinels: Option<Sentinels>,
    channels: HashMap<Arc<str>, Watched>,
    broadcast: Keys,
    /// This node's mailbox.
    mailbox: Keys,
    /// Leases this node holds: connection → its user.
    leases: HashMap<ConnId, Arc<str>>,
    /// This node's connections on presence channels, by channel.
    presence: HashMap<Arc<str>, Vec<presence::Here>>,
    /// The highest presence version seen, by channel.
    versions: HashMap<Arc<str>, u64>,
    /// Presence channels whose pages get a fresh snapshot when their time comes.
    stale_presence: Vec<(Tick, Arc<str>)>,
    /// The node's own `sidecast:` channels.
    local: MemoryEngine,
    out: Vec<Happening>,
    incoming: Vec<Incoming<Request>>,
    steps: Vec<Step>,
    epoch_seed: RandomState,
    epochs_made: u64,
    in_flight: usize,
    in_flight_bytes: usize,
    due: Due,
    /// Channels still to check this round.
    to_check: Vec<Arc<str>>,
    /// Calls to send again next tick (`TRYAGAIN`, `CLUSTERDOWN`).
    retries: Vec<(Call, Purpose)>,
    gaps: u64,
    repairs: u64,
}

impl RedisEngine {
    /// An engine that starts connecting to the first seed at `now`. `registry` is the
    /// reactor's, and `token_of` names the token of each of the engine's sockets; `local`
    /// keeps the node's own channels; `ticks` converts the settings' durations.
    ///
    /// # Errors
    /// The registry cannot be shared.
    pub fn new(
        settings: RedisSettings,
        registry: &Registry,
        token_of: TokenOf,
        local: MemoryEngine,
        ticks: TickSource,
        now: Tick,
    ) -> std::io::Result<RedisEngine> {
        // A few reaps per linger (and per lease), between 100 ms and 1 s apart.
        let reap = (settings.presence_linger.min(settings.lease_ttl) / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        let periods = Periods {
            tick: ticks.ticks_in(TICK),
            reap: ticks.ticks_in(reap),
            timeout: ticks.ticks_in(settings.timeout),
            renew: ticks.ticks_in(settings.lease_ttl / 3),
            refresh: ticks.ticks_in(settings.meta_ttl() / 4),
            check: ticks.ticks_in(settings.check_interval),
        };
        let access = Access {
            urls: settings.urls.clone(),
            sentinel: settings.sentinel.is_some(),
            tls: settings.tls.clone(),
            tls_everywhere: settings.tls_everywhere,
        };
        let shards = Shards::new(
            access,
            &settings.node_id,
            registry.try_clone()?,
            token_of,
            ticks,
        );
        let sentinels = match &settings.sentinel {
            Some(sentinel) => Some(Sentinels::new(
                sentinel.clone(),
                settings.tls.clone().filter(|_| settings.tls_everywhere),
                registry.try_clone()?,
                token_of(SENTINEL_KEY),
                ticks,
            )),
            None => None,
        };
        let mut engine = RedisEngine {
            due: Due {
                renewal: now.after(periods.renew),
                reap: now.after(periods.reap),
                refresh: now.after(periods.refresh),
                check: now.after(periods.check),
            },
            periods,
            shards,
            sentinels,
            channels: HashMap::new(),
            broadcast: Keys::of(&settings.prefix, BROADCAST_CHANNEL),
            mailbox: mailbox(&settings.prefix, &settings.node_id),
            leases: HashMap::new(),
            presence: HashMap::new(),
            versions: HashMap::new(),
            stale_presence: Vec::new(),
            local,
            out: Vec::new(),
            incoming: Vec::new(),
            steps: Vec::new(),
            epoch_seed: RandomState::new(),
            epochs_made: 0,
            in_flight: 0,
            in_flight_bytes: 0,
            to_check: Vec::new(),
            retries: Vec::new(),
            gaps: 0,
            repairs: 0,
            settings,
        };
        match &mut engine.sentinels {
            Some(sentinels) => sentinels.connect(now),
            None => engine.shards.start(now),
        }
        Ok(engine)
    }

    /// The state `/health` and `/metrics` report.
    fn state(&self) -> SharedState {
        let (shards, shards_up) = self.shards.counts();
        let unsubscribed = self.channels.values();
        let unsubscribed = unsubscribed.filter(|w| w.subscribed_on.is_none()).count();
        SharedState {
            // A node that serves nothing on a channel its pages watch is not healthy.
            up: self.shards.has_map() && shards_up == shards && unsubscribed == 0,
            shards_up,
            shards,
            in_flight: self.in_flight,
            held: self.channels.values().map(|w| w.order.held()).sum(),
            channels: self.channels.len(),
            unsubscribed,
            disconnects: self.shards.disconnects,
            gaps: self.gaps,
            repairs: self.repairs,
            primary: self.sentinels.as_ref().and_then(|s| s.primary.clone()),
            switches: self.sentinels.as_ref().map_or(0, |s| s.switches),
        }
    }

    /// The Sentinels named a primary: connect to it, or, when it is not the node this one
    /// uses, leave that node (what waited on it is answered as failed, to retry) and connect
    /// to the new one.
    fn follow_primary(&mut self, addr: &str, now: Tick) {
        let Some(key) = self.shards.sole() else {
            let key = self.shards.key_of(addr);
            self.shards.connect(key, now);
            return;
        };
        let current = self
            .shards
            .get(key)
            .map(|s| s.addr.clone())
            .unwrap_or_default();
        if current == addr {
            self.shards.ensure_connecting(key, now);
            return;
        }
        log::warn!("redis: the Sentinels name {addr} the primary (was {current}); moving");
        self.fail(key, "the Sentinels named another primary", now);
        self.shards.readdress(key, addr);
        self.shards.connect(key, now);
    }

    fn start_flight(&mut self, bytes: usize) {
        self.in_flight += 1;
        self.in_flight_bytes += bytes;
    }

    fn end_flight(&mut self, bytes: usize) {
        self.in_flight -= 1;
        self.in_flight_bytes -= bytes;
    }

    /// The node's own channels (`sidecast:`) stay in the inner memory engine.
    fn is_local(channel: &str) -> bool {
        channel.starts_with(RESERVED_PREFIX)
    }

    /// Moves the inner memory engine's answers to the engine's own, in order.
    fn take_local(&mut self) {
        self.local.happenings(&mut self.out);
    }

    /// `SPUBLISH` of `message` on `keys`' shard channel, for part 0 of `op`.
    fn signal(
        &mut self,
        op: OpId,
        keys: &Keys,
        message: Bytes,
        now: Tick,
    ) -> Result<(), Unavailable> {
        let shard = self.shards.up(keys.slot()).ok_or(Unavailable)?;
        let bytes = message.len();
        let call = Call::command(vec![
            Bytes::from_static(b"SPUBLISH"),
            keys.shard_channel.clone().into(),
            message,
        ]);
        self.start_flight(bytes);
        self.shards
            .send_call(shard, call, Purpose::Signal { op, bytes }, now);
        Ok(())
    }

    /// Takes (`max`) or renews (`RENEW`) the lease of `conn` of `user`; returns whether
    /// Redis was asked.
    fn send_lease(&mut self, user: &str, conn: ConnId, max: Bytes, fresh: bool, now: Tick) -> bool {
        let keys = Keys::of(&self.settings.prefix, &user_channel(user));
        let Some(shard) = self.shards.up(keys.slot()) else {
            return false;
        };
        let args = [
            self.lease_member(conn).into(),
            millis(self.settings.lease_ttl),
            max,
        ];
        let call = Call::script(Script::Lease, vec![keys.leases().into()], args);
        self.shards
            .send_call(shard, call, Purpose::Lease { conn, fresh }, now);
        true
    }

    /// The leases this node holds, to renew or take again.
    fn held_leases(&self) -> Vec<(ConnId, Arc<str>)> {
        let leases = self.leases.iter();
        leases
            .map(|(conn, user)| (*conn, Arc::clone(user)))
            .collect()
    }

    fn lease_member(&self, conn: ConnId) -> String {
        format!("{}:{}.{}", self.settings.node_id, conn.key, conn.generation)
    }

    /// Shard `key`'s connection failed: its requests are answered as failed or kept for the
    /// heal, its channels are subscribed nowhere until it (or their new owner) is back.
    fn fail(&mut self, key: usize, why: &str, now: Tick) {
        let waiting = self.shards.fail(key, why, now);
        self.lost_subscriptions(key);
        self.abandon_all(waiting);
        if let Some(sentinels) = &mut self.sentinels {
            // The primary may have moved: ask.
            sentinels.ask(now);
        }
    }

    fn abandon_all(&mut self, requests: Vec<Request>) {
        for request in requests {
            if let Request::Call(_, purpose) = request {
                self.abandon(purpose);
            }
        }
    }

    /// A request whose connection failed before it was answered.
    fn abandon(&mut self, purpose: Purpose) {
        match purpose {
            Purpose::Publish { part, bytes } => {
                self.end_flight(bytes);
                let result = Err(Unavailable);
                self.out.push(Happening::Done { part, result });
            }
            Purpose::Signal { op, bytes } => {
                self.end_flight(bytes);
                let part = Part { op, index: 0 };
                let result = Err(Unavailable);
                self.out.push(Happening::Done { part, result });
            }
            Purpose::Read { channel, read } => self.abandon_read(&channel, read),
            // Mended by the next renewal or reap, or the next time the shard comes back.
            Purpose::Presence | Purpose::Restore { .. } => {}
            Purpose::Members { ask, .. } => {
                let members = Err(Unavailable);
                self.out.push(Happening::Members { ask, members });
            }
            // Admitted on this node's count; the lease is taken again on heal.
            Purpose::Lease { conn, fresh } => {
                if fresh && self.leases.contains_key(&conn) {
                    self.out.push(Happening::LeaseGranted(conn));
                }
            }
        }
    }

    /// Removes the shards a new slot map left out, answering what waited on them as failed.
    fn remove_retired(&mut self) {
        for (key, waiting) in self.shards.remove_retired() {
            self.lost_subscriptions(key);
            self.abandon_all(waiting);
        }
    }

    fn new_epoch(&mut self) -> String {
        self.epochs_made += 1;
        let mut hasher = self.epoch_seed.build_hasher();
        hasher.write_u64(self.epochs_made);
        format!("{:08x}", hasher.finish() as u32)
    }
}

impl Engine for RedisEngine {
    fn publish(&mut self, part: Part, event: &Event<'_>, now: Tick) -> Result<(), Unavailable> {
        if Self::is_local(event.channel) {
            let published = self.local.publish(part, event, now);
            self.take_local();
            return published;
        }
        let keys = Keys::of(&self.settings.prefix, event.channel);
        let shard = self.shards.up(keys.slot()).ok_or(Unavailable)?;
        let mut script_keys: Vec<Bytes> = vec![keys.meta().into(), keys.stream().into()];
        if let Some(idem) = event.idem {
            script_keys.push(keys.idempotency(idem).into());
        }
        let epoch = self.new_epoch();
        let ack = event.ack.map(AckTag::encode).unwrap_or_default();
        let kind = if event.to_user {
            &tag::USER_EVENT
        } else {
            &tag::EVENT
        };
        let args = [
            Bytes::from(keys.shard_channel.clone()),
            Bytes::from_static(std::slice::from_ref(kind)),
            Bytes::copy_from_slice(event.data),
            Bytes::from(epoch),
            number(self.settings.history_size as u64),
            millis(self.settings.history_ttl),
            millis(self.settings.meta_ttl()),
            millis(self.settings.idempotency_window),
            Bytes::from(ack),
        ];
        let call = Call::script(Script::Publish, script_keys, args);
        let bytes = event.data.len();
        self.start_flight(bytes);
        self.shards
            .send_call(shard, call, Purpose::Publish { part, bytes }, now);
        Ok(())
    }

    fn broadcast(&mut self, op: OpId, data: &[u8], now: Tick) -> Result<(), Unavailable> {
        let mut message = BytesMut::with_capacity(data.len() + 1);
        message.extend_from_slice(&[tag::BROADCAST]);
        message.extend_from_slice(data);
        let keys = self.broadcast.clone();
        self.signal(op, &keys, message.freeze(), now)
    }

    fn disconnect(&mut self, op: OpId, user: &str, now: Tick) -> Result<(), Unavailable> {
        let keys = Keys::of(&self.settings.prefix, &user_channel(user));
        let message = Bytes::from_static(std::slice::from_ref(&tag::DISCONNECT));
        self.signal(op, &keys, message, now)
    }

    /// Idempotency keys live in Redis, per channel, checked by the publish script.
    fn recall(&mut self, _key: &str, _now: Tick) -> Option<Published> {
        None
    }

    fn remember(&mut self, _key: &str, _published: &Published, _now: Tick) {}

    fn keeps_frames(&self, channel: &str) -> bool {
        Self::is_local(channel) && self.local.keeps_frames(channel)
    }

    fn record(&mut self, channel: &str, seq: u64, frame: &Bytes, now: Tick) {
        if Self::is_local(channel) {
            self.local.record(channel, seq, frame, now);
        }
    }

    fn watch(&mut self, channel: &str, now: Tick) {
        if Self::is_local(channel) {
            self.local.watch(channel);
        } else {
            self.watch_shared(channel, now);
        }
    }

    fn unwatch(&mut self, channel: &str, now: Tick) {
        if Self::is_local(channel) {
            self.local.unwatch(channel, now);
        } else {
            self.unwatch_shared(channel, now);
        }
    }

    fn join(&mut self, channel: &str, conn: ConnId, backfill: Backfill, now: Tick) {
        if Self::is_local(channel) {
            Engine::join(&mut self.local, channel, conn, backfill, now);
            self.take_local();
        } else {
            self.join_shared(channel, conn, backfill, now);
        }
    }

    /// The user's channel is watched while a tab is open here (its events and disconnects
    /// reach this node), and a lease counts the tab on every node. While Redis is down the
    /// connection is admitted on this node's count alone and its lease taken on heal.
    fn admit(&mut self, user: &str, conn: ConnId, max: usize, first: bool, now: Tick) -> bool {
        if first {
            self.watch_shared(&user_channel(user), now);
        }
        self.leases.insert(conn, user.into());
        self.send_lease(user, conn, number(max as u64), true, now)
    }

    fn release(&mut self, user: &str, conn: ConnId, last: bool, now: Tick) {
        if self.leases.remove(&conn).is_some() {
            let keys = Keys::of(&self.settings.prefix, &user_channel(user));
            let member = self.lease_member(conn);
            if let Some((_, link)) = self.shards.up_link(keys.slot()) {
                let leases = keys.leases();
                let args: [&[u8]; 3] = [b"ZREM", leases.as_bytes(), member.as_bytes()];
                link.send(&args, Some(Request::Ignore), now);
            }
        }
        if last {
            self.unwatch_shared(&user_channel(user), now);
        }
    }

    fn present(&mut self, channel: &str, present: &Present<'_>, now: Tick) {
        self.present_shared(channel, present, now);
    }

    fn absent(&mut self, channel: &str, member: &str, client: &str, now: Tick) {
        self.absent_shared(channel, member, client, now);
    }

    fn members(&mut self, channel: &str, ask: usize, now: Tick) {
        self.members_shared(channel, ask, now);
    }

    /// Lingers end in Redis, found by the reaps of [`Engine::tick`].
    fn presence_due(&self) -> Option<Tick> {
        None
    }

    fn expire_presence(&mut self, _now: Tick) {}

    /// Mail to this node is answered at once; to another, an `SPUBLISH` on its mailbox that
    /// nothing waits for (a node that is gone has no subscriber to it).
    fn mail(&mut self, to: &str, message: Bytes, now: Tick) {
        if to == self.settings.node_id {
            self.out.push(Happening::Mail(message));
            return;
        }
        let keys = mailbox(&self.settings.prefix, to);
        match self.shards.up_link(keys.slot()) {
            Some((_, link)) => {
                let args: [&[u8]; 3] = [b"SPUBLISH", keys.shard_channel.as_bytes(), &message];
                link.send(&args, Some(Request::Ignore), now);
            }
            None => log::debug!("redis: mail to node {to} dropped: its shard is down"),
        }
    }

    fn has_capacity(&self) -> bool {
        self.in_flight < self.settings.max_in_flight
            && self.in_flight_bytes < self.settings.max_in_flight_bytes
    }

    fn happenings(&mut self, out: &mut Vec<Happening>) {
        out.append(&mut self.out);
    }

    fn on_ready(&mut self, key: usize, now: Tick) {
        if key == SENTINEL_KEY {
            let named = self.sentinels.as_mut().map(|s| s.on_ready(now));
            for addr in named.unwrap_or_default() {
                self.follow_primary(&addr, now);
            }
            return;
        }
        let Some(link) = self.shards.get_mut(key).and_then(|s| s.link.as_mut()) else {
            return;
        };
        let mut incoming = std::mem::take(&mut self.incoming);
        let result = link.on_ready(&mut incoming);
        for item in incoming.drain(..) {
            match item {
                Incoming::Reply(request, frame) => self.on_reply(key, request, frame, now),
                Incoming::Push(frame) => self.on_push(&frame, now),
            }
        }
        self.incoming = incoming;
        if let Err(why) = result {
            self.fail(key, &why, now);
        }
        self.remove_retired();
    }

    fn flush(&mut self, now: Tick) {
        for (key, why) in self.shards.flush() {
            self.fail(key, &why, now);
        }
        if let Some(sentinels) = &mut self.sentinels {
            sentinels.flush(now);
        }
    }

    /// Connections that stopped answering fail, failed ones reconnect when their backoff is
    /// over, calls Redis asked to retry are sent again, the map is read again while a shard
    /// has not taken its channels, watched channels' epochs are kept, positions checked and
    /// leases renewed.
    fn tick(&mut self, now: Tick) -> Option<Tick> {
        let timeout = self.periods.timeout;
        for key in self.shards.stalled(now, timeout) {
            let why = format!(
                "no reply within redis_timeout ({:?})",
                self.settings.timeout
            );
            self.fail(key, &why, now);
        }
        self.shards.reconnect_due(now);
        if let Some(sentinels) = &mut self.sentinels {
            sentinels.tick(now, timeout);
        }
        for (call, purpose) in std::mem::take(&mut self.retries) {
            match self.shards.up(call.slot()) {
                Some(shard) => {
                    let call = Call {
                        asking: false,
                        ..call
                    };
                    self.shards.send_call(shard, call, purpose, now);
                }
                None => self.abandon(purpose),
            }
        }
        self.shards.retry_map(now);
        if now >= self.due.refresh {
            self.due.refresh = now.after(self.periods.refresh);
            self.keep_epochs(now);
        }
        self.check_positions(now);
        if now >= self.due.renewal {
            self.due.renewal = now.after(self.periods.renew);
            for (conn, user) in self.held_leases() {
                self.send_lease(&user, conn, Bytes::from_static(RENEW), false, now);
            }
            self.renew_presence(None, now);
        }
        if now >= self.due.reap {
            self.due.reap = now.after(self.periods.reap);
            self.reap_presence(now);
        }
        self.resync_presence(now);
        Some(now.after(self.periods.tick))
    }

    fn sweep(&mut self, now: Tick) {
        self.local.sweep(now);
    }

    fn gauges(&self) -> EngineGauges {
        EngineGauges {
            shared: Some(self.state()),
            ..self.local.gauges()
        }
    }
}

/// The keys of node `id`'s mailbox.
fn mailbox(prefix: &str, id: &str) -> Keys {
    Keys::of(prefix, &format!("{MAILBOX_PREFIX}{id}"))
}

fn number(n: u64) -> Bytes {
    Bytes::from(n.to_string())
}

fn millis(d: Duration) -> Bytes {
    number(d.as_millis() as u64)
}
