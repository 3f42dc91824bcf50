//! The Redis engine: nodes share channels, seqs, history, resume and per-user limits
//! through one Redis or a Redis Cluster, over non-blocking connections in the reactor's own
//! `Poll` (no thread, no async runtime).
//!
//! ```text
//!  publish ─► PUBLISH script (seq, stream, SPUBLISH) ─► reply: the worker's ok
//!                                   └─► every node's shard-channel subscription
//!                                         └─► Sequencer (order, gaps) ─► Happening::Deliver
//! ```
//! A node delivers from its subscription only, the publishing node too, so every node sees
//! Redis's one order. The fan-out asks ([`publish`](RedisEngine::publish),
//! [`join`](RedisEngine::join), [`lease`](RedisEngine::lease), …) and the answers come back
//! later, read from Redis, as [`Happening`]s the fan-out carries out.
//!
//! - [`resp`]: RESP3 encode and decode. [`link`]: one connection. [`cluster`]: the slot map.
//! - [`scripts`]: the Lua scripts and the key layout. [`sequencer`]: one channel's order.
//!
//! Invariants: a request is answered exactly once, by Redis or as [`Unavailable`] when its
//! connection fails (a publish is never retried by the node: the worker decides, with an
//! `idem` key for exactly once); a channel this node watches is subscribed on the shard that
//! owns its slot whenever that shard is up, and every (re)subscription is followed by a read
//! that fills what was missed; a join waits, across reconnects, until a read answers it.

pub mod cluster;
pub mod link;
pub mod resp;
pub mod scripts;
pub mod sequencer;

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mio::Registry;
use slab::Slab;

use crate::config::RedisUrl;
use crate::reactor::token::{self, Source};
use crate::ws::conn::ConnId;
use crate::ws::wire::Since;
use cluster::SlotMap;
use link::{Expected, Incoming, Link};
use resp::{Frame, Redirect};
use scripts::{Keys, Script};
use sequencer::{Entry, Sequencer, Step, Sync};

/// The shard channel every node subscribes to for broadcasts.
const BROADCAST_CHANNEL: &str = "sidecast:all";
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// First wait after a connection fails.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Publishes in flight at most, node-wide: past it, publishers pause.
pub const MAX_IN_FLIGHT: usize = 64 * 1024;
/// A lease renewal's `max`: a connection already open is never refused by its renewal.
const RENEW: &[u8] = b"1000000000";

/// What the Redis engine runs by, from the configuration.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// Seed addresses: a standalone Redis, or some nodes of a cluster.
    pub urls: Vec<RedisUrl>,
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
    /// `user_lease_ttl`.
    pub lease_ttl: Duration,
}

impl RedisSettings {
    /// How long a channel's epoch and seq outlive its last publish or read: at least a day,
    /// so that a quiet channel a page watches is not given a new epoch (a false gap).
    fn meta_ttl(&self) -> Duration {
        self.history_ttl.max(Duration::from_secs(24 * 3600))
    }
}

/// A publish's key in the fan-out's table of publishes in flight.
pub type OpId = usize;

/// What Redis stored for one part of a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The seq assigned (0 for a broadcast or a disconnect).
    pub seq: u64,
    /// Nodes subscribed to the channel when it was published (Redis's `SPUBLISH` count).
    pub nodes: usize,
    /// An earlier publish under the same `idem` key: `seq` and `nodes` are its.
    pub duplicate: bool,
}

/// Redis could not be asked, or did not answer: nothing is known to be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unavailable;

/// Something read from Redis, for the fan-out to carry out.
#[derive(Debug)]
pub enum Happening {
    /// The next event of `channel`, in order.
    Deliver {
        /// The channel.
        channel: Arc<str>,
        /// The event.
        entry: Entry,
    },
    /// Events of `channel` up to `seq` of `epoch` that were not delivered are lost.
    Gap {
        /// The channel.
        channel: Arc<str>,
        /// The last seq lost.
        seq: u64,
        /// The epoch.
        epoch: Arc<str>,
    },
    /// The read a join asked for: the channel was at `seq` of `epoch`; `entries` are those
    /// after the join's `since`, when the epochs matched.
    Joined {
        /// The channel.
        channel: Arc<str>,
        /// The joining connection.
        conn: ConnId,
        /// The join's `since`.
        since: Option<Since>,
        /// The channel's epoch.
        epoch: Box<str>,
        /// The channel's seq when read.
        seq: u64,
        /// The stream after `since` (`None`: another epoch).
        entries: Option<Vec<Entry>>,
        /// Where this node's delivery of the channel stood when the read answered: the
        /// happenings before this one brought it there, those after move it on.
        delivered: (u64, Arc<str>),
    },
    /// Part `part` of publish `op` is done.
    Done {
        /// The publish.
        op: OpId,
        /// Which of its channels.
        part: usize,
        /// Stored, or not.
        result: Result<Stored, Unavailable>,
    },
    /// A broadcast from any node.
    Broadcast(Bytes),
    /// A `disconnect` of `user` from any node.
    Disconnect(Box<str>),
    /// The lease of `conn`, just opened, is held: it may be told `connected`.
    LeaseGranted(ConnId),
    /// The user of `conn` has `max_connections_per_user` open on other nodes.
    LeaseRefused(ConnId),
}

