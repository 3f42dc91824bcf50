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
//! - `shards`: connecting, routing, resubscribing. `replies`: replies and pushes → happenings.
//!
//! Invariants: a request is answered exactly once, by Redis or as [`Unavailable`] when its
//! connection fails (a publish is never retried by the node: the worker decides, with an
//! `idem` key for exactly once); a channel this node watches is subscribed on the shard that
//! owns its slot whenever that shard is up, and every (re)subscription is followed by a read
//! that fills what was missed; a join waits, across reconnects, until a read answers it.

pub mod cluster;
pub mod link;
mod replies;
pub mod resp;
pub mod scripts;
pub mod sequencer;
mod shards;

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mio::Registry;
use slab::Slab;

use crate::base::channel::user_channel;
use crate::config::RedisUrl;

use crate::base::channel::Since;
use crate::base::ids::ConnId;
use cluster::SlotMap;
use link::{Expected, Incoming, Link};
use resp::Frame;
use scripts::{Keys, Script};
use sequencer::{Entry, Sequencer, Step};

/// The shard channel every node subscribes to for broadcasts.
const BROADCAST_CHANNEL: &str = "sidecast:all";
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// First wait after a connection fails.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// A lease renewal's `max`: a connection already open is never refused by its renewal.
const RENEW: &[u8] = b"1000000000";
/// Channels whose position is checked per tick, at most, so a check round of many channels
/// is spread out instead of sent to Redis at once.
const CHECKS_PER_TICK: usize = 256;
/// Least time between two reads of the slot map while a shard that is up has not taken its
/// channels (its map answer was not usable).
const MAP_RETRY: Duration = Duration::from_secs(1);

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
        /// The stream after `since` when its epoch is the channel's, or from seq 1 when it is
        /// not (`None`: a join without `since`, nothing read).
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

impl Call {
    /// A call of `script` on `keys` (the first decides the slot) with arguments `args`.
    fn script(script: Script, keys: Vec<Bytes>, args: impl IntoIterator<Item = Bytes>) -> Call {
        let count = keys.len();
        let mut all = keys;
        all.extend(args);
        Call {
            script: Some(script),
            asking: false,
            keys: count,
            args: all,
        }
    }
}

enum Purpose {
    /// `bytes`: the event's size, counted in flight.
    Publish {
        op: OpId,
        part: usize,
        bytes: usize,
    },
    Signal {
        op: OpId,
        bytes: usize,
    },
    Read {
        channel: Arc<str>,
        read: Read,
    },
    Lease {
        conn: ConnId,
        fresh: bool,
    },
}

/// Why a channel's stream is read.
enum Read {
    /// The channel's own read, after (re)subscribing or a skipped seq: fills what was missed.
    Sync,
    /// The periodic position check: anything it fills is a repair (a lost pub/sub message,
    /// or a bug), counted and logged.
    Check,
    /// A joining connection's read, with its `since`.
    Join(ConnId, Option<Since>),
}