/// What a reply answers.
enum Request {
    Hello,
    Ignore,
    Load(Script),
    Slots,
    /// `SSUBSCRIBE` or `SUNSUBSCRIBE` of a shard channel: confirmed by a push.
    Subscription(&'static str, String),
    Call(Call, Purpose),
}

impl Expected for Request {
    fn answered_by(&self, push: &Frame) -> bool {
        let Request::Subscription(kind, channel) = self else {
            return false;
        };
        let parts = resp::items(push).unwrap_or_default();
        parts.first().and_then(resp::text) == Some(kind)
            && parts.get(1).and_then(resp::text) == Some(channel.as_str())
    }
}

/// A command that can be sent again: after `NOSCRIPT` as `EVAL`, after `MOVED` or `ASK` to
/// another node.
struct Call {
    script: Option<Script>,
    /// Sent after an `ASK`: `ASKING` goes first, every time it is sent.
    asking: bool,
    keys: usize,
    /// The script's keys then arguments; or a whole command when `script` is `None`.
    args: Vec<Bytes>,
}

enum Purpose {
    Publish {
        op: OpId,
        part: usize,
    },
    Signal {
        op: OpId,
    },
    Read {
        channel: Arc<str>,
        join: Option<(ConnId, Option<Since>)>,
    },
    Lease {
        conn: ConnId,
        fresh: bool,
    },
}

/// One master (or the standalone Redis).
struct Shard {
    addr: String,
    link: Option<Link<Request>>,
    /// `HELLO` answered: commands may be sent.
    up: bool,
    backoff: Duration,
    retry_at: Option<Instant>,
}

/// A channel this node watches.
struct Watched {
    keys: Keys,
    /// Reasons to watch: local subscribers, and a user's connections for `user:` channels.
    interest: u32,
    order: Sequencer,
    /// Joins to send once the channel's shard is up.
    queued: Vec<(ConnId, Option<Since>)>,
}

/// Connection and request state, for `/health` and `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedisState {
    /// Every shard's connection is up and the slot map is known.
    pub up: bool,
    /// Shards whose connection is up.
    pub shards_up: usize,
    /// Shards known.
    pub shards: usize,
    /// Requests waiting for Redis.
    pub in_flight: usize,
    /// Events held for a gap to be filled.
    pub held: usize,
    /// Channels watched.
    pub channels: usize,
    /// Connections lost since the start.
    pub disconnects: u64,
    /// Gaps reported to pages.
    pub gaps: u64,
}

/// The Redis engine.
pub struct RedisEngine {
    settings: RedisSettings,
    registry: Registry,
    shards: Slab<Shard>,
    by_addr: HashMap<String, usize>,
    map: Option<SlotMap>,
    /// Which seed to try next while no map is known.
    next_seed: usize,
    shas: [Option<Box<str>>; 3],
    channels: HashMap<Arc<str>, Watched>,
    broadcast: Keys,
    /// Leases this node holds: connection → its user.
    leases: HashMap<ConnId, Arc<str>>,
    next_renewal: Instant,
    out: Vec<Happening>,
    incoming: Vec<Incoming<Request>>,
    steps: Vec<Step>,
    epoch_seed: RandomState,
    epochs_made: u64,
    in_flight: usize,
    /// Calls to send again next tick (`TRYAGAIN`, `CLUSTERDOWN`).
    retries: Vec<(Call, Purpose)>,
    disconnects: u64,
    gaps: u64,
}

impl RedisEngine {
    /// An engine that starts connecting to the first seed now; `registry` is the reactor's.
    ///
    /// # Errors
    /// The registry cannot be shared.
    pub fn new(settings: RedisSettings, registry: &Registry) -> std::io::Result<RedisEngine> {
        let now = Instant::now();
        let broadcast = Keys::of(&settings.prefix, BROADCAST_CHANNEL);
        let mut engine = RedisEngine {
            registry: registry.try_clone()?,
            shards: Slab::new(),
            by_addr: HashMap::new(),
            map: None,
            next_seed: 0,
            shas: [None, None, None],
            channels: HashMap::new(),
            broadcast,
            leases: HashMap::new(),
            next_renewal: now + settings.lease_ttl / 3,
            out: Vec::new(),
            incoming: Vec::new(),
            steps: Vec::new(),
            epoch_seed: RandomState::new(),
            epochs_made: 0,
            in_flight: 0,
            retries: Vec::new(),
            disconnects: 0,
            gaps: 0,
            settings,
        };
        let seed = engine.settings.urls[0].host_port.clone();
        let key = engine.shard_for_addr(&seed);
        engine.connect(key, now);
        Ok(engine)
    }

    /// What Redis answered since the last call, in order.
    pub fn take_happenings(&mut self) -> Vec<Happening> {
        std::mem::take(&mut self.out)
    }

    /// Hands back an emptied happenings buffer, to be reused.
    pub fn recycle(&mut self, mut buffer: Vec<Happening>) {
        if self.out.is_empty() {
            buffer.clear();
            self.out = buffer;
        }
    }

    /// The state `/health` and `/metrics` report.
    pub fn state(&self) -> RedisState {
        let shards_up = self.shards.iter().filter(|(_, s)| s.up).count();
        RedisState {
            up: self.map.is_some() && shards_up == self.shards.len(),
            shards_up,
            shards: self.shards.len(),
            in_flight: self.in_flight,
            held: self.channels.values().map(|w| w.order.held()).sum(),
            channels: self.channels.len(),
            disconnects: self.disconnects,
            gaps: self.gaps,
        }
    }

    /// Whether another publish may be started (see [`MAX_IN_FLIGHT`]).
    pub fn has_capacity(&self) -> bool {
        self.in_flight < MAX_IN_FLIGHT
    }

    // ---- requests from the fan-out ----

    /// Publishes `data` to `channel` through the script; `to_user` marks a `{"user":...}`
    /// publish. The answer comes as [`Happening::Done`] for (`op`, `part`).
    ///
    /// # Errors
    /// The channel's shard is down: nothing was sent.
    pub fn publish(
        &mut self,
        op: OpId,
        part: usize,
        channel: &str,
        to_user: bool,
        data: &[u8],
        idem: Option<&str>,
    ) -> Result<(), Unavailable> {
        let keys = Keys::of(&self.settings.prefix, channel);
        let shard = self.up_shard(keys.slot()).ok_or(Unavailable)?;
        let mut args: Vec<Bytes> = vec![keys.meta().into(), keys.stream().into()];
        if let Some(idem) = idem {
            args.push(keys.idempotency(idem).into());
        }
        let key_count = args.len();
        let epoch = self.new_epoch();
        let kind: &[u8] = if to_user { b"u" } else { b"e" };
        args.extend([
            Bytes::from(keys.shard_channel.clone()),
            Bytes::from_static(kind),
            Bytes::copy_from_slice(data),
            Bytes::from(epoch),
            number(self.settings.history_size as u64),
            millis(self.settings.history_ttl),
            millis(self.settings.meta_ttl()),
            millis(self.settings.idempotency_window),
        ]);
        let call = Call {
            script: Some(Script::Publish),
            asking: false,
            keys: key_count,
            args,
        };
        self.in_flight += 1;
        self.send_call(shard, call, Purpose::Publish { op, part });
        Ok(())
    }

    /// Sends a broadcast to every node; answered as [`Happening::Done`] for `op`.
    ///
    /// # Errors
    /// The broadcast channel's shard is down.
    pub fn broadcast(&mut self, op: OpId, data: &[u8]) -> Result<(), Unavailable> {
        let mut message = BytesMut::with_capacity(data.len() + 1);
        message.extend_from_slice(b"b");
        message.extend_from_slice(data);
        let keys = self.broadcast.clone();
        self.signal(op, &keys, message.freeze())
    }

    /// Closes every connection of `user` on every node; answered as [`Happening::Done`].
    ///
    /// # Errors
    /// The user channel's shard is down.
    pub fn disconnect_user(&mut self, op: OpId, user: &str) -> Result<(), Unavailable> {
        let keys = Keys::of(&self.settings.prefix, &format!("user:{user}"));
        self.signal(op, &keys, Bytes::from_static(b"d"))
    }

    fn signal(&mut self, op: OpId, keys: &Keys, message: Bytes) -> Result<(), Unavailable> {
        let shard = self.up_shard(keys.slot()).ok_or(Unavailable)?;
        let call = Call {
            script: None,
            asking: false,
            keys: 0,
            args: vec![
                Bytes::from_static(b"SPUBLISH"),
                keys.shard_channel.clone().into(),
                message,
            ],
        };
        self.in_flight += 1;
        self.send_call(shard, call, Purpose::Signal { op });
        Ok(())
    }

    /// This node has a new reason to watch `channel` (a first local subscriber, or a user's
    /// first connection for `user:<id>`): subscribes to it on first interest.
    pub fn watch(&mut self, channel: &str) {
        if let Some(watched) = self.channels.get_mut(channel) {
            watched.interest += 1;
            return;
        }
        let name: Arc<str> = channel.into();
        let keys = Keys::of(&self.settings.prefix, channel);
        self.channels.insert(
            Arc::clone(&name),
            Watched {
                keys,
                interest: 1,
                order: Sequencer::default(),
                queued: Vec::new(),
            },
        );
        self.subscribe(&name);
    }

    /// One reason to watch `channel` is gone; the last unsubscribes.
    pub fn unwatch(&mut self, channel: &str) {
        let Some(watched) = self.channels.get_mut(channel) else {
            return;
        };
        watched.interest -= 1;
        if watched.interest > 0 {
            return;
        }
        let watched = self.channels.remove(channel).expect("watched");
        if let Some(shard) = self.up_shard(watched.keys.slot()) {
            let link = self.shards[shard].link.as_mut().expect("up");
            send_subscription(link, "sunsubscribe", &watched.keys.shard_channel);
        }
    }

    /// Where `channel`'s delivery stands on this node, once known.
    pub fn position(&self, channel: &str) -> Option<(u64, &Arc<str>)> {
        self.channels.get(channel)?.order.position()
    }

    /// Asks where `channel` stands and, with `since`, what `conn` missed: answered as
    /// [`Happening::Joined`], after a reconnect if need be. The channel must be watched.
    pub fn join(&mut self, channel: &str, conn: ConnId, since: Option<Since>) {
        let Some((name, watched)) = self.channels.get_key_value(channel) else {
            debug_assert!(false, "a join on a channel not watched");
            return;
        };
        let name = Arc::clone(name);
        match self.up_shard(watched.keys.slot()) {
            Some(shard) => self.send_read(shard, &name, Some((conn, since))),
            None => {
                let watched = self.channels.get_mut(channel).expect("watched");
                watched.queued.push((conn, since));
            }
        }
    }

    /// Takes a lease for `conn` of `user`, refused ([`Happening::LeaseRefused`]) when the user
    /// holds `max` on all nodes. While Redis is down the connection is admitted on this node's
    /// count alone and its lease taken on heal. Returns whether Redis was asked.
    pub fn lease(&mut self, user: &str, conn: ConnId, max: usize) -> bool {
        let user: Arc<str> = user.into();
        self.leases.insert(conn, Arc::clone(&user));
        self.send_lease(&user, conn, number(max as u64), true)
    }

    /// Gives up the lease of `conn`, closed.
    pub fn release(&mut self, conn: ConnId) {
        let Some(user) = self.leases.remove(&conn) else {
            return;
        };
        let keys = Keys::of(&self.settings.prefix, &format!("user:{user}"));
        if let Some(shard) = self.up_shard(keys.slot()) {
            let (member, leases) = (self.lease_member(conn), keys.leases());
            let link = self.shards[shard].link.as_mut().expect("up");
            let args: [&[u8]; 3] = [b"ZREM", leases.as_bytes(), member.as_bytes()];
            link.send(&args, Some(Request::Ignore), Instant::now());
        }
    }