/// One master (or the standalone Redis).
struct Shard {
    addr: String,
    link: Option<Link<Request>>,
    /// `HELLO` answered: commands may be sent.
    up: bool,
    /// Every watched channel this shard owns was subscribed on its current connection,
    /// under the current slot map. False from (re)connect until it takes its channels.
    subscribed: bool,
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
    /// The shard whose connection carries its subscription (asked or confirmed); `None`
    /// while it is subscribed nowhere, which `/health` reports.
    subscribed_on: Option<usize>,
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
    /// Watched channels subscribed on no connection.
    pub unsubscribed: usize,
    /// Connections lost since the start.
    pub disconnects: u64,
    /// Gaps reported to pages.
    pub gaps: u64,
    /// Events and gaps the periodic position check found undelivered.
    pub repairs: u64,
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
    in_flight_bytes: usize,
    /// When watched channels' epochs are next kept from expiring.
    next_refresh: Instant,
    /// Shards no longer in the slot map, removed once the read in progress is over.
    retired: Vec<usize>,
    /// Calls to send again next tick (`TRYAGAIN`, `CLUSTERDOWN`).
    retries: Vec<(Call, Purpose)>,
    /// When the next round of position checks starts.
    next_check: Instant,
    /// Channels still to check this round.
    to_check: Vec<Arc<str>>,
    /// Earliest next read of the slot map for a shard that has not taken its channels.
    next_map_retry: Instant,
    disconnects: u64,
    gaps: u64,
    repairs: u64,
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
            in_flight_bytes: 0,
            next_refresh: now + settings.meta_ttl() / 4,
            retries: Vec::new(),
            retired: Vec::new(),
            next_check: now + settings.check_interval,
            to_check: Vec::new(),
            next_map_retry: now,
            disconnects: 0,
            gaps: 0,
            repairs: 0,
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
        let unsubscribed = self.channels.values();
        let unsubscribed = unsubscribed.filter(|w| w.subscribed_on.is_none()).count();
        RedisState {
            // A node that serves nothing on a channel its pages watch is not healthy.
            up: self.map.is_some() && shards_up == self.shards.len() && unsubscribed == 0,
            shards_up,
            shards: self.shards.len(),
            in_flight: self.in_flight,
            held: self.channels.values().map(|w| w.order.held()).sum(),
            channels: self.channels.len(),
            unsubscribed,
            disconnects: self.disconnects,
            gaps: self.gaps,
            repairs: self.repairs,
        }
    }

    /// Whether another publish may be started (see `redis_max_in_flight`).
    pub fn has_capacity(&self) -> bool {
        self.in_flight < self.settings.max_in_flight
            && self.in_flight_bytes < self.settings.max_in_flight_bytes
    }

    fn start_flight(&mut self, bytes: usize) {
        self.in_flight += 1;
        self.in_flight_bytes += bytes;
    }

    fn end_flight(&mut self, bytes: usize) {
        self.in_flight -= 1;
        self.in_flight_bytes -= bytes;
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
        let mut script_keys: Vec<Bytes> = vec![keys.meta().into(), keys.stream().into()];
        if let Some(idem) = idem {
            script_keys.push(keys.idempotency(idem).into());
        }
        let epoch = self.new_epoch();
        let kind: &[u8] = if to_user { b"u" } else { b"e" };
        let args = [
            Bytes::from(keys.shard_channel.clone()),
            Bytes::from_static(kind),
            Bytes::copy_from_slice(data),
            Bytes::from(epoch),
            number(self.settings.history_size as u64),
            millis(self.settings.history_ttl),
            millis(self.settings.meta_ttl()),
            millis(self.settings.idempotency_window),
        ];
        let call = Call::script(Script::Publish, script_keys, args);
        let bytes = data.len();
        self.start_flight(bytes);
        self.send_call(shard, call, Purpose::Publish { op, part, bytes });
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
        let keys = Keys::of(&self.settings.prefix, &user_channel(user));
        self.signal(op, &keys, Bytes::from_static(b"d"))
    }

    fn signal(&mut self, op: OpId, keys: &Keys, message: Bytes) -> Result<(), Unavailable> {
        let shard = self.up_shard(keys.slot()).ok_or(Unavailable)?;
        let bytes = message.len();
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
        self.start_flight(bytes);
        self.send_call(shard, call, Purpose::Signal { op, bytes });
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
                subscribed_on: None,
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
            Some(shard) => self.send_read(shard, &name, Read::Join(conn, since)),
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
        let keys = Keys::of(&self.settings.prefix, &user_channel(&user));
        if let Some(shard) = self.up_shard(keys.slot()) {
            let (member, leases) = (self.lease_member(conn), keys.leases());
            let link = self.shards[shard].link.as_mut().expect("up");
            let args: [&[u8]; 3] = [b"ZREM", leases.as_bytes(), member.as_bytes()];
            link.send(&args, Some(Request::Ignore), Instant::now());
        }
    }

    fn send_lease(&mut self, user: &str, conn: ConnId, max: Bytes, fresh: bool) -> bool {
        let keys = Keys::of(&self.settings.prefix, &user_channel(user));
        let Some(shard) = self.up_shard(keys.slot()) else {
            return false;
        };
        let args = [
            self.lease_member(conn).into(),
            millis(self.settings.lease_ttl),
            max,
        ];
        let call = Call::script(Script::Lease, vec![keys.leases().into()], args);
        self.send_call(shard, call, Purpose::Lease { conn, fresh });
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
        self.remove_retired();
    }

    /// Removes the shards a new slot map left out, answering what waited on them as failed.
    fn remove_retired(&mut self) {
        for key in std::mem::take(&mut self.retired) {
            let shard = self.shards.remove(key);
            log::info!("redis {}: no longer a master; disconnected", shard.addr);
            if let Some(link) = shard.link {
                for request in link.close(&self.registry).collect::<Vec<_>>() {
                    if let Request::Call(_, purpose) = request {
                        self.abandon(purpose);
                    }
                }
            }
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
        if now >= self.next_refresh {
            // A channel pages watch but nobody publishes to keeps its epoch: otherwise its
            // next event would come in a new epoch, a gap that lost nothing.
            self.next_refresh = now + self.settings.meta_ttl() / 4;
            let ttl = self.settings.meta_ttl().as_millis().to_string();
            for watched in self.channels.values() {
                let Some(shard) = self.up_shard(watched.keys.slot()) else {
                    continue;
                };
                let meta = watched.keys.meta();
                let link = self.shards[shard].link.as_mut().expect("up");
                let args: [&[u8]; 3] = [b"PEXPIRE", meta.as_bytes(), ttl.as_bytes()];
                link.send(&args, Some(Request::Ignore), now);
            }
        }
        if now >= self.next_map_retry && self.shards.iter().any(|(_, s)| s.up && !s.subscribed) {
            // Its map answer was unusable (a cluster still electing): ask again.
            self.next_map_retry = now + MAP_RETRY;
            self.refresh_map();
        }
        self.check_positions(now);
        if now >= self.next_renewal {
            self.next_renewal = now + self.settings.lease_ttl / 3;
            for (conn, user) in self.held_leases() {
                self.send_lease(&user, conn, Bytes::from_static(RENEW), false);
            }
        }
    }
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