    fn send_lease(&mut self, user: &str, conn: ConnId, max: Bytes, fresh: bool) -> bool {
        let keys = Keys::of(&self.settings.prefix, &format!("user:{user}"));
        let Some(shard) = self.up_shard(keys.slot()) else {
            return false;
        };
        let call = Call {
            script: Some(Script::Lease),
            asking: false,
            keys: 1,
            args: vec![
                keys.leases().into(),
                self.lease_member(conn).into(),
                millis(self.settings.lease_ttl),
                max,
            ],
        };
        self.send_call(shard, call, Purpose::Lease { conn, fresh });
        true
    }

    fn lease_member(&self, conn: ConnId) -> String {
        format!("{}:{}.{}", self.settings.node_id, conn.key, conn.generation)
    }

    // ---- the reactor's side ----

    /// Readiness on shard `key`'s connection: reads every reply and push.
    pub fn on_ready(&mut self, key: usize) {
        let Some(link) = self.shards.get_mut(key).and_then(|s| s.link.as_mut()) else {
            return;
        };
        let mut incoming = std::mem::take(&mut self.incoming);
        let result = link.on_ready(&mut incoming);
        for item in incoming.drain(..) {
            match item {
                Incoming::Reply(request, frame) => self.on_reply(key, request, frame),
                Incoming::Push(frame) => self.on_push(&frame),
            }
        }
        self.incoming = incoming;
        if let Err(why) = result {
            self.fail(key, &why);
        }
    }

    /// Writes every connection's queued commands; called once per pass, after the fan-out.
    pub fn flush(&mut self) {
        let failed: Vec<(usize, String)> = self
            .shards
            .iter_mut()
            .filter_map(|(key, shard)| match shard.link.as_mut()?.flush() {
                Ok(()) => None,
                Err(why) => Some((key, why)),
            })
            .collect();
        for (key, why) in failed {
            self.fail(key, &why);
        }
    }

    /// Periodic upkeep: connections that stopped answering fail, failed ones reconnect when
    /// their backoff is over, leases are renewed.
    pub fn tick(&mut self, now: Instant) {
        let timeout = self.settings.timeout;
        let stalled: Vec<usize> = self
            .shards
            .iter()
            .filter(|(_, s)| {
                s.link
                    .as_ref()
                    .and_then(Link::oldest_wait)
                    .is_some_and(|sent| now.duration_since(sent) > timeout)
            })
            .map(|(key, _)| key)
            .collect();
        for key in stalled {
            self.fail(key, &format!("no reply within redis_timeout ({timeout:?})"));
        }
        let due: Vec<usize> = self
            .shards
            .iter()
            .filter(|(_, s)| s.link.is_none() && s.retry_at.is_some_and(|at| at <= now))
            .map(|(key, _)| key)
            .collect();
        for key in due {
            self.connect(key, now);
        }
        for (call, purpose) in std::mem::take(&mut self.retries) {
            match self.up_shard(call_slot(&call)) {
                Some(shard) => self.send_call(
                    shard,
                    Call {
                        asking: false,
                        ..call
                    },
                    purpose,
                ),
                None => self.abandon(purpose),
            }
        }
        if now >= self.next_renewal {
            self.next_renewal = now + self.settings.lease_ttl / 3;
            let leases: Vec<(ConnId, Arc<str>)> = self
                .leases
                .iter()
                .map(|(conn, user)| (*conn, Arc::clone(user)))
                .collect();
            for (conn, user) in leases {
                self.send_lease(&user, conn, Bytes::from_static(RENEW), false);
            }
        }
    }

    // ---- connections ----

    fn shard_for_addr(&mut self, addr: &str) -> usize {
        if let Some(&key) = self.by_addr.get(addr) {
            return key;
        }
        let key = self.shards.insert(Shard {
            addr: addr.to_string(),
            link: None,
            up: false,
            backoff: MIN_BACKOFF,
            retry_at: None,
        });
        self.by_addr.insert(addr.to_string(), key);
        key
    }

    /// The shard that owns `slot`, when its connection is up.
    fn up_shard(&self, slot: u16) -> Option<usize> {
        let owner = self.map.as_ref()?.owner(slot);
        let key = *self.by_addr.get(owner)?;
        self.shards[key].up.then_some(key)
    }

    /// The URL (and so the credentials) to use for `addr`: a seed's own, or the first seed's
    /// for a node the cluster named.
    fn url_for(&self, addr: &str) -> &RedisUrl {
        let urls = &self.settings.urls;
        urls.iter()
            .find(|u| u.host_port == addr)
            .unwrap_or(&urls[0])
    }

    fn connect(&mut self, key: usize, now: Instant) {
        let addr = self.shards[key].addr.clone();
        let token = token::encode(Source::Redis(key));
        match Link::connect(&addr, &self.registry, token) {
            Ok(mut link) => {
                let url = self.url_for(&addr);
                let name = format!("sidecast-{}", self.settings.node_id);
                let mut hello: Vec<&[u8]> = vec![b"HELLO", b"3"];
                if let (Some(user), Some(password)) = (&url.user, &url.password) {
                    hello.extend([b"AUTH".as_slice(), user.as_bytes(), password.as_bytes()]);
                }
                hello.extend([b"SETNAME".as_slice(), name.as_bytes()]);
                link.send(&hello, Some(Request::Hello), now);
                for script in [Script::Publish, Script::Read, Script::Lease] {
                    let args: [&[u8]; 3] = [b"SCRIPT", b"LOAD", script.source().as_bytes()];
                    link.send(&args, Some(Request::Load(script)), now);
                }
                self.shards[key].link = Some(link);
                self.shards[key].retry_at = None;
            }
            Err(e) => {
                log::warn!("redis {addr}: cannot connect: {e}");
                self.schedule_retry(key, now);
            }
        }
    }

    fn schedule_retry(&mut self, key: usize, now: Instant) {
        let shard = &mut self.shards[key];
        // Full jitter over the upper half, so nodes that lost Redis together spread out.
        let jitter = self.epoch_seed.hash_one(now) % 1000;
        let wait = shard.backoff / 2 + shard.backoff.mul_f64(jitter as f64 / 2000.0);
        shard.retry_at = Some(now + wait);
        shard.backoff = (shard.backoff * 2).min(MAX_BACKOFF);
        if self.map.is_none() {
            // No map yet: try the next seed.
            self.next_seed = (self.next_seed + 1) % self.settings.urls.len();
            let seed = self.settings.urls[self.next_seed].host_port.clone();
            if seed != self.shards[key].addr {
                self.by_addr.remove(&self.shards[key].addr);
                self.by_addr.insert(seed.clone(), key);
                self.shards[key].addr = seed;
            }
        }
    }

    /// Shard `key`'s connection failed: every request on it is answered as failed or kept
    /// for the heal, and it reconnects after a backoff.
    fn fail(&mut self, key: usize, why: &str) {
        let Some(link) = self.shards[key].link.take() else {
            return;
        };
        let was_up = std::mem::replace(&mut self.shards[key].up, false);
        if was_up {
            self.disconnects += 1;
        }
        log::warn!("redis {}: connection lost: {why}", link.addr);
        for request in link.close(&self.registry).collect::<Vec<_>>() {
            if let Request::Call(_, purpose) = request {
                self.abandon(purpose);
            }
        }
        self.schedule_retry(key, Instant::now());
        if self.map.as_ref().is_some_and(SlotMap::is_cluster) {
            // A failover may have moved its slots: read the map again from another node.
            self.refresh_map();
        }
    }

    /// A request whose connection failed before it was answered.
    fn abandon(&mut self, purpose: Purpose) {
        match purpose {
            Purpose::Publish { op, part } => {
                self.in_flight -= 1;
                self.out.push(Happening::Done {
                    op,
                    part,
                    result: Err(Unavailable),
                });
            }
            Purpose::Signal { op } => {
                self.in_flight -= 1;
                self.out.push(Happening::Done {
                    op,
                    part: 0,
                    result: Err(Unavailable),
                });
            }
            Purpose::Read { channel, join } => {
                if let Some(watched) = self.channels.get_mut(&channel) {
                    match join {
                        Some(join) => watched.queued.push(join),
                        None => watched.order.abandon_sync(),
                    }
                }
            }
            // Admitted on this node's count; the lease is taken again on heal.
            Purpose::Lease { conn, fresh } => {
                if fresh && self.leases.contains_key(&conn) {
                    self.out.push(Happening::LeaseGranted(conn));
                }
            }
        }
    }

    /// A `MOVED`: `slot` lives on `addr` now; connects to it if it is new.
    fn moved(&mut self, slot: u16, addr: &str) {
        if let Some(map) = &mut self.map {
            map.moved(slot, addr);
        }
        let target = self.shard_for_addr(addr);
        if self.shards[target].link.is_none() && self.shards[target].retry_at.is_none() {
            self.connect(target, Instant::now());
        }
    }

    /// Subscribes again, where the map says, to a channel whose subscription was lost to a
    /// slot move (a wrong guess is answered `MOVED`, which corrects the map and comes back
    /// here).
    fn follow_subscription(&mut self, channel: &str) {
        if channel == BROADCAST_CHANNEL {
            if let Some(shard) = self.up_shard(self.broadcast.slot()) {
                let link = self.shards[shard].link.as_mut().expect("up");
                send_subscription(link, "ssubscribe", &self.broadcast.shard_channel);
            }
            return;
        }
        let Some(name) = self
            .channels
            .get_key_value(channel)
            .map(|(n, _)| Arc::clone(n))
        else {
            return;
        };
        if let Some(watched) = self.channels.get_mut(channel) {
            watched.order.abandon_sync();
        }
        self.subscribe(&name);
    }

    fn refresh_map(&mut self) {
        if let Some((_, shard)) = self.shards.iter_mut().find(|(_, s)| s.up) {
            let args: [&[u8]; 2] = [b"CLUSTER", b"SLOTS"];
            let link = shard.link.as_mut().expect("up");
            link.send(&args, Some(Request::Slots), Instant::now());
        }
    }

    /// Shard `key` answered `HELLO`.
    fn on_up(&mut self, key: usize) {
        let shard = &mut self.shards[key];
        shard.up = true;
        shard.backoff = MIN_BACKOFF;
        log::info!("redis {}: connected", shard.addr);
        if self.map.is_none() || self.map.as_ref().is_some_and(SlotMap::is_cluster) {
            let args: [&[u8]; 2] = [b"CLUSTER", b"SLOTS"];
            let link = shard.link.as_mut().expect("up");
            link.send(&args, Some(Request::Slots), Instant::now());
        } else {
            self.resubscribe(key);
        }
    }

    /// A `CLUSTER SLOTS` answer from shard `key`: a map (or, from a standalone Redis, an
    /// error); connects to new masters and resubscribes channels whose owner changed.
    fn on_slots(&mut self, key: usize, frame: &Frame) {
        let addr = self.shards[key].addr.clone();
        let seed_host = addr.rsplit_once(':').map_or("", |(host, _)| host);
        let map = match resp::error_text(frame) {
            Some(_) => SlotMap::standalone(&addr),
            None => match SlotMap::from_cluster_slots(frame, seed_host) {
                Some(map) => map,
                None => {
                    log::warn!("redis {addr}: the cluster does not serve every slot yet");
                    return;
                }
            },
        };
        let old = self.map.replace(map.clone());
        for master in &map.masters {
            let shard = self.shard_for_addr(master);
            if self.shards[shard].link.is_none() && self.shards[shard].retry_at.is_none() {
                self.connect(shard, Instant::now());
            }
        }
        if old.as_ref() == Some(&map) {
            return;
        }
        if old.is_none() {
            log::info!(
                "redis: {} serving {} master(s)",
                if map.is_cluster() {
                    "cluster"
                } else {
                    "standalone"
                },
                map.masters.len()
            );
        }
        // Every up shard takes the channels it now owns (those it owned already resync,
        // which costs a read and finds nothing).
        let up: Vec<usize> = self
            .shards
            .iter()
            .filter(|(_, s)| s.up)
            .map(|(k, _)| k)
            .collect();
        for shard in up {
            self.resubscribe(shard);
        }
    }

    /// Subscribes shard `key` to every watched channel it owns (and to broadcasts if it owns
    /// that channel), reads what each missed, sends queued joins and takes leases again.
    fn resubscribe(&mut self, key: usize) {
        let owned = |engine: &RedisEngine, slot: u16| engine.up_shard(slot) == Some(key);
        let names: Vec<Arc<str>> = self
            .channels
            .iter()
            .filter(|(_, w)| owned(self, w.keys.slot()))
            .map(|(name, _)| Arc::clone(name))
            .collect();
        for name in names {
            self.subscribe(&name);
        }
        if owned(self, self.broadcast.slot()) {
            let link = self.shards[key].link.as_mut().expect("up");
            send_subscription(link, "ssubscribe", &self.broadcast.shard_channel);
        }
        let leases: Vec<(ConnId, Arc<str>)> = self
            .leases
            .iter()
            .map(|(c, u)| (*c, Arc::clone(u)))
            .collect();
        for (conn, user) in leases {
            let slot = Keys::of(&self.settings.prefix, &format!("user:{user}")).slot();
            if owned(self, slot) {
                self.send_lease(&user, conn, Bytes::from_static(RENEW), false);
            }
        }
    }

    /// `SSUBSCRIBE` to a watched channel on its shard, a read of what it missed, and the joins
    /// that waited; nothing while the shard is down (its heal does this).
    fn subscribe(&mut self, name: &Arc<str>) {
        let Some(shard) = self.up_shard(self.channels[name].keys.slot()) else {
            return;
        };
        let watched = self.channels.get_mut(name).expect("watched");
        let link = self.shards[shard].link.as_mut().expect("up");
        send_subscription(link, "ssubscribe", &watched.keys.shard_channel);
        let sync = watched.order.resync();
        let queued = std::mem::take(&mut watched.queued);
        if sync.is_some() {
            self.send_read(shard, name, None);
        }
        for join in queued {
            self.send_read(shard, name, Some(join));
        }
    }

    fn send_read(&mut self, shard: usize, name: &Arc<str>, join: Option<(ConnId, Option<Since>)>) {
        let watched = &self.channels[name];
        let (epoch, since) = match &join {
            Some((_, Some(since))) => (since.epoch.clone(), since.seq),
            Some((_, None)) => (String::new(), 0),
            None => match watched.order.position() {
                Some((seq, epoch)) => (epoch.to_string(), seq),
                None => (String::new(), 0),
            },
        };
        let keys = &watched.keys;
        let call = Call {
            script: Some(Script::Read),
            asking: false,
            keys: 2,
            args: vec![
                keys.meta().into(),
                keys.stream().into(),
                Bytes::from(self.new_epoch()),
                millis(self.settings.meta_ttl()),
                epoch.into(),
                number(since),
                number(self.settings.history_size.max(1) as u64),
            ],
        };
        let purpose = Purpose::Read {
            channel: Arc::clone(name),
            join,
        };
        self.send_call(shard, call, purpose);
    }

    fn send_call(&mut self, shard: usize, call: Call, purpose: Purpose) {
        self.write_call(shard, &call, false);
        let link = self.shards[shard].link.as_mut().expect("up");
        link.expect(Request::Call(call, purpose), Instant::now());
    }

    /// Queues `call` on `shard` as `EVALSHA` (or `EVAL` when the script's SHA1 is not known
    /// or `eval` is asked), preceded by `ASKING` after an `ASK`; the caller adds its tag.
    fn write_call(&mut self, shard: usize, call: &Call, eval: bool) {
        let keys = call.keys.to_string();
        let mut args: Vec<&[u8]> = Vec::with_capacity(call.args.len() + 3);
        if let Some(script) = call.script {
            match (&self.shas[script as usize], eval) {
                (Some(sha), false) => args.extend([b"EVALSHA".as_slice(), sha.as_bytes()]),
                _ => args.extend([b"EVAL".as_slice(), script.source().as_bytes()]),
            }
            args.push(keys.as_bytes());
        }
        args.extend(call.args.iter().map(|a| a.as_ref()));
        let link = self.shards[shard].link.as_mut().expect("up");
        if call.asking {
            link.send(
                &[b"ASKING".as_slice()],
                Some(Request::Ignore),
                Instant::now(),
            );
        }
        link.write(&args);
    }

    // ---- replies ----

    fn on_reply(&mut self, key: usize, request: Request, frame: Frame) {
        match request {
            Request::Hello => match resp::error_text(&frame) {
                None => self.on_up(key),
                Some(error) => self.fail(key, &format!("HELLO refused: {error}")),
            },
            Request::Ignore => {}
            Request::Load(script) => match resp::text(&frame) {
                Some(sha) => self.shas[script as usize] = Some(sha.into()),
                None => log::warn!("redis: SCRIPT LOAD failed: {:?}", resp::error_text(&frame)),
            },
            Request::Slots => self.on_slots(key, &frame),
            Request::Subscription(kind, shard_channel) => {
                if let Some(error) = resp::error_text(&frame) {
                    log::info!("redis: {kind} {shard_channel}: {error}");
                    if let Some(Redirect::Moved(slot, addr)) = resp::redirect(&error) {
                        self.moved(slot, &addr);
                    }
                    let prefix = &self.settings.prefix;
                    if let Some(channel) = scripts::channel_of(prefix, &shard_channel) {
                        let channel = channel.to_string();
                        self.follow_subscription(&channel);
                    }
                    self.refresh_map();
                }
            }
            Request::Call(call, purpose) => match resp::error_text(&frame) {
                None => self.on_answer(purpose, &frame),
                Some(error) => self.on_call_error(key, call, purpose, &error),
            },
        }
    }

    fn on_call_error(&mut self, key: usize, call: Call, purpose: Purpose, error: &str) {
        if error.starts_with("NOSCRIPT") {
            self.write_call(key, &call, true);
            let link = self.shards[key].link.as_mut().expect("answered on it");
            link.expect(Request::Call(call, purpose), Instant::now());
            return;
        }
        if let Some(redirect) = resp::redirect(error) {
            let (slot, addr, asking) = match &redirect {
                Redirect::Moved(slot, addr) => (*slot, addr.clone(), false),
                Redirect::Ask(slot, addr) => (*slot, addr.clone(), true),
            };
            if !asking {
                self.moved(slot, &addr);
                self.refresh_map();
            }
            let target = self.shard_for_addr(&addr);
            if self.shards[target].up {
                let link = self.shards[target].link.as_mut().expect("up");
                if asking {
                    link.send(
                        &[b"ASKING".as_slice()],
                        Some(Request::Ignore),
                        Instant::now(),
                    );
                }
                self.write_call(target, &call, false);
                let link = self.shards[target].link.as_mut().expect("up");
                link.expect(Request::Call(call, purpose), Instant::now());
                return;
            }
            if self.shards[target].link.is_none() && self.shards[target].retry_at.is_none() {
                self.connect(target, Instant::now());
            }
        } else if error.starts_with("TRYAGAIN") || error.starts_with("CLUSTERDOWN") {
            // A slot mid-migration (keys on both sides) or a cluster electing: next tick.
            self.retries.push((call, purpose));
            return;
        } else {
            log::warn!("redis: a {:?} call failed: {error}", call.script);
        }
        self.abandon(purpose);
    }

    fn on_answer(&mut self, purpose: Purpose, frame: &Frame) {
        match purpose {
            Purpose::Publish { op, part } => {
                self.in_flight -= 1;
                let result = parse_published(frame).ok_or(Unavailable);
                if result.is_err() {
                    log::warn!("redis: unexpected publish reply {frame:?}");
                }
                self.out.push(Happening::Done { op, part, result });
            }
            Purpose::Signal { op } => {
                self.in_flight -= 1;
                let nodes = resp::int(frame).unwrap_or(0).max(0) as usize;
                let stored = Stored {
                    seq: 0,
                    nodes,
                    duplicate: false,
                };
                self.out.push(Happening::Done {
                    op,
                    part: 0,
                    result: Ok(stored),
                });
            }
            Purpose::Read { channel, join } => self.on_read(channel, join, frame),
            Purpose::Lease { conn, fresh } => {
                if fresh && self.leases.contains_key(&conn) {
                    self.out.push(if resp::int(frame) == Some(0) {
                        Happening::LeaseRefused(conn)
                    } else {
                        Happening::LeaseGranted(conn)
                    });
                }
            }
        }
    }

    fn on_read(&mut self, channel: Arc<str>, join: Option<(ConnId, Option<Since>)>, frame: &Frame) {
        let Some((epoch, seq, entries)) = parse_read(frame) else {
            log::warn!("redis: unexpected read reply {frame:?}");
            return;
        };
        let Some(watched) = self.channels.get_mut(&channel) else {
            return; // unwatched meanwhile
        };
        let mut steps = std::mem::take(&mut self.steps);
        let next = match &join {
            None => watched
                .order
                .on_read(epoch, seq, entries.clone(), &mut steps),
            Some(_) if watched.order.position().is_none() => {
                watched.order.on_read(epoch, seq, None, &mut steps)
            }
            Some(_) => None,
        };
        self.emit(&channel, &mut steps);
        self.steps = steps;
        if let Some(Sync { .. }) = next
            && let Some(shard) = self.up_shard(self.channels[&channel].keys.slot())
        {
            self.send_read(shard, &channel, None);
        }
        if let Some((conn, since)) = join
            && let Some((seq_delivered, epoch_delivered)) = self.position(&channel)
        {
            let delivered = (seq_delivered, Arc::clone(epoch_delivered));
            self.out.push(Happening::Joined {
                delivered,
                channel,
                conn,
                since,
                epoch: epoch.into(),
                seq,
                entries,
            });
        }
    }

    fn emit(&mut self, channel: &Arc<str>, steps: &mut Vec<Step>) {
        for step in steps.drain(..) {
            self.out.push(match step {
                Step::Deliver(entry) => Happening::Deliver {
                    channel: Arc::clone(channel),
                    entry,
                },
                Step::Gap { seq, epoch } => {
                    self.gaps += 1;
                    Happening::Gap {
                        channel: Arc::clone(channel),
                        seq,
                        epoch,
                    }
                }
            });
        }
    }

    // ---- pushes ----

    fn on_push(&mut self, frame: &Frame) {
        let Some(parts) = resp::items(frame) else {
            return;
        };
        let (Some(kind), Some(shard_channel)) = (
            parts.first().and_then(resp::text),
            parts.get(1).and_then(resp::text),
        ) else {
            return;
        };
        let prefix = &self.settings.prefix;
        let Some(channel) = scripts::channel_of(prefix, shard_channel) else {
            return;
        };
        match kind {
            "smessage" => {
                let Some(payload) = parts.get(2).and_then(resp::bytes) else {
                    return;
                };
                let channel: Arc<str> = channel.into();
                self.on_message(&channel, payload);
            }
            "sunsubscribe" => {
                // Not asked for (the channel is still watched): its slot moved.
                log::info!("redis: the subscription to {channel} moved; resubscribing");
                let channel = channel.to_string();
                self.follow_subscription(&channel);
                self.refresh_map();
            }
            _ => {}
        }
    }

    fn on_message(&mut self, channel: &Arc<str>, payload: &Bytes) {
        match payload.first() {
            Some(b'b') if &**channel == BROADCAST_CHANNEL => {
                self.out.push(Happening::Broadcast(payload.slice(1..)));
            }
            Some(b'd') => {
                if let Some(user) = channel.strip_prefix("user:")
                    && self.channels.contains_key(channel)
                {
                    self.out.push(Happening::Disconnect(user.into()));
                }
            }
            Some(kind @ (b'e' | b'u')) => {
                let to_user = *kind == b'u';
                let Some((seq, epoch, data)) = parse_event(&payload[1..]) else {
                    log::warn!("redis: a malformed event on {channel}");
                    return;
                };
                let data = payload.slice(payload.len() - data..);
                let Some(watched) = self.channels.get_mut(channel) else {
                    return;
                };
                let entry = Entry { seq, to_user, data };
                let mut steps = std::mem::take(&mut self.steps);
                let sync = watched.order.on_event(epoch, entry, &mut steps);
                self.emit(channel, &mut steps);
                self.steps = steps;
                if sync.is_some()
                    && let Some(shard) = self.up_shard(self.channels[channel].keys.slot())
                {
                    self.send_read(shard, channel, None);
                }
            }
            _ => log::warn!("redis: an unknown message on {channel}"),
        }
    }

    fn new_epoch(&mut self) -> String {
        self.epochs_made += 1;
        let mut hasher = self.epoch_seed.build_hasher();
        hasher.write_u64(self.epochs_made);
        format!("{:08x}", hasher.finish() as u32)
    }
}

/// `<seq>:<epoch>:<data>` → seq, epoch, and the length of data (the rest).
fn parse_event(bytes: &[u8]) -> Option<(u64, &str, usize)> {
    let colon = bytes.iter().position(|&b| b == b':')?;
    let seq = std::str::from_utf8(&bytes[..colon]).ok()?.parse().ok()?;
    let rest = &bytes[colon + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let epoch = std::str::from_utf8(&rest[..colon]).ok()?;
    Some((seq, epoch, rest.len() - colon - 1))
}

/// The PUBLISH script's answer.
fn parse_published(frame: &Frame) -> Option<Stored> {
    let parts = resp::items(frame)?;
    match resp::int(parts.first()?)? {
        0 => Some(Stored {
            seq: resp::int(parts.get(1)?)? as u64,
            nodes: resp::int(parts.get(2)?)? as usize,
            duplicate: false,
        }),
        _ => {
            let (seq, nodes) = resp::text(parts.get(1)?)?.split_once(':')?;
            Some(Stored {
                seq: seq.parse().ok()?,
                nodes: nodes.parse().ok()?,
                duplicate: true,
            })
        }
    }
}

/// The READ script's answer: epoch, seq, and the entries when they were read.
fn parse_read(frame: &Frame) -> Option<(&str, u64, Option<Vec<Entry>>)> {
    let parts = resp::items(frame)?;
    let epoch = resp::text(parts.first()?)?;
    let seq = resp::int(parts.get(1)?)? as u64;
    let Some(entries) = parts.get(2) else {
        return Some((epoch, seq, None));
    };
    let mut out = Vec::new();
    for entry in resp::items(entries)? {
        let fields = resp::items(entry)?;
        let id = resp::text(fields.first()?)?;
        let seq = id.split_once('-')?.0.parse().ok()?;
        let values = resp::items(fields.get(1)?)?;
        let (mut to_user, mut data) = (false, None);
        for pair in values.chunks(2) {
            match (resp::text(&pair[0])?, pair.get(1)) {
                ("k", Some(kind)) => to_user = resp::text(kind)? == "u",
                ("d", Some(value)) => data = Some(resp::bytes(value)?.clone()),
                _ => {}
            }
        }
        out.push(Entry {
            seq,
            to_user,
            data: data?,
        });
    }
    Some((epoch, seq, Some(out)))
}

/// The slot a call's first key (or, for a command, its channel) is in.
fn call_slot(call: &Call) -> u16 {
    let key = if call.script.is_some() {
        &call.args[0]
    } else {
        &call.args[1]
    };
    redis_protocol::redis_keyslot(key)
}

/// `SSUBSCRIBE` or `SUNSUBSCRIBE` (`kind`, lower case as its push names it) of one shard
/// channel.
fn send_subscription(link: &mut Link<Request>, kind: &'static str, channel: &str) {
    let command = kind.to_ascii_uppercase();
    let args: [&[u8]; 2] = [command.as_bytes(), channel.as_bytes()];
    let tag = Request::Subscription(kind, channel.to_string());
    link.send(&args, Some(tag), Instant::now());
}

fn number(n: u64) -> Bytes {
    Bytes::from(n.to_string())
}

fn millis(d: Duration) -> Bytes {
    number(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_event_payloads() {
        assert_eq!(parse_event(b"12:ab01:{\"x\":1}"), Some((12, "ab01", 7)));
        assert_eq!(parse_event(b"12:ab01:"), Some((12, "ab01", 0)));
        assert_eq!(parse_event(b"x:ab:1"), None);
        assert_eq!(parse_event(b"12"), None);
    }
}
